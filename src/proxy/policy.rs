//! Access policy: who may use the proxy (client CIDRs, Basic proxy authentication) and where
//! it may go (CONNECT ports, host names, destination CIDRs checked on the *resolved*
//! addresses, never the proxy's own listeners). Every refusal names the rule that decided.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Mutex, OnceLock};

use base64::Engine as _;
use http::{HeaderMap, StatusCode};

use sha2::{Digest, Sha256};

use crate::config::{Access, ConfigError};

/// A refusal: the status, a one-line reason for the client and the log, and the rule.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct Denial {
    pub status: StatusCode,
    pub reason: String,
    pub rule: Rule,
}

/// The configuration rule that decided a refusal; `as_str` is its key, as logged (`rule=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    AllowClients,
    Htpasswd,
    ConnectPorts,
    DenyHosts,
    DenyDestinations,
    AllowDestinations,
    /// The destination is one of the proxy's own listeners.
    Loop,
}

impl Rule {
    pub fn as_str(self) -> &'static str {
        match self {
            Rule::AllowClients => "allow_clients",
            Rule::Htpasswd => "htpasswd",
            Rule::ConnectPorts => "connect_ports",
            Rule::DenyHosts => "deny_hosts",
            Rule::DenyDestinations => "deny_destinations",
            Rule::AllowDestinations => "allow_destinations",
            Rule::Loop => "loop",
        }
    }
}

fn deny(status: StatusCode, rule: Rule, reason: String) -> Denial {
    Denial { status, reason, rule }
}

/// The cache stays consistent whatever panicked while holding it (a set of hashes): a
/// poisoned lock is taken over, not skipped.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A bcrypt hash verified for unknown users, so that the time taken does not tell whether a
/// user exists.
static DUMMY_HASH: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| bcrypt::hash("baton-no-such-user", bcrypt::DEFAULT_COST).unwrap_or_default());
/// Verified credentials are remembered (by SHA-256 of the header) so bcrypt runs once per
/// client, not once per request; bounded so a flood of distinct good logins cannot grow it.
const VERIFIED_CACHE: usize = 4096;

struct Auth {
    users: HashMap<String, String>,
    challenge: String,
    verified: Mutex<HashSet<[u8; 32]>>,
}

pub struct Policy {
    access: Access,
    auth: Option<Auth>,
    /// The proxy's own listen addresses: a destination among them is a loop.
    own: OnceLock<Vec<SocketAddr>>,
}

impl Policy {
    pub fn new(access: Access) -> Result<Policy, ConfigError> {
        let auth = match &access.htpasswd {
            None => None,
            Some(path) => Some(Auth {
                users: load_htpasswd(path)?,
                challenge: format!("Basic realm=\"{}\"", access.realm),
                verified: Mutex::new(HashSet::new()),
            }),
        };
        Ok(Policy {
            access,
            auth,
            own: OnceLock::new(),
        })
    }

    /// Records the proxy's own listen addresses (known once the listeners are open).
    pub fn set_own_addresses(&self, addrs: Vec<SocketAddr>) {
        let _ = self.own.set(addrs);
    }

    pub fn check_client(&self, ip: IpAddr) -> Result<(), Denial> {
        let ip = canonical(ip);
        if self.access.allow_clients.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        Err(deny(
            StatusCode::FORBIDDEN,
            Rule::AllowClients,
            format!("client {ip} is not allowed to use this proxy"),
        ))
    }

    /// Whether requests need `Proxy-Authorization` (an htpasswd file is configured).
    pub fn requires_auth(&self) -> bool {
        self.auth.is_some()
    }

