//! `[access]`: who may use the proxy and where it may go, as typed values. The shorthand keys
//! (`allow_clients`, `htpasswd`, `connect_ports`, `deny_hosts`, the destination CIDRs) and
//! the ordered `[[access.rule]]` list, first match wins (`proxy::rules` decides). Files the
//! rules name (`@FILE` host lists, the groups file) are read when a generation starts, so a
//! broken one fails that generation, naming the file and line; here they are only paths.

use std::path::{Path, PathBuf};

use http::Method;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use super::hosts::HostPattern;
use super::{line_of, loopback_v4, loopback_v6, resolve};

/// Who may use the proxy and where it may go; see `proxy::policy` and `proxy::rules`.
#[derive(Debug, Clone)]
pub struct Access {
    pub allow_clients: Vec<IpNet>,
    pub htpasswd: Option<PathBuf>,
    pub realm: String,
    /// Failed logins a client may make a minute before it gets 429; 0: no limit.
    pub auth_failures: u32,
    /// This instance's token in `Via` (`1.1 <token>`); a request that carries it has looped.
    /// `None`: a token derived from the host name and the first listener's port that does
    /// not reveal either (see `proxy::policy::default_via_token`).
    pub via_token: Option<String>,
    /// Whether destinations on this host or its link (loopback, unspecified, link-local)
    /// may be reached; refused by default (`rule=local_destination`).
    pub allow_local_destinations: bool,
    pub connect_ports: Vec<u16>,
    pub deny_destinations: Vec<IpNet>,
    pub allow_destinations: Vec<IpNet>,
    pub deny_hosts: Vec<String>,
    /// `secrets_readable_by_others`: an htpasswd file others may read is used, with a
    /// warning.
    pub htpasswd_readable_by_others: bool,
    /// Apache htgroup file: `name: user user …`, for `@name` in a rule's `users`.
    pub groups: Option<PathBuf>,
    /// The ordered rules, first match wins.
    pub rules: Vec<RuleConfig>,
    /// What a request no rule matched gets: `deny` whenever rules exist, unless set.
    pub default: Action,
    /// Whether a tunnel's TLS ClientHello is read and its SNI held to the rules.
    pub sni: SniMode,
    /// What a tunnel gets whose first bytes carry no SNI (not TLS, no server name, or
    /// nothing within `timeouts.sni`).
    pub no_sni: Action,
    /// The protocols an absolute-form request may switch to with `Upgrade` (lowercase; the
    /// origin's 101 makes the connection a tunnel). Any other `Upgrade` is stripped.
    pub upgrade_protocols: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// What a rule that allows a CONNECT does with the TLS inside it: relay it as it is
/// (`allow`, `splice`), or terminate it with a minted certificate and serve the HTTP/1.1
/// inside through the proxy (`bump`, with `[inspect]`). Nothing is bumped unless a rule says
/// so. On a request that is not a CONNECT both are `allow`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsAction {
    #[default]
    Splice,
    Bump,
}

/// A rule's `action` as written: `allow` and `deny`, or an allow that says what to do with
/// a tunnel's TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum RawAction {
    Allow,
    Deny,
    Bump,
    Splice,
}

/// `[access] sni`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SniMode {
    /// A ClientHello's SNI is held to the rules and must name the CONNECT target.
    #[default]
    Match,
    /// Tunnels are relayed as they come (the first bytes are not read).
    Ignore,
}

/// One `[[access.rule]]`: every key it gives must match; an omitted key matches anything.
#[derive(Debug, Clone)]
pub struct RuleConfig {
    pub name: String,
    /// Where it is written, for messages about it.
    pub line: usize,
    pub action: Action,
    /// `bump` or `splice` (an `allow` splices).
    pub tls: TlsAction,
    pub clients: Option<Vec<IpNet>>,
    pub users: Option<Vec<UserEntry>>,
    pub hosts: Option<Vec<HostEntry>>,
    pub ports: Option<Vec<u16>>,
    pub methods: Option<Vec<Method>>,
    /// Path prefixes (`/admin/`): a request whose path starts with one matches; a CONNECT,
    /// which has no path, never does (a bumped tunnel's requests have theirs).
    pub paths: Option<Vec<String>>,
}

/// An entry of a rule's `users`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserEntry {
    /// `*`: any user who logs in (Squid's `proxy_auth REQUIRED`).
    Any,
    User(String),
    /// `@name`: the members of a group of the `groups` file.
    Group(String),
}

