//! Basic proxy authentication against an htpasswd file (bcrypt hashes only), with the bcrypt
//! work bounded so that failed logins are neither a timing oracle nor a CPU lever:
//!
//! - an unknown user is verified against the file's most expensive hash, so it costs what a
//!   known user with a wrong password costs (a fixed dummy hash of another cost would tell
//!   the two apart, ~100× with `htpasswd -B`'s default cost 5 against a cost-12 dummy);
//! - at most one verification per CPU runs at once (the rest queue);
//! - each client may run bcrypt for `auth_failures` failed logins a minute: a verification
//!   takes its place in the budget *before* bcrypt runs (a success gives it back), so
//!   parallel attempts cannot overrun it; beyond it the client gets 429 with `Retry-After`
//!   and no bcrypt runs for it until the minute is over. A client is an IPv4 address, an
//!   IPv6 /64 (what one host, or one customer of a provider, commonly holds), or, for every
//!   client of a Unix-socket listener together, the socket (no per-client identity there);
//! - verified credentials are remembered by a keyed hash (HMAC-SHA-256, a random key per
//!   process) of the decoded `user:password`, so bcrypt runs once per credentials, not once
//!   per request or per spelling of the header; the password itself is never kept.

use std::collections::{HashMap, HashSet};
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderMap;
use ring::hmac;
use tokio::sync::Semaphore;

use crate::config::{ConfigError, check_secret_mode};
use crate::proxy::metrics;

/// Remembered verified credentials, at most; a flood of distinct good logins cannot grow it.
const VERIFIED_CACHE: usize = 4096;
/// Clients whose failures are counted, at most; expired entries go first when it is full.
const FAILURE_CLIENTS: usize = 65536;
/// The window of the failure budget.
const BUDGET_WINDOW: Duration = Duration::from_secs(60);

/// Why a login was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No credentials, malformed ones, or wrong ones: 407 with the challenge.
    Unauthenticated(&'static str),
    /// The client used up its failure budget: 429, retry after the duration.
    OverBudget(Duration),
}

pub struct Auth {
    users: HashMap<String, String>,
    /// The hash an unknown user is checked against: the file's most expensive one.
    dummy: Option<String>,
    /// Failed logins allowed per client per minute; 0: no limit.
    budget: u32,
    /// Verified credentials, by [`Auth::cache_key`].
    verified: Mutex<HashSet<[u8; 32]>>,
    /// The cache's key, random per process: the cache holds no unkeyed hash of a password.
    cache_key: hmac::Key,
    /// Per client: when its window began, and the bcrypt runs it reserved in it that did not
    /// succeed (in progress or failed).
    failures: Mutex<HashMap<Client, (Instant, u32)>>,
    bcrypt_slots: Arc<Semaphore>,
}

/// Whom a failed-login budget belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Client {
    V4(Ipv4Addr),
    /// An IPv6 client's /64: a host is commonly given a whole /64, so one budget per address
    /// would give it 2^64 budgets.
    V6Net(u64),
    /// Every client of the Unix-socket listeners: they share one budget.
    Local,
}

impl Client {
    /// The budget of a client at `ip` (IPv4-mapped IPv6 addresses already made IPv4 by the
    /// caller), or of a Unix-socket client (`None`).
    pub fn of(ip: Option<IpAddr>) -> Client {
        match ip {
            None => Client::Local,
            Some(IpAddr::V4(v4)) => Client::V4(v4),
            Some(IpAddr::V6(v6)) => Client::V6Net((v6.to_bits() >> 64) as u64),
        }
    }
}

