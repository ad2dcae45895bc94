//! Which TCP connections a process holds, read from `/proc`: the clients a generation had
//! accepted on a port, by their port. baton-chaos reads this from a successor it is about to
//! kill, so that each client failure is laid on the crash only if its connection was one the
//! crashed process held (not because it happened near the crash on the clock).

use std::collections::HashSet;
use std::io;

/// The remote ports of the TCP connections that process `pid` holds with local port `port`
/// (over IPv4 or IPv6): on a proxy listener's port, its clients' ports. The caller stops the
/// process first (SIGSTOP) if the set must not change while it is read.
pub fn client_ports(pid: u32, port: u16) -> io::Result<HashSet<u16>> {
    let inodes = socket_inodes(pid)?;
    let mut clients = HashSet::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))?;
        for line in text.lines().skip(1) {
            if let Some(c) = Connection::parse(line)
                && c.local_port == port
                && c.remote_port != 0
                && inodes.contains(&c.inode)
            {
                clients.insert(c.remote_port);
            }
        }
    }
    Ok(clients)
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

/// The inodes of the sockets among `pid`'s open files (links `socket:[N]`).
fn socket_inodes(pid: u32) -> io::Result<HashSet<u64>> {
    let mut inodes = HashSet::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        // An fd closed between the listing and the readlink is simply not held any more.
        let Ok(target) = std::fs::read_link(entry?.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if let Some(n) = target.strip_prefix("socket:[").and_then(|t| t.strip_suffix(']')) {
            inodes.insert(n.parse().map_err(|_| io::Error::other(format!("fd link {target}")))?);
        }
    }
    Ok(inodes)
}

/// One line of `/proc/net/tcp` or `tcp6`: `sl local_address rem_address st tx:rx tr:when
/// retrnsmt uid timeout inode ...`, addresses as `HEXADDR:HEXPORT`.
struct Connection {
    local_port: u16,
    remote_port: u16,
    inode: u64,
}

impl Connection {
    fn parse(line: &str) -> Option<Connection> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let port = |addr: &str| u16::from_str_radix(addr.rsplit(':').next()?, 16).ok();
        Some(Connection {
            local_port: port(fields.get(1)?)?,
            remote_port: port(fields.get(2)?)?,
            inode: fields.get(9)?.parse().ok()?,
        })
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
    /// accept queue (held by the kernel, not by an fd of ours) is not.
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
        // The client sockets' own lines have local ports of their own, not `port`.
        assert_eq!(
            found.len(),
            1,
            "only the accepted client, not the queued {queued}: {found:?}"
        );
    }

    #[test]
    fn parses_a_proc_net_tcp_line() {
        let line = "   3: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000  1000        0 424242 1 0000000000000000 20 4 30 10 -1";
        let c = Connection::parse(line).expect("a well-formed line");
        assert_eq!((c.local_port, c.remote_port, c.inode), (8080, 50000, 424242));
        assert!(
            Connection::parse("  sl  local_address rem_address").is_none(),
            "the header"
        );
    }
}