/// An entry of a rule's `hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEntry {
    Pattern(HostPattern),
    /// `@FILE`: a list, one pattern a line (`#` comments), relative to the configuration.
    File(PathBuf),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAccess {
    pub(super) allow_clients: Vec<IpNet>,
    pub(super) htpasswd: Option<PathBuf>,
    pub(super) realm: String,
    auth_failures: u32,
    pub(super) via_token: Option<String>,
    allow_local_destinations: bool,
    connect_ports: Vec<u16>,
    deny_destinations: Vec<IpNet>,
    allow_destinations: Vec<IpNet>,
    deny_hosts: Vec<String>,
    pub(super) groups: Option<PathBuf>,
    default: Option<Action>,
    rule: Vec<Spanned<RawRule>>,
    sni: SniMode,
    no_sni: Action,
    upgrade_protocols: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    action: RawAction,
    clients: Option<Vec<IpNet>>,
    users: Option<Vec<String>>,
    hosts: Option<Vec<Spanned<String>>>,
    ports: Option<Vec<u16>>,
    methods: Option<Vec<String>>,
    paths: Option<Vec<String>>,
}

impl Default for RawAccess {
    fn default() -> Self {
        RawAccess {
            allow_clients: vec![loopback_v4(), loopback_v6()],
            htpasswd: None,
            realm: "baton".into(),
            auth_failures: 10,
            via_token: None,
            allow_local_destinations: false,
            // Squid's default: CONNECT is for TLS.
            connect_ports: vec![443],
            deny_destinations: Vec::new(),
            allow_destinations: Vec::new(),
            deny_hosts: Vec::new(),
            groups: None,
            default: None,
            rule: Vec::new(),
            sni: SniMode::Match,
            // The closed choice: a CONNECT to 443 that is not TLS with a server name is
            // something no rule has seen.
            no_sni: Action::Deny,
            // What clients with an HTTP proxy configured send (Squid 5 needs
            // `http_upgrade_request_protocols` for it). Under the request's own rules.
            upgrade_protocols: vec!["websocket".into()],
        }
    }
}

/// Names the built-in rules log under; a configured rule may not take one.
pub const BUILT_IN_RULES: &[&str] = &[
    "allow_clients",
    "htpasswd",
    "auth_failures",
    "connect_ports",
    "deny_hosts",
    "deny_destinations",
    "allow_destinations",
    "loop",
    "local_destination",
    "max_connections_per_client",
    "max_connections",
    "default",
    "sni_mismatch",
    "no_sni",
    "requests_per_second",
    "bandwidth",
];

/// `[access]` validated: relative paths resolved against `base`, rules checked (errors name
/// the line of `text` they are on).
pub(super) fn access(
    raw: RawAccess,
    text: &str,
    base: Option<&Path>,
    secrets_readable: bool,
) -> Result<Access, String> {
    let mut rules = Vec::with_capacity(raw.rule.len());
    for (i, r) in raw.rule.iter().enumerate() {
        let line = line_of(text, r.span().start);
        let rule = rule(r.get_ref(), i, line, text, base).map_err(|m| format!("line {line}, [[access.rule]]: {m}"))?;
        if rules.iter().any(|o: &RuleConfig| o.name == rule.name) {
            return Err(format!(
                "line {line}, [[access.rule]]: a second rule named `{}`",
                rule.name
            ));
        }
        check_users(&rule, raw.htpasswd.is_some(), raw.groups.is_some())?;
        rules.push(rule);
    }
    let default = raw
        .default
        .unwrap_or(if rules.is_empty() { Action::Allow } else { Action::Deny });
    let upgrade_protocols = upgrade_protocols(&raw.upgrade_protocols)?;
    Ok(Access {
        allow_clients: raw.allow_clients,
        htpasswd: raw.htpasswd.map(|p| resolve(base, p)),
        realm: raw.realm,
        auth_failures: raw.auth_failures,
        via_token: raw.via_token,
        allow_local_destinations: raw.allow_local_destinations,
        connect_ports: raw.connect_ports,
        deny_destinations: raw.deny_destinations,
        allow_destinations: raw.allow_destinations,
        deny_hosts: raw.deny_hosts.iter().map(|h| h.to_ascii_lowercase()).collect(),
        htpasswd_readable_by_others: secrets_readable,
        groups: raw.groups.map(|p| resolve(base, p)),
        rules,
        default,
        sni: raw.sni,
        no_sni: raw.no_sni,
        upgrade_protocols,
    })
}

/// `upgrade_protocols`: tokens (RFC 9110 §7.8: a name, optionally `/version`), lowercased.
/// `h2c` is refused: HTTP/2 over the origin connection would take it out of the proxy's
/// view, and the cleartext upgrade is what request smuggling through proxies has used.
fn upgrade_protocols(names: &[String]) -> Result<Vec<String>, String> {
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let lower = name.to_ascii_lowercase();
        let token = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        let valid = match lower.split_once('/') {
            Some((n, v)) => token(n) && token(v),
            None => token(&lower),
        };
        if !valid {
            return Err(format!(
                "[access] upgrade_protocols: `{name}` is not a protocol name (e.g. websocket)"
            ));
        }
        if lower == "h2c" || lower.starts_with("h2c/") {
            return Err(
                "[access] upgrade_protocols: `h2c` is never relayed (HTTP/2 would bypass the proxy's rules)".into(),
            );
        }
        out.push(lower);
    }
    Ok(out)
}

