//! Zero-downtime binary upgrades for tokio servers.
//!
//! A running process is a *generation*. On a trigger it fork+execs its successor and passes
//! it its listening sockets with systemd's protocol (`LISTEN_FDS`, `LISTEN_FDNAMES`,
//! `LISTEN_PID`), plus the write end of a readiness pipe. The successor adopts the sockets,
//! starts serving, and reports ready. Only then does the old generation stop accepting and
//! drain. If the successor exits or is not ready in time, it is killed and reaped, and the
//! old generation serves on. One listening socket (one open file description) lives across
//! generations, so the kernel's accept queue is never dropped and no connection is refused.
//!
//! The crate knows nothing about HTTP or any configuration format; it works with names,
//! addresses and durations:
//!
//! - [`inherit`]: what a process was handed at start ([`Inherited`]), and the readiness
//!   signal it owes its predecessor ([`ReadySignal`]);
//! - [`listener`]: listening sockets, the one rule that adopts or binds them
//!   ([`open_listener`]), and the accept loop ([`accept_until`]);
//! - [`successor`]: spawning the next generation ([`spawn_successor`]), waiting for it
//!   ([`Successor::await_ready`]), and rolling back when it fails;
//! - [`channel`]: the two-way channel between the generations: the canary window after
//!   ready ([`Watch::canary`]) and the successor's liveness pings;
//! - [`transfer`]: moving live connections (opaque records with their fds) to the successor
//!   over that channel once its canary passed ([`Transfer`], [`Incoming`]);
//! - [`drain`]: stopping gracefully ([`Drain`]);
//! - [`process`]: fd and process hygiene around fork;
//! - [`received`]: what a received fd really is (and a connection's real peer).
//!
//! `examples/hello.rs` is a complete server that upgrades on SIGUSR2 in about 50 lines.

pub mod adopt;
pub mod channel;
pub mod drain;
pub mod inherit;
pub mod listener;
pub mod process;
pub mod received;
pub mod successor;
pub mod transfer;
pub mod upgrader;
mod wire;

pub use adopt::{Forecast, Held, Listener, Opened, forecast, open_listener};
pub use channel::{CanaryFailed, Passed, PredecessorChannel, Verdict, Watch};
pub use drain::{Drain, DrainReport};
pub use inherit::{FailureReporter, Inherited, ReadySignal};
pub use listener::{ListenAddr, ListenError, Origin, Peer, Socket, Stream, accept_until, bind};
pub use process::ChildProcess;
pub use successor::{HandoffError, PassedFd, PassedListener, Ready, Successor, SuccessorSpec, spawn_successor};
pub use transfer::{Incoming, Item, TRANSFER_VERSION, Transfer, TransferError, batches};
pub use upgrader::{Options, UpgradeError, Upgraded, Upgrader};
pub use wire::MAX_FDS_PER_MESSAGE;
