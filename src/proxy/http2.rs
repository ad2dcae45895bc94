//! HTTP/2 on TLS listeners (ALPN `h2`; RFC 9113): many requests and CONNECT tunnels share
//! one connection and one handshake, as Chrome and `curl --proxy-http2` use a secure web
//! proxy.
//!
//! - Every stream goes through the same service as an HTTP/1.1 request: the rules, parents,
//!   the pool, `Via`, the access line (`proto=h2`).
//! - A CONNECT stream (§8.5) answered 2xx becomes a tunnel of the usual kind: its client end
//!   is the stream, copied (not spliced), under the tunnel idle timeout and the client's
//!   bandwidth limit, with one access line at its end. Tunnels do not move at a handoff.
//!   Each CONNECT stream takes a place of its own under the connection limits (it holds an
//!   origin socket as a connection's tunnel does): streams would otherwise multiply what
//!   `max_connections_per_client` bounds by `h2_max_streams`.
//! - Limits: `h2_max_streams` concurrent streams per connection; the header list bounded
//!   by `max_header_bytes` (which also bounds CONTINUATION floods, CVE-2024-27316, since the
//!   h2 crate counts the decoded list as it reads them); streams the client resets before
//!   the service saw them are bounded by the h2 crate's `max_pending_accept_reset_streams`,
//!   past which it sends GOAWAY (ENHANCE_YOUR_CALM): the rapid-reset attack
//!   (CVE-2023-44487).
//! - At a handoff the connection gets GOAWAY when the generation starts draining (after the
//!   verdict): the client opens its next streams to the new generation, streams in flight
//!   finish, and the connection closes after its last one, or at the drain deadline.
//!
//! Why not the framing layer: HTTP/2's framing is the h2 crate's, binary and length-prefixed;
//! the strict request rules of `proxy::strict` are HTTP/1.1's text rules.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use baton_handoff::{Drain, Peer};
use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http2;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use crate::proxy::access::{AccessLine, Kind, Sent};
use crate::proxy::admission::{Admission, Refused};
use crate::proxy::service::{Body, Client, Proxy, error_response};
use crate::proxy::tunnel::TunnelClient;

/// What an HTTP/2 connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct H2Settings {
    pub max_streams: u32,
    pub max_header_bytes: usize,
}

/// One stream's flow-control window (and the connection's, times the streams that fill it
/// at once): 1 MiB lets one tunnel move about as much per round trip as an HTTP/1.1 tunnel's
/// socket buffers do, instead of the protocol's default 64 KiB.
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 8 * STREAM_WINDOW;
const KEEP_ALIVE: Duration = Duration::from_secs(60);

/// Serves an HTTP/2 connection from `peer` until it ends, the generation has drained it
/// (GOAWAY, then its last stream), or the drain deadline cuts it.
pub async fn serve<T>(
    proxy: Arc<Proxy>,
    drain: Drain,
    io: T,
    peer: Peer,
    admission: Arc<Admission>,
    settings: H2Settings,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(settings.max_streams)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        // A peer that stops answering PINGs (gone without a FIN) is closed.
        .keep_alive_interval(KEEP_ALIVE)
        .keep_alive_timeout(KEEP_ALIVE);
    // Boxed: hyper moves each stream's future into the task it spawns for it, and the
    // service's future is large (the copies were most of the memcpy per h2 request).
    let service = service_fn(move |req| Box::pin(stream(proxy.clone(), peer, admission.clone(), req)));
    let conn = builder.serve_connection(TokioIo::new(io), service);
    let mut conn = std::pin::pin!(conn);
    let (draining, cut) = (drain.draining(), drain.cut_token());
    tokio::select! {
        ended = conn.as_mut() => return log_end(peer, ended),
        () = draining.cancelled() => {}
        () = cut.cancelled() => return,
    }
    // GOAWAY: no new streams here; those in flight finish.
    conn.as_mut().graceful_shutdown();
    tokio::select! {
        ended = conn.as_mut() => log_end(peer, ended),
        () = cut.cancelled() => {}
    }
}

/// A connection that ended on an error gets a line with it: a GOAWAY baton sent (too many
/// resets, a header list too large) says why here, whatever the client saw.
fn log_end(peer: Peer, ended: Result<(), hyper::Error>) {
    if let Err(e) = ended {
        // hyper says only "http2 error"; the h2 error under it names the GOAWAY's code.
        let cause = std::error::Error::source(&e)
            .map(|s| format!(": {s}"))
            .unwrap_or_default();
        let reason = format!("HTTP/2 connection ended: {e}{cause}");
        AccessLine::new(Kind::Closed, peer)
            .proto_of(http::Version::HTTP_2)
            .reason(reason)
            .write();
    }
}

/// One stream: the service's answer; a CONNECT answered 2xx leaves its tunnel, which is
/// relayed once hyper hands over the stream.
async fn stream(
    proxy: Arc<Proxy>,
    peer: Peer,
    admission: Arc<Admission>,
    mut req: Request<Incoming>,
) -> Result<http::Response<Body>, Infallible> {
    let mut upgrade = None;
    if req.method() == Method::CONNECT {
        match admission.admit(&peer) {
            Ok(slot) => upgrade = Some((hyper::upgrade::on(&mut req), slot)),
            Err(refused) => return Ok(over_limit(peer, &refused)),
        }
    }
    // Streams share the connection: no byte count of the socket is one stream's, so each
    // line is written when its answer is (its bytes are the body's, not the wire's).
    let client = Arc::new(Client::new(proxy.upstream(), Sent::multiplexed()));
    let Ok(resp) = proxy.clone().serve(peer, client.clone(), req).await;
    if let Some((upgrade, slot)) = upgrade
        && resp.status().is_success()
        && let Some(tunnel) = client.take_tunnel()
    {
        // On the drain's tunnel tracker from the start: a generation does not exit between
        // the 200 and its tunnel.
        let tunnels = proxy.drain.tunnels().clone();
        tunnels.spawn(async move {
            // Resolves once hyper has sent the 2xx and given the stream to the tunnel.
            match upgrade.await {
                Ok(stream) => {
                    let end = TunnelClient::Other(Box::new(TokioIo::new(stream)));
                    proxy.start_tunnel(tunnel, end, Vec::new(), 0, slot);
                }
                Err(e) => {
                    let reason = format!("tunnel not started: the stream ended before its 200 ({e})");
                    tunnel.ask.line(Kind::Closed, StatusCode::OK).reason(reason).write();
                }
            }
        });
    }
    Ok(resp)
}

/// A CONNECT stream beyond the connection limits: 503 on the stream, the connection goes on.
fn over_limit(peer: Peer, refused: &Refused) -> http::Response<Body> {
    AccessLine::new(Kind::Denied, peer)
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .proto_of(http::Version::HTTP_2)
        .rule(refused.rule.as_str())
        .reason(refused.reason.clone())
        .write();
    error_response(StatusCode::SERVICE_UNAVAILABLE, &refused.reason)
}
