//! Spawning the next generation, waiting for it to report ready, and rolling back (kill and
//! reap it) when it does not.
//!
//! Protocol: the listening sockets go to the child as fds 3.. with `LISTEN_FDS`,
//! `LISTEN_FDNAMES` and `LISTEN_PID` = the child's own pid, so any `sd_listen_fds` consumer
//! accepts them; where each came from goes in `BATON_LISTEN_ORIGINS`; the write end of a
//! readiness pipe goes as the next fd, its number in `BATON_READY_FD`. The child writes
//! `ready <pid>\n` once it serves, the exec failure's errno as `exec-error NNNN\n`, or why it
//! cannot serve as `failed <reason>\n` before it exits. The
//! child's end of the channel follows (`BATON_CHANNEL_FD`), then any extra named fds
//! (`BATON_EXTRA_FDS=name=fd:...`). A child that fails before it is ready may say why:
//! `failed <reason>\n` ([`crate::ReadySignal::failure_reporter`]).
//!
//! The program is the path the first generation was started from (`BATON_PROGRAM`), with
//! the arguments it was started with (`BATON_ARGS`), so that a wrapper installed at the path
//! changes only the process it starts; or, to roll back, a binary held open by fd
//! ([`SuccessorSpec::binary`]), executed with `execveat(2)`.

use std::ffi::{CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use tokio::io::AsyncReadExt;
use tokio::sync::oneshot;

use crate::channel::Watch;
use crate::inherit::{
    ARGS_ENV, CHANNEL_FD_ENV, EXTRA_FDS_ENV, FIRST_LISTEN_FD, GENERATION_ENV, ORIGINS_ENV, PROGRAM_ENV, READY_FD_ENV,
    encode_args, protocol_env,
};
use crate::listener::Origin;
use crate::process::ChildProcess;

/// Why a successor did not become ready. It was killed and reaped (if it ever ran).
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The program is not executable by this process.
    #[error("cannot execute {path}")]
    NotExecutable {
        /// The program.
        path: PathBuf,
        /// `access(2)`'s error.
        #[source]
        source: io::Error,
    },
    /// `fork(2)` failed.
    #[error("fork failed")]
    Fork(#[source] nix::Error),
    /// `execve(2)` failed in the child (it wrote the errno to the readiness pipe).
    #[error("exec of {path} failed in the child")]
    Exec {
        /// The program.
        path: PathBuf,
        /// The errno.
        #[source]
        errno: nix::Error,
    },
    /// The successor exited before it was ready.
    #[error("new generation (pid {pid}) exited before it was ready: {status}")]
    ChildExited {
        /// The successor's pid.
        pid: u32,
        /// How it ended (`exit status 3`, `killed by SIGSEGV`).
        status: String,
    },
    /// The child said why it could not start (its configuration, a listener, ...).
    #[error("new generation (pid {pid}) exited before it was ready: {reason}")]
    StartFailed {
        /// The successor's pid.
        pid: u32,
        /// What it wrote after `failed `.
        reason: String,
    },
    /// The successor was not ready in time.
    #[error("new generation (pid {pid}) was not ready within {timeout:?}; killed")]
    Timeout {
        /// The successor's pid.
        pid: u32,
        /// The time it had.
        timeout: Duration,
    },
    /// A system call of the handoff failed; `step` says which.
    #[error("handoff i/o while {step}")]
    Io {
        /// What the handoff was doing.
        step: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// The error of `step`, for `map_err`.
fn at(step: &'static str) -> impl FnOnce(io::Error) -> HandoffError {
    move |source| HandoffError::Io { step, source }
}

/// A listening socket to pass, with its name and origin (see [`Origin`]).
pub struct PassedListener<'a> {
    /// Its name (`LISTEN_FDNAMES`).
    pub name: &'a str,
    /// The listening socket.
    pub fd: BorrowedFd<'a>,
    /// Where it came from (`BATON_LISTEN_ORIGINS`).
    pub origin: Origin,
}

/// Any other fd to pass, by name (state the successor needs before it accepts: a sealed
/// memfd, an open file). The name must not contain `:` or `=`; the successor takes it with
/// [`crate::Inherited::take_extra`].
pub struct PassedFd<'a> {
    /// Its name (`BATON_EXTRA_FDS`).
    pub name: &'a str,
    /// The fd.
    pub fd: BorrowedFd<'a>,
}

/// What to start: a program (absolute path), its arguments, the listeners to pass, and any
/// other named fds.
pub struct SuccessorSpec<'a> {
    /// The path to execute, `argv[0]` and `BATON_PROGRAM` (what the successor's own
    /// successors execute).
    pub program: &'a Path,
    /// The arguments (without `argv[0]`, which is `program`).
    pub args: &'a [OsString],
    /// The listening sockets, passed as fds 3, 4, ... in this order.
    pub listeners: Vec<PassedListener<'a>>,
    /// Other fds, passed by name after the readiness pipe and the channel.
    pub extra: Vec<PassedFd<'a>>,
    /// The successor's generation number (`BATON_GENERATION`).
    pub generation: u64,
    /// Execute this binary (an fd, `O_PATH` is enough) instead of the file at `program`:
    /// a rollback to a binary an install has replaced since. `program` stays what the
    /// successor records, so its next plain handoff executes the path again.
    pub binary: Option<BorrowedFd<'a>>,
}

