//! The ordered access rules, first match wins, as Squid's `http_access`: the shorthand keys
//! as the rules they stand for (`allow_clients`, `connect_ports`, `deny_hosts` first; an
//! htpasswd file with no configured rule: every user must log in), then `[[access.rule]]` as
//! written, then the default. A rule that names users needs a login: a request it would
//! match but for the login gets 407 (Squid's `proxy_auth`); a user it does not name goes on
//! to the next rule. Logins are checked only when a rule needs one ([`Verdict::NeedLogin`]),
//! so bcrypt runs only for requests whose rules ask who is asking.
//!
//! The resolved addresses are checked later, in `policy` (loops, local destinations, the
//! destination CIDRs): rules see the destination as the client named it.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;

use http::Method;
use ipnet::IpNet;
use prometheus_client::metrics::counter::Counter;

use crate::config::access::{HostEntry, TlsAction, UserEntry};
use crate::config::hosts::literal_ip;
use crate::config::{Access, Action, ConfigError, RuleConfig};
use crate::proxy::groups::Groups;
use crate::proxy::hostset::{Found, HostSet};
use crate::proxy::metrics::{self, RuleLabels};

/// The rule that decided, as logged (`rule=`) and counted.
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
    /// The destination is one of the proxy's own listeners (or its admin listener).
    Loop,
    /// The destination is on this host or its link (`access.allow_local_destinations`).
    LocalDestination,
    /// One client holds `limits.max_connections_per_client` connections already.
    MaxConnectionsPerClient,
    /// The proxy holds `limits.max_connections` connections already.
    MaxConnections,
    /// No rule matched: `[access] default`.
    Default,
    /// A tunnel's TLS ClientHello named another server than its CONNECT.
    SniMismatch,
    /// A tunnel sent no ClientHello with a server name (`[access] no_sni`).
    NoSni,
    /// A client or user is over its `requests_per_second` (`[limits.per_client]`,
    /// `[limits.per_user]`).
    RequestsPerSecond,
    /// A configured `[[access.rule]]`, by its name.
    Named(&'static str),
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
            Rule::LocalDestination => "local_destination",
            Rule::MaxConnectionsPerClient => "max_connections_per_client",
            Rule::MaxConnections => "max_connections",
            Rule::Default => "default",
            Rule::SniMismatch => "sni_mismatch",
            Rule::NoSni => "no_sni",
            Rule::RequestsPerSecond => "requests_per_second",
            Rule::Named(name) => name,
        }
    }
}

/// What a request shows the rules.
#[derive(Debug)]
pub struct Facts<'a> {
    /// `None`: a client of a Unix-socket listener, which no `clients` CIDR matches.
    pub client: Option<IpAddr>,
    /// `client` as the `clients` tests compare it, computed once.
    client_bits: Option<(bool, u128)>,
    pub method: &'a Method,
    /// The destination's host, lowercase without a trailing dot.
    pub host: Cow<'a, str>,
    /// The address `host` is written as, canonical.
    pub ip: Option<IpAddr>,
    pub port: u16,
    /// A CONNECT to an address whose ClientHello will name the server (`[access] sni =
    /// "match"`): a rule whose names could match that name is left to it ([`Verdict::Pending`]).
    pub sni_to_come: bool,
    /// The request's path, for `paths` rules (`None`: a CONNECT, which has none).
    pub path: Option<&'a str>,
}

impl<'a> Facts<'a> {
    /// `host` as a request target gives it (any case, an IPv6 address in brackets).
    pub fn new(client: Option<IpAddr>, method: &'a Method, host: &'a str, port: u16) -> Facts<'a> {
        let trimmed = host.strip_suffix('.').unwrap_or(host);
        let host = if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
            Cow::Owned(trimmed.to_ascii_lowercase())
        } else {
            Cow::Borrowed(trimmed)
        };
        let client = client.map(|c| c.to_canonical());
        Facts {
            client,
            client_bits: client.map(client_bits),
            method,
            ip: literal_ip(&host),
            host,
            port,
            sni_to_come: false,
            path: None,
        }
    }
}

/// Who the request logged in as, as far as it is known yet.
#[derive(Debug, Clone, Copy)]
pub enum Login<'a> {
    /// Not checked yet: no rule has needed it.
    Unknown,
    /// No credentials, or wrong ones.
    Missing,
    User(&'a str),
}

