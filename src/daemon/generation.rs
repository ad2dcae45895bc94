//! A generation: one running baton process, from start to exit. It opens (adopts or binds)
//! its listeners, serves, and on a trigger hands off to a successor (spawn → ready → drain)
//! or rolls back. State changes happen only in [`Generation::run`]'s loop:
//!
//! ```text
//! Serving ──trigger──▶ HandingOff ──ready──▶ Draining ──drained──▶ exit 0
//!    ▲                     │ child exit / timeout
//!    └──── rollback ───────┘
//! Serving ──SIGTERM──▶ Draining (a second SIGTERM exits at once)
//! ```

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use baton_handoff::{
    Drain, DrainReport, HandoffError, Inherited, ListenAddr, Listener, PassedListener, Ready, ReadySignal,
    SuccessorSpec, open_listener, spawn_successor,
};
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::config::{ADMIN_LISTENER, CONTROL_LISTENER, Config};
use crate::control::{DrainOutcome, Event, ListenerStatus, Status, UpgradeReport};
use crate::daemon::admin::{self, AdminContext};
use crate::daemon::control_server::{self, Command, Trigger};
use crate::daemon::files::write_pid_file;
use crate::daemon::launch::Launch;
use crate::daemon::notify;
use crate::daemon::state_dir::{DrainingFile, HandoffResult, StateDir};
use crate::proxy::policy::Policy;
use crate::proxy::{ConnectionSettings, Connections, Proxy, ProxySettings};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Serving,
    HandingOff,
    Draining,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Serving => "serving",
            State::HandingOff => "handing off",
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

type HandoffFuture = Pin<Box<dyn Future<Output = Result<Ready, HandoffError>> + Send>>;
type DrainFuture = Pin<Box<dyn Future<Output = DrainReport> + Send>>;

struct PendingHandoff {
    pid: u32,
    reply: Option<mpsc::Sender<Event>>,
    future: HandoffFuture,
}

pub struct Generation {
    launch: Launch,
    config: Config,
    number: u64,
    pid: u32,
    started: SystemTime,
    state: State,
    listeners: Vec<Listener>,
    drain: Drain,
    commands: mpsc::Receiver<Command>,
    control_clients: TaskTracker,
    stop_requests: u32,
    /// Shared with the other generations: draining counts and the metrics ledger.
    shared: StateDir,
    /// Cancelled when a handoff's drain begins: the admin listener then belongs to the successor.
    admin_stop: CancellationToken,
    /// While draining: this generation's remaining work, published for the serving one.
    draining_file: Option<DrainingFile>,
    /// `baton upgrade --wait-drain`: told how the drain ended.
    drain_waiter: Option<mpsc::Sender<Event>>,
}

impl Generation {
    /// Opens every listener (adopting inherited ones), starts serving, then reports ready to
    /// systemd, the pid file and the predecessor, in that order.
    pub async fn start(launch: Launch, config: Config, mut inherited: Inherited) -> anyhow::Result<Generation> {
        let (commands_tx, commands) = mpsc::channel(64);
        spawn_signal_listener(commands_tx.clone())?;
        let drain = Drain::new();
        let mut opened = serve_proxy(&config, &mut inherited, &drain).await?;
        let control = open_listener(
            &mut inherited,
            CONTROL_LISTENER,
            &ListenAddr::Unix(config.control_socket.clone()),
        )
        .await?;
        let control_clients = TaskTracker::new();
        control_server::spawn_control_loop(
            control.socket.clone(),
            &drain,
            commands_tx.clone(),
            control_clients.clone(),
        );
        opened.push(control);
        let shared = StateDir::for_control_socket(&config.control_socket);
        if let Err(e) = shared.init(inherited.ready.is_none()) {
            warn!(dir = %shared.path().display(), "cannot use the state directory (metrics of other generations unavailable): {e}");
        }
        let admin_stop = CancellationToken::new();
        if let Some(a) = &config.admin {
            let listener = open_listener(&mut inherited, ADMIN_LISTENER, &ListenAddr::Tcp(a.addr)).await?;
            let ctx = AdminContext {
                drain: drain.clone(),
                commands: commands_tx.clone(),
                state: shared.clone(),
                generation: inherited.generation,
            };
            admin::spawn(listener.socket.clone(), ctx, admin_stop.clone());
            opened.push(listener);
        }
        close_unused(&mut inherited);
        let generation = Generation {
            launch,
            number: inherited.generation,
            pid: std::process::id(),
            started: SystemTime::now(),
            state: State::Serving,
            listeners: opened,
            drain,
            commands,
            control_clients,
            stop_requests: 0,
            config,
            shared,
            admin_stop,
            draining_file: None,
            drain_waiter: None,
        };
        generation.report_ready(inherited.ready.take())?;
        Ok(generation)
    }

