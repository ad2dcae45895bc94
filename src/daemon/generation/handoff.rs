//! The handoff, as the old generation lives it: spawn the successor, wait for its readiness,
//! watch it through the canary window, then hand over (systemd's main pid, the pid file) and
//! drain; or roll back at any of these steps and serve on. The successor's side of the window
//! (refusing triggers until the verdict) is here too.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;

use baton_handoff::{
    CanaryFailed, ChildProcess, HandoffError, Passed, PassedFd, PassedListener, Ready, SuccessorSpec, Verdict,
    spawn_successor,
};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::{DrainFuture, Generation, State};
use crate::control::{Event, UpgradeReport};
use crate::daemon::control_server::{HandoffTo, Trigger};
use crate::daemon::files::write_pid;
use crate::daemon::launch::PREDECESSOR_BINARY;
use crate::daemon::notify;
use crate::daemon::state_dir::{HandoffRecord, HandoffResult};
use crate::tls::tickets::FD_NAME as TICKET_KEYS_FD;

/// What a handoff's future resolves to: readiness, then the canary verdict.
pub(super) enum Step {
    Ready(Result<Ready, HandoffError>),
    Verdict(Result<Passed, CanaryFailed>),
}

type StepFuture = std::pin::Pin<Box<dyn std::future::Future<Output = Step> + Send>>;

/// A handoff in progress.
pub(super) struct PendingHandoff {
    pid: u32,
    /// The successor, signalled through its pidfd.
    child: ChildProcess,
    to: HandoffTo,
    trigger: Trigger,
    /// When the trigger arrived: the start of the handoff's record.
    started: SystemTime,
    reply: Option<mpsc::Sender<Event>>,
    /// From spawn to ready, once ready (then the canary window runs).
    ready_after: Option<Duration>,
    pub(super) future: StepFuture,
}

/// What the controller does after a step.
pub(super) enum Next {
    Continue(PendingHandoff),
    Drain(DrainFuture),
    Over,
}

impl PendingHandoff {
    /// Its record for the ledger, ending with `result`.
    fn record(&self, result: HandoffResult, old_generation: u64) -> HandoffRecord {
        HandoffRecord {
            new_pid: Some(self.pid),
            ready_ms: self.ready_after.map(|d| d.as_millis() as u64),
            ..HandoffRecord::new(self.started, result, self.trigger.to_string(), old_generation)
        }
    }

    /// Kills the successor (this generation stops) and tells whoever asked.
    pub(super) async fn abandon(self, reason: &str) {
        warn!(pid = self.pid, "{reason} during a handoff: killing the new generation");
        let _ = self.child.signal(nix::sys::signal::Signal::SIGKILL);
        if let Some(r) = self.reply {
            let _ = r.send(Event::Failed { reason: reason.into() }).await;
        }
    }
}

impl Generation {
    /// Starts a handoff to the installed binary or, rolling back, to the predecessor's,
    /// unless one runs, this generation drains, its own predecessor still watches it, or
    /// there is no predecessor's binary: then the trigger is refused with the reason.
    pub(super) fn begin_handoff(
        &mut self,
        (trigger, to): (Trigger, HandoffTo),
        reply: Option<mpsc::Sender<Event>>,
        running: Option<&PendingHandoff>,
    ) -> Option<PendingHandoff> {
        let started = SystemTime::now();
        self.notice_predecessor_drain();
        if let Some(reason) = self.refusal(running, to) {
            let result = HandoffResult::Refused;
            warn!(%trigger, result = result.as_str(), "handoff refused: {reason}");
            let record = HandoffRecord::new(started, result, trigger.to_string(), self.number);
            self.shared.record_handoff(record.because(&reason), |_| {});
            if let Some(r) = reply {
                let _ = r.try_send(Event::Refused { reason });
            }
            return None;
        }
        match to {
            HandoffTo::Installed => {
                info!(%trigger, program = %self.launch.program.display(), "handoff: starting new generation");
            }
            HandoffTo::Predecessor => info!(%trigger, "rollback: starting new generation from the previous binary"),
        }
        notify::reloading();
        let ticket_keys = self.export_ticket_keys();
        let spec = self.successor_spec(to, ticket_keys.as_ref().map(AsFd::as_fd));
        let successor = match spawn_successor(&spec) {
            Ok(s) => s,
            Err(e) => {
                let record = HandoffRecord::new(started, handoff_result(&e), trigger.to_string(), self.number);
                self.roll_back(&e, reply.as_ref(), record);
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
            child: successor.process(),
            to,
            trigger,
            started,
            reply,
            ready_after: None,
            future: Box::pin(async move { Step::Ready(successor.await_ready(timeout).await) }),
        })
    }

    /// The predecessor publishes its draining file at its verdict, before it answers
    /// `baton upgrade`, while its `pass` may still be on its way here: a trigger sent right
    /// after that answer must not be refused for a canary window that is over.
    fn notice_predecessor_drain(&mut self) {
        if !self.predecessor_watching {
            return;
        }
        // The predecessor forked this generation: it is our parent.
        let parent = nix::unistd::getppid().as_raw() as u32;
        if self.shared.draining().iter().any(|d| d.pid == parent) {
            info!("the previous generation drains: its canary verdict passed");
            self.predecessor_watching = false;
        }
    }