/// The outcome of [`Rules::decide`].
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow(Rule),
    /// Refused by the rule, which is a deny rule, or the default.
    Deny(Rule),
    /// The rule would match but for the login: 407.
    Login(Rule),
    /// A rule that names users is reached and the login is `Unknown`: check it, decide again.
    NeedLogin,
    /// This rule's names may match the server the tunnel's ClientHello will name
    /// (`Facts::sni_to_come`): decide again on that name.
    Pending(Rule),
}

/// Whether a test holds: `Maybe` only for names an address's SNI may yet match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    Yes,
    No,
    Maybe,
}

pub struct Rules {
    list: Vec<Entry>,
    default: Action,
    /// `baton_access_rule_decisions_total` of the default.
    default_count: Counter,
}

/// One rule, compiled: every test must hold, then `users`.
struct Entry {
    rule: Rule,
    action: Action,
    /// What an allowed CONNECT does with its TLS (`bump` or relay it).
    tls: TlsAction,
    tests: Vec<Test>,
    users: Option<Users>,
    /// Its decisions (its action, and its 407s), resolved once: a decision costs one add.
    counts: [Counter; 2],
}

enum Test {
    Clients(Nets),
    /// `allow_clients`: a client outside them (Unix-socket clients are inside).
    ClientsOutside(Nets),
    Methods(Vec<Method>),
    Ports(Vec<u16>),
    /// `connect_ports`: a CONNECT to a port not among them.
    ConnectOutside(Vec<u16>),
    Hosts(Vec<Arc<HostSet>>, String),
    /// Path prefixes; a request without a path (CONNECT) is outside them.
    Paths(Vec<String>),
}

fn hosts_hold(sets: &[Arc<HostSet>], f: &Facts) -> Match {
    if sets.iter().any(|s| s.find(&f.host, f.ip).is_some()) {
        Match::Yes
    } else if f.sni_to_come && sets.iter().any(|s| s.has_names()) {
        Match::Maybe
    } else {
        Match::No
    }
}

/// Client CIDRs as 128-bit masks (IPv4 in the IPv4-mapped range), each with its family: a
/// client is tested against each with an AND and a compare, since every request a policy's
/// `clients` rules see pays it (`IpNet::contains` costs several times more).
struct Nets {
    masks: Vec<(bool, u128, u128)>,
    /// As written, for messages.
    written: Vec<IpNet>,
}

impl Nets {
    fn new(nets: &[IpNet]) -> Nets {
        let masks = nets
            .iter()
            .map(|n| match n {
                IpNet::V4(v4) => (
                    true,
                    u128::from(v4.network().to_ipv6_mapped()),
                    mask128(96 + v4.prefix_len()),
                ),
                IpNet::V6(v6) => (false, u128::from(v6.network()), mask128(v6.prefix_len())),
            })
            .collect();
        Nets {
            masks,
            written: nets.to_vec(),
        }
    }

    /// A client as `client_bits` gives it.
    fn contains(&self, (v4, bits): (bool, u128)) -> bool {
        self.masks
            .iter()
            .any(|&(family, net, mask)| family == v4 && bits & mask == net)
    }
}

/// A canonical client address as [`Nets`] compares it: its family, and 128 bits (IPv4 in the
/// IPv4-mapped range).
fn client_bits(ip: IpAddr) -> (bool, u128) {
    match ip {
        IpAddr::V4(a) => (true, u128::from(a.to_ipv6_mapped())),
        IpAddr::V6(a) => (false, u128::from(a)),
    }
}

/// The mask of the first `prefix` bits of 128.
fn mask128(prefix: u8) -> u128 {
    if prefix == 0 {
        0
    } else {
        !0u128 << (128 - u32::from(prefix))
    }
}

struct Users {
    any: bool,
    names: HashSet<String>,
    /// As written, for messages.
    text: String,
}

impl Rules {
    /// The rules `access` configures, reading the lists and the groups file they name.
    pub fn load(access: &Access) -> Result<Rules, ConfigError> {
        let mut list = shorthands(access);
        let groups = match &access.groups {
            Some(path) => Groups::load(path)?,
            None => Groups::default(),
        };
        let mut files: Vec<(PathBuf, Arc<HostSet>)> = Vec::new();
        for r in &access.rules {
            list.push(configured(r, &groups, &mut files, access.groups.as_deref())?);
        }
        if access.rules.is_empty() && access.htpasswd.is_some() {
            let everyone = Users {
                any: true,
                names: HashSet::new(),
                text: "*".into(),
            };
            list.push(Entry::new(Rule::Htpasswd, Action::Allow, Vec::new(), Some(everyone)));
        }
        Ok(Rules {
            list,
            default: access.default,
            default_count: counter(Rule::Default, access.default.as_str()),
        })
    }

