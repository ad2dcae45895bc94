//! Rate limits per client and per user (`[limits.per_client]`, `[limits.per_user]`): a token
//! bucket per key (a [`ClientKey`], or a user name) and limit, made when the key is first
//! seen and shared (`Arc`) by all of the key's connections, tunnels and response bodies, as
//! Squid's delay pools share one bucket among a client's transfers. Each bucket holds one
//! second's worth (the burst) and refills at the limit.
//!
//! - `requests_per_second`: one token a request, taken once the rules allowed it (the
//!   user is known then); none left: 429 with `Retry-After` (`rule=requests_per_second`).
//! - `bandwidth`: one token a byte, taken before bytes move ([`Pacer`]); none left: the
//!   transfer waits on a timer until the bucket holds a little again.
//!
//! The buckets belong to this process: at a handoff the next generation starts with full
//! buckets (a moved tunnel takes that generation's bucket of its key), so a client may get
//! one more second's burst per handoff; handing buckets over would cost a message per key
//! for a second's worth of bytes, and handoffs are rare.
//!
//! A bucket is a mutex over two numbers rather than a crate's limiter (`governor`'s GCRA is
//! one atomic, but admits a request whole or not at all): a transfer takes *up to* what it
//! could move and gives back what it did not, which `governor` cannot express, and one
//! bucket type serves both limits. Its lock is held for a few arithmetic operations, once a
//! request or once a splice; with no limit configured there is no bucket and nothing is
//! taken (an `Option` that is `None`).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use baton_handoff::Peer;
use http::StatusCode;

use crate::config::access::UserEntry;
use crate::config::{ConfigError, UserTable};
use crate::proxy::admission::ClientKey;
use crate::proxy::groups::Groups;
use crate::proxy::policy::{Denial, Rule};

/// Keys a map keeps before it looks for buckets to drop; it looks again each time it has
/// doubled since.
const FIRST_SWEEP: usize = 1024;
/// Beyond this many keys, a sweep also drops buckets that are not full yet (their keys get
/// a full one when they come back: one extra burst), as long as no transfer holds them.
const MAX_KEYS: usize = 1 << 16;

/// A token bucket: up to `rate` tokens (one second's worth), refilled at `rate` a second.
#[derive(Debug)]
pub struct Bucket {
    rate: f64,
    state: Mutex<Tokens>,
}

#[derive(Debug)]
struct Tokens {
    level: f64,
    at: Instant,
}

impl Bucket {
    fn new(rate: u64) -> Bucket {
        Bucket {
            rate: rate as f64,
            state: Mutex::new(Tokens {
                level: rate as f64,
                at: Instant::now(),
            }),
        }
    }

    /// The tokens, refilled up to now.
    fn refilled(&self) -> MutexGuard<'_, Tokens> {
        let mut t = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let earned = now.saturating_duration_since(t.at).as_secs_f64() * self.rate;
        t.level = (t.level + earned).min(self.rate);
        t.at = now;
        t
    }

    /// Takes up to `n` tokens (at least 1): `Ok` with how many, or `Err` with how long
    /// until a useful amount is back. A waiter waits for a fiftieth of a second's worth
    /// (or `n`, if less): a slow limit wakes it at most 50 times a second, not per byte.
    fn take(&self, n: u64) -> Result<u64, Duration> {
        let n = n.max(1);
        let mut t = self.refilled();
        let useful = (n as f64).min((self.rate / 50.0).max(1.0));
        if t.level >= useful {
            let granted = (t.level.floor() as u64).min(n);
            t.level -= granted as f64;
            return Ok(granted);
        }
        Err(Duration::from_secs_f64((useful - t.level) / self.rate))
    }

    /// Gives back tokens taken but not used.
    fn give_back(&self, n: u64) {
        if n > 0 {
            let mut t = self.refilled();
            t.level = (t.level + n as f64).min(self.rate);
        }
    }

    /// Full: a bucket made anew would behave the same, so it may be dropped.
    fn is_full(&self) -> bool {
        self.refilled().level >= self.rate
    }
}

