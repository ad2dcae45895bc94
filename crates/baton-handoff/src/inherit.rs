//! What a process was handed at start: listening sockets with their names and origins, the
//! readiness pipe of a predecessor, and its generation number. Everything is read from the
//! environment once, and the variables are removed so that none of it leaks further.

use std::ffi::{OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use crate::channel::PredecessorChannel;
use crate::listener::{ListenAddr, Origin, Socket};

/// The readiness pipe's fd number in a successor.
pub const READY_FD_ENV: &str = "BATON_READY_FD";
/// The successor's end of the channel to its predecessor (see `channel`).
pub const CHANNEL_FD_ENV: &str = "BATON_CHANNEL_FD";
/// The successor's generation number (the first process is generation 1).
pub const GENERATION_ENV: &str = "BATON_GENERATION";
/// The program path the first generation resolved; every successor execs the same path.
pub const PROGRAM_ENV: &str = "BATON_PROGRAM";
/// The arguments the first generation was started with ([`encode_args`]); every successor
/// gets the same, whatever a wrapper installed at the program path added to its own.
pub const ARGS_ENV: &str = "BATON_ARGS";
/// Where each passed socket came from, `:`-separated like `LISTEN_FDNAMES`: `supervisor`
/// (systemd passed it to the first generation) or `bound` (a generation bound it).
pub const ORIGINS_ENV: &str = "BATON_LISTEN_ORIGINS";
/// The name a listening socket a generation bound itself has in systemd's fd store
/// (`FDSTORE=1`, `FDNAME=bound.<listener name>`): systemd passes it back at a restart after
/// a crash, and the prefix tells it from a socket unit's (whose address wins over the
/// configuration, while a stored socket is re-bound when the configuration moved it). A
/// socket unit's `FileDescriptorName=` must not start with it.
pub const STORED_NAME_PREFIX: &str = "bound.";
/// Other fds passed by name: `name=fd:name=fd` (see [`crate::PassedFd`]).
pub const EXTRA_FDS_ENV: &str = "BATON_EXTRA_FDS";
/// The variables only a baton predecessor sets (and only for the pid in `LISTEN_PID`).
const BATON_ENV: [&str; 7] = [
    READY_FD_ENV,
    CHANNEL_FD_ENV,
    GENERATION_ENV,
    PROGRAM_ENV,
    ARGS_ENV,
    ORIGINS_ENV,
    EXTRA_FDS_ENV,
];
/// systemd's variables of the protocol (`sd_listen_fds(3)`).
const SYSTEMD_ENV: [&str; 4] = ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_FDS_FIRST_FD"];

/// Every variable of the protocol: read and removed by a successor, replaced for its own.
pub(crate) fn protocol_env() -> impl Iterator<Item = &'static str> {
    SYSTEMD_ENV.into_iter().chain(BATON_ENV)
}
/// The first passed fd, as `sd_listen_fds(3)` defines it.
pub(crate) const FIRST_LISTEN_FD: RawFd = 3;

/// What this process was handed at start.
pub struct Inherited {
    fds: listenfd::ListenFd,
    /// The fd number of the first passed socket (`LISTEN_FDS_FIRST_FD`, else 3), as
    /// `listenfd` reads it too.
    first_fd: RawFd,
    names: Vec<String>,
    origins: Vec<Origin>,
    taken: Vec<bool>,
    /// The predecessor's readiness pipe; `None` for a first generation.
    pub ready: Option<ReadySignal>,
    /// The channel to the predecessor, for its canary window; `None` for a first generation
    /// (or a predecessor too old to open one).
    pub channel: Option<PredecessorChannel>,
    pub generation: u64,
    /// The program the first generation resolved, for successors to exec.
    pub program: Option<PathBuf>,
    /// The arguments the first generation was started with, for successors; `None` for a
    /// first generation (or a predecessor too old to say).
    pub args: Option<Vec<OsString>>,
    /// Other fds the predecessor passed by name, not taken yet.
    extra: Vec<(String, OwnedFd)>,
    /// `BATON_*` variables were present but not addressed to this process.
    ignored_handoff: bool,
}