/// The caches and counters hold plain data that a panic elsewhere cannot leave
/// half-updated: a poisoned lock is taken over, not skipped.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Auth {
    /// Loads `path`; `budget` failed logins per client per minute (0: no limit).
    /// `readable_by_others`: `secrets_readable_by_others` (else a file others may read is
    /// refused: its hashes could be cracked offline).
    pub fn load(path: &Path, budget: u32, readable_by_others: bool) -> Result<Auth, ConfigError> {
        let users = load_htpasswd(path, readable_by_others)?;
        let dummy = users.values().max_by_key(|h| bcrypt_cost(h)).cloned();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rng = ring::rand::SystemRandom::new();
        let cache_key = hmac::Key::generate(hmac::HMAC_SHA256, &rng).map_err(|_| ConfigError::Invalid {
            path: path.display().to_string(),
            message: "no random bytes for the credential cache's key".to_string(),
        })?;
        Ok(Auth {
            users,
            dummy,
            budget,
            verified: Mutex::new(HashSet::new()),
            cache_key,
            failures: Mutex::new(HashMap::new()),
            bcrypt_slots: Arc::new(Semaphore::new(cpus)),
        })
    }

    /// Checks `Proxy-Authorization` from `client`. Returns the user.
    pub async fn check(&self, headers: &HeaderMap, client: Client) -> Result<String, Refusal> {
        use Refusal::Unauthenticated;
        let value = headers
            .get(http::header::PROXY_AUTHORIZATION)
            .ok_or(Unauthenticated("proxy authentication required"))?;
        let (user, password) =
            parse_basic(value.as_bytes()).ok_or(Unauthenticated("malformed Proxy-Authorization (Basic expected)"))?;
        let key = self.cache_key(&user, &password);
        if lock(&self.verified).contains(&key) {
            return Ok(user);
        }
        let reservation = self.reserve(client)?;
        if !self.verify(&user, password).await {
            return Err(Unauthenticated("invalid proxy credentials"));
        }
        self.give_back(client, reservation);
        let mut verified = lock(&self.verified);
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(key);
        Ok(user)
    }

    /// The credential cache's key for `user:password`: keyed, so the cache holds nothing a
    /// password could be guessed from offline.
    fn cache_key(&self, user: &str, password: &str) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.cache_key);
        ctx.update(user.as_bytes());
        ctx.update(b":");
        ctx.update(password.as_bytes());
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.sign().as_ref());
        key
    }

    /// Whether `user` is in the file (a moved tunnel's user must still be; its password
    /// was checked when the tunnel opened and is not kept).
    pub fn knows(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    /// bcrypt, off the runtime's worker threads and at most one per CPU at once. An unknown
    /// user costs the same as a known one.
    async fn verify(&self, user: &str, password: String) -> bool {
        let known = self.users.get(user);
        let Some(hash) = known.or(self.dummy.as_ref()).cloned() else {
            return false;
        };
        let Ok(_slot) = self.bcrypt_slots.acquire().await else {
            return false;
        };
        metrics::get().auth_checks.inc();
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        ok && known.is_some()
    }

    /// Takes one bcrypt run from `client`'s budget before it runs, so that attempts in
    /// parallel cannot all pass a check made before any of them failed. Returns the window
    /// the reservation belongs to (for [`Auth::give_back`]), or how long to wait.
    fn reserve(&self, client: Client) -> Result<Option<Instant>, Refusal> {
        if self.budget == 0 {
            return Ok(None);
        }
        let mut failures = lock(&self.failures);
        if failures.len() >= FAILURE_CLIENTS && !failures.contains_key(&client) {
            failures.retain(|_, (since, _)| since.elapsed() < BUDGET_WINDOW);
            if failures.len() >= FAILURE_CLIENTS {
                failures.clear();
            }
        }
        let entry = failures.entry(client).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= BUDGET_WINDOW {
            *entry = (Instant::now(), 0);
        }
        if entry.1 >= self.budget {
            let left = BUDGET_WINDOW.saturating_sub(entry.0.elapsed());
            return Err(Refusal::OverBudget(left));
        }
        entry.1 += 1;
        Ok(Some(entry.0))
    }

    /// A login that succeeded gives its reservation back (if its window is still the
    /// client's): only failures use up the budget.
    fn give_back(&self, client: Client, reservation: Option<Instant>) {
        let Some(window) = reservation else {
            return;
        };
        if let Some((since, count)) = lock(&self.failures).get_mut(&client)
            && *since == window
        {
            *count = count.saturating_sub(1);
        }
    }
}

/// The cost of a bcrypt hash (`$2b$05$...` → 5); 0 when unreadable.
fn bcrypt_cost(hash: &str) -> u32 {
    hash.get(4..6).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// `user:hash` lines (bcrypt: `htpasswd -B`); `#` comments and blank lines are skipped.
fn load_htpasswd(path: &Path, readable_by_others: bool) -> Result<HashMap<String, String>, ConfigError> {
    let read_error = |source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    };
    // The mode of the file read, not of whatever the path names a moment later.
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode();
    check_secret_mode(path, mode, readable_by_others).map_err(|message| ConfigError::Invalid {
        path: path.display().to_string(),
        message,
    })?;
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(read_error)?;
    let mut users = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = |why: &str| ConfigError::Invalid {
            path: path.display().to_string(),
            message: format!("line {}: {why}", i + 1),
        };
        let (user, hash) = line.split_once(':').ok_or_else(|| bad("expected user:hash"))?;
        if !["$2a$", "$2b$", "$2y$"].iter().any(|p| hash.starts_with(p)) {
            return Err(bad("only bcrypt hashes are accepted (htpasswd -B)"));
        }
        users.insert(user.to_string(), hash.to_string());
    }
    Ok(users)
}