    /// The first rule that matches decides; none: the default.
    pub fn decide(&self, f: &Facts, login: Login) -> Verdict {
        'rules: for (i, e) in self.list.iter().enumerate() {
            let mut maybe = false;
            for t in &e.tests {
                match t.holds(f) {
                    Match::Yes => {}
                    Match::No => continue 'rules,
                    Match::Maybe => maybe = true,
                }
            }
            // Once the SNI decides, the `200` is out and no 407 can be sent: whoever the
            // request's credentials name is found out now, for whichever rule needs it then.
            if maybe && matches!(login, Login::Unknown) && self.list[i..].iter().any(|e| e.users.is_some()) {
                return Verdict::NeedLogin;
            }
            let decided = if maybe { Verdict::Pending(e.rule) } else { e.verdict() };
            match (&e.users, login) {
                (None, _) => return e.count(decided),
                (Some(_), Login::Unknown) => return Verdict::NeedLogin,
                (Some(_), Login::Missing) => return e.count(Verdict::Login(e.rule)),
                (Some(u), Login::User(name)) if u.any || u.names.contains(name) => return e.count(decided),
                (Some(_), Login::User(_)) => {}
            }
        }
        self.default_count.inc();
        match self.default {
            Action::Allow => Verdict::Allow(Rule::Default),
            Action::Deny => Verdict::Deny(Rule::Default),
        }
    }

    /// Whether the tunnel `rule` allowed is to be bumped: only a configured rule whose action
    /// is `bump` says so (the built-in rules and the default relay).
    pub fn bumps(&self, rule: Rule) -> bool {
        matches!(rule, Rule::Named(_)) && self.list.iter().any(|e| e.rule == rule && e.tls == TlsAction::Bump)
    }

    /// Whether any rule names users (a request may then be asked to log in).
    pub fn may_need_login(&self) -> bool {
        self.list.iter().any(|e| e.users.is_some())
    }

    /// The effective ordered list, a line a rule, as `baton check` prints it.
    pub fn listing(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .list
            .iter()
            .enumerate()
            .map(|(i, e)| format!("{}. {e}", i + 1))
            .collect();
        lines.push(format!("{}. default: {}", lines.len() + 1, self.default.as_str()));
        lines
    }

    /// Why each rule before the deciding one did not match, then the verdict: for
    /// `baton check --explain`.
    pub fn explain(&self, f: &Facts, login: Login) -> Vec<String> {
        let mut lines = Vec::new();
        for (i, e) in self.list.iter().enumerate() {
            if e.tests.iter().all(|t| t.holds(f) != Match::No) && e.tests.iter().any(|t| t.holds(f) == Match::Maybe) {
                lines.push(format!("{}. {e}\n   waits for the ClientHello's server name", i + 1));
                return lines;
            }
            let why = match e.tests.iter().find(|t| t.holds(f) == Match::No) {
                Some(t) => t.miss(f),
                None => match (&e.users, login) {
                    (Some(_), Login::Unknown | Login::Missing) => {
                        lines.push(format!("{}. {e}\n   decides: 407, it needs a login", i + 1));
                        return lines;
                    }
                    (Some(u), Login::User(name)) if !(u.any || u.names.contains(name)) => {
                        format!("user {name} is not among {}", u.text)
                    }
                    _ => {
                        lines.push(format!("{}. {e}\n   decides: {}", i + 1, e.action.as_str()));
                        return lines;
                    }
                },
            };
            lines.push(format!("{}. {e}\n   no match: {why}", i + 1));
        }
        lines.push(format!("default decides: {}", self.default.as_str()));
        lines
    }
}

/// The decisions counter of `rule` (`decision`: allow, deny, login).
fn counter(rule: Rule, decision: &'static str) -> Counter {
    let labels = RuleLabels {
        rule: rule.as_str(),
        decision,
    };
    metrics::get().rule_decisions.get_or_create(&labels).clone()
}

impl Entry {
    fn new(rule: Rule, action: Action, tests: Vec<Test>, users: Option<Users>) -> Entry {
        Entry {
            counts: [counter(rule, action.as_str()), counter(rule, "login")],
            rule,
            action,
            tls: TlsAction::Splice,
            tests,
            users,
        }
    }

    /// Counts a final verdict (a pending one is counted when its server name decides).
    fn count(&self, v: Verdict) -> Verdict {
        match v {
            Verdict::Allow(_) | Verdict::Deny(_) => self.counts[0].inc(),
            Verdict::Login(_) => self.counts[1].inc(),
            Verdict::NeedLogin | Verdict::Pending(_) => 0,
        };
        v
    }

