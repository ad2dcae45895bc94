//! A bumped tunnel (a CONNECT whose rule says `bump`, goproxy's MITM, Squid's `ssl_bump
//! bump`): baton ends the client's TLS itself with a leaf minted for the ClientHello's
//! server name (`tls::mint`; the hello already read for the SNI is replayed into the
//! handshake), then serves the HTTP/1.1 inside through the same service as any request:
//! `https://name/path` targets, the rules (`paths` among them), a pool of TLS connections
//! to origins verified against `[inspect] origin_roots`, `Via`, an access line each. The
//! CONNECT's own connection to the origin is closed: requests open their own.
//!
//! Failures say so: a client that refuses the leaf (an app that pins its server's key) is
//! logged and counted per server name (it needs a `splice` rule); an origin that fails
//! verification is a 502 inside the bumped TLS naming the reason. A bumped tunnel holds TLS
//! state in this process: at a handoff it drains (its next answer says
//! `Connection: close`), it never moves.
//!
//! A WebSocket inside (`wss://` through the proxy) switches as an absolute-form one does
//! (`proxy::upgrade`): the origin's 101 makes the rest of the bumped connection a tunnel to
//! the origin's TLS connection, copied (TLS at both ends), with the upgrade's access line.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tracing::warn;

use crate::proxy::access::{Kind, Sent};
use crate::proxy::admission::Slot;
use crate::proxy::framing::{Framed, RequestSignal};
use crate::proxy::metrics;
use crate::proxy::service::{Ask, Body, Client, Proxy};
use crate::proxy::target::Inspected;
use crate::proxy::tunnel::{CopyIo, TunnelClient};
use crate::proxy::upgrade::SwitchAwaited;

/// How long a draining generation keeps an idle bumped connection for the client's next
/// request (answered with `Connection: close`), as an idle plain one (`connection`).
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// The tunnel's name and port, as its requests' targets name them.
pub(super) struct Bump {
    pub(super) sni: String,
    pub(super) port: u16,
}

impl Proxy {
    /// Serves the bumped tunnel over `client` until it ends (`early`: its first bytes, the
    /// ClientHello, which the handshake reads first). `ask` is the CONNECT's, whose line is
    /// written at the end. `slot`: the tunnel's place under the connection limits, which a
    /// WebSocket inside keeps.
    pub(super) async fn bump(self: Arc<Self>, client: TunnelClient, early: Vec<u8>, bump: Bump, ask: &Ask, slot: Slot) {
        let Some(mint) = self.inspection.clone() else {
            return;
        };
        let io = Rewound::new(early, into_copy(client));
        let config = match mint.server_config(&bump.sni) {
            Ok((config, minted)) => {
                if minted {
                    metrics::bump_leaf_minted();
                }
                config
            }
            Err(why) => return bump_ended(ask, &bump, "mint_failed", format!("no certificate for it: {why}")),
        };
        let wait = self.settings.handshake_timeout;
        let tls = match tokio::time::timeout(wait, TlsAcceptor::from(config).accept(io)).await {
            Err(_) => return bump_ended(ask, &bump, "timeout", format!("no TLS handshake within {wait:?}")),
            Ok(Err(e)) => return refused_or_failed(ask, &bump, &e),
            Ok(Ok(tls)) => tls,
        };
        let _open = Open::count(&self.bumped_open);
        let served = self.clone().serve_bumped(tls, &bump, ask, slot).await;
        bump_ended(ask, &bump, "ok", format!("{served} requests served inside"));
    }

    /// hyper's HTTP/1.1 server over the bumped TLS, each request through [`Proxy::serve`];
    /// when the generation drains, answers say `Connection: close`, and an idle connection
    /// is closed after [`IDLE_GRACE`]. The number of requests served.
    async fn serve_bumped<T>(self: Arc<Self>, tls: T, bump: &Bump, ask: &Ask, slot: Slot) -> u64
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let inner = Arc::new(Inner {
            proxy: self.clone(),
            client: Arc::new(Client::new(self.upstream(), Sent::multiplexed())),
            authority: match bump.port {
                443 => bump.sni.clone(),
                port => format!("{}:{port}", bump.sni),
            },
            inspected: Inspected {
                sni: bump.sni.as_str().into(),
                key: format!("tls {}:{}", bump.sni, bump.port).into(),
            },
            peer: ask.peer,
            closing: AtomicBool::new(false),
            served: AtomicUsize::new(0),
            signal: Arc::new(RequestSignal::default()),
            slot,
        });
        // The requests inside are held to the same framing rules as a plain connection's
        // (a smuggled request would reach the origin inside the bump as well).
        let max_head = self.settings.max_header_bytes;
        let framed = Framed::new(tls, inner.signal.clone(), max_head);
        let service = {
            let inner = inner.clone();
            service_fn(move |req| inner.clone().answer(req))
        };
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.settings.header_read)
            .max_buf_size(max_head)
            .keep_alive(true);
        // With upgrades: a 101 hands the stream (its framing passing bytes through) to the
        // WebSocket's tunnel.
        let conn = builder.serve_connection(TokioIo::new(framed), service).with_upgrades();
        tokio::pin!(conn);
        let (draining, cut) = (self.drain.draining(), self.drain.cut_token());
        tokio::select! {
            _ = conn.as_mut() => return inner.served(),
            () = cut.cancelled() => return inner.served(),
            () = draining.cancelled() => {}
        }
        inner.closing.store(true, Ordering::Relaxed);
        tokio::select! {
            _ = conn.as_mut() => return inner.served(),
            () = cut.cancelled() => return inner.served(),
            () = tokio::time::sleep(IDLE_GRACE) => conn.as_mut().graceful_shutdown(),
        }
        tokio::select! {
            _ = conn.as_mut() => {}
            () = cut.cancelled() => {}
        }
        inner.served()
    }
}

