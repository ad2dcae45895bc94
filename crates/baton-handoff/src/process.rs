//! fd and process hygiene around fork: what a successor may inherit, and whether a pid
//! still names a live process.

use std::io;
use std::os::fd::RawFd;

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