    fn verdict(&self) -> Verdict {
        match self.action {
            Action::Allow => Verdict::Allow(self.rule),
            Action::Deny => Verdict::Deny(self.rule),
        }
    }
}

/// The shorthand keys as the rules they stand for, checked before the configured ones.
fn shorthands(access: &Access) -> Vec<Entry> {
    let deny = |rule, test| Entry::new(rule, Action::Deny, vec![test], None);
    let mut list = vec![
        deny(
            Rule::AllowClients,
            Test::ClientsOutside(Nets::new(&access.allow_clients)),
        ),
        deny(Rule::ConnectPorts, Test::ConnectOutside(access.connect_ports.clone())),
    ];
    if !access.deny_hosts.is_empty() {
        let mut set = HostSet::default();
        for h in &access.deny_hosts {
            // Validated when the configuration was read; a pattern that no longer parses
            // matches nothing rather than everything.
            if let Ok(p) = crate::config::HostPattern::parse(h) {
                set.add(&p);
            }
        }
        let text = access.deny_hosts.join(", ");
        list.push(deny(Rule::DenyHosts, Test::Hosts(vec![Arc::new(set)], text)));
    }
    list
}

/// A configured rule; lists named by several rules are read once (`files`).
fn configured(
    r: &RuleConfig,
    groups: &Groups,
    files: &mut Vec<(PathBuf, Arc<HostSet>)>,
    groups_file: Option<&std::path::Path>,
) -> Result<Entry, ConfigError> {
    let mut tests = Vec::new();
    if let Some(m) = &r.methods {
        tests.push(Test::Methods(m.clone()));
    }
    if let Some(p) = &r.ports {
        tests.push(Test::Ports(p.clone()));
    }
    if let Some(c) = &r.clients {
        tests.push(Test::Clients(Nets::new(c)));
    }
    if let Some(h) = &r.hosts {
        tests.push(hosts(h, files)?);
    }
    if let Some(p) = &r.paths {
        tests.push(Test::Paths(p.clone()));
    }
    let users = r
        .users
        .as_ref()
        .map(|u| users(u, groups, groups_file, &r.name))
        .transpose()?;
    // Leaked once per generation (a reload is a new process): every access line and
    // metric of this rule borrows the name without a copy.
    let name: &'static str = Box::leak(r.name.clone().into_boxed_str());
    let mut entry = Entry::new(Rule::Named(name), r.action, tests, users);
    entry.tls = r.tls;
    Ok(entry)
}

fn hosts(entries: &[HostEntry], files: &mut Vec<(PathBuf, Arc<HostSet>)>) -> Result<Test, ConfigError> {
    let mut inline = HostSet::default();
    let mut sets = Vec::new();
    let mut text = Vec::new();
    for e in entries {
        match e {
            HostEntry::Pattern(p) => {
                inline.add(p);
                text.push(p.to_string());
            }
            HostEntry::File(path) => {
                let set = match files.iter().find(|(p, _)| p == path) {
                    Some((_, set)) => set.clone(),
                    None => {
                        let set = Arc::new(HostSet::load(path)?);
                        files.push((path.clone(), set.clone()));
                        set
                    }
                };
                text.push(format!("@{} ({} entries)", path.display(), set.len()));
                sets.push(set);
            }
        }
    }
    if !inline.is_empty() {
        sets.insert(0, Arc::new(inline));
    }
    Ok(Test::Hosts(sets, text.join(", ")))
}

fn users(
    entries: &[UserEntry],
    groups: &Groups,
    file: Option<&std::path::Path>,
    rule: &str,
) -> Result<Users, ConfigError> {
    let mut u = Users {
        any: false,
        names: HashSet::new(),
        text: String::new(),
    };
    let mut text = Vec::new();
    for e in entries {
        match e {
            UserEntry::Any => {
                u.any = true;
                text.push("*".to_string());
            }
            UserEntry::User(name) => {
                u.names.insert(name.clone());
                text.push(name.clone());
            }
            UserEntry::Group(g) => {
                let members = groups.members(g).ok_or_else(|| ConfigError::Invalid {
                    path: file.map_or_else(|| "[access] groups".into(), |f| f.display().to_string()),
                    message: format!("rule `{rule}` names @{g}, which this groups file does not define"),
                })?;
                u.names.extend(members.iter().cloned());
                text.push(format!("@{g}"));
            }
        }
    }
    u.text = format!("[{}]", text.join(", "));
    Ok(u)
}

