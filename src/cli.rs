//! What each subcommand does and prints. `run` starts a generation; `check` validates a
//! configuration; `upgrade`, `rollback`, `status` and `stop` are clients of the control socket.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use baton::config::{ADMIN_LISTENER, AccessSink, CONTROL_LISTENER, Config, HostPattern, Parent, Parents, TlsFiles};
use baton::control::{self, DrainOutcome, Event, Request, Status, UpgradeReport};
use baton::daemon::files::remove_own_pid_file;
use baton::daemon::generation::{Exit, Generation};
use baton::daemon::launch::{Launch, absolute, build_runtime};
use baton::proxy::limits::Limits;
use baton::proxy::rules::{Facts, Login, Rules};
use baton::proxy::target::destination;
use baton::tls::{TicketKeys, Validity, certs};
use baton_handoff::listener::needs_bind_capability;
use baton_handoff::{Forecast, Held, Inherited, ListenAddr, Origin, forecast};
use serde::Serialize;
use tokio::runtime::Runtime;

#[derive(clap::Args, Default)]
pub struct RunArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// A free-form label shown by `baton status` (e.g. a build or deploy id).
    #[arg(long)]
    tag: Option<String>,
}

#[derive(clap::Args)]
pub struct ClientArgs {
    /// The configuration of the running baton (locates its control socket).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The control socket, overriding the configuration.
    #[arg(long)]
    control: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args)]
pub struct UpgradeArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Wait until the old generation has drained, then report how many connections finished
    /// and how many were cut at the drain timeout.
    #[arg(long)]
    wait_drain: bool,
}

pub fn run(args: RunArgs, inherited: std::io::Result<Inherited>) -> anyhow::Result<ExitCode> {
    let inherited = inherited.context("cannot take the inherited file descriptors")?;
    // Whatever fails from here until ready, the predecessor hears why (and reports it).
    let reporter = inherited.ready.as_ref().and_then(|r| r.failure_reporter().ok());
    let started = start(args, inherited);
    let (runtime, generation, pid_file) = match started {
        Ok(s) => {
            drop(reporter);
            s
        }
        Err(e) => {
            if let Some(r) = reporter {
                r.report(&format!("{e:#}"));
            }
            return Err(e);
        }
    };
    let exit = runtime.block_on(generation.run());
    // Tasks still parked (reapers, cut tunnels) must not hold the exit up.
    runtime.shutdown_background();
    if !matches!(exit, Exit::HandedOff(_))
        && let Some(path) = &pid_file
        && let Err(e) = remove_own_pid_file(path)
    {
        eprintln!("baton: cannot remove the pid file {}: {e}", path.display());
    }
    Ok(match exit {
        Exit::HandedOff(_) | Exit::Stopped(_) => ExitCode::SUCCESS,
        Exit::Forced => ExitCode::from(1),
    })
}

/// Everything up to ready: the configuration, the log, the launch, the runtime, and the
/// generation's start (listeners, state, readiness).
fn start(args: RunArgs, mut inherited: Inherited) -> anyhow::Result<(Runtime, Generation, Option<PathBuf>)> {
    baton_handoff::process::close_on_exec_all().context("cannot mark inherited file descriptors close-on-exec")?;
    baton_handoff::process::raise_open_files_limit().context("cannot raise the open files limit")?;
    let config_path = args.config.as_deref().map(absolute).transpose()?;
    let config = Config::load(config_path.as_deref())?;
    baton::daemon::logging::init(config.log_format, &config.access_log, inherited.generation)?;
    let launch = Launch::current(&mut inherited, config_path, args.tag)?;
    let runtime = build_runtime(config.workers)?;
    let pid_file = config.pid_file.clone();
    let mut ready = inherited.ready.take();
    let generation = runtime.block_on(Generation::start(launch, config, inherited, &mut ready))?;
    Ok((runtime, generation, pid_file))
}

/// What the open-files limit allows: `run` raises the soft limit to the hard one.
fn check_open_files(migrate: bool) {
    match baton_handoff::process::raise_open_files_limit() {
        Ok(n) => {
            println!(
                "  open files: up to {n} (the hard RLIMIT_NOFILE; a tunnel holds 2 sockets and up to 2 pipes, 6 fds)"
            );
            if migrate {
                println!(
                    "  migrate: live tunnels move at a handoff; the new generation holds them as the old one lets go, batch by batch"
                );
            }
        }
        Err(e) => println!("  warning: cannot read the open files limit: {e}"),
    }
}

