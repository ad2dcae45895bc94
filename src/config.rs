//! Configuration: one TOML file (or the embedded default), parsed with serde and validated once
//! into typed values. Errors name the file, the line and the key; nothing downstream sees strings.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

pub mod access;
mod admin;
pub mod hosts;
pub mod inspect;
pub mod rates;
mod upstream;
pub use access::{Access, Action, RuleConfig, SniMode};
pub use admin::{AdminConfig, AdminToken};
pub use hosts::HostPattern;
pub use inspect::{Inspect, OriginRoots};
pub use rates::{ClientRates, UserRates, UserTable};
pub use upstream::{Parent, Parents, Route};

/// The configuration used when no file is given: one loopback listener, loopback clients only.
pub const EMBEDDED_DEFAULT: &str = r#"
[[listener]]
name = "proxy"
address = "127.0.0.1:8080"
"#;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

pub use baton_handoff::ListenAddr;

/// The name the control socket carries when it is handed over with the listeners.
pub const CONTROL_LISTENER: &str = "control";
/// The name the admin listener carries across handoffs.
pub const ADMIN_LISTENER: &str = "admin";

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub name: String,
    pub addr: ListenAddr,
    /// `tls = { cert, key }`: clients speak TLS to the proxy (a "secure web proxy").
    pub tls: Option<TlsFiles>,
}

/// A TLS listener's certificate chain and private key (PEM files, read by each generation at
/// start, so a handoff reloads them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// `secrets_readable_by_others`: a key file others may read is used, with a warning.
    pub key_readable_by_others: bool,
    /// The protocols offered by ALPN, in the server's order of preference.
    pub alpn: Vec<Alpn>,
}

/// A protocol a TLS listener speaks, by its ALPN name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Alpn {
    #[serde(rename = "h2")]
    H2,
    #[serde(rename = "http/1.1")]
    Http11,
}

impl Alpn {
    pub fn id(self) -> &'static [u8] {
        match self {
            Alpn::H2 => b"h2",
            Alpn::Http11 => b"http/1.1",
        }
    }
}