impl Test {
    // Inlined into the rules' loop: every request runs it once per test of every rule it
    // passes over (callgrind: a call each cost about as much as the test).
    #[inline]
    fn holds(&self, f: &Facts) -> Match {
        let yes = match self {
            Test::Clients(nets) => f.client_bits.is_some_and(|c| nets.contains(c)),
            Test::ClientsOutside(nets) => f.client_bits.is_some_and(|c| !nets.contains(c)),
            Test::Methods(m) => m.contains(f.method),
            Test::Ports(p) => p.contains(&f.port),
            Test::ConnectOutside(p) => f.method == Method::CONNECT && !p.contains(&f.port),
            Test::Hosts(sets, _) => return hosts_hold(sets, f),
            Test::Paths(prefixes) => f
                .path
                .is_some_and(|p| prefixes.iter().any(|x| p.starts_with(x.as_str()))),
        };
        if yes { Match::Yes } else { Match::No }
    }

    /// Why the test does not hold for `f`.
    fn miss(&self, f: &Facts) -> String {
        let client = f.client.map_or("a Unix-socket client".to_string(), |c| c.to_string());
        match self {
            Test::Clients(nets) => format!("client {client} is not in {}", nets_text(&nets.written)),
            Test::ClientsOutside(nets) => format!("client {client} is in {}", nets_text(&nets.written)),
            Test::Methods(m) => format!("method {} is not among {m:?}", f.method),
            Test::Ports(p) => format!("port {} is not among {p:?}", f.port),
            Test::ConnectOutside(p) => match *f.method == Method::CONNECT {
                true => format!("port {} is among {p:?}", f.port),
                false => format!("{} is not CONNECT", f.method),
            },
            Test::Hosts(_, text) => format!("host {} is not in [{text}]", f.host),
            Test::Paths(prefixes) => match f.path {
                Some(p) => format!("path {p} is not under {prefixes:?}"),
                None => format!("{} has no path", f.method),
            },
        }
    }

    /// What a host in the set matched, for a reason (`deny_hosts`'s refusal names it).
    fn found<'s>(&'s self, f: &Facts) -> Option<Found<'s>> {
        match self {
            Test::Hosts(sets, _) => sets.iter().find_map(|s| s.find(&f.host, f.ip)),
            _ => None,
        }
    }
}

fn nets_text(nets: &[IpNet]) -> String {
    let text: Vec<String> = nets.iter().map(ToString::to_string).collect();
    format!("[{}]", text.join(", "))
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let action = match self.tls {
            TlsAction::Bump => "bump",
            TlsAction::Splice => self.action.as_str(),
        };
        write!(f, "{} ({action})", self.rule.as_str())?;
        for t in &self.tests {
            match t {
                Test::Clients(n) => write!(f, " clients={}", nets_text(&n.written))?,
                Test::ClientsOutside(n) => write!(f, " clients-not-in={}", nets_text(&n.written))?,
                Test::Methods(m) => write!(f, " methods={m:?}")?,
                Test::Ports(p) => write!(f, " ports={p:?}")?,
                Test::ConnectOutside(p) => write!(f, " CONNECT-to-ports-not-in={p:?}")?,
                Test::Hosts(_, text) => write!(f, " hosts=[{text}]")?,
                Test::Paths(p) => write!(f, " paths={p:?}")?,
            }
        }
        if let Some(u) = &self.users {
            write!(f, " users={}", u.text)?;
        }
        Ok(())
    }
}

impl Rules {
    /// The reason a refusal by `rule` gives the client and the log.
    pub fn reason(&self, rule: Rule, f: &Facts) -> String {
        let client = f.client.map_or("a Unix-socket client".to_string(), |c| c.to_string());
        match rule {
            Rule::AllowClients => format!("client {client} is not allowed to use this proxy"),
            Rule::ConnectPorts => format!("CONNECT to port {} is not allowed", f.port),
            Rule::DenyHosts => {
                let found = self
                    .list
                    .iter()
                    .find(|e| e.rule == rule)
                    .and_then(|e| e.tests[0].found(f));
                let pattern = found.map_or(String::new(), |p| p.to_string());
                format!("host {} is denied ({pattern})", f.host)
            }
            Rule::Default => format!("no rule allows {} to {}:{} (default deny)", f.method, f.host, f.port),
            other => format!("denied by rule {}", other.as_str()),
        }
    }
}

#[cfg(test)]
mod tests;
