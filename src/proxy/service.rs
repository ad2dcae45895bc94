//! The forward proxy service: absolute-form HTTP/1.1 requests go to the origin, or to the
//! parent proxy `route` chooses, over a kept or pooled connection; CONNECT opens a TCP
//! tunnel, directly or through the parent's CONNECT. Errors are answers with a
//! one-line reason, never a dropped connection. Knows nothing about fork/exec or
//! generations: it is handed a [`Drain`] to register tunnels with.

use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use baton_handoff::{Drain, Peer};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;

use crate::config::{Config, Parent, Parents};
use crate::proxy::access::{self, AccessLine, Kind, Sent};
use crate::proxy::body::{AccessLogged, AccessRecord, BodyStats, Counted};
use crate::proxy::connector::{ConnectError, HopStream};
use crate::proxy::hop_by_hop::strip_hop_by_hop;
use crate::proxy::limits::Limits;
use crate::proxy::metrics;
use crate::proxy::migrate::{Migration, TunnelRecord};
use crate::proxy::parent;
use crate::proxy::policy::{Denial, Policy, Rule};
use crate::proxy::response_framing;
use crate::proxy::route::next_hop;
use crate::proxy::rules::Facts;
use crate::proxy::stash::Stash;
use crate::proxy::strict;
use crate::proxy::target::{Inspected, check_target_as, destination, target_len};
use crate::proxy::upgrade;
use crate::proxy::upstream::{HopTls, IdleBounds, NextHop, OriginLease, Through, Upstream, UpstreamError};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// What the proxy service takes from the configuration.
#[derive(Clone)]
pub struct ProxySettings {
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub tunnel_idle: Duration,
    /// How long a tunnel's first bytes are awaited for their server name.
    pub sni_wait: Duration,
    pub upstream_idle: Duration,
    pub idle: IdleBounds,
    pub max_uri_bytes: usize,
    pub max_body_bytes: Option<u64>,
    /// `[upstream]`: which destinations go through which parent proxy.
    pub parents: Arc<Parents>,
    /// `[access] upgrade_protocols`.
    pub upgrade_protocols: Arc<[String]>,
    /// A bumped tunnel's TLS handshake with its client (`[tls] handshake_timeout`).
    pub handshake_timeout: Duration,
    /// A bumped tunnel's wait for each request head (`timeouts.header_read`).
    pub header_read: Duration,
    /// A bumped tunnel's request head limit (`limits.max_header_bytes`), as a connection's.
    pub max_header_bytes: usize,
}

impl From<&Config> for ProxySettings {
    fn from(c: &Config) -> ProxySettings {
        ProxySettings {
            upstream_connect: c.timeouts.upstream_connect,
            upstream_response: c.timeouts.upstream_response,
            tunnel_idle: c.timeouts.tunnel_idle,
            sni_wait: c.timeouts.sni,
            upstream_idle: c.timeouts.upstream_idle,
            idle: IdleBounds {
                per_host: c.limits.idle_per_host,
                total: c.limits.idle_total,
            },
            max_uri_bytes: c.limits.max_uri_bytes,
            max_body_bytes: c.limits.max_body_bytes,
            parents: Arc::new(c.parents.clone()),
            upgrade_protocols: c.access.upgrade_protocols.clone().into(),
            handshake_timeout: c.tls.handshake_timeout,
            header_read: c.timeouts.header_read,
            max_header_bytes: c.limits.max_header_bytes,
        }
    }
}

/// TLS inspection (`[inspect]`), loaded when a generation starts: the CA that mints bumped
/// tunnels' leaves, and TLS to their origins.
pub struct Inspection {
    pub mint: Arc<crate::tls::mint::Mint>,
    pub origin: tokio_rustls::TlsConnector,
}