/// A spawned successor that has not reported ready yet.
pub struct Successor {
    child: ChildProcess,
    program: PathBuf,
    ready: OwnedFd,
    channel: OwnedFd,
    exited: oneshot::Receiver<String>,
    started: Instant,
}

/// A successor that reported ready, still our child: [`Ready::watch`] holds what the canary
/// window needs.
#[derive(Debug)]
pub struct Ready {
    /// The successor's pid.
    pub pid: u32,
    /// From spawn to the readiness line.
    pub after: Duration,
    /// What its canary window needs ([`Watch::canary`]).
    pub watch: Watch,
}

/// Prepared before fork: everything the child needs, so that between fork and exec it only
/// makes async-signal-safe calls (dup2, getpid, write, execve, _exit) and never allocates.
struct ExecImage {
    program: CString,
    argv: Vec<CString>,
    envp: Vec<CString>,
    /// `LISTEN_PID=` followed by room for the digits and a NUL, filled in by the child.
    listen_pid: Vec<u8>,
}

const LISTEN_PID_PREFIX: &[u8] = b"LISTEN_PID=";
/// Linux's signals are 1..=64; a constant, so the child needs no libc lookup after fork.
const LINUX_NSIG: libc::c_int = 65;
const PID_DIGITS: usize = 20;

impl ExecImage {
    fn new(spec: &SuccessorSpec<'_>, ready_fd: RawFd) -> io::Result<ExecImage> {
        let cstr =
            |s: &OsStr| CString::new(s.as_bytes()).map_err(|_| io::Error::other("NUL byte in argument or environment"));
        let program = cstr(spec.program.as_os_str())?;
        let mut argv = vec![program.clone()];
        for a in spec.args {
            argv.push(cstr(a)?);
        }
        let mut envp = Vec::new();
        for (k, v) in std::env::vars_os() {
            if protocol_env().any(|o| OsStr::new(o) == k) {
                continue;
            }
            let mut kv = k.clone();
            kv.push("=");
            kv.push(&v);
            envp.push(cstr(&kv)?);
        }
        let names: Vec<&str> = spec.listeners.iter().map(|l| l.name).collect();
        let origins: Vec<&str> = spec.listeners.iter().map(|l| l.origin.as_str()).collect();
        envp.push(cstr(OsStr::new(&format!("LISTEN_FDS={}", names.len())))?);
        envp.push(cstr(OsStr::new(&format!("LISTEN_FDNAMES={}", names.join(":"))))?);
        envp.push(cstr(OsStr::new(&format!("{ORIGINS_ENV}={}", origins.join(":"))))?);
        envp.push(cstr(OsStr::new(&format!("{READY_FD_ENV}={ready_fd}")))?);
        envp.push(cstr(OsStr::new(&format!("{CHANNEL_FD_ENV}={}", ready_fd + 1)))?);
        envp.push(cstr(OsStr::new(&extra_fds_env(&spec.extra, ready_fd + 2)?))?);
        envp.push(cstr(OsStr::new(&format!("{GENERATION_ENV}={}", spec.generation)))?);
        let mut args_env = OsString::from(format!("{ARGS_ENV}="));
        args_env.push(encode_args(spec.args));
        envp.push(cstr(&args_env)?);
        let mut program_env = OsString::from(format!("{PROGRAM_ENV}="));
        program_env.push(spec.program.as_os_str());
        envp.push(cstr(&program_env)?);
        // Room for the pid, written in the child once it knows it.
        let mut listen_pid = LISTEN_PID_PREFIX.to_vec();
        listen_pid.extend(std::iter::repeat_n(0u8, PID_DIGITS + 1));
        Ok(ExecImage {
            program,
            argv,
            envp,
            listen_pid,
        })
    }
}

