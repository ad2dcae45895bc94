//! A generation: one running baton process, from start to exit. It opens (adopts or binds)
//! its listeners, serves, and on a trigger hands off to a successor (`handoff`: spawn →
//! ready → canary window → drain) or rolls back. State changes happen only in
//! [`Generation::run`]'s loop:
//!
//! ```text
//! Serving ──trigger──▶ HandingOff ──ready──▶ Canary ──passed──▶ Draining ──drained──▶ exit 0
//!    ▲                     │ exit / timeout     │ exit / silence
//!    └──── rollback ───────┴────────────────────┘ (accepting again)
//! Serving ──SIGTERM──▶ Draining (a second SIGTERM exits at once; a successor is killed)
//! ```

mod handoff;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use baton_handoff::{
    Drain, DrainReport, Inherited, ListenAddr, Listener, Origin, PredecessorChannel, ReadySignal, open_listener,
};
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{ADMIN_LISTENER, CONTROL_LISTENER, Config};
use crate::control::{DrainOutcome, Event, ListenerStatus, Status};
use crate::daemon::admin::{self, AdminContext};
use crate::daemon::admin_guard::AdminGuard;
use crate::daemon::control_server::{self, Command, HandoffTo, Trigger};
use crate::daemon::files::write_pid_file;
use crate::daemon::launch::Launch;
use crate::daemon::notify;
use crate::daemon::state_dir::{DrainingFile, StateDir};
use crate::daemon::traffic::Sampler;
use crate::proxy::limits::Limits;
use crate::proxy::migrate::Kind as MoveKind;
use crate::proxy::policy::{self, Policy};
use crate::proxy::stash::{self, Stash, Stored};
use crate::proxy::{ConnectionSettings, Connections, Proxy, ProxySettings};
use crate::tls::TlsListeners;
use crate::tls::tickets::FD_NAME as TICKET_KEYS_FD;

use handoff::{Next, PendingHandoff};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Serving,
    HandingOff,
    /// A ready successor serves; this generation no longer accepts and watches it.
    Canary,
    Draining,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Serving => "serving",
            State::HandingOff => "handing off",
            State::Canary => "watching the new generation",
            State::Draining => "draining",
        }
    }
}

/// Why the generation ended.
#[derive(Debug)]
pub enum Exit {
    /// Handed over to a successor and drained.
    HandedOff(DrainReport),
    /// Stopped by a signal or `baton stop` and drained.
    Stopped(DrainReport),
    /// A second stop signal: exit now, cutting what is left.
    Forced,
}

type DrainFuture = Pin<Box<dyn Future<Output = DrainReport> + Send>>;

pub struct Generation {
    launch: Launch,
    config: Config,
    number: u64,
    pid: u32,
    started: SystemTime,
    state: State,
    listeners: Vec<Listener>,
    drain: Drain,
    /// Serves the proxy listeners' connections.
    connections: Arc<Connections>,
    /// The TLS listeners' acceptors and the ticket keys handed to a successor.
    tls: TlsListeners,
    commands: mpsc::Receiver<Command>,
    /// For the accept loops of the control socket and the admin listener, and the pinger.
    commands_tx: mpsc::Sender<Command>,
    control_clients: TaskTracker,
    admin: Option<AdminContext>,
    /// Cancelled to stop the proxy and control accept loops (a successor's canary window, a
    /// drain); a fresh one resumes them.
    accepting: CancellationToken,
    /// The same for the admin listener, which a generation stopping without a successor
    /// keeps serving (`/healthz` 503) until it exits.
    admin_accepting: CancellationToken,
    /// While its predecessor's canary window runs: triggers are refused.
    predecessor_watching: bool,
    /// Names of inherited sockets this generation did not keep under that name: removed
    /// from systemd's fd store when it becomes the serving generation.
    stale_stored: Vec<String>,
    stop_requests: u32,
    /// Shared with the other generations: draining counts and the metrics ledger.
    shared: StateDir,
    /// While draining: this generation's remaining work, published for the serving one.
    draining_file: Option<DrainingFile>,
    /// `baton upgrade --wait-drain`: told how the drain ended.
    drain_waiter: Option<mpsc::Sender<Event>>,
    /// With an admin listener: adds this generation's requests to the status page's history.
    traffic: Option<Sampler>,
}