/// The systemd unit's settings against the configuration (`daemon::unit`): a warning for
/// each contradiction. Not under systemd, and no unit named: nothing to check.
fn check_unit(config: &Config, unit: Option<&str>) {
    let under_systemd = std::path::Path::new("/run/systemd/system").is_dir();
    let unit = match unit.map(str::to_string).or_else(baton::daemon::unit::own_unit) {
        Some(u) => u,
        None if under_systemd => "baton.service".to_string(),
        None => return,
    };
    match baton::daemon::unit::read(&unit) {
        Ok(settings) => {
            let found = baton::daemon::unit::contradictions(&settings, config);
            if found.is_empty() {
                println!("  unit {unit}: its settings fit the configuration");
            }
            for f in found {
                println!("  warning: unit {unit}: {f}");
            }
        }
        Err(e) => println!("  unit {unit} not checked: {e}"),
    }
}

#[derive(clap::Args)]
pub struct CheckArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// The running baton's control socket (default: the configuration's): the check says
    /// which listeners the next reload adopts, moves, adds and drops.
    #[arg(long, conflicts_with = "offline")]
    control: Option<PathBuf>,
    /// Only validate: ask no running baton (what the unit's ExecStartPre= does, since a
    /// restart must not wait for a control socket systemd holds but nobody serves yet).
    #[arg(long)]
    offline: bool,
    /// Print which access rule decides a request and why each earlier one did not match:
    /// `'CONNECT git.example.com:443'` or `'GET http://mirror.example.org/x'`.
    #[arg(long, value_name = "REQUEST")]
    explain: Option<String>,
    /// The client address of the request to explain.
    #[arg(long, requires = "explain", default_value = "127.0.0.1")]
    client: std::net::IpAddr,
    /// Whom the request to explain logged in as (the password is taken as right).
    #[arg(long, requires = "explain")]
    user: Option<String>,
    /// The server name of the tunnel's TLS ClientHello, for a CONNECT to explain.
    #[arg(long, requires = "explain")]
    sni: Option<String>,
    /// The systemd unit to hold to the configuration (default: the unit this runs in, else
    /// `baton.service` where systemd runs).
    #[arg(long)]
    unit: Option<String>,
}

pub fn check(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let path = args.config.as_deref();
    let config = Config::load(path)?;
    let rules = Rules::load(&config.access)?;
    // Built for its errors (a group the groups file lacks); the buckets are not used.
    Limits::new(&config.limits, config.access.groups.as_deref())?;
    if let Some(request) = &args.explain {
        return explain(&rules, request, args);
    }
    let name = path.map_or_else(|| "embedded default".to_string(), |p| p.display().to_string());
    println!("{name}: configuration ok");
    print_policy(&rules, &config);
    for l in &config.listeners {
        println!("  listener {} on {}", l.name, l.addr);
        if let Some(files) = &l.tls {
            check_certificate(&l.name, files)?;
        }
    }
    if let Some(path) = &config.tls.ticket_keys {
        check_ticket_keys(path)?;
    }
    if let Some(inspect) = &config.inspect {
        check_inspection(inspect)?;
    }
    if config.parents.any_tls() {
        baton::tls::origin::connector(&config.parents.roots).context("[upstream] roots")?;
    }
    println!("  control socket {}", config.control_socket.display());
    match config.workers {
        Some(n) => println!("  workers {n}"),
        None => println!("  workers one per CPU"),
    }
    if let Some(a) = &config.admin {
        println!("  admin (metrics, healthz, status) on {}", a.addr);
    }
    if let AccessSink::File(p) = &config.access_log.sink {
        println!("  access log {}", p.display());
    }
    print_parents(&config.parents);
    check_open_files(config.migrate);
    let t = &config.timeouts;
    let verdict = t.upgrade + t.canary;
    println!(
        "  a handoff reaches its verdict within {verdict:?} (upgrade {:?} + canary {:?})",
        t.upgrade, t.canary
    );
    // The shipped unit's TimeoutStartSec=, which also bounds `systemctl reload`.
    const UNIT_START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
    if verdict >= UNIT_START_TIMEOUT {
        println!(
            "  warning: upgrade + canary ({verdict:?}) must stay below the unit's TimeoutStartSec= (60s in baton.service), or systemd fails the reload first"
        );
    }
    check_unit(&config, args.unit.as_deref());
    if args.offline {
        warn_privileged(&config);
        return Ok(ExitCode::SUCCESS);
    }
    let control = args.control.clone().unwrap_or_else(|| config.control_socket.clone());
    let ok = match client_runtime()?.block_on(running_status(&control)) {
        Some(status) => print_forecast(&config, &status),
        None => {
            println!(
                "  no baton answers on {}: a start binds every listener (or adopts systemd's)",
                control.display()
            );
            warn_privileged(&config);
            true
        }
    };
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// The effective access rules and the limits.
fn print_policy(rules: &Rules, config: &Config) {
    println!("  access rules, first match wins:");
    for line in rules.listing() {
        println!("    {line}");
    }
    let limits = Limits::listing(&config.limits);
    if !limits.is_empty() {
        println!("  limits (a bucket per key, one second's burst):");
        for line in limits {
            println!("    {line}");
        }
    }
}

/// The running baton's status, if one answers within a second.
async fn running_status(control: &Path) -> Option<Status> {
    let asked = tokio::time::timeout(std::time::Duration::from_secs(1), control::status(control));
    asked.await.ok()?.ok().map(|(status, _)| status)
}

/// Every listener the configuration has, in the order a generation opens them.
fn wanted(config: &Config) -> Vec<(&str, ListenAddr)> {
    let mut wanted: Vec<(&str, ListenAddr)> = config
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.addr.clone()))
        .collect();
    wanted.push((CONTROL_LISTENER, ListenAddr::Unix(config.control_socket.clone())));
    if let Some(a) = &config.admin {
        wanted.push((ADMIN_LISTENER, ListenAddr::Tcp(a.addr)));
    }
    wanted
}