    fn report_ready(&self, ready: Option<ReadySignal>) -> anyhow::Result<()> {
        notify::ready(&self.status_line());
        notify::spawn_watchdog();
        if let Some(path) = &self.config.pid_file {
            write_pid_file(path).with_context(|| format!("cannot write pid file {}", path.display()))?;
        }
        let addrs: Vec<String> = self
            .listeners
            .iter()
            .map(|l| {
                format!(
                    "{}={}{}",
                    l.name,
                    l.bound,
                    if l.opened.is_adopted() { " (inherited)" } else { "" }
                )
            })
            .collect();
        info!(
            version = env!("CARGO_PKG_VERSION"),
            pid = self.pid,
            generation = self.number,
            listeners = %addrs.join(", "),
            "baton serving"
        );
        if let Some(r) = ready {
            r.signal_ready()
                .context("cannot report readiness to the previous generation")?;
        }
        Ok(())
    }

    /// The controller: the one place state changes. Returns when this generation is done.
    pub async fn run(mut self) -> Exit {
        let mut handoff: Option<PendingHandoff> = None;
        let mut draining: Option<(DrainFuture, bool)> = None;
        loop {
            tokio::select! {
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Status(reply) => {
                        let _ = reply.send(self.status(handoff.is_some()));
                    }
                    Command::Upgrade { trigger, reply } => {
                        if let Some(p) = self.begin_handoff(trigger, reply, handoff.as_ref().map(|h| h.pid)) {
                            handoff = Some(p);
                        }
                    }
                    Command::Stop(trigger) => {
                        self.stop_requests += 1;
                        if self.stop_requests > 1 {
                            warn!(%trigger, connections = self.drain.active_connections(), tunnels = self.drain.active_tunnels(), "second stop request: exiting now");
                            self.draining_file = None;
                            return Exit::Forced;
                        }
                        if let Some(h) = handoff.take() {
                            warn!(pid = h.pid, "stop requested during a handoff: killing the new generation");
                            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(h.pid as i32), nix::sys::signal::Signal::SIGKILL);
                            if let Some(r) = h.reply {
                                let _ = r.send(Event::Failed { reason: "baton is stopping".into() }).await;
                            }
                        }
                        if draining.is_none() {
                            info!(%trigger, "stopping: draining");
                            notify::stopping("stopping: draining");
                            draining = Some((self.begin_drain(), false));
                        }
                    }
                },
                result = async { (&mut handoff.as_mut().expect("guarded").future).await }, if handoff.is_some() => {
                    let pending = handoff.take().expect("guarded");
                    if let Some(d) = self.finish_handoff(pending, result).await {
                        draining = Some((d, true));
                    }
                }
                report = async { (&mut draining.as_mut().expect("guarded").0).await }, if draining.is_some() => {
                    let handed_off = draining.as_ref().is_some_and(|d| d.1);
                    info!(connections = report.connections, tunnels = report.tunnels, cut = report.cut, ms = report.millis, "drained; exiting");
                    self.drain_finished(handed_off, &report).await;
                    // Let `baton upgrade` read its report before the process goes away.
                    self.control_clients.close();
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.control_clients.wait()).await;
                    return if handed_off { Exit::HandedOff(report) } else { Exit::Stopped(report) };
                }
            }
        }
    }

    fn begin_handoff(
        &mut self,
        trigger: Trigger,
        reply: Option<mpsc::Sender<Event>>,
        running: Option<u32>,
    ) -> Option<PendingHandoff> {
        let refusal = match (self.state, running) {
            (State::Draining, _) => {
                Some("this generation is draining; send the trigger to the serving one".to_string())
            }
            (_, Some(pid)) => Some(format!("a handoff is already in progress (new generation pid {pid})")),
            _ => None,
        };
        if let Some(reason) = refusal {
            warn!(%trigger, result = HandoffResult::Refused.as_str(), "handoff refused: {reason}");
            self.shared.count_handoff(HandoffResult::Refused);
            if let Some(r) = reply {
                let _ = r.try_send(Event::Refused { reason });
            }
            return None;
        }
        info!(%trigger, program = %self.launch.program.display(), "handoff: starting new generation");
        notify::reloading();
        let listeners = self
            .listeners
            .iter()
            .map(|l| PassedListener {
                name: &l.name,
                fd: l.socket.as_fd(),
                origin: l.origin,
            })
            .collect();
        let spec = SuccessorSpec {
            program: &self.launch.program,
            args: &self.launch.args,
            listeners,
            generation: self.number + 1,
        };
        let successor = match spawn_successor(&spec) {
            Ok(s) => s,
            Err(e) => {
                self.roll_back(&e, reply.as_ref());
                return None;
            }
        };
        let pid = successor.pid();
        if let Some(r) = &reply {
            let _ = r.try_send(Event::Spawned {
                pid,
                generation: self.number + 1,
                old_pid: self.pid,
                old_generation: self.number,
            });
        }
        self.state = State::HandingOff;
        notify::status(&format!("handoff in progress: new generation pid {pid}"));
        let timeout = self.config.timeouts.upgrade;
        Some(PendingHandoff {
            pid,
            reply,
            future: Box::pin(successor.await_ready(timeout)),
        })
    }

    async fn finish_handoff(
        &mut self,
        pending: PendingHandoff,
        result: Result<Ready, HandoffError>,
    ) -> Option<DrainFuture> {
        let ready = match result {
            Ok(r) => r,
            Err(e) => {
                self.roll_back(&e, pending.reply.as_ref());
                return None;
            }
        };
        // Stop accepting before anyone hears "done": a command sent right after must reach
        // the new generation, never this one.
        self.admin_stop.cancel();
        let (connections, tunnels) = (self.drain.active_connections(), self.drain.active_tunnels());
        let drain = self.begin_drain();
        let report = UpgradeReport {
            old_pid: self.pid,
            new_pid: ready.pid,
            old_generation: self.number,
            new_generation: self.number + 1,
            ready_ms: ready.after.as_millis() as u64,
            draining_connections: connections,
            draining_tunnels: tunnels,
        };
        self.shared.count_handoff(HandoffResult::Ok);
        self.shared
            .record(|l| l.spawn_to_ready.observe(ready.after.as_secs_f64()));
        info!(
            result = "ok",
            old_pid = report.old_pid,
            new_pid = report.new_pid,
            old_generation = report.old_generation,
            new_generation = report.new_generation,
            ready_ms = report.ready_ms,
            draining_connections = report.draining_connections,
            draining_tunnels = report.draining_tunnels,
            "handoff complete: draining"
        );
        if let Some(r) = pending.reply {
            let _ = r.send(Event::Done(report)).await;
            // Told how the drain ends. Without `--wait-drain` the client stopped reading at
            // `done`, and that later send fails harmlessly.
            self.drain_waiter = Some(r);
        }
        Some(drain)
    }

    fn roll_back(&mut self, e: &HandoffError, reply: Option<&mpsc::Sender<Event>>) {
        let result = handoff_result(e);
        let reason = describe(e);
        error!(result = result.as_str(), "handoff failed, serving on: {reason}");
        self.shared.count_handoff(result);
        self.state = State::Serving;
        notify::rolled_back(&format!("serving (last handoff failed: {reason})"));
        if let Some(r) = reply {
            let _ = r.try_send(Event::Failed { reason });
        }
    }

    /// Stops accepting (our listener fds close; a successor keeps the sockets) and drains.
    fn begin_drain(&mut self) -> DrainFuture {
        // What is handed to the drain, counted before it begins: an idle keep-alive connection
        // closes at once and counts as finished.
        let (connections, tunnels) = (self.drain.active_connections(), self.drain.active_tunnels());
        self.state = State::Draining;
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
        let outcome = DrainOutcome::from_report(self.pid, report);
        if handed_off {
            self.shared.record(|l| {
                l.drain.observe(report.millis as f64 / 1000.0);
                l.drain_finished += outcome.finished as u64;
                l.drain_cut += outcome.cut as u64;
            });
        }
        self.draining_file = None;
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
                })
                .collect(),
            active_connections: self.drain.active_connections(),
            active_tunnels: self.drain.active_tunnels(),
            handoff_in_progress: handoff_running,
            config: self.launch.config_path.as_ref().map(|p| p.display().to_string()),
            draining: self.shared.draining(),
        }
    }
}