/// The buckets of one limit, by key.
struct Keyed<K> {
    map: Mutex<KeyedMap<K>>,
}

struct KeyedMap<K> {
    buckets: HashMap<K, Arc<Bucket>>,
    next_sweep: usize,
}

impl<K: Hash + Eq> Keyed<K> {
    fn new() -> Keyed<K> {
        Keyed {
            map: Mutex::new(KeyedMap {
                buckets: HashMap::new(),
                next_sweep: FIRST_SWEEP,
            }),
        }
    }

    /// `key`'s bucket, made full at `rate` when it has none (looked up borrowed: a user
    /// name is copied only for a new bucket).
    fn get<Q>(&self, key: &Q, rate: u64) -> Arc<Bucket>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ToOwned<Owned = K> + ?Sized,
    {
        let mut m = self.map.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(b) = m.buckets.get(key) {
            return b.clone();
        }
        if m.buckets.len() >= m.next_sweep {
            m.sweep();
        }
        let b = Arc::new(Bucket::new(rate));
        m.buckets.insert(key.to_owned(), b.clone());
        b
    }

    fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(PoisonError::into_inner).buckets.len()
    }
}

impl<K> KeyedMap<K> {
    /// Drops the buckets nothing holds but this map that are full (nothing is lost: a new
    /// one would be the same); past [`MAX_KEYS`], those not full too. Amortised: the next
    /// sweep waits until the map has doubled.
    fn sweep(&mut self) {
        self.buckets.retain(|_, b| Arc::strong_count(b) > 1 || !b.is_full());
        if self.buckets.len() >= MAX_KEYS {
            self.buckets.retain(|_, b| Arc::strong_count(b) > 1);
        }
        self.next_sweep = (self.buckets.len() * 2).max(FIRST_SWEEP);
    }
}

/// A `limits.per_user` key resolved against the groups: each user's limit (0: none).
struct UserLimits {
    /// `limits.per_user.<name>`.
    key: &'static str,
    /// `"*"`: users the table does not name otherwise.
    anyone: Option<u64>,
    /// Users named, or members of a named group, with the entry that gave their limit.
    named: HashMap<String, (u64, String)>,
    buckets: Keyed<String>,
}

impl UserLimits {
    /// A user's own entry wins over their groups'; of several groups, the lowest limit
    /// (0 counts as none, the highest). A group the groups file lacks is an error.
    fn new(t: &UserTable, groups: &Groups, file: Option<&Path>) -> Result<UserLimits, ConfigError> {
        let mut named: HashMap<String, (u64, String)> = HashMap::new();
        let mut anyone = None;
        let lower = |a: u64, b: u64| if a == 0 || (b != 0 && b < a) { b } else { a };
        for (entry, n) in &t.entries {
            if let UserEntry::Group(g) = entry {
                let members = groups.members(g).ok_or_else(|| ConfigError::Invalid {
                    path: file.map_or_else(|| "[access] groups".into(), |f| f.display().to_string()),
                    message: format!(
                        "line {} of the configuration, key `{}` names @{g}, which this groups file does not define",
                        t.line, t.key
                    ),
                })?;
                for m in members {
                    let e = named.entry(m.clone()).or_insert((*n, format!("@{g}")));
                    if lower(e.0, *n) != e.0 {
                        *e = (*n, format!("@{g}"));
                    }
                }
            }
        }
        for (entry, n) in &t.entries {
            match entry {
                UserEntry::Any => anyone = Some(*n),
                UserEntry::User(u) => _ = named.insert(u.clone(), (*n, u.clone())),
                UserEntry::Group(_) => {}
            }
        }
        Ok(UserLimits {
            key: t.key,
            anyone,
            named,
            buckets: Keyed::new(),
        })
    }

    /// `user`'s limit and the entry that set it; `None`: no limit.
    fn of(&self, user: &str) -> Option<(u64, &str)> {
        let (n, why) = match self.named.get(user) {
            Some((n, why)) => (*n, why.as_str()),
            None => (self.anyone?, "*"),
        };
        (n > 0).then_some((n, why))
    }