/// What the next reload does with each listener, against the serving generation's status;
/// `false` when it would fail: an address to bind below the unprivileged ports that the
/// serving process lacks the capability for.
fn print_forecast(config: &Config, status: &Status) -> bool {
    let held: Vec<Held> = status
        .listeners
        .iter()
        .filter_map(|l| {
            let origin = l.origin.as_deref().and_then(Origin::parse).unwrap_or(Origin::Bound);
            Some(Held {
                name: l.name.clone(),
                addr: l.address.parse().ok()?,
                origin,
            })
        })
        .collect();
    let wanted = wanted(config);
    let refs: Vec<(&str, &ListenAddr)> = wanted.iter().map(|(n, a)| (*n, a)).collect();
    let (forecasts, dropped) = forecast(&held, &refs);
    println!(
        "  the next reload of the serving baton (pid {}, generation {}):",
        status.pid, status.generation
    );
    let mut ok = true;
    for ((name, addr), f) in wanted.iter().zip(&forecasts) {
        let what = match f {
            Forecast::Adopt => "adopted".to_string(),
            Forecast::Rename { from } => format!("adopted (renamed from {from})"),
            Forecast::KeptElsewhere { passed } => {
                format!("kept at {passed}: systemd passes that socket (change the socket unit to move it)")
            }
            Forecast::Move { from } => format!("moved from {from}: bound anew, the old address closes"),
            Forecast::Bind => "added: bound".to_string(),
        };
        println!("    {name} {addr}: {what}");
        let binds = matches!(f, Forecast::Move { .. } | Forecast::Bind);
        if binds && needs_bind_capability(addr, Some(status.pid)) {
            ok = false;
            println!(
                "    error: {name}: binding {addr} needs CAP_NET_BIND_SERVICE, which the serving baton (pid {}) lacks: the reload would fail (grant it with AmbientCapabilities=CAP_NET_BIND_SERVICE and restart, or pass the socket from a socket unit)",
                status.pid
            );
        }
    }
    for h in dropped {
        println!("    {} {}: dropped: closed", h.name, h.addr);
    }
    ok
}

/// Without a running baton: a low port needs a capability this process may lack (unless
/// systemd passes the socket, which this check cannot see).
fn warn_privileged(config: &Config) {
    for (name, addr) in wanted(config) {
        if needs_bind_capability(&addr, None) {
            println!(
                "  warning: {name}: binding {addr} needs CAP_NET_BIND_SERVICE, which this process lacks (fine if systemd passes the socket)"
            );
        }
    }
}

