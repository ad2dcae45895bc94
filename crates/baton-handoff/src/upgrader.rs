//! The common case in one type: [`Upgrader`]. It reads what a predecessor handed over, opens
//! listeners that axum, hyper-util or tonic serve directly ([`Upgrader::listen`]), reports
//! readiness ([`Upgrader::ready`]), starts and vets a successor ([`Upgrader::upgrade`]) and
//! says when this generation should stop ([`Upgrader::exit`]). Everything it does is done by
//! the modules under it ([`crate::inherit`], [`crate::adopt`], [`crate::successor`],
//! [`crate::channel`], [`crate::drain`]); use those directly for anything it does not cover.

use std::ffi::OsString;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};
use tokio::signal::unix::SignalKind;
use tokio::sync::oneshot;

use crate::adopt::open_listener;
use crate::channel::{CanaryFailed, PredecessorChannel, Verdict};
use crate::drain::Drain;
use crate::inherit::{Inherited, ReadySignal};
use crate::listener::{ListenAddr, ListenError, Origin, Socket};
use crate::successor::{HandoffError, PassedListener, SuccessorSpec, spawn_successor};
use crate::transfer::{Incoming, Transfer};

/// How an [`Upgrader`] starts and vets successors. Build it from [`Options::default`] and the
/// setters (the struct may gain fields, so it cannot be written as a literal).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Options {
    /// How long a successor has from its start to [`Upgrader::ready`] before it is killed
    /// and the upgrade fails. Default: 60 s (tableflip's default too).
    pub ready_timeout: Duration,
    /// How long a ready successor is watched (it must stay alive and ping) before this
    /// generation hands over. `None` (the default): it hands over once the successor is ready.
    pub canary: Option<Duration>,
    /// The program a successor executes. Default: the one the first generation was started
    /// from (resolved once, at its start, so a binary replaced on disk is picked up).
    pub program: Option<PathBuf>,
    /// The successor's arguments. Default: the ones the first generation was started with.
    pub args: Option<Vec<OsString>>,
    /// Offer to take the predecessor's live connections ([`Upgrader::incoming`]). Default:
    /// off; a predecessor then has no [`Upgraded::transfer`] for this generation.
    pub take_transfer: bool,
}

impl Default for Options {
    fn default() -> Options {
        Options {
            ready_timeout: Duration::from_secs(60),
            canary: None,
            program: None,
            args: None,
            take_transfer: false,
        }
    }
}

impl Options {
    /// Sets [`Options::ready_timeout`].
    pub fn ready_timeout(mut self, timeout: Duration) -> Options {
        self.ready_timeout = timeout;
        self
    }

    /// Sets [`Options::canary`] to `window`.
    pub fn canary(mut self, window: Duration) -> Options {
        self.canary = Some(window);
        self
    }

    /// Sets [`Options::program`].
    pub fn program(mut self, program: impl Into<PathBuf>) -> Options {
        self.program = Some(program.into());
        self
    }

    /// Sets [`Options::args`].
    pub fn args(mut self, args: impl IntoIterator<Item = impl Into<OsString>>) -> Options {
        self.args = Some(args.into_iter().map(Into::into).collect());
        self
    }

    /// Sets [`Options::take_transfer`].
    pub fn take_transfer(mut self, take: bool) -> Options {
        self.take_transfer = take;
        self
    }
}

