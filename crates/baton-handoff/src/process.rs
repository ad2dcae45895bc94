//! fd and process hygiene around fork: what a successor may inherit, a child process held
//! by its pidfd, and whether a pid still names a live process.

use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use nix::sys::signal::Signal;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;

/// libc's convention for a call that returns an int: -1 (any negative) and `errno` on
/// failure. One place for it, so every call below checks it the same way.
fn os_result(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(r) }
}

/// Marks `fd` close-on-exec.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFD/F_SETFD change only the fd's flag word; no memory is involved.
    let flags = os_result(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    // SAFETY: as above.
    os_result(unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) })?;
    Ok(())
}

/// Marks every fd above stderr close-on-exec, so that whatever our own parent leaked to us
/// (a shell's pipes, a supervisor's sockets) never reaches a successor: it gets exactly the
/// listeners and the readiness pipe. Call it before anything opens fds of its own.
pub fn close_on_exec_all() -> io::Result<()> {
    let names = std::fs::read_dir("/proc/self/fd")?.filter_map(|e| e.ok().map(|e| e.file_name()));
    for fd in above_stderr(names) {
        skip_closed(set_cloexec(fd))?;
    }
    Ok(())
}

/// The fd numbers among the names of `/proc/self/fd`'s entries, but stdin, stdout and stderr,
/// which a successor shares on purpose.
fn above_stderr(names: impl Iterator<Item = std::ffi::OsString>) -> Vec<RawFd> {
    names
        .filter_map(|n| n.to_str()?.parse().ok())
        .filter(|fd| *fd > 2)
        .collect()
}

/// An fd listed in `/proc/self/fd` and closed since (the listing's own fd) is not an error;
/// any other failure is.
fn skip_closed(marked: io::Result<()>) -> io::Result<()> {
    match marked {
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => Ok(()),
        other => other,
    }
}

/// How many threads this process runs (`Threads:` in `/proc/self/status`). One means no
/// other thread can be reading the environment while this one changes it: a new thread
/// could only be started by this one.
pub fn thread_count() -> io::Result<u64> {
    threads_in(&std::fs::read_to_string("/proc/self/status")?)
}

/// The `Threads:` count of a `/proc/<pid>/status` text.
fn threads_in(status: &str) -> io::Result<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .ok_or_else(|| io::Error::other("no Threads line in /proc/self/status"))
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
    os_result(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) })?;
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: as above.
        os_result(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) })?;
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

    /// The child's pid.
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
    effective_capability(&std::fs::read_to_string(path)?, cap)
}

