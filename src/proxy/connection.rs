//! A client connection from accept to close: admission (the connection limit), one task
//! per connection serving HTTP/1.1 (with upgrades for CONNECT) through the [`Proxy`], read
//! through [`Framed`] (the strict framing rules, whose faults are answered here), and how it
//! winds down when the generation drains (the grace period for an idle client). All
//! connections are registered with the generation's [`Drain`]. On a TLS listener the
//! handshake comes first ([`Handshakes`]: its timeout and bound), then the same HTTP inside.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use baton_handoff::{Drain, Peer, Socket, Stream};
use futures_util::future::Either;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::Config;
use crate::proxy::access::{AccessLine, Kind, Sending, Sent};
use crate::proxy::framing::{Framed, RequestSignal};
use crate::proxy::metrics;
use crate::proxy::service::{Body, ERROR_CONTENT_TYPE, Proxy, error_response};
use crate::proxy::strict::Fault;
use crate::proxy::upstream::OriginLease;
use crate::tls::Handshakes;
use crate::tls::handshake::Pending;

/// Connection-level settings.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
}

impl From<&Config> for ConnectionSettings {
    fn from(c: &Config) -> ConnectionSettings {
        ConnectionSettings {
            header_read_timeout: c.timeouts.header_read,
            max_header_bytes: c.limits.max_header_bytes,
            max_connections: c.limits.max_connections,
            handshake_timeout: c.tls.handshake_timeout,
            max_handshakes: c.tls.max_handshakes,
        }
    }
}

/// Everything an accept loop shares with its connections.
pub struct Connections {
    proxy: Arc<Proxy>,
    drain: Drain,
    http: http1::Builder,
    slots: Arc<Semaphore>,
    header_read_timeout: Duration,
    max_header_bytes: usize,
    handshakes: Handshakes,
    /// Open connections on TLS listeners (handshaking or serving).
    tls_open: Arc<AtomicUsize>,
}

impl Connections {
    pub fn new(proxy: Arc<Proxy>, drain: Drain, settings: &ConnectionSettings) -> Arc<Connections> {
        let mut http = http1::Builder::new();
        // max_header_size is exact (the start line counts) and answers 431; max_buf_size bounds
        // the read buffer, which must hold a head of that size.
        http.timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_header_size(settings.max_header_bytes)
            .max_buf_size(settings.max_header_bytes)
            .keep_alive(true);
        Arc::new(Connections {
            proxy,
            drain,
            http,
            slots: Arc::new(Semaphore::new(settings.max_connections)),
            header_read_timeout: settings.header_read_timeout,
            max_header_bytes: settings.max_header_bytes,
            handshakes: Handshakes::new(settings.handshake_timeout, settings.max_handshakes),
            tls_open: Arc::new(AtomicUsize::new(0)),
        })
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Connections open on TLS listeners now (counted apart in the upgrade report).
    pub fn tls_connections(&self) -> usize {
        self.tls_open.load(Ordering::Relaxed)
    }

    /// Accepts on `socket` until draining starts; the socket is dropped (closed in this
    /// process) when the loop ends. With `tls`, each connection's TLS handshake comes first.
    pub fn spawn_accept_loop(
        self: &Arc<Self>,
        name: String,
        socket: Arc<Socket>,
        tls: Option<TlsAcceptor>,
        stop: CancellationToken,
    ) {
        let connections = self.clone();
        tokio::spawn(async move {
            baton_handoff::accept_until(socket, &name, stop, |stream, peer| {
                connections.admit(stream, peer, tls.as_ref());
            })
            .await;
        });
    }

    fn admit(self: &Arc<Self>, stream: Stream, peer: Peer, tls: Option<&TlsAcceptor>) {
        let Ok(slot) = self.slots.clone().try_acquire_owned() else {
            warn!(client = %peer, "connection limit reached: answering 503");
            if tls.is_none() {
                tokio::spawn(refuse_over_limit(stream));
            }
            // On a TLS listener a plain-text answer would be garbage to the client: close.
            return;
        };
        let connections = self.clone();
        match tls.cloned() {
            None => self.drain.connections().spawn(async move {
                connections.serve(stream, peer).await;
                drop(slot);
            }),
            Some(acceptor) => {
                let open = OpenTls::count(&self.tls_open);
                let pending = self.handshakes.begin();
                self.drain.connections().spawn(async move {
                    let _open = open;
                    if let Some(tls) = connections.handshake(pending, &acceptor, stream, peer).await {
                        connections.serve(tls, peer).await;
                    }
                    drop(slot);
                })
            }
        };
    }

    /// The TLS handshake, within its limits; a connection cut by the drain deadline, or
    /// whose handshake fails, is closed (and the reason logged).
    async fn handshake(
        &self,
        pending: Pending,
        acceptor: &TlsAcceptor,
        stream: Stream,
        peer: Peer,
    ) -> Option<tokio_rustls::server::TlsStream<Stream>> {
        let cut = self.drain.cut_token();
        let result = tokio::select! {
            r = self.handshakes.complete(pending, acceptor, stream) => r,
            _ = cut.cancelled() => return None,
        };
        match result {
            Ok(tls) => {
                metrics::tls_handshake("ok");
                Some(tls)
            }
            Err(e) => {
                metrics::tls_handshake(e.label());
                AccessLine::new(Kind::Closed, peer).reason(e.to_string()).write();
                None
            }
        }
    }

    async fn serve<S>(&self, io: S, peer: Peer)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let proxy = self.proxy.clone();
        let requests = Arc::new(RequestSignal::default());
        let signal = requests.clone();
        let lease = Arc::new(OriginLease::new(self.proxy.upstream()));
        let sent = Arc::new(Sent::default());
        // Declared before the connection, so dropped after it: a Squid line still waiting
        // when the connection ends (its client gone) is written then.
        let _closing = Closing(&sent);
        let count = sent.clone();
        let svc = service_fn(move |req: Request<Incoming>| {
            let index = signal.start();
            if let Some(fault) = signal.fault(index) {
                return Either::Left(std::future::ready(refuse_fault(peer, &count, &req, fault)));
            }
            // The framing waits for a CONNECT's answer: a 2xx makes the rest a tunnel.
            let connect = (req.method() == Method::CONNECT).then(|| signal.clone());
            let served = proxy.clone().serve(peer, lease.clone(), count.clone(), req);
            Either::Right(async move {
                let resp = served.await;
                if let Some(signal) = connect {
                    signal.answered_connect(resp.as_ref().is_ok_and(|r| r.status().is_success()));
                }
                resp
            })
        });
        let io = Sending::new(Framed::new(io, requests.clone(), self.max_header_bytes), sent.clone());
        let conn = self.http.serve_connection(TokioIo::new(io), svc).with_upgrades();
        tokio::pin!(conn);
        let draining = self.drain.draining();
        let cut = self.drain.cut_token();
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = draining.cancelled() => {
                // hyper's graceful shutdown closes a connection it sees idle at once, even one
                // whose client has sent part of its next request head. A client may be sending
                // its next request at that very moment (or, on a connection accepted just
                // before the drain, its first), and would see the connection close
                // unanswered. So wait until the client's request reaches the service (then
                // hyper finishes it with `Connection: close`) or the client stays quiet for a
                // grace period: a request counts from its first byte.
                let seen = requests.started();
                let grace = if seen == 0 { self.header_read_timeout } else { IDLE_GRACE };
                tokio::select! {
                    biased;
                    r = conn.as_mut() => return log_end(peer, &sent, r),
                    _ = requests.wait_beyond(seen) => {}
                    _ = quiet_for(&requests, grace) => {}
                    _ = cut.cancelled() => return,
                }
                conn.as_mut().graceful_shutdown();
                tokio::select! {
                    r = conn.as_mut() => r,
                    _ = cut.cancelled() => Ok(()),
                }
            }
        };
        log_end(peer, &sent, result);
    }
}