/// Why [`Upgrader::upgrade`] did not hand over. Every case leaves this generation serving
/// as before (a successor that was started has been killed and reaped).
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// The successor could not be started, failed, or was not ready in time.
    #[error(transparent)]
    Handoff(#[from] HandoffError),
    /// The successor was ready but failed its canary window.
    #[error(transparent)]
    Canary(#[from] CanaryFailed),
    /// [`Upgrader::ready`] was not called yet: a generation that does not serve yet must not
    /// hand its sockets on.
    #[error("this generation has not reported ready yet")]
    NotReady,
    /// Another upgrade is under way (only one runs at a time).
    #[error("an upgrade is already in progress")]
    InProgress,
    /// This generation handed over already, or was stopped ([`Upgrader::stop`]).
    #[error("this generation is exiting")]
    Exiting,
}

/// A successful upgrade: the successor serves, and [`Upgrader::exit`] has resolved.
#[derive(Debug)]
pub struct Upgraded {
    /// The successor's pid.
    pub pid: u32,
    /// From its start to its readiness.
    pub ready_after: Duration,
    /// The canary window it passed ([`Options::canary`]; zero when none was configured).
    pub canary: Duration,
    /// The way to move live connections to it, if it offered to take them
    /// ([`Options::take_transfer`]): send batches, then [`Transfer::finish`].
    pub transfer: Option<Transfer>,
}

/// A listening socket kept for the next generation: a duplicate of the one handed to the
/// server (one open file description, so one accept queue), never accepted on here.
struct Kept {
    name: String,
    fd: OwnedFd,
    origin: Origin,
}

struct Inner {
    options: Options,
    program: PathBuf,
    args: Vec<OsString>,
    generation: u64,
    has_parent: bool,
    inherited: tokio::sync::Mutex<Inherited>,
    kept: Mutex<Vec<Kept>>,
    /// `Some` until [`Upgrader::ready`] consumed it (`None` inside for a first generation).
    ready: Mutex<Option<Readiness>>,
    ready_done: std::sync::atomic::AtomicBool,
    /// Held while an upgrade runs.
    upgrading: tokio::sync::Mutex<()>,
    /// Its `draining` signal is [`Upgrader::exit`].
    drain: Drain,
    incoming: Mutex<Option<oneshot::Receiver<Incoming>>>,
}

/// What the predecessor is owed at readiness.
struct Readiness {
    signal: Option<ReadySignal>,
    channel: Option<PredecessorChannel>,
}

/// Zero-downtime upgrades for a tokio server: one per process, cheap to clone (clones share
/// it). See the [crate documentation](crate) for a complete server.
#[derive(Clone)]
pub struct Upgrader {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Upgrader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgrader")
            .field("generation", &self.inner.generation)
            .field("program", &self.inner.program)
            .field("exiting", &self.is_exiting())
            .finish_non_exhaustive()
    }
}

impl Upgrader {
    /// [`Upgrader::with_options`] with the default [`Options`].
    pub fn from_env() -> io::Result<Upgrader> {
        Upgrader::with_options(Options::default())
    }

    /// Reads what a predecessor (or systemd) handed this process and clears it from the
    /// environment, so that none of it leaks to other children. Clearing the environment is
    /// only sound while no other thread runs: call it first thing in `main`, before a tokio
    /// runtime starts (`#[tokio::main(flavor = "current_thread")]` starts no thread either).
    /// With other threads running it returns an error instead; a program that cannot avoid
    /// them reads [`Inherited::from_env`] itself (unsafe, same rule) and uses
    /// [`Upgrader::from_inherited`].
    pub fn with_options(options: Options) -> io::Result<Upgrader> {
        if crate::process::thread_count()? != 1 {
            return Err(io::Error::other(
                "Upgrader::from_env must run before any other thread starts (before the tokio runtime); \
                 see Upgrader::from_inherited",
            ));
        }
        // SAFETY: this is the only thread, and it is busy here: nothing reads the environment
        // while `from_env` changes it.
        let inherited = unsafe { Inherited::from_env() }?;
        Upgrader::from_inherited(inherited, options)
    }

    /// An upgrader over what this process was handed, read by the caller.
    pub fn from_inherited(mut inherited: Inherited, options: Options) -> io::Result<Upgrader> {
        // Whatever our own parent leaked to us must not reach a successor.
        crate::process::close_on_exec_all()?;
        let program = match options.program.clone().or_else(|| inherited.program.clone()) {
            Some(p) => p,
            None => std::env::current_exe()?,
        };
        let args = options
            .args
            .clone()
            .or_else(|| inherited.args.clone())
            .unwrap_or_else(|| std::env::args_os().skip(1).collect());
        let readiness = Readiness {
            signal: inherited.ready.take(),
            channel: inherited.channel.take(),
        };
        let has_parent = readiness.signal.is_some();
        Ok(Upgrader {
            inner: Arc::new(Inner {
                options,
                program,
                args,
                generation: inherited.generation,
                has_parent,
                inherited: tokio::sync::Mutex::new(inherited),
                kept: Mutex::new(Vec::new()),
                ready: Mutex::new(Some(readiness)),
                ready_done: std::sync::atomic::AtomicBool::new(false),
                upgrading: tokio::sync::Mutex::new(()),
                drain: Drain::new(),
                incoming: Mutex::new(None),
            }),
        })
    }

    /// This process's generation: 1 for the first, one more for each successor.
    pub fn generation(&self) -> u64 {
        self.inner.generation
    }

    /// Whether a predecessor started this process (and waits for [`Upgrader::ready`]).
    pub fn has_parent(&self) -> bool {
        self.inner.has_parent
    }

    /// The program a successor executes.
    pub fn program(&self) -> &Path {
        &self.inner.program
    }