impl Generation {
    /// Opens every listener (adopting inherited ones) and does everything else that can fail,
    /// then starts accepting and reports ready (to systemd and the pid file when it has no
    /// predecessor, else to the predecessor, which hands those over at its verdict).
    ///
    /// `ready` is the predecessor's readiness pipe (`None` for a first generation): taken
    /// when this generation reports ready, and left in place if it fails before, so that
    /// the caller can pass the reason on ([`ReadySignal::signal_failed`]).
    pub async fn start(
        launch: Launch,
        config: Config,
        mut inherited: Inherited,
        ready: &mut Option<ReadySignal>,
    ) -> anyhow::Result<Generation> {
        let (commands_tx, commands) = mpsc::channel(64);
        let inherited_names = inherited.names().to_vec();
        spawn_signal_listener(commands_tx.clone())?;
        let drain = Drain::new();
        // First: a control socket or state directory another user could tamper with is
        // refused before anything serves.
        let shared = StateDir::open(&config.control_socket)?;
        if let Some(dir) = config.pid_file.as_deref().and_then(std::path::Path::parent) {
            // The pid file is written at the verdict, by the predecessor: a successor that
            // could not have it written fails now, before it serves, not after.
            let is_dir = std::fs::metadata(dir).is_ok_and(|m| m.is_dir());
            anyhow::ensure!(
                is_dir || dir.as_os_str().is_empty(),
                "pid file directory {} does not exist",
                dir.display()
            );
        }
        // Certificates before any socket: a broken one fails the handoff, not a listener.
        let tls = TlsListeners::load(&config, inherited.take_extra(TICKET_KEYS_FD))?;
        let stored = stored_connections(ready.is_none(), &mut inherited, &config);
        // The admin listener opens before the proxy's: its address is one of this proxy's own.
        let admin_listener = open_admin(&config, &mut inherited).await?;
        let admin_bound = admin_listener.as_ref().map(|l| l.bound.clone());
        let (mut opened, connections) = open_proxy(&config, &mut inherited, &drain, admin_bound).await?;
        let control_addr = ListenAddr::Unix(config.control_socket.clone());
        opened.push(open_listener(&mut inherited, CONTROL_LISTENER, &control_addr).await?);
        if ready.is_none() {
            shared.start_ledger();
        }
        let mut admin = None;
        let mut traffic = None;
        if let (Some(listener), Some(a)) = (admin_listener, &config.admin) {
            traffic = Some(Sampler::spawn(shared.clone()));
            opened.push(listener);
            admin = Some(AdminContext {
                drain: drain.clone(),
                commands: commands_tx.clone(),
                state: shared.clone(),
                generation: inherited.generation,
                guard: Arc::new(AdminGuard::new(a)),
            });
        }
        close_unused(&mut inherited);
        let stale_stored = stale_listeners(inherited_names, &opened);
        let mut generation = Generation {
            launch,
            number: inherited.generation,
            pid: std::process::id(),
            started: SystemTime::now(),
            state: State::Serving,
            listeners: opened,
            drain,
            connections,
            tls,
            commands,
            commands_tx,
            control_clients: TaskTracker::new(),
            admin,
            accepting: CancellationToken::new(),
            admin_accepting: CancellationToken::new(),
            predecessor_watching: false,
            stale_stored,
            stop_requests: 0,
            config,
            shared,
            draining_file: None,
            drain_waiter: None,
            traffic,
        };
        generation.report_ready(ready, inherited.channel.take())?;
        generation.connections.recover(stored);
        Ok(generation)
    }

    /// The pid file and systemd first (a first generation), then accepting, then the
    /// predecessor hears that we serve.
    fn report_ready(
        &mut self,
        ready: &mut Option<ReadySignal>,
        channel: Option<PredecessorChannel>,
    ) -> anyhow::Result<()> {
        let watched = ready.is_some() && channel.is_some();
        if !watched {
            self.claim_main_process()?;
        }
        // Every generation feeds systemd's watchdog from the start (NotifyAccess=all): a
        // successor in its canary window is not the main process yet, but soon will be.
        notify::spawn_watchdog();
        self.start_accepting();
        self.log_serving();
        let Some(r) = ready.take() else { return Ok(()) };
        let reported = match (watched, self.config.migrate) {
            (true, true) => r.signal_ready_taking_transfer(),
            (true, false) => r.signal_ready_pinging(),
            (false, _) => r.signal_ready(),
        };
        reported.context("cannot report readiness to the previous generation")?;
        if let Some(channel) = channel {
            self.predecessor_watching = true;
            notify::status(&format!("{} (the previous generation watches it)", self.status_line()));
            let connections = self.connections.clone();
            spawn_pinger(channel, self.drain.clone(), self.commands_tx.clone(), connections);
        }
        Ok(())
    }