/// `baton check --explain`: the rules on one request, rule by rule.
fn explain(rules: &Rules, request: &str, args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let (method, target) = request
        .split_once(' ')
        .context("--explain wants `METHOD TARGET`, e.g. 'CONNECT git.example.com:443'")?;
    let method = http::Method::from_bytes(method.as_bytes()).context("--explain: not a method")?;
    let req = http::Request::builder()
        .method(method.clone())
        .uri(target.trim())
        .body(())
        .context("--explain: not a request target")?;
    let (host, port) =
        destination(&req).context("--explain: CONNECT wants host:port, any other method an absolute http:// URL")?;
    let f = Facts::new(Some(args.client), &method, host, port);
    let login = args.user.as_deref().map_or(Login::Missing, Login::User);
    let user = args.user.as_deref().map_or(String::new(), |u| format!(" as {u}"));
    println!("{method} {target} from {}{user}", args.client);
    let sni = args.sni.as_deref().filter(|_| method == http::Method::CONNECT);
    for line in explain_lines(rules, f, login, sni) {
        println!("{line}");
    }
    Ok(ExitCode::SUCCESS)
}

/// The rules on `f`, and on the tunnel's server name `sni` as `Policy::check_sni` holds it:
/// a name must be the CONNECT's; a CONNECT to an address is decided on the name.
fn explain_lines(rules: &Rules, mut f: Facts<'_>, login: Login<'_>, sni: Option<&str>) -> Vec<String> {
    let Some(name) = sni.map(|s| s.trim_end_matches('.').to_ascii_lowercase()) else {
        return rules.explain(&f, login);
    };
    if f.ip.is_none() {
        let mut lines = rules.explain(&f, login);
        if name != f.host {
            lines.push(format!(
                "the ClientHello asks for {name}, not {}: sni_mismatch decides: deny",
                f.host
            ));
        }
        return lines;
    }
    f.sni_to_come = true;
    let mut lines = rules.explain(&f, login);
    lines.push(format!("then, on the ClientHello's server name {name}:"));
    lines.extend(rules.explain(&Facts::new(f.client, f.method, &name, f.port), login));
    lines
}

/// `[upstream]` as `baton check` shows it (whether credentials are set, never what they are).
fn print_parents(p: &Parents) {
    let list = |patterns: &[HostPattern]| patterns.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let to = |parent: Option<&std::sync::Arc<Parent>>| match parent {
        Some(p) if p.authorization.is_some() => format!("{p} (with credentials)"),
        Some(p) => p.to_string(),
        None => "directly".to_string(),
    };
    if !p.bypass.is_empty() {
        println!("  bypass (directly): {}", list(&p.bypass));
    }
    for r in &p.routes {
        println!("  route {} -> {}", list(&r.hosts), to(r.parent.as_ref()));
    }
    if p.default.is_some() || !p.routes.is_empty() {
        println!("  every other destination -> {}", to(p.default.as_ref()));
    }
}

/// A TLS listener's pair, as a generation would load it, and its validity: expired or not
/// yet valid is an error (every client would refuse it), under 14 days left a warning.
fn check_certificate(listener: &str, files: &TlsFiles) -> anyhow::Result<()> {
    let cert = certs::load(files).with_context(|| format!("listener `{listener}`"))?;
    println!(
        "    TLS certificate {} (key {}): serial {}, {}",
        files.cert.display(),
        files.key.display(),
        cert.serial,
        cert.subject
    );
    let expires = cert.not_after_text();
    match cert.validity_at(std::time::SystemTime::now()) {
        Validity::Valid { left } => {
            let days = left.as_secs() / 86_400;
            println!("    valid until {expires} ({days} days left)");
            if left < certs::EXPIRY_WARNING {
                println!("    warning: the certificate of listener `{listener}` expires in {days} days ({expires})");
            }
            Ok(())
        }
        Validity::Expired { .. } => anyhow::bail!(
            "listener `{listener}`: the certificate in {} expired at {expires}",
            files.cert.display()
        ),
        Validity::NotYetValid => anyhow::bail!(
            "listener `{listener}`: the certificate in {} is not valid yet",
            files.cert.display()
        ),
    }
}

/// Under this much validity left, `baton check` warns about the inspection CA: every leaf
/// it mints ends with it, and replacing it means every client trusting the new one.
const CA_EXPIRY_WARNING: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);

