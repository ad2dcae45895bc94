//! baton: an HTTP forward proxy that hands its listening sockets to a new binary (or a new
//! configuration) without refusing, resetting or truncating a connection.
//!
//! The layers, bottom to top (a module uses only those below it):
//!
//! - the `baton-handoff` crate: inheriting listeners, spawning a successor, readiness,
//!   rollback, the accept loop and the drain; it knows nothing about HTTP;
//! - [`config`]: the TOML configuration, validated once into typed values;
//! - [`control`]: the control protocol's messages and the typed client the CLI uses;
//! - [`tls`]: TLS listeners' certificates, session tickets that survive a handoff, and the
//!   handshake with its limits;
//! - [`proxy`]: the HTTP side (serving client connections, forwarding, CONNECT tunnels,
//!   policy, origin connections, access lines and request metrics);
//! - [`daemon`]: one process's lifecycle (a generation), the control socket's server, the
//!   admin listener, the state shared between generations, systemd notify and logging.
//!
//! `fuzzing` (hidden) holds the properties the fuzz targets check, for the targets and their
//! corpus replay (`tests/fuzz_corpora.rs`).
//!
//! `docs/design.md` opens with the module map.

pub mod config;
pub mod control;
pub mod daemon;
#[doc(hidden)]
pub mod fuzzing;
pub mod proxy;
pub mod tls;
