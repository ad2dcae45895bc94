//! The proxy's request metrics (through `prometheus-client`): counters the proxy moves, in
//! one process-wide [`Metrics`]. The daemon exports them with what belongs to the whole chain
//! of generations (handoff results, phase durations, drains) and what is read at scrape time
//! (`daemon::exporter`).

use std::sync::{LazyLock, OnceLock};
use std::time::Instant;

use http::{Method, StatusCode};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub method: &'static str,
    pub status_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// `http` (forwarded requests and refusals) or `tunnel` (CONNECT).
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// `timeout` or `error`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok`, `failed`, `timeout` or `evicted`.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabels {
    /// The access rule, by name (`default` when none matched).
    pub rule: &'static str,
    /// `allow`, `deny`, or `login` (a 407: the rule needs a login).
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SniLabels {
    /// The server name a bumped tunnel's ClientHello gave.
    pub sni: String,
}

/// The counters of this process (one generation).
pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histogram,
    pub bytes_received: Family<KindLabels, Counter>,
    pub bytes_sent: Family<KindLabels, Counter>,
    pub upstream_connect_errors: Family<ReasonLabels, Counter>,
    /// Connections adopted from the previous generation at a handoff, by kind.
    pub migrated: Family<KindLabels, Counter>,
    pub tls_handshakes: Family<ResultLabels, Counter>,
    /// TLS connections and tunnels that stayed at a handoff (they drain), by why
    /// (`tls::moving::Refusal`).
    pub tls_not_moved: Family<ReasonLabels, Counter>,
    /// Bumped tunnels by how they ended (`ok`, `client_refused`, `failed`, `timeout`, `mint_failed`).
    pub bumped: Family<ResultLabels, Counter>,
    /// Bumped tunnels whose client refused the minted leaf, by server name.
    pub bump_client_refusals: Family<SniLabels, Counter>,
    pub bump_leaves_minted: Counter,
    /// Requests and tunnels each access rule decided.
    pub rule_decisions: Family<RuleLabels, Counter>,
    /// bcrypt verifications run (proxy authentication): what the failed-login budget bounds.
    pub auth_checks: Counter,
    /// Client connections idle right now (parked between requests, or not yet sent one).
    pub idle_connections: Gauge,
    /// Counter handles resolved once per label set, so that a request does not pay the
    /// family's lock and label hashing: [method][status class], and [http, tunnel].
    request_handles: [[OnceLock<Counter>; 5]; 10],
    byte_handles: [OnceLock<(Counter, Counter)>; 2],
}

static METRICS: LazyLock<Metrics> = LazyLock::new(|| Metrics {
    requests: Family::default(),
    // 1 ms .. ~65 s
    request_duration: Histogram::new(exponential_buckets(0.001, 2.0, 17)),
    bytes_received: Family::default(),
    bytes_sent: Family::default(),
    upstream_connect_errors: Family::default(),
    migrated: Family::default(),
    tls_handshakes: Family::default(),
    tls_not_moved: Family::default(),
    bumped: Family::default(),
    bump_client_refusals: Family::default(),
    bump_leaves_minted: Counter::default(),
    rule_decisions: Family::default(),
    auth_checks: Counter::default(),
    idle_connections: Gauge::default(),
    request_handles: std::array::from_fn(|_| std::array::from_fn(|_| OnceLock::new())),
    byte_handles: std::array::from_fn(|_| OnceLock::new()),
});

pub fn get() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    /// Registers this process's metrics (clones share the values) under `baton_`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "Requests answered (CONNECT counted when the tunnel ends), by method and status class",
            self.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request head to the end of the response body (CONNECT tunnels excluded)",
            self.request_duration.clone(),
        );
        registry.register(
            "client_received_bytes",
            "Bytes received from clients (request bodies, tunnel upstream)",
            self.bytes_received.clone(),
        );
        registry.register(
            "client_sent_bytes",
            "Bytes sent to clients (response bodies, tunnel downstream)",
            self.bytes_sent.clone(),
        );
        registry.register(
            "upstream_connect_errors",
            "Failed connects to origins and CONNECT targets",
            self.upstream_connect_errors.clone(),
        );
        registry.register(
            "migrated",
            "Live connections this process adopted from the previous generation at a handoff, by kind",
            self.migrated.clone(),
        );
        self.register_tls(registry);
        registry.register(
            "bumped_tunnels",
            "Bumped (TLS-inspected) tunnels by result: ok, client_refused (the client refused the minted certificate), failed, timeout, mint_failed",
            self.bumped.clone(),
        );
        registry.register(
            "bump_client_refusals",
            "Bumped tunnels whose client refused the minted certificate (a pinned app: give it a splice rule), by server name",
            self.bump_client_refusals.clone(),
        );
        registry.register(
            "bump_leaves_minted",
            "Leaf certificates minted for bumped tunnels (the rest came from the leaf cache)",
            self.bump_leaves_minted.clone(),
        );
        registry.register(
            "access_rule_decisions",
            "Requests and tunnels decided by each access rule (first match wins), by decision",
            self.rule_decisions.clone(),
        );
        registry.register(
            "auth_checks",
            "bcrypt verifications of proxy credentials run (cached credentials and refusals over \
             the failed-login budget run none)",
            self.auth_checks.clone(),
        );
        registry.register(
            "client_connections_idle",
            "Client connections of this process that are idle: between requests (no HTTP state \
             held, their origin connection back in the pool) or before their first",
            self.idle_connections.clone(),
        );
    }
}