pub struct Proxy {
    upstream: Arc<Upstream>,
    /// `None`: no `[inspect]`, and nothing is bumped.
    pub(super) inspection: Option<Arc<crate::tls::mint::Mint>>,
    /// Bumped tunnels open now (counted apart at a handoff: they drain, never move).
    pub(super) bumped_open: Arc<std::sync::atomic::AtomicUsize>,
    pub(super) settings: ProxySettings,
    pub(super) policy: Arc<Policy>,
    /// Request rates and bandwidth per client and per user.
    pub(super) limits: Arc<Limits>,
    pub(super) drain: Drain,
    /// Moving this generation's tunnels to the next one (`connect`).
    pub(super) migration: Arc<Migration>,
    pub(super) stash: Option<Arc<Stash>>,
    pub(super) via: HeaderValue,
}

/// What a client connection lends the service while it is busy: its origin connection
/// (kept from one request to the next, and given back to the pool with the `Client` when
/// the client goes idle), what the connection was sent (for the Squid lines), and where an
/// accepted CONNECT leaves its tunnel until hyper has written the answer and given the
/// stream back ([`Proxy::start_tunnel`]).
pub struct Client {
    pub(super) lease: OriginLease,
    pub(super) sent: Arc<Sent>,
    pub(super) tunnel: Mutex<Option<Accepted>>,
}

impl Client {
    pub fn new(upstream: Arc<Upstream>, sent: Arc<Sent>) -> Client {
        Client {
            lease: OriginLease::new(upstream),
            sent,
            tunnel: Mutex::new(None),
        }
    }