/// What every request of one bumped connection shares.
struct Inner {
    proxy: Arc<Proxy>,
    client: Arc<Client>,
    /// `name` or `name:port`: the requests' targets are `https://<authority><path>`.
    authority: String,
    inspected: Inspected,
    peer: baton_handoff::Peer,
    /// The generation drains: answers close the connection.
    closing: AtomicBool,
    served: AtomicUsize,
    /// The framing's word on each request: its fault, and whether it waits for an answer.
    signal: Arc<RequestSignal>,
    /// The CONNECT's place under the connection limits, for a WebSocket's tunnel inside.
    slot: Slot,
}

impl Inner {
    fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed) as u64
    }

    /// One request from inside the tunnel, as the proxy serves an absolute-form one.
    async fn answer(self: Arc<Self>, mut req: Request<Incoming>) -> Result<Response<Body>, std::convert::Infallible> {
        self.served.fetch_add(1, Ordering::Relaxed);
        let index = self.signal.start();
        // After a fault the framing no longer follows the stream: the connection closes.
        let fault = self.signal.fault(index);
        let checked = match fault {
            Some(fault) => Err((fault.status, fault.reason.to_string())),
            None => self.to_target(&mut req),
        };
        // The framing waits for an upgrade's answer (a CONNECT inside was refused above).
        let awaited = self.signal.awaits_answer(index);
        let mut switch = None;
        let mut resp = match checked {
            Ok(()) => {
                if awaited {
                    req.extensions_mut().insert(SwitchAwaited);
                    switch = Some(hyper::upgrade::on(&mut req));
                }
                let Ok(resp) = self.proxy.clone().serve(self.peer, self.client.clone(), req).await;
                resp
            }
            Err((status, reason)) => self.proxy.refuse_inside(self.peer, &req, status, &reason),
        };
        if awaited {
            // A 101 (the service left the origin's stream as a tunnel) makes the rest of the
            // connection the WebSocket's; anything else is followed by the next request.
            let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
            let tunnel = if switched { self.client.take_tunnel() } else { None };
            self.signal.answered_connect(tunnel.is_some());
            if let (Some(tunnel), Some(switch)) = (tunnel, switch) {
                self.start_switched(tunnel, switch);
            }
        }
        if fault.is_some() || self.closing.load(Ordering::Relaxed) {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }

    /// Relays the WebSocket's tunnel once hyper has written the 101 and given up the stream
    /// (on the drain's tunnel tracker from the start, as an HTTP/2 CONNECT's).
    fn start_switched(&self, tunnel: crate::proxy::service::Accepted, switch: hyper::upgrade::OnUpgrade) {
        let (proxy, slot) = (self.proxy.clone(), self.slot.clone());
        self.proxy.drain.tunnels().spawn(async move {
            match switch.await {
                Ok(stream) => {
                    let end = TunnelClient::Other(Box::new(TokioIo::new(stream)));
                    proxy.start_tunnel(tunnel, end, Vec::new(), 0, slot);
                }
                Err(e) => {
                    let reason = format!("tunnel not started: the connection ended before its 101 ({e})");
                    tunnel
                        .ask
                        .line(Kind::Closed, StatusCode::SWITCHING_PROTOCOLS)
                        .reason(reason)
                        .write();
                }
            }
        });
    }

    /// Makes the request's origin-form target the `https://` one its tunnel names. Its Host
    /// must name the same server as the ClientHello did (the rules decided on that name):
    /// else 421 (RFC 9110 §15.5.20). CONNECT inside is refused (a tunnel in a tunnel).
    fn to_target(&self, req: &mut Request<Incoming>) -> Result<(), (StatusCode, String)> {
        if req.method() == Method::CONNECT {
            return Err((StatusCode::METHOD_NOT_ALLOWED, "CONNECT inside a bumped tunnel".into()));
        }
        if let Some(host) = req.headers().get(header::HOST) {
            let host = String::from_utf8_lossy(host.as_bytes());
            let name = host_of(&host);
            if !name.eq_ignore_ascii_case(&self.inspected.sni) {
                let why = format!(
                    "Host {host} is not {}, the server this TLS connection was opened to",
                    self.inspected.sni
                );
                return Err((StatusCode::MISDIRECTED_REQUEST, why));
            }
        }
        let path = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let target = format!("https://{}{path}", self.authority);
        *req.uri_mut() = Uri::try_from(target).map_err(|e| (StatusCode::BAD_REQUEST, format!("bad target: {e}")))?;
        req.extensions_mut().insert(self.inspected.clone());
        Ok(())
    }
}