/// `[tls]`: what every TLS listener shares.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// A client that has not completed its handshake within this is disconnected.
    pub handshake_timeout: Duration,
    /// Handshakes in progress at once; a new connection beyond it evicts the oldest.
    pub max_handshakes: usize,
    /// Session-ticket key material shared by a fleet (at least 32 bytes); `None`: keys of
    /// baton's own, handed from generation to generation.
    pub ticket_keys: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Timeouts {
    pub header_read: Duration,
    pub tunnel_idle: Duration,
    pub upstream_idle: Duration,
    pub upstream_connect: Duration,
    pub upstream_response: Duration,
    pub drain: Duration,
    pub upgrade: Duration,
    /// How long a ready successor is watched before it takes over; zero: not at all.
    pub canary: Duration,
    /// How long a tunnel's first bytes are awaited for its SNI (`[access] sni = "match"`).
    pub sni: Duration,
    /// How long a connection lives before it is kept in systemd's fd store (under systemd
    /// with an fd store only); zero: never.
    pub stash_after: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    /// Client connections at once, tunnels included (a tunnel keeps its connection's slot).
    pub max_connections: usize,
    /// Client connections at once from one client (an IPv4 address, an IPv6 /64, or all
    /// Unix-socket clients together); `None`: only `max_connections` bounds them.
    pub max_connections_per_client: Option<usize>,
    /// Older generations that may drain at once; a trigger beyond is refused.
    pub max_draining_generations: usize,
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    /// `None`: no limit.
    pub max_body_bytes: Option<u64>,
    /// Idle origin connections kept per origin (per next hop); more are closed.
    pub idle_per_host: usize,
    /// Idle origin connections kept across all next hops; beyond it the least recently
    /// used one is closed.
    pub idle_total: usize,
    /// `[limits.per_client]`: request rate and bandwidth of each client.
    pub per_client: ClientRates,
    /// `[limits.per_user]`: request rate and bandwidth of each user who logged in.
    pub per_user: UserRates,
    /// Streams open at once on one HTTP/2 connection.
    pub h2_max_streams: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[log] access_format`: the operational formats, or Squid's native access-log format
/// (`squid`), which log analysers for Squid read (GoAccess, SARG, Calamaris).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessFormat {
    #[default]
    Text,
    Json,
    Squid,
}

impl From<LogFormat> for AccessFormat {
    fn from(f: LogFormat) -> AccessFormat {
        match f {
            LogFormat::Text => AccessFormat::Text,
            LogFormat::Json => AccessFormat::Json,
        }
    }
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from (`None` for the embedded default).
    pub source: Option<PathBuf>,
    pub listeners: Vec<ListenerConfig>,
    pub control_socket: PathBuf,
    pub pid_file: Option<PathBuf>,
    /// `workers`: runtime worker threads; `None` (0 in the file): one per CPU this process may
    /// run on. One worker means tokio's single-threaded scheduler (see `main.rs`).
    pub workers: Option<usize>,
    /// `migrate`: at a handoff, live CONNECT tunnels and idle connections move to the new
    /// generation, those on TLS listeners with their TLS record state (else they drain
    /// here, as before).
    pub migrate: bool,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub access: Access,
    pub log_format: LogFormat,
    /// `[admin]`: the metrics/health/status listener, if configured.
    pub admin: Option<AdminConfig>,
    /// `[log] access`, `access_format`: where access lines go.
    pub access_log: AccessLog,
    /// `[upstream]`: parent proxies and which destinations go through them.
    pub parents: Parents,
    pub tls: TlsSettings,
    /// `[inspect]`: the CA that bumped tunnels' leaves are minted with, if configured.
    pub inspect: Option<Inspect>,
}

/// Where the access log (target `baton::access`) goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum AccessSink {
    #[default]
    Stderr,
    /// Opened (append) by each generation at start, so a handoff after logrotate's rename
    /// writes to the new file.
    File(PathBuf),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AccessLog {
    pub sink: AccessSink,
    pub format: AccessFormat,
}

fn yes() -> bool {
    true
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    listener: Vec<toml::Spanned<RawListener>>,
    control_socket: Option<PathBuf>,
    pid_file: Option<PathBuf>,
    #[serde(default)]
    workers: usize,
    #[serde(default = "yes")]
    migrate: bool,
    #[serde(default)]
    secrets_readable_by_others: bool,
    #[serde(default)]
    timeouts: RawTimeouts,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    access: access::RawAccess,
    #[serde(default)]
    log: RawLog,
    admin: Option<admin::RawAdmin>,
    #[serde(default)]
    upstream: upstream::RawUpstream,
    #[serde(default)]
    tls: RawTls,
    inspect: Option<inspect::RawInspect>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTls {
    #[serde(with = "humantime_serde")]
    handshake_timeout: Duration,
    max_handshakes: usize,
    ticket_keys: Option<PathBuf>,
}

impl Default for RawTls {
    fn default() -> Self {
        RawTls {
            handshake_timeout: Duration::from_secs(10),
            max_handshakes: 1024,
            ticket_keys: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTlsFiles {
    cert: PathBuf,
    key: PathBuf,
    /// Default: `["h2", "http/1.1"]`.
    alpn: Option<Vec<Alpn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListener {
    name: String,
    address: Option<SocketAddr>,
    path: Option<PathBuf>,
    tls: Option<RawTlsFiles>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawTimeouts {
    #[serde(with = "humantime_serde")]
    header_read: Duration,
    #[serde(with = "humantime_serde")]
    tunnel_idle: Duration,
    #[serde(with = "humantime_serde")]
    upstream_idle: Duration,
    #[serde(with = "humantime_serde")]
    upstream_connect: Duration,
    #[serde(with = "humantime_serde")]
    upstream_response: Duration,
    #[serde(with = "humantime_serde")]
    drain: Duration,
    #[serde(with = "humantime_serde")]
    upgrade: Duration,
    #[serde(with = "humantime_serde")]
    canary: Duration,
    #[serde(with = "humantime_serde")]
    sni: Duration,
    #[serde(with = "humantime_serde")]
    stash_after: Duration,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            header_read: Duration::from_secs(10),
            tunnel_idle: Duration::from_secs(300),
            upstream_idle: Duration::from_secs(30),
            upstream_connect: Duration::from_secs(10),
            upstream_response: Duration::from_secs(60),
            drain: Duration::from_secs(30),
            upgrade: Duration::from_secs(30),
            canary: Duration::from_secs(2),
            // Server-speaks-first protocols send nothing first: they wait this long.
            sni: Duration::from_secs(5),
            stash_after: Duration::from_secs(1),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLimits {
    max_connections: usize,
    max_connections_per_client: usize,
    max_draining_generations: usize,
    max_header_bytes: usize,
    max_uri_bytes: usize,
    max_body_bytes: u64,
    idle_per_host: usize,
    idle_total: usize,
    per_client: rates::RawRates,
    per_user: rates::RawRates,
    h2_max_streams: u32,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_connections: 10_000,
            // One client may take a bounded share: raising max_connections for a crowd
            // does not let one client take the crowd's room (0: no bound of its own).
            max_connections_per_client: 256,
            max_draining_generations: 4,
            max_header_bytes: 64 * 1024,
            max_uri_bytes: 8192,
            max_body_bytes: 0,
            idle_per_host: 32,
            idle_total: 1024,
            per_client: rates::RawRates::default(),
            per_user: rates::RawRates::default(),
            // nginx's http2_max_concurrent_streams is 128, Go's 250, the h2 crate's none.
            h2_max_streams: 100,
        }
    }
}

fn loopback_v4() -> IpNet {
    IpNet::V4(
        ipnet::Ipv4Net::new(std::net::Ipv4Addr::LOCALHOST, 8)
            .expect("8 is a valid prefix")
            .trunc(),
    )
}

fn loopback_v6() -> IpNet {
    IpNet::V6(ipnet::Ipv6Net::new(std::net::Ipv6Addr::LOCALHOST, 128).expect("128 is a valid prefix"))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    format: LogFormat,
    /// "stderr" or a file path (relative: to the configuration file's directory).
    access: Option<String>,
    /// Defaults to `format`.
    access_format: Option<AccessFormat>,
}

impl Config {
    /// Loads `path`, or the embedded default when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            None => Config::parse(EMBEDDED_DEFAULT, None),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.display().to_string(),
                    source,
                })?;
                Config::parse(&text, Some(p))
            }
        }
    }

    /// Parses and validates configuration text; `path` names it in errors, and relative paths
    /// in it are relative to its directory.
    pub fn parse(text: &str, path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::parse_in(text, path, &RuntimeEnv::current())
    }

    /// [`Config::parse`] with `env` deciding the default control socket.
    fn parse_in(text: &str, path: Option<&Path>, env: &RuntimeEnv) -> Result<Config, ConfigError> {
        let name = path.map_or_else(|| "<embedded default>".to_string(), |p| p.display().to_string());
        let invalid = |message: String| ConfigError::Invalid {
            path: name.clone(),
            message,
        };
        let base = path.and_then(Path::parent);
        let raw: RawConfig = toml::from_str(text).map_err(|e| invalid(describe_toml_error(text, &e)))?;
        let mut listeners = listeners(text, &raw.listener, base).map_err(&invalid)?;
        for files in listeners.iter_mut().filter_map(|l| l.tls.as_mut()) {
            files.key_readable_by_others = raw.secrets_readable_by_others;
        }
        check_values(&raw).map_err(&invalid)?;
        let per_client = rates::per_client(&raw.limits.per_client, text).map_err(&invalid)?;
        let (htpasswd, groups) = (raw.access.htpasswd.is_some(), raw.access.groups.is_some());
        let per_user = rates::per_user(&raw.limits.per_user, text, htpasswd, groups).map_err(&invalid)?;
        let access = access::access(raw.access, text, base, raw.secrets_readable_by_others).map_err(&invalid)?;
        let admin = admin::admin(raw.admin.as_ref(), &listeners, base).map_err(&invalid)?;
        let access_log = access_log(&raw.log, base).map_err(&invalid)?;
        let parents = upstream::parents(text, &raw.upstream, base).map_err(&invalid)?;
        let control_socket = match raw.control_socket {
            Some(p) => resolve(base, p),
            None => default_control_socket(env).ok_or_else(|| invalid(no_default_control_socket(path)))?,
        };
        let inspect = raw
            .inspect
            .map(|i| inspect::inspect(i, base, raw.secrets_readable_by_others))
            .transpose()
            .map_err(&invalid)?;
        if inspect.is_none()
            && let Some(r) = access.rules.iter().find(|r| r.tls == access::TlsAction::Bump)
        {
            return Err(invalid(format!(
                "line {}, [[access.rule]] `{}`: action = \"bump\" needs an [inspect] section (ca_cert, ca_key) to mint certificates with",
                r.line, r.name
            )));
        }
        let tls = TlsSettings {
            handshake_timeout: raw.tls.handshake_timeout,
            max_handshakes: raw.tls.max_handshakes,
            ticket_keys: raw.tls.ticket_keys.map(|p| resolve(base, p)),
        };
        Ok(Config {
            tls,
            inspect,
            admin,
            access_log,
            source: path.map(Path::to_path_buf),
            listeners,
            control_socket,
            pid_file: raw.pid_file.map(|p| resolve(base, p)),
            workers: (raw.workers > 0).then_some(raw.workers),
            migrate: raw.migrate,
            timeouts: Timeouts::from(raw.timeouts),
            limits: Limits::new(raw.limits, per_client, per_user),
            access,
            log_format: raw.log.format,
            parents,
        })
    }
}

/// The key that lets others read secret files (htpasswd files, TLS private keys).
pub const SECRETS_KEY: &str = "secrets_readable_by_others";

/// Whether a secret file at `path` with permission bits `mode` may be used. As ssh holds private keys:
/// others (neither the owner nor the group) may not read or write it, nor may its group write
/// it (group read is allowed: `ssl-cert`-style groups give a service its keys that way).
/// `allowed` (`secrets_readable_by_others = true`): used anyway, with a warning. `Err` names
/// the mode and the key.
pub fn check_secret_mode(path: &Path, mode: u32, allowed: bool) -> Result<(), String> {
    let mode = mode & 0o7777;
    if mode & 0o026 == 0 {
        return Ok(());
    }
    let what = format!("mode {mode:04o} lets others read or write this secret file, or its group write it");
    if allowed {
        tracing::warn!(path = %path.display(), "{what} (used anyway: {SECRETS_KEY} = true)");
        return Ok(());
    }
    Err(format!(
        "{what}: chmod o-rw,g-w {}, or set {SECRETS_KEY} = true to use it anyway",
        path.display()
    ))
}

/// Every path in the configuration (`control_socket`, `pid_file`, `access.htpasswd`,
/// `log.access`, a listener's `path` and `tls` files, `tls.ticket_keys`, `upstream.credentials`, `admin.token_file`): a relative one is relative to the directory of the
/// file it is written in (`base`), never to the working directory.
fn resolve(base: Option<&Path>, p: PathBuf) -> PathBuf {
    match base {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    }
}

/// The `[[listener]]` tables, each checked; errors name the line.
fn listeners(
    text: &str,
    raw: &[toml::Spanned<RawListener>],
    base: Option<&Path>,
) -> Result<Vec<ListenerConfig>, String> {
    let mut listeners: Vec<ListenerConfig> = Vec::new();
    for spanned in raw {
        let line = line_of(text, spanned.span().start);
        let l = spanned.get_ref();
        let at = |msg: &str| format!("line {line}, key `listener` ({}): {msg}", l.name);
        let addr = match (&l.address, &l.path) {
            (Some(a), None) => ListenAddr::Tcp(*a),
            (None, Some(p)) => ListenAddr::Unix(resolve(base, p.clone())),
            _ => return Err(at("give exactly one of `address` (host:port) or `path` (unix socket)")),
        };
        if l.name.is_empty() || l.name.contains(':') || l.name == CONTROL_LISTENER {
            return Err(at("`name` must be non-empty, without ':', and not \"control\""));
        }
        if listeners.iter().any(|o| o.name == l.name) {
            return Err(at("duplicate listener name"));
        }
        if l.tls.as_ref().and_then(|t| t.alpn.as_ref()).is_some_and(Vec::is_empty) {
            return Err(at("`tls.alpn` is empty: give \"h2\", \"http/1.1\" or both"));
        }
        // Port 0 (any free port) twice is two sockets, not one address twice.
        let ephemeral = matches!(addr, ListenAddr::Tcp(a) if a.port() == 0);
        if !ephemeral && listeners.iter().any(|o| o.addr == addr) {
            return Err(at("duplicate listener address"));
        }
        listeners.push(ListenerConfig {
            name: l.name.clone(),
            addr,
            tls: l.tls.as_ref().map(|t| TlsFiles {
                cert: resolve(base, t.cert.clone()),
                key: resolve(base, t.key.clone()),
                key_readable_by_others: false,
                alpn: t.alpn.clone().unwrap_or_else(|| vec![Alpn::H2, Alpn::Http11]),
            }),
        });
    }
    if listeners.is_empty() {
        return Err("no [[listener]] configured".into());
    }
    Ok(listeners)
}

/// Values serde cannot check by their type alone.
fn check_values(raw: &RawConfig) -> Result<(), String> {
    let t = &raw.timeouts;
    for (key, d) in [
        ("timeouts.drain", t.drain),
        ("timeouts.upgrade", t.upgrade),
        ("timeouts.sni", t.sni),
    ] {
        if d.is_zero() {
            return Err(format!("key `{key}`: must be greater than zero"));
        }
    }
    let rules = [
        (raw.workers > 1024, "key `workers`: at most 1024 (0: one per CPU)"),
        (
            raw.limits.max_connections == 0,
            "key `limits.max_connections`: must be at least 1",
        ),
        (
            raw.limits.max_draining_generations == 0,
            "key `limits.max_draining_generations`: must be at least 1",
        ),
        (
            raw.access.realm.contains('"') || raw.access.realm.chars().any(char::is_control),
            "key `access.realm`: no quotes or control characters",
        ),
        (
            raw.access.via_token.as_deref().is_some_and(|v| !is_via_token(v)),
            "key `access.via_token`: a token (letters, digits and !#$%&'*+-.^_`|~:, no spaces)",
        ),
        (
            raw.limits.max_uri_bytes < 64,
            "key `limits.max_uri_bytes`: must be at least 64",
        ),
        (
            raw.limits.max_header_bytes < 8192,
            "key `limits.max_header_bytes`: must be at least 8192",
        ),
        (
            raw.limits.h2_max_streams == 0,
            "key `limits.h2_max_streams`: must be at least 1",
        ),
        (
            raw.tls.handshake_timeout.is_zero(),
            "key `tls.handshake_timeout`: must be greater than zero",
        ),
        (
            raw.tls.max_handshakes == 0,
            "key `tls.max_handshakes`: must be at least 1",
        ),
    ];
    match rules.iter().find(|(broken, _)| *broken) {
        Some((_, message)) => Err(message.to_string()),
        None => Ok(()),
    }
}

