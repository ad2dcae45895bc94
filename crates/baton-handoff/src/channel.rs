//! The two-way channel between a generation and its successor: a Unix socketpair created at
//! spawn, beside the one-way readiness pipe. After the successor reports ready, the old
//! generation keeps its listening sockets and watches it for a *canary window*: the
//! successor sends `ping <open connections>\n` every [`PING_EVERY`]; it fails the canary if
//! it exits or stays silent for [`SILENCE`]. At the verdict the old generation sends
//! `pass\n` and the successor is on its own; a failed successor is killed and reaped. A
//! successor that offered it at readiness then receives live connections over the same
//! channel ([`crate::transfer`]).
//!
//! [`Watch`] is the old generation's side, [`PredecessorChannel`] the successor's. Each text
//! line is one message of a SOCK_SEQPACKET pair (the private `wire` module).

use std::io;
use std::os::fd::OwnedFd;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::sync::oneshot;

use crate::process::ChildProcess;
use crate::transfer::{Incoming, Transfer};
use crate::wire::Wire;

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
    offers: Offers,
    ready_at: Instant,
}

/// What a successor said it does, on its readiness line.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Offers {
    /// It pings (`canary`; a successor of an older version only reports ready).
    pub pings: bool,
    /// It confirms the verdict once taken in (`confirms`).
    pub confirms: bool,
    /// It takes live connections in our version of the transfer (`xfer=N`).
    pub takes_transfer: bool,
}

/// The canary passed.
#[derive(Debug)]
pub struct Passed {
    /// The window it was watched for.
    pub window: Duration,
    /// Connections it had open at its last ping.
    pub connections: u64,
    /// The way to move live connections to it, if it offered to take them.
    pub transfer: Option<Transfer>,
}

/// The canary failed: the successor was killed (if it still ran) and reaped.
#[derive(Debug, Clone, thiserror::Error)]
#[error("new generation (pid {pid}) failed {lived:?} after ready: {reason}")]
pub struct CanaryFailed {
    /// The successor's pid.
    pub pid: u32,
    /// How it failed (exited, went silent, closed the channel).
    pub reason: String,
    /// From ready to the failure.
    pub lived: Duration,
    /// Connections it had open at its last ping: lost with it.
    pub connections: u64,
}

impl Watch {
    pub(crate) fn new(
        child: ChildProcess,
        exited: oneshot::Receiver<String>,
        channel: OwnedFd,
        offers: Offers,
    ) -> Watch {
        Watch {
            child,
            exited,
            channel,
            offers,
            ready_at: Instant::now(),
        }
    }

    /// Watches the successor for `window`. Call it inside a tokio runtime.
    pub async fn canary(mut self, window: Duration) -> Result<Passed, CanaryFailed> {
        let Ok(wire) = Wire::new(self.channel) else {
            let reason = "the channel is unusable".to_string();
            return Err(fail(&self.child, Some(&mut self.exited), self.ready_at, reason, 0).await);
        };
        let offers = self.offers;
        let pass = |wire, connections| pass(wire, window, connections, offers);
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
                    if self.offers.pings && last_ping.elapsed() > 2 * PING_EVERY {
                        overtime = true;
                        continue;
                    }
                    return Ok(pass(wire, connections).await);
                }
                message = wire.recv(), if self.offers.pings => match message {
                    Ok(Some(m)) => {
                        let text = String::from_utf8_lossy(&m.bytes);
                        connections = text.trim().strip_prefix("ping ").and_then(|n| n.parse().ok()).unwrap_or(connections);
                        last_ping = Instant::now();
                        if overtime {
                            return Ok(pass(wire, connections).await);
                        }
                    }
                    _ => break "closed the channel".to_string(),
                },
                () = tokio::time::sleep_until(silent_until), if self.offers.pings => {
                    break format!("no liveness ping for {SILENCE:?}");
                }
            }
        };
        let exited = (!reaped).then_some(&mut self.exited);
        Err(fail(&self.child, exited, self.ready_at, reason, connections).await)
    }
}

