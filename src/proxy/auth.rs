//! Basic proxy authentication against an htpasswd file (bcrypt hashes only), with the bcrypt
//! work bounded so that failed logins are neither a timing oracle nor a CPU lever:
//!
//! - an unknown user is verified against the file's most expensive hash, so it costs what a
//!   known user with a wrong password costs (a fixed dummy hash of another cost would tell
//!   the two apart, ~100× with `htpasswd -B`'s default cost 5 against a cost-12 dummy);
//! - at most one verification per CPU runs at once (the rest queue);
//! - each client may fail `auth_failures` times a minute; beyond that it gets 429 with
//!   `Retry-After` and no bcrypt runs for it until the minute is over;
//! - verified credentials are remembered (by SHA-256 of the header), so bcrypt runs once per
//!   client, not once per request.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use base64::Engine as _;
use http::HeaderMap;
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::config::ConfigError;

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
    verified: Mutex<HashSet<[u8; 32]>>,
    failures: Mutex<HashMap<IpAddr, (Instant, u32)>>,
    bcrypt_slots: Arc<Semaphore>,
}

/// The caches and counters hold plain data that a panic elsewhere cannot leave
/// half-updated: a poisoned lock is taken over, not skipped.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Auth {
    /// Loads `path`; `budget` failed logins per client per minute (0: no limit).
    pub fn load(path: &Path, budget: u32) -> Result<Auth, ConfigError> {
        let users = load_htpasswd(path)?;
        let dummy = users.values().max_by_key(|h| bcrypt_cost(h)).cloned();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Auth {
            users,
            dummy,
            budget,
            verified: Mutex::new(HashSet::new()),
            failures: Mutex::new(HashMap::new()),
            bcrypt_slots: Arc::new(Semaphore::new(cpus)),
        })
    }

    /// Checks `Proxy-Authorization` from `client`. Returns the user.
    pub async fn check(&self, headers: &HeaderMap, client: Option<IpAddr>) -> Result<String, Refusal> {
        use Refusal::Unauthenticated;
        let value = headers
            .get(http::header::PROXY_AUTHORIZATION)
            .ok_or(Unauthenticated("proxy authentication required"))?;
        let (user, password) =
            parse_basic(value.as_bytes()).ok_or(Unauthenticated("malformed Proxy-Authorization (Basic expected)"))?;
        let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        if lock(&self.verified).contains(&key) {
            return Ok(user);
        }
        if let Some(wait) = client.and_then(|c| self.over_budget(c)) {
            return Err(Refusal::OverBudget(wait));
        }
        if !self.verify(&user, password).await {
            if let Some(c) = client {
                self.count_failure(c);
            }
            return Err(Unauthenticated("invalid proxy credentials"));
        }
        let mut verified = lock(&self.verified);
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(key);
        Ok(user)
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
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        ok && known.is_some()
    }

    /// How long `client` must wait, when it used up its budget.
    fn over_budget(&self, client: IpAddr) -> Option<Duration> {
        if self.budget == 0 {
            return None;
        }
        let failures = lock(&self.failures);
        let (since, count) = failures.get(&client)?;
        let left = BUDGET_WINDOW.checked_sub(since.elapsed())?;
        (*count >= self.budget).then_some(left)
    }

    fn count_failure(&self, client: IpAddr) {
        if self.budget == 0 {
            return;
        }
        let mut failures = lock(&self.failures);
        if failures.len() >= FAILURE_CLIENTS {
            failures.retain(|_, (since, _)| since.elapsed() < BUDGET_WINDOW);
            if failures.len() >= FAILURE_CLIENTS {
                failures.clear();
            }
        }
        let entry = failures.entry(client).or_insert((Instant::now(), 0));
        if entry.0.elapsed() >= BUDGET_WINDOW {
            *entry = (Instant::now(), 0);
        }
        entry.1 += 1;
    }
}

/// The cost of a bcrypt hash (`$2b$05$...` → 5); 0 when unreadable.
fn bcrypt_cost(hash: &str) -> u32 {
    hash.get(4..6).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// `user:hash` lines (bcrypt: `htpasswd -B`); `#` comments and blank lines are skipped.
fn load_htpasswd(path: &Path) -> Result<HashMap<String, String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
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
        std::fs::write(&path, format!("alice:{}\n", bcrypt::hash("right", 4).unwrap())).unwrap();
        let auth = Auth::load(&path, 2).unwrap();
        let header = |user: &str, pw: &str| {
            let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pw}"));
            let mut h = HeaderMap::new();
            h.insert(
                http::header::PROXY_AUTHORIZATION,
                format!("Basic {token}").parse().unwrap(),
            );
            h
        };
        let client = Some("127.0.0.9".parse().unwrap());
        for _ in 0..2 {
            let r = auth.check(&header("alice", "wrong"), client).await;
            assert_eq!(r, Err(Refusal::Unauthenticated("invalid proxy credentials")));
        }
        let r = auth.check(&header("alice", "right"), client).await;
        assert!(matches!(r, Err(Refusal::OverBudget(d)) if d <= BUDGET_WINDOW), "{r:?}");
        let other = Some("127.0.0.10".parse().unwrap());
        assert_eq!(auth.check(&header("alice", "right"), other).await, Ok("alice".into()));
        assert_eq!(
            auth.check(&header("nobody", "right"), other).await,
            Err(Refusal::Unauthenticated("invalid proxy credentials"))
        );
    }
}
