//! The forward proxy service: absolute-form HTTP/1.1 requests go to the origin over a kept
//! or pooled origin connection, CONNECT opens a TCP tunnel. Errors are answers with a
//! one-line reason, never a dropped connection. Knows nothing about fork/exec or
//! generations: it is handed a [`Drain`] to register tunnels with.

use std::convert::Infallible;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use baton_handoff::{Drain, Peer, Stream};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::config::Config;
use crate::proxy::access::{AccessLine, Kind};
use crate::proxy::body::{AccessLogged, AccessRecord, BodyStats, Counted};
use crate::proxy::connector::{ConnectError, connect_checked};
use crate::proxy::hop_by_hop::strip_hop_by_hop;
use crate::proxy::metrics;
use crate::proxy::policy::{Denial, Policy, Rule};
use crate::proxy::target::{check_target, target_len};
use crate::proxy::tunnel::{self, Accepted};
use crate::proxy::upstream::{OriginLease, Upstream, UpstreamError};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// What the proxy service takes from the configuration.
#[derive(Clone)]
pub struct ProxySettings {
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub tunnel_idle: Duration,
    pub upstream_idle: Duration,
    pub idle_per_host: usize,
    pub max_uri_bytes: usize,
    pub max_body_bytes: Option<u64>,
}

impl From<&Config> for ProxySettings {
    fn from(c: &Config) -> ProxySettings {
        ProxySettings {
            upstream_connect: c.timeouts.upstream_connect,
            upstream_response: c.timeouts.upstream_response,
            tunnel_idle: c.timeouts.tunnel_idle,
            upstream_idle: c.timeouts.upstream_idle,
            idle_per_host: c.limits.idle_per_host,
            max_uri_bytes: c.limits.max_uri_bytes,
            max_body_bytes: c.limits.max_body_bytes,
        }
    }
}

pub struct Proxy {
    upstream: Arc<Upstream>,
    settings: ProxySettings,
    policy: Arc<Policy>,
    drain: Drain,
    via: HeaderValue,
}

/// What a client connection lends the service while it is busy: its origin connection
/// (kept from one request to the next, and given back to the pool with the `Client` when
/// the client goes idle), and where an accepted CONNECT leaves its tunnel until hyper has
/// written the answer and given the stream back ([`Proxy::start_tunnel`]).
pub struct Client {
    lease: OriginLease,
    tunnel: Mutex<Option<Accepted>>,
}

impl Client {
    pub fn new(upstream: Arc<Upstream>) -> Client {
        Client {
            lease: OriginLease::new(upstream),
            tunnel: Mutex::new(None),
        }
    }

