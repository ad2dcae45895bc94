//! Connections to origins and parent proxies, pooled by next hop ([`NextHop::key`]). A busy
//! client connection holds a lease ([`OriginLease`]) on the connection its last request used
//! (a keep-alive client usually asks the same origin again: no pool lookup, no lock
//! contention, no hand-off to another task). The lease lapses when the client goes idle (the
//! connection module drops it with hyper's state, after a short linger) or leaves: the
//! connection goes back to a shared pool, where the next request to the same next hop finds
//! it. The pool keeps at most `idle_per_host` idle connections per next hop and closes the
//! rest, so idle connections are bounded per next hop (the parent, when one is used), never
//! one per idle client; and at most `idle_total` across all next hops, closing the least
//! recently used one to make room (a client asking many next hops cannot pile them up).
//! Connects to origins go through the [`Policy`] (see
//! [`connect_checked`]); connects to a parent do not (see [`connect_parent`]).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::config::Parent;
use crate::proxy::body::Counted;
use rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::proxy::connector::{ConnectError, HopStream, connect_checked, connect_parent};
use crate::proxy::parent::{self, ParentError};
use crate::proxy::policy::Policy;

/// The body of a request to an origin: the client's body, counted and limited (not boxed:
/// it is the only kind sent).
pub type UpstreamBody = Counted;

/// A connection to the next hop, and the address it is connected to (which the Squid access
/// line names).
struct Sender {
    tx: SendRequest<UpstreamBody>,
    addr: IpAddr,
}

impl Sender {
    fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    fn is_ready(&self) -> bool {
        self.tx.is_ready()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// TLS to the origin of a bumped request failed (its certificate did not verify, say).
    #[error("{0}")]
    Tls(String),
}

/// Where a request's connection goes.
#[derive(Debug, Clone, Copy)]
pub enum NextHop<'a> {
    /// The origin itself (`authority` is its `host:port`), connected to through the policy.
    Origin {
        authority: &'a str,
        host: &'a str,
        port: u16,
    },
    /// A parent proxy, which receives the request in absolute form.
    Parent(&'a Parent),
    /// The origin of a bumped request, over TLS to `sni` (`key`: the pool's, which names
    /// host, port and server name); `through` a parent's CONNECT when `[upstream]` routes
    /// its host to one.
    OriginTls {
        authority: &'a str,
        host: &'a str,
        port: u16,
        sni: &'a str,
        key: &'a str,
        through: Option<Through<'a>>,
    },
}

/// A parent whose CONNECT a bumped request's origin connection goes through: this proxy's
/// `Via` entry for the CONNECT, and how long the parent may take to answer it.
#[derive(Debug, Clone, Copy)]
pub struct Through<'a> {
    pub parent: &'a Parent,
    pub via: &'a HeaderValue,
    pub response: Duration,
}

impl<'a> NextHop<'a> {
    /// The parent proxy this is, if it is one.
    pub fn parent(&self) -> Option<&'a Parent> {
        match *self {
            NextHop::Parent(p) => Some(p),
            NextHop::OriginTls { through, .. } => through.map(|t| t.parent),
            NextHop::Origin { .. } => None,
        }
    }
}

impl NextHop<'_> {
    /// The pool key: an origin's `host:port`, or the parent's key (which no `host:port`
    /// equals, so a parent and an origin at the same address never share connections).
    pub fn key(&self) -> &str {
        match self {
            NextHop::Origin { authority, .. } => authority,
            NextHop::Parent(p) => &p.pool_key,
            NextHop::OriginTls { key, .. } => key,
        }
    }
}

impl std::fmt::Display for NextHop<'_> {
    /// How answers name it: `origin host:port` or `parent proxy host:port`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NextHop::Origin { authority, .. } => write!(f, "origin {authority}"),
            NextHop::Parent(p) => p.fmt(f),
            NextHop::OriginTls { authority, .. } => write!(f, "origin https://{authority}"),
        }
    }
}

/// The shared pool of idle connections, keyed by [`NextHop::key`].
pub struct Upstream {
    policy: Arc<Policy>,
    connect_timeout: Duration,
    /// How long an idle origin connection is kept (`timeouts.upstream_idle`; keep it below
    /// the origins' own keep-alive timeout, commonly 60-75 s).
    max_idle: Duration,
    idle: Mutex<IdlePool<Sender>>,
    /// TLS to the origins of bumped requests (`[inspect]`), if configured.
    origin_tls: Option<TlsConnector>,
    /// TLS to `https://` parents, if any is configured.
    parent_tls: Option<TlsConnector>,
}

