//! Access policy: who may use the proxy and where it may go. The ordered rules decide on the
//! request as the client wrote it (`rules`; logins checked only when a rule asks); the
//! destination's *resolved* addresses are then held to the destination CIDRs, never the
//! proxy's own listeners nor, unless allowed, this host's loopback and link-local
//! addresses. Every refusal names the rule that decided.

use std::net::{IpAddr, SocketAddr};
use std::sync::OnceLock;
use std::time::Duration;

use http::{HeaderMap, StatusCode};

use crate::config::{Access, Action, ConfigError, SniMode};
use crate::proxy::auth::{Auth, Client, Refusal};
pub use crate::proxy::rules::Rule;
use crate::proxy::rules::{Facts, Login, Rules, Verdict};
use crate::proxy::sni::Peeked;

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
    rules: Rules,
    auth: Option<Auth>,
    /// The `Proxy-Authenticate` challenge of a 407.
    challenge: String,
    /// Who this proxy is: a destination among its addresses, or a request that carries its
    /// `Via` token, is a loop.
    identity: OnceLock<Identity>,
}

/// What a moved tunnel is checked on again (see [`Policy::recheck_tunnel`]).
pub struct Recheck<'a> {
    /// CONNECT, or the method of an upgraded request.
    pub method: &'a http::Method,
    pub client: Option<IpAddr>,
    pub user: Option<&'a str>,
    /// `host:port`, as the CONNECT named it.
    pub target: &'a str,
    pub sni: Option<&'a Peeked>,
    pub origin: Option<SocketAddr>,
}