fn parse_basic(value: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, token) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD.decode(token.trim()).ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `alice` with password `right`, mode 0600.
    fn write_htpasswd(path: &Path) {
        std::fs::write(path, format!("alice:{}\n", bcrypt::hash("right", 4).unwrap())).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn basic_credentials_parse() {
        assert_eq!(parse_basic(b"Basic dXNlcjpwYXNz"), Some(("user".into(), "pass".into())));
        assert_eq!(parse_basic(b"Bearer x"), None);
    }

    #[test]
    fn cost_is_read_from_the_hash() {
        assert_eq!(bcrypt_cost("$2b$05$abcdefghijklmnopqrstuu"), 5);
        assert_eq!(bcrypt_cost("$2y$12$abcdefghijklmnopqrstuu"), 12);
        assert_eq!(bcrypt_cost("x"), 0);
    }

    #[tokio::test]
    async fn failures_beyond_the_budget_are_refused_without_bcrypt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        write_htpasswd(&path);
        let auth = Auth::load(&path, 2, false).unwrap();
        let header = |user: &str, pw: &str| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
            let mut h = HeaderMap::new();
            h.insert(
                http::header::PROXY_AUTHORIZATION,
                format!("Basic {token}").parse().unwrap(),
            );
            h
        };
        let client = Client::of(Some("127.0.0.9".parse().unwrap()));
        for _ in 0..2 {
            let r = auth.check(&header("alice", "wrong"), client).await;
            assert_eq!(r, Err(Refusal::Unauthenticated("invalid proxy credentials")));
        }
        let r = auth.check(&header("alice", "right"), client).await;
        assert!(matches!(r, Err(Refusal::OverBudget(d)) if d <= BUDGET_WINDOW), "{r:?}");
        let other = Client::of(Some("127.0.0.10".parse().unwrap()));
        assert_eq!(auth.check(&header("alice", "right"), other).await, Ok("alice".into()));
        assert_eq!(
            auth.check(&header("nobody", "right"), other).await,
            Err(Refusal::Unauthenticated("invalid proxy credentials"))
        );
    }

    #[test]
    fn ipv6_clients_are_budgeted_per_64() {
        let of = |ip: &str| Client::of(Some(ip.parse().unwrap()));
        assert_eq!(of("2001:db8:1:2::1"), of("2001:db8:1:2:ffff:ffff:ffff:ffff"), "one /64");
        assert_ne!(of("2001:db8:1:2::1"), of("2001:db8:1:3::1"), "the next /64");
        assert_ne!(of("127.0.0.1"), of("127.0.0.2"), "IPv4: per address");
        assert_eq!(Client::of(None), Client::Local, "Unix-socket clients share one budget");
    }

    #[tokio::test]
    async fn parallel_failures_cannot_overrun_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        write_htpasswd(&path);
        let auth = Arc::new(Auth::load(&path, 3, false).unwrap());
        let token = base64::engine::general_purpose::STANDARD.encode("alice:wrong");
        let mut h = HeaderMap::new();
        h.insert(
            http::header::PROXY_AUTHORIZATION,
            format!("Basic {token}").parse().unwrap(),
        );
        let client = Client::of(Some("127.0.0.9".parse().unwrap()));
        let tries: Vec<_> = (0..20)
            .map(|_| {
                let (auth, h) = (auth.clone(), h.clone());
                tokio::spawn(async move { auth.check(&h, client).await })
            })
            .collect();
        let mut over = 0;
        for t in tries {
            over += usize::from(matches!(t.await.unwrap(), Err(Refusal::OverBudget(_))));
        }
        assert_eq!(
            over, 17,
            "3 of 20 parallel failures may run bcrypt, the rest are refused first"
        );
    }

    #[test]
    fn an_htpasswd_others_may_read_is_refused_unless_allowed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("htpasswd");
        write_htpasswd(&path);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Auth::load(&path, 0, false).err().expect("0644 is refused").to_string();
        assert!(
            err.contains("mode 0644") && err.contains("secrets_readable_by_others"),
            "{err}"
        );
        assert!(Auth::load(&path, 0, true).is_ok(), "the key allows it");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert!(Auth::load(&path, 0, false).is_ok(), "group read is allowed");
    }
}