/// `[log] access`: a relative file is relative to the configuration file's directory, `base`.
fn access_log(raw: &RawLog, base: Option<&Path>) -> Result<AccessLog, String> {
    let sink = match raw.access.as_deref() {
        None | Some("stderr") => AccessSink::Stderr,
        Some("") => return Err("key `log.access`: \"stderr\" or a file path".into()),
        Some(f) => AccessSink::File(resolve(base, PathBuf::from(f))),
    };
    Ok(AccessLog {
        sink,
        format: raw.access_format.unwrap_or(raw.format.into()),
    })
}

impl From<RawTimeouts> for Timeouts {
    fn from(t: RawTimeouts) -> Timeouts {
        Timeouts {
            header_read: t.header_read,
            tunnel_idle: t.tunnel_idle,
            upstream_idle: t.upstream_idle,
            upstream_connect: t.upstream_connect,
            upstream_response: t.upstream_response,
            drain: t.drain,
            upgrade: t.upgrade,
            canary: t.canary,
            sni: t.sni,
            stash_after: t.stash_after,
        }
    }
}

impl Limits {
    fn new(l: RawLimits, per_client: ClientRates, per_user: UserRates) -> Limits {
        Limits {
            max_connections: l.max_connections,
            max_connections_per_client: (l.max_connections_per_client > 0).then_some(l.max_connections_per_client),
            max_draining_generations: l.max_draining_generations,
            max_header_bytes: l.max_header_bytes,
            max_uri_bytes: l.max_uri_bytes,
            max_body_bytes: (l.max_body_bytes > 0).then_some(l.max_body_bytes),
            idle_per_host: l.idle_per_host,
            idle_total: l.idle_total,
            per_client,
            per_user,
            h2_max_streams: l.h2_max_streams,
        }
    }
}