/// This proxy's listen addresses (the admin listener's included) and its `Via` token.
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
            rules: Rules::load(&access)?,
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

    /// The ordered rules on one request, as far as they go without its login: `None` when a
    /// rule needs to know who is asking ([`Policy::decide_with_login`] then decides).
    pub fn decide(&self, f: &Facts<'_>) -> Option<Result<Rule, Denial>> {
        match self.rules.decide(f, Login::Unknown) {
            Verdict::NeedLogin => None,
            verdict => Some(self.verdict(verdict, f, None)),
        }
    }

    /// The ordered rules on one request with its login checked (`headers` carry its
    /// `Proxy-Authorization`): the user it logged in as and the rule that allowed it, or the
    /// refusal.
    pub async fn decide_with_login(
        &self,
        f: &Facts<'_>,
        headers: &HeaderMap,
    ) -> Result<(Option<String>, Rule), Denial> {
        let (user, why) = match &self.auth {
            None => (None, "no htpasswd file is configured".to_string()),
            Some(auth) => match auth.check(headers, Client::of(f.client)).await {
                Ok(user) => (Some(user), String::new()),
                Err(Refusal::Unauthenticated(why)) => (None, why.to_string()),
                Err(Refusal::OverBudget(wait)) => {
                    let reason = "too many failed logins from this client: try again later".to_string();
                    let mut d = deny(StatusCode::TOO_MANY_REQUESTS, Rule::AuthFailures, reason);
                    d.retry_after = Some(wait);
                    return Err(d);
                }
            },
        };
        let login = user.as_deref().map_or(Login::Missing, Login::User);
        let rule = self.verdict(self.rules.decide(f, login), f, Some(&why))?;
        Ok((user, rule))
    }

    /// A verdict as the rule that allowed, or a refusal; `why`: why the login failed, if it
    /// was checked.
    fn verdict(&self, verdict: Verdict, f: &Facts<'_>, why: Option<&str>) -> Result<Rule, Denial> {
        let login_refused = |rule: Rule| {
            let why = why.unwrap_or("proxy authentication required");
            let reason = match rule {
                Rule::Htpasswd => why.to_string(),
                named => format!("{why} (rule {} needs a login)", named.as_str()),
            };
            deny(StatusCode::PROXY_AUTHENTICATION_REQUIRED, rule, reason)
        };
        match verdict {
            // A tunnel's SNI decides ([`Policy::check_sni`]).
            Verdict::Allow(rule) | Verdict::Pending(rule) => Ok(rule),
            Verdict::Deny(rule) => Err(deny(StatusCode::FORBIDDEN, rule, self.rules.reason(rule, f))),
            Verdict::Login(rule) => Err(login_refused(rule)),
            // Decided with the login known, no rule asks again; were one to, it is a 407.
            Verdict::NeedLogin => Err(login_refused(Rule::Htpasswd)),
        }
    }

    /// Whether tunnels' first bytes are read for their SNI (`[access] sni = "match"`).
    pub fn reads_sni(&self) -> bool {
        self.access.sni == SniMode::Match
    }

    /// A tunnel's first bytes against the rules: a server name other than the CONNECT's
    /// is refused (`sni_mismatch`); a CONNECT to an address is decided on the server name
    /// (`user`: whom it logged in as); with no server name, `no_sni` decides. The rule that
    /// decided anew, if one did.
    pub fn check_sni(&self, f: &Facts<'_>, peeked: &Peeked, user: Option<&str>) -> Result<Option<Rule>, Denial> {
        let why = match peeked {
            Peeked::Sni(name) if f.ip.is_none() && *name == f.host => return Ok(None),
            Peeked::Sni(name) if f.ip.is_none() => {
                let reason = format!(
                    "the TLS ClientHello asks for {name}, but the CONNECT was for {}",
                    f.host
                );
                return Err(deny(StatusCode::FORBIDDEN, Rule::SniMismatch, reason));
            }
            Peeked::Sni(name) => {
                let by_name = Facts::new(f.client, f.method, name, f.port);
                let login = user.map_or(Login::Missing, Login::User);
                return self
                    .verdict(self.rules.decide(&by_name, login), &by_name, None)
                    .map(Some);
            }
            Peeked::NoSni(why) => *why,
            Peeked::Gone => "the client closed before its first bytes",
        };
        match self.access.no_sni {
            Action::Deny => Err(deny(
                StatusCode::FORBIDDEN,
                Rule::NoSni,
                format!("{why}; set [access] no_sni = \"allow\" to relay such tunnels"),
            )),
            // Without a name, an address is judged as itself.
            Action::Allow if f.sni_to_come => {
                let as_address = Facts::new(f.client, f.method, &f.host, f.port);
                let login = user.map_or(Login::Missing, Login::User);
                self.verdict(self.rules.decide(&as_address, login), &as_address, None)
                    .map(Some)
            }
            Action::Allow => Ok(None),
        }
    }

    /// Whether a tunnel that `rule` allowed is to be bumped (its rule's action is `bump`).
    pub fn bumps(&self, rule: Option<Rule>) -> bool {
        rule.is_some_and(|r| self.rules.bumps(r))
    }

    /// The rules, for `baton check`.
    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// The `Proxy-Authenticate` challenge to send with a 407.
    pub fn challenge(&self) -> Option<&str> {
        self.auth.as_ref().map(|_| self.challenge.as_str())
    }

    /// The rules that apply to a tunnel another generation opened: its client, its user
    /// (logged in then, and still in the htpasswd file now), its target (host and port),
    /// what its first bytes showed (`None`: that generation did not look) and the origin
    /// address it connected to (`None`: through a parent proxy, the name only).
    pub fn recheck_tunnel(&self, tunnel: &Recheck<'_>) -> Result<(), Denial> {
        let target = tunnel.target;
        let (host, port) = target.rsplit_once(':').unwrap_or((target, ""));
        let port = port.parse().unwrap_or(0);
        let mut f = Facts::new(tunnel.client, tunnel.method, host, port);
        let sni = tunnel.sni.filter(|_| self.reads_sni());
        f.sni_to_come = f.ip.is_some() && sni.is_some();
        let user = match (tunnel.user, &self.auth) {
            (Some(u), Some(auth)) if auth.knows(u) => Some(u),
            _ => None,
        };
        let who = tunnel
            .user
            .map_or("an unauthenticated tunnel".to_string(), |u| format!("user {u}"));
        let why = format!("{who} is no longer allowed");
        let login = user.map_or(Login::Missing, Login::User);
        self.verdict(self.rules.decide(&f, login), &f, Some(&why))?;
        if let Some(peeked) = sni {
            self.check_sni(&f, peeked, user)?;
        }
        match tunnel.origin {
            Some(addr) => self.check_address(addr),
            // Through a parent: what the name shows (see `check_name`).
            None => self.check_name(host, port),
        }
    }

    /// The rules on an address a destination resolved to (or is written as): the loop check
    /// first (whatever else is allowed), then local destinations, then the CIDR lists.
    fn check_address(&self, addr: SocketAddr) -> Result<(), Denial> {
        let ip = normalise(addr.ip());
        if self.is_self(SocketAddr::new(ip, addr.port())) {
            return Err(deny(
                StatusCode::FORBIDDEN,
                Rule::Loop,
                format!("destination {addr} is this proxy"),
            ));
        }
        if !self.access.allow_local_destinations
            && let Some(kind) = local_kind(ip)
        {
            return Err(refuse_local(&format!("{ip} ({kind})")));
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

    /// Whether `addr` (normalised) reaches one of this proxy's listeners: the same address
    /// and port; a wildcard listener (0.0.0.0, [::]) at that port, reached at every address
    /// of the host (looked up only when the port matches); or an unspecified destination
    /// (0.0.0.0/8, `::`), which the kernel connects to this host.
    fn is_self(&self, addr: SocketAddr) -> bool {
        let own = self.identity.get().map_or(&[][..], |i| i.addresses.as_slice());
        let mut same_port = own.iter().filter(|o| o.port() == addr.port()).peekable();
        if same_port.peek().is_none() {
            return false;
        }
        let ip = normalise(addr.ip());
        if is_unspecified(ip) {
            return true;
        }
        let mut wildcard = false;
        for o in same_port {
            let own_ip = normalise(o.ip());
            if own_ip == ip {
                return true;
            }
            wildcard |= own_ip.is_unspecified();
        }
        wildcard && (ip.is_loopback() || host_addresses().contains(&ip))
    }

    /// The destination rules as far as the name shows them, for a destination that a parent
    /// proxy reaches (baton does not resolve it: the parent does, with its own DNS):
    /// a destination written as an IP address against the address rules and
    /// this proxy's own listeners; a name under a non-empty `allow_destinations` is refused,
    /// since its addresses cannot be seen. `deny_destinations` cannot see a name's addresses.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), Denial> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        if !self.access.allow_local_destinations && is_localhost_name(bare) {
            // RFC 6761 §6.3: the parent would resolve it to its own loopback.
            return Err(refuse_local(&format!("{bare} (loopback name)")));
        }
        match bare.parse::<IpAddr>() {
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

/// A destination address in one form per place it reaches: IPv4-mapped (`::ffff:a.b.c.d`)
/// and IPv4-compatible (`::a.b.c.d`, deprecated by RFC 4291 but still routed by some
/// stacks) addresses become the IPv4 address they carry. `::` and `::1` stay IPv6.
pub fn normalise(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else { return ip };
    if let Some(v4) = v6.to_ipv4_mapped() {
        return IpAddr::V4(v4);
    }
    let [a, b, c, d, e, f, ..] = v6.segments();
    let compatible = [a, b, c, d, e, f] == [0; 6] && !matches!(v6.segments()[6..], [0, 0] | [0, 1]);
    match v6.to_ipv4() {
        Some(v4) if compatible => IpAddr::V4(v4),
        _ => ip,
    }
}

/// 0.0.0.0/8 ("this network", RFC 791) and `::`: a connect to them reaches this host.
fn is_unspecified(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.octets()[0] == 0,
        IpAddr::V6(v6) => v6.is_unspecified(),
    }
}

/// What makes a (normalised) address local to this host or its link, if it is.
fn local_kind(ip: IpAddr) -> Option<&'static str> {
    match ip {
        _ if is_unspecified(ip) => Some("unspecified: this host"),
        _ if ip.is_loopback() => Some("loopback"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("link-local"),
        IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80 => Some("link-local"),
        _ => None,
    }
}

/// `localhost` and the names under it (RFC 6761 §6.3).
fn is_localhost_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    host == "localhost" || host.ends_with(".localhost")
}