    /// Becomes the unit's main process and writes the pid file: a first generation at start,
    /// a successor whose predecessor went away without a verdict.
    fn claim_main_process(&self) -> anyhow::Result<()> {
        notify::ready(&self.status_line());
        self.sync_fd_store();
        if let Some(path) = &self.config.pid_file {
            write_pid_file(path).with_context(|| format!("cannot write pid file {}", path.display()))?;
        }
        Ok(())
    }

    /// Puts the listeners this generation bound itself into systemd's fd store, once it is
    /// the serving generation (a successor that fails its canary must not leave its sockets
    /// there).
    fn sync_fd_store(&self) {
        let bound: Vec<_> = self
            .listeners
            .iter()
            .filter(|l| l.origin == Origin::Bound)
            .map(|l| (l.name.as_str(), l.socket.as_fd()))
            .collect();
        notify::sync_fd_store(&self.stale_stored, &bound);
        // Serving now: live connections go into the store too.
        if let Some(stash) = self.connections.proxy().stash() {
            stash.activate();
        }
    }

    fn log_serving(&self) {
        let addrs: Vec<String> = self
            .listeners
            .iter()
            .map(|l| {
                let inherited = if l.opened.is_adopted() { " (inherited)" } else { "" };
                format!("{}={}{inherited}", l.name, l.bound)
            })
            .collect();
        info!(
            version = env!("CARGO_PKG_VERSION"),
            pid = self.pid,
            generation = self.number,
            listeners = %addrs.join(", "),
            "baton serving"
        );
    }

    /// Starts (or resumes) accepting on every listener with fresh stop tokens.
    fn start_accepting(&mut self) {
        self.accepting = CancellationToken::new();
        self.admin_accepting = CancellationToken::new();
        for l in &self.listeners {
            let socket = l.socket.clone();
            match l.name.as_str() {
                CONTROL_LISTENER => control_server::spawn_control_loop(
                    socket,
                    self.accepting.clone(),
                    self.commands_tx.clone(),
                    self.control_clients.clone(),
                ),
                ADMIN_LISTENER => match &self.admin {
                    Some(ctx) => admin::spawn(socket, ctx.clone(), self.admin_accepting.clone()),
                    None => warn!("an admin listener without [admin]: not served"),
                },
                name => self.connections.spawn_accept_loop(
                    name.to_string(),
                    socket,
                    self.tls.acceptor(name),
                    self.accepting.clone(),
                ),
            }
        }
    }

    /// Stops every accept loop; the listening sockets stay open (and their queues fill).
    fn stop_accepting(&self) {
        self.accepting.cancel();
        self.admin_accepting.cancel();
    }

    /// The controller: the one place state changes. Returns when this generation is done.
    pub async fn run(mut self) -> Exit {
        let mut handoff: Option<PendingHandoff> = None;
        let mut draining: Option<(DrainFuture, bool)> = None;
        loop {
            tokio::select! {
                Some(cmd) = self.commands.recv() => {
                    if let Some(exit) = self.command(cmd, &mut handoff, &mut draining).await {
                        return exit;
                    }
                }
                step = async { (&mut handoff.as_mut().expect("guarded").future).await }, if handoff.is_some() => {
                    let pending = handoff.take().expect("guarded");
                    match self.handoff_step(pending, step).await {
                        Next::Continue(p) => handoff = Some(p),
                        Next::Drain(d) => draining = Some((d, true)),
                        Next::Over => {}
                    }
                }
                report = async { (&mut draining.as_mut().expect("guarded").0).await }, if draining.is_some() => {
                    let handed_off = draining.as_ref().is_some_and(|d| d.1);
                    return self.exit_drained(handed_off, report).await;
                }
            }
        }
    }