/// Closes a connection's [`Sent`] when dropped.
struct Closing<'a>(&'a Sent);

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// One open TLS connection in [`Connections::tls_connections`], while it lives.
struct OpenTls(Arc<AtomicUsize>);

impl OpenTls {
    fn count(open: &Arc<AtomicUsize>) -> OpenTls {
        open.fetch_add(1, Ordering::Relaxed);
        OpenTls(open.clone())
    }
}

impl Drop for OpenTls {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves after `grace` unless a request has begun by then (its first byte read, its head
/// not complete): that one is waited for (hyper's `header_read` timeout bounds it).
async fn quiet_for(requests: &RequestSignal, grace: Duration) {
    tokio::time::sleep(grace).await;
    if requests.busy() {
        std::future::pending::<()>().await;
    }
}

/// The answer to a request whose head broke a rule of [`crate::proxy::strict`]: the status
/// and the reason, and the connection closes after it (its framing may not be what hyper
/// made of it).
fn refuse_fault(
    peer: Peer,
    sent: &Arc<Sent>,
    req: &Request<Incoming>,
    fault: Fault,
) -> Result<Response<Body>, Infallible> {
    let started = Instant::now();
    let bytes_out = fault.reason.len() as u64 + 1;
    metrics::request_done(req.method(), fault.status, started, 0, bytes_out, false);
    AccessLine::new(Kind::Refused, peer)
        .request(req.method().clone(), req.uri().clone(), fault.status)
        .traffic(0, bytes_out, started)
        .reason(fault.reason)
        .sent(sent.clone())
        .content_type(Some(HeaderValue::from_static(ERROR_CONTENT_TYPE)))
        .write();
    let mut resp = error_response(fault.status, fault.reason);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    Ok(resp)
}

/// How long a draining generation keeps an idle keep-alive connection open for the client's
/// next request (answered with `Connection: close`) before closing it.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// hyper answers unparsable input itself (400, or 431 for an oversized head) and closes; the
/// reason goes to the access log here. Other endings (resets, a vanished peer) are routine.
fn log_end(peer: Peer, sent: &Arc<Sent>, result: Result<(), hyper::Error>) {
    let Err(e) = result else { return };
    let status = match () {
        () if e.is_parse_too_large() => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        () if e.is_parse() => StatusCode::BAD_REQUEST,
        () if e.is_timeout() => {
            let reason = "request head not received within header_read";
            AccessLine::new(Kind::Closed, peer)
                .reason(reason)
                .sent(sent.clone())
                .write();
            return;
        }
        () => {
            debug!(client = %peer, "connection ended: {e}");
            return;
        }
    };
    AccessLine::new(Kind::Refused, peer)
        .status(status)
        .reason(e.to_string())
        .sent(sent.clone())
        .write();
}

async fn refuse_over_limit(mut stream: Stream) {
    const BODY: &str = "connection limit reached, try again later\n";
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let write = async {
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}