/// Opens the proxy listeners, then starts the proxy on them. They open first (connections
/// queue meanwhile) because the policy needs their addresses to refuse requests that would
/// loop into the proxy itself.
async fn serve_proxy(config: &Config, inherited: &mut Inherited, drain: &Drain) -> anyhow::Result<Vec<Listener>> {
    let mut opened = Vec::new();
    for l in &config.listeners {
        opened.push(open_listener(inherited, &l.name, &l.addr).await?);
    }
    let policy = Arc::new(Policy::new(config.access.clone())?);
    let own: Vec<_> = opened
        .iter()
        .filter_map(|l| match l.bound {
            ListenAddr::Tcp(a) => Some(a),
            ListenAddr::Unix(_) => None,
        })
        .collect();
    policy.set_identity(own.clone(), default_via_token(own.first()));
    let proxy = Arc::new(Proxy::new(ProxySettings::from(config), policy, drain.clone()));
    let connections = Connections::new(proxy, drain.clone(), &ConnectionSettings::from(config));
    for listener in &opened {
        connections.spawn_accept_loop(listener.name.clone(), listener.socket.clone());
    }
    Ok(opened)
}

/// This instance's `Via` token unless configured: the host name and the first TCP listener's
/// port, so that two batons on one host (one the parent of the other) are told apart.
fn default_via_token(first: Option<&std::net::SocketAddr>) -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)))
        .unwrap_or_else(|| "baton".into());
    match first {
        Some(a) => format!("{host}:{}", a.port()),
        None => host,
    }
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

/// An error with its causes, on one line: what a log line and `baton upgrade` show.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// How a failed handoff is counted.
fn handoff_result(e: &HandoffError) -> HandoffResult {
    match e {
        HandoffError::ChildExited { .. } | HandoffError::Exec { .. } => HandoffResult::ChildExit,
        HandoffError::Timeout { .. } => HandoffResult::Timeout,
        HandoffError::NotExecutable { .. } | HandoffError::Fork(_) | HandoffError::Io(_) => HandoffResult::SpawnError,
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
                    reply: None,
                },
                SIGHUP => Command::Upgrade {
                    trigger: Trigger::Signal("SIGHUP"),
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