    /// One command; `Some` when the generation must exit now.
    async fn command(
        &mut self,
        cmd: Command,
        handoff: &mut Option<PendingHandoff>,
        draining: &mut Option<(DrainFuture, bool)>,
    ) -> Option<Exit> {
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status(handoff.is_some()));
            }
            Command::Upgrade { trigger, to, reply } => {
                if let Some(p) = self.begin_handoff((trigger, to), reply, handoff.as_ref()) {
                    *handoff = Some(p);
                }
            }
            Command::PredecessorVerdict(verdict, taken) => {
                self.predecessor_verdict(verdict);
                let _ = taken.send(());
            }
            Command::Stop(trigger) => {
                self.stop_requests += 1;
                if self.stop_requests > 1 {
                    let (connections, tunnels) = (self.drain.active_connections(), self.drain.active_tunnels());
                    warn!(%trigger, connections, tunnels, "second stop request: exiting now");
                    self.draining_file = None;
                    return Some(Exit::Forced);
                }
                if let Some(h) = handoff.take() {
                    h.abandon("baton is stopping").await;
                }
                if draining.is_none() {
                    info!(%trigger, "stopping: draining");
                    notify::stopping("stopping: draining");
                    *draining = Some((self.begin_drain(), false));
                }
            }
        }
        None
    }

    async fn exit_drained(&mut self, handed_off: bool, report: DrainReport) -> Exit {
        let (connections, tunnels, cut, ms) = (report.connections, report.tunnels, report.cut, report.millis);
        let (moved, stayed) = self.connections.proxy().migration().counts();
        info!(connections, tunnels, moved, stayed, cut, ms, "drained; exiting");
        self.drain_finished(handed_off, &report).await;
        // Every connection ended or moved on: this generation's table leaves the store.
        if let Some(stash) = self.connections.proxy().stash() {
            stash.retire();
        }
        // Let `baton upgrade` read its report before the process goes away.
        self.control_clients.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.control_clients.wait()).await;
        if handed_off {
            Exit::HandedOff(report)
        } else {
            Exit::Stopped(report)
        }
    }

    /// Stops accepting (our listener fds close; a successor keeps the sockets) and drains.
    fn begin_drain(&mut self) -> DrainFuture {
        // What is handed to the drain, counted before it begins: an idle keep-alive connection
        // closes at once and counts as finished.
        let (connections, tunnels) = (self.drain.active_connections(), self.drain.active_tunnels());
        self.state = State::Draining;
        self.accepting.cancel();
        self.drain.begin();
        self.listeners.clear();
        self.draining_file = Some(self.shared.publish_draining(self.number, self.drain.clone()));
        let drain = self.drain.clone();
        let timeout = self.config.timeouts.drain;
        notify::status(&format!("draining {} connections", connections + tunnels));
        Box::pin(async move {
            let mut report = drain.drain_until(timeout).await;
            report.connections = report.connections.max(connections);
            report.tunnels = report.tunnels.max(tunnels);
            report
        })
    }

    /// Records a handoff's drain in the ledger, tells a `--wait-drain` client, and removes
    /// the draining file (the serving generation stops reporting us).
    async fn drain_finished(&mut self, handed_off: bool, report: &DrainReport) {
        let migration = self.connections.proxy().migration();
        let (moved, _stayed) = migration.counts();
        let mut outcome = DrainOutcome::from_report(self.pid, report, moved as usize);
        outcome.tls_moved = migration.tls_moved.load(std::sync::atomic::Ordering::Relaxed) as usize;
        outcome.tls_stayed = migration.tls_stayed_by_reason();
        if handed_off {
            self.shared.record(|l| {
                l.drain.observe(report.millis as f64 / 1000.0);
                l.drain_finished += outcome.finished as u64;
                l.drain_cut += outcome.cut as u64;
                l.drained(self.pid, report.millis, outcome.cut);
            });
        }
        self.draining_file = None;
        if let Some(t) = &self.traffic {
            t.flush();
        }
        if let Some(w) = self.drain_waiter.take() {
            let _ = w.send(Event::Drained(outcome)).await;
        }
    }

    fn status_line(&self) -> String {
        format!("serving generation {} (pid {})", self.number, self.pid)
    }

    fn status(&self, handoff_running: bool) -> Status {
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            tag: self.launch.tag.clone(),
            pid: self.pid,
            generation: self.number,
            started_unix: self
                .started
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
            state: self.state.name().to_string(),
            workers: tokio::runtime::Handle::current().metrics().num_workers(),
            listeners: self
                .listeners
                .iter()
                .map(|l| ListenerStatus {
                    name: l.name.clone(),
                    address: l.bound.to_string(),
                    adopted: l.opened.is_adopted(),
                    origin: Some(l.origin.as_str().to_string()),
                })
                .collect(),
            active_connections: self.drain.active_connections(),
            active_tunnels: self.drain.active_tunnels(),
            handoff_in_progress: handoff_running,
            config: self.launch.config_path.as_ref().map(|p| p.display().to_string()),
            draining: self.shared.draining(),
            // The previous generation forked this one: it is our parent while it watches.
            watched_by: self
                .predecessor_watching
                .then(|| nix::unistd::getppid().as_raw() as u32),
            adopted_tunnels: self.connections.proxy().migration().adopted.get(MoveKind::Tunnel),
            adopted_connections: self.connections.proxy().migration().adopted.get(MoveKind::Connection),
            adopted_tls: self
                .connections
                .proxy()
                .migration()
                .adopted_tls
                .load(std::sync::atomic::Ordering::Relaxed),
        }
    }
}