/// The TLS an `Upstream` may speak to next hops, each loaded at start when configured.
#[derive(Default)]
pub struct HopTls {
    /// To the origins of bumped requests (`[inspect] origin_roots`).
    pub origin: Option<TlsConnector>,
    /// To `https://` parents (`[upstream] roots`).
    pub parent: Option<TlsConnector>,
}

/// The bounds of the idle pool.
#[derive(Debug, Clone, Copy)]
pub struct IdleBounds {
    /// Idle connections kept per next hop (`limits.idle_per_host`); one more is closed.
    pub per_host: usize,
    /// Idle connections kept in all (`limits.idle_total`); beyond it the least recently
    /// used one is closed.
    pub total: usize,
}

impl Upstream {
    /// Also starts the sweeper that closes idle connections past `max_idle`; it stops when
    /// the `Upstream` is dropped.
    pub fn new(
        policy: Arc<Policy>,
        connect_timeout: Duration,
        max_idle: Duration,
        bounds: IdleBounds,
        tls: HopTls,
    ) -> Arc<Upstream> {
        let upstream = Arc::new(Upstream {
            origin_tls: tls.origin,
            parent_tls: tls.parent,
            policy,
            connect_timeout,
            max_idle,
            idle: Mutex::new(IdlePool::new(bounds)),
        });
        let weak = Arc::downgrade(&upstream);
        let period = (max_idle / 2).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(upstream) = weak.upgrade() else { break };
                upstream.sweep();
            }
        });
        upstream
    }

    /// A tunnel to `authority` through `t`'s parent, for TLS to a bumped request's origin.
    async fn tunnel_through(&self, t: Through<'_>, authority: &str) -> Result<HopStream, UpstreamError> {
        let target: Uri = authority
            .parse()
            .map_err(|e| UpstreamError::Tls(format!("{authority}: {e}")))?;
        // No client head to take a `Via` chain from: the CONNECT is baton's own.
        let incoming = HeaderMap::new();
        let opened = parent::open_tunnel(
            t.parent,
            self.parent_tls.as_ref(),
            &target,
            &incoming,
            t.via,
            self.connect_timeout,
            t.response,
        );
        match opened.await {
            // A TLS server speaks only after the client's hello: bytes before it are not TLS.
            Ok(o) if o.early.is_empty() => Ok(o.stream),
            Ok(_) => Err(UpstreamError::Tls(format!(
                "{} sent bytes before the TLS handshake",
                t.parent
            ))),
            Err(ParentError::Connect(e)) => Err(e.into()),
            Err(e) => Err(UpstreamError::Tls(format!("{} on CONNECT {authority}: {e}", t.parent))),
        }
    }

    /// TLS to `https://` parents (for a tunnel through one's CONNECT).
    pub fn parent_tls(&self) -> Option<&TlsConnector> {
        self.parent_tls.as_ref()
    }

    /// Drops idle connections past `max_idle` or closed by their origin.
    fn sweep(&self) {
        lock(&self.idle).retain(|since, s| since.elapsed() < self.max_idle && !s.is_closed());
    }

    fn checkout(&self, origin: &str) -> Option<Sender> {
        lock(&self.idle).take(origin, |since, sender| {
            since.elapsed() < self.max_idle && sender.is_ready()
        })
    }

    fn checkin(&self, origin: String, sender: Sender) {
        if !sender.is_ready() {
            return;
        }
        // One clock read for the whole list.
        let now = Instant::now();
        let closed = lock(&self.idle).put(origin, sender, |since, s| {
            now.saturating_duration_since(since) < self.max_idle && !s.is_closed()
        });
        // Dropped after the lock: the last sender of an idle connection closes it.
        drop(closed);
    }

    async fn connect(&self, hop: NextHop<'_>) -> Result<Sender, UpstreamError> {
        // An origin's connection is a bare socket (the upgrade takes it back as one); a
        // parent's may be TLS.
        match hop {
            NextHop::Origin { host, port, .. } => {
                let stream = connect_checked(&self.policy, host, port, self.connect_timeout).await?;
                let addr = stream.peer_addr().map_err(ConnectError::Io)?.ip();
                handshake(stream, addr).await
            }
            NextHop::Parent(p) => {
                let stream = connect_parent(p, self.parent_tls.as_ref(), self.connect_timeout).await?;
                let addr = stream.peer_addr().map_err(ConnectError::Io)?.ip();
                handshake(stream, addr).await
            }
            NextHop::OriginTls {
                host,
                port,
                sni,
                through: None,
                ..
            } => {
                let tcp = connect_checked(&self.policy, host, port, self.connect_timeout).await?;
                let addr = tcp.peer_addr().map_err(ConnectError::Io)?.ip();
                Box::pin(self.connect_tls(hop, tcp, addr, sni)).await
            }
            NextHop::OriginTls {
                host,
                port,
                sni,
                through: Some(t),
                ..
            } => {
                // host:port even for 443, which the request's authority leaves out.
                let stream = Box::pin(self.tunnel_through(t, &format!("{host}:{port}"))).await?;
                let addr = stream.peer_addr().map_err(ConnectError::Io)?.ip();
                Box::pin(self.connect_tls(hop, stream, addr, sni)).await
            }
        }
    }

    /// TLS to a bumped request's origin over `tcp`, as `sni`, verified against
    /// `[inspect] origin_roots`; it must agree to HTTP/1.1.
    async fn connect_tls<S>(&self, hop: NextHop<'_>, tcp: S, addr: IpAddr, sni: &str) -> Result<Sender, UpstreamError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let failed = |why: String| UpstreamError::Tls(format!("TLS to {hop} failed: {why}"));
        let Some(connector) = &self.origin_tls else {
            return Err(failed("no [inspect] section configures TLS to origins".into()));
        };
        let name = ServerName::try_from(sni.to_string()).map_err(|e| failed(format!("{sni:?}: {e}")))?;
        let shake = tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp));
        let tls = match shake.await {
            Err(_) => return Err(failed(format!("no handshake within {:?}", self.connect_timeout))),
            Ok(Err(e)) => return Err(failed(e.to_string())),
            Ok(Ok(tls)) => tls,
        };
        match tls.get_ref().1.alpn_protocol() {
            None | Some(b"http/1.1") => handshake(tls, addr).await,
            Some(other) => Err(failed(format!(
                "it chose ALPN {:?}, not http/1.1",
                String::from_utf8_lossy(other)
            ))),
        }
    }
}