fn rule(r: &RawRule, index: usize, line: usize, text: &str, base: Option<&Path>) -> Result<RuleConfig, String> {
    let name = r.name.clone().unwrap_or_else(|| format!("rule-{}", index + 1));
    let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !valid {
        return Err(format!("`name = {name:?}`: letters, digits, `-`, `_` and `.` only"));
    }
    if BUILT_IN_RULES.contains(&name.as_str()) {
        return Err(format!("`name = {name:?}` is a built-in rule's name: choose another"));
    }
    let empty = [
        ("clients", r.clients.as_ref().is_some_and(Vec::is_empty)),
        ("users", r.users.as_ref().is_some_and(Vec::is_empty)),
        ("hosts", r.hosts.as_ref().is_some_and(Vec::is_empty)),
        ("ports", r.ports.as_ref().is_some_and(Vec::is_empty)),
        ("methods", r.methods.as_ref().is_some_and(Vec::is_empty)),
        ("paths", r.paths.as_ref().is_some_and(Vec::is_empty)),
    ];
    if let Some((key, _)) = empty.iter().find(|(_, e)| *e) {
        return Err(format!(
            "rule `{name}`: `{key}` is empty, which nothing matches: leave the key out to match anything"
        ));
    }
    if r.ports.as_ref().is_some_and(|p| p.contains(&0)) {
        return Err(format!("rule `{name}`: port 0 is no port"));
    }
    if let Some(p) = r.paths.iter().flatten().find(|p| !p.starts_with('/')) {
        return Err(format!("rule `{name}`: path `{p}` does not start with `/`"));
    }
    let (action, tls) = match r.action {
        RawAction::Allow | RawAction::Splice => (Action::Allow, TlsAction::Splice),
        RawAction::Bump => (Action::Allow, TlsAction::Bump),
        RawAction::Deny => (Action::Deny, TlsAction::Splice),
    };
    Ok(RuleConfig {
        line,
        action,
        tls,
        paths: r.paths.clone(),
        clients: r.clients.as_ref().map(|c| c.iter().map(IpNet::trunc).collect()),
        users: r
            .users
            .as_ref()
            .map(|u| u.iter().map(|e| user_entry(e)).collect())
            .transpose()
            .map_err(|m| format!("rule `{name}`: {m}"))?,
        hosts: r
            .hosts
            .as_ref()
            .map(|h| h.iter().map(|e| host_entry(e, text, base)).collect())
            .transpose()
            .map_err(|m| format!("rule `{name}`: {m}"))?,
        ports: r.ports.clone(),
        methods: r
            .methods
            .as_ref()
            .map(|m| m.iter().map(|m| method(m)).collect())
            .transpose()
            .map_err(|m| format!("rule `{name}`: {m}"))?,
        name,
    })
}

pub(super) fn user_entry(e: &str) -> Result<UserEntry, String> {
    match e {
        "*" => Ok(UserEntry::Any),
        _ if e.is_empty() || e.contains(':') || e.chars().any(|c| c.is_control() || c.is_whitespace()) => Err(format!(
            "`{e}` is not a user name (no `:`, spaces or control characters)"
        )),
        _ => Ok(match e.strip_prefix('@') {
            Some(group) if !group.is_empty() => UserEntry::Group(group.to_string()),
            Some(_) => return Err("`@` alone names no group".into()),
            None => UserEntry::User(e.to_string()),
        }),
    }
}

fn host_entry(e: &Spanned<String>, text: &str, base: Option<&Path>) -> Result<HostEntry, String> {
    let at = line_of(text, e.span().start);
    match e.get_ref().strip_prefix('@') {
        Some("") => Err(format!("line {at}: `@` alone names no file")),
        Some(file) => Ok(HostEntry::File(resolve(base, PathBuf::from(file)))),
        None => HostPattern::parse(e.get_ref())
            .map(HostEntry::Pattern)
            .map_err(|m| format!("line {at}: {m}")),
    }
}

fn method(m: &str) -> Result<Method, String> {
    let upper = m.to_ascii_uppercase();
    if upper != m {
        return Err(format!(
            "method `{m}`: methods are case-sensitive and written in capitals (`{upper}`)"
        ));
    }
    Method::from_bytes(m.as_bytes()).map_err(|_| format!("`{m}` is not a method"))
}

/// A rule that names users needs the htpasswd file that logs them in, and `@group` the
/// groups file.
fn check_users(rule: &RuleConfig, htpasswd: bool, groups: bool) -> Result<(), String> {
    let Some(users) = &rule.users else { return Ok(()) };
    let line = rule.line;
    if !htpasswd {
        return Err(format!(
            "line {line}, [[access.rule]] `{}` names users, but [access] htpasswd is not set: nothing could log them in",
            rule.name
        ));
    }
    if !groups && users.iter().any(|u| matches!(u, UserEntry::Group(_))) {
        return Err(format!(
            "line {line}, [[access.rule]] `{}` names a @group, but [access] groups (an htgroup file) is not set",
            rule.name
        ));
    }
    Ok(())
}