impl Metrics {
    /// The TLS listeners' own: handshakes, and connections that could not move.
    fn register_tls(&self, registry: &mut Registry) {
        registry.register(
            "tls_handshakes",
            "TLS handshakes on TLS listeners, by result (ok, failed, timeout, evicted at max_handshakes)",
            self.tls_handshakes.clone(),
        );
        registry.register(
            "tls_not_moved",
            "TLS connections and tunnels that could not move at a handoff and drain instead, by reason \
             (plaintext_buffered, ciphertext_buffered, suite, closing, busy, extraction)",
            self.tls_not_moved.clone(),
        );
    }
}

/// One idle client connection, counted in `client_connections_idle` while it lives.
pub struct IdleConnection(());

impl IdleConnection {
    #[allow(clippy::new_without_default)]
    pub fn new() -> IdleConnection {
        get().idle_connections.inc();
        IdleConnection(())
    }
}

impl Drop for IdleConnection {
    fn drop(&mut self) {
        get().idle_connections.dec();
    }
}

const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "other",
];
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

fn method_slot(m: &Method) -> usize {
    match *m {
        Method::GET => 0,
        Method::HEAD => 1,
        Method::POST => 2,
        Method::PUT => 3,
        Method::DELETE => 4,
        Method::CONNECT => 5,
        Method::OPTIONS => 6,
        Method::TRACE => 7,
        Method::PATCH => 8,
        _ => 9,
    }
}

fn class_slot(s: StatusCode) -> usize {
    match s.as_u16() {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// A method label with bounded cardinality.
pub fn method_label(m: &Method) -> &'static str {
    METHODS[method_slot(m)]
}

pub fn status_class(s: StatusCode) -> &'static str {
    CLASSES[class_slot(s)]
}

/// Records one answered request (or a finished tunnel, `tunnel = true`).
pub fn request_done(
    method: &Method,
    status: StatusCode,
    started: Instant,
    bytes_in: u64,
    bytes_out: u64,
    tunnel: bool,
) {
    let m = get();
    let (mi, ci) = (method_slot(method), class_slot(status));
    m.request_handles[mi][ci]
        .get_or_init(|| {
            let labels = RequestLabels {
                method: METHODS[mi],
                status_class: CLASSES[ci],
            };
            Counter::clone(&m.requests.get_or_create(&labels))
        })
        .inc();
    let (received, sent) = m.byte_handles[usize::from(tunnel)].get_or_init(|| {
        let kind = KindLabels {
            kind: if tunnel { "tunnel" } else { "http" },
        };
        (
            Counter::clone(&m.bytes_received.get_or_create(&kind)),
            Counter::clone(&m.bytes_sent.get_or_create(&kind)),
        )
    });
    received.inc_by(bytes_in);
    sent.inc_by(bytes_out);
    if !tunnel {
        m.request_duration.observe(started.elapsed().as_secs_f64());
    }
}

/// Records a failed connect to an origin or CONNECT target.
pub fn upstream_connect_error(timeout: bool) {
    get()
        .upstream_connect_errors
        .get_or_create(&ReasonLabels {
            reason: if timeout { "timeout" } else { "error" },
        })
        .inc();
}

/// `n` connections of `kind` adopted from the previous generation.
pub fn migrated(kind: &'static str, n: u64) {
    get().migrated.get_or_create(&KindLabels { kind }).inc_by(n);
}

/// Requests answered by this process so far, by outcome: what the status page's traffic
/// history samples. Read from the request counters themselves, so a request pays nothing more.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Answered {
    pub requests: u64,
    /// 4xx: refused (policy, limits, malformed requests).
    pub client_errors: u64,
    /// 5xx: the origin or the proxy failed (502, 503, 504).
    pub server_errors: u64,
}

pub fn answered() -> Answered {
    let mut a = Answered::default();
    for by_class in &get().request_handles {
        for (ci, handle) in by_class.iter().enumerate() {
            let n = handle.get().map_or(0, Counter::get);
            a.requests += n;
            match CLASSES[ci] {
                "4xx" => a.client_errors += n,
                "5xx" => a.server_errors += n,
                _ => {}
            }
        }
    }
    a
}

/// Records how a TLS handshake ended (`ok`, or a [`crate::tls::HandshakeError`]'s label).
/// A bumped tunnel ended (`ok`), or how it failed before serving.
pub fn bumped(result: &'static str) {
    get().bumped.get_or_create(&ResultLabels { result }).inc();
}

/// A client refused the leaf minted for `sni` (it pins its server's key): it needs `splice`.
pub fn bump_client_refused(sni: &str) {
    let labels = SniLabels { sni: sni.to_string() };
    get().bump_client_refusals.get_or_create(&labels).inc();
}

/// A leaf was minted (not found in the cache).
pub fn bump_leaf_minted() {
    get().bump_leaves_minted.inc();
}

/// A TLS connection or tunnel that stays at a handoff, and why.
pub fn tls_not_moved(reason: &'static str) {
    get().tls_not_moved.get_or_create(&ReasonLabels { reason }).inc();
}

pub fn tls_handshake(result: &'static str) {
    get().tls_handshakes.get_or_create(&ResultLabels { result }).inc();
}