/// `BATON_EXTRA_FDS=name=fd:name=fd`, the extra fds numbered from `first` in order.
fn extra_fds_env(extra: &[PassedFd<'_>], first: RawFd) -> io::Result<String> {
    let mut pairs = Vec::with_capacity(extra.len());
    for (i, e) in extra.iter().enumerate() {
        if e.name.is_empty() || e.name.contains([':', '=']) {
            return Err(io::Error::other(format!(
                "extra fd name {:?} is empty or has ':' or '='",
                e.name
            )));
        }
        pairs.push(format!("{}={}", e.name, first + i as RawFd));
    }
    Ok(format!("{EXTRA_FDS_ENV}={}", pairs.join(":")))
}

/// Fork+execs the successor with our listeners as fds 3.., then the readiness pipe's write
/// end and the child's end of the channel.
pub fn spawn_successor(spec: &SuccessorSpec<'_>) -> Result<Successor, HandoffError> {
    if spec.binary.is_none() {
        nix::unistd::access(spec.program, nix::unistd::AccessFlags::X_OK).map_err(|e| HandoffError::NotExecutable {
            path: spec.program.to_path_buf(),
            source: e.into(),
        })?;
    }
    let (ready_r, ready_w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(io::Error::from)
        .map_err(at("making the readiness pipe"))?;
    let (channel, channel_child) = channel_pair().map_err(at("making the channel socketpair"))?;
    let passed: Vec<BorrowedFd<'_>> = spec
        .listeners
        .iter()
        .map(|l| l.fd)
        .chain([ready_w.as_fd(), channel_child.as_fd()])
        .chain(spec.extra.iter().map(|e| e.fd))
        .collect();
    let (ready_target, floor) = fd_layout(spec.listeners.len(), passed.len());
    let sources = passed
        .iter()
        .map(|fd| dup_above(*fd, floor))
        .collect::<io::Result<Vec<_>>>()
        .map_err(at("moving the fds to pass above the ones the child gets"))?;
    // The binary to execute by fd, out of the way of the dup2 calls too.
    let binary = spec
        .binary
        .map(|fd| dup_above(fd, floor))
        .transpose()
        .map_err(at("moving the binary's fd"))?;
    let exec_fd = binary.as_ref().map_or(-1, AsRawFd::as_raw_fd);
    let mut image =
        ExecImage::new(spec, ready_target).map_err(at("building the successor's arguments and environment"))?;
    let argv: Vec<*const libc::c_char> = image
        .argv
        .iter()
        .map(|c| c.as_ptr())
        .chain([std::ptr::null()])
        .collect();
    let pid_slot = image.listen_pid.as_mut_ptr();
    let envp: Vec<*const libc::c_char> = image
        .envp
        .iter()
        .map(|c| c.as_ptr())
        .chain([pid_slot.cast_const().cast(), std::ptr::null()])
        .collect();
    let source_fds: Vec<RawFd> = sources.iter().map(AsRawFd::as_raw_fd).collect();
    let program = image.program.as_ptr();
    // No signal handler may run in the child between fork and exec (it would run the
    // parent's code in a half-copied process): block them all across the fork; the child
    // unblocks them just before exec, with default dispositions.
    let blocked = block_all_signals().map_err(at("blocking signals across fork"))?;
    // SAFETY: after fork the child runs only `exec_child`, which makes async-signal-safe
    // calls on memory prepared above (no allocation, no locks) and never returns.
    let forked = unsafe { nix::unistd::fork() };
    if let Ok(nix::unistd::ForkResult::Child) = forked {
        // SAFETY: as above; the pointers point at memory the child's copy keeps alive.
        unsafe { exec_child(&source_fds, ready_target, pid_slot, (exec_fd, program), &argv, &envp) }
    }
    restore_signals(&blocked);
    let pid = match forked.map_err(HandoffError::Fork)? {
        nix::unistd::ForkResult::Parent { child } => child,
        nix::unistd::ForkResult::Child => unreachable!("the child execs or exits in exec_child"),
    };
    // Before anything waits for it: an unreaped child's pid names it.
    let child = ChildProcess::new(pid);
    drop((sources, binary, ready_w, channel_child, image));
    Ok(Successor {
        exited: spawn_reaper(child.clone()).map_err(at("starting the thread that reaps the successor"))?,
        child,
        program: spec.program.to_path_buf(),
        ready: ready_r,
        channel,
        started: Instant::now(),
    })
}

/// Where the child's fds go: the readiness pipe's number (after the `listeners`), and the
/// lowest number the `passed` fds' sources may have. Every source is moved above the target
/// range 3.. first, so the dup2 calls after fork can never overwrite a source that has not
/// been moved yet.
fn fd_layout(listeners: usize, passed: usize) -> (RawFd, RawFd) {
    (FIRST_LISTEN_FD + listeners as RawFd, FIRST_LISTEN_FD + passed as RawFd)
}

/// A connected pair of Unix seqpacket sockets (messages keep their bounds and their fds),
/// close-on-exec: ours and the child's.
fn channel_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

fn block_all_signals() -> io::Result<nix::sys::signal::SigSet> {
    use nix::sys::signal::{SigSet, SigmaskHow, pthread_sigmask};
    let mut old = SigSet::empty();
    pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::all()), Some(&mut old))?;
    Ok(old)
}

