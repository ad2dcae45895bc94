//! A client pool in the background, for "no client sees a failure while baton hands off".
//!
//! Workers fetch one origin URL through the proxy until the pool is finished: keep-alive
//! workers send request after request on one connection, the others open a new connection
//! per request. Every request is bounded by a timeout, and every request that was sent and
//! did not end in a complete 200 (with the expected body length, when given) is a failure,
//! and so is a connection the proxy refused. That includes a request whose connection closed
//! before any of the response arrived: RFC 9112 §9.3.1 would let a client retry it, but baton
//! promises that a draining generation never causes one, so it is counted like any other.
//!
//! The one thing that is not a failure: a keep-alive connection the proxy closed *between*
//! requests (after answering the last one with `Connection: close`, or idle, with a FIN),
//! seen before the next request is sent. Nothing was lost; the worker opens a new connection
//! (a reconnect). A keep-alive connection reset between requests, with no `Connection:
//! close` announced, is counted apart (`resets`) and makes the run unclean: a client that
//! had just sent its next request would have lost it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::StatusCode;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::{ClientError, Closed, ProxyConnection, connect_tcp};
use crate::tls::ProxyTls;

/// How many failure messages a pool keeps.
pub const MAX_SAMPLES: usize = 20;
/// How many failures' connections a pool keeps.
pub const MAX_FAILURE_PORTS: usize = 10_000;

/// What a [`Load`] fetches, with how many workers of each kind.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The absolute origin URL every request fetches through the proxy.
    pub url: String,
    /// The body length a complete answer has; `None`: any complete body.
    pub body_len: Option<usize>,
    /// Workers that keep one connection for request after request.
    pub keep_alive_workers: usize,
    /// Workers that open a new connection for each request.
    pub new_connection_workers: usize,
    /// The bound on each request, connecting included.
    pub timeout: Duration,
    /// A worker's pause between two requests.
    pub pause: Duration,
    /// A status that is expected from some of the answers (a generation known to be bad,
    /// say): counted in [`LoadReport::tolerated`], not as a failure.
    pub tolerate: Option<StatusCode>,
    /// To a TLS listener: the client side (`None`: plain TCP).
    pub tls: Option<ProxyTls>,
}

impl LoadSpec {
    /// One keep-alive worker and one new-connection worker fetching `url`, 10 s per request,
    /// no pause, any body length.
    pub fn new(url: impl Into<String>) -> LoadSpec {
        LoadSpec {
            url: url.into(),
            body_len: None,
            keep_alive_workers: 1,
            new_connection_workers: 1,
            timeout: Duration::from_secs(10),
            pause: Duration::ZERO,
            tolerate: None,
            tls: None,
        }
    }

    /// Answers with `status` are counted apart ([`LoadReport::tolerated`]), not as failures.
    pub fn tolerate(mut self, status: StatusCode) -> LoadSpec {
        self.tolerate = Some(status);
        self
    }

    /// Speak TLS to the proxy (a TLS listener).
    pub fn tls(mut self, tls: ProxyTls) -> LoadSpec {
        self.tls = Some(tls);
        self
    }

    /// A complete answer has exactly `n` body bytes.
    pub fn body_len(mut self, n: usize) -> LoadSpec {
        self.body_len = Some(n);
        self
    }

    pub fn workers(mut self, keep_alive: usize, new_connection: usize) -> LoadSpec {
        self.keep_alive_workers = keep_alive;
        self.new_connection_workers = new_connection;
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> LoadSpec {
        self.timeout = timeout;
        self
    }

    pub fn pause(mut self, pause: Duration) -> LoadSpec {
        self.pause = pause;
        self
    }
}

/// What a pool saw, from [`Load::finish`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Requests answered 200 with a complete body.
    pub ok: u64,
    /// Requests answered with [`LoadSpec::tolerate`]'s status.
    pub tolerated: u64,
    /// Everything else: refused or failed connections, errors, other statuses, wrong body
    /// lengths, timeouts.
    pub failed: u64,
    /// Of `failed`: requests whose connection closed before any of the response arrived.
    pub closed_before_response: u64,
    /// Of those: requests sent on a reused keep-alive connection (the ones a client would
    /// retry under RFC 9112 §9.3.1).
    pub closed_on_reuse: u64,
    /// Keep-alive connections found closed between requests and replaced (not failures).
    pub reconnects: u64,
    /// Keep-alive connections reset between requests with nothing announced (in `samples`
    /// too): not a failed request, but not clean either.
    pub resets: u64,
    /// The first [`MAX_SAMPLES`] failures, each as `kind: what happened`.
    pub samples: Vec<String>,
    /// The connection each failure happened on (the first [`MAX_FAILURE_PORTS`]), by this
    /// side's port: to tell which event (a crashed successor, say) it belongs to. `None` when
    /// no connection was made (a refused connect, a worker that panicked).
    pub failure_ports: Vec<Option<u16>>,
    /// The longest a complete answer took on a new connection (connecting, the proxy's accept
    /// and the origin included).
    pub max_new_connection_ms: u64,
}