    /// The tunnel a CONNECT answered with a 2xx opened, if any.
    pub fn take_tunnel(&self) -> Option<Accepted> {
        self.tunnel.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// One request as the access log and the metrics see it.
struct Ask {
    peer: Peer,
    method: Method,
    /// The target as the client sent it (cloning a `Uri` only bumps reference counts;
    /// formatting it is left to the log line, if one is written).
    target: Uri,
    started: Instant,
}

impl Proxy {
    pub fn new(settings: ProxySettings, policy: Arc<Policy>, drain: Drain) -> Proxy {
        let upstream = Upstream::new(
            policy.clone(),
            settings.upstream_connect,
            settings.upstream_idle,
            settings.idle_per_host,
        );
        let via = via_header(&policy);
        Proxy {
            upstream,
            settings,
            policy,
            drain,
            via,
        }
    }

    /// The origin connection pool, for each busy client connection's [`Client`].
    pub fn upstream(&self) -> Arc<Upstream> {
        self.upstream.clone()
    }

    /// Relays the tunnel a CONNECT opened over the client's `stream` (`early`: the bytes
    /// the client sent behind its CONNECT head), registered with the drain as a tunnel.
    pub fn start_tunnel(&self, accepted: Accepted, stream: Stream, early: Vec<u8>) {
        let idle = self.settings.tunnel_idle;
        let cut = self.drain.cut_token();
        self.drain
            .tunnels()
            .spawn(tunnel::serve(accepted, stream, early, idle, cut));
    }

    /// Serves one request from `peer`; `client` is what its connection lends the service.
    pub async fn serve(
        self: Arc<Self>,
        peer: Peer,
        client: Arc<Client>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        let ask = Ask {
            peer,
            method: req.method().clone(),
            target: req.uri().clone(),
            started: Instant::now(),
        };
        if let Peer::Ip(addr) = peer
            && let Err(d) = self.policy.check_client(addr.ip())
        {
            return Ok(self.deny(&ask, &d));
        }
        // The rarer and larger futures (authentication, CONNECT) are boxed: this future is
        // moved whole at every request, and its size is that of its largest state.
        let client_ip = match peer {
            Peer::Ip(a) => Some(a.ip()),
            Peer::Local => None,
        };
        if self.policy.requires_auth()
            && let Err(d) = Box::pin(self.policy.check_auth(req.headers(), client_ip)).await
        {
            return Ok(self.deny(&ask, &d));
        }
        if req.headers().contains_key(header::VIA)
            && let Err(d) = self.policy.check_via(req.headers())
        {
            return Ok(self.deny(&ask, &d));
        }
        if target_len(&ask.target) > self.settings.max_uri_bytes {
            let reason = format!("request target longer than {} bytes", self.settings.max_uri_bytes);
            return Ok(self.refuse(&ask, StatusCode::URI_TOO_LONG, &reason));
        }
        if ask.method == Method::CONNECT {
            return Ok(Box::pin(self.connect(&client, req, ask)).await);
        }
        // Any request framed by Transfer-Encoding closes its connection after the answer. One
        // that also carried Content-Length never gets here (the framing layer answers 400:
        // RFC 9112 §6.1); the close is kept as a second line of defence against smuggling.
        let close_after = req.headers().contains_key(header::TRANSFER_ENCODING);
        // Not boxed: the connection boxes this whole future (hyper's `poll_without_shutdown`
        // wants it `Unpin`), and forwarding is its common state.
        let mut resp = self.forward(&client.lease, req, ask).await;
        if close_after {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }

    async fn forward(&self, lease: &OriginLease, req: Request<Incoming>, ask: Ask) -> Response<Body> {
        let (authority, host, port) = match check_target(&ask.target) {
            Ok(a) => a,
            Err(reason) => return self.refuse(&ask, StatusCode::BAD_REQUEST, reason),
        };
        if let Some(max) = self.settings.max_body_bytes
            && content_length(req.headers()).is_some_and(|n| n > max)
        {
            let reason = format!("request body larger than {max} bytes");
            return self.refuse(&ask, StatusCode::PAYLOAD_TOO_LARGE, &reason);
        }
        let (mut parts, body) = req.into_parts();
        if let Some(answer) = self.answer_max_forwards(&mut parts) {
            return answer;
        }
        if let Err(reason) = self.to_origin(&mut parts, authority) {
            return self.refuse(&ask, StatusCode::BAD_REQUEST, reason);
        }
        let stats = Arc::new(BodyStats::default());
        let body = Counted::new(body, stats.clone(), self.settings.max_body_bytes);
        let sent = lease.send(authority, host, port, Request::from_parts(parts, body));
        match tokio::time::timeout(self.settings.upstream_response, sent).await {
            Err(_) => {
                let wait = self.settings.upstream_response;
                let reason = format!("origin {authority} did not answer within {wait:?}");
                self.refuse(&ask, StatusCode::GATEWAY_TIMEOUT, &reason)
            }
            Ok(Err(e)) => self.origin_failed(&ask, authority, &stats, &e),
            Ok(Ok(resp)) => self.to_client(resp, stats, ask),
        }
    }

    /// Makes the client's request head the origin's: hop-by-hop fields out, Host from the
    /// target, `Via` added, the origin-form target (RFC 9112 §3.2.1).
    fn to_origin(&self, parts: &mut http::request::Parts, authority: &str) -> Result<(), &'static str> {
        strip_hop_by_hop(&mut parts.headers);
        // The proxy answered `Expect: 100-continue` itself (hyper sends 100 when the body is
        // first read); the origin receives the body without waiting.
        parts.headers.remove(header::EXPECT);
        // Host is the target's authority. Clients mostly send exactly that: keep their field.
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let sent_as_is = hosts.next().is_some_and(|h| h.as_bytes() == authority.as_bytes()) && hosts.next().is_none();
        if !sent_as_is {
            let host = HeaderValue::from_str(authority).map_err(|_| "invalid host in request target")?;
            parts.headers.insert(header::HOST, host);
        }
        parts.headers.append(header::VIA, self.via.clone());
        parts.uri = parts
            .uri
            .path_and_query()
            .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
        Ok(())
    }

    /// The origin's response on its way to the client, logged when its body ends.
    fn to_client(&self, resp: Response<Incoming>, stats: Arc<BodyStats>, ask: Ask) -> Response<Body> {
        let (mut parts, body) = resp.into_parts();
        // An intermediary speaks its own HTTP version (RFC 9110 §6.2), whatever the origin's.
        parts.version = http::Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.append(header::VIA, self.via.clone());
        let record = AccessRecord {
            peer: ask.peer,
            method: ask.method,
            target: ask.target,
            status: parts.status,
            started: ask.started,
        };
        Response::from_parts(parts, AccessLogged::new(body, stats, record).boxed())
    }

    /// The answer when the origin exchange failed: the client's fault (its body too large or
    /// malformed), a policy refusal of the resolved address, or the origin's.
    fn origin_failed(&self, ask: &Ask, authority: &str, stats: &BodyStats, e: &UpstreamError) -> Response<Body> {
        if let Some(fault) = stats.fault() {
            let mut resp = self.refuse(ask, fault.status(), &fault.to_string());
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        let (status, reason) = match e {
            UpstreamError::Connect(ConnectError::Denied(d)) => return self.deny(ask, d),
            UpstreamError::Connect(c) => return self.connect_failed(ask, &format!("origin {authority}"), c),
            UpstreamError::Http(h) => (StatusCode::BAD_GATEWAY, format!("origin {authority} failed: {h}")),
        };
        self.refuse(ask, status, &reason)
    }

    /// A failed connect to `what` (an origin or a CONNECT target): 504 on a timeout, else 502.
    fn connect_failed(&self, ask: &Ask, what: &str, e: &ConnectError) -> Response<Body> {
        if let ConnectError::Denied(d) = e {
            return self.deny(ask, d);
        }
        let timed_out = matches!(e, ConnectError::TimedOut(_));
        metrics::upstream_connect_error(timed_out);
        match e {
            ConnectError::TimedOut(t) => {
                let reason = format!("connect to {what} timed out after {t:?}");
                self.refuse(ask, StatusCode::GATEWAY_TIMEOUT, &reason)
            }
            other => self.refuse(
                ask,
                StatusCode::BAD_GATEWAY,
                &format!("cannot connect to {what}: {other}"),
            ),
        }
    }

    async fn connect(&self, client: &Client, req: Request<Incoming>, ask: Ask) -> Response<Body> {
        let Some(authority) = req.uri().authority().filter(|a| a.port_u16().is_some()).cloned() else {
            return self.refuse(&ask, StatusCode::BAD_REQUEST, "CONNECT needs a host:port target");
        };
        let port = authority.port_u16().unwrap_or(443);
        if let Err(d) = self.policy.check_connect_port(port) {
            return self.deny(&ask, &d);
        }
        let connected = connect_checked(&self.policy, authority.host(), port, self.settings.upstream_connect).await;
        let origin = match connected {
            Ok(s) => s,
            Err(e) => return self.connect_failed(&ask, authority.as_str(), &e),
        };
        // The target is copied: the request's shares hyper's read buffer, which the tunnel
        // would otherwise keep alive (8 KiB) for as long as it runs.
        let target = Uri::try_from(authority.as_str()).unwrap_or_else(|_| Uri::from_static("/"));
        let accepted = Accepted {
            origin,
            peer: ask.peer,
            target,
            started: ask.started,
        };
        *client.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(accepted);
        Response::new(empty())
    }

    /// A policy refusal: like [`Proxy::refuse`], with the deciding rule in the log and the
    /// authentication challenge on a 407.
    fn deny(&self, ask: &Ask, d: &Denial) -> Response<Body> {
        let bytes_out = d.reason.len() as u64 + 1;
        AccessLine::new(Kind::Denied, ask.peer)
            .request(&ask.method, &ask.target, d.status)
            .rule(d.rule.as_str())
            .traffic(0, bytes_out, ask.started)
            .reason(&d.reason)
            .write();
        metrics::request_done(&ask.method, d.status, ask.started, 0, bytes_out, false);
        let mut resp = error_response(d.status, &d.reason);
        // A client that may not use the proxy at all gets nothing more on this connection.
        if d.rule == Rule::AllowClients {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if d.status == StatusCode::PROXY_AUTHENTICATION_REQUIRED
            && let Some(c) = self.policy.challenge().and_then(|c| HeaderValue::from_str(c).ok())
        {
            resp.headers_mut().insert(header::PROXY_AUTHENTICATE, c);
        }
        if let Some(wait) = d.retry_after {
            let seconds = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
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

    /// An answer of the proxy's own: `status` with `reason` as its body, logged.
    fn refuse(&self, ask: &Ask, status: StatusCode, reason: &str) -> Response<Body> {
        let bytes_out = reason.len() as u64 + 1;
        AccessLine::new(Kind::Refused, ask.peer)
            .request(&ask.method, &ask.target, status)
            .traffic(0, bytes_out, ask.started)
            .reason(reason)
            .write();
        metrics::request_done(&ask.method, status, ask.started, 0, bytes_out, false);
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

/// `Via: 1.1 <token>` (the token is checked to be a valid field value by the configuration).
fn via_header(policy: &Policy) -> HeaderValue {
    HeaderValue::from_str(&format!("1.1 {}", policy.via_token())).unwrap_or(HeaderValue::from_static("1.1 baton"))
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()
}
