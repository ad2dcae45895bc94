//! The forward proxy: absolute-form HTTP/1.1 requests go to the origin through a pooled
//! client, CONNECT opens a TCP tunnel. Errors are answers with a one-line reason, never a
//! dropped connection. Knows nothing about fork/exec or generations: it is handed a
//! [`Drain`] to register tunnels with.

use std::convert::Infallible;
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
use tracing::{info, warn};

use crate::connector::{ConnectError, connect_checked};
use crate::drain::Drain;
use crate::listeners::Peer;
use crate::policy::{Denial, Policy};
use crate::tunnel::Relayed;
use crate::upstream::{Affinity, BoxError, Upstream, UpstreamError};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// Settings the proxy needs from the configuration.
#[derive(Clone)]
pub struct ProxySettings {
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub tunnel_idle: Duration,
    pub upstream_idle: Duration,
    pub max_uri_bytes: usize,
    pub max_body_bytes: Option<u64>,
    pub policy: Arc<Policy>,
}

pub struct Proxy {
    upstream: Arc<Upstream>,
    settings: ProxySettings,
    drain: Drain,
    via: HeaderValue,
}

impl Proxy {
    pub fn new(settings: ProxySettings, drain: Drain) -> Proxy {
        let upstream = Upstream::new(
            settings.policy.clone(),
            settings.upstream_connect,
            settings.upstream_idle,
        );
        Proxy {
            upstream,
            settings,
            drain,
            via: HeaderValue::from_static("1.1 baton"),
        }
    }

    /// Serves one request from `peer`.
    /// The origin connection pool, for the per-connection [`Affinity`].
    pub fn upstream(&self) -> Arc<Upstream> {
        self.upstream.clone()
    }

