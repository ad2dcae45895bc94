//! Accepting and serving connections: one accept loop per listener, one task per connection
//! (HTTP/1.1 with upgrades for CONNECT), all registered with the generation's [`Drain`].

use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::{Notify, Semaphore};
use tracing::{debug, info, warn};

use crate::drain::Drain;
use crate::listeners::{self, Peer, Socket, Stream};
use crate::proxy::Proxy;
use crate::upstream::Affinity;

/// Connection-level settings.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
}

/// Everything an accept loop shares with its connections.
pub struct Server {
    proxy: Arc<Proxy>,
    drain: Drain,
    http: http1::Builder,
    slots: Arc<Semaphore>,
    header_read_timeout: Duration,
}

impl Server {
    pub fn new(proxy: Arc<Proxy>, drain: Drain, settings: &ServerSettings) -> Arc<Server> {
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.max_header_bytes)
            .keep_alive(true);
        Arc::new(Server {
            proxy,
            drain,
            http,
            slots: Arc::new(Semaphore::new(settings.max_connections)),
            header_read_timeout: settings.header_read_timeout,
        })
    }

    /// Accepts on `socket` until draining starts; the socket is dropped (closed in this
    /// process) when the loop ends.
    pub fn spawn_accept_loop(self: &Arc<Self>, name: String, socket: Arc<Socket>) {
        let server = self.clone();
        let draining = self.drain.draining();
        tokio::spawn(async move {
            listeners::accept_until(socket, &name, draining, |stream, peer| server.admit(stream, peer)).await;
        });
    }

    fn admit(self: &Arc<Self>, stream: Stream, peer: Peer) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            warn!(client = %peer, "connection limit reached: answering 503");
            tokio::spawn(refuse_over_limit(stream));
            return;
        };
        let server = self.clone();
        self.drain.connections().spawn(async move {
            match stream {
                Stream::Tcp(s) => server.serve(s, peer).await,
                Stream::Unix(s) => server.serve(s, peer).await,
            }
            drop(slot);
        });
    }

    async fn serve<S>(&self, io: S, peer: Peer)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.proxy.clone();
        let requests = Arc::new(RequestSignal::default());
        let started = requests.clone();
        let affinity = Arc::new(Affinity::new(self.proxy.upstream()));
        let svc = service_fn(move |req| {
            started.mark();
            proxy.clone().serve(peer, affinity.clone(), req)
        });
        let conn = self.http.serve_connection(TokioIo::new(io), svc).with_upgrades();
        tokio::pin!(conn);
        let draining = self.drain.draining();
        let cut = self.drain.cut_token();
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = draining.cancelled() => {
                // hyper's graceful shutdown closes a connection it sees idle at once. A client
                // may be sending its next request at that very moment (or, on a connection
                // accepted just before the drain, its first), and would see the connection
                // close unanswered. So wait until the client starts a request (then hyper
                // finishes it with `Connection: close`) or stays quiet for a grace period.
                let seen = requests.count();
                let grace = if seen == 0 { self.header_read_timeout } else { IDLE_GRACE };
                tokio::select! {
                    r = conn.as_mut() => return log_end(peer, r),
                    _ = requests.wait_beyond(seen) => {}
                    _ = tokio::time::sleep(grace) => {}
                    _ = cut.cancelled() => return,
                }
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = cut.cancelled() => Ok(()),
                }
            }
        };
        log_end(peer, result);
    }
}

/// How long a draining generation keeps an idle keep-alive connection open for the client's
/// next request (answered with `Connection: close`) before closing it.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// hyper answers unparsable input itself (400, or 431 for an oversized head) and closes; the
/// reason goes to the access log here. Other endings (resets, a vanished peer) are routine.
fn log_end(peer: Peer, result: Result<(), hyper::Error>) {
    let Err(e) = result else { return };
    if e.is_parse_too_large() {
        warn!(target: "baton::access", client = %peer, status = 431, reason = %e, "refused");
    } else if e.is_parse() {
        warn!(target: "baton::access", client = %peer, status = 400, reason = %e, "refused");
    } else if e.is_timeout() {
        info!(target: "baton::access", client = %peer, reason = "request head not received within header_read", "closed");
    } else {
        debug!(client = %peer, "connection ended: {e}");
    }
}

/// Counts the requests a connection started, and lets the drain wait for the next one.
#[derive(Default)]
struct RequestSignal {
    started: AtomicU64,
    notify: Notify,
}

impl RequestSignal {
    fn mark(&self) {
        self.started.fetch_add(1, Ordering::AcqRel);
        // notify_one keeps a permit if nobody waits yet: no lost wake-up.
        self.notify.notify_one();
    }

    fn count(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    async fn wait_beyond(&self, seen: u64) {
        while self.count() <= seen {
            self.notify.notified().await;
        }
    }
}

async fn refuse_over_limit(stream: Stream) {
    const BODY: &str = "connection limit reached, try again later\n";
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let write = async {
        match stream {
            Stream::Tcp(mut s) => {
                s.write_all(resp.as_bytes()).await?;
                s.shutdown().await
            }
            Stream::Unix(mut s) => {
                s.write_all(resp.as_bytes()).await?;
                s.shutdown().await
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}
