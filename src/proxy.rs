//! The forward proxy: absolute-form HTTP/1.1 requests go to the origin through a pooled
//! client, CONNECT opens a TCP tunnel. Errors are answers with a one-line reason, never a
//! dropped connection. Knows nothing about fork/exec or generations: it is handed a
//! [`Drain`] to register tunnels with.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpStream;
use tracing::{info, warn};

use crate::drain::Drain;
use crate::listeners::Peer;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Settings the proxy needs from the configuration.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub allow_clients: Vec<ipnet::IpNet>,
}

pub struct Proxy {
    client: Client<HttpConnector, Body>,
    settings: ProxySettings,
    drain: Drain,
    via: HeaderValue,
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy's own credentials.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
];

impl Proxy {
    pub fn new(settings: ProxySettings, drain: Drain) -> Proxy {
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(settings.upstream_connect));
        http.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .pool_max_idle_per_host(256)
            .timer(hyper_util::rt::TokioTimer::new())
            .build(http);
        Proxy {
            client,
            settings,
            drain,
            via: HeaderValue::from_static("1.1 baton"),
        }
    }

    /// Serves one request from `peer`.
    pub async fn serve(self: Arc<Self>, peer: Peer, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let method = req.method().clone();
        let target = req.uri().to_string();
        if let Peer::Ip(addr) = peer
            && !self.client_allowed(addr)
        {
            let reason = format!("client {} is not allowed to use this proxy", addr.ip());
            return Ok(self.refuse(peer, &method, &target, started, StatusCode::FORBIDDEN, &reason));
        }
        if method == Method::CONNECT {
            return Ok(self.connect(peer, req, started).await);
        }
        Ok(self.forward(peer, req, started).await)
    }

    fn client_allowed(&self, addr: SocketAddr) -> bool {
        let ip = match addr.ip() {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr.ip(), std::net::IpAddr::V4),
            v4 => v4,
        };
        self.settings.allow_clients.iter().any(|n| n.contains(&ip))
    }

    async fn forward(&self, peer: Peer, req: Request<Incoming>, started: Instant) -> Response<Body> {
        let method = req.method().clone();
        let target = req.uri().to_string();
        let authority = match check_target(req.uri()) {
            Ok(a) => a,
            Err(reason) => return self.refuse(peer, &method, &target, started, StatusCode::BAD_REQUEST, reason),
        };
        let (mut parts, body) = req.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        // The proxy answered `Expect: 100-continue` itself (hyper sends 100 when the body is
        // first read); the origin receives the body without waiting.
        parts.headers.remove(header::EXPECT);
        match HeaderValue::from_str(&authority) {
            Ok(host) => {
                parts.headers.insert(header::HOST, host);
            }
            Err(_) => {
                return self.refuse(
                    peer,
                    &method,
                    &target,
                    started,
                    StatusCode::BAD_REQUEST,
                    "invalid host in request target",
                );
            }
        }
        parts.headers.append(header::VIA, self.via.clone());
        let bytes_in = Arc::new(AtomicU64::new(0));
        let body = Counted {
            inner: body.boxed(),
            count: bytes_in.clone(),
        }
        .boxed();
        let upstream = self.client.request(Request::from_parts(parts, body));
        let result = tokio::time::timeout(self.settings.upstream_response, upstream).await;
        let resp = match result {
            Err(_) => {
                let reason = format!(
                    "origin {authority} did not answer within {:?}",
                    self.settings.upstream_response
                );
                return self.refuse(peer, &method, &target, started, StatusCode::GATEWAY_TIMEOUT, &reason);
            }
            Ok(Err(e)) => {
                let (status, reason) = classify_upstream_error(&authority, &e);
                return self.refuse(peer, &method, &target, started, status, &reason);
            }
            Ok(Ok(resp)) => resp,
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.append(header::VIA, self.via.clone());
        let logged = AccessLogged {
            inner: body.boxed(),
            bytes_out: 0,
            bytes_in,
            record: Some(AccessRecord {
                peer,
                method,
                target,
                status: parts.status,
                started,
            }),
        };
        Response::from_parts(parts, logged.boxed())
    }

    async fn connect(&self, peer: Peer, req: Request<Incoming>, started: Instant) -> Response<Body> {
        let target = req.uri().to_string();
        let Some(authority) = req.uri().authority().filter(|a| a.port_u16().is_some()).cloned() else {
            return self.refuse(
                peer,
                &Method::CONNECT,
                &target,
                started,
                StatusCode::BAD_REQUEST,
                "CONNECT needs a host:port target",
            );
        };
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = authority.port_u16().unwrap_or(443);
        let dial = TcpStream::connect((host.as_str(), port));
        let origin = match tokio::time::timeout(self.settings.upstream_connect, dial).await {
            Err(_) => {
                let reason = format!(
                    "connect to {authority} timed out after {:?}",
                    self.settings.upstream_connect
                );
                return self.refuse(
                    peer,
                    &Method::CONNECT,
                    &target,
                    started,
                    StatusCode::GATEWAY_TIMEOUT,
                    &reason,
                );
            }
            Ok(Err(e)) => {
                let reason = format!("cannot connect to {authority}: {e}");
                return self.refuse(
                    peer,
                    &Method::CONNECT,
                    &target,
                    started,
                    StatusCode::BAD_GATEWAY,
                    &reason,
                );
            }
            Ok(Ok(s)) => s,
        };
        let _ = origin.set_nodelay(true);
        let cut = self.drain.cut_token();
        self.drain.tunnels().spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => {
                    warn!(client = %peer, target = %target, "tunnel upgrade failed: {e}");
                    return;
                }
            };
            let mut client = TokioIo::new(upgraded);
            let mut origin = origin;
            let (outcome, up, down) = tokio::select! {
                r = tokio::io::copy_bidirectional(&mut client, &mut origin) => match r {
                    Ok((up, down)) => ("closed", up, down),
                    Err(e) if is_reset(&e) => ("reset", 0, 0),
                    Err(_) => ("error", 0, 0),
                },
                _ = cut.cancelled() => ("cut at drain timeout", 0, 0),
            };
            info!(
                target: "baton::access",
                client = %peer,
                method = "CONNECT",
                target = %target,
                status = 200,
                bytes_in = up,
                bytes_out = down,
                ms = started.elapsed().as_millis() as u64,
                outcome,
                "tunnel"
            );
        });
        Response::new(empty())
    }

    fn refuse(
        &self,
        peer: Peer,
        method: &Method,
        target: &str,
        started: Instant,
        status: StatusCode,
        reason: &str,
    ) -> Response<Body> {
        warn!(
            target: "baton::access",
            client = %peer,
            method = %method,
            target = %target,
            status = status.as_u16(),
            bytes_in = 0u64,
            bytes_out = reason.len() as u64 + 1,
            ms = started.elapsed().as_millis() as u64,
            reason,
            "refused"
        );
        error_response(status, reason)
    }
}