/// What a predecessor passed besides the sockets: read only when `LISTEN_PID` names this
/// process, as sd_listen_fds(3) requires of `LISTEN_FDS`. A process that merely inherited
/// the variables (a child of a generation that ran a hook with its environment, or a
/// process started with a copied environment) must not take fds by number that are not its
/// own: it would write "ready" into someone else's pipe, or close their socket.
struct Handoff {
    ready: Option<ReadySignal>,
    channel: Option<PredecessorChannel>,
    extra: Vec<(String, OwnedFd)>,
    generation: u64,
    program: Option<PathBuf>,
    args: Option<Vec<OsString>>,
}

impl Handoff {
    /// A first generation's: nothing passed.
    fn none() -> Handoff {
        Handoff {
            ready: None,
            channel: None,
            extra: Vec::new(),
            generation: 1,
            program: None,
            args: None,
        }
    }

    fn from_env(passed: &std::ops::Range<RawFd>) -> io::Result<Handoff> {
        Ok(Handoff {
            ready: inherited_fd(READY_FD_ENV, passed)?.map(ReadySignal),
            channel: inherited_fd(CHANNEL_FD_ENV, passed)?.map(PredecessorChannel::new),
            extra: extra_fds_from_env(passed)?,
            generation: generation_from_env()?,
            program: std::env::var_os(PROGRAM_ENV).map(PathBuf::from),
            args: std::env::var_os(ARGS_ENV).map(|v| decode_args(&v)),
        })
    }
}

/// `BATON_GENERATION`: 1 when unset (a first generation); a value that is not a number is an
/// error (a predecessor that wrote it is broken, and counting on from 1 would hide it).
fn generation_from_env() -> io::Result<u64> {
    let Some(v) = std::env::var_os(GENERATION_ENV) else {
        return Ok(1);
    };
    v.to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("{GENERATION_ENV}={v:?} is not a generation number")))
}

/// Whether `LISTEN_PID` is set to `pid`.
fn listen_pid_is(pid: u32) -> bool {
    std::env::var("LISTEN_PID")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        == Some(pid)
}