    fn bucket(&self, user: &str) -> Option<Arc<Bucket>> {
        self.of(user).map(|(rate, _)| self.buckets.get(user, rate))
    }
}

/// A per-client limit: its value and its buckets.
struct ClientLimit {
    rate: u64,
    buckets: Keyed<ClientKey>,
}

impl ClientLimit {
    fn new(rate: Option<u64>) -> Option<ClientLimit> {
        rate.map(|rate| ClientLimit {
            rate,
            buckets: Keyed::new(),
        })
    }

    fn bucket(&self, key: &ClientKey) -> Arc<Bucket> {
        self.buckets.get(key, self.rate)
    }
}

/// One generation's limits and their buckets.
#[derive(Default)]
pub struct Limits {
    client_rps: Option<ClientLimit>,
    client_bandwidth: Option<ClientLimit>,
    user_rps: Option<UserLimits>,
    user_bandwidth: Option<UserLimits>,
}

impl Limits {
    /// The limits `config` sets; `groups_file`: `[access] groups`, read if a table names
    /// a group.
    pub fn new(config: &crate::config::Limits, groups_file: Option<&Path>) -> Result<Limits, ConfigError> {
        let users = &config.per_user;
        let tables = [&users.requests_per_second, &users.bandwidth];
        let names_group = tables
            .iter()
            .filter_map(|t| t.as_ref())
            .any(|t| t.entries.iter().any(|(e, _)| matches!(e, UserEntry::Group(_))));
        let groups = match groups_file {
            Some(path) if names_group => Groups::load(path)?,
            _ => Groups::default(),
        };
        let user = |t: &Option<UserTable>| t.as_ref().map(|t| UserLimits::new(t, &groups, groups_file)).transpose();
        Ok(Limits {
            client_rps: ClientLimit::new(config.per_client.requests_per_second),
            client_bandwidth: ClientLimit::new(config.per_client.bandwidth),
            user_rps: user(&users.requests_per_second)?,
            user_bandwidth: user(&users.bandwidth)?,
        })
    }

    /// One request of `peer`'s, as `user`: within the request rates, or a 429 that names
    /// the key and the limit, with the time until a token is back.
    pub fn check_request(&self, peer: &Peer, user: Option<&str>) -> Result<(), Denial> {
        let over = |who: String, key: &str, rate: u64, wait: Duration| Denial {
            status: StatusCode::TOO_MANY_REQUESTS,
            reason: format!("{who} is over {key} = {rate}: try again later"),
            rule: Rule::RequestsPerSecond,
            retry_after: Some(wait),
        };
        let mut taken = None;
        if let Some(l) = &self.client_rps {
            let key = ClientKey::of(peer);
            let bucket = l.bucket(&key);
            if let Err(wait) = bucket.take(1) {
                let key_name = "limits.per_client.requests_per_second";
                return Err(over(format!("client {key}"), key_name, l.rate, wait));
            }
            taken = Some(bucket);
        }
        let (Some(l), Some(user)) = (&self.user_rps, user) else {
            return Ok(());
        };
        let Some((rate, why)) = l.of(user) else { return Ok(()) };
        if let Err(wait) = l.buckets.get(user, rate).take(1) {
            // The request does not go through: the client's token was not used.
            taken.inspect(|b| b.give_back(1));
            let who = match why {
                "*" => format!("user {user}"),
                entry => format!("user {user} ({entry})"),
            };
            return Err(over(who, l.key, rate, wait));
        }
        Ok(())
    }

    /// The bandwidth buckets a transfer of `peer`'s, as `user`, takes from; `None`: no
    /// bandwidth limit applies to it.
    pub fn throttle(&self, peer: &Peer, user: Option<&str>) -> Option<Throttle> {
        let client = self.client_bandwidth.as_ref().map(|l| l.bucket(&ClientKey::of(peer)));
        let user = self.user_bandwidth.as_ref().zip(user).and_then(|(l, u)| l.bucket(u));
        (client.is_some() || user.is_some()).then_some(Throttle { client, user })
    }