    fn refusal(&self, running: Option<&PendingHandoff>, to: HandoffTo) -> Option<String> {
        if to == HandoffTo::Predecessor && self.launch.predecessor_binary.is_none() {
            return Some(if self.number == 1 {
                "nothing to roll back to: this generation (1) was started directly, not handed over from a previous binary".into()
            } else {
                format!(
                    "nothing to roll back to: generation {} got no binary from its predecessor (a version without rollback)",
                    self.number
                )
            });
        }
        if self.state == State::Draining {
            return Some("this generation is draining; send the trigger to the serving one".into());
        }
        if self.predecessor_watching {
            return Some("this generation's canary window is still running: try again after its verdict".into());
        }
        let draining = self.shared.draining().len();
        let max = self.config.limits.max_draining_generations;
        if running.is_none() && draining >= max {
            return Some(format!(
                "{draining} older generations are still draining (limits.max_draining_generations = {max}): try again when one has exited"
            ));
        }
        running.map(|p| match p.ready_after {
            Some(_) => format!("the new generation (pid {}) is in its canary window", p.pid),
            None => format!("a handoff is already in progress (new generation pid {})", p.pid),
        })
    }

    /// The TLS ticket keys for the successor, in a sealed memfd. Without them it serves all
    /// the same, but no client resumes a session from before the handoff: worth a warning,
    /// not a failed handoff.
    fn export_ticket_keys(&self) -> Option<OwnedFd> {
        match self.tls.tickets.export() {
            Ok(fd) => Some(fd),
            Err(e) => {
                warn!("cannot pass the TLS ticket keys on ({e}): sessions will not resume after this handoff");
                None
            }
        }
    }

    /// What to start: the installed program or (`to`) the predecessor's binary, with our
    /// listeners, our own binary (to roll back to) and the TLS ticket keys.
    fn successor_spec<'a>(&'a self, to: HandoffTo, ticket_keys: Option<BorrowedFd<'a>>) -> SuccessorSpec<'a> {
        let listeners = self
            .listeners
            .iter()
            .map(|l| PassedListener {
                name: &l.name,
                fd: l.socket.as_fd(),
                origin: l.origin,
            })
            .collect();
        // Our own binary goes along, so that the successor can roll back to it.
        let own_binary = self.launch.own_binary.iter().map(|fd| PassedFd {
            name: PREDECESSOR_BINARY,
            fd: fd.as_fd(),
        });
        let tickets = ticket_keys.map(|fd| PassedFd {
            name: TICKET_KEYS_FD,
            fd,
        });
        let extra = own_binary.chain(tickets).collect();
        let binary = match to {
            HandoffTo::Installed => None,
            HandoffTo::Predecessor => self.launch.predecessor_binary.as_ref().map(AsFd::as_fd),
        };
        SuccessorSpec {
            program: &self.launch.program,
            args: &self.launch.args,
            listeners,
            extra,
            generation: self.number + 1,
            binary,
        }
    }

    /// Acts on a step of the handoff in progress.
    pub(super) async fn handoff_step(&mut self, mut pending: PendingHandoff, step: Step) -> Next {
        match step {
            Step::Ready(Err(e)) => {
                let record = pending.record(handoff_result(&e), self.number);
                self.roll_back(&e, pending.reply.as_ref(), record);
                Next::Over
            }
            Step::Ready(Ok(ready)) => {
                // The successor serves: stop accepting (our sockets stay open, so we can
                // resume), leave our connections alone, and watch it.
                self.stop_accepting();
                self.state = State::Canary;
                let window = self.config.timeouts.canary;
                info!(pid = ready.pid, ready_ms = ready.after.as_millis() as u64, canary = ?window, "new generation ready: canary window");
                notify::status(&format!(
                    "new generation pid {} ready; canary window {window:?}",
                    ready.pid
                ));
                pending.ready_after = Some(ready.after);
                pending.future = Box::pin(async move { Step::Verdict(ready.watch.canary(window).await) });
                Next::Continue(pending)
            }
            Step::Verdict(Ok(passed)) => self.hand_over(pending, passed).await,
            Step::Verdict(Err(failed)) => {
                self.canary_failed(pending, &failed);
                Next::Over
            }
        }
    }