/// The default control socket for root outside systemd.
pub const ROOT_CONTROL_SOCKET: &str = "/run/baton/control.sock";

/// What the default control socket depends on: who runs baton and two variables.
struct RuntimeEnv {
    root: bool,
    /// `$RUNTIME_DIRECTORY`: set by systemd for a unit with `RuntimeDirectory=`.
    runtime_directory: Option<std::ffi::OsString>,
    /// `$XDG_RUNTIME_DIR`: a login session's private directory.
    xdg_runtime_dir: Option<std::ffi::OsString>,
}

impl RuntimeEnv {
    fn current() -> RuntimeEnv {
        RuntimeEnv {
            root: nix::unistd::geteuid().is_root(),
            runtime_directory: std::env::var_os("RUNTIME_DIRECTORY"),
            xdg_runtime_dir: std::env::var_os("XDG_RUNTIME_DIR"),
        }
    }
}

/// The control socket when the configuration sets none: `$RUNTIME_DIRECTORY/control.sock`
/// under systemd (its first directory when it lists several); else, for root,
/// `/run/baton/control.sock` (whatever `$XDG_RUNTIME_DIR` says: under sudo it may still name
/// the invoking user's directory); else `$XDG_RUNTIME_DIR/baton.sock`. Otherwise there is no
/// default: a directory every user can write to (/tmp) never is one. Relative values are
/// ignored, as the XDG Base Directory specification says.
fn default_control_socket(env: &RuntimeEnv) -> Option<PathBuf> {
    let runtime_directory = env
        .runtime_directory
        .as_ref()
        .and_then(|v| std::env::split_paths(v).next())
        .filter(|p| p.is_absolute());
    if let Some(dir) = runtime_directory {
        return Some(dir.join("control.sock"));
    }
    if env.root {
        return Some(PathBuf::from(ROOT_CONTROL_SOCKET));
    }
    let xdg = env.xdg_runtime_dir.as_ref().map(PathBuf::from);
    xdg.filter(|p| p.is_absolute()).map(|dir| dir.join("baton.sock"))
}

