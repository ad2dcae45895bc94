//! systemd's notify protocol. Every call is a no-op without `NOTIFY_SOCKET`, so baton runs
//! the same with or without systemd; a failed send is logged, never fatal.

use std::os::fd::BorrowedFd;

use baton_handoff::inherit::STORED_NAME_PREFIX;
use sd_notify::NotifyState;
use tracing::{debug, info, warn};

fn send(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        debug!("sd_notify failed: {e}");
    }
}

/// The new generation serves: it becomes the unit's main process, then READY.
/// MAINPID must come before the old generation exits (NotifyAccess=all), or systemd
/// considers the service dead.
pub fn ready(status: &str) {
    send(&[
        NotifyState::MainPid(std::process::id()),
        NotifyState::Ready,
        NotifyState::Status(status),
    ]);
}

/// A successor passed its canary window: it becomes the unit's main process, and the
/// handoff (the reload) is over. Sent by this, the old generation, which stays the main
/// process until this message, so systemd never holds a main pid that could die inside
/// the window (NotifyAccess=all lets it name another pid).
pub fn handed_over(successor: u32, status: &str) {
    send(&[
        NotifyState::MainPid(successor),
        NotifyState::Ready,
        NotifyState::Status(status),
    ]);
}

/// A handoff starts; `systemctl reload` waits for the next READY=1.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("handoff in progress")];
    if let Ok(now) = NotifyState::monotonic_usec_now() {
        states.push(now);
    }
    send(&states);
}

/// A handoff failed: this generation serves on and must say READY again, or the unit
/// would stay "reloading".
pub fn rolled_back(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn stopping(status: &str) {
    send(&[NotifyState::Stopping, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

/// Keeps the listening sockets this generation bound itself in systemd's fd store
/// (`FileDescriptorStoreMax=` in the unit), so that a restart after a crash gets them back
/// with their accept queues: first `FDSTOREREMOVE=1` for the names whose socket it no
/// longer keeps (the configuration dropped, moved or renamed them), then `FDSTORE=1` for
/// each of `bound` under `FDNAME=bound.<name>` (systemd ignores a socket it holds already).
/// Nothing happens without systemd.
pub fn sync_fd_store(stale: &[String], bound: &[(&str, BorrowedFd<'_>)]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    for name in stale {
        let stored = format!("{STORED_NAME_PREFIX}{name}");
        send(&[NotifyState::FdStoreRemove, NotifyState::FdName(&stored)]);
    }
    let mut kept = Vec::new();
    for (name, fd) in bound {
        let stored = format!("{STORED_NAME_PREFIX}{name}");
        // systemd's rule for FDNAME: printable ASCII without ':', at most 255 bytes.
        if stored.len() > 255 || !stored.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            warn!(listener = %name, "not kept in systemd's fd store: the name is not printable ASCII of at most 249 bytes");
            continue;
        }
        match sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(&stored)], &[*fd]) {
            Ok(()) => kept.push(*name),
            Err(e) => warn!(listener = %name, "cannot pass the listener to systemd's fd store: {e}"),
        }
    }
    info!(kept = %kept.join(","), removed = %stale.join(","), "systemd's fd store holds the listeners baton bound");
}

/// Pings systemd's watchdog at half its interval, when `WATCHDOG_USEC` asks for it.
pub fn spawn_watchdog() {
    let Some(interval) = watchdog_interval() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval / 2);
        loop {
            tick.tick().await;
            send(&[NotifyState::Watchdog]);
        }
    });
}

/// `WATCHDOG_USEC`, when systemd asks for keep-alive pings. `WATCHDOG_PID` is deliberately
/// not checked (unlike `sd_notify::watchdog_enabled`): it names the process systemd started,
/// and every later generation inherits it unchanged, so the check would silence the watchdog
/// after the first handoff and systemd would kill the unit at the next timeout. Each
/// generation sends `MAINPID=<self>` (see [`ready`]) before it starts pinging, so the pings
/// come from the unit's main process.
fn watchdog_interval() -> Option<std::time::Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
    (usec > 0).then(|| std::time::Duration::from_micros(usec))
}