async fn open_admin(config: &Config, inherited: &mut Inherited) -> anyhow::Result<Option<Listener>> {
    let Some(a) = &config.admin else { return Ok(None) };
    Ok(Some(
        open_listener(inherited, ADMIN_LISTENER, &ListenAddr::Tcp(a.addr)).await?,
    ))
}

/// Opens the proxy listeners and builds the proxy on them (accepting starts later). They
/// open first because the policy needs their addresses (and `admin`'s, the admin
/// listener's) to refuse requests that would loop into the proxy itself.
async fn open_proxy(
    config: &Config,
    inherited: &mut Inherited,
    drain: &Drain,
    admin: Option<ListenAddr>,
) -> anyhow::Result<(Vec<Listener>, Arc<Connections>)> {
    let mut opened = Vec::new();
    for l in &config.listeners {
        opened.push(open_listener(inherited, &l.name, &l.addr).await?);
    }
    let policy = Arc::new(Policy::new(config.access.clone())?);
    let tcp = |bound: &ListenAddr| match bound {
        ListenAddr::Tcp(a) => Some(*a),
        ListenAddr::Unix(_) => None,
    };
    let mut own: Vec<_> = opened.iter().filter_map(|l| tcp(&l.bound)).collect();
    let first_port = own.first().map(std::net::SocketAddr::port);
    own.extend(admin.as_ref().and_then(tcp));
    policy.set_identity(own, policy::default_via_token(first_port));
    let limits = Arc::new(Limits::new(&config.limits, config.access.groups.as_deref())?);
    let inspection = load_inspection(config)?;
    // Read at every generation's start, as the inspection roots are.
    let parent_tls = match config.parents.any_tls() {
        true => Some(crate::tls::origin::connector(&config.parents.roots).context("[upstream] roots")?),
        false => None,
    };
    let stash = Stash::from_env(config.timeouts.stash_after, config.limits.max_connections);
    let proxy = Arc::new(
        Proxy::new(
            ProxySettings::from(config),
            policy,
            limits,
            drain.clone(),
            inspection,
            parent_tls,
        )
        .with_stash(stash),
    );
    let connections = Connections::new(proxy, drain.clone(), &ConnectionSettings::from(config));
    Ok((opened, connections))
}

/// `[inspect]`'s CA and origin roots, read at every generation's start: a successor signs
/// with the same CA its predecessor's clients trust, and one that cannot read it fails (and
/// the old generation serves on).
fn load_inspection(config: &Config) -> anyhow::Result<Option<crate::proxy::service::Inspection>> {
    use anyhow::Context as _;
    let Some(inspect) = &config.inspect else {
        return Ok(None);
    };
    let mint = crate::tls::mint::Mint::load(inspect).context("[inspect]")?;
    let origin = crate::tls::origin::connector(&inspect.origin_roots).context("[inspect] origin_roots")?;
    let days_left = mint.ca.left(std::time::SystemTime::now()).as_secs() / 86_400;
    if days_left < 30 {
        tracing::warn!(subject = %mint.ca.subject, days_left, "the inspection CA expires soon: bumped clients will refuse its leaves");
    } else {
        info!(subject = %mint.ca.subject, days_left, "inspection CA loaded");
    }
    Ok(Some(crate::proxy::service::Inspection {
        mint: Arc::new(mint),
        origin,
    }))
}