/// The error when `control_socket` has no default here.
fn no_default_control_socket(path: Option<&Path>) -> String {
    let fix = match path {
        Some(_) => "set `control_socket` in this file",
        None => {
            "give `--config FILE` with `control_socket` set (the clients take the same `--config`, or `--control SOCKET`)"
        }
    };
    format!(
        "key `control_socket` has no default here: baton does not run as root and neither $RUNTIME_DIRECTORY nor $XDG_RUNTIME_DIR is set; {fix}, to a path in a directory only this user can write to"
    )
}

/// A `Via` received-by token (RFC 9110 §7.6.3: a pseudonym or host[:port]).
fn is_via_token(v: &str) -> bool {
    !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~:".contains(&b))
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// toml's message already says "line N, column M" and shows the key; keep it on one line.
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim();
    match e.span() {
        Some(span) => {
            let line = line_of(text, span.start);
            let src = text.lines().nth(line - 1).unwrap_or("").trim();
            format!("line {line}: {msg} (at `{src}`)")
        }
        None => msg.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 31's keys default to the closed choice; 0 lifts the per-client bound.
    #[test]
    fn bounds_and_local_destinations_default_closed() {
        let c = Config::parse(EMBEDDED_DEFAULT, None).unwrap();
        assert!(!c.access.allow_local_destinations);
        assert_eq!(c.limits.max_connections_per_client, Some(256));
        assert_eq!(c.limits.idle_total, 1024);
        let text = format!("{EMBEDDED_DEFAULT}\n[limits]\nmax_connections_per_client = 0\n");
        assert_eq!(
            Config::parse(&text, None).unwrap().limits.max_connections_per_client,
            None
        );
    }

    #[test]
    fn embedded_default_is_one_loopback_listener() {
        let c = Config::load(None).expect("embedded default parses");
        assert_eq!(c.listeners.len(), 1);
        assert_eq!(c.listeners[0].name, "proxy");
        assert_eq!(c.listeners[0].addr, ListenAddr::Tcp("127.0.0.1:8080".parse().unwrap()));
        let loopback: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap(), "::1/128".parse().unwrap()];
        assert_eq!(c.access.allow_clients, loopback);
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let text = "[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n[timeouts]\ndrian = \"1s\"\n";
        let err = Config::parse(text, Some(Path::new("x.toml"))).unwrap_err().to_string();
        assert!(err.starts_with("x.toml: line 5"), "{err}");
        assert!(err.contains("drian"), "{err}");
    }

    #[test]
    fn bad_address_names_line() {
        let text = "[[listener]]\nname = \"p\"\naddress = \"nope\"\n";
        let err = Config::parse(text, Some(Path::new("x.toml"))).unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn duplicate_names_rejected() {
        let text = "[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:2\"\n";
        let err = Config::parse(text, None).unwrap_err().to_string();
        assert!(
            err.contains("line 4") && err.contains("duplicate listener name"),
            "{err}"
        );
    }

    #[test]
    fn durations_are_human() {
        let text = "[[listener]]\nname = \"p\"\naddress = \"[::1]:1\"\n[timeouts]\ndrain = \"1500ms\"\n";
        let c = Config::parse(text, None).unwrap();
        assert_eq!(c.timeouts.drain, Duration::from_millis(1500));
    }

    fn env(root: bool, runtime_directory: Option<&str>, xdg_runtime_dir: Option<&str>) -> RuntimeEnv {
        RuntimeEnv {
            root,
            runtime_directory: runtime_directory.map(Into::into),
            xdg_runtime_dir: xdg_runtime_dir.map(Into::into),
        }
    }

    #[test]
    fn default_control_socket_is_never_in_a_shared_directory() {
        let cases = [
            (
                env(false, Some("/run/baton"), Some("/run/user/1000")),
                Some("/run/baton/control.sock"),
            ),
            (
                env(true, Some("/run/baton:/run/other"), None),
                Some("/run/baton/control.sock"),
            ),
            (env(true, None, None), Some(ROOT_CONTROL_SOCKET)),
            (env(true, None, Some("/run/user/1000")), Some(ROOT_CONTROL_SOCKET)),
            (
                env(false, None, Some("/run/user/1000")),
                Some("/run/user/1000/baton.sock"),
            ),
            (env(false, Some("relative"), Some("also/relative")), None),
            (env(false, None, None), None),
        ];
        for (env, want) in cases {
            assert_eq!(default_control_socket(&env).as_deref(), want.map(Path::new));
        }
    }

    #[test]
    fn no_default_control_socket_is_an_error_naming_the_file() {
        let text = "[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n";
        let err = Config::parse_in(text, Some(Path::new("/etc/b.toml")), &env(false, None, None))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("/etc/b.toml: key `control_socket`"), "{err}");
        assert!(err.contains("set `control_socket` in this file"), "{err}");
        let err = Config::parse_in(EMBEDDED_DEFAULT, None, &env(false, None, None))
            .unwrap_err()
            .to_string();
        assert!(err.contains("--config") && err.contains("control_socket"), "{err}");
        let with_socket = format!("control_socket = \"/x/c.sock\"\n{text}");
        let c = Config::parse_in(&with_socket, None, &env(false, None, None)).unwrap();
        assert_eq!(c.control_socket, Path::new("/x/c.sock"));
    }

    #[test]
    fn relative_paths_are_relative_to_the_file() {
        let text = "control_socket = \"run/c.sock\"\npid_file = \"b.pid\"\n\
            [[listener]]\nname = \"u\"\npath = \"u.sock\"\n\
            [access]\nhtpasswd = \"htpasswd\"\n[log]\naccess = \"log/access.log\"\n";
        let c = Config::parse(text, Some(Path::new("/etc/baton/baton.toml"))).unwrap();
        assert_eq!(c.control_socket, Path::new("/etc/baton/run/c.sock"));
        assert_eq!(c.pid_file.as_deref(), Some(Path::new("/etc/baton/b.pid")));
        assert_eq!(c.listeners[0].addr, ListenAddr::Unix("/etc/baton/u.sock".into()));
        assert_eq!(c.access.htpasswd.as_deref(), Some(Path::new("/etc/baton/htpasswd")));
        assert_eq!(c.access_log.sink, AccessSink::File("/etc/baton/log/access.log".into()));
        let absolute = text.replace("\"run/", "\"/r/").replace("\"htpasswd\"", "\"/h\"");
        let c = Config::parse(&absolute, Some(Path::new("/etc/baton/baton.toml"))).unwrap();
        assert_eq!(c.control_socket, Path::new("/r/c.sock"));
        assert_eq!(c.access.htpasswd.as_deref(), Some(Path::new("/h")));
        // A file named without a directory: relative to the working directory, where it is.
        let c = Config::parse(text, Some(Path::new("baton.toml"))).unwrap();
        assert_eq!(c.access.htpasswd.as_deref(), Some(Path::new("htpasswd")));
    }

    #[test]
    fn access_format_follows_format_and_may_be_squid_alone() {
        let listener = "[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n";
        let parse = |log: &str| Config::parse(&format!("{listener}[log]\n{log}"), Some(Path::new("x.toml")));
        assert_eq!(parse("").unwrap().access_log.format, AccessFormat::Text);
        assert_eq!(
            parse("format = \"json\"\n").unwrap().access_log.format,
            AccessFormat::Json
        );
        let squid = parse("format = \"json\"\naccess_format = \"squid\"\n").unwrap();
        assert_eq!(
            (squid.log_format, squid.access_log.format),
            (LogFormat::Json, AccessFormat::Squid)
        );
        // Squid's format is for access lines only.
        let err = parse("format = \"squid\"\n").unwrap_err().to_string();
        assert!(err.contains("line 5") && err.contains("squid"), "{err}");
    }

    #[test]
    fn tls_listener_files_are_relative_to_the_file() {
        let text = "[[listener]]\nname = \"s\"\naddress = \"127.0.0.1:1\"\n\
            tls = { cert = \"tls/cert.pem\", key = \"/k/key.pem\" }\n\
            [[listener]]\nname = \"p\"\naddress = \"127.0.0.1:2\"\n\
            [tls]\nhandshake_timeout = \"3s\"\nticket_keys = \"ticket.key\"\n";
        let c = Config::parse(text, Some(Path::new("/etc/baton/baton.toml"))).unwrap();
        let files = c.listeners[0].tls.as_ref().expect("tls");
        assert_eq!(files.cert, Path::new("/etc/baton/tls/cert.pem"));
        assert_eq!(files.key, Path::new("/k/key.pem"));
        assert!(c.listeners[1].tls.is_none());
        assert_eq!(c.tls.handshake_timeout, Duration::from_secs(3));
        assert_eq!(c.tls.max_handshakes, 1024);
        assert_eq!(c.tls.ticket_keys.as_deref(), Some(Path::new("/etc/baton/ticket.key")));
        let missing_key = text.replace(", key = \"/k/key.pem\"", "");
        let err = Config::parse(&missing_key, Some(Path::new("x.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 4") && err.contains("key"), "{err}");
        let zero = text.replace("\"3s\"", "\"0s\"");
        let err = Config::parse(&zero, None).unwrap_err().to_string();
        assert!(err.contains("tls.handshake_timeout"), "{err}");
    }

    #[test]
    fn workers_zero_means_auto_and_is_bounded() {
        let listener = "[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n";
        assert_eq!(Config::parse(listener, None).unwrap().workers, None);
        let c = Config::parse(&format!("workers = 1\n{listener}"), None).unwrap();
        assert_eq!(c.workers, Some(1));
        let err = Config::parse(&format!("workers = 5000\n{listener}"), Some(Path::new("x.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.toml") && err.contains("workers"), "{err}");
        let err = Config::parse(&format!("workers = -1\n{listener}"), Some(Path::new("x.toml")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 1") && err.contains("workers"), "{err}");
    }
}