    /// The TCP listener `name` at `addr`: the predecessor's (or systemd's) socket when it
    /// passed one by that name or at that address, bound otherwise (the rule is
    /// [`crate::adopt::plan`]'s). Call it before [`Upgrader::ready`], inside a tokio runtime.
    pub async fn listen(&self, name: &str, addr: SocketAddr) -> Result<TcpListener, ListenError> {
        let addr = ListenAddr::Tcp(addr);
        let listener = open_listener(&mut *self.inner.inherited.lock().await, name, &addr).await?;
        match self.keep(name, &addr, listener)? {
            Socket::Tcp(l) => Ok(l),
            Socket::Unix(_) => unreachable!("keep refuses a mismatch"),
        }
    }

    /// The Unix listener `name` at `path`, as [`Upgrader::listen`] (a stale socket file of
    /// our own is replaced; a new one gets mode 0600).
    pub async fn listen_unix(&self, name: &str, path: impl AsRef<Path>) -> Result<UnixListener, ListenError> {
        let addr = ListenAddr::Unix(path.as_ref().to_path_buf());
        let listener = open_listener(&mut *self.inner.inherited.lock().await, name, &addr).await?;
        match self.keep(name, &addr, listener)? {
            Socket::Unix(l) => Ok(l),
            Socket::Tcp(_) => unreachable!("keep refuses a mismatch"),
        }
    }

    /// Keeps a duplicate of the listener's fd for the successor, and hands the socket out,
    /// unless it is of another kind than asked for (the service manager passed a Unix
    /// socket under a TCP listener's name, or the other way round).
    fn keep(&self, name: &str, wanted: &ListenAddr, listener: crate::adopt::Listener) -> Result<Socket, ListenError> {
        let socket = Arc::into_inner(listener.socket).expect("open_listener shares its socket with nobody");
        let refuse = |source| ListenError::Adopt {
            name: name.to_string(),
            source,
        };
        match (&socket, wanted) {
            (Socket::Tcp(_), ListenAddr::Tcp(_)) | (Socket::Unix(_), ListenAddr::Unix(_)) => {}
            (Socket::Unix(_), _) => return Err(refuse(mismatch("a Unix socket was passed where a TCP one is wanted"))),
            (Socket::Tcp(_), _) => return Err(refuse(mismatch("a TCP socket was passed where a Unix one is wanted"))),
        }
        let fd = socket.as_fd().try_clone_to_owned().map_err(refuse)?;
        lock(&self.inner.kept).push(Kept {
            name: name.to_string(),
            fd,
            origin: listener.origin,
        });
        Ok(socket)
    }

    /// Tells the predecessor (if any) that this generation serves: call it once every
    /// listener is open and served. Inherited sockets no listener took are closed. Call it
    /// inside a tokio runtime: it answers the predecessor's canary window in a task.
    /// Systemd is not told (the crate does not speak `sd_notify`; see the README).
    pub fn ready(&self) -> io::Result<()> {
        let Some(readiness) = lock(&self.inner.ready).take() else {
            return Ok(());
        };
        if let Ok(mut inherited) = self.inner.inherited.try_lock() {
            for (name, _) in inherited.take_rest() {
                tracing::info!(listener = %name, "closing an inherited socket no listener took");
            }
        }
        let result = match (readiness.signal, readiness.channel) {
            (Some(signal), Some(channel)) => {
                let sent = if self.inner.options.take_transfer {
                    signal.signal_ready_taking_transfer()
                } else {
                    signal.signal_ready_pinging()
                };
                sent.map(|()| self.answer_canary(channel))
            }
            (Some(signal), None) => signal.signal_ready(),
            (None, _) => Ok(()),
        };
        self.inner.ready_done.store(true, std::sync::atomic::Ordering::Release);
        result
    }

    /// Pings the predecessor through its canary window, confirms its verdict, and keeps the
    /// channel for a transfer if one was offered.
    fn answer_canary(&self, channel: PredecessorChannel) {
        let (tx, rx) = oneshot::channel();
        *lock(&self.inner.incoming) = Some(rx);
        let drain = self.inner.drain.clone();
        let open = move || drain.active_connections() + drain.active_tunnels();
        let take_transfer = self.inner.options.take_transfer;
        tokio::spawn(async move {
            match channel.ping_until_verdict(open).await {
                Ok((Verdict::Passed, Some(incoming))) => {
                    if let Err(e) = incoming.confirm_verdict().await {
                        tracing::debug!("the predecessor did not hear our confirmation: {e}");
                    }
                    // Without the offer the predecessor sends nothing: no Incoming to read.
                    if take_transfer {
                        let _ = tx.send(incoming);
                    }
                }
                Ok(_) => tracing::debug!("the predecessor went away without a verdict"),
                Err(e) => tracing::warn!("the channel to the predecessor failed: {e}"),
            }
        });
    }

