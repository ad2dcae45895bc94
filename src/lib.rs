//! baton: an HTTP forward proxy that hands its listening sockets to a new binary (or a new
//! configuration) without refusing, resetting or truncating a connection.
//!
//! The handoff itself ([`handoff`], [`listeners`], [`drain`]) knows nothing about HTTP and can
//! be reused by any tokio server; [`proxy`] and [`server`] are the HTTP side; [`generation`]
//! ties them into one process's lifecycle.

pub mod admin;
pub mod config;
pub mod connector;
pub mod control;
pub mod drain;
pub mod generation;
pub mod handoff;
pub mod listeners;
pub mod metrics;
pub mod notify;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod testkit;
pub mod tunnel;
pub mod upstream;
