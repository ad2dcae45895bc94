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

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use anyhow::Context as _;
use futures_util::StreamExt;
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::admin::{self, ADMIN_LISTENER, AdminContext};
use crate::config::{CONTROL_LISTENER, Config, ListenAddr};
use crate::control::{self, Command, DrainOutcome, ListenerStatus, Status, Trigger, UpgradeEvent, UpgradeReport};
use crate::drain::{Drain, DrainReport};
use crate::handoff::{HandoffError, Inherited, Ready, SuccessorSpec, spawn_successor};
use crate::listeners::{self, Listener};
use crate::notify;
use crate::policy::Policy;
use crate::proxy::{Proxy, ProxySettings};
use crate::server::{Server, ServerSettings};
use crate::state::{DrainingFile, StateDir};
use tokio_util::sync::CancellationToken;

/// How this process was started: what a successor must exec.
#[derive(Debug, Clone)]
pub struct Launch {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub config_path: Option<PathBuf>,
    pub tag: Option<String>,
}

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
    reply: Option<mpsc::Sender<UpgradeEvent>>,
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
    drain_waiter: Option<mpsc::Sender<UpgradeEvent>>,
}

impl Generation {
    /// Opens every listener (adopting inherited ones), starts serving, then reports ready to
    /// systemd, the pid file and the predecessor, in that order.
    pub async fn start(launch: Launch, config: Config, mut inherited: Inherited) -> anyhow::Result<Generation> {
        let (commands_tx, commands) = mpsc::channel(64);
        spawn_signal_listener(commands_tx.clone())?;
        let drain = Drain::new();
        // Open every listener first (connections queue meanwhile): the policy needs their
        // addresses to refuse requests that would loop into the proxy itself.
        let mut opened = Vec::new();
        for l in &config.listeners {
            opened.push(listeners::open(&mut inherited, &l.name, &l.addr).await?);
        }
        let policy = Arc::new(Policy::new(config.access.clone())?);
        policy.set_own_addresses(
            opened
                .iter()
                .filter_map(|l| match l.bound {
                    ListenAddr::Tcp(a) => Some(a),
                    ListenAddr::Unix(_) => None,
                })
                .collect(),
        );
        let proxy = Arc::new(Proxy::new(
            ProxySettings {
                upstream_connect: config.timeouts.upstream_connect,
                upstream_response: config.timeouts.upstream_response,
                tunnel_idle: config.timeouts.tunnel_idle,
                upstream_idle: config.timeouts.upstream_idle,
                max_uri_bytes: config.limits.max_uri_bytes,
                max_body_bytes: config.limits.max_body_bytes,
                policy,
            },
            drain.clone(),
        ));
        let server = Server::new(
            proxy,
            drain.clone(),
            &ServerSettings {
                header_read_timeout: config.timeouts.header_read,
                max_header_bytes: config.limits.max_header_bytes,
                max_connections: config.limits.max_connections,
            },
        );
        for listener in &opened {
            server.spawn_accept_loop(listener.name.clone(), listener.socket.clone());
        }
        let control_addr = ListenAddr::Unix(config.control_socket.clone());
        let control = open_control(&mut inherited, &control_addr).await?;
        let control_clients = TaskTracker::new();
        control::spawn_control_loop(
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
            let listener = open_admin(&mut inherited, &ListenAddr::Tcp(a.addr)).await?;
            admin::spawn(
                listener.socket.clone(),
                AdminContext {
                    drain: drain.clone(),
                    commands: commands_tx.clone(),
                    state: shared.clone(),
                    generation: inherited.generation,
                },
                admin_stop.clone(),
            );
            opened.push(listener);
        }
        for (name, sock) in inherited.take_rest() {
            match sock {
                Ok(s) => {
                    info!(listener = %name, address = %s.local_addr().map(|a| a.to_string()).unwrap_or_default(), "closing inherited listener the configuration no longer has")
                }
                Err(e) => warn!(listener = %name, "closing inherited fd that is not a listening socket: {e}"),
            }
        }
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

    fn report_ready(&self, ready: Option<crate::handoff::ReadySignal>) -> anyhow::Result<()> {
        notify::ready(&self.status_line());
        notify::spawn_watchdog();
        if let Some(path) = &self.config.pid_file {
            write_pid_file(path).with_context(|| format!("cannot write pid file {}", path.display()))?;
        }
        let addrs: Vec<String> = self
            .listeners
            .iter()
            .map(|l| format!("{}={}{}", l.name, l.bound, if l.adopted { " (inherited)" } else { "" }))
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
                                let _ = r.send(UpgradeEvent::Failed { reason: "baton is stopping".into() }).await;
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
        reply: Option<mpsc::Sender<UpgradeEvent>>,
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
            warn!(%trigger, result = "refused", "handoff refused: {reason}");
            self.shared
                .record(|l| *l.handoffs.entry("refused".into()).or_default() += 1);
            if let Some(r) = reply {
                let _ = r.try_send(UpgradeEvent::Refused { reason });
            }
            return None;
        }
        info!(%trigger, program = %self.launch.program.display(), "handoff: starting new generation");
        notify::reloading();
        let listeners = self
            .listeners
            .iter()
            .map(|l| (l.name.as_str(), l.socket.as_fd()))
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
            let _ = r.try_send(UpgradeEvent::Spawned {
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
        self.shared.record(|l| {
            *l.handoffs.entry("ok".into()).or_default() += 1;
            l.spawn_to_ready.observe(ready.after.as_secs_f64());
        });
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
            let _ = r.send(UpgradeEvent::Done(report)).await;
            // Kept only if the client waits for the drain (else its reader is gone).
            self.drain_waiter = Some(r);
        }
        Some(drain)
    }

    fn roll_back(&mut self, e: &HandoffError, reply: Option<&mpsc::Sender<UpgradeEvent>>) {
        let result = handoff_result(e);
        error!(result, "handoff failed, serving on: {e}");
        self.shared
            .record(|l| *l.handoffs.entry(result.into()).or_default() += 1);
        self.state = State::Serving;
        notify::rolled_back(&format!("serving (last handoff failed: {e})"));
        if let Some(r) = reply {
            let _ = r.try_send(UpgradeEvent::Failed { reason: e.to_string() });
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
            let _ = w.send(UpgradeEvent::Drained(outcome)).await;
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
                    adopted: l.adopted,
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

async fn open_control(inherited: &mut Inherited, addr: &ListenAddr) -> anyhow::Result<Listener> {
    // Adopt the inherited control socket only if it is still at the configured path.
    if let Some(idx) = inherited.position_by_name(CONTROL_LISTENER) {
        let sock = inherited.take(idx)?;
        if sock.local_addr().ok().as_ref() == Some(addr) {
            return Ok(Listener {
                name: CONTROL_LISTENER.into(),
                bound: addr.clone(),
                socket: Arc::new(sock),
                adopted: true,
            });
        }
        info!("control socket moved: binding {addr}");
    }
    let sock = listeners::bind(CONTROL_LISTENER, addr).await?;
    Ok(Listener {
        name: CONTROL_LISTENER.into(),
        bound: addr.clone(),
        socket: Arc::new(sock),
        adopted: false,
    })
}

/// Adopts the inherited admin listener if it is still at the configured address (any port
/// when the configured one is 0), else binds.
async fn open_admin(inherited: &mut Inherited, addr: &ListenAddr) -> anyhow::Result<Listener> {
    if let Some(idx) = inherited.position_by_name(ADMIN_LISTENER) {
        let sock = inherited.take(idx)?;
        let same = match (sock.local_addr().ok(), addr) {
            (Some(ListenAddr::Tcp(got)), ListenAddr::Tcp(want)) => {
                got == *want || (want.port() == 0 && got.ip() == want.ip())
            }
            _ => false,
        };
        if same {
            let bound = sock.local_addr()?;
            return Ok(Listener {
                name: ADMIN_LISTENER.into(),
                bound,
                socket: Arc::new(sock),
                adopted: true,
            });
        }
        info!("admin listener moved: binding {addr}");
    }
    let sock = listeners::bind(ADMIN_LISTENER, addr).await?;
    let bound = sock.local_addr()?;
    Ok(Listener {
        name: ADMIN_LISTENER.into(),
        bound,
        socket: Arc::new(sock),
        adopted: false,
    })
}

/// The `result` label of a failed handoff.
fn handoff_result(e: &HandoffError) -> &'static str {
    match e {
        HandoffError::ChildExited { .. } | HandoffError::Exec { .. } => "child_exit",
        HandoffError::Timeout { .. } => "timeout",
        HandoffError::NotExecutable { .. } | HandoffError::Fork(_) | HandoffError::Io(_) => "spawn_error",
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

/// Writes the pid file atomically: a reader sees the old pid or the new one, never a torn file.
fn write_pid_file(path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
    std::fs::rename(&tmp, path)
}