    /// The limits `config` sets, a line each, as `baton check` prints them.
    pub fn listing(config: &crate::config::Limits) -> Vec<String> {
        let c = &config.per_client;
        let mut lines = Vec::new();
        for (key, v, unit) in [
            ("requests_per_second", c.requests_per_second, ""),
            ("bandwidth", c.bandwidth, " bytes/s"),
        ] {
            if let Some(n) = v {
                lines.push(format!("per client: {key} = {n}{unit}"));
            }
        }
        let u = &config.per_user;
        for t in [&u.requests_per_second, &u.bandwidth].into_iter().flatten() {
            let entries: Vec<String> = t
                .entries
                .iter()
                .map(|(who, n)| {
                    let who = match who {
                        UserEntry::Any => "*".to_string(),
                        UserEntry::User(name) => name.clone(),
                        UserEntry::Group(g) => format!("@{g} (each member)"),
                    };
                    if *n == 0 {
                        format!("{who}: none")
                    } else {
                        format!("{who}: {n}")
                    }
                })
                .collect();
            lines.push(format!("{}: {}", t.key, entries.join(", ")));
        }
        lines
    }

    /// Buckets kept, for tests.
    pub fn keys(&self) -> usize {
        let client = [&self.client_rps, &self.client_bandwidth];
        let user = [&self.user_rps, &self.user_bandwidth];
        client
            .iter()
            .filter_map(|l| l.as_ref())
            .map(|l| l.buckets.len())
            .sum::<usize>()
            + user
                .iter()
                .filter_map(|l| l.as_ref())
                .map(|l| l.buckets.len())
                .sum::<usize>()
    }
}

/// The bandwidth buckets of one transfer: its client's and its user's (either may be
/// absent, not both).
#[derive(Debug, Clone)]
pub struct Throttle {
    client: Option<Arc<Bucket>>,
    user: Option<Arc<Bucket>>,
}

impl Throttle {
    /// Up to `n` bytes' worth from every bucket (what the emptiest allows), or how long to
    /// wait for it.
    fn take(&self, n: u64) -> Result<u64, Duration> {
        let mut granted = n;
        if let Some(c) = &self.client {
            granted = c.take(granted)?;
        }
        if let Some(u) = &self.user {
            match u.take(granted) {
                Ok(g) => {
                    if let Some(c) = &self.client {
                        c.give_back(granted - g);
                    }
                    granted = g;
                }
                Err(wait) => {
                    if let Some(c) = &self.client {
                        c.give_back(granted);
                    }
                    return Err(wait);
                }
            }
        }
        Ok(granted)
    }

    fn give_back(&self, n: u64) {
        for b in [&self.client, &self.user].into_iter().flatten() {
            b.give_back(n);
        }
    }
}

/// One direction of a transfer under a [`Throttle`]: bytes are taken before they move,
/// and when none are left the transfer waits on a timer (never a busy loop).
#[derive(Debug)]
pub struct Pacer {
    throttle: Throttle,
    /// Set while waiting for the buckets to refill; kept for the next wait.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: bool,
}

impl Pacer {
    pub fn new(throttle: Throttle) -> Pacer {
        Pacer {
            throttle,
            timer: None,
            waiting: false,
        }
    }

    /// How many of `n` bytes may move now (at least 1); `Pending` until then, with `cx`
    /// woken by a timer. Give back what did not move ([`Pacer::give_back`]).
    pub fn poll_take(&mut self, cx: &mut Context<'_>, n: usize) -> Poll<usize> {
        loop {
            if self.waiting {
                if let Some(t) = self.timer.as_mut() {
                    ready!(t.as_mut().poll(cx));
                }
                self.waiting = false;
            }
            match self.throttle.take(n as u64) {
                Ok(g) => return Poll::Ready(g as usize),
                Err(wait) => {
                    let deadline = tokio::time::Instant::now() + wait;
                    match self.timer.as_mut() {
                        Some(t) => t.as_mut().reset(deadline),
                        None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
                    }
                    self.waiting = true;
                }
            }
        }
    }

    /// Bytes taken that did not move.
    pub fn give_back(&self, n: usize) {
        self.throttle.give_back(n as u64);
    }
}

#[cfg(test)]
mod tests;