    /// The predecessor's live connections, once its canary window passed: `None` when this
    /// generation did not offer to take them ([`Options::take_transfer`]), had no predecessor,
    /// or the predecessor went away. Read batches with [`Incoming::next_batch`].
    pub async fn incoming(&self) -> Option<Incoming> {
        let rx = lock(&self.inner.incoming).take()?;
        rx.await.ok()
    }

    /// Starts a successor from [`Upgrader::program`] with this generation's listeners, waits
    /// for its readiness (and its canary window, if configured), and hands over:
    /// [`Upgrader::exit`] resolves. On any error this generation serves on as before.
    pub async fn upgrade(&self) -> Result<Upgraded, UpgradeError> {
        if !self.inner.ready_done.load(std::sync::atomic::Ordering::Acquire) {
            return Err(UpgradeError::NotReady);
        }
        let _one_at_a_time = self.inner.upgrading.try_lock().map_err(|_| UpgradeError::InProgress)?;
        if self.is_exiting() {
            return Err(UpgradeError::Exiting);
        }
        let successor = {
            let kept = lock(&self.inner.kept);
            let listeners = kept
                .iter()
                .map(|k| PassedListener {
                    name: &k.name,
                    fd: k.fd.as_fd(),
                    origin: k.origin,
                })
                .collect();
            spawn_successor(&SuccessorSpec {
                program: &self.inner.program,
                args: &self.inner.args,
                listeners,
                extra: Vec::new(),
                generation: self.inner.generation + 1,
                binary: None,
            })?
        };
        let ready = successor.await_ready(self.inner.options.ready_timeout).await?;
        let window = self.inner.options.canary.unwrap_or(Duration::ZERO);
        // Even without a window: the verdict tells the successor it is on its own.
        let passed = ready.watch.canary(window).await?;
        self.inner.drain.begin();
        // Our copies are not needed any more: the successor holds its own.
        lock(&self.inner.kept).clear();
        Ok(Upgraded {
            pid: ready.pid,
            ready_after: ready.after,
            canary: passed.window,
            transfer: passed.transfer,
        })
    }

    /// Upgrades on every `signal` (SIGHUP, SIGUSR2, ...) until this generation exits, in a
    /// task of its own. A failure is passed to `on_failure` (this generation serves on); a
    /// success is logged, and [`Upgrader::exit`] resolves. For [`Upgraded::transfer`], call
    /// [`Upgrader::upgrade`] from your own trigger instead. Call it inside a tokio runtime.
    pub fn upgrade_on(&self, signal: SignalKind, on_failure: impl Fn(UpgradeError) + Send + 'static) -> io::Result<()> {
        let mut signals = tokio::signal::unix::signal(signal)?;
        let upgrader = self.clone();
        tokio::spawn(async move {
            let exit = upgrader.exit();
            tokio::pin!(exit);
            loop {
                tokio::select! {
                    () = &mut exit => return,
                    received = signals.recv() => if received.is_none() { return },
                }
                match upgrader.upgrade().await {
                    Ok(new) => tracing::info!(pid = new.pid, "handed over to the new generation"),
                    Err(e) => on_failure(e),
                }
            }
        });
        Ok(())
    }

    /// Resolves once this generation should stop accepting and drain: a successor took over
    /// ([`Upgrader::upgrade`] succeeded) or [`Upgrader::stop`] was called. Made for
    /// `axum::serve(..).with_graceful_shutdown(upgrader.exit())`.
    pub fn exit(&self) -> impl Future<Output = ()> + Send + 'static {
        self.inner.drain.draining().cancelled_owned()
    }

    /// Whether [`Upgrader::exit`] has resolved.
    pub fn is_exiting(&self) -> bool {
        self.inner.drain.is_draining()
    }

    /// Refuses further upgrades and resolves [`Upgrader::exit`]: for a shutdown (SIGTERM).
    pub fn stop(&self) {
        self.inner.drain.begin();
    }

    /// This generation's [`Drain`]: track connection tasks on it and call
    /// [`Drain::drain_until`] after [`Upgrader::exit`] to wait for them, with a deadline.
    pub fn drain(&self) -> &Drain {
        &self.inner.drain
    }
}

fn mismatch(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what.to_string())
}