    /// The canary passed: the successor becomes systemd's main process and gets the pid
    /// file, and this generation drains.
    async fn hand_over(&mut self, pending: PendingHandoff, passed: Passed) -> Next {
        let ready_after = pending.ready_after.unwrap_or_default();
        notify::handed_over(
            pending.pid,
            &format!("serving generation {} (pid {})", self.number + 1, pending.pid),
        );
        if let Some(path) = &self.config.pid_file {
            let written =
                write_pid(path, pending.pid).with_context(|| format!("cannot write pid file {}", path.display()));
            if let Err(e) = written {
                error!("{e:#}");
            }
        }
        let (connections, tunnels) = (self.drain.active_connections(), self.drain.active_tunnels());
        let tls = self.connections.tls_connections();
        let bumped = self.connections.proxy().bumped_connections();
        // Migration first: a connection woken by the drain finds it requested, and moves
        // rather than closing.
        match passed.transfer {
            Some(transfer) if self.config.migrate => self.connections.proxy().migration().start(transfer),
            Some(_) => info!("migrate = false: tunnels and connections drain here"),
            None => info!("the new generation does not take tunnels or connections: they drain here"),
        }
        let drain = self.begin_drain();
        let report = UpgradeReport {
            old_pid: self.pid,
            new_pid: pending.pid,
            old_generation: self.number,
            new_generation: self.number + 1,
            ready_ms: ready_after.as_millis() as u64,
            canary_ms: Some(passed.window.as_millis() as u64),
            draining_connections: connections,
            draining_tunnels: tunnels,
            draining_tls_connections: Some(tls.min(connections)),
            draining_bumped_connections: Some(bumped),
        };
        let record = HandoffRecord {
            canary_ms: report.canary_ms,
            draining_connections: connections,
            draining_tunnels: tunnels,
            ..pending.record(HandoffResult::Ok, self.number)
        };
        self.shared
            .record_handoff(record, |l| l.spawn_to_ready.observe(ready_after.as_secs_f64()));
        info!(
            result = "ok",
            rollback = pending.to == HandoffTo::Predecessor,
            old_pid = report.old_pid,
            new_pid = report.new_pid,
            old_generation = report.old_generation,
            new_generation = report.new_generation,
            ready_ms = report.ready_ms,
            canary_ms = report.canary_ms,
            draining_connections = report.draining_connections,
            draining_tunnels = report.draining_tunnels,
            draining_tls_connections = tls,
            draining_bumped_connections = bumped,
            "handoff complete: draining"
        );
        if let Some(r) = pending.reply {
            let _ = r.send(Event::Done(report)).await;
            // Told how the drain ends. Without `--wait-drain` the client stopped reading at
            // `done`, and that later send fails harmlessly.
            self.drain_waiter = Some(r);
        }
        Next::Drain(drain)
    }

    /// The successor died or went silent in its window (it is killed and reaped by now):
    /// accept again at once, and report what was lost.
    fn canary_failed(&mut self, pending: PendingHandoff, failed: &CanaryFailed) {
        self.start_accepting();
        self.state = State::Serving;
        let ready_ms = pending.ready_after.unwrap_or_default().as_millis() as u64;
        let reason = format!(
            "failed after ready (ready after {ready_ms} ms, lived {} ms, {} connections lost): {}",
            failed.lived.as_millis(),
            failed.connections,
            failed.reason
        );
        let result = HandoffResult::FailedAfterReady;
        error!(
            result = result.as_str(),
            pid = failed.pid,
            lost_connections = failed.connections,
            "handoff failed, serving on: {reason}"
        );
        let record = HandoffRecord {
            canary_ms: Some(failed.lived.as_millis() as u64),
            ..pending.record(result, self.number)
        };
        self.shared
            .record_handoff(record.because(&reason), |l| l.canary_lost += failed.connections);
        notify::rolled_back(&format!("serving (last handoff failed: {reason})"));
        if let Some(r) = pending.reply {
            let _ = r.try_send(Event::Failed { reason });
        }
    }

    pub(super) fn roll_back(&mut self, e: &HandoffError, reply: Option<&mpsc::Sender<Event>>, record: HandoffRecord) {
        let result = handoff_result(e);
        let reason = describe(e);
        error!(result = result.as_str(), "handoff failed, serving on: {reason}");
        self.shared.record_handoff(record.because(&reason), |_| {});
        self.state = State::Serving;
        notify::rolled_back(&format!("serving (last handoff failed: {reason})"));
        if let Some(r) = reply {
            let _ = r.try_send(Event::Failed { reason });
        }
    }

    /// This generation's own canary window ended. Passed: the predecessor handed over. Gone
    /// without a verdict (it was killed): this generation claims the main process itself.
    pub(super) fn predecessor_verdict(&mut self, verdict: Verdict) {
        self.predecessor_watching = false;
        match verdict {
            Verdict::Passed => {
                info!("canary passed: this generation serves alone");
                self.sync_fd_store();
            }
            Verdict::Gone => {
                warn!("the previous generation went away without a verdict: taking over");
                if let Err(e) = self.claim_main_process() {
                    error!("{e:#}");
                }
            }
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
        HandoffError::ChildExited { .. } | HandoffError::StartFailed { .. } | HandoffError::Exec { .. } => {
            HandoffResult::ChildExit
        }
        HandoffError::Timeout { .. } => HandoffResult::Timeout,
        HandoffError::NotExecutable { .. } | HandoffError::Fork(_) | HandoffError::Io { .. } => {
            HandoffResult::SpawnError
        }
    }
}