impl LoadReport {
    /// No request failed, and no idle keep-alive connection was reset unannounced.
    pub fn is_clean(&self) -> bool {
        self.failed == 0 && self.resets == 0
    }
}

impl std::fmt::Display for LoadReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ok, ", self.ok)?;
        if self.tolerated > 0 {
            write!(f, "{} tolerated, ", self.tolerated)?;
        }
        write!(
            f,
            "{} failed ({} closed before a response, {} of them on a reused keep-alive connection), {} reconnects, {} resets",
            self.failed, self.closed_before_response, self.closed_on_reuse, self.reconnects, self.resets
        )?;
        for s in &self.samples {
            write!(f, "\n  {s}")?;
        }
        Ok(())
    }
}

/// A running client pool; [`Load::finish`] stops it and reports.
pub struct Load {
    stop: CancellationToken,
    tally: Arc<Tally>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    /// Starts `spec`'s workers against the proxy at `proxy`.
    pub fn start(proxy: SocketAddr, spec: LoadSpec) -> Load {
        let stop = CancellationToken::new();
        let tally = Arc::new(Tally::default());
        let spec = Arc::new(spec);
        let mut workers = Vec::new();
        for _ in 0..spec.keep_alive_workers {
            let worker = Worker::new(proxy, &spec, &tally);
            workers.push(tokio::spawn(worker.keep_alive(stop.clone())));
        }
        for _ in 0..spec.new_connection_workers {
            let worker = Worker::new(proxy, &spec, &tally);
            workers.push(tokio::spawn(worker.new_connections(stop.clone())));
        }
        Load { stop, tally, workers }
    }