/// `[inspect]`: a CA certificate (basicConstraints CA:TRUE) with its key, usable to mint, and
/// origin roots that load; a warning when the CA expires within 30 days.
fn check_inspection(inspect: &baton::config::Inspect) -> anyhow::Result<()> {
    let mint = baton::tls::mint::Mint::load(inspect).context("[inspect]")?;
    baton::tls::origin::connector(&inspect.origin_roots).context("[inspect] origin_roots")?;
    let left = mint.ca.left(std::time::SystemTime::now());
    let days = left.as_secs() / 86_400;
    println!(
        "  inspection CA {} ({}): {days} days left, up to {} leaves cached",
        inspect.ca_cert.display(),
        mint.ca.subject,
        inspect.leaf_cache
    );
    if left.is_zero() {
        anyhow::bail!("[inspect] the CA in {} has expired", inspect.ca_cert.display());
    }
    if left < CA_EXPIRY_WARNING {
        println!(
            "  warning: the inspection CA expires in {days} days: clients must be given its successor before then"
        );
    }
    Ok(())
}

/// `[tls] ticket_keys`: usable, and not readable by every user (whoever reads it can
/// decrypt the session tickets, and so resume as any client).
fn check_ticket_keys(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    TicketKeys::start(None, Some(path))?;
    println!("  TLS ticket keys from {}", path.display());
    let mode = std::fs::metadata(path)?.permissions().mode();
    if mode & 0o004 != 0 {
        println!(
            "  warning: {} is readable by every user (mode {:o}): chmod o-r",
            path.display(),
            mode & 0o777
        );
    }
    Ok(())
}

fn control_socket(args: &ClientArgs) -> anyhow::Result<PathBuf> {
    match &args.control {
        Some(p) => Ok(p.clone()),
        None => Ok(Config::load(args.config.as_deref())?.control_socket),
    }
}

fn client_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