impl Inherited {
    /// Reads the inheritance from the environment and removes the variables.
    ///
    /// # Safety
    /// Changes the environment: call it before any other thread exists (before the runtime).
    pub unsafe fn from_env() -> io::Result<Inherited> {
        // Read before listenfd, which removes LISTEN_PID.
        let for_us = listen_pid_is(std::process::id());
        let fds = listenfd::ListenFd::from_env();
        let first_fd = std::env::var("LISTEN_FDS_FIRST_FD")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(FIRST_LISTEN_FD);
        let mut names: Vec<String> = std::env::var("LISTEN_FDNAMES")
            .map(|v| v.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let passed = first_fd..first_fd + fds.len() as RawFd;
        let handoff = if for_us {
            Handoff::from_env(&passed)?
        } else {
            Handoff::none()
        };
        let ignored_handoff = !for_us && BATON_ENV.iter().any(|v| std::env::var_os(v).is_some());
        let origins = origins_from_env(&mut names, fds.len(), handoff.ready.is_some());
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe {
            for var in protocol_env() {
                std::env::remove_var(var);
            }
        }
        let Handoff {
            ready,
            channel,
            extra,
            generation,
            program,
            args,
        } = handoff;
        let taken = vec![false; fds.len()];
        Ok(Inherited {
            fds,
            first_fd,
            names,
            origins,
            taken,
            ready,
            channel,
            generation,
            program,
            args,
            extra,
            ignored_handoff,
        })
    }

    /// Nothing inherited (tests, or a server that binds everything itself).
    pub fn none() -> Inherited {
        Inherited {
            fds: listenfd::ListenFd::empty(),
            first_fd: FIRST_LISTEN_FD,
            names: Vec::new(),
            origins: Vec::new(),
            taken: Vec::new(),
            ready: None,
            channel: None,
            generation: 1,
            program: None,
            args: None,
            extra: Vec::new(),
            ignored_handoff: false,
        }
    }

    /// Whether `BATON_*` handoff variables were in the environment but ignored, because
    /// `LISTEN_PID` did not name this process (they were meant for another).
    pub fn ignored_handoff(&self) -> bool {
        self.ignored_handoff
    }

    /// Takes the extra fd the predecessor passed as `name` (see [`crate::PassedFd`]); `None`
    /// when it passed none by that name, or it was taken already. Fds nobody takes close
    /// with `self`.
    pub fn take_extra(&mut self, name: &str) -> Option<OwnedFd> {
        let i = self.extra.iter().position(|(n, _)| n == name)?;
        Some(self.extra.swap_remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.len() == 0
    }

    /// The names of the passed sockets, in order (those from systemd's fd store without
    /// [`STORED_NAME_PREFIX`]).
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The fds not taken yet: index, name, address (`None`: not a listening socket, or its
    /// address cannot be read: taking it fails, naming the fd), origin. Like
    /// [`Inherited::take`], call it inside a tokio runtime (sockets are registered with its
    /// reactor).
    pub fn untaken(&self) -> Vec<(usize, String, Option<ListenAddr>, Origin)> {
        (0..self.len())
            .filter(|&i| !self.taken[i])
            .map(|i| {
                // SAFETY: the fd stays owned by `self.fds`; the borrowed view lives only here.
                let fd = unsafe { BorrowedFd::borrow_raw(self.first_fd + i as RawFd) };
                let view = fd.try_clone_to_owned().and_then(Socket::from_listening_fd);
                let addr = view.and_then(|s| s.local_addr()).ok();
                let name = self.names.get(i).cloned().unwrap_or_default();
                (i, name, addr, self.origins.get(i).copied().unwrap_or(Origin::Bound))
            })
            .collect()
    }

    /// Takes inherited socket `idx` as a TCP or Unix listener, with where it came from.
    /// Call it inside a tokio runtime: the socket is registered with its reactor.
    pub fn take(&mut self, idx: usize) -> io::Result<(Socket, Origin)> {
        let fd = self
            .fds
            .take_raw_fd(idx)?
            .ok_or_else(|| io::Error::other("inherited fd already taken"))?;
        self.taken[idx] = true;
        let origin = self.origins.get(idx).copied().unwrap_or(Origin::Bound);
        // SAFETY: listenfd hands each inherited fd out once; from here we own it.
        let socket = Socket::from_listening_fd(unsafe { OwnedFd::from_raw_fd(fd) })?;
        Ok((socket, origin))
    }

    /// Takes every socket not adopted yet, with its name, so the caller can log what the
    /// configuration dropped before it closes them.
    pub fn take_rest(&mut self) -> Vec<(String, io::Result<Socket>)> {
        let rest: Vec<usize> = (0..self.len()).filter(|&i| !self.taken[i]).collect();
        rest.into_iter()
            .map(|i| {
                let name = self.names.get(i).cloned().unwrap_or_default();
                (name, self.take(i).map(|(s, _)| s))
            })
            .collect()
    }
}

/// The fd a predecessor passed in `var`, if it is set. One that names a passed listener is
/// refused (taking it would close a listening socket), and so is a value that is not an open
/// fd above stderr, as a malformed extra fd is: a predecessor that says it passed something
/// must have passed it.
fn inherited_fd(var: &str, listeners: &std::ops::Range<RawFd>) -> io::Result<Option<OwnedFd>> {
    let Some(value) = std::env::var_os(var) else {
        return Ok(None);
    };
    let Some(fd) = value.to_str().and_then(|v| v.parse::<RawFd>().ok()) else {
        return Err(io::Error::other(format!("{var}={value:?} is not an fd number")));
    };
    if listeners.contains(&fd) {
        return Err(io::Error::other(format!("{var}={fd} names a passed listening socket")));
    }
    // SAFETY: F_GETFD only asks whether the fd number is open; no memory is involved.
    if fd <= 2 || unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(io::Error::other(format!("{var}={fd} is not an open fd above stderr")));
    }
    // SAFETY: the predecessor passed this fd to us for our exclusive use, and it is open;
    // nothing else in this process refers to it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // Our own successor must not inherit it: it would hold our predecessor's end open.
    crate::process::set_cloexec(owned.as_raw_fd())?;
    Ok(Some(owned))
}

/// The extra fds named in [`EXTRA_FDS_ENV`]. A malformed list, or one naming a listener,
/// is an error: a predecessor that says it passed something must have passed it.
fn extra_fds_from_env(listeners: &std::ops::Range<RawFd>) -> io::Result<Vec<(String, OwnedFd)>> {
    let listed = std::env::var(EXTRA_FDS_ENV).unwrap_or_default();
    let mut extra = Vec::new();
    for pair in listed.split(':').filter(|p| !p.is_empty()) {
        let bad = || io::Error::other(format!("{EXTRA_FDS_ENV}: malformed entry {pair:?}"));
        let (name, fd) = pair.split_once('=').ok_or_else(bad)?;
        let fd: RawFd = fd.parse().map_err(|_| bad())?;
        if listeners.contains(&fd) || fd <= 2 || extra.iter().any(|(_, f): &(String, OwnedFd)| f.as_raw_fd() == fd) {
            return Err(io::Error::other(format!(
                "{EXTRA_FDS_ENV}: {name}={fd} collides with another passed fd"
            )));
        }
        // SAFETY: F_GETFD only asks whether the fd number is open; no memory is involved.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(io::Error::other(format!("{EXTRA_FDS_ENV}: {name}={fd} is not open")));
        }
        // SAFETY: the predecessor passed this open fd for our exclusive use; nothing else in
        // this process refers to it, and it is listed once (checked above).
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        crate::process::set_cloexec(owned.as_raw_fd())?;
        extra.push((name.to_string(), owned));
    }
    Ok(extra)
}

/// Each socket's origin. A first generation (no readiness pipe) got its sockets from the
/// service manager: from its socket units, or from its fd store, where a generation keeps
/// the sockets it bound itself under [`STORED_NAME_PREFIX`] and the name (the prefix is
/// removed here); a successor reads what its predecessor wrote. A predecessor too old to say
/// counts as having bound them.
fn origins_from_env(names: &mut [String], count: usize, from_predecessor: bool) -> Vec<Origin> {
    if !from_predecessor {
        let mut origins = vec![Origin::Supervisor; count];
        for (name, origin) in names.iter_mut().zip(origins.iter_mut()) {
            if let Some(stored) = name.strip_prefix(STORED_NAME_PREFIX) {
                *name = stored.to_string();
                *origin = Origin::Bound;
            }
        }
        return origins;
    }
    let listed = std::env::var(ORIGINS_ENV).unwrap_or_default();
    let mut origins: Vec<Origin> = listed.split(':').filter_map(Origin::parse).collect();
    origins.resize(count, Origin::Bound);
    origins
}

/// `args` as one environment value: each argument's bytes with `%` and newline escaped
/// (`%25`, `%0A`), each followed by a newline. [`decode_args`] reads it back.
pub fn encode_args(args: &[OsString]) -> OsString {
    let mut out = Vec::new();
    for a in args {
        for &b in a.as_bytes() {
            match b {
                b'%' => out.extend_from_slice(b"%25"),
                b'\n' => out.extend_from_slice(b"%0A"),
                b => out.push(b),
            }
        }
        out.push(b'\n');
    }
    OsString::from_vec(out)
}

/// The arguments [`encode_args`] wrote.
pub fn decode_args(value: &OsStr) -> Vec<OsString> {
    let bytes = value.as_bytes();
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    if value.is_empty() {
        return Vec::new();
    }
    bytes
        .split(|&b| b == b'\n')
        .map(|a| {
            let mut arg = Vec::with_capacity(a.len());
            let mut i = 0;
            while i < a.len() {
                match &a[i..] {
                    [b'%', b'2', b'5', ..] => (arg.push(b'%'), i += 3),
                    [b'%', b'0', b'A', ..] => (arg.push(b'\n'), i += 3),
                    [b, ..] => (arg.push(*b), i += 1),
                    [] => unreachable!("i < len"),
                };
            }
            OsString::from_vec(arg)
        })
        .collect()
}

/// The write end of the readiness pipe, held by a new generation until it serves.
pub struct ReadySignal(OwnedFd);

impl ReadySignal {
    /// Tells the predecessor we serve. Consumes the pipe: it closes after the line.
    pub fn signal_ready(self) -> io::Result<()> {
        self.write(&format!("ready {}\n", std::process::id()))
    }