    /// Requests answered so far.
    pub fn ok(&self) -> u64 {
        self.tally.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests in all were answered (so that a handoff the test triggers
    /// next meets requests in flight, however slow the machine); `false` after `within`.
    pub async fn answered(&self, n: u64, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while self.ok() < n {
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }

    /// Requests failed so far.
    pub fn failed(&self) -> u64 {
        self.tally.failed.load(Ordering::Relaxed)
    }

    /// Stops the workers, lets the requests in flight end (each within the timeout), reports.
    pub async fn finish(self) -> LoadReport {
        self.stop.cancel();
        for w in self.workers {
            if let Err(e) = w.await {
                self.tally
                    .fail(Kind::Worker, &Failure::Other(format!("worker panicked: {e}")), None);
            }
        }
        self.tally.report()
    }
}

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    tolerated: AtomicU64,
    failed: AtomicU64,
    closed_before_response: AtomicU64,
    closed_on_reuse: AtomicU64,
    reconnects: AtomicU64,
    resets: AtomicU64,
    samples: Mutex<Vec<String>>,
    failure_ports: Mutex<Vec<Option<u16>>>,
    max_new_connection_us: AtomicU64,
}

impl Tally {
    fn fail(&self, kind: Kind, failure: &Failure, port: Option<u16>) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if failure.closed_before_response() {
            self.closed_before_response.fetch_add(1, Ordering::Relaxed);
            if kind == Kind::Reused {
                self.closed_on_reuse.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Ok(mut samples) = self.samples.lock()
            && samples.len() < MAX_SAMPLES
        {
            samples.push(format!("{}: {failure}", kind.label()));
        }
        if let Ok(mut ports) = self.failure_ports.lock()
            && ports.len() < MAX_FAILURE_PORTS
        {
            ports.push(port);
        }
    }

    /// An idle keep-alive connection found closed: a reconnect, or a reset.
    fn closed_between(&self, closed: Closed) {
        let Closed::Reset(why) = closed else {
            self.reconnects.fetch_add(1, Ordering::Relaxed);
            return;
        };
        self.resets.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut samples) = self.samples.lock()
            && samples.len() < MAX_SAMPLES
        {
            samples.push(format!(
                "keep-alive connection reset between requests, unannounced: {why}"
            ));
        }
    }

    fn report(&self) -> LoadReport {
        LoadReport {
            ok: self.ok.load(Ordering::Relaxed),
            tolerated: self.tolerated.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            closed_before_response: self.closed_before_response.load(Ordering::Relaxed),
            closed_on_reuse: self.closed_on_reuse.load(Ordering::Relaxed),
            reconnects: self.reconnects.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            samples: self.samples.lock().map(|s| s.clone()).unwrap_or_default(),
            failure_ports: self.failure_ports.lock().map(|s| s.clone()).unwrap_or_default(),
            max_new_connection_ms: self.max_new_connection_us.load(Ordering::Relaxed) / 1000,
        }
    }
}

/// Which request failed, for the counters and the samples.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The first request on a keep-alive worker's new connection.
    KeepAliveFirst,
    /// A later request on a keep-alive connection.
    Reused,
    NewConnection,
    Worker,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::KeepAliveFirst => "keep-alive (new connection)",
            Kind::Reused => "keep-alive (reused connection)",
            Kind::NewConnection => "new connection",
            Kind::Worker => "worker",
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Client(#[from] ClientError),
    #[error("status {status}, {len} body bytes")]
    Answer { status: StatusCode, len: usize },
    #[error("no complete answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Other(String),
}

impl Failure {
    fn closed_before_response(&self) -> bool {
        matches!(self, Failure::Client(e) if e.is_closed_before_response())
    }
}

/// One worker's share of the pool.
struct Worker {
    proxy: SocketAddr,
    spec: Arc<LoadSpec>,
    tally: Arc<Tally>,
}

impl Worker {
    fn new(proxy: SocketAddr, spec: &Arc<LoadSpec>, tally: &Arc<Tally>) -> Worker {
        Worker {
            proxy,
            spec: spec.clone(),
            tally: tally.clone(),
        }
    }

    async fn keep_alive(self, stop: CancellationToken) {
        let mut conn: Option<ProxyConnection> = None;
        while !stop.is_cancelled() {
            if let Some(c) = conn.as_mut()
                && (c.is_closed() || !self.ready_within_timeout(c).await)
            {
                // Closed by the proxy between requests, before we sent anything: not a loss,
                // unless it was a reset (see the module's doc).
                self.tally.closed_between(c.how_closed().await);
                conn = None;
            }
            let kind = if conn.is_some() {
                Kind::Reused
            } else {
                Kind::KeepAliveFirst
            };
            let mut port = conn.as_ref().map(ProxyConnection::local_port);
            let attempt = tokio::time::timeout(self.spec.timeout, async {
                let c = match conn.take() {
                    Some(c) => conn.insert(c),
                    None => {
                        let tcp = connect_tcp(self.proxy).await?;
                        port = tcp.local_addr().ok().map(|a| a.port());
                        conn.insert(ProxyConnection::over(tcp, self.spec.tls.as_ref()).await?)
                    }
                };
                c.get(&self.spec.url).await
            })
            .await;
            if !self.record(kind, attempt, port) {
                conn = None;
            }
            self.pause().await;
        }
    }

    async fn new_connections(self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let started = Instant::now();
            let mut port = None;
            let attempt = tokio::time::timeout(self.spec.timeout, async {
                let tcp = connect_tcp(self.proxy).await?;
                port = tcp.local_addr().ok().map(|a| a.port());
                let mut c = ProxyConnection::over(tcp, self.spec.tls.as_ref()).await?;
                c.get(&self.spec.url).await
            })
            .await;
            if self.record(Kind::NewConnection, attempt, port) {
                let us = started.elapsed().as_micros() as u64;
                self.tally.max_new_connection_us.fetch_max(us, Ordering::Relaxed);
            }
            self.pause().await;
        }
    }

    /// Whether an open keep-alive connection takes a request (a wait for the proxy's
    /// decision to keep or close it after the last answer). Not ready in time: kept, so that
    /// the request that follows meets the same trouble and counts it.
    async fn ready_within_timeout(&self, c: &mut ProxyConnection) -> bool {
        tokio::time::timeout(self.spec.timeout, c.ready()).await.unwrap_or(true)
    }

    /// Counts one request's outcome on the connection from `port`; `true` if it was a
    /// complete 200.
    fn record(
        &self,
        kind: Kind,
        attempt: Result<Result<(StatusCode, Bytes), ClientError>, tokio::time::error::Elapsed>,
        port: Option<u16>,
    ) -> bool {
        let failure = match attempt {
            Ok(Ok((status, body)))
                if status == StatusCode::OK && self.spec.body_len.is_none_or(|n| n == body.len()) =>
            {
                self.tally.ok.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(Ok((status, _))) if Some(status) == self.spec.tolerate => {
                self.tally.tolerated.fetch_add(1, Ordering::Relaxed);
                return true;
            }
            Ok(Ok((status, body))) => Failure::Answer {
                status,
                len: body.len(),
            },
            Ok(Err(e)) => Failure::Client(e),
            Err(_) => Failure::Timeout(self.spec.timeout),
        };
        self.tally.fail(kind, &failure, port);
        false
    }

    async fn pause(&self) {
        if !self.spec.pause.is_zero() {
            tokio::time::sleep(self.spec.pause).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// A server that reads each request head, then writes `answer` (nothing: just closes) and
    /// closes the connection.
    async fn one_shot_server(answer: &'static [u8]) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut b).await {
                            Ok(n) if n > 0 => head.extend_from_slice(&b[..n]),
                            _ => return,
                        }
                    }
                    let _ = s.write_all(answer).await;
                });
            }
        });
        addr
    }

    async fn run_for(server: SocketAddr, spec: LoadSpec) -> LoadReport {
        let load = Load::start(server, spec);
        tokio::time::sleep(Duration::from_millis(300)).await;
        load.finish().await
    }

    #[tokio::test]
    async fn complete_answers_count_as_ok() {
        let origin = crate::start_origin().await.unwrap();
        let spec = LoadSpec::new(format!("http://{origin}/bytes?n=100")).body_len(100);
        let report = run_for(origin, spec).await;
        assert!(report.is_clean() && report.ok > 10, "{report}");
    }

    #[tokio::test]
    async fn a_close_before_the_response_is_a_failure() {
        let server = one_shot_server(b"").await;
        let report = run_for(server, LoadSpec::new(format!("http://{server}/")).workers(1, 1)).await;
        assert_eq!(report.ok, 0, "{report}");
        assert!(report.failed > 0, "{report}");
        assert_eq!(report.closed_before_response, report.failed, "{report}");
        assert_eq!(
            report.samples.len(),
            MAX_SAMPLES.min(report.failed as usize),
            "{report}"
        );
    }

    #[tokio::test]
    async fn a_keep_alive_connection_closed_between_requests_is_replaced() {
        let server = one_shot_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok").await;
        let spec = LoadSpec::new(format!("http://{server}/")).body_len(2).workers(1, 0);
        let report = run_for(server, spec).await;
        assert!(report.is_clean() && report.ok > 10, "{report}");
        assert!(report.reconnects > 0, "{report}");
    }

    /// The same answer without `Connection: close`, then a reset (SO_LINGER 0) instead of a
    /// FIN: the request was answered, but the reset of an idle connection is not clean; the
    /// FIN case (above) is the witness that only the reset counts.
    #[tokio::test]
    async fn an_unannounced_reset_between_requests_is_not_clean() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let server = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut b = [0u8; 1024];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut b).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&b[..n]),
                        _ => break,
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
                // A zero linger never blocks (the deprecation's worry): close resets at once.
                #[allow(deprecated)]
                let _ = s.set_linger(Some(Duration::ZERO));
            }
        });
        let spec = LoadSpec::new(format!("http://{server}/")).body_len(2).workers(1, 0);
        let report = run_for(server, spec).await;
        assert!(
            report.ok > 0 && report.failed == 0,
            "every request was answered: {report}"
        );
        assert!(report.resets > 0 && !report.is_clean(), "the resets count: {report}");
        assert!(report.samples[0].contains("reset between requests"), "{report}");
    }

    #[tokio::test]
    async fn a_wrong_length_is_a_failure() {
        let origin = crate::start_origin().await.unwrap();
        let spec = LoadSpec::new(format!("http://{origin}/bytes?n=100")).body_len(99);
        let report = run_for(origin, spec).await;
        assert!(report.ok == 0 && report.failed > 0, "{report}");
        assert!(report.samples[0].contains("100 body bytes"), "{report}");
    }
}
