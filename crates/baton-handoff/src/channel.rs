//! The two-way channel between a generation and its successor: a Unix socketpair created at
//! spawn, beside the one-way readiness pipe. After the successor reports ready, the old
//! generation keeps its listening sockets and watches it for a *canary window*: the
//! successor sends `ping <open connections>\n` every [`PING_EVERY`]; it fails the canary if
//! it exits or stays silent for [`SILENCE`]. At the verdict the old generation sends
//! `pass\n` and the successor is on its own; a failed successor is killed and reaped.
//!
//! [`Watch`] is the old generation's side, [`PredecessorChannel`] the successor's.

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::process::ChildProcess;

/// How often a successor pings during its predecessor's canary window.
pub const PING_EVERY: Duration = Duration::from_millis(250);
/// How long without a ping fails the canary (four pings missed).
pub const SILENCE: Duration = Duration::from_secs(1);

/// A successor that reported ready, as its predecessor watches it.
#[derive(Debug)]
pub struct Watch {
    child: ChildProcess,
    exited: oneshot::Receiver<String>,
    channel: OwnedFd,
    /// Whether it pings (a successor of an older version only reports ready).
    pings: bool,
    ready_at: Instant,
}

/// The canary passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Passed {
    pub window: Duration,
    /// Connections it had open at its last ping.
    pub connections: u64,
}

/// The canary failed: the successor was killed (if it still ran) and reaped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("new generation (pid {pid}) failed {lived:?} after ready: {reason}")]
pub struct CanaryFailed {
    pub pid: u32,
    pub reason: String,
    /// From ready to the failure.
    pub lived: Duration,
    /// Connections it had open at its last ping: lost with it.
    pub connections: u64,
}

impl Watch {
    pub(crate) fn new(child: ChildProcess, exited: oneshot::Receiver<String>, channel: OwnedFd, pings: bool) -> Watch {
        Watch {
            child,
            exited,
            channel,
            pings,
            ready_at: Instant::now(),
        }
    }

    /// Watches the successor for `window`. Call it inside a tokio runtime.
    pub async fn canary(mut self, window: Duration) -> Result<Passed, CanaryFailed> {
        let stream = std::os::unix::net::UnixStream::from(self.channel);
        let opened = stream.set_nonblocking(true).and_then(|()| UnixStream::from_std(stream));
        let Ok(stream) = opened else {
            let reason = "the channel is unusable".to_string();
            return Err(fail(&self.child, Some(&mut self.exited), self.ready_at, reason, 0).await);
        };
        let (read, write) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut connections = 0;
        let mut last_ping = Instant::now();
        // Past the window but not heard from lately: the verdict waits for one more ping (a
        // successor stopped just before the end must not pass) or the silence bound.
        let mut overtime = false;
        let deadline = tokio::time::sleep(window);
        tokio::pin!(deadline);
        let mut reaped = false;
        let reason = loop {
            let silent_until = tokio::time::Instant::from_std(last_ping + SILENCE);
            tokio::select! {
                biased;
                status = &mut self.exited => {
                    reaped = true;
                    break format!("exited: {}", status.unwrap_or_else(|_| "unknown".into()));
                }
                () = &mut deadline, if !overtime => {
                    if self.pings && last_ping.elapsed() > 2 * PING_EVERY {
                        overtime = true;
                        continue;
                    }
                    return Ok(pass(write, window, connections).await);
                }
                line = lines.next_line(), if self.pings => match line {
                    Ok(Some(l)) => {
                        connections = l.strip_prefix("ping ").and_then(|n| n.trim().parse().ok()).unwrap_or(connections);
                        last_ping = Instant::now();
                        if overtime {
                            return Ok(pass(write, window, connections).await);
                        }
                    }
                    _ => break "closed the channel".to_string(),
                },
                () = tokio::time::sleep_until(silent_until), if self.pings => {
                    break format!("no liveness ping for {SILENCE:?}");
                }
            }
        };
        let exited = (!reaped).then_some(&mut self.exited);
        Err(fail(&self.child, exited, self.ready_at, reason, connections).await)
    }
}

/// Tells the successor it passed. Told or not (it may be exiting this instant), it is on its
/// own now.
async fn pass(mut write: tokio::net::unix::OwnedWriteHalf, window: Duration, connections: u64) -> Passed {
    let _ = write.write_all(b"pass\n").await;
    Passed { window, connections }
}

/// Kills and reaps the successor unless it was reaped already (`exited` is `None`);
/// describes how it failed.
async fn fail(
    child: &ChildProcess,
    exited: Option<&mut oneshot::Receiver<String>>,
    ready_at: Instant,
    reason: String,
    connections: u64,
) -> CanaryFailed {
    let lived = ready_at.elapsed();
    if let Some(exited) = exited {
        // Through the pidfd: even if the reaper got it meanwhile, no other process is hit.
        let _ = child.signal(Signal::SIGKILL);
        let _ = exited.await;
    }
    CanaryFailed {
        pid: child.pid(),
        reason,
        lived,
        connections,
    }
}

/// A successor's side of the channel: it pings until its predecessor's verdict.
#[derive(Debug)]
pub struct PredecessorChannel(OwnedFd);

/// How the predecessor's canary window ended, as the successor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The predecessor said `pass`: it hands over (systemd's main pid, the pid file) and
    /// drains.
    Passed,
    /// The predecessor went away without a verdict: this generation is on its own.
    Gone,
}

impl PredecessorChannel {
    pub(crate) fn new(fd: OwnedFd) -> PredecessorChannel {
        PredecessorChannel(fd)
    }

    /// Pings every [`PING_EVERY`] with `connections()` until the verdict. Call it inside a
    /// tokio runtime, once this generation serves.
    pub async fn ping_until_verdict(self, connections: impl Fn() -> usize) -> io::Result<Verdict> {
        let stream = std::os::unix::net::UnixStream::from(self.0);
        stream.set_nonblocking(true)?;
        let (read, mut write) = UnixStream::from_std(stream)?.into_split();
        let mut lines = BufReader::new(read).lines();
        let mut tick = tokio::time::interval(PING_EVERY);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if write.write_all(format!("ping {}\n", connections()).as_bytes()).await.is_err() {
                        return Ok(Verdict::Gone);
                    }
                }
                line = lines.next_line() => return Ok(match line {
                    Ok(Some(l)) if l.trim() == "pass" => Verdict::Passed,
                    _ => Verdict::Gone,
                }),
            }
        }
    }
}