/// hyper's HTTP/1.1 client connection over `stream` (to `addr`), driven on a task of its own.
async fn handshake<S>(stream: S, addr: IpAddr) -> Result<Sender, UpstreamError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (tx, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        // Ends when the origin closes, or when the last sender is dropped while idle;
        // after a 101 it hands the stream to the upgrade (`proxy::upgrade`).
        let _ = conn.with_upgrades().await;
    });
    Ok(Sender { tx, addr })
}

/// Idle connections by next hop, oldest first in each list, and in the order they came
/// back across all of them (`lru`: a number that only grows, to the entry's key), so the
/// least recently used one is found at once when the total is reached.
struct IdlePool<T> {
    bounds: IdleBounds,
    by_hop: HashMap<String, Vec<Idle<T>>>,
    lru: BTreeMap<u64, String>,
    next: u64,
}

struct Idle<T> {
    order: u64,
    since: Instant,
    conn: T,
}

impl<T> IdlePool<T> {
    fn new(bounds: IdleBounds) -> IdlePool<T> {
        IdlePool {
            bounds,
            by_hop: HashMap::new(),
            lru: BTreeMap::new(),
            next: 0,
        }
    }

    fn len(&self) -> usize {
        self.lru.len()
    }

    /// The most recently returned connection to `key` that is `usable`; the unusable ones
    /// met on the way are dropped.
    fn take(&mut self, key: &str, usable: impl Fn(Instant, &T) -> bool) -> Option<T> {
        let list = self.by_hop.get_mut(key)?;
        let mut found = None;
        while let Some(idle) = list.pop() {
            self.lru.remove(&idle.order);
            if usable(idle.since, &idle.conn) {
                found = Some(idle.conn);
                break;
            }
        }
        if list.is_empty() {
            self.by_hop.remove(key);
        }
        found
    }

