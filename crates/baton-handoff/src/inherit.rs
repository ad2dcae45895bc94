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
    /// The passed listening sockets, by index; `None` once taken. One not taken stays open
    /// (like `listenfd`, which hands them out): [`Inherited::take_rest`] closes them.
    fds: Vec<Option<RawFd>>,
    names: Vec<String>,
    origins: Vec<Origin>,
    /// The predecessor's readiness pipe; `None` for a first generation.
    pub ready: Option<ReadySignal>,
    /// The channel to the predecessor, for its canary window; `None` for a first generation
    /// (or a predecessor too old to open one).
    pub channel: Option<PredecessorChannel>,
    /// This process's generation: 1 for the first, one more for each successor.
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

    fn read(env: Env<'_>, passed: &[RawFd]) -> io::Result<Handoff> {
        Ok(Handoff {
            ready: inherited_fd(READY_FD_ENV, env(READY_FD_ENV), passed)?.map(ReadySignal),
            channel: inherited_fd(CHANNEL_FD_ENV, env(CHANNEL_FD_ENV), passed)?.map(PredecessorChannel::new),
            extra: extra_fds(&text(env, EXTRA_FDS_ENV), passed)?,
            generation: generation(env(GENERATION_ENV))?,
            program: env(PROGRAM_ENV).map(PathBuf::from),
            args: env(ARGS_ENV).map(|v| decode_args(&v)),
        })
    }
}

/// The environment, as a lookup: the process's in [`Inherited::from_env`], a table in tests
/// (the process's is shared by every test thread).
pub(crate) type Env<'a> = &'a dyn Fn(&str) -> Option<OsString>;

/// Variable `var` of `env` as text; unset or not UTF-8 is empty (as `std::env::var` reads it).
fn text(env: Env<'_>, var: &str) -> String {
    env(var).and_then(|v| v.into_string().ok()).unwrap_or_default()
}

/// `BATON_GENERATION`'s `value`: 1 when unset (a first generation); a value that is not a
/// number is an error (a predecessor that wrote it is broken, and counting on from 1 would
/// hide it).
fn generation(value: Option<OsString>) -> io::Result<u64> {
    let Some(v) = value else {
        return Ok(1);
    };
    v.to_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("{GENERATION_ENV}={v:?} is not a generation number")))
}

/// Whether `LISTEN_PID`'s `value` is `pid`.
fn listen_pid_is(value: Option<&OsStr>, pid: u32) -> bool {
    value.and_then(OsStr::to_str).and_then(|v| v.trim().parse::<u32>().ok()) == Some(pid)
}

impl Inherited {
    /// Reads the inheritance from the environment and removes the variables.
    ///
    /// # Safety
    /// Changes the environment: call it before any other thread exists (before the runtime).
    pub unsafe fn from_env() -> io::Result<Inherited> {
        // Read before listenfd, which removes LISTEN_PID.
        let for_us = listen_pid_is(std::env::var_os("LISTEN_PID").as_deref(), std::process::id());
        let mut listen = listenfd::ListenFd::from_env();
        // listenfd numbers them from LISTEN_FDS_FIRST_FD (else 3), and hands each out once.
        let fds = (0..listen.len())
            .filter_map(|i| listen.take_raw_fd(i).ok().flatten())
            .collect();
        let inherited = Inherited::read(&|v| std::env::var_os(v), for_us, fds)?;
        // SAFETY: the caller guarantees no other thread runs yet.
        unsafe {
            for var in protocol_env() {
                std::env::remove_var(var);
            }
        }
        Ok(inherited)
    }