/// The lock's value even if a thread panicked holding it: every value here stays valid.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upgrader for a first generation (nothing inherited), whose successor is
    /// `sh -c script`.
    fn upgrader(script: &str) -> Upgrader {
        let options = Options::default()
            .program("/bin/sh")
            .args(["-c", script])
            .ready_timeout(Duration::from_secs(20));
        Upgrader::from_inherited(Inherited::none(), options).expect("upgrader")
    }

    fn loopback() -> SocketAddr {
        "127.0.0.1:0".parse().expect("address")
    }

    #[test]
    fn from_env_refuses_while_another_thread_runs() {
        // A thread held alive: whatever thread the harness runs this on, there are two.
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let other = std::thread::spawn(move || rx.recv());
        let refused = Upgrader::from_env().expect_err("another thread runs");
        assert!(refused.to_string().contains("before any other thread"), "{refused}");
        drop(tx);
        let _ = other.join();
    }

    #[tokio::test]
    async fn an_upgrade_before_ready_is_refused_and_one_after_it_starts_a_successor() {
        let up = upgrader("exit 3");
        let _listener = up.listen("web", loopback()).await.expect("bind");
        assert!(
            matches!(up.upgrade().await, Err(UpgradeError::NotReady)),
            "not ready yet"
        );
        up.ready().expect("ready");
        // The same call after ready() reaches the successor, which fails.
        match up.upgrade().await {
            Err(UpgradeError::Handoff(HandoffError::ChildExited { status, .. })) => assert_eq!(status, "exit status 3"),
            other => panic!("the successor's exit must be the error: {other:?}"),
        }
        assert!(!up.is_exiting(), "a failed upgrade leaves this generation serving");
    }

    #[tokio::test]
    async fn a_ready_successor_gets_the_listener_and_exit_resolves() {
        // It checks that the listener came as fd 3 under its name, reports ready, and waits
        // to be killed; anything else says why it failed.
        let up = upgrader(
            r#"[ "$LISTEN_FDNAMES" = web ] && [ -S /proc/self/fd/3 ] && echo "ready $$" >&$BATON_READY_FD \
               && exec sleep 30; echo "failed $LISTEN_FDNAMES" >&$BATON_READY_FD"#,
        );
        let listener = up.listen("web", loopback()).await.expect("bind");
        up.ready().expect("ready");
        let exit = up.exit();
        let upgraded = up.upgrade().await.expect("the successor is ready");
        tokio::time::timeout(Duration::from_secs(5), exit)
            .await
            .expect("exit resolves once a successor took over");
        assert!(up.is_exiting());
        assert!(
            matches!(up.upgrade().await, Err(UpgradeError::Exiting)),
            "one handover only"
        );
        assert!(
            listener.local_addr().is_ok(),
            "the server's listener is its own to close"
        );
        let pid = nix::unistd::Pid::from_raw(upgraded.pid as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the successor");
    }

    #[tokio::test]
    async fn stop_resolves_exit_and_refuses_upgrades() {
        let up = upgrader("exit 0");
        up.ready().expect("ready");
        assert!(!up.is_exiting(), "not before stop()");
        up.stop();
        tokio::time::timeout(Duration::from_secs(5), up.exit())
            .await
            .expect("stop resolves exit");
        assert!(matches!(up.upgrade().await, Err(UpgradeError::Exiting)));
    }

    #[tokio::test]
    async fn a_unix_listener_is_bound_and_kept_for_the_successor() {
        let dir = tempfile::tempdir().expect("tempdir");
        let up = upgrader("exit 0");
        let unix = up.listen_unix("local", dir.path().join("s.sock")).await.expect("bind");
        assert!(unix.local_addr().expect("addr").as_pathname().is_some());
        assert_eq!(lock(&up.inner.kept).len(), 1, "kept for the successor");
    }

    #[tokio::test]
    async fn a_unix_socket_passed_where_tcp_is_wanted_is_refused() {
        use std::os::fd::IntoRawFd;
        let dir = tempfile::tempdir().expect("tempdir");
        let passed = std::os::unix::net::UnixListener::bind(dir.path().join("s.sock")).expect("bind");
        // Passed by the service manager as "web": its socket wins over the configured address.
        let names = OsString::from("web");
        let env = move |v: &str| (v == "LISTEN_FDNAMES").then(|| names.clone());
        let inherited = Inherited::read(&env, false, vec![passed.into_raw_fd()]).expect("read");
        let up = Upgrader::from_inherited(inherited, Options::default()).expect("upgrader");
        let refused = up
            .listen("web", loopback())
            .await
            .expect_err("a Unix socket is no TcpListener");
        let why = std::error::Error::source(&refused).map(ToString::to_string);
        assert_eq!(
            why.as_deref(),
            Some("a Unix socket was passed where a TCP one is wanted"),
            "{refused}"
        );
        assert!(lock(&up.inner.kept).is_empty(), "nothing kept for a refused listener");
    }
}