    /// Keeps `conn` as the most recently used, unless its next hop has `per_host` kept (the
    /// ones not `alive` removed first); at the total, the least recently used one anywhere
    /// makes room. Returns what is to be closed.
    fn put(&mut self, key: String, conn: T, alive: impl Fn(Instant, &T) -> bool) -> Vec<T> {
        let mut closed = Vec::new();
        let list = self.by_hop.entry(key.clone()).or_default();
        // Only a full list is searched for dead entries to make room (the sweeper removes
        // them otherwise): every HTTP/2 stream gives its connection back, and checking every
        // kept one each time was about 2,500 instructions per h2 request with 64 kept
        // (callgrind). In place: the kept entries move only if one before them leaves.
        if list.len() >= self.bounds.per_host {
            for idle in list.extract_if(.., |i| !alive(i.since, &i.conn)) {
                self.lru.remove(&idle.order);
                closed.push(idle.conn);
            }
        }
        if list.len() >= self.bounds.per_host || self.bounds.total == 0 {
            closed.push(conn);
            self.forget_if_empty(&key);
            return closed;
        }
        let order = self.next;
        self.next += 1;
        list.push(Idle {
            order,
            since: Instant::now(),
            conn,
        });
        self.lru.insert(order, key);
        while self.len() > self.bounds.total {
            closed.extend(self.pop_least_recent());
        }
        closed
    }

    fn pop_least_recent(&mut self) -> Option<T> {
        let (order, key) = self.lru.pop_first()?;
        let list = self.by_hop.get_mut(&key)?;
        let at = list.iter().position(|i| i.order == order)?;
        let idle = list.remove(at);
        self.forget_if_empty(&key);
        Some(idle.conn)
    }

    fn forget_if_empty(&mut self, key: &str) {
        if self.by_hop.get(key).is_some_and(Vec::is_empty) {
            self.by_hop.remove(key);
        }
    }

    /// Drops every connection that `keep` refuses.
    fn retain(&mut self, keep: impl Fn(Instant, &T) -> bool) {
        let lru = &mut self.lru;
        self.by_hop.retain(|_, list| {
            list.retain(|i| {
                let kept = keep(i.since, &i.conn);
                if !kept {
                    lru.remove(&i.order);
                }
                kept
            });
            !list.is_empty()
        });
    }
}

/// The pool and the leases hold plain data (senders and their keys) that a panic elsewhere
/// cannot leave half-updated: a poisoned lock is taken over, never skipped (skipping would
/// leak every origin connection checked in afterwards).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A busy client connection's origin connection, returned to the pool when the lease is
/// dropped (the client went idle or left).
pub struct OriginLease {
    upstream: Arc<Upstream>,
    current: Mutex<Option<(String, Sender)>>,
}

impl OriginLease {
    pub fn new(upstream: Arc<Upstream>) -> OriginLease {
        OriginLease {
            upstream,
            current: Mutex::new(None),
        }
    }

    /// This connection's origin connection to `origin` if it is free, else a pooled one;
    /// with the `origin` key's allocation when it is the same origin as last time.
    fn take(&self, origin: &str) -> (Option<Sender>, Option<String>) {
        let mine = lock(&self.current).take();
        match mine {
            // Its previous response may be finishing this very moment: `send` waits for it.
            Some((o, s)) if o == origin && !s.is_closed() => return (Some(s), Some(o)),
            Some((o, _closed)) if o == origin => return (self.upstream.checkout(origin), Some(o)),
            Some((o, s)) => self.upstream.checkin(o, s),
            None => {}
        }
        (self.upstream.checkout(origin), None)
    }

    /// Sends `req` to `hop`; the response comes with the address of the connection it came
    /// on. A reused connection that turns out closed before the request was written is
    /// replaced by a new one, once.
    pub async fn send(
        &self,
        hop: NextHop<'_>,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<Incoming>, IpAddr), UpstreamError> {
        let mut req = req;
        let origin = hop.key();
        let (mut reused, key) = self.take(origin);
        loop {
            let fresh = reused.is_none();
            let mut sender = match reused.take() {
                Some(mut s) => match s.tx.ready().await {
                    Ok(()) => s,
                    Err(_) => continue,
                },
                // Boxed: connecting (DNS, TCP, handshake) is a large future that most
                // requests, on a kept connection, never run.
                None => Box::pin(self.upstream.connect(hop)).await?,
            };
            match sender.tx.try_send_request(req).await {
                Ok(resp) => {
                    let addr = sender.addr;
                    *lock(&self.current) = Some((key.unwrap_or_else(|| origin.to_string()), sender));
                    return Ok((resp, addr));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if !fresh => req = unsent,
                    _ => return Err(e.into_error().into()),
                },
            }
        }
    }
}

