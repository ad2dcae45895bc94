//! The HTTP side: a client connection from accept to close ([`connection`]), the forward
//! proxy service ([`service`]), and what it stands on. Knows nothing about fork/exec or
//! generations: it is handed a [`baton_handoff::Drain`] to register its work with.

pub mod access;
pub mod admission;
pub mod auth;
pub mod body;
pub mod bump;
pub mod connect;
pub mod connection;
pub mod connector;
pub mod framing;
pub mod groups;
pub mod heap;
pub mod hop_by_hop;
pub mod hostset;
pub mod http1;
pub mod http2;
pub mod limits;
pub mod metrics;
pub mod migrate;
pub mod parent;
pub mod policy;
pub mod response_framing;
pub mod route;
pub mod rules;
pub mod service;
pub mod sni;
pub mod stash;
pub mod strict;
pub mod target;
pub mod tunnel;
pub mod upgrade;
pub mod upstream;

pub use connection::{ConnectionSettings, Connections};
pub use service::{Proxy, ProxySettings};