    /// Checks `Proxy-Authorization` when authentication is configured. Returns the user.
    pub async fn check_auth(&self, headers: &HeaderMap) -> Result<Option<String>, Denial> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        let missing = |why: &str| {
            deny(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                Rule::Htpasswd,
                why.to_string(),
            )
        };
        let value = headers
            .get(http::header::PROXY_AUTHORIZATION)
            .ok_or_else(|| missing("proxy authentication required"))?;
        let (user, password) =
            parse_basic(value.as_bytes()).ok_or_else(|| missing("malformed Proxy-Authorization (Basic expected)"))?;
        let key: [u8; 32] = Sha256::digest(value.as_bytes()).into();
        if lock(&auth.verified).contains(&key) {
            return Ok(Some(user));
        }
        let hash = auth.users.get(&user).cloned();
        let known = hash.is_some();
        let hash = hash.unwrap_or_else(|| DUMMY_HASH.clone());
        // bcrypt is slow on purpose: keep it off the runtime's worker threads.
        let ok = tokio::task::spawn_blocking(move || bcrypt::verify(password, &hash).unwrap_or(false))
            .await
            .unwrap_or(false);
        if !(ok && known) {
            return Err(missing("invalid proxy credentials"));
        }
        let mut verified = lock(&auth.verified);
        if verified.len() >= VERIFIED_CACHE {
            verified.clear();
        }
        verified.insert(key);
        Ok(Some(user))
    }

    /// The `Proxy-Authenticate` challenge to send with a 407.
    pub fn challenge(&self) -> Option<&str> {
        self.auth.as_ref().map(|a| a.challenge.as_str())
    }

    pub fn check_connect_port(&self, port: u16) -> Result<(), Denial> {
        if self.access.connect_ports.contains(&port) {
            return Ok(());
        }
        Err(deny(
            StatusCode::FORBIDDEN,
            Rule::ConnectPorts,
            format!("CONNECT to port {port} is not allowed"),
        ))
    }

    fn check_host(&self, host: &str) -> Result<(), Denial> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        for pattern in &self.access.deny_hosts {
            let hit = match pattern.strip_prefix("*.") {
                Some(suffix) => host == suffix || host.ends_with(&format!(".{suffix}")),
                None => host == *pattern,
            };
            if hit {
                return Err(deny(
                    StatusCode::FORBIDDEN,
                    Rule::DenyHosts,
                    format!("host {host} is denied ({pattern})"),
                ));
            }
        }
        Ok(())
    }

    fn check_address(&self, addr: SocketAddr) -> Result<(), Denial> {
        let ip = canonical(addr.ip());
        let own = self.own.get().map(Vec::as_slice).unwrap_or(&[]);
        let is_self = own.iter().any(|o| {
            o.port() == addr.port()
                && (o.ip() == ip || (o.ip().is_unspecified() && (ip.is_loopback() || ip.is_unspecified())))
        });
        if is_self {
            return Err(deny(
                StatusCode::FORBIDDEN,
                Rule::Loop,
                format!("destination {addr} is this proxy"),
            ));
        }
        if let Some(net) = self.access.deny_destinations.iter().find(|n| n.contains(&ip)) {
            return Err(deny(
                StatusCode::FORBIDDEN,
                Rule::DenyDestinations,
                format!("destination {ip} is denied ({net})"),
            ));
        }
        if !self.access.allow_destinations.is_empty() && !self.access.allow_destinations.iter().any(|n| n.contains(&ip))
        {
            return Err(deny(
                StatusCode::FORBIDDEN,
                Rule::AllowDestinations,
                format!("destination {ip} is not in allow_destinations"),
            ));
        }
        Ok(())
    }

    /// Resolves `host` and checks every address it yields: a name cannot smuggle a denied
    /// address in, and the caller connects only to the addresses checked here (no second
    /// lookup that DNS could answer differently).
    pub async fn resolve_checked(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, ResolveError> {
        self.check_host(host).map_err(ResolveError::Denied)?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((bare, port))
                .await
                .map_err(|e| ResolveError::Lookup(format!("cannot resolve {bare}: {e}")))?
                .collect(),
        };
        if addrs.is_empty() {
            return Err(ResolveError::Lookup(format!("{bare} has no address")));
        }
        for a in &addrs {
            self.check_address(*a).map_err(ResolveError::Denied)?;
        }
        Ok(addrs)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("{0}")]
    Denied(Denial),
    #[error("{0}")]
    Lookup(String),
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(f: impl FnOnce(&mut Access)) -> Policy {
        let mut a = crate::config::Config::load(None).unwrap().access;
        f(&mut a);
        Policy::new(a).unwrap()
    }

    #[tokio::test]
    async fn names_cannot_smuggle_denied_addresses() {
        let p = policy(|a| a.deny_destinations = vec!["127.0.0.0/8".parse().unwrap()]);
        let err = p.resolve_checked("localhost", 80).await.unwrap_err();
        assert!(
            matches!(err, ResolveError::Denied(d) if d.rule == Rule::DenyDestinations || d.rule == Rule::AllowDestinations)
        );
    }

    #[tokio::test]
    async fn own_listener_is_a_loop() {
        let p = policy(|_| {});
        p.set_own_addresses(vec!["127.0.0.1:3128".parse().unwrap()]);
        let err = p.resolve_checked("127.0.0.1", 3128).await.unwrap_err();
        assert!(matches!(err, ResolveError::Denied(d) if d.rule == Rule::Loop));
        assert!(p.resolve_checked("127.0.0.1", 3129).await.is_ok());
    }

    #[test]
    fn host_patterns() {
        let p = policy(|a| a.deny_hosts = vec!["*.internal".into(), "exact.org".into()]);
        assert!(p.check_host("a.b.internal").is_err());
        assert!(p.check_host("internal").is_err());
        assert!(p.check_host("EXACT.org.").is_err());
        assert!(p.check_host("notinternal").is_ok());
    }

    #[test]
    fn basic_credentials_parse() {
        assert_eq!(parse_basic(b"Basic dXNlcjpwYXNz"), Some(("user".into(), "pass".into())));
        assert_eq!(parse_basic(b"Bearer x"), None);
    }
}