impl OriginLease {
    /// Closes the connection the last request used instead of keeping it: its answer could
    /// not be relayed, so where that answer ended (and the next one starts) is in doubt.
    pub fn discard(&self) {
        // The sender dropped here is the connection's last (a leased one is not pooled):
        // hyper closes it once the answer's body is dropped too.
        drop(lock(&self.current).take());
    }
}

impl Drop for OriginLease {
    fn drop(&mut self) {
        let current = self.current.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some((origin, sender)) = current.take() {
            self.upstream.checkin(origin, sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(per_host: usize, total: usize) -> IdlePool<u32> {
        IdlePool::new(IdleBounds { per_host, total })
    }

    fn any(_: Instant, _: &u32) -> bool {
        true
    }

    /// At the total the least recently returned connection closes, whichever next hop it
    /// leads to; the per-host bound still closes the newcomer.
    #[test]
    fn the_total_closes_the_least_recently_used() {
        let mut p = pool(2, 3);
        assert!(p.put("a".into(), 1, any).is_empty());
        assert!(p.put("b".into(), 2, any).is_empty());
        assert!(p.put("c".into(), 3, any).is_empty());
        assert_eq!(p.put("d".into(), 4, any), vec![1], "a's, the oldest, makes room");
        assert_eq!(p.len(), 3);
        // Taking b's and giving it back makes it the most recent: c's is the oldest now.
        assert_eq!(p.take("b", any), Some(2));
        assert!(p.put("b".into(), 2, any).is_empty());
        assert_eq!(p.put("e".into(), 5, any), vec![3], "c's was least recently used");
        assert_eq!(p.take("a", any), None, "a's is gone");
        assert_eq!(p.take("c", any), None, "c's is gone");
        assert_eq!(p.take("d", any), Some(4));
        // Per host: the third to one next hop is closed itself.
        let mut p = pool(2, 10);
        assert!(p.put("a".into(), 1, any).is_empty());
        assert!(p.put("a".into(), 2, any).is_empty());
        assert_eq!(p.put("a".into(), 3, any), vec![3]);
        assert_eq!(p.take("a", any), Some(2), "the most recent first");
    }

    #[test]
    fn dead_connections_leave_both_orders() {
        let mut p = pool(4, 4);
        for (k, c) in [("a", 1), ("a", 2), ("b", 3)] {
            assert!(p.put(k.into(), c, any).is_empty());
        }
        p.retain(|_, c| *c != 2);
        assert_eq!(p.len(), 2);
        assert_eq!(
            p.take("a", |_, c| *c != 1),
            None,
            "1 is unusable and dropped on the way"
        );
        assert_eq!(p.len(), 1);
        assert!(p.put("c".into(), 4, |_, c| *c != 3).is_empty());
        assert_eq!(p.take("b", any), Some(3), "b's list was not swept by c's put");
        // A full list makes room by dropping its dead entries, and keeps the newcomer; one
        // with room is not searched (the sweeper removes the dead there).
        let mut p = pool(2, 10);
        assert!(p.put("a".into(), 1, any).is_empty());
        assert!(p.put("a".into(), 2, any).is_empty());
        assert_eq!(
            p.put("a".into(), 3, |_, c| *c != 1),
            vec![1],
            "1 is dead: 3 takes its place"
        );
        assert_eq!(p.take("a", any), Some(3), "the newcomer was kept");
        let mut p = pool(3, 10);
        assert!(p.put("a".into(), 1, any).is_empty());
        assert!(
            p.put("a".into(), 2, |_, c| *c != 1).is_empty(),
            "room left: nothing searched"
        );
        assert_eq!(p.len(), 2);
        let mut none = pool(4, 0);
        assert_eq!(none.put("a".into(), 1, any), vec![1], "idle_total = 0 keeps none");
        assert_eq!(none.len(), 0);
    }
}