    /// What `env` says this process was handed, with the passed listening sockets `fds` (in
    /// order); `for_us`: `LISTEN_PID` names this process.
    pub(crate) fn read(env: Env<'_>, for_us: bool, fds: Vec<RawFd>) -> io::Result<Inherited> {
        let mut names: Vec<String> = env("LISTEN_FDNAMES")
            .and_then(|v| v.into_string().ok())
            .map(|v| v.split(':').map(str::to_string).collect())
            .unwrap_or_default();
        let handoff = if for_us {
            Handoff::read(env, &fds)?
        } else {
            Handoff::none()
        };
        let ignored_handoff = !for_us && BATON_ENV.iter().any(|v| env(v).is_some());
        let listed = text(env, ORIGINS_ENV);
        let origins = origins(&mut names, fds.len(), handoff.ready.is_some(), &listed);
        let Handoff {
            ready,
            channel,
            extra,
            generation,
            program,
            args,
        } = handoff;
        Ok(Inherited {
            fds: fds.into_iter().map(Some).collect(),
            names,
            origins,
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
            fds: Vec::new(),
            names: Vec::new(),
            origins: Vec::new(),
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

    /// How many listening sockets were passed (taken or not).
    pub fn len(&self) -> usize {
        self.fds.len()
    }

    /// Whether no listening socket was passed.
    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
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
        self.fds
            .iter()
            .enumerate()
            .filter_map(|(i, fd)| Some((i, (*fd)?)))
            .map(|(i, fd)| {
                // SAFETY: the fd stays owned by `self.fds`; the borrowed view lives only here.
                let fd = unsafe { BorrowedFd::borrow_raw(fd) };
                let view = fd.try_clone_to_owned().and_then(Socket::from_listening_fd);
                let addr = view.and_then(|s| s.local_addr()).ok();
                let name = self.names.get(i).cloned().unwrap_or_default();
                (i, name, addr, self.origins.get(i).copied().unwrap_or(Origin::Bound))
            })
            .collect()
    }

    /// Takes inherited fd `idx` as it is, whatever it is (a connection or a memfd a server
    /// kept in systemd's fd store), close-on-exec so that no successor inherits it.
    pub fn take_fd(&mut self, idx: usize) -> Option<OwnedFd> {
        let fd = self.fds.get_mut(idx).and_then(Option::take)?;
        // SAFETY: `self.fds` hands each inherited fd out once; from here we own it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let _ = crate::process::set_cloexec(owned.as_raw_fd());
        Some(owned)
    }

    /// Takes inherited socket `idx` as a TCP or Unix listener, with where it came from.
    /// Call it inside a tokio runtime: the socket is registered with its reactor.
    pub fn take(&mut self, idx: usize) -> io::Result<(Socket, Origin)> {
        let fd = self
            .fds
            .get_mut(idx)
            .and_then(Option::take)
            .ok_or_else(|| io::Error::other("inherited fd already taken"))?;
        let origin = self.origins.get(idx).copied().unwrap_or(Origin::Bound);
        // SAFETY: `self.fds` hands each inherited fd out once; from here we own it.
        let socket = Socket::from_listening_fd(unsafe { OwnedFd::from_raw_fd(fd) })?;
        Ok((socket, origin))
    }

    /// Takes every socket not adopted yet, with its name, so the caller can log what the
    /// configuration dropped before it closes them.
    pub fn take_rest(&mut self) -> Vec<(String, io::Result<Socket>)> {
        let rest: Vec<usize> = (0..self.len()).filter(|&i| self.fds[i].is_some()).collect();
        rest.into_iter()
            .map(|i| {
                let name = self.names.get(i).cloned().unwrap_or_default();
                (name, self.take(i).map(|(s, _)| s))
            })
            .collect()
    }
}

/// The fd a predecessor passed in `var` (its `value`), if it is set. One that names a passed listener is
/// refused (taking it would close a listening socket), and so is a value that is not an open
/// fd above stderr, as a malformed extra fd is: a predecessor that says it passed something
/// must have passed it.
fn inherited_fd(var: &str, value: Option<OsString>, listeners: &[RawFd]) -> io::Result<Option<OwnedFd>> {
    let Some(value) = value else {
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

/// The extra fds `listed` in [`EXTRA_FDS_ENV`]. A malformed list, or one naming a listener,
/// is an error: a predecessor that says it passed something must have passed it.
fn extra_fds(listed: &str, listeners: &[RawFd]) -> io::Result<Vec<(String, OwnedFd)>> {
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
/// counts as having bound them. `listed`: [`ORIGINS_ENV`].
fn origins(names: &mut [String], count: usize, from_predecessor: bool, listed: &str) -> Vec<Origin> {
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
    use std::collections::HashMap;
    use std::os::fd::IntoRawFd;

    /// An environment of `vars`, for [`Inherited::read`] and the functions it calls.
    fn env_of(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> + use<> {
        let vars: HashMap<String, OsString> = vars.iter().map(|(k, v)| (k.to_string(), v.into())).collect();
        move |k| vars.get(k).cloned()
    }

    /// A pipe end handed over as a predecessor hands an fd: by number, ownership included.
    fn passed_fd() -> (RawFd, OwnedFd) {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        (w.into_raw_fd(), r)
    }

    fn is_cloexec(fd: RawFd) -> bool {
        // SAFETY: F_GETFD reads the flag word of an fd number; no memory is involved.
        unsafe { libc::fcntl(fd, libc::F_GETFD) & libc::FD_CLOEXEC != 0 }
    }

    /// The refusal `r` must be; an fd taken by mistake is leaked, not closed, so that a
    /// refused stdio fd stays open for the other tests.
    fn refusal(r: io::Result<Option<OwnedFd>>) -> String {
        match r {
            Ok(fd) => panic!("taken: {:?}", fd.map(IntoRawFd::into_raw_fd)),
            Err(e) => e.to_string(),
        }
    }

    /// An fd number above stderr that is never open: past any open-files limit.
    const NEVER_OPEN: RawFd = RawFd::MAX - 1;

    #[test]
    fn every_protocol_variable_is_listed_for_removal() {
        let all: Vec<&str> = protocol_env().collect();
        assert_eq!(all.len(), 11, "{all:?}");
        for var in ["LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_FDS_FIRST_FD"] {
            assert!(all.contains(&var), "systemd's {var}");
        }
        for var in BATON_ENV {
            assert!(all.contains(&var), "baton's {var}");
        }
    }

    #[test]
    fn the_generation_is_1_unless_a_predecessor_says_otherwise() {
        assert_eq!(generation(None).unwrap(), 1, "a first generation");
        assert_eq!(generation(Some("7".into())).unwrap(), 7);
        assert!(
            generation(Some("seven".into())).is_err(),
            "a broken predecessor is an error"
        );
    }

    #[test]
    fn listen_pid_must_name_this_process() {
        assert!(listen_pid_is(Some(OsStr::new("4242")), 4242));
        assert!(listen_pid_is(Some(OsStr::new(" 4242\n")), 4242), "blanks around it");
        assert!(!listen_pid_is(Some(OsStr::new("4243")), 4242), "another process's");
        assert!(!listen_pid_is(None, 4242), "unset");
        assert!(!listen_pid_is(Some(OsStr::new("pid")), 4242), "not a number");
    }

    #[test]
    fn a_passed_fd_is_taken_and_kept_from_successors() {
        let (fd, _r) = passed_fd();
        // SAFETY: clearing the flag of the pipe end this test hands over.
        unsafe { libc::fcntl(fd, libc::F_SETFD, 0) };
        let owned = inherited_fd(READY_FD_ENV, Some(fd.to_string().into()), &[])
            .expect("an open fd")
            .expect("set");
        assert_eq!(owned.as_raw_fd(), fd);
        assert!(is_cloexec(fd), "our own successor must not inherit it");
        assert!(inherited_fd(READY_FD_ENV, None, &[]).unwrap().is_none(), "unset");
    }

    #[test]
    fn a_passed_fd_that_is_a_listener_stdio_closed_or_no_number_is_refused() {
        let (fd, _r) = passed_fd();
        let e = refusal(inherited_fd(READY_FD_ENV, Some(fd.to_string().into()), &[fd - 1, fd]));
        assert!(e.contains("names a passed listening socket"), "{e}");
        for stdio in 0..=2 {
            let e = refusal(inherited_fd(READY_FD_ENV, Some(stdio.to_string().into()), &[]));
            assert!(e.contains("not an open fd above stderr"), "fd {stdio}: {e}");
        }
        let e = refusal(inherited_fd(READY_FD_ENV, Some(NEVER_OPEN.to_string().into()), &[]));
        assert!(e.contains("not an open fd above stderr"), "{e}");
        let e = refusal(inherited_fd(READY_FD_ENV, Some("three".into()), &[]));
        assert!(e.contains("is not an fd number"), "{e}");
        // The same fd, outside the listeners and open: taken.
        inherited_fd(READY_FD_ENV, Some(fd.to_string().into()), &[fd - 1, fd + 1])
            .expect("open, no listener")
            .expect("set");
    }

    #[test]
    fn extra_fds_are_taken_by_name_and_kept_from_successors() {
        let ((a, _ra), (b, _rb)) = (passed_fd(), passed_fd());
        let extra = extra_fds(&format!("log={a}:state={b}:"), &[]).expect("two open fds");
        let got: Vec<(&str, RawFd)> = extra.iter().map(|(n, f)| (n.as_str(), f.as_raw_fd())).collect();
        assert_eq!(got, vec![("log", a), ("state", b)]);
        assert!(
            is_cloexec(a) && is_cloexec(b),
            "our own successor must not inherit them"
        );
        assert!(extra_fds("", &[]).unwrap().is_empty(), "none listed");
    }

    #[test]
    fn extra_fds_that_collide_or_are_not_open_are_refused() {
        let refused = |listed: &str, listeners: &[RawFd]| match extra_fds(listed, listeners) {
            Ok(got) => panic!(
                "{listed}: taken {:?}",
                got.into_iter().map(|(n, f)| (n, f.into_raw_fd())).collect::<Vec<_>>()
            ),
            Err(e) => e.to_string(),
        };
        let e = refused(&format!("a={NEVER_OPEN}"), &[NEVER_OPEN]);
        assert!(e.contains("collides"), "a listener's number: {e}");
        for stdio in 0..=2 {
            let e = refused(&format!("a={stdio}"), &[]);
            assert!(e.contains("collides"), "fd {stdio}: {e}");
        }
        let e = refused(&format!("a={NEVER_OPEN}"), &[]);
        assert!(e.contains("is not open"), "{e}");
        let (fd, _r) = passed_fd();
        let e = refused(&format!("a={fd}:b={fd}"), &[]);
        assert!(e.contains("b=") && e.contains("collides"), "listed twice: {e}");
        let e = refused("a", &[]);
        assert!(e.contains("malformed"), "{e}");
    }

    #[test]
    fn origins_of_a_first_generation_come_from_the_service_manager_or_its_store() {
        let mut names = vec!["web".to_string(), "bound.admin".to_string()];
        let origins = origins(&mut names, 3, false, "bound:bound:bound");
        assert_eq!(
            origins,
            [Origin::Supervisor, Origin::Bound, Origin::Supervisor],
            "the list is a successor's"
        );
        assert_eq!(names, ["web", "admin"], "the store's prefix removed");
    }

    #[test]
    fn origins_of_a_successor_are_what_its_predecessor_listed() {
        let mut names = vec!["web".to_string(), "bound.admin".to_string()];
        let origins = origins(&mut names, 3, true, "supervisor:bound");
        assert_eq!(
            origins,
            [Origin::Supervisor, Origin::Bound, Origin::Bound],
            "unlisted: bound"
        );
        assert_eq!(
            names,
            ["web", "bound.admin"],
            "a successor's names are its predecessor's"
        );
    }

    /// Two listening sockets as a predecessor passes them.
    fn two_listeners() -> (Vec<RawFd>, Vec<std::net::SocketAddr>) {
        let l = [0, 1].map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind"));
        let addrs = l.iter().map(|l| l.local_addr().unwrap()).collect();
        (l.into_iter().map(IntoRawFd::into_raw_fd).collect(), addrs)
    }

    #[tokio::test]
    async fn a_successor_reads_what_its_predecessor_passed() {
        let (fds, addrs) = two_listeners();
        let (ready, ready_r) = passed_fd();
        let (extra, _er) = passed_fd();
        let (ready, extra) = (ready.to_string(), format!("log={extra}"));
        let env = env_of(&[
            ("LISTEN_FDNAMES", "web:admin"),
            (READY_FD_ENV, &ready),
            (EXTRA_FDS_ENV, &extra),
            (GENERATION_ENV, "4"),
            (ORIGINS_ENV, "supervisor:bound"),
        ]);
        let mut inherited = Inherited::read(&env, true, fds.clone()).expect("read");
        assert!(!inherited.ignored_handoff(), "addressed to this process");
        assert_eq!((inherited.len(), inherited.is_empty()), (2, false));
        assert_eq!(inherited.names(), ["web", "admin"]);
        assert_eq!(inherited.generation, 4);
        assert!(inherited.take_extra("state").is_none(), "not passed");
        let log = inherited.take_extra("log").expect("passed");
        assert!(inherited.take_extra("log").is_none(), "taken already");
        drop(log);
        let untaken = inherited.untaken();
        let want = |i: usize, name: &str, origin| (i, name.to_string(), Some(ListenAddr::Tcp(addrs[i])), origin);
        assert_eq!(
            untaken,
            [want(0, "web", Origin::Supervisor), want(1, "admin", Origin::Bound)]
        );
        let (socket, origin) = inherited.take(1).expect("take admin");
        assert_eq!(
            (socket.local_addr().unwrap(), origin),
            (ListenAddr::Tcp(addrs[1]), Origin::Bound)
        );
        assert!(inherited.take(1).is_err(), "taken already");
        assert_eq!(
            inherited.untaken(),
            [want(0, "web", Origin::Supervisor)],
            "admin is taken"
        );
        let rest = inherited.take_rest();
        assert_eq!(rest.len(), 1, "only web is left");
        assert_eq!(rest[0].0, "web");
        assert_eq!(
            rest[0].1.as_ref().unwrap().local_addr().unwrap(),
            ListenAddr::Tcp(addrs[0])
        );
        assert!(
            inherited.untaken().is_empty() && inherited.take_rest().is_empty(),
            "all taken"
        );
        inherited
            .ready
            .take()
            .expect("the readiness pipe")
            .signal_ready()
            .expect("write");
        assert_eq!(read_all(ready_r), format!("ready {}\n", std::process::id()));
    }

    #[test]
    fn a_handoff_for_another_process_is_ignored_and_said_to_be() {
        let (ready, _r) = passed_fd();
        let ready = ready.to_string();
        let inherited = Inherited::read(&env_of(&[(READY_FD_ENV, &ready)]), false, Vec::new()).unwrap();
        assert!(inherited.ignored_handoff(), "BATON_READY_FD was not for this process");
        assert!(inherited.ready.is_none(), "someone else's pipe is not taken");
        assert_eq!((inherited.len(), inherited.is_empty()), (0, true));
        let inherited = Inherited::read(&env_of(&[("LISTEN_FDNAMES", "web")]), false, Vec::new()).unwrap();
        assert!(!inherited.ignored_handoff(), "no BATON_* variable: nothing ignored");
    }

    fn read_all(fd: OwnedFd) -> String {
        let mut s = String::new();
        io::Read::read_to_string(&mut std::fs::File::from(fd), &mut s).expect("read the pipe");
        s
    }

    /// Each readiness line, as the predecessor reads it from the pipe.
    #[test]
    fn each_readiness_line_reaches_the_pipe() {
        let pid = std::process::id();
        let xfer = crate::transfer::TRANSFER_VERSION;
        type Signal = fn(ReadySignal) -> io::Result<()>;
        let lines: [(Signal, String); 3] = [
            (ReadySignal::signal_ready, format!("ready {pid}\n")),
            (
                ReadySignal::signal_ready_pinging,
                format!("ready {pid} canary confirms\n"),
            ),
            (
                ReadySignal::signal_ready_taking_transfer,
                format!("ready {pid} canary confirms xfer={xfer}\n"),
            ),
        ];
        for (signal, line) in lines {
            let (r, w) = nix::unistd::pipe().expect("pipe");
            signal(ReadySignal(w)).expect("write");
            assert_eq!(read_all(r), line);
        }
    }

    #[test]
    fn a_failure_reaches_the_pipe_on_one_line() {
        let (r, w) = nix::unistd::pipe().expect("pipe");
        let ready = ReadySignal(w);
        let reporter = ready.failure_reporter().expect("dup");
        drop(ready);
        reporter.report("cannot bind\nport 80");
        assert_eq!(read_all(r), "failed cannot bind; port 80\n");
    }
}
