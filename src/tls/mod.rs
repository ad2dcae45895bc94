//! TLS between clients and the proxy (a "secure web proxy", curl's `--proxy https://`):
//! certificates loaded and checked per generation ([`certs`]), session tickets whose keys
//! survive a handoff ([`tickets`]), and the handshake with its limits ([`handshake`]). The
//! HTTP inside is the proxy's as on a plain listener. And TLS inspection's side of it: the CA
//! and the leaves it mints ([`mint`]), TLS to origins ([`origin`]).

pub mod certs;
pub mod handshake;
pub mod listeners;
pub mod mint;
pub mod moving;
pub mod origin;
pub mod tickets;

pub use certs::{CertError, Certificate, Validity};
pub use handshake::{HandshakeError, Handshakes};
pub use listeners::TlsListeners;
pub use tickets::{TicketError, TicketKeys};
