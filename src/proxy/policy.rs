//! Access policy: who may use the proxy (client CIDRs, Basic proxy authentication) and where
//! it may go (CONNECT ports, host names, destination CIDRs checked on the *resolved*
//! addresses, never the proxy's own listeners). Every refusal names the rule that decided.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::config::{Access, ConfigError};
use crate::proxy::auth::{Auth, Client, Refusal};

/// A refusal: the status, a one-line reason for the client and the log, and the rule.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{reason}")]
pub struct Denial {
    pub status: StatusCode,
    pub reason: String,
    pub rule: Rule,
    /// For a 429: when the client may try again.
    pub retry_after: Option<Duration>,
}

/// The configuration rule that decided a refusal; `as_str` is its key, as logged (`rule=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rule {
    AllowClients,
    Htpasswd,
    /// The client failed to log in too often (`access.auth_failures`).
    AuthFailures,
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
            Rule::AuthFailures => "auth_failures",
            Rule::ConnectPorts => "connect_ports",
            Rule::DenyHosts => "deny_hosts",
            Rule::DenyDestinations => "deny_destinations",
            Rule::AllowDestinations => "allow_destinations",
            Rule::Loop => "loop",
        }
    }
}

fn deny(status: StatusCode, rule: Rule, reason: String) -> Denial {
    Denial {
        status,
        reason,
        rule,
        retry_after: None,
    }
}

pub struct Policy {
    access: Access,
    auth: Option<Auth>,
    /// The `Proxy-Authenticate` challenge of a 407.
    challenge: String,
    /// Who this proxy is: a destination among its addresses, or a request that carries its
    /// `Via` token, is a loop.
    identity: OnceLock<Identity>,
}

/// This proxy's listen addresses and its `Via` token.
#[derive(Debug, Clone)]
pub struct Identity {
    pub addresses: Vec<SocketAddr>,
    pub via_token: String,
}

impl Policy {
    pub fn new(access: Access) -> Result<Policy, ConfigError> {
        let auth = match &access.htpasswd {
            None => None,
            Some(path) => Some(Auth::load(
                path,
                access.auth_failures,
                access.htpasswd_readable_by_others,
            )?),
        };
        Ok(Policy {
            challenge: format!("Basic realm=\"{}\"", access.realm),
            access,
            auth,
            identity: OnceLock::new(),
        })
    }

    /// Records who this proxy is (known once the listeners are open); the configured
    /// `via_token` wins over `default_token`.
    pub fn set_identity(&self, addresses: Vec<SocketAddr>, default_token: String) {
        let via_token = self.access.via_token.clone().unwrap_or(default_token);
        let _ = self.identity.set(Identity { addresses, via_token });
    }

    /// This proxy's `Via` token (`baton` until the identity is set).
    pub fn via_token(&self) -> &str {
        self.identity.get().map_or("baton", |i| i.via_token.as_str())
    }

