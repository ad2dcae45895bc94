//! Connections to origins and parent proxies, pooled by next hop ([`NextHop::key`]). A busy
//! client connection holds a lease ([`OriginLease`]) on the connection its last request used
//! (a keep-alive client usually asks the same origin again: no pool lookup, no lock
//! contention, no hand-off to another task). The lease lapses when the client goes idle (the
//! connection module drops it with hyper's state, after a short linger) or leaves: the
//! connection goes back to a shared pool, where the next request to the same next hop finds
//! it. The pool keeps at most `idle_per_host` idle connections per next hop and closes the
//! rest, so idle connections are bounded per next hop (the parent, when one is used), never
//! one per idle client. Connects to origins go through the [`Policy`] (see
//! [`connect_checked`]); connects to a parent do not (see [`connect_parent`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;

use crate::config::Parent;
use crate::proxy::body::Counted;
use crate::proxy::connector::{ConnectError, connect_checked, connect_parent};
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
}

impl NextHop<'_> {
    /// The pool key: an origin's `host:port`, or the parent's key (which no `host:port`
    /// equals, so a parent and an origin at the same address never share connections).
    pub fn key(&self) -> &str {
        match self {
            NextHop::Origin { authority, .. } => authority,
            NextHop::Parent(p) => &p.pool_key,
        }
    }
}

impl std::fmt::Display for NextHop<'_> {
    /// How answers name it: `origin host:port` or `parent proxy host:port`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NextHop::Origin { authority, .. } => write!(f, "origin {authority}"),
            NextHop::Parent(p) => p.fmt(f),
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
    /// Idle connections kept per origin (`limits.idle_per_host`); one more is closed.
    per_host: usize,
    idle: Mutex<HashMap<String, Vec<(Instant, Sender)>>>,
}

impl Upstream {
    /// Also starts the sweeper that closes idle connections past `max_idle`; it stops when
    /// the `Upstream` is dropped.
    pub fn new(policy: Arc<Policy>, connect_timeout: Duration, max_idle: Duration, per_host: usize) -> Arc<Upstream> {
        let upstream = Arc::new(Upstream {
            policy,
            connect_timeout,
            max_idle,
            per_host,
            idle: Mutex::new(HashMap::new()),
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

    /// Drops idle connections past `max_idle` or closed by their origin.
    fn sweep(&self) {
        lock(&self.idle).retain(|_, list| {
            list.retain(|(since, s)| since.elapsed() < self.max_idle && !s.is_closed());
            !list.is_empty()
        });
    }

    fn checkout(&self, origin: &str) -> Option<Sender> {
        let mut idle = lock(&self.idle);
        let list = idle.get_mut(origin)?;
        while let Some((since, sender)) = list.pop() {
            if since.elapsed() < self.max_idle && sender.is_ready() {
                return Some(sender);
            }
        }
        None
    }

    fn checkin(&self, origin: String, sender: Sender) {
        if !sender.is_ready() {
            return;
        }
        let mut idle = lock(&self.idle);
        let list = idle.entry(origin).or_default();
        list.retain(|(since, s)| since.elapsed() < self.max_idle && !s.is_closed());
        if list.len() < self.per_host {
            list.push((Instant::now(), sender));
        }
        // Otherwise dropped here: the last sender of an idle connection closes it.
    }

    async fn connect(&self, hop: NextHop<'_>) -> Result<Sender, UpstreamError> {
        let stream = match hop {
            NextHop::Origin { host, port, .. } => {
                connect_checked(&self.policy, host, port, self.connect_timeout).await?
            }
            NextHop::Parent(p) => connect_parent(&p.host, p.port, self.connect_timeout).await?,
        };
        let addr = stream.peer_addr().map_err(ConnectError::Io)?.ip();
        let (tx, conn) = http1::Builder::new().handshake(TokioIo::new(stream)).await?;
        tokio::spawn(async move {
            // Ends when the origin closes, or when the last sender is dropped while idle.
            let _ = conn.await;
        });
        Ok(Sender { tx, addr })
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