/// Whether bit `cap` is set in the `CapEff:` line (hexadecimal) of a `/proc/<pid>/status`.
fn effective_capability(status: &str, cap: u32) -> io::Result<bool> {
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
    fn the_thread_count_is_read_and_sees_a_new_thread() {
        assert_eq!(threads_in("Name:\tx\nThreads:\t1\nX: 2\n").unwrap(), 1);
        assert!(threads_in("Name:\tx\n").is_err(), "no Threads line");
        // Other tests run threads of their own meanwhile: this test's and the one it holds
        // alive are at least two.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || rx.recv());
        assert!(
            thread_count().expect("read") >= 2,
            "this test's thread and the spawned one"
        );
        drop(tx);
        let _ = t.join();
    }

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
    #[test]
    fn os_result_fails_on_a_negative_return_only() {
        assert_eq!(os_result(0).expect("0 is success"), 0);
        assert_eq!(os_result(1).expect("a positive count is success"), 1);
        assert!(os_result(-1).is_err(), "-1 is libc's failure");
    }

    /// The flags of `fd`, or the failure of F_GETFD.
    fn fd_flags(fd: RawFd) -> io::Result<libc::c_int> {
        // SAFETY: F_GETFD reads the flag word of an fd number; no memory is involved.
        os_result(unsafe { libc::fcntl(fd, libc::F_GETFD) })
    }

    #[test]
    fn set_cloexec_sets_the_flag_and_keeps_it_when_set_already() {
        let (r, _w) = nix::unistd::pipe().expect("pipe");
        let fd = r.as_raw_fd();
        // SAFETY: clearing the flag on a pipe this test owns.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        set_cloexec(fd).expect("mark a clear fd");
        assert_eq!(fd_flags(fd).unwrap() & libc::FD_CLOEXEC, libc::FD_CLOEXEC, "marked");
        // Marked already (F_GETFD returns 1): still a success, and the flag must stay set,
        // not be toggled off.
        set_cloexec(fd).expect("marking a marked fd is no error");
        assert_eq!(
            fd_flags(fd).unwrap() & libc::FD_CLOEXEC,
            libc::FD_CLOEXEC,
            "still marked"
        );
    }

    #[test]
    fn set_cloexec_reports_an_fd_that_is_not_open() {
        let (_r, w) = nix::unistd::pipe().expect("pipe");
        set_cloexec(w.as_raw_fd()).expect("an open fd is marked");
        // -1 is never open (a closed number could be reused by another test's thread).
        let e = set_cloexec(-1).expect_err("an fd that is not open cannot be marked");
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    }

    #[test]
    fn only_fds_above_stderr_are_marked() {
        let names = ["0", "1", "2", "3", "17", "not-an-fd"].map(std::ffi::OsString::from);
        assert_eq!(
            above_stderr(names.into_iter()),
            vec![3, 17],
            "stdio is shared on purpose"
        );
    }

    #[test]
    fn an_fd_closed_since_the_listing_is_skipped_but_another_failure_is_not() {
        skip_closed(Ok(())).expect("a marked fd");
        skip_closed(Err(io::Error::from_raw_os_error(libc::EBADF))).expect("the listing's own fd");
        let e = skip_closed(Err(io::Error::from_raw_os_error(libc::EPERM)))
            .expect_err("a failure to mark an open fd would leak it to a successor");
        assert_eq!(e.raw_os_error(), Some(libc::EPERM));
    }

    fn open_files_limit() -> libc::rlimit {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit writes one rlimit struct on our stack.
        os_result(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) }).expect("getrlimit");
        limit
    }

    /// Lowers the soft limit by one (harmless for the other tests, which hold a few fds),
    /// then checks that raising brings it back to the hard limit and says so. The only test
    /// that changes the limit, so no other one races it.
    #[test]
    fn raise_open_files_limit_raises_the_soft_limit_to_the_hard_one_and_returns_it() {
        let hard = open_files_limit().rlim_max;
        assert!(hard > 64, "a hard limit of {hard} leaves no room to lower the soft one");
        let lowered = libc::rlimit {
            rlim_cur: hard - 1,
            rlim_max: hard,
        };
        // SAFETY: setrlimit reads one rlimit struct on our stack.
        os_result(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }).expect("setrlimit");
        assert_eq!(open_files_limit().rlim_cur, hard - 1, "lowered for the test");
        let raised = raise_open_files_limit().expect("raise");
        assert_eq!(open_files_limit().rlim_cur, hard, "the soft limit is the hard one now");
        assert_eq!(raised as libc::rlim_t, hard, "and the function says what it is");
        // At the hard limit already: nothing to raise, same answer.
        assert_eq!(raise_open_files_limit().expect("raise again") as libc::rlim_t, hard);
    }

    #[test]
    fn euid_is_the_user_the_kernel_counts_this_process_as() {
        use std::os::unix::fs::MetadataExt;
        // /proc/self belongs to the process's effective user.
        let owner = std::fs::metadata("/proc/self").expect("stat /proc/self").uid();
        assert_eq!(euid(), owner);
        if owner != 0 {
            return;
        }
        // As root, 0 is also what a broken euid() might return: a forked child drops to
        // nobody and reports what euid() says there. Only async-signal-safe calls in the child.
        let (r, w) = nix::unistd::pipe().expect("pipe");
        // SAFETY: the child only calls setresuid, geteuid, write and _exit.
        match unsafe { nix::unistd::fork() }.expect("fork") {
            nix::unistd::ForkResult::Child => {
                // SAFETY: raw syscalls on values; the child exits right after.
                unsafe {
                    let ok = libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) == 0;
                    let uid = if ok { euid() } else { u32::MAX };
                    libc::write(w.as_raw_fd(), (&raw const uid).cast(), 4);
                    libc::_exit(0);
                }
            }
            nix::unistd::ForkResult::Parent { child } => {
                drop(w);
                let mut buf = [0u8; 4];
                let mut f = std::fs::File::from(r);
                io::Read::read_exact(&mut f, &mut buf).expect("the child's euid");
                waitpid(child, None).expect("reap the child");
                assert_eq!(u32::from_ne_bytes(buf), 65534, "euid() after dropping to nobody");
            }
        }
    }

    #[test]
    fn child_process_pid_is_the_childs() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn true");
        let handle = ChildProcess::new(Pid::from_raw(child.id() as i32));
        assert_eq!(handle.pid(), child.id());
        child.wait().expect("reap");
    }

    #[test]
    fn a_failure_to_signal_other_than_an_exited_child_is_reported() {
        // A pidfd that is not one: pidfd_send_signal fails with EBADF, which must not be
        // taken for "exited already" (the reaped case, which is no error, is in the test
        // above).
        let not_a_pidfd = std::fs::File::open("/dev/null").expect("open /dev/null");
        let handle = ChildProcess {
            pid: Pid::from_raw(i32::MAX),
            pidfd: Some(Arc::new(OwnedFd::from(not_a_pidfd))),
        };
        let e = handle.signal(Signal::SIGCONT).expect_err("not a pidfd");
        assert_eq!(e.raw_os_error(), Some(libc::EBADF), "{e}");
    }

    #[test]
    fn the_effective_set_is_read_bit_by_bit() {
        // Bit 10 (CAP_NET_BIND_SERVICE) alone.
        let status = "Name:\tbaton\nCapInh:\t0000000000000000\nCapEff:\t0000000000000400\n";
        assert!(
            effective_capability(status, CAP_NET_BIND_SERVICE).unwrap(),
            "bit 10 set"
        );
        assert!(!effective_capability(status, 9).unwrap(), "bit 9 clear (below)");
        assert!(!effective_capability(status, 11).unwrap(), "bit 11 clear (above)");
        assert!(!effective_capability(status, 0).unwrap(), "bit 0 clear");
        // Every bit but 10: CapInh (all clear) is not the line read.
        let status = "CapInh:\t0000000000000000\nCapEff:\tfffffffffffffbff\n";
        assert!(!effective_capability(status, 10).unwrap(), "bit 10 clear");
        assert!(effective_capability(status, 9).unwrap(), "bit 9 set");
        assert!(effective_capability(status, 63).unwrap(), "bit 63 set");
        assert!(effective_capability("CapInh:\t0\n", 10).is_err(), "no CapEff line");
        assert!(effective_capability("CapEff:\tzz\n", 10).is_err(), "not hexadecimal");
    }

    #[test]
    fn has_capability_reads_this_process_status() {
        let status = std::fs::read_to_string("/proc/self/status").expect("read status");
        for cap in 0..64 {
            let want = effective_capability(&status, cap).unwrap();
            assert_eq!(has_capability(None, cap).unwrap(), want, "cap {cap}, this process");
            let pid = Some(std::process::id());
            assert_eq!(has_capability(pid, cap).unwrap(), want, "cap {cap}, by pid");
        }
        // No capability is numbered 63 yet: a clear bit, beside whatever this process has.
        assert!(!has_capability(None, 63).unwrap());
    }
}