/// The refusal of a local destination: it names the key that allows it.
fn refuse_local(what: &str) -> Denial {
    deny(
        StatusCode::FORBIDDEN,
        Rule::LocalDestination,
        format!(
            "destination {what} is local to the proxy's host; set [access] allow_local_destinations = true to allow it"
        ),
    )
}

/// The `Via` token when none is configured: `baton-` and 12 hex digits of a SHA-256 over
/// this machine's identity (`/etc/machine-id`, else nothing) and host name, and the first
/// TCP listener's port. It reveals neither (machine-id(5) asks that the id be hashed before
/// it is shown), it is the same for every generation of one instance (a handoff keeps the
/// port and the machine), and two instances differ: on one host by their port, on two by
/// their machine and name, so a chain of batons still tells its members apart.
pub fn default_via_token(port: Option<u16>) -> String {
    // Without a machine-id (a container, say) the host name and the port still tell
    // instances apart; with neither, every instance gets one token, and `[access] via_token`
    // sets one by hand.
    let machine = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
    let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok());
    via_token_of(machine.trim(), host.as_deref().unwrap_or(""), port)
}

fn via_token_of(machine: &str, host: &str, port: Option<u16>) -> String {
    use sha2::Digest;
    let mut hash = sha2::Sha256::new();
    for part in [
        "baton via token",
        machine,
        host,
        &port.map(|p| p.to_string()).unwrap_or_default(),
    ] {
        hash.update(part.as_bytes());
        hash.update([0u8]);
    }
    let digest = hash.finalize();
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("baton-{hex}")
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
        let p = policy(|a| {
            a.allow_local_destinations = true;
            a.deny_destinations = vec!["127.0.0.0/8".parse().unwrap()];
        });
        let err = p.resolve_checked("localhost", 80).await.unwrap_err();
        assert!(
            matches!(err, ResolveError::Denied(d) if d.rule == Rule::DenyDestinations || d.rule == Rule::AllowDestinations)
        );
    }

    #[tokio::test]
    async fn own_listener_is_a_loop() {
        let p = policy(|a| a.allow_local_destinations = true);
        p.set_identity(vec!["127.0.0.1:3128".parse().unwrap()], "test:3128".into());
        let err = p.resolve_checked("127.0.0.1", 3128).await.unwrap_err();
        assert!(matches!(err, ResolveError::Denied(d) if d.rule == Rule::Loop));
        assert!(p.resolve_checked("127.0.0.1", 3129).await.is_ok());
    }

    #[test]
    fn names_through_a_parent_are_checked_as_far_as_they_show() {
        let p = policy(|a| a.deny_destinations = vec!["10.0.0.0/8".parse().unwrap()]);
        p.set_identity(vec!["127.0.0.1:3128".parse().unwrap()], "t".into());
        assert!(matches!(p.check_name("10.1.1.1", 80), Err(d) if d.rule == Rule::DenyDestinations));
        assert!(matches!(p.check_name("127.0.0.1", 3128), Err(d) if d.rule == Rule::Loop));
        // A name's addresses are the parent's business: deny_destinations cannot see them.
        assert!(p.check_name("example.org", 80).is_ok());
        let allow = policy(|a| a.allow_destinations = vec!["192.0.2.0/24".parse().unwrap()]);
        assert!(allow.check_name("[::ffff:192.0.2.7]", 80).is_ok());
        assert!(matches!(allow.check_name("example.org", 80), Err(d) if d.rule == Rule::AllowDestinations));
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

    fn sock(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    /// Every way of writing this host's address reaches the own-address check, even with
    /// local destinations allowed: listeners, the admin listener, wildcard listeners.
    #[test]
    fn every_encoding_of_an_own_address_is_a_loop() {
        let p = policy(|a| a.allow_local_destinations = true);
        let (proxy, admin, wild) = (sock("127.0.0.1:3128"), sock("127.0.0.1:9090"), sock("[::]:8443"));
        p.set_identity(vec![proxy, admin, wild], "t".into());
        let hits = [
            "127.0.0.1:3128",
            "0.0.0.0:3128",
            "0.1.2.3:3128",
            "[::]:3128",
            "[::ffff:127.0.0.1]:3128",
            "[::127.0.0.1]:3128",
            "[::ffff:0.0.0.0]:9090",
            "127.0.0.1:9090",
            "[::ffff:127.0.0.1]:9090",
            "[::1]:8443",
            "127.0.0.9:8443",
            "[::ffff:127.0.0.9]:8443",
        ];
        for hit in hits {
            let d = p.check_address(sock(hit)).expect_err(hit);
            assert_eq!(d.rule, Rule::Loop, "{hit} reaches this proxy: {d}");
        }
        // Positive witnesses: the same forms at a port no listener has pass.
        for other in [
            "127.0.0.1:3129",
            "0.0.0.0:3129",
            "[::ffff:127.0.0.1]:9091",
            "127.0.0.2:3128",
        ] {
            assert!(p.check_address(sock(other)).is_ok(), "{other} is not this proxy");
        }
    }

    /// Loopback, unspecified and link-local destinations, in every encoding, are refused
    /// by default, naming the key that allows them; private ranges are not.
    #[tokio::test]
    async fn local_destinations_are_refused_unless_allowed() {
        let closed = policy(|_| {});
        let open = policy(|a| a.allow_local_destinations = true);
        let local = [
            "127.0.0.1:80",
            "127.1.2.3:80",
            "[::1]:80",
            "0.0.0.0:80",
            "0.0.0.1:80",
            "[::]:80",
            "[::ffff:127.0.0.1]:80",
            "[::127.0.0.1]:80",
            "169.254.169.254:80",
            "[::ffff:169.254.169.254]:80",
            "[fe80::1]:80",
            "[febf::1]:80",
        ];
        for addr in local {
            let d = closed.check_address(sock(addr)).expect_err(addr);
            assert_eq!(d.rule, Rule::LocalDestination, "{addr}: {d}");
            assert!(
                d.reason.contains("allow_local_destinations"),
                "{addr}: the reason names the key: {d}"
            );
            assert!(open.check_address(sock(addr)).is_ok(), "{addr} with the key set");
        }
        for addr in [
            "10.1.2.3:80",
            "192.168.1.1:80",
            "[fd00::1]:80",
            "[fec0::1]:80",
            "93.184.216.34:80",
        ] {
            assert!(closed.check_address(sock(addr)).is_ok(), "{addr} is not local");
        }
        // What the resolver makes of inet_aton's forms (numeric: no query leaves the host).
        for host in ["2130706433", "0x7f.1", "0177.0.0.1", "localhost"] {
            match closed.resolve_checked(host, 80).await {
                Err(ResolveError::Denied(d)) => assert_eq!(d.rule, Rule::LocalDestination, "{host}: {d}"),
                Err(e) => panic!("{host}: the resolver failed rather than refuse: {e}"),
                Ok(a) => panic!("{host} resolved to {a:?} and passed"),
            }
            assert!(open.resolve_checked(host, 80).await.is_ok(), "{host} with the key set");
        }
        // Through a parent the name is all there is: an IP literal, or localhost.
        for host in ["127.0.0.1", "[::ffff:127.0.0.1]", "localhost", "a.localhost."] {
            let d = closed.check_name(host, 80).expect_err(host);
            assert_eq!(d.rule, Rule::LocalDestination, "{host}: {d}");
            assert!(open.check_name(host, 80).is_ok(), "{host} with the key set");
        }
    }

    #[test]
    fn normalise_unwraps_ipv4_in_ipv6() {
        let n = |t: &str| normalise(t.parse().unwrap()).to_string();
        assert_eq!(n("::ffff:127.0.0.1"), "127.0.0.1");
        assert_eq!(n("::127.0.0.1"), "127.0.0.1");
        assert_eq!(n("::1"), "::1");
        assert_eq!(n("::"), "::");
        assert_eq!(n("2001:db8::1"), "2001:db8::1");
    }

    /// The default token names no host, is the same for the same instance, and differs
    /// between two instances on one host (ports) or on two hosts.
    #[test]
    fn the_default_via_token_hides_the_host_name_and_tells_instances_apart() {
        let a = via_token_of("0123abcd", "build-7.corp.example", Some(3128));
        assert!(a.starts_with("baton-") && a.len() == "baton-".len() + 12, "{a}");
        assert!(!a.contains("build") && !a.contains("3128"), "{a} reveals the host");
        assert_eq!(
            a,
            via_token_of("0123abcd", "build-7.corp.example", Some(3128)),
            "stable"
        );
        assert_ne!(
            a,
            via_token_of("0123abcd", "build-7.corp.example", Some(3129)),
            "per port"
        );
        assert_ne!(
            a,
            via_token_of("4567ef01", "build-8.corp.example", Some(3128)),
            "per host"
        );
        assert_eq!(default_via_token(Some(1)), default_via_token(Some(1)));
    }
}