    /// A request whose `Via` carries this proxy's token went through it before: a loop.
    pub fn check_via(&self, headers: &HeaderMap) -> Result<(), Denial> {
        let token = self.via_token();
        for value in headers.get_all(http::header::VIA) {
            let text = String::from_utf8_lossy(value.as_bytes());
            // Each entry: protocol, received-by, an optional comment (RFC 9110 §7.6.3).
            let seen = text.split(',').filter_map(|entry| entry.split_whitespace().nth(1));
            if seen.into_iter().any(|by| by.eq_ignore_ascii_case(token)) {
                return Err(deny(
                    StatusCode::FORBIDDEN,
                    Rule::Loop,
                    format!("request already passed this proxy (Via {token})"),
                ));
            }
        }
        Ok(())
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

    /// Checks `Proxy-Authorization` from `client` (`None`: a Unix-socket client) when
    /// authentication is configured. Returns the user.
    pub async fn check_auth(&self, headers: &HeaderMap, client: Option<IpAddr>) -> Result<Option<String>, Denial> {
        let Some(auth) = &self.auth else {
            return Ok(None);
        };
        match auth.check(headers, Client::of(client.map(canonical))).await {
            Ok(user) => Ok(Some(user)),
            Err(Refusal::Unauthenticated(why)) => Err(deny(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                Rule::Htpasswd,
                why.to_string(),
            )),
            Err(Refusal::OverBudget(wait)) => {
                let reason = "too many failed logins from this client: try again later".to_string();
                let mut d = deny(StatusCode::TOO_MANY_REQUESTS, Rule::AuthFailures, reason);
                d.retry_after = Some(wait);
                Err(d)
            }
        }
    }

    /// The `Proxy-Authenticate` challenge to send with a 407.
    pub fn challenge(&self) -> Option<&str> {
        self.auth.as_ref().map(|_| self.challenge.as_str())
    }

    /// The rules that apply to a tunnel another generation opened: its client, its user,
    /// its target (host and port) and the origin address it connected to (`None`: through a
    /// parent proxy, the name only).
    pub fn recheck_tunnel(
        &self,
        client: Option<IpAddr>,
        user: Option<&str>,
        target: &str,
        origin: Option<SocketAddr>,
    ) -> Result<(), Denial> {
        if let Some(ip) = client {
            self.check_client(ip)?;
        }
        if let Some(auth) = &self.auth
            && !user.is_some_and(|u| auth.knows(u))
        {
            let who = user.map_or("an unauthenticated tunnel".to_string(), |u| format!("user {u}"));
            return Err(deny(
                StatusCode::PROXY_AUTHENTICATION_REQUIRED,
                Rule::Htpasswd,
                format!("{who} is no longer allowed"),
            ));
        }
        let (host, port) = target.rsplit_once(':').unwrap_or((target, ""));
        let port = port.parse().unwrap_or(0);
        self.check_connect_port(port)?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        match origin {
            Some(addr) => {
                self.check_host(host)?;
                self.check_address(addr)
            }
            // Through a parent: what the name shows (see `check_name`).
            None => self.check_name(host, port),
        }
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
        if self.is_self(SocketAddr::new(ip, addr.port())) {
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

    /// Whether `addr` reaches one of this proxy's listeners. A wildcard listener (0.0.0.0,
    /// [::]) is reached at every address of the host, so those are looked up, only when the
    /// port matches one.
    fn is_self(&self, addr: SocketAddr) -> bool {
        let own = self.identity.get().map_or(&[][..], |i| i.addresses.as_slice());
        let mut same_port = own.iter().filter(|o| o.port() == addr.port()).peekable();
        if same_port.peek().is_none() {
            return false;
        }
        let ip = addr.ip();
        let mut wildcard = false;
        for o in same_port {
            if o.ip() == ip {
                return true;
            }
            wildcard |= o.ip().is_unspecified();
        }
        wildcard && (ip.is_loopback() || ip.is_unspecified() || host_addresses().contains(&ip))
    }

    /// The destination rules as far as the name shows them, for a destination that a parent
    /// proxy reaches (baton does not resolve it: the parent does, with its own DNS):
    /// `deny_hosts`; a destination written as an IP address against the address rules and
    /// this proxy's own listeners; a name under a non-empty `allow_destinations` is refused,
    /// since its addresses cannot be seen. `deny_destinations` cannot see a name's addresses.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), Denial> {
        self.check_host(host)?;
        match host.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            Ok(ip) => self.check_address(SocketAddr::new(ip, port)),
            Err(_) if !self.access.allow_destinations.is_empty() => Err(deny(
                StatusCode::FORBIDDEN,
                Rule::AllowDestinations,
                format!(
                    "destination {host} is a name that a parent proxy resolves, so baton cannot check it against allow_destinations"
                ),
            )),
            Err(_) => Ok(()),
        }
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

/// The addresses of this host's interfaces (empty if they cannot be listed).
fn host_addresses() -> Vec<IpAddr> {
    let Ok(ifaddrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    ifaddrs
        .filter_map(|i| i.address)
        .filter_map(|a| {
            a.as_sockaddr_in()
                .map(|v4| IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| canonical(IpAddr::V6(v6.ip()))))
        })
        .collect()
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
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
        p.set_identity(vec!["127.0.0.1:3128".parse().unwrap()], "test:3128".into());
        let err = p.resolve_checked("127.0.0.1", 3128).await.unwrap_err();
        assert!(matches!(err, ResolveError::Denied(d) if d.rule == Rule::Loop));
        assert!(p.resolve_checked("127.0.0.1", 3129).await.is_ok());
    }

    #[test]
    fn names_through_a_parent_are_checked_as_far_as_they_show() {
        let p = policy(|a| {
            a.deny_hosts = vec!["*.internal".into()];
            a.deny_destinations = vec!["10.0.0.0/8".parse().unwrap()];
        });
        p.set_identity(vec!["127.0.0.1:3128".parse().unwrap()], "t".into());
        assert!(matches!(p.check_name("db.internal", 80), Err(d) if d.rule == Rule::DenyHosts));
        assert!(matches!(p.check_name("10.1.1.1", 80), Err(d) if d.rule == Rule::DenyDestinations));
        assert!(matches!(p.check_name("127.0.0.1", 3128), Err(d) if d.rule == Rule::Loop));
        // A name's addresses are the parent's business: deny_destinations cannot see them.
        assert!(p.check_name("example.org", 80).is_ok());
        let allow = policy(|a| a.allow_destinations = vec!["192.0.2.0/24".parse().unwrap()]);
        assert!(allow.check_name("[::ffff:192.0.2.7]", 80).is_ok());
        assert!(matches!(allow.check_name("example.org", 80), Err(d) if d.rule == Rule::AllowDestinations));
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
    fn a_request_carrying_our_via_token_is_a_loop() {
        let p = policy(|_| {});
        p.set_identity(vec![], "host-a:3128".into());
        let mut h = HeaderMap::new();
        h.append(http::header::VIA, "1.0 fred, 1.1 host-b:3128".parse().unwrap());
        assert!(p.check_via(&h).is_ok(), "another baton's token is not ours");
        h.append(http::header::VIA, "1.1 HOST-A:3128 (baton)".parse().unwrap());
        assert!(matches!(p.check_via(&h), Err(d) if d.rule == Rule::Loop));
        let configured = policy(|a| a.via_token = Some("edge-1".into()));
        configured.set_identity(vec![], "host-a:3128".into());
        assert_eq!(configured.via_token(), "edge-1");
    }

    #[test]
    fn every_host_address_reaches_a_wildcard_listener() {
        let p = policy(|_| {});
        p.set_identity(vec!["0.0.0.0:3128".parse().unwrap()], "t".into());
        let mut addrs = host_addresses();
        addrs.push("127.0.0.2".parse().unwrap());
        for ip in addrs {
            assert!(p.is_self(SocketAddr::new(ip, 3128)), "{ip}");
            assert!(!p.is_self(SocketAddr::new(ip, 3129)), "{ip}");
        }
    }
}
