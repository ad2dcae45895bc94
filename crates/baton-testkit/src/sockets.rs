//! Which TCP connections a process holds: the clients a generation had accepted on a port,
//! by their port. baton-chaos reads this from a successor it has stopped and is about to
//! kill, so that each client failure is laid on the crash only if its connection was one the
//! crashed process held (not because it happened near the crash on the clock).
//!
//! Each socket among the process's fds is duplicated into this process (`pidfd_getfd(2)`,
//! Linux 5.6) and asked its addresses, then closed: the cost is the process's own fds.
//! (Reading `/proc/PID/net/tcp` instead walks every socket of the network namespace: with the
//! TIME_WAIT sockets of a load test, long enough under load that a stopped successor missed
//! its canary's pings and was killed by its predecessor first.)

use std::collections::HashSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{SockaddrStorage, getpeername, getsockname};

/// The remote ports of the TCP connections that process `pid` holds with local port `port`
/// (over IPv4 or IPv6): on a proxy listener's port, its clients' ports. The caller stops the
/// process first (SIGSTOP) if the set must not change while it is read.
pub fn client_ports(pid: u32, port: u16) -> io::Result<HashSet<u16>> {
    let pidfd = pidfd_open(pid)?;
    let mut clients = HashSet::new();
    for fd in socket_fds(pid)? {
        // An fd closed since the listing is simply not held any more.
        let Ok(dup) = pidfd_getfd(&pidfd, fd) else {
            continue;
        };
        let local = getsockname::<SockaddrStorage>(dup.as_raw_fd()).ok();
        if local.as_ref().and_then(inet_port) != Some(port) {
            continue;
        }
        // A listening socket has no peer.
        if let Some(peer) = getpeername::<SockaddrStorage>(dup.as_raw_fd())
            .ok()
            .as_ref()
            .and_then(inet_port)
        {
            clients.insert(peer);
        }
    }
    Ok(clients)
}

/// The port of an IPv4 or IPv6 address (`None`: a Unix socket's, say).
fn inet_port(a: &SockaddrStorage) -> Option<u16> {
    a.as_sockaddr_in()
        .map(|v4| v4.port())
        .or_else(|| a.as_sockaddr_in6().map(|v6| v6.port()))
}

/// The numbers of `pid`'s fds that are sockets (links `socket:[N]`).
fn socket_fds(pid: u32) -> io::Result<Vec<RawFd>> {
    let mut fds = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let entry = entry?;
        let is_socket = std::fs::read_link(entry.path()).is_ok_and(|t| t.to_string_lossy().starts_with("socket:"));
        if is_socket && let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) {
            fds.push(fd);
        }
    }
    Ok(fds)
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1; no memory.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

/// A duplicate of `fd` of the process behind `pidfd`, in this process.
fn pidfd_getfd(pidfd: &OwnedFd, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_getfd(2) takes a pidfd, an fd number and flags, and returns a new fd
    // (close-on-exec) or -1; no memory.
    let dup = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    if dup < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(dup as RawFd) })
}

/// Waits (at most `within`) until every thread of `pid` is stopped (state `T` in
/// `/proc/PID/task/*/stat`): kill(2) returns once SIGSTOP is sent, not once it has taken
/// effect, and a thread still running could accept a connection after the caller looked.
pub fn wait_stopped(pid: u32, within: std::time::Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let mut running = 0;
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let stat = std::fs::read_to_string(task?.path().join("stat")).unwrap_or_default();
            // `pid (comm) S ...`: the state follows the last ')', as comm may hold one.
            let state = stat.rsplit(')').next().and_then(|r| r.split_whitespace().next());
            if !matches!(state, Some("T" | "t") | None) {
                running += 1;
            }
        }
        if running == 0 {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::other(format!("{running} threads of {pid} still running")));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    use super::*;

    /// A child stopped by SIGSTOP is seen stopped; the witness is that it was seen running
    /// first (a wait that returned at once for any process would pass without it).
    #[test]
    fn waits_until_a_stopped_process_is_stopped() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let short = std::time::Duration::from_millis(50);
        assert!(wait_stopped(pid, short).is_err(), "a running sleep is not stopped");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGSTOP,
        )
        .unwrap();
        wait_stopped(pid, std::time::Duration::from_secs(10)).expect("stopped after SIGSTOP");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// This process accepts one client: its port is found, and a second client still in the
    /// accept queue (held by the kernel, not by an fd of ours) is not; nor are the clients'
    /// own sockets (their local ports are not the listener's).
    #[test]
    fn finds_the_accepted_clients_by_port() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted_client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_accepted, _) = listener.accept().unwrap();
        let queued_client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let found = client_ports(std::process::id(), port).unwrap();
        let accepted = accepted_client.local_addr().unwrap().port();
        let queued = queued_client.local_addr().unwrap().port();
        assert!(
            found.contains(&accepted),
            "the accepted client's port {accepted} in {found:?}"
        );
        assert_eq!(
            found.len(),
            1,
            "only the accepted client, not the queued {queued}: {found:?}"
        );
    }
}