/// A Host field's host: without the port, an IPv6 address without brackets.
fn host_of(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    host.rsplit_once(':').map_or(host, |(h, _)| h).trim_end_matches('.')
}

impl Proxy {
    /// The proxy's own answer to a request inside a bumped tunnel that never reached the
    /// service (its line names the target as the client wrote it).
    fn refuse_inside(
        &self,
        peer: baton_handoff::Peer,
        req: &Request<Incoming>,
        status: StatusCode,
        reason: &str,
    ) -> Response<Body> {
        let ask = Ask::of(peer, req, Sent::multiplexed());
        self.refuse(&ask, status, reason)
    }
}

/// A handshake that failed: a client that sent an alert refused the leaf (certificate
/// pinning, or a CA it does not trust), counted per server name; anything else failed.
fn refused_or_failed(ask: &Ask, bump: &Bump, e: &io::Error) {
    let alert = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .filter(|r| matches!(r, rustls::Error::AlertReceived(_)));
    match alert {
        Some(alert) => {
            metrics::bump_client_refused(&bump.sni);
            warn!(sni = %bump.sni, "a client refused the bumped certificate ({alert}): if it pins its server's key, give it a splice rule");
            let reason = format!("the client refused the minted certificate ({alert}): a pinned app? splice it");
            bump_ended(ask, bump, "client_refused", reason);
        }
        None => bump_ended(
            ask,
            bump,
            "failed",
            format!("TLS handshake with the client failed: {e}"),
        ),
    }
}

/// The CONNECT's line for a bumped tunnel, once it ended, and its count by `result`.
fn bump_ended(ask: &Ask, bump: &Bump, result: &'static str, why: String) {
    metrics::bumped(result);
    ask.line(Kind::Tunnel, StatusCode::OK)
        .traffic(0, 0, ask.started)
        .reason(format!("bumped {}: {why}", bump.sni))
        .write();
}

fn into_copy(client: TunnelClient) -> Box<dyn CopyIo> {
    match client {
        TunnelClient::Socket(s) => Box::new(s),
        TunnelClient::Tls(c) => Box::new(c),
        TunnelClient::Other(io) => io,
    }
}

/// One open bumped tunnel in [`Proxy::bumped_connections`], while it lives.
struct Open(Arc<AtomicUsize>);

impl Open {
    fn count(open: &Arc<AtomicUsize>) -> Open {
        open.fetch_add(1, Ordering::Relaxed);
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The client's stream with the bytes already read from it (the ClientHello, read for its
/// server name) put back in front.
struct Rewound {
    early: Vec<u8>,
    at: usize,
    io: Box<dyn CopyIo>,
}

impl Rewound {
    fn new(early: Vec<u8>, io: Box<dyn CopyIo>) -> Rewound {
        Rewound { early, at: 0, io }
    }
}

impl AsyncRead for Rewound {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.at < this.early.len() {
            let n = buf.remaining().min(this.early.len() - this.at);
            buf.put_slice(&this.early[this.at..this.at + n]);
            this.at += n;
            if this.at == this.early.len() {
                this.early = Vec::new();
                this.at = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_field_names_its_server_without_the_port() {
        assert_eq!(host_of("example.com"), "example.com");
        assert_eq!(host_of("example.com:8443"), "example.com");
        assert_eq!(host_of("example.com."), "example.com");
        assert_eq!(host_of("[::1]:443"), "::1");
    }

    #[tokio::test]
    async fn the_early_bytes_are_read_first() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, mut far) = tokio::io::duplex(64);
        far.write_all(b" world").await.unwrap();
        drop(far);
        let mut io = Rewound::new(b"hello".to_vec(), Box::new(near));
        let mut all = String::new();
        io.read_to_string(&mut all).await.unwrap();
        assert_eq!(all, "hello world", "the replayed bytes come before the stream's");
    }
}