/// Pings the predecessor during its canary window, tells the controller the verdict, then
/// adopts the tunnels and idle connections the predecessor hands over.
fn spawn_pinger(
    channel: PredecessorChannel,
    drain: Drain,
    commands: mpsc::Sender<Command>,
    connections: Arc<Connections>,
) {
    tokio::spawn(async move {
        let open = move || drain.active_connections() + drain.active_tunnels();
        let verdict = channel.ping_until_verdict(open).await;
        let (verdict, handed) = verdict.unwrap_or((baton_handoff::Verdict::Gone, None));
        let (taken, taken_rx) = tokio::sync::oneshot::channel();
        let _ = commands.send(Command::PredecessorVerdict(verdict, taken)).await;
        let _ = taken_rx.await;
        if let Some(handed) = handed {
            // The predecessor reports the handoff done only now: a trigger that follows
            // its report finds this generation out of its window.
            if handed.confirm_verdict().await.is_ok() {
                connections.adopt(handed).await;
            }
        }
    });
}

/// A first generation (`first`) takes what a crashed one stashed in systemd's fd store (a
/// successor is never passed the store), and holds its unit to the configuration.
fn stored_connections(first: bool, inherited: &mut Inherited, config: &Config) -> Stored {
    if !first {
        return Stored::default();
    }
    spawn_unit_check(config);
    Stored::take(inherited)
}

/// The names of inherited listeners this generation did not adopt under that name (the
/// stash's names are not listeners: `proxy::stash` owns them).
fn stale_listeners(inherited: Vec<String>, opened: &[Listener]) -> Vec<String> {
    inherited
        .into_iter()
        .filter(|n| !n.starts_with(stash::TABLE_PREFIX) && !n.starts_with(stash::CONNECTION_PREFIX))
        .filter(|n| !opened.iter().any(|l| &l.name == n && l.opened.is_adopted()))
        .collect()
}

/// Under systemd, a first generation holds its unit to the configuration (`daemon::unit`)
/// and warns of each contradiction, off the runtime (`systemctl` is a process).
fn spawn_unit_check(config: &Config) {
    let Some(unit) = crate::daemon::unit::own_unit() else {
        return;
    };
    let (fd_store_needed, config) = (crate::daemon::unit::fd_store_needed(config), config.clone());
    tokio::task::spawn_blocking(move || match crate::daemon::unit::read(&unit) {
        Ok(settings) => {
            for found in crate::daemon::unit::contradictions(&settings, &config) {
                warn!(%unit, "the unit contradicts the configuration: {found}");
            }
        }
        Err(e) => info!(%unit, fd_store_needed, "the unit's settings were not checked: {e}"),
    });
}

/// Closes the inherited sockets the configuration no longer has, saying which.
fn close_unused(inherited: &mut Inherited) {
    for (name, sock) in inherited.take_rest() {
        match sock {
            Ok(s) => {
                let address = s.local_addr().map(|a| a.to_string()).unwrap_or_default();
                info!(listener = %name, %address, "closing inherited listener the configuration no longer has");
            }
            Err(e) => warn!(listener = %name, "closing inherited fd that is not a listening socket: {e}"),
        }
    }
}

fn spawn_signal_listener(commands: mpsc::Sender<Command>) -> anyhow::Result<()> {
    let mut signals = signal_hook_tokio::Signals::new([SIGUSR2, SIGHUP, SIGTERM, SIGINT])
        .context("cannot install signal handlers")?;
    tokio::spawn(async move {
        while let Some(sig) = signals.next().await {
            let cmd = match sig {
                SIGUSR2 => Command::Upgrade {
                    trigger: Trigger::Signal("SIGUSR2"),
                    to: HandoffTo::Installed,
                    reply: None,
                },
                SIGHUP => Command::Upgrade {
                    trigger: Trigger::Signal("SIGHUP"),
                    to: HandoffTo::Installed,
                    reply: None,
                },
                SIGTERM => Command::Stop(Trigger::Signal("SIGTERM")),
                _ => Command::Stop(Trigger::Signal("SIGINT")),
            };
            if commands.send(cmd).await.is_err() {
                break;
            }
        }
    });
    Ok(())
}