    /// Tells the predecessor we serve and will ping over the channel during its canary
    /// window ([`PredecessorChannel::ping_until_verdict`]): a promise, since a successor
    /// that says so and stays silent fails the canary. It also promises to confirm the
    /// verdict ([`crate::Incoming::confirm_verdict`]); the predecessor waits for that (up
    /// to [`crate::channel::SILENCE`]) before it calls the handoff done.
    pub fn signal_ready_pinging(self) -> io::Result<()> {
        self.write(&format!("ready {} canary confirms\n", std::process::id()))
    }

    /// As [`ReadySignal::signal_ready_pinging`], and offers to take the predecessor's live
    /// connections after its verdict ([`crate::transfer`]): a promise to read the
    /// [`crate::Incoming`] that comes with [`crate::Verdict::Passed`].
    pub fn signal_ready_taking_transfer(self) -> io::Result<()> {
        let version = crate::transfer::TRANSFER_VERSION;
        self.write(&format!(
            "ready {} canary confirms xfer={version}\n",
            std::process::id()
        ))
    }

    /// A second handle on the pipe, for saying why this generation could not start
    /// ([`FailureReporter::report`]) after the start consumed or dropped this one. Drop it
    /// once the start succeeded: it holds the pipe open.
    pub fn failure_reporter(&self) -> io::Result<FailureReporter> {
        Ok(FailureReporter(self.0.try_clone()?))
    }

    fn write(self, line: &str) -> io::Result<()> {
        let mut f = std::fs::File::from(self.0);
        io::Write::write_all(&mut f, line.as_bytes())
    }
}

/// Tells the predecessor why this generation could not start: it reports the reason with
/// the failed handoff instead of only an exit status.
pub struct FailureReporter(OwnedFd);

impl FailureReporter {
    /// Writes `failed <reason>` (on one line). Best effort: the predecessor reports the exit
    /// status when this does not arrive.
    pub fn report(self, reason: &str) {
        let line = format!("failed {}\n", reason.replace('\n', "; "));
        let mut f = std::fs::File::from(self.0);
        let _ = io::Write::write_all(&mut f, line.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_survive_the_environment() {
        for args in [
            vec![],
            vec![OsString::new()],
            vec!["run".into(), "--config".into(), "/etc/a b%0A.toml".into()],
            vec![
                "a\nb".into(),
                "%".into(),
                "".into(),
                OsString::from_vec(vec![0xff, b'%']),
            ],
        ] {
            let encoded = encode_args(&args);
            assert!(!encoded.as_bytes().contains(&0));
            assert_eq!(decode_args(&encoded), args, "{encoded:?}");
        }
    }
}