pub fn status(args: ClientArgs) -> anyhow::Result<ExitCode> {
    let socket = control_socket(&args)?;
    let (status, line) = client_runtime()?.block_on(control::status(&socket))?;
    if args.json {
        println!("{line}");
    } else {
        print_status(&status);
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(clap::Args)]
pub struct StopArgs {
    #[command(flatten)]
    client: ClientArgs,
    /// Wait until the serving generation has drained and exited (at most this long, e.g.
    /// `60s`); what `ExecStop=` needs, since systemd does not wait for a main process that
    /// is not its own child.
    #[arg(long, value_name = "TIMEOUT", value_parser = humantime_serde::re::humantime::parse_duration)]
    wait: Option<std::time::Duration>,
}

pub fn stop(args: StopArgs) -> anyhow::Result<ExitCode> {
    let socket = control_socket(&args.client)?;
    let runtime = client_runtime()?;
    let serving = match args.wait {
        Some(_) => Some(runtime.block_on(control::status(&socket))?.0.pid),
        None => None,
    };
    let code = events(&socket, Request::Stop, args.client.json)?;
    let (Some(pid), Some(timeout)) = (serving, args.wait) else {
        return Ok(code);
    };
    let deadline = std::time::Instant::now() + timeout;
    while baton_handoff::process::alive(pid) {
        if std::time::Instant::now() >= deadline {
            eprintln!("baton: pid {pid} still runs after {timeout:?}");
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    Ok(code)
}

/// Sends `request`; prints each event as it comes (a line of text, or the JSON line).
fn events(socket: &Path, request: Request, json: bool) -> anyhow::Result<ExitCode> {
    let mut ok = true;
    client_runtime()?.block_on(control::events(socket, request, |ev| {
        ok &= !ev.is_failure();
        if json {
            println!("{}", control::answer_line(&ev).trim_end());
        } else {
            print_event(&ev, request);
        }
    }))?;
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// `baton upgrade`: the phases as lines, or with `--json` one object at the end (the
/// upgrade report: pids, generations, time to ready, connections handed to the drain, with
/// `--wait-drain` how they ended, and the reason on failure).
pub fn upgrade(args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let request = Request::Upgrade {
        wait_drain: args.wait_drain,
    };
    handoff(&args, request)
}

/// `baton rollback`: a handoff to the binary the serving generation's predecessor ran,
/// reported like `baton upgrade`.
pub fn rollback(args: UpgradeArgs) -> anyhow::Result<ExitCode> {
    let request = Request::Rollback {
        wait_drain: args.wait_drain,
    };
    handoff(&args, request)
}

fn handoff(args: &UpgradeArgs, request: Request) -> anyhow::Result<ExitCode> {
    let socket = control_socket(&args.client)?;
    if !args.client.json {
        return events(&socket, request, false);
    }
    let mut summary = UpgradeSummary::default();
    let outcome = client_runtime()?.block_on(control::events(&socket, request, |ev| summary.add(ev)));
    summary.finish(
        outcome.err().map(|e| format!("{:#}", anyhow::Error::from(e))),
        args.wait_drain,
    );
    println!("{}", serde_json::to_string(&summary)?);
    Ok(if summary.result == "ok" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// `baton upgrade --json`'s one object.
#[derive(Serialize, Default)]
struct UpgradeSummary {
    #[serde(skip_serializing_if = "Option::is_none")]
    old_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    old_generation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    new_generation: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ready_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    canary_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    draining_connections: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    draining_tunnels: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    draining_tls_connections: Option<usize>,
    /// With `--wait-drain`: how the drain ended (`null` when the old generation did not say).
    #[serde(skip_serializing_if = "Option::is_none")]
    drain: Option<Option<DrainSummary>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
    result: String,
}

#[derive(Serialize)]
struct DrainSummary {
    connections: usize,
    tunnels: usize,
    finished: usize,
    moved: usize,
    cut: usize,
    drain_ms: u64,
    tls_moved: usize,
    tls_stayed: std::collections::BTreeMap<String, u64>,
}

impl UpgradeSummary {
    fn add(&mut self, ev: Event) {
        match ev {
            Event::Spawned {
                pid,
                generation,
                old_pid,
                old_generation,
            } => {
                (self.new_pid, self.new_generation) = (Some(pid), Some(generation));
                (self.old_pid, self.old_generation) = (Some(old_pid), Some(old_generation));
            }
            Event::Done(r) => self.done(&r),
            Event::Drained(d) => self.drain = Some(Some(DrainSummary::from(d))),
            Event::Failed { reason } => self.fail("failed", reason),
            Event::Refused { reason } => self.fail("refused", reason),
            Event::Error { reason } => self.fail("error", reason),
            Event::Stopping | Event::Unknown => {}
        }
    }

    fn done(&mut self, r: &UpgradeReport) {
        self.result = "ok".into();
        (self.old_pid, self.new_pid) = (Some(r.old_pid), Some(r.new_pid));
        (self.old_generation, self.new_generation) = (Some(r.old_generation), Some(r.new_generation));
        (self.ready_ms, self.canary_ms) = (Some(r.ready_ms), r.canary_ms);
        (self.draining_connections, self.draining_tunnels) = (Some(r.draining_connections), Some(r.draining_tunnels));
        self.draining_tls_connections = r.draining_tls_connections;
    }

    fn fail(&mut self, result: &str, reason: String) {
        self.result = result.into();
        self.reason = Some(reason);
    }

    /// Settles the result once the answer ended (`error`: the connection failed).
    fn finish(&mut self, error: Option<String>, wait_drain: bool) {
        if let Some(e) = error {
            self.fail("error", e);
        }
        if self.result.is_empty() {
            self.fail("error", "the control connection closed before the outcome".into());
        }
        if self.result == "ok" && wait_drain && self.drain.is_none() {
            self.drain = Some(None);
            eprintln!("baton: the old generation ended without reporting its drain");
        }
    }
}

impl From<DrainOutcome> for DrainSummary {
    fn from(d: DrainOutcome) -> DrainSummary {
        DrainSummary {
            connections: d.connections,
            tunnels: d.tunnels,
            finished: d.finished,
            moved: d.moved,
            cut: d.cut,
            drain_ms: d.drain_ms,
            tls_moved: d.tls_moved,
            tls_stayed: d.tls_stayed,
        }
    }
}

fn print_event(ev: &Event, request: Request) {
    let what = match request {
        Request::Rollback { .. } => "rollback",
        _ => "upgrade",
    };
    match ev {
        Event::Spawned { pid, generation, .. } => println!("new generation {generation} started: pid {pid}"),
        Event::Done(r) => print_done(r),
        Event::Drained(d) => print_drained(d),
        Event::Failed { reason } => eprintln!("{what} failed, old generation serves on: {reason}"),
        Event::Refused { reason } => eprintln!("{what} refused: {reason}"),
        Event::Error { reason } => eprintln!("error: {reason}"),
        Event::Stopping => println!("stopping: draining"),
        Event::Unknown => {}
    }
}

fn print_drained(d: &DrainOutcome) {
    println!(
        "old pid {} drained in {} ms: {} finished, {} moved to the new generation, {} cut at the drain timeout",
        d.old_pid, d.drain_ms, d.finished, d.moved, d.cut
    );
    if d.tls_moved > 0 || !d.tls_stayed.is_empty() {
        let stayed: Vec<String> = d.tls_stayed.iter().map(|(why, n)| format!("{n} {why}")).collect();
        let stayed = if stayed.is_empty() {
            "none".to_string()
        } else {
            stayed.join(", ")
        };
        println!("  TLS: {} moved; drained here: {stayed}", d.tls_moved);
    }
}

fn print_done(r: &UpgradeReport) {
    let (connections, tunnels) = (r.draining_connections, r.draining_tunnels);
    let connections = match r.draining_tls_connections {
        Some(tls) if tls > 0 => format!("{connections} connections ({tls} TLS)"),
        _ => format!("{connections} connections"),
    };
    let tunnels = match r.draining_bumped_connections {
        Some(bumped) if bumped > 0 => format!("{tunnels} ({bumped} bumped)"),
        _ => tunnels.to_string(),
    };
    match r.canary_ms {
        Some(canary) => {
            println!(
                "ready after {} ms: pid {} (generation {})",
                r.ready_ms, r.new_pid, r.new_generation
            );
            println!(
                "canary passed after {canary} ms: pid {} serving; old pid {} draining {connections}, {tunnels} tunnels",
                r.new_pid, r.old_pid
            );
        }
        None => println!(
            "ready after {} ms: pid {} (generation {}) serving; old pid {} draining {connections}, {tunnels} tunnels",
            r.ready_ms, r.new_pid, r.new_generation, r.old_pid
        ),
    }
}

/// When a generation started, as a UTC date and an age (`2026-12-07T21:52:23Z, 5m 3s ago`).
fn started(unix: u64, now: SystemTime) -> String {
    let at = UNIX_EPOCH + Duration::from_secs(unix);
    // Whole seconds: the start is only known to the second.
    let age = Duration::from_secs(now.duration_since(at).unwrap_or_default().as_secs());
    format!(
        "{}, {} ago",
        humantime::format_rfc3339_seconds(at),
        humantime::format_duration(age)
    )
}

fn print_status(s: &Status) {
    println!("pid         {}", s.pid);
    println!("generation  {}", s.generation);
    let tag = s.tag.as_deref().map(|t| format!(" ({t})")).unwrap_or_default();
    println!("version     {}{tag}", s.version);
    println!("state       {}", s.state);
    println!("workers     {}", s.workers);
    println!("started     {}", started(s.started_unix, SystemTime::now()));
    println!(
        "connections {}",
        with_adopted(s.active_connections, s.adopted_connections)
    );
    println!("tunnels     {}", with_adopted(s.active_tunnels, s.adopted_tunnels));
    if s.adopted_tls > 0 {
        println!("tls         {} of those moved in with their TLS state", s.adopted_tls);
    }
    println!(
        "handoff     {}",
        if s.handoff_in_progress { "in progress" } else { "none" }
    );
    let now = std::time::SystemTime::now();
    for d in &s.draining {
        let age = d
            .draining_seconds(now)
            .map(|a| format!(" for {a:.1} s"))
            .unwrap_or_default();
        println!(
            "draining    pid {} (generation {}){age}: {} connections, {} tunnels",
            d.pid, d.generation, d.connections, d.tunnels
        );
    }
    for l in &s.listeners {
        let inherited = if l.adopted { " (inherited)" } else { "" };
        println!("listener    {} {}{inherited}", l.name, l.address);
    }
}

/// `active`, and how many of them came from the previous generation when some did.
fn with_adopted(active: usize, adopted: u64) -> String {
    if adopted > 0 {
        format!("{active} ({adopted} moved in from the previous generation)")
    } else {
        active.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start reads as a UTC date and whole units of age; a clock behind the start
    /// (another host's, or set back) shows an age of zero rather than failing.
    #[test]
    fn the_start_is_a_date_and_an_age() {
        let now = UNIX_EPOCH + Duration::from_millis(1_796_626_085_000 + 303_900);
        assert_eq!(started(1_796_626_085, now), "2026-12-07T06:48:05Z, 5m 3s ago");
        let behind = UNIX_EPOCH + Duration::from_secs(1_796_626_000);
        assert_eq!(started(1_796_626_085, behind), "2026-12-07T06:48:05Z, 0s ago");
    }
}
