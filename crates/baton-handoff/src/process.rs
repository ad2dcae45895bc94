//! fd and process hygiene around fork: what a successor may inherit, a child process held
//! by its pidfd, and whether a pid still names a live process.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

/// Marks `fd` close-on-exec.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD change only the fd's flag word; no memory is involved.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Marks every fd above stderr close-on-exec, so that whatever our own parent leaked to us
/// (a shell's pipes, a supervisor's sockets) never reaches a successor: it gets exactly the
/// listeners and the readiness pipe. Call it before anything opens fds of its own.
pub fn close_on_exec_all() -> io::Result<()> {
    let fds: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect();
    for fd in fds {
        match set_cloexec(fd) {
            // The directory listing's own fd, closed since.
            Err(e) if e.raw_os_error() == Some(libc::EBADF) => {}
            other => other?,
        }
    }
    Ok(())
}

/// Raises the soft limit on open files to the hard one and returns it: a server holds two
/// sockets per tunnel plus its pipes, and a hand-over has batches of them in flight at
/// once. The successor inherits the raised limit.
pub fn raise_open_files_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct, which lives on our stack.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } < 0 {
        return Err(io::Error::last_os_error());
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // rlim_t is u64 on 64-bit Linux, but c_ulong (u32) on 32-bit targets.
    #[allow(clippy::unnecessary_cast)]
    let open = limit.rlim_cur as u64;
    Ok(open)
}

/// This process's effective user id: who owns the files and sockets it creates.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) takes no arguments and cannot fail.
    unsafe { libc::geteuid() }
}

/// A child process, signalled and reaped through its pidfd (`pidfd_open(2)`, Linux 5.3) when
/// the kernel has them: a pidfd names one process for as long as it is open, so a signal
/// sent through it can never reach another process that got the same pid after the child
/// was reaped (the reaper is a thread of its own, so that could otherwise happen between a
/// check and a `kill`). Without pidfds (an old kernel, a seccomp filter) it falls back to
/// the pid.
#[derive(Debug, Clone)]
pub struct ChildProcess {
    pid: Pid,
    pidfd: Option<Arc<OwnedFd>>,
}

impl ChildProcess {
    /// Holds `pid`, a child that nobody has waited for yet: until it is reaped its pid cannot
    /// be reused, so the pidfd opened here names it.
    pub(crate) fn new(pid: Pid) -> ChildProcess {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1; no memory.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
        let pidfd = (fd >= 0).then(|| {
            // SAFETY: pidfd_open returned a fresh fd (close-on-exec) that nothing else owns.
            Arc::new(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
        });
        if pidfd.is_none() {
            let e = io::Error::last_os_error();
            tracing::warn!(
                pid = pid.as_raw(),
                "pidfd_open failed ({e}): signalling the new generation by its pid"
            );
        }
        ChildProcess { pid, pidfd }
    }

    pub fn pid(&self) -> u32 {
        self.pid.as_raw() as u32
    }

    /// Sends `signal`; a child that has exited already is not an error.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        let sent = match &self.pidfd {
            Some(fd) => {
                // SAFETY: pidfd_send_signal(2) with a pidfd we own, no siginfo, no flags.
                let r = unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        signal as libc::c_int,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                if r == 0 {
                    Ok(())
                } else {
                    Err(io::Error::last_os_error())
                }
            }
            None => nix::sys::signal::kill(self.pid, signal).map_err(io::Error::from),
        };
        match sent {
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(()),
            other => other,
        }
    }

    /// Blocks until the child ends and reaps it; says how it ended.
    pub(crate) fn wait_blocking(&self) -> String {
        loop {
            let status = match &self.pidfd {
                Some(fd) => waitid(Id::PIDFd(fd.as_fd()), WaitPidFlag::WEXITED),
                None => waitpid(self.pid, None),
            };
            match status {
                Err(nix::errno::Errno::EINTR) => continue,
                Ok(s) => return describe_status(s),
                Err(e) => return format!("wait failed: {e}"),
            }
        }
    }
}

fn describe_status(s: WaitStatus) -> String {
    match s {
        WaitStatus::Exited(_, code) => format!("exit status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("killed by {sig}"),
        other => format!("{other:?}"),
    }
}

/// `CAP_NET_BIND_SERVICE` (`<linux/capability.h>`): binding ports below
/// `net.ipv4.ip_unprivileged_port_start`.
pub const CAP_NET_BIND_SERVICE: u32 = 10;

/// Whether process `pid` (`None`: this one) has capability `cap` in its effective set (the
/// one the kernel checks), from `CapEff` in `/proc/<pid>/status`.
pub fn has_capability(pid: Option<u32>, cap: u32) -> io::Result<bool> {
    let path = pid.map_or_else(|| "/proc/self/status".to_string(), |p| format!("/proc/{p}/status"));
    let status = std::fs::read_to_string(path)?;
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/<pid>/status"))?;
    let set = u64::from_str_radix(hex.trim(), 16).map_err(io::Error::other)?;
    Ok((set >> cap) & 1 == 1)
}

/// Whether `pid` is alive and not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state letter follows the command name, which ends at the last ')'.
        Ok(stat) => stat
            .rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_reaped_child_is_not() {
        assert!(alive(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(!alive(pid));
    }

    #[test]
    fn a_child_is_signalled_and_reaped_through_its_pidfd_and_never_after() {
        let child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let handle = ChildProcess::new(Pid::from_raw(child.id() as i32));
        assert!(handle.pidfd.is_some(), "this kernel has pidfd_open");
        handle.signal(Signal::SIGKILL).expect("signal through the pidfd");
        assert_eq!(handle.wait_blocking(), "killed by SIGKILL");
        // Reaped: the pid may name another process now, and the pidfd still names ours.
        handle.signal(Signal::SIGKILL).expect("a reaped child is not an error");
        std::mem::forget(child);
    }

    #[test]
    fn close_on_exec_all_marks_leaked_fds() {
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let fd = std::os::fd::AsRawFd::as_raw_fd(&r);
        // SAFETY: clearing the flag on a pipe this test owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        close_on_exec_all().expect("walk /proc/self/fd");
        // SAFETY: reading the flag of the same fd.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}