/// Tells the successor it passed, and waits (up to [`SILENCE`]) until it confirms it took
/// the verdict in, if it said it would: a trigger sent once the handoff is reported done
/// then finds it out of its window. Told or not (it may be exiting this instant), it is on
/// its own now. The newline is for successors of older versions, which read lines.
async fn pass(wire: Wire, window: Duration, connections: u64, offers: Offers) -> Passed {
    let told = wire.send(b"pass\n", &[]).await.is_ok();
    if told && offers.confirms {
        let seen = async {
            // Pings sent before our `pass` arrived may come first.
            while let Ok(Some(m)) = wire.recv().await {
                if m.bytes.as_slice() == b"seen" {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(SILENCE, seen).await;
    }
    Passed {
        window,
        connections,
        transfer: (told && offers.takes_transfer).then(|| Transfer::new(wire)),
    }
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
    /// tokio runtime, once this generation serves. With `Passed` comes the channel's
    /// receiving side: the predecessor's live connections arrive there, if it sends any.
    pub async fn ping_until_verdict(self, connections: impl Fn() -> usize) -> io::Result<(Verdict, Option<Incoming>)> {
        let wire = Wire::new(self.0)?;
        let mut tick = tokio::time::interval(PING_EVERY);
        // A predecessor that sent `pass` and exited at once makes our next ping fail while
        // its `pass` still waits to be read: after a failed ping, only the read decides.
        let mut pinging = true;
        loop {
            tokio::select! {
                _ = tick.tick(), if pinging => {
                    pinging = wire.send(format!("ping {}\n", connections()).as_bytes(), &[]).await.is_ok();
                }
                message = wire.recv() => return Ok(match message {
                    Ok(Some(m)) if m.bytes.trim_ascii() == b"pass" => (Verdict::Passed, Some(Incoming::new(wire))),
                    _ => (Verdict::Gone, None),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    use nix::unistd::Pid;

    fn channel() -> (OwnedFd, OwnedFd) {
        socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair")
    }

    const OFFERS: Offers = Offers {
        pings: true,
        confirms: true,
        takes_transfer: true,
    };

    /// A watched successor: `program args`, reaped by a thread of its own as `spawn_successor`
    /// does; the successor's end of the channel comes back too.
    fn watch(program: &str, args: &[&str]) -> (Watch, OwnedFd, u32) {
        let child = std::process::Command::new(program).args(args).spawn().expect("spawn");
        let pid = child.id();
        std::mem::forget(child);
        let handle = ChildProcess::new(Pid::from_raw(pid as i32));
        let (tx, rx) = oneshot::channel();
        let reaper = handle.clone();
        std::thread::spawn(move || tx.send(reaper.wait_blocking()));
        let (ours, theirs) = channel();
        (Watch::new(handle, rx, ours, OFFERS), theirs, pid)
    }

    #[tokio::test]
    async fn a_pinging_successor_passes_and_hears_it() {
        let (watch, theirs, pid) = watch("sleep", &["30"]);
        let pinging = tokio::spawn(PredecessorChannel::new(theirs).ping_until_verdict(|| 3));
        let passed = watch
            .canary(Duration::from_millis(100))
            .await
            .expect("pings within the window pass");
        assert_eq!(passed.connections, 3, "the count of its last ping");
        let (verdict, incoming) = pinging.await.expect("join").expect("ping");
        assert_eq!(verdict, Verdict::Passed);
        assert!(
            incoming.is_some() && passed.transfer.is_some(),
            "it offered to take connections"
        );
        ChildProcess::new(Pid::from_raw(pid as i32))
            .signal(Signal::SIGKILL)
            .expect("kill");
    }

    #[tokio::test]
    async fn a_silent_successor_fails_and_is_killed() {
        let (watch, _silent, pid) = watch("sleep", &["30"]);
        let failed = watch.canary(Duration::from_secs(30)).await.expect_err("silence fails");
        assert!(failed.reason.contains("no liveness ping"), "{failed}");
        assert_eq!(failed.pid, pid);
        // `fail` awaited the reaper, which saw the kill.
        assert!(!crate::process::alive(pid), "a failed successor must not keep running");
    }

    #[tokio::test]
    async fn a_successor_that_exits_fails_with_its_status() {
        let (watch, _theirs, pid) = watch("sh", &["-c", "exit 3"]);
        let failed = watch.canary(Duration::from_secs(30)).await.expect_err("an exit fails");
        assert_eq!(
            failed.reason, "exited: exit status 3",
            "reaped once, not waited for again"
        );
        assert!(!crate::process::alive(pid));
    }

    /// `pass` on our end of a fresh channel, the successor's end first pinging (if `ping`),
    /// then running `successor`; how long `pass` took on the paused clock, and what it
    /// returned.
    async fn timed_pass(offers: Offers, ping: bool, successor: impl AsyncFnOnce(Wire)) -> (Duration, Passed) {
        let (ours, theirs) = channel();
        let theirs = Wire::new(theirs).expect("register");
        if ping {
            theirs.send(b"ping 1\n", &[]).await.expect("a ping before the verdict");
        }
        let start = tokio::time::Instant::now();
        let passing = tokio::spawn(pass(Wire::new(ours).unwrap(), Duration::ZERO, 1, offers));
        let got = theirs.recv().await.expect("recv").expect("a message");
        assert_eq!(got.bytes, b"pass\n");
        successor(theirs).await;
        let passed = passing.await.expect("join");
        (start.elapsed(), passed)
    }

    #[tokio::test(start_paused = true)]
    async fn pass_waits_for_seen_past_earlier_pings_if_promised_only() {
        let (took, _) = timed_pass(OFFERS, true, async |w: Wire| w.send(b"seen", &[]).await.expect("seen")).await;
        assert!(took < SILENCE, "seen ends the wait: {took:?}");
        // Promised, never said (the channel held open): the wait runs to its bound, past
        // the ping that came first.
        let (took, passed) = timed_pass(OFFERS, true, async |w: Wire| std::mem::forget(w)).await;
        assert_eq!(took, SILENCE, "a ping is not the confirmation");
        assert!(passed.transfer.is_some(), "told, and it takes connections");
        let old = Offers {
            confirms: false,
            takes_transfer: false,
            ..OFFERS
        };
        let (took, passed) = timed_pass(old, false, async |w: Wire| std::mem::forget(w)).await;
        assert!(took < SILENCE, "not promised: not waited for ({took:?})");
        assert!(passed.transfer.is_none(), "it did not offer to take connections");
    }

    #[tokio::test]
    async fn a_successor_gone_before_the_verdict_gets_no_transfer() {
        let (ours, theirs) = channel();
        drop(theirs);
        let passed = pass(Wire::new(ours).unwrap(), Duration::ZERO, 0, OFFERS).await;
        assert!(passed.transfer.is_none(), "not told: nothing to transfer to");
    }
}
