//! Accepting TLS: the handshake of one connection, bounded in time (`handshake_timeout`) and
//! in number (`max_handshakes` in progress at once, for the whole process).
//!
//! The bound evicts rather than queues: when a new connection finds `max_handshakes`
//! handshakes in progress, the oldest is dropped. A flood of connections that never send a
//! ClientHello (or send one byte a minute) then costs at most `max_handshakes` tasks and
//! never delays a real client, whose ClientHello arrives with its first round trip: it is
//! always among the newest. A queue would have made it wait behind the flood; refusing the
//! newest would have refused it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

/// Why a handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("TLS handshake not completed within handshake_timeout ({0:?})")]
    Timeout(Duration),
    #[error("TLS handshake dropped: max_handshakes ({0}) in progress and this one was the oldest")]
    Evicted(usize),
    #[error("TLS handshake failed: {0}")]
    Failed(#[source] std::io::Error),
}

impl HandshakeError {
    /// The label of `baton_tls_handshakes_total{result}`.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::Timeout(_) => "timeout",
            HandshakeError::Evicted(_) => "evicted",
            HandshakeError::Failed(_) => "failed",
        }
    }
}

/// The handshakes in progress in this process, oldest first.
#[derive(Debug)]
pub struct Handshakes {
    timeout: Duration,
    max: usize,
    next: AtomicU64,
    pending: Arc<Mutex<BTreeMap<u64, CancellationToken>>>,
}

/// A connection's place among the handshakes in progress, taken in accept order (before its
/// task runs, since tasks run in no particular order); it leaves when dropped.
#[derive(Debug)]
pub struct Pending {
    id: u64,
    evicted: CancellationToken,
    pending: Arc<Mutex<BTreeMap<u64, CancellationToken>>>,
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.pending.lock() {
            pending.remove(&self.id);
        }
    }
}

impl Handshakes {
    pub fn new(timeout: Duration, max: usize) -> Handshakes {
        Handshakes {
            timeout,
            max: max.max(1),
            next: AtomicU64::new(0),
            pending: Arc::new(Mutex::new(BTreeMap::new())),
        }
    }

    /// Takes a place for a connection just accepted, evicting the oldest handshakes in
    /// progress beyond the bound.
    pub fn begin(&self) -> Pending {
        let evicted = CancellationToken::new();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut pending) = self.pending.lock() {
            while pending.len() >= self.max {
                match pending.pop_first() {
                    Some((_, oldest)) => oldest.cancel(),
                    None => break,
                }
            }
            pending.insert(id, evicted.clone());
        }
        Pending {
            id,
            evicted,
            pending: self.pending.clone(),
        }
    }

    /// Runs the server handshake on `io` in the place `pending`, within the timeout.
    pub async fn complete<IO>(
        &self,
        pending: Pending,
        acceptor: &TlsAcceptor,
        io: IO,
    ) -> Result<TlsStream<IO>, HandshakeError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let evicted = pending.evicted.clone();
        let result = tokio::select! {
            biased;
            _ = evicted.cancelled() => Err(HandshakeError::Evicted(self.max)),
            r = acceptor.accept(io) => r.map_err(HandshakeError::Failed),
            _ = tokio::time::sleep(self.timeout) => Err(HandshakeError::Timeout(self.timeout)),
        };
        drop(pending);
        result
    }
}
