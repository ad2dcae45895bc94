//! What a generation needs to serve its TLS listeners: the ticketer (taken over from the
//! predecessor) and an acceptor per TLS listener, its certificate loaded at start. Anything
//! that fails here fails the generation before it serves, so a handoff to a broken
//! certificate rolls back and the old generation serves on with the old one.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use tokio_rustls::TlsAcceptor;
use tracing::{info, warn};

use crate::config::Config;
use crate::tls::certs::{self, EXPIRY_WARNING, Validity};
use crate::tls::tickets::TicketKeys;

pub struct TlsListeners {
    pub tickets: Arc<TicketKeys>,
    acceptors: HashMap<String, TlsAcceptor>,
}

impl TlsListeners {
    /// Takes over the predecessor's ticket keys (`inherited_keys`, if it passed any) and
    /// loads every TLS listener's certificate, logging what it serves.
    pub fn load(config: &Config, inherited_keys: Option<OwnedFd>) -> anyhow::Result<TlsListeners> {
        let tickets = Arc::new(TicketKeys::start(inherited_keys, config.tls.ticket_keys.as_deref())?);
        let mut acceptors = HashMap::new();
        for l in &config.listeners {
            let Some(files) = &l.tls else { continue };
            let cert = certs::load(files).with_context(|| format!("listener `{}`", l.name))?;
            log_certificate(&l.name, &cert);
            let server = certs::server_config(&cert, &files.alpn, tickets.clone())
                .with_context(|| format!("listener `{}`: TLS configuration", l.name))?;
            acceptors.insert(l.name.clone(), TlsAcceptor::from(server));
        }
        Ok(TlsListeners { tickets, acceptors })
    }

    /// The acceptor of listener `name`; `None`: a plain listener.
    pub fn acceptor(&self, name: &str) -> Option<TlsAcceptor> {
        self.acceptors.get(name).cloned()
    }
}

fn log_certificate(listener: &str, cert: &certs::Certificate) {
    let (serial, subject, expires) = (&cert.serial, &cert.subject, cert.not_after_text());
    match cert.validity_at(SystemTime::now()) {
        Validity::Valid { left } if left >= EXPIRY_WARNING => {
            info!(listener, %serial, %subject, %expires, days_left = left.as_secs() / 86400, "TLS certificate loaded");
        }
        Validity::Valid { left } => {
            warn!(listener, %serial, %subject, %expires, days_left = left.as_secs() / 86400, "TLS certificate expires soon");
        }
        Validity::Expired { .. } => {
            warn!(listener, %serial, %subject, %expires, "TLS certificate has EXPIRED: clients will refuse it")
        }
        Validity::NotYetValid => {
            warn!(listener, %serial, %subject, "TLS certificate is not valid yet: clients will refuse it")
        }
    }
}
