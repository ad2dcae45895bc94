//! Zero-downtime binary upgrades for tokio servers on Linux.
//!
//! A running process is a *generation*. On a trigger (a signal, say) it starts its successor
//! from the binary on disk and passes it its listening sockets; the successor serves and
//! reports ready, and only then does the old generation stop accepting and drain. One
//! listening socket lives across generations, so no connection is refused. A successor that
//! fails to start, is not ready in time, or dies in its canary window is killed, and the old
//! generation serves on.
//!
//! # The common case: [`Upgrader`]
//!
//! ```no_run
//! use baton_handoff::Upgrader;
//! use tokio::signal::unix::SignalKind;
//!
//! # async fn serve(_: tokio::net::TcpListener, _: Upgrader) {}
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     // First thing: it reads what a predecessor passed, before any other thread runs.
//!     let upgrader = Upgrader::from_env()?;
//!     tokio::runtime::Runtime::new()?.block_on(async {
//!         // Adopted from the predecessor when it passed one, bound otherwise.
//!         let listener = upgrader.listen("http", "127.0.0.1:8080".parse()?).await?;
//!         tokio::spawn(serve(listener, upgrader.clone())); // axum::serve, hyper-util, tonic...
//!         upgrader.ready()?; // The predecessor may stop now.
//!         upgrader.upgrade_on(SignalKind::hangup(), |e| eprintln!("upgrade failed: {e}"))?;
//!         upgrader.exit().await; // A successor took over: stop accepting, drain, return.
//!         Ok(())
//!     })
//! }
//! ```
//!
//! - [`Upgrader::from_env`] / [`Upgrader::with_options`] ([`Options`]: the ready timeout, a
//!   canary window, the program and arguments a successor runs);
//! - [`Upgrader::listen`] / [`Upgrader::listen_unix`]: tokio listeners, adopted or bound;
//! - [`Upgrader::ready`]: tells the predecessor (not systemd: see the README);
//! - [`Upgrader::upgrade`]: starts a successor and waits for it; the failure is a value
//!   ([`UpgradeError`]) and this generation serves on. [`Upgrader::upgrade_on`] does it on
//!   a signal;
//! - [`Upgrader::exit`]: resolves once a successor took over (or [`Upgrader::stop`]), for
//!   `with_graceful_shutdown`; [`Upgrader::drain`] tracks connections of a raw tokio server.
//!
//! `examples/hello.rs` (raw tokio, 40 lines) and `examples/axum.rs` are complete servers;
//! `tests/examples.rs` upgrades each three times under load without a failed request. With
//! axum, stop accepting at [`Upgrader::exit`] but let idle connections close a moment later:
//! axum's graceful shutdown closes them, and freshly accepted ones, at once, which fails
//! requests already on their way (`examples/axum.rs` shows how).
//!
//! # The layer under it
//!
//! The facade only calls these; use them directly for what it does not cover (extra fds,
//! a rollback binary, connection transfer with your own records, forecasts for a `check`).
//! The crate knows nothing about HTTP or any configuration format: it works with names,
//! addresses and durations.
//!
//! - [`inherit`]: what a process was handed at start ([`Inherited`]), and the readiness
//!   signal it owes its predecessor ([`ReadySignal`]);
//! - [`adopt`]: the one rule that adopts or binds a listener ([`open_listener`]);
//! - [`listener`]: listening sockets and the accept loop ([`accept_until`]);
//! - [`successor`]: spawning the next generation ([`spawn_successor`]), waiting for it
//!   ([`Successor::await_ready`]), and rolling back when it fails;
//! - [`channel`]: the two-way channel between the generations: the canary window after
//!   ready ([`Watch::canary`]) and the successor's liveness pings;
//! - [`transfer`]: moving live connections (opaque records with their fds) to the successor
//!   over that channel once its canary passed ([`Transfer`], [`Incoming`]);
//! - [`drain`]: stopping gracefully ([`Drain`]);
//! - [`process`]: fd and process hygiene around fork;
//! - [`received`]: what a received fd really is (and a connection's real peer).

#![deny(missing_docs)]

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
pub use transfer::{Incoming, Item, TRANSFER_VERSION, Transfer, TransferError, batches, wipe};
pub use upgrader::{Options, UpgradeError, Upgraded, Upgrader};
pub use wire::MAX_FDS_PER_MESSAGE;