    /// Serves one request from `peer`; `affinity` is the client connection's origin connection.
    pub async fn serve(
        self: Arc<Self>,
        peer: Peer,
        affinity: Arc<Affinity>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let started = Instant::now();
        let method = req.method().clone();
        // The target as the client sent it, for the access log (cloning a `Uri` only bumps
        // reference counts; formatting it is left to the log line, if one is written).
        let target = req.uri().clone();
        let policy = &self.settings.policy;
        if let Peer::Ip(addr) = peer
            && let Err(d) = policy.check_client(addr.ip())
        {
            return Ok(self.deny(peer, &method, &target, started, &d));
        }
        // The rarer and larger futures (authentication, CONNECT) are boxed: this future is
        // moved whole at every request, and its size is that of its largest state.
        if policy.requires_auth()
            && let Err(d) = Box::pin(policy.check_auth(req.headers())).await
        {
            return Ok(self.deny(peer, &method, &target, started, &d));
        }
        if target_len(&target) > self.settings.max_uri_bytes {
            let reason = format!("request target longer than {} bytes", self.settings.max_uri_bytes);
            return Ok(self.refuse(peer, &method, &target, started, StatusCode::URI_TOO_LONG, &reason));
        }
        if method == Method::CONNECT {
            return Ok(Box::pin(self.connect(peer, req, target, started)).await);
        }
        // Any request framed by Transfer-Encoding closes its connection after the answer: a
        // request that also carried Content-Length may be a smuggling attempt (RFC 9112 §6.1),
        // and hyper drops that Content-Length before we could see it.
        let close_after = req.headers().contains_key(header::TRANSFER_ENCODING);
        let mut resp = self.forward(peer, &affinity, req, target, started).await;
        if close_after {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }

    async fn forward(
        &self,
        peer: Peer,
        affinity: &Affinity,
        req: Request<Incoming>,
        target: Uri,
        started: Instant,
    ) -> Response<Body> {
        let method = req.method().clone();
        let (authority, host, port) = match check_target(&target) {
            Ok(a) => a,
            Err(reason) => return self.refuse(peer, &method, &target, started, StatusCode::BAD_REQUEST, reason),
        };
        if let Some(max) = self.settings.max_body_bytes
            && content_length(req.headers()).is_some_and(|n| n > max)
        {
            let reason = format!("request body larger than {max} bytes");
            return self.refuse(peer, &method, &target, started, StatusCode::PAYLOAD_TOO_LARGE, &reason);
        }
        let (mut parts, body) = req.into_parts();
        if let Some(answer) = self.answer_max_forwards(&mut parts) {
            return answer;
        }
        strip_hop_by_hop(&mut parts.headers);
        // The proxy answered `Expect: 100-continue` itself (hyper sends 100 when the body is
        // first read); the origin receives the body without waiting.
        parts.headers.remove(header::EXPECT);
        // Host is the target's authority. Clients mostly send exactly that: keep their field.
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let sent_as_is = hosts.next().is_some_and(|h| h.as_bytes() == authority.as_bytes()) && hosts.next().is_none();
        if !sent_as_is {
            match HeaderValue::from_str(authority) {
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
        }
        parts.headers.append(header::VIA, self.via.clone());
        // The origin gets the origin-form target (RFC 9112 §3.2.1).
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        let stats = Arc::new(BodyStats::default());
        let body = Counted {
            inner: body,
            stats: stats.clone(),
            limit: self.settings.max_body_bytes,
        };
        let upstream = affinity.send(authority, host, port, Request::from_parts(parts, body));
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
                // The client's own body was at fault (too large, bad chunking): its error.
                if let Some(fault) = stats.fault.get() {
                    let mut resp = self.refuse(peer, &method, &target, started, fault.status(), &fault.to_string());
                    resp.headers_mut()
                        .insert(header::CONNECTION, HeaderValue::from_static("close"));
                    return resp;
                }
                let (status, reason) = match &e {
                    UpstreamError::Connect(ConnectError::Denied(d)) => {
                        return self.deny(peer, &method, &target, started, d);
                    }
                    UpstreamError::Connect(ConnectError::TimedOut(t)) => {
                        crate::metrics::upstream_connect_error(true);
                        let reason = format!("connect to origin {authority} timed out after {t:?}");
                        (StatusCode::GATEWAY_TIMEOUT, reason)
                    }
                    UpstreamError::Connect(c) => {
                        crate::metrics::upstream_connect_error(false);
                        (
                            StatusCode::BAD_GATEWAY,
                            format!("cannot connect to origin {authority}: {c}"),
                        )
                    }
                    UpstreamError::Http(h) => (StatusCode::BAD_GATEWAY, format!("origin {authority} failed: {h}")),
                };
                return self.refuse(peer, &method, &target, started, status, &reason);
            }
            Ok(Ok(resp)) => resp,
        };
        let (mut parts, body) = resp.into_parts();
        // An intermediary speaks its own HTTP version (RFC 9110 §6.2), whatever the origin's.
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.append(header::VIA, self.via.clone());
        let logged = AccessLogged {
            inner: body,
            bytes_out: 0,
            request_body: stats,
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

    async fn connect(&self, peer: Peer, req: Request<Incoming>, target: Uri, started: Instant) -> Response<Body> {
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
        let port = authority.port_u16().unwrap_or(443);
        let policy = &self.settings.policy;
        if let Err(d) = policy.check_connect_port(port) {
            return self.deny(peer, &Method::CONNECT, &target, started, &d);
        }
        let origin = match connect_checked(policy, authority.host(), port, self.settings.upstream_connect).await {
            Ok(s) => s,
            Err(ConnectError::Denied(d)) => return self.deny(peer, &Method::CONNECT, &target, started, &d),
            Err(ConnectError::TimedOut(t)) => {
                crate::metrics::upstream_connect_error(true);
                let reason = format!("connect to {authority} timed out after {t:?}");
                return self.refuse(
                    peer,
                    &Method::CONNECT,
                    &target,
                    started,
                    StatusCode::GATEWAY_TIMEOUT,
                    &reason,
                );
            }
            Err(e) => {
                crate::metrics::upstream_connect_error(false);
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
        };
        let idle = self.settings.tunnel_idle;
        let cut = self.drain.cut_token();
        self.drain.tunnels().spawn(async move {
            let upgraded = match hyper::upgrade::on(req).await {
                Ok(u) => u,
                Err(e) => {
                    warn!(client = %peer, target = %target, "tunnel upgrade failed: {e}");
                    return;
                }
            };
            let Relayed { outcome, up, down } = crate::tunnel::relay(upgraded, origin, idle, cut).await;
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
            crate::metrics::request_done(&Method::CONNECT, StatusCode::OK, started, up, down, true);
        });
        Response::new(empty())
    }

    /// A policy refusal: like [`Proxy::refuse`], with the deciding rule in the log and the
    /// authentication challenge on a 407.
    fn deny(&self, peer: Peer, method: &Method, target: &Uri, started: Instant, d: &Denial) -> Response<Body> {
        warn!(target: "baton::access", client = %peer, method = %method, target = %target, status = d.status.as_u16(), rule = d.rule, reason = %d.reason, ms = started.elapsed().as_millis() as u64, "denied");
        crate::metrics::request_done(method, d.status, started, 0, d.reason.len() as u64 + 1, false);
        let mut resp = error_response(d.status, &d.reason);
        // A client that may not use the proxy at all gets nothing more on this connection.
        if d.rule == "allow_clients" {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if d.status == StatusCode::PROXY_AUTHENTICATION_REQUIRED
            && let Some(c) = self
                .settings
                .policy
                .challenge()
                .and_then(|c| HeaderValue::from_str(c).ok())
        {
            resp.headers_mut().insert(header::PROXY_AUTHENTICATE, c);
        }
        resp
    }

    /// `Max-Forwards` on OPTIONS and TRACE (RFC 9110 §7.6.2): at 0 the proxy answers itself,
    /// else it forwards the value decremented.
    fn answer_max_forwards(&self, parts: &mut http::request::Parts) -> Option<Response<Body>> {
        if parts.method != Method::OPTIONS && parts.method != Method::TRACE {
            return None;
        }
        let mf_name = HeaderName::from_static("max-forwards");
        let value: u64 = parts.headers.get(&mf_name)?.to_str().ok()?.trim().parse().ok()?;
        if value > 0 {
            parts
                .headers
                .insert(mf_name, HeaderValue::from((value - 1).min(u64::from(u32::MAX)) as u32));
            return None;
        }
        let mut resp = if parts.method == Method::TRACE {
            let mut echo = format!("TRACE {} HTTP/1.1\r\n", parts.uri);
            for (k, v) in &parts.headers {
                if matches!(k.as_str(), "cookie" | "authorization" | "proxy-authorization") {
                    continue;
                }
                echo.push_str(&format!("{k}: {}\r\n", String::from_utf8_lossy(v.as_bytes())));
            }
            let mut r = Response::new(full(echo));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static("message/http"));
            r
        } else {
            let mut r = Response::new(empty());
            r.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS, TRACE, CONNECT"),
            );
            r.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
            r
        };
        resp.headers_mut().append(header::VIA, self.via.clone());
        Some(resp)
    }

    fn refuse(
        &self,
        peer: Peer,
        method: &Method,
        target: &Uri,
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
        crate::metrics::request_done(method, status, started, 0, reason.len() as u64 + 1, false);
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

/// The origin's `host[:port]` and `host` for an absolute-form `http://` target, or why it is
/// refused. Byte scans rather than `str::rsplit`: these strings are a few bytes long, and the
/// general searchers cost hundreds of instructions per request here.
fn check_target(uri: &Uri) -> Result<(&str, &str, u16), &'static str> {
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
    // `host[:port]`, without any `user@` part.
    let full = authority.as_str();
    let host_port = match full.bytes().rposition(|b| b == b'@') {
        Some(at) => &full[at + 1..],
        None => full,
    };
    // As `Authority::host`: an IPv6 literal keeps its brackets.
    let host_end = if host_port.starts_with('[') {
        host_port
            .bytes()
            .position(|b| b == b']')
            .map_or(host_port.len(), |end| end + 1)
    } else {
        host_port.bytes().position(|b| b == b':').unwrap_or(host_port.len())
    };
    let (host, port) = host_port.split_at(host_end);
    if host.is_empty() {
        return Err("empty host in request target");
    }
    // No port, or an empty one (RFC 3986 §3.2.3): 80.
    let port = match port.strip_prefix(':') {
        None | Some("") => 80,
        Some(p) => p.parse().map_err(|_| "invalid port in request target")?,
    };
    Ok((host_port, host, port))
}

/// The request target's length as the client sent it (`Uri`'s display form), without
/// formatting it.
fn target_len(uri: &Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len())
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the distinct names notes which hop-by-hop fields are present (most
    // messages carry at most `Connection`); only those are then removed.
    let seen = headers.keys().fold(0u8, |seen, name| seen | hop_by_hop_bit(name));
    if seen == 0 {
        return;
    }
    if seen & 1 != 0 {
        // Fields the Connection header names are hop-by-hop too.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value.to_str().unwrap_or_default().split(',').map(str::trim) {
                // `close` names no field; `keep-alive` is hop-by-hop already.
                if token.is_empty() || token.eq_ignore_ascii_case("close") || token.eq_ignore_ascii_case("keep-alive") {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(n);
                }
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if seen & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy's own credentials; `Connection`
/// first. A `static`: a `const` array would be built and dropped at every use.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
];

/// `1 << i` when `name` is `HOP_BY_HOP[i]`, else 0. Names are lowercase in a `HeaderName`,
/// so one match on the bytes decides (their lengths rule out almost every other field).
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    let i = match name.as_str().as_bytes() {
        b"connection" => 0,
        b"keep-alive" => 1,
        b"te" => 2,
        b"trailer" => 3,
        b"transfer-encoding" => 4,
        b"upgrade" => 5,
        b"proxy-authorization" => 6,
        b"proxy-connection" => 7,
        _ => return 0,
    };
    1 << i
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}

/// What was wrong with a client's request body, found while streaming it.
#[derive(Debug, thiserror::Error)]
enum BodyFault {
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("invalid request body: {0}")]
    Invalid(String),
}

impl BodyFault {
    fn status(&self) -> StatusCode {
        match self {
            BodyFault::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyFault::Invalid(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// The client's request body on its way to the origin: counted, limited, and its faults
/// recorded so the answer blames the client (413/400), not the origin (502).
pub struct Counted {
    inner: Incoming,
    stats: Arc<BodyStats>,
    limit: Option<u64>,
}

/// What streaming the request body found: its size so far, and its fault if any.
#[derive(Default)]
pub struct BodyStats {
    bytes: AtomicU64,
    fault: std::sync::OnceLock<BodyFault>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total = self.stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                    if let Some(max) = self.limit
                        && total > max
                    {
                        let _ = self.stats.fault.set(BodyFault::TooLarge(max));
                        return Poll::Ready(Some(Err(BodyFault::TooLarge(max).into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let _ = self.stats.fault.set(BodyFault::Invalid(e.to_string()));
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
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
    target: Uri,
    status: StatusCode,
    started: Instant,
}

/// The response body on its way to the client; writes the access line when it is done (or
/// dropped, when the client went away).
struct AccessLogged {
    inner: Incoming,
    bytes_out: u64,
    request_body: Arc<BodyStats>,
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
                bytes_in = self.request_body.bytes.load(Ordering::Relaxed),
                bytes_out = self.bytes_out,
                ms = r.started.elapsed().as_millis() as u64,
                complete,
                "request"
            );
            let bytes_in = self.request_body.bytes.load(Ordering::Relaxed);
            crate::metrics::request_done(&r.method, r.status, r.started, bytes_in, self.bytes_out, false);
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
        assert!(check_target(&"http://a:99999/".parse().unwrap()).is_err());
        assert_eq!(check_target(&"http://a:/".parse().unwrap()).unwrap().2, 80);
        for t in [
            "http://a:81/x",
            "http://a/x",
            "http://u:p@a:81/",
            "http://[::1]:8080/",
            "http://[::1]/",
            "http://1.2.3.4/",
        ] {
            let uri: Uri = t.parse().unwrap();
            let (authority, host, port) = check_target(&uri).unwrap();
            assert_eq!(port, uri.port_u16().unwrap_or(80), "{t}");
            let expected = uri.authority().unwrap().as_str().rsplit('@').next().unwrap();
            assert_eq!(authority, expected, "{t}");
            assert_eq!(host, uri.host().unwrap(), "{t}");
        }
    }

    #[test]
    fn target_len_is_the_display_length() {
        for t in [
            "http://example.com/a/b?c=d",
            "http://user@example.com:8080/",
            "http://[::1]:80/x",
            "example.com:443",
            "/origin/form?x",
        ] {
            let uri: Uri = t.parse().unwrap();
            assert_eq!(target_len(&uri), uri.to_string().len(), "{t}");
        }
    }

    #[test]
    fn hop_by_hop_bits_match_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(name), 1 << i, "{name}");
        }
        for other in [
            header::CONTENT_LENGTH,
            header::HOST,
            HeaderName::from_static("x-upgrade"),
        ] {
            assert_eq!(hop_by_hop_bit(&other), 0, "{other}");
        }
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