/// A response with `reason` as its one-line body.
pub fn error_response(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{reason}\n")));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn full(s: String) -> Body {
    Full::new(Bytes::from(s))
        .map_err(|never: Infallible| match never {})
        .boxed()
}

fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// The origin's `host[:port]` for an absolute-form `http://` target, or why it is refused.
fn check_target(uri: &Uri) -> Result<String, &'static str> {
    let Some(authority) = uri.authority() else {
        return Err(
            "origin-form request sent to a forward proxy: use an absolute URI (http://host/path), e.g. curl -x",
        );
    };
    match uri.scheme_str() {
        Some("http") => {}
        Some("https") => return Err("https:// targets go through CONNECT, not a plain proxy request"),
        _ => return Err("unsupported scheme in request target (only http:// is proxied)"),
    }
    if authority.host().is_empty() {
        return Err("empty host in request target");
    }
    Ok(match authority.port() {
        Some(p) => format!("{}:{}", authority.host(), p.as_str()),
        None => authority.host().to_string(),
    })
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
}

fn classify_upstream_error(authority: &str, e: &hyper_util::client::legacy::Error) -> (StatusCode, String) {
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    let mut detail = String::new();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return (
                StatusCode::GATEWAY_TIMEOUT,
                format!("connect to origin {authority} timed out"),
            );
        }
        detail = s.to_string();
        source = s.source();
    }
    if e.is_connect() {
        (
            StatusCode::BAD_GATEWAY,
            format!("cannot connect to origin {authority}: {detail}"),
        )
    } else {
        (StatusCode::BAD_GATEWAY, format!("origin {authority} failed: {detail}"))
    }
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
    )
}

/// Counts the request body's bytes as they stream to the origin.
struct Counted {
    inner: BoxBody<Bytes, hyper::Error>,
    count: Arc<AtomicU64>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct AccessRecord {
    peer: Peer,
    method: Method,
    target: String,
    status: StatusCode,
    started: Instant,
}

/// The response body on its way to the client; writes the access line when it is done (or
/// dropped, when the client went away).
struct AccessLogged {
    inner: BoxBody<Bytes, hyper::Error>,
    bytes_out: u64,
    bytes_in: Arc<AtomicU64>,
    record: Option<AccessRecord>,
}

impl HttpBody for AccessLogged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.bytes_out += data.len() as u64;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for AccessLogged {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            let complete = self.inner.is_end_stream();
            info!(
                target: "baton::access",
                client = %r.peer,
                method = %r.method,
                target = %r.target,
                status = r.status.as_u16(),
                bytes_in = self.bytes_in.load(Ordering::Relaxed),
                bytes_out = self.bytes_out,
                ms = r.started.elapsed().as_millis() as u64,
                complete,
                "request"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_is_refused() {
        assert!(check_target(&"/index.html".parse().unwrap()).is_err());
        assert!(check_target(&"https://a/".parse().unwrap()).is_err());
        assert_eq!(check_target(&"http://a:81/x".parse().unwrap()).unwrap(), "a:81");
        assert_eq!(check_target(&"http://a/x".parse().unwrap()).unwrap(), "a");
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }
}