fn restore_signals(old: &nix::sys::signal::SigSet) {
    use nix::sys::signal::{SigmaskHow, pthread_sigmask};
    // Restoring a mask we just read cannot fail (EINVAL is only for a bad `how`).
    let _ = pthread_sigmask(SigmaskHow::SIG_SETMASK, Some(old), None);
}

/// The successor is our child until we exit: reap it whenever it ends, so it never lingers
/// as a zombie (a blocking wait per child, through its pidfd; there is at most one spawn at
/// a time). The receiver gets how it ended.
fn spawn_reaper(child: ChildProcess) -> io::Result<oneshot::Receiver<String>> {
    let (tx, exited) = oneshot::channel();
    std::thread::Builder::new()
        .name(format!("reap-{}", child.pid()))
        .spawn(move || {
            let _ = tx.send(child.wait_blocking());
        })?;
    Ok(exited)
}

fn dup_above(fd: BorrowedFd<'_>, floor: RawFd) -> io::Result<OwnedFd> {
    let new = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(floor)).map_err(io::Error::from)?;
    // SAFETY: F_DUPFD_CLOEXEC returned a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(new) })
}

/// Runs in the forked child. Only async-signal-safe libc calls.
///
/// # Safety
/// Must be called only in the child right after fork; all pointers point at memory that the
/// parent prepared and the child's copy keeps alive.
unsafe fn exec_child(
    sources: &[RawFd],
    ready_target: RawFd,
    pid_slot: *mut u8,
    (exec_fd, program): (RawFd, *const libc::c_char),
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    unsafe {
        // dup2 onto 3.. clears FD_CLOEXEC on the targets; everything above is made
        // close-on-exec here, whatever the parent leaked, as the guarantee.
        for (i, &src) in sources.iter().enumerate() {
            if libc::dup2(src, FIRST_LISTEN_FD + i as RawFd) < 0 {
                libc::_exit(126);
            }
        }
        cloexec_from(FIRST_LISTEN_FD + sources.len() as RawFd);
        // LISTEN_PID must be our own pid: write its digits and end the string there.
        let mut pid = libc::getpid() as u64;
        let mut digits = [0u8; PID_DIGITS];
        let mut len = 0;
        loop {
            digits[len] = b'0' + (pid % 10) as u8;
            len += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        let slot = pid_slot.add(LISTEN_PID_PREFIX.len());
        for i in 0..len {
            *slot.add(i) = digits[len - 1 - i];
        }
        *slot.add(len) = 0;
        // Default dispositions and a clean mask, as a new program expects (the parent's
        // runtime may ignore SIGPIPE or block signals); exec keeps ignored signals ignored.
        for sig in 1..LINUX_NSIG {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());
        // ETXTBSY: the new binary is still open for writing somewhere (an installer, or a
        // process that forked while it was being written); that passes within moments.
        let mut errno = 0;
        for _ in 0..50 {
            if exec_fd >= 0 {
                // execveat(fd, "", argv, envp, AT_EMPTY_PATH): the file the fd names, wherever
                // (and whether) it is linked now. A raw syscall: no libc wrapper allocates.
                libc::syscall(
                    libc::SYS_execveat,
                    exec_fd,
                    c"".as_ptr(),
                    argv.as_ptr(),
                    envp.as_ptr(),
                    libc::AT_EMPTY_PATH,
                );
            } else {
                libc::execve(program, argv.as_ptr(), envp.as_ptr());
            }
            errno = *libc::__errno_location();
            if errno != libc::ETXTBSY {
                break;
            }
            let pause = libc::timespec {
                tv_sec: 0,
                tv_nsec: 20_000_000,
            };
            libc::nanosleep(&pause, std::ptr::null_mut());
        }
        // exec failed: tell the parent why through the readiness pipe.
        let mut msg = *b"exec-error 0000\n";
        let mut e = errno.clamp(0, 9999) as u32;
        for i in (11..15).rev() {
            msg[i] = b'0' + (e % 10) as u8;
            e /= 10;
        }
        libc::write(ready_target, msg.as_ptr().cast(), msg.len());
        libc::_exit(127);
    }
}

/// Marks every fd from `first` up close-on-exec: close_range(2) (Linux 5.11), else fcntl on
/// each fd below the fd limit. Only async-signal-safe calls: it runs between fork and exec.
///
/// # Safety
/// Call it only in the forked child.
unsafe fn cloexec_from(first: RawFd) {
    // CLOSE_RANGE_CLOEXEC from <linux/close_range.h>.
    const CLOSE_RANGE_CLOEXEC: libc::c_uint = 1 << 2;
    unsafe {
        if libc::syscall(
            libc::SYS_close_range,
            first as libc::c_uint,
            libc::c_uint::MAX,
            CLOSE_RANGE_CLOEXEC,
        ) == 0
        {
            return;
        }
        let mut limit: libc::rlimit = std::mem::zeroed();
        let max = if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur.min(1 << 20) as RawFd
        } else {
            1024
        };
        for fd in first..max {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

impl Successor {
    /// The successor's pid.
    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// The child, to signal it through its pidfd while its readiness is awaited.
    pub fn process(&self) -> ChildProcess {
        self.child.clone()
    }

    /// Waits for the readiness line. On exit, exec failure or timeout the child is killed and
    /// reaped before this returns, and the error says why.
    pub async fn await_ready(mut self, timeout: Duration) -> Result<Ready, HandoffError> {
        let pid = self.pid();
        let mut pipe =
            tokio::net::unix::pipe::Receiver::from_owned_fd(self.ready).map_err(at("watching the readiness pipe"))?;
        let read_line = read_line(&mut pipe);
        tokio::pin!(read_line);
        let outcome = tokio::select! {
            // The pipe first: a failed exec writes its errno there and then exits, and the
            // errno says more than the exit status.
            biased;
            line = &mut read_line => Some(line.map_err(at("reading the readiness pipe"))?),
            // The child died (perhaps while something it started still holds the pipe open).
            status = &mut self.exited => {
                let status = status.unwrap_or_else(|_| "unknown".into());
                // What it wrote before it exited may not have been read yet: its reason says
                // more than its exit status.
                let last = tokio::time::timeout(Duration::from_millis(250), &mut read_line).await;
                let said = last.ok().and_then(Result::ok).and_then(|l| line_error(&l, pid, &self.program));
                return Err(said.unwrap_or(HandoffError::ChildExited { pid, status }));
            }
            _ = tokio::time::sleep(timeout) => None,
        };
        let failure = match outcome {
            Some(line) if line.starts_with("ready") => {
                let after = self.started.elapsed();
                let watch = Watch::new(self.child, self.exited, self.channel, offers(&line));
                return Ok(Ready { pid, after, watch });
            }
            Some(line) if line_error(&line, pid, &self.program).is_some() => {
                let failure = line_error(&line, pid, &self.program).unwrap_or(HandoffError::Timeout { pid, timeout });
                // It exits next; one that lingers is killed below.
                let left = timeout.saturating_sub(self.started.elapsed());
                if tokio::time::timeout(left, &mut self.exited).await.is_ok() {
                    return Err(failure);
                }
                failure
            }
            // EOF without a line: the child closed the pipe, which almost always means it is
            // exiting; a child that closes it and lives on is killed at the timeout.
            Some(_) => {
                let left = timeout.saturating_sub(self.started.elapsed());
                match tokio::time::timeout(left, &mut self.exited).await {
                    Ok(status) => {
                        let status = status.unwrap_or_else(|_| "unknown".into());
                        return Err(HandoffError::ChildExited { pid, status });
                    }
                    Err(_) => HandoffError::Timeout { pid, timeout },
                }
            }
            None => HandoffError::Timeout { pid, timeout },
        };
        let _ = self.child.signal(Signal::SIGKILL);
        let _ = self.exited.await;
        Err(failure)
    }
}

/// What a readiness line `ready <pid> [canary] [confirms] [xfer=N]` offers; older successors
/// say less.
fn offers(line: &str) -> crate::channel::Offers {
    let says = |word: &str| line.split_whitespace().any(|w| w == word);
    crate::channel::Offers {
        pings: says("canary"),
        confirms: says("confirms"),
        takes_transfer: says(&format!("xfer={}", crate::transfer::TRANSFER_VERSION)),
    }
}

/// The failure a line from the child `pid` reports: `failed <reason>` (it could not start)
/// or `exec-error <errno>` (the exec of `program` failed); `None` for anything else.
fn line_error(line: &str, pid: u32, program: &Path) -> Option<HandoffError> {
    if let Some(reason) = line.strip_prefix("failed ") {
        return Some(HandoffError::StartFailed {
            pid,
            reason: reason.to_string(),
        });
    }
    let errno = line.strip_prefix("exec-error ")?.trim().parse().unwrap_or(0);
    Some(HandoffError::Exec {
        path: program.to_path_buf(),
        errno: nix::errno::Errno::from_raw(errno),
    })
}

/// The first line the child writes into the readiness pipe (or what it wrote before EOF),
/// trimmed; at most about 4 KiB.
async fn read_line(pipe: &mut tokio::net::unix::pipe::Receiver) -> io::Result<String> {
    let mut buf = Vec::with_capacity(64);
    let mut chunk = [0u8; 512];
    loop {
        let n = pipe.read(&mut chunk).await?;
        buf.extend_from_slice(&chunk[..n]);
        if n == 0 || chunk[..n].contains(&b'\n') || buf.len() > 4096 {
            return Ok(String::from_utf8_lossy(&buf).trim().to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_readiness_pipe_follows_the_listeners_and_sources_sit_above_every_target() {
        // Two listeners at 3 and 4: the pipe is 5, then the channel and three extra fds, so
        // 3..10 are targets and no source may be below 10.
        assert_eq!(fd_layout(2, 7), (5, 10));
        assert_eq!(fd_layout(0, 2), (3, 5), "no listener: the pipe is the first passed fd");
    }

    #[test]
    fn extra_fds_are_numbered_in_order_and_bad_names_refused() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let fd = |name| PassedFd { name, fd: r.as_fd() };
        assert_eq!(
            extra_fds_env(&[fd("log"), fd("state.v2")], 7).unwrap(),
            "BATON_EXTRA_FDS=log=7:state.v2=8"
        );
        assert_eq!(extra_fds_env(&[], 7).unwrap(), "BATON_EXTRA_FDS=", "none");
        for bad in ["", "a:b", "a=b", ":", "="] {
            assert!(
                extra_fds_env(&[fd("ok"), fd(bad)], 7).is_err(),
                "{bad:?} would break the list"
            );
        }
        drop(w);
    }

    #[test]
    fn a_readiness_line_says_what_the_successor_offers() {
        let seen = |line: &str| {
            let o = offers(line);
            (o.pings, o.confirms, o.takes_transfer)
        };
        let xfer = crate::transfer::TRANSFER_VERSION;
        assert_eq!(
            seen(&format!("ready 7 canary confirms xfer={xfer}")),
            (true, true, true)
        );
        assert_eq!(seen("ready 7"), (false, false, false), "an older successor");
        assert_eq!(seen("ready 7 canary"), (true, false, false));
        assert_eq!(seen("ready 7 confirms"), (false, true, false));
        assert_eq!(
            seen(&format!("ready 7 canary confirms xfer={}", xfer + 1)),
            (true, true, false),
            "another version"
        );
    }

    #[test]
    fn a_failure_line_says_why() {
        let program = Path::new("/usr/bin/baton");
        match line_error("failed no config", 7, program) {
            Some(HandoffError::StartFailed { pid: 7, reason }) => assert_eq!(reason, "no config"),
            other => panic!("{other:?}"),
        }
        match line_error("exec-error 0013", 7, program) {
            Some(HandoffError::Exec { path, errno }) => {
                assert_eq!((path.as_path(), errno), (program, nix::errno::Errno::EACCES));
            }
            other => panic!("{other:?}"),
        }
        assert!(line_error("ready 7", 7, program).is_none());
        assert!(line_error("", 7, program).is_none(), "EOF is no line");
    }

    /// `text` written into a pipe whose write end stays open (unless `close`), as read_line
    /// reads it; bounded, so a read that waits for more fails the test instead of hanging.
    async fn line_of(text: &[u8], close: bool) -> String {
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        nix::unistd::write(&w, text).expect("write");
        let _open = (!close).then_some(w);
        let mut pipe = tokio::net::unix::pipe::Receiver::from_owned_fd(r).expect("register");
        tokio::time::timeout(Duration::from_secs(5), read_line(&mut pipe))
            .await
            .expect("read_line must not wait for more than a line")
            .expect("read")
    }

    #[tokio::test]
    async fn read_line_ends_at_a_newline_at_eof_or_past_4_kib() {
        assert_eq!(
            line_of(b"ready 7 canary\n", false).await,
            "ready 7 canary",
            "the newline ends it"
        );
        assert_eq!(line_of(b"failed half", true).await, "failed half", "EOF ends it");
        // 600 bytes then the newline: the first read (512 bytes) holds no newline yet.
        let mut long = vec![b'x'; 600];
        long.push(b'\n');
        assert_eq!(line_of(&long, false).await.len(), 600, "a line longer than one read");
        // No newline, the pipe open: reads of 512 bytes until past 4096.
        assert_eq!(
            line_of(&[b'y'; 6000], false).await.len(),
            4608,
            "the first read past 4 KiB ends it"
        );
    }

    /// Spawns `sh -c script` as a successor with one listener; also returns how its
    /// readiness ended.
    async fn spawned(script: &str) -> (u32, Result<Ready, HandoffError>, ChildProcess) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let args = ["-c".into(), script.into()];
        let spec = SuccessorSpec {
            program: Path::new("/bin/sh"),
            args: &args,
            listeners: vec![PassedListener {
                name: "web",
                fd: listener.as_fd(),
                origin: Origin::Bound,
            }],
            extra: Vec::new(),
            generation: 2,
            binary: None,
        };
        let mask = nix::sys::signal::SigSet::thread_get_mask().expect("mask");
        let successor = spawn_successor(&spec).expect("spawn");
        let after = nix::sys::signal::SigSet::thread_get_mask().expect("mask");
        assert!(mask == after, "the signals blocked across fork are unblocked again");
        let (pid, process) = (successor.pid(), successor.process());
        (pid, successor.await_ready(Duration::from_secs(20)).await, process)
    }

    #[tokio::test]
    async fn a_successor_gets_the_listener_at_3_and_the_pipe_at_4_and_reports_ready() {
        // It checks what it was handed, says so, and waits to be killed.
        let script = r#"[ "$LISTEN_PID" = $$ ] && [ "$BATON_READY_FD" = 4 ] && [ -S /proc/self/fd/3 ] \
            && echo "ready $$ canary" >&4 && exec sleep 30; echo "failed $LISTEN_PID $BATON_READY_FD" >&4"#;
        let (pid, ready, process) = spawned(script).await;
        let ready = ready.expect("ready");
        assert_eq!(ready.pid, pid);
        // Alive until killed below, so its /proc entry is there.
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
        let ppid = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .expect("PPid")
            .trim();
        assert_eq!(ppid, std::process::id().to_string(), "pid() names our child");
        process.signal(Signal::SIGKILL).expect("kill");
    }

    #[tokio::test]
    async fn a_successor_that_says_why_it_failed_is_reported_with_its_reason() {
        let (pid, ready, _) = spawned(r#"echo "failed no config" >&$BATON_READY_FD; exit 1"#).await;
        match ready {
            Err(HandoffError::StartFailed { pid: p, reason }) => assert_eq!((p, reason.as_str()), (pid, "no config")),
            other => panic!("{:?}", other.map(|r| r.pid)),
        }
    }

    #[tokio::test]
    async fn a_successor_that_exits_without_a_word_is_reported_with_its_status() {
        let (pid, ready, _) = spawned("exit 3").await;
        match ready {
            Err(HandoffError::ChildExited { pid: p, status }) => {
                assert_eq!((p, status.as_str()), (pid, "exit status 3"))
            }
            other => panic!("{:?}", other.map(|r| r.pid)),
        }
    }
}