    /// The tunnel a CONNECT answered with a 2xx opened, if any.
    pub fn take_tunnel(&self) -> Option<Accepted> {
        self.tunnel.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

/// A tunnel that a CONNECT answered with a 2xx opened, waiting for hyper to write the
/// answer and give the client's stream back.
pub struct Accepted {
    pub(super) origin: HopStream,
    /// Bytes read from the origin side behind a parent proxy's answer.
    pub(super) from_origin: Bytes,
    pub(super) ask: Ask,
    pub(super) record: TunnelRecord,
}

/// One request as the access log and the metrics see it.
pub(super) struct Ask {
    pub(super) peer: Peer,
    pub(super) method: Method,
    /// The target as the client sent it (cloning a `Uri` only bumps reference counts;
    /// formatting it is left to the log line, if one is written).
    pub(super) target: Uri,
    pub(super) started: Instant,
    /// The client connection's byte count, which its access lines take their bytes from.
    pub(super) sent: Arc<Sent>,
    /// Who authenticated (with `htpasswd`), if a rule asked.
    pub(super) user: Option<String>,
    /// The rule that allowed it (a refusal's line names the refusing rule).
    pub(super) rule: Option<Rule>,
    /// The client's HTTP version: its line says `proto=h2` on an HTTP/2 stream.
    pub(super) version: http::Version,
}

impl Ask {
    /// A request that starts now, before any rule decided on it.
    pub(super) fn of<B>(peer: Peer, req: &Request<B>, sent: Arc<Sent>) -> Ask {
        Ask {
            peer,
            method: req.method().clone(),
            target: req.uri().clone(),
            started: Instant::now(),
            sent,
            user: None,
            rule: None,
            version: req.version(),
        }
    }

    /// The access line of this request's answer.
    pub(super) fn line(&self, kind: Kind, status: StatusCode) -> AccessLine {
        AccessLine::new(kind, self.peer)
            .request(self.method.clone(), self.target.clone(), status)
            .sent(self.sent.clone())
            .user(self.user.clone())
            .rule_of(self.rule.map(Rule::as_str))
            .proto_of(self.version)
    }
}

impl Proxy {
    pub fn new(
        settings: ProxySettings,
        policy: Arc<Policy>,
        limits: Arc<Limits>,
        drain: Drain,
        inspection: Option<Inspection>,
        parent_tls: Option<tokio_rustls::TlsConnector>,
    ) -> Proxy {
        let (mint, origin_tls) = match inspection {
            Some(i) => (Some(i.mint), Some(i.origin)),
            None => (None, None),
        };
        let tls = HopTls {
            origin: origin_tls,
            parent: parent_tls,
        };
        let upstream = Upstream::new(
            policy.clone(),
            settings.upstream_connect,
            settings.upstream_idle,
            settings.idle,
            tls,
        );
        let via = via_header(&policy);
        Proxy {
            inspection: mint,
            bumped_open: Arc::default(),
            upstream,
            settings,
            policy,
            limits,
            drain,
            migration: Arc::default(),
            stash: None,
            via,
        }
    }

    /// Bumped tunnels open now.
    pub fn bumped_connections(&self) -> usize {
        self.bumped_open.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Moving this generation's tunnels out at a handoff.
    pub fn migration(&self) -> &Arc<Migration> {
        &self.migration
    }

    /// Keeping live connections in systemd's fd store, when this generation does.
    pub fn stash(&self) -> Option<&Stash> {
        self.stash.as_deref()
    }

    /// The proxy with `stash` (`None`: connections are not stashed).
    pub fn with_stash(mut self, stash: Option<Stash>) -> Proxy {
        self.stash = stash.map(Arc::new);
        self
    }

    /// The origin connection pool, for each busy client connection's [`Client`].
    pub fn upstream(&self) -> Arc<Upstream> {
        self.upstream.clone()
    }

    /// Serves one request from `peer`; `client` is what its connection lends the service.
    pub async fn serve(
        self: Arc<Self>,
        peer: Peer,
        client: Arc<Client>,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Infallible> {
        #[cfg(debug_assertions)]
        panic_probe(&req);
        let mut ask = Ask::of(peer, &req, client.sent.clone());
        if let Peer::Ip(addr) = peer
            && let Err(d) = self.policy.check_client(addr.ip())
        {
            return Ok(self.deny(&ask, &d));
        }
        // The rarer and larger futures (authentication, CONNECT) are boxed: this future is
        // moved whole at every request, and its size is that of its largest state.
        if let Some((host, port)) = destination(&req) {
            let client_ip = match peer {
                Peer::Ip(a) => Some(a.ip()),
                Peer::Local => None,
            };
            let mut f = Facts::new(client_ip, &ask.method, host, port);
            // A CONNECT to an address is judged on the server name its ClientHello gives.
            f.sni_to_come = ask.method == Method::CONNECT && f.ip.is_some() && self.policy.reads_sni();
            if ask.method != Method::CONNECT {
                f.path = Some(req.uri().path());
            }
            match self.policy.decide(&f) {
                Some(Ok(rule)) => ask.rule = Some(rule),
                Some(Err(d)) => return Ok(self.deny(&ask, &d)),
                None => match Box::pin(self.policy.decide_with_login(&f, req.headers())).await {
                    Ok((user, rule)) => (ask.user, ask.rule) = (user, Some(rule)),
                    Err(d) => return Ok(self.deny(&ask, &d)),
                },
            }
        }
        // After the rules: only requests they allowed take a token, and the user is known.
        if let Err(d) = self.limits.check_request(&peer, ask.user.as_deref()) {
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
        let mut resp = self.forward(&client, req, ask).await;
        if close_after {
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(resp)
    }

    async fn forward(&self, client: &Client, req: Request<Incoming>, ask: Ask) -> Response<Body> {
        let lease = &client.lease;
        // The next hop borrows from the target, and `ask` travels on with the answer: a
        // `Uri` clone only bumps reference counts.
        let target = ask.target.clone();
        let inspected = req.extensions().get::<Inspected>().cloned();
        let (authority, host, port) = match check_target_as(&target, inspected.is_some()) {
            Ok(a) => a,
            Err(reason) => return self.refuse(&ask, StatusCode::BAD_REQUEST, reason),
        };
        if let Some(max) = self.settings.max_body_bytes
            && content_length(req.headers()).is_some_and(|n| n > max)
        {
            let reason = format!("request body larger than {max} bytes");
            return self.refuse(&ask, StatusCode::PAYLOAD_TOO_LARGE, &reason);
        }
        let parent = next_hop(&self.settings.parents, host);
        // Through a parent, only the name can be checked here (the parent resolves it).
        if parent.is_some()
            && let Err(d) = self.policy.check_name(host, port)
        {
            return self.deny(&ask, &d);
        }
        let hop = match (parent, &inspected) {
            (None, None) => NextHop::Origin { authority, host, port },
            (parent, Some(i)) => NextHop::OriginTls {
                authority,
                host,
                port,
                sni: &i.sni,
                key: &i.key,
                through: parent.map(|parent| Through {
                    parent,
                    via: &self.via,
                    response: self.settings.upstream_response,
                }),
            },
            (Some(p), None) => NextHop::Parent(p),
        };
        let (mut parts, body) = req.into_parts();
        if let Some(answer) = self.answer_max_forwards(&mut parts) {
            return answer;
        }
        let awaited = parts.extensions.get::<upgrade::SwitchAwaited>().is_some();
        let offered = upgrade::offer(&parts.headers, awaited, &self.settings.upgrade_protocols);
        if offered.is_none() && parts.uri.scheme_str() == Some("ws") {
            let reason = "a ws:// target is for a WebSocket handshake, which this request is not (or upgrade_protocols leaves out)";
            return self.refuse(&ask, StatusCode::BAD_REQUEST, reason);
        }
        if let Err(reason) = self.to_next_hop(&mut parts, authority, hop) {
            return self.refuse(&ask, StatusCode::BAD_REQUEST, reason);
        }
        if let Some(offered) = &offered {
            upgrade::restore(&mut parts.headers, offered.clone());
        }
        let stats = Arc::new(BodyStats::default());
        let body = Counted::new(body, stats.clone(), self.settings.max_body_bytes);
        let sent = lease.send(hop, Request::from_parts(parts, body));
        match tokio::time::timeout(self.settings.upstream_response, sent).await {
            Err(_) => {
                let wait = self.settings.upstream_response;
                let reason = format!("{hop} did not answer within {wait:?}");
                self.refuse(&ask, StatusCode::GATEWAY_TIMEOUT, &reason)
            }
            Ok(Err(e)) => self.origin_failed(&ask, hop, &stats, &e),
            Ok(Ok((resp, _))) if resp.status() == StatusCode::SWITCHING_PROTOCOLS => {
                Box::pin(self.switched(client, hop, resp, offered.as_ref(), ask)).await
            }
            Ok(Ok((resp, server))) => self.answer(lease, hop, resp, server, stats, ask),
        }
    }

    /// The next hop's answer: a parent's 407 becomes baton's own refusal; an answer whose
    /// framing or `Connection` cannot be relayed faithfully is a 502, and the connection it
    /// came on is closed (where its message ended is in doubt); any other goes to the client.
    fn answer(
        &self,
        lease: &OriginLease,
        hop: NextHop<'_>,
        resp: Response<Incoming>,
        server: IpAddr,
        stats: Arc<BodyStats>,
        ask: Ask,
    ) -> Response<Body> {
        if let NextHop::Parent(p) = hop
            && resp.status() == StatusCode::PROXY_AUTHENTICATION_REQUIRED
        {
            let (status, reason) = parent::refusal(p, resp.status(), "the request");
            return self.refuse(&ask, status, &reason);
        }
        let (mut parts, body) = resp.into_parts();
        if let Err(why) = response_framing::relayed_head(&mut parts.headers) {
            lease.discard();
            let reason = format!("{hop} sent a response that cannot be relayed: {why}");
            return self.refuse(&ask, StatusCode::BAD_GATEWAY, &reason);
        }
        let parent = hop.parent().map(|p| p.authority.clone());
        self.to_client(Response::from_parts(parts, body), server, parent, stats, ask)
    }

    /// Makes the client's request head the next hop's: hop-by-hop fields out (the client's
    /// `Proxy-Authorization` with them), Host from the target, `Via` added; for an origin the
    /// origin-form target (RFC 9112 §3.2.1), for a parent the absolute form without userinfo
    /// and baton's own credentials for the parent.
    fn to_next_hop(
        &self,
        parts: &mut http::request::Parts,
        authority: &str,
        hop: NextHop<'_>,
    ) -> Result<(), &'static str> {
        // The client's chunked framing is hop-by-hop, but its body goes on: hyper would send
        // a GET, HEAD or CONNECT of unknown length with no body at all, so the next hop is
        // told `chunked` explicitly (the framing layer holds the body to the chunk grammar).
        let chunked = parts.headers.contains_key(header::TRANSFER_ENCODING);
        strip_hop_by_hop(&mut parts.headers)?;
        if chunked {
            parts
                .headers
                .insert(header::TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        }
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
        match hop {
            NextHop::Origin { .. } | NextHop::OriginTls { .. } => {
                parts.uri = parts
                    .uri
                    .path_and_query()
                    .map_or_else(|| Uri::from_static("/"), |pq| Uri::from(pq.clone()));
            }
            NextHop::Parent(p) => to_parent(parts, authority, p)?,
        }
        Ok(())
    }

    /// The response (from `server`, which is `parent` if set; its head already the
    /// client's) on its way to the client, logged when its body ends.
    fn to_client(
        &self,
        resp: Response<Incoming>,
        server: IpAddr,
        parent: Option<Arc<str>>,
        stats: Arc<BodyStats>,
        ask: Ask,
    ) -> Response<Body> {
        let (mut parts, body) = resp.into_parts();
        // An intermediary speaks its own HTTP version (RFC 9110 §6.2), whatever the origin's:
        // the client's (hyper's HTTP/2 server frames it as HTTP/2 either way).
        parts.version = if ask.version == http::Version::HTTP_2 {
            http::Version::HTTP_2
        } else {
            http::Version::HTTP_11
        };
        parts.headers.append(header::VIA, self.via.clone());
        let content_type = access::squid_format()
            .then(|| parts.headers.get(header::CONTENT_TYPE).cloned())
            .flatten();
        let throttle = self.limits.throttle(&ask.peer, ask.user.as_deref());
        let record = AccessRecord {
            peer: ask.peer,
            method: ask.method,
            target: ask.target,
            version: ask.version,
            status: parts.status,
            started: ask.started,
            sent: ask.sent,
            user: ask.user,
            rule: ask.rule.map(Rule::as_str),
            server,
            parent,
            content_type,
        };
        Response::from_parts(parts, AccessLogged::new(body, stats, record, throttle).boxed())
    }

    /// The answer when the exchange with the next hop failed: the client's fault (its body
    /// too large or malformed), a policy refusal of the resolved address, or the next hop's.
    fn origin_failed(&self, ask: &Ask, hop: NextHop<'_>, stats: &BodyStats, e: &UpstreamError) -> Response<Body> {
        if let Some(fault) = stats.fault() {
            let mut resp = self.refuse(ask, fault.status(), &fault.to_string());
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return resp;
        }
        let (status, reason) = match e {
            UpstreamError::Connect(ConnectError::Denied(d)) => return self.deny(ask, d),
            UpstreamError::Connect(c) => return self.connect_failed(ask, &hop.to_string(), c),
            UpstreamError::Http(h) => (StatusCode::BAD_GATEWAY, format!("{hop} failed: {h}")),
            UpstreamError::Tls(why) => (StatusCode::BAD_GATEWAY, why.clone()),
        };
        self.refuse(ask, status, &reason)
    }

    /// A failed connect to `what` (an origin or a CONNECT target): 504 on a timeout, else 502.
    pub(super) fn connect_failed(&self, ask: &Ask, what: &str, e: &ConnectError) -> Response<Body> {
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

    /// A policy refusal: like [`Proxy::refuse`], with the deciding rule in the log and the
    /// authentication challenge on a 407.
    pub(super) fn deny(&self, ask: &Ask, d: &Denial) -> Response<Body> {
        let bytes_out = d.reason.len() as u64 + 1;
        metrics::request_done(&ask.method, d.status, ask.started, 0, bytes_out, false);
        ask.line(Kind::Denied, d.status)
            .rule(d.rule.as_str())
            .traffic(0, bytes_out, ask.started)
            .reason(d.reason.clone())
            .content_type(Some(HeaderValue::from_static(ERROR_CONTENT_TYPE)))
            .write();
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
    pub(super) fn refuse(&self, ask: &Ask, status: StatusCode, reason: &str) -> Response<Body> {
        let bytes_out = reason.len() as u64 + 1;
        metrics::request_done(&ask.method, status, ask.started, 0, bytes_out, false);
        ask.line(Kind::Refused, status)
            .traffic(0, bytes_out, ask.started)
            .reason(reason.to_string())
            .content_type(Some(HeaderValue::from_static(ERROR_CONTENT_TYPE)))
            .write();
        error_response(status, reason)
    }
}

/// The media type of the proxy's own answers.
pub const ERROR_CONTENT_TYPE: &str = "text/plain; charset=utf-8";

/// A response with `reason` as its one-line body.
pub fn error_response(status: StatusCode, reason: &str) -> Response<Body> {
    let mut resp = Response::new(full(format!("{reason}\n")));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ERROR_CONTENT_TYPE));
    resp
}

fn full(s: String) -> Body {
    Full::new(Bytes::from(s))
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub(super) fn empty() -> Body {
    http_body_util::Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// `Via: 1.1 <token>` (the token is checked to be a valid field value by the configuration).
fn via_header(policy: &Policy) -> HeaderValue {
    HeaderValue::from_str(&format!("1.1 {}", policy.via_token())).unwrap_or(HeaderValue::from_static("1.1 baton"))
}

/// The head of a request to a parent: the absolute-form target (without any `user@`, which
/// is not the parent's business), and baton's `Proxy-Authorization` for it.
fn to_parent(parts: &mut http::request::Parts, authority: &str, parent: &Parent) -> Result<(), &'static str> {
    let has_userinfo = parts.uri.authority().is_some_and(|a| a.as_str().contains('@'));
    // A parent gets the `http://` form every proxy knows (`ws://` is the same origin).
    if has_userinfo || parts.uri.scheme_str() == Some("ws") {
        let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
        parts.uri = format!("http://{authority}{pq}")
            .parse()
            .map_err(|_| "invalid request target")?;
    }
    if let Some(auth) = &parent.authorization {
        parts.headers.insert(header::PROXY_AUTHORIZATION, auth.clone());
    }
    Ok(())
}

/// The request's Content-Length, by the one parser the framing layer held it to already.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    strict::content_length(headers.get(header::CONTENT_LENGTH)?.as_bytes()).ok()
}

/// Debug builds only (the tests' binary; a release build has no such path): a request whose
/// path is `BATON_TEST_PANIC_PATH` panics in its connection's task, so a test can show that
/// a panicking connection leaves the process serving and its counts right (panics unwind:
/// the task ends, its guards give back its slot).
#[cfg(debug_assertions)]
fn panic_probe(req: &Request<Incoming>) {
    static PATH: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let path = PATH.get_or_init(|| std::env::var("BATON_TEST_PANIC_PATH").ok());
    if path.as_deref() == Some(req.uri().path()) {
        panic!("BATON_TEST_PANIC_PATH: a test asked this connection's task to panic");
    }
}
