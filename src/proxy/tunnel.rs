//! Relaying a CONNECT tunnel. When the client's connection is a plain socket (TCP or Unix)
//! the bytes move with splice(2) through a pipe per direction, never copied into user space
//! (faster than a buffered copy, docs/benchmarks.md); a direction's pipe (two fds) is made
//! when its first byte waits to move, so an idle tunnel holds none. Otherwise (a TLS client
//! connection) a buffered copy. Either way: half-close is passed on, an idle tunnel ends
//! after `idle` (the activity is counted as bytes move), and a drain deadline (`cut`) ends
//! it at once. A spliced tunnel is nothing but fds, so at a handoff it moves to the next
//! generation ([`crate::proxy::migrate`]); a copied one inside a TLS connection to a plain
//! origin moves too, with its TLS record state, once its buffers are written out
//! ([`TlsRelay`]). The access line says how it relayed (`relay="splice"` or `"copy"`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use baton_handoff::Stream;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::proxy::access::Outcome;
use crate::proxy::connector::HopStream;
use crate::proxy::limits::{Pacer, Throttle};
use crate::proxy::migrate::{Migration, Moved, TunnelRecord};
use crate::proxy::stash::{self, Entry, Stash};
use crate::tls::moving::TlsClient;

mod tls_relay;
pub use tls_relay::{TlsRelay, rebuild as rebuild_tls};

/// How a tunnel ended and relayed, with the bytes moved each way (client→origin,
/// origin→client).
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    pub outcome: Outcome,
    pub up: u64,
    pub down: u64,
}

/// A client connection that a CONNECT made a tunnel of.
pub enum TunnelClient {
    /// A plain socket: spliced, and movable at a handoff.
    Socket(Stream),
    /// A connection on a TLS listener: copied through user-space buffers; movable at a
    /// handoff with its TLS record state when its origin is a plain socket.
    Tls(TlsClient),
    /// Anything else (an HTTP/2 stream): copied through user-space buffers; it does not
    /// move.
    Other(Box<dyn CopyIo>),
}

impl TunnelClient {
    /// The client's side to read from, before the relay starts (its first bytes, say).
    pub fn reader(&mut self) -> &mut (dyn AsyncRead + Unpin + Send) {
        match self {
            TunnelClient::Socket(s) => s,
            TunnelClient::Tls(c) => c,
            TunnelClient::Other(io) => &mut **io,
        }
    }
}

/// A plain stream's socket, out of the runtime, and whether it is a Unix socket.
pub fn stream_into_fd(stream: Stream) -> io::Result<(OwnedFd, bool)> {
    Ok(match stream {
        Stream::Tcp(s) => (s.into_std()?.into(), false),
        Stream::Unix(s) => (s.into_std()?.into(), true),
    })
}

/// A socket [`stream_into_fd`] gave, in this runtime.
pub fn stream_from_fd(fd: OwnedFd, unix: bool) -> io::Result<Stream> {
    Ok(if unix {
        let s = std::os::unix::net::UnixStream::from(fd);
        Stream::Unix(tokio::net::UnixStream::from_std(s)?)
    } else {
        let s = std::net::TcpStream::from(fd);
        Stream::Tcp(tokio::net::TcpStream::from_std(s)?)
    })
}

/// A stream a copied tunnel relays over.
pub trait CopyIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> CopyIo for T {}

/// Bytes moved per splice call with a default pipe (64 KiB), and the pipe size asked for.
const CHUNK: usize = 64 * 1024;
const PIPE_SIZE: usize = 256 * 1024;

/// How the relay is told to hand its tunnel over, and whom to give it to.
pub struct Handover<'a> {
    pub migration: &'a Migration,
    /// Boxed: every tunnel's task would otherwise hold it inline, more than once.
    pub record: Box<TunnelRecord>,
    /// Where it is kept in systemd's fd store once it has lived `stash_after` (`None`: it
    /// is not).
    pub stash: Option<Arc<Stash>>,
}

/// What a tunnel starts with besides its two ends: the bytes the client sent right behind
/// its CONNECT head (a TLS ClientHello, say), for the origin, and those read from the origin
/// side behind a parent proxy's answer, for the client.
pub struct Early {
    pub to_origin: Vec<u8>,
    pub to_client: bytes::Bytes,
}

/// Relays between the client connection and the origin until both sides closed, either
/// failed, the tunnel idled for `idle`, `cut` fired, or the tunnel moved to the next
/// generation (`handover`, for tunnels that splice). `early` goes out first. `throttle`:
/// the bandwidth buckets both directions take from, if a limit applies.
pub async fn relay(
    client: TunnelClient,
    origin: HopStream,
    early: Early,
    limits: Relay,
    handover: Handover<'_>,
) -> Relayed {
    let counters = Counters::default();
    // Boxed: copied tunnels (TLS at either end) are the rarer kind, and every tunnel's task
    // would keep room for the copy's state.
    let (mut client, mut origin) = match (client, origin) {
        (TunnelClient::Socket(Stream::Tcp(s)), HopStream::Plain(o)) => (End::Tcp(s), o),
        (TunnelClient::Socket(Stream::Unix(s)), HopStream::Plain(o)) => (End::Unix(s), o),
        (TunnelClient::Socket(s), o) => return Box::pin(copied(Box::new(s), o, early, limits, counters)).await,
        (TunnelClient::Tls(c), HopStream::Plain(o)) => {
            return Box::pin(tls_relayed(c, o, early, limits, counters, handover)).await;
        }
        (TunnelClient::Tls(c), o) => return Box::pin(copied(Box::new(c), o, early, limits, counters)).await,
        (TunnelClient::Other(io), o) => return Box::pin(copied(io, o, early, limits, counters)).await,
    };
    let Relay { idle, cut, throttle } = limits;
    let delivered = async {
        deliver(&mut origin, &early.to_origin, &counters.up).await?;
        match &mut client {
            End::Tcp(s) => deliver(s, &early.to_client, &counters.down).await,
            End::Unix(s) => deliver(s, &early.to_client, &counters.down).await,
        }
    };
    if let Err(e) = delivered.await {
        return Relayed::ended(end_of(&e), "splice", &counters);
    }
    drop(early);
    Spliced::new(client, End::Tcp(origin))
        .throttled(throttle)
        .run(idle, cut, counters, Some(handover))
        .await
}

/// A tunnel whose bytes move with splice(2): its two ends and, per direction, the pipe
/// the bytes pass through (made when the first byte arrives). All of it is fds, so it can
/// move to the next generation whole, bytes in the pipes included.
pub struct Spliced {
    client: End,
    origin: End,
    up: OneWay,
    down: OneWay,
    /// Each direction's pacer under a bandwidth limit (up, down); boxed, and `None` (one
    /// word, one branch a splice) without one.
    pacers: Option<Box<[Pacer; 2]>>,
}

/// What bounds a tunnel's relay: how long it may idle, when it is cut, and the bandwidth
/// buckets both of its directions take from (`None`: no limit applies).
pub struct Relay {
    pub idle: Duration,
    pub cut: CancellationToken,
    pub throttle: Option<Throttle>,
}

/// Counts that outlive a hand-over: bytes each way (counted as they leave their sender,
/// so bytes sitting in a pipe are counted already) and when a byte last moved, for the idle
/// timer (milliseconds of [`now_ms`]'s clock).
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
    activity: AtomicU64,
}

/// A new tunnel's: nothing moved yet, and its idle time starts now.
impl Default for Counters {
    fn default() -> Counters {
        Counters::starting_at(0, 0, 0)
    }
}

impl Counters {
    /// A moved tunnel's counts go on from the last generation's, and so does its idle time:
    /// it has been quiet `quiet_ms` already (its record says), so a handoff does not give an
    /// idle tunnel a new `tunnel_idle`.
    pub fn starting_at(up: u64, down: u64, quiet_ms: u64) -> Counters {
        Counters {
            up: AtomicU64::new(up),
            down: AtomicU64::new(down),
            activity: AtomicU64::new(now_ms().saturating_sub(quiet_ms)),
        }
    }

    /// How long no byte has moved, in milliseconds.
    pub fn quiet_ms(&self) -> u64 {
        now_ms().saturating_sub(self.activity.load(Ordering::Relaxed))
    }
}

/// Milliseconds of the coarse monotonic clock (a few ms of resolution, read without a
/// syscall): a tunnel notes it each time bytes move, so it must be cheap.
pub fn now_ms() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .map_or(0, |t| t.tv_sec() as u64 * 1000 + t.tv_nsec() as u64 / 1_000_000)
}

impl Spliced {
    fn new(client: End, origin: End) -> Spliced {
        Spliced {
            client,
            origin,
            up: OneWay::default(),
            down: OneWay::default(),
            pacers: None,
        }
    }

    /// The tunnel under `throttle`'s buckets (both directions), if any.
    pub fn throttled(mut self, throttle: Option<Throttle>) -> Spliced {
        self.pacers = throttle.map(|t| Box::new([Pacer::new(t.clone()), Pacer::new(t)]));
        self
    }

    /// Relays until the tunnel ends, or moves (once: a hand-over that fails is not retried;
    /// the tunnel relays on here). Stashed in systemd's fd store once it has lived
    /// `stash_after` (kept under its name at once if it was stashed before it came here).
    pub async fn run(
        mut self,
        idle: Duration,
        cut: CancellationToken,
        counters: Counters,
        mut handover: Option<Handover<'_>>,
    ) -> Relayed {
        // Boxed, and only with a stash: every tunnel's task keeps one word for it.
        let mut stashing = handover.as_ref().and_then(|h| Stashing::start(&self, h, &counters));
        loop {
            let requested = async {
                match &handover {
                    Some(h) => h.migration.requested().await,
                    None => std::future::pending().await,
                }
            };
            let watch = stashing.as_ref().is_some_and(|s| s.entry.is_some());
            let due = async {
                match stashing.as_mut().and_then(|s| s.timer.as_mut()) {
                    Some(at) => at.as_mut().await,
                    None => std::future::pending().await,
                }
            };
            let end = tokio::select! {
                r = self.splice_both(&counters, watch) => match r {
                    Ok(true) => "closed",
                    Ok(false) => {
                        if let (Some(s), Some(h)) = (stashing.as_deref_mut(), &handover) {
                            self.grow_stash(s, &h.record, &counters);
                        }
                        continue;
                    }
                    Err(e) => end_of(&e),
                },
                _ = idle_for(&counters.activity, idle) => "idle timeout",
                _ = cut.cancelled() => "cut at drain timeout",
                () = due => {
                    if let (Some(s), Some(h)) = (stashing.as_deref_mut(), &handover) {
                        self.stash(s, &h.record, &counters);
                    }
                    continue;
                }
                () = requested => {
                    let Some(h) = handover.take() else { continue };
                    // Boxed: the rare path, and every tunnel's task would keep its room.
                    // It handles the stash entry: moved, it went with the tunnel.
                    match Box::pin(self.hand_over(h, &counters, stashing.as_deref_mut())).await {
                        Ok(end) => return Relayed::ended(end, "splice", &counters),
                        Err(kept) => {
                            self = kept;
                            continue;
                        }
                    }
                }
            };
            if let Some(s) = stashing
                && let Some(e) = s.entry
            {
                self.shut();
                s.stash.remove(e);
            }
            return Relayed::ended(end, "splice", &counters);
        }
    }

    /// The tunnel's record as it stands (counts, layout).
    fn record_now(&self, record: &TunnelRecord, counters: &Counters) -> TunnelRecord {
        let mut record = record.clone();
        record.up = counters.up.load(Ordering::Relaxed);
        record.down = counters.down.load(Ordering::Relaxed);
        record.quiet_ms = counters.quiet_ms();
        record.client_unix = matches!(self.client, End::Unix(_));
        record.pipes = [self.up.pipe.is_some(), self.down.pipe.is_some()];
        record
    }

    /// Its fds as [`Spliced::into_fds`] lays them out, borrowed.
    fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let mut fds = vec![self.client.fd(), self.origin.fd()];
        for pipe in [&self.up.pipe, &self.down.pipe].into_iter().flatten() {
            fds.extend([pipe.r.as_fd(), pipe.w.as_fd()]);
        }
        fds
    }

    /// Stashes the tunnel; not now (this generation does not serve yet, say): later.
    fn stash(&mut self, s: &mut Stashing, record: &TunnelRecord, counters: &Counters) {
        self.up.made = false;
        self.down.made = false;
        s.entry = s
            .stash
            .put(&Moved::Tunnel(self.record_now(record, counters)), &self.fds());
        s.timer = s.entry.is_none().then(|| Box::pin(tokio::time::sleep(s.stash.after())));
    }

    /// A tunnel that was stashed before it came here keeps its name; without a slot here it
    /// leaves the store.
    fn keep_stashed(
        &self,
        stash: &Stash,
        name: &str,
        record: &TunnelRecord,
        counters: &Counters,
    ) -> Option<Box<Entry>> {
        let kept = stash.keep(name, &Moved::Tunnel(self.record_now(record, counters)), &self.fds());
        if kept.is_none() {
            stash.forget(name);
        }
        kept
    }

    /// A stashed tunnel made a pipe: it goes into the store too, and the record says so.
    fn grow_stash(&mut self, s: &mut Stashing, record: &TunnelRecord, counters: &Counters) {
        let Some(entry) = s.entry.as_deref_mut() else { return };
        let made = [std::mem::take(&mut self.up.made), std::mem::take(&mut self.down.made)];
        let mut new = Vec::new();
        for (way, made) in [&self.up, &self.down].into_iter().zip(made) {
            if let (true, Some(pipe)) = (made, &way.pipe) {
                new.extend([pipe.r.as_fd(), pipe.w.as_fd()]);
            }
        }
        let record = Moved::Tunnel(self.record_now(record, counters));
        s.stash.grow(entry, &record, &self.fds(), &new);
    }

    /// Shuts both sockets down: systemd's copies in the store would keep them open.
    pub fn shut(&self) {
        stash::shut(self.client.fd());
        stash::shut(self.origin.fd());
    }

    /// Both directions at once; an error in either ends both (the other side would
    /// otherwise wait for a peer that is gone). One poll function over two [`OneWay`]s:
    /// each socket's reader and writer slots are each used by one direction, so no waiter
    /// is needed, and an idle tunnel's task holds only these few words.
    /// `Ok(false)`: a pipe was made and `watch` asks to hear of it (a stashed tunnel's pipes
    /// join it in the store).
    async fn splice_both(&mut self, counters: &Counters, watch: bool) -> io::Result<bool> {
        let Spliced {
            client,
            origin,
            up,
            down,
            pacers,
        } = self;
        std::future::poll_fn(|cx| {
            let (p_up, p_down) = each_way(pacers);
            let a = up.poll_move(cx, (client, origin), p_up, &counters.activity, &counters.up)?;
            let b = down.poll_move(cx, (origin, client), p_down, &counters.activity, &counters.down)?;
            if a.is_ready() && b.is_ready() {
                Poll::Ready(Ok(true))
            } else if watch && (up.made || down.made) {
                Poll::Ready(Ok(false))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// The origin's address, for a policy check.
    pub fn origin_addr(&self) -> io::Result<std::net::SocketAddr> {
        match &self.origin {
            End::Tcp(s) => s.peer_addr(),
            End::Unix(_) => Err(io::Error::other("the origin is not a TCP socket")),
        }
    }

    /// Gives the tunnel to the next generation (`Ok("moved")`); back on failure.
    /// A stashed tunnel's name goes with it: the successor keeps it in the store.
    async fn hand_over(
        self,
        h: Handover<'_>,
        counters: &Counters,
        mut stashing: Option<&mut Stashing>,
    ) -> Result<&'static str, Spliced> {
        let mut record = Box::new(self.record_now(&h.record, counters));
        record.stashed = stashing
            .as_ref()
            .and_then(|s| s.entry.as_ref())
            .map(|e| e.name().to_string());
        let mut stashed = stashing.as_mut().and_then(|s| s.entry.take());
        let fds = match self.into_fds() {
            Ok(fds) => fds,
            Err(e) => {
                warn!("cannot take a tunnel apart to move it: {e}");
                if let (Some(s), Some(e)) = (&h.stash, stashed.take()) {
                    s.remove(e);
                }
                return Ok("error");
            }
        };
        match h.migration.depart(&Moved::Tunnel(*record.clone()), fds).await {
            Ok(()) => {
                if let (Some(s), Some(e)) = (&h.stash, stashed.take()) {
                    s.release(e);
                }
                Ok("moved")
            }
            Err(fds) => match Spliced::from_fds(&record, fds) {
                Ok(kept) => {
                    // It stays: still stashed here.
                    if let Some(s) = stashing {
                        s.entry = stashed;
                    }
                    Err(kept)
                }
                Err(e) => {
                    warn!("cannot rebuild a tunnel that did not move: {e}");
                    Ok("error")
                }
            },
        }
    }

    /// client, origin, then each pipe's read and write end.
    fn into_fds(self) -> io::Result<Vec<OwnedFd>> {
        let mut fds = vec![self.client.into_fd()?, self.origin.into_fd()?];
        for pipe in [self.up.pipe, self.down.pipe].into_iter().flatten() {
            fds.extend([pipe.r, pipe.w]);
        }
        Ok(fds)
    }

    /// The tunnel as [`Spliced::into_fds`] laid it out, and `record` describes it. Bytes
    /// a pipe holds (read by the last generation, not yet written) go out first.
    pub fn from_fds(record: &TunnelRecord, fds: Vec<OwnedFd>) -> io::Result<Spliced> {
        let want = 2 + 2 * record.pipes.iter().filter(|p| **p).count();
        if fds.len() != want {
            return Err(io::Error::other(format!(
                "a tunnel has {} fds, its record says {want}",
                fds.len()
            )));
        }
        let mut fds = fds.into_iter();
        let mut next = || fds.next().ok_or_else(|| io::Error::other("fds ran out"));
        let client = End::from_fd(next()?, record.client_unix)?;
        let origin = End::from_fd(next()?, false)?;
        let mut way = |present: bool| -> io::Result<OneWay> {
            if !present {
                return Ok(OneWay::default());
            }
            let pipe = Pipe::from_fds(next()?, next()?);
            Ok(OneWay {
                in_pipe: pipe.queued()?,
                pipe: Some(pipe),
                made: false,
                done: false,
            })
        };
        let up = way(record.pipes[0])?;
        let down = way(record.pipes[1])?;
        Ok(Spliced {
            client,
            origin,
            up,
            down,
            pacers: None,
        })
    }
}

impl Relayed {
    fn ended(end: &'static str, relay: &'static str, counters: &Counters) -> Relayed {
        Relayed {
            outcome: Outcome {
                end,
                relay: Some(relay),
            },
            up: counters.up.load(Ordering::Relaxed),
            down: counters.down.load(Ordering::Relaxed),
        }
    }
}

fn end_of(e: &io::Error) -> &'static str {
    if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) {
        "reset"
    } else {
        "error"
    }
}

/// One end of a spliced tunnel.
enum End {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl End {
    fn poll_ready(&self, cx: &mut Context<'_>, interest: Interest) -> Poll<io::Result<()>> {
        match (self, interest.is_readable()) {
            (End::Tcp(s), true) => s.poll_read_ready(cx),
            (End::Tcp(s), false) => s.poll_write_ready(cx),
            (End::Unix(s), true) => s.poll_read_ready(cx),
            (End::Unix(s), false) => s.poll_write_ready(cx),
        }
    }

    /// `f` on the socket; a `WouldBlock` clears tokio's readiness for `interest`.
    fn try_io<R>(&self, interest: Interest, f: impl FnOnce() -> io::Result<R>) -> io::Result<R> {
        match self {
            End::Tcp(s) => s.try_io(interest, f),
            End::Unix(s) => s.try_io(interest, f),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            End::Tcp(s) => s.as_fd(),
            End::Unix(s) => s.as_fd(),
        }
    }

    fn into_fd(self) -> io::Result<OwnedFd> {
        Ok(match self {
            End::Tcp(s) => s.into_std()?.into(),
            End::Unix(s) => s.into_std()?.into(),
        })
    }

    /// Call it inside a tokio runtime: the socket is registered with its reactor. It is
    /// non-blocking already (the flag belongs to the open file description, which
    /// SCM_RIGHTS shares).
    fn from_fd(fd: OwnedFd, unix: bool) -> io::Result<End> {
        Ok(if unix {
            let s = std::os::unix::net::UnixStream::from(fd);
            End::Unix(UnixStream::from_std(s)?)
        } else {
            let s = std::net::TcpStream::from(fd);
            End::Tcp(TcpStream::from_std(s)?)
        })
    }
}

/// One direction of a spliced tunnel: from one socket through a pipe to the other. The pipe
/// is made when the first byte waits to move: an idle tunnel holds none.
#[derive(Default)]
struct OneWay {
    pipe: Option<Pipe>,
    /// Bytes in the pipe not yet passed on.
    in_pipe: usize,
    /// The pipe was made since the tunnel was last stashed.
    made: bool,
    /// The sender closed and everything was passed on (and the half-close too).
    done: bool,
}

const SPLICE: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

impl OneWay {
    /// Moves what can move now; `Ready(Ok)` once the sender closed and all was passed on.
    /// Bytes count as they leave `from`. The readiness polls take tokio's cooperative
    /// budget, so a busy tunnel yields. Under a bandwidth limit (`pacer`), each splice
    /// into the pipe moves what the buckets allow, and what it did not move goes back.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        (from, to): (&End, &End),
        mut pacer: Option<&mut Pacer>,
        activity: &AtomicU64,
        total: &AtomicU64,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(pipe) = self.pipe.as_ref().filter(|_| self.in_pipe > 0) {
                ready!(to.poll_ready(cx, Interest::WRITABLE))?;
                let n = self.in_pipe;
                match to.try_io(Interest::WRITABLE, || {
                    Ok(splice(pipe.r.as_fd(), None, to.fd(), None, n, SPLICE)?)
                }) {
                    Ok(m) => self.in_pipe -= m,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            ready!(from.poll_ready(cx, Interest::READABLE))?;
            let pipe = match &self.pipe {
                Some(pipe) => pipe,
                // Readiness can be stale (tokio takes an accepted socket for readable until a
                // read says otherwise): a peek says whether a byte, or the end, is there.
                None => match from.try_io(Interest::READABLE, || peek(from.fd())) {
                    Ok(0) => {
                        self.close(to);
                        continue;
                    }
                    Ok(_) => {
                        self.made = true;
                        self.pipe.insert(Pipe::new()?)
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                },
            };
            let (w, mut chunk) = (pipe.w.as_fd(), pipe.chunk);
            if let Some(p) = pacer.as_deref_mut() {
                chunk = ready!(p.poll_take(cx, chunk));
            }
            let spliced = from.try_io(Interest::READABLE, || {
                Ok(splice(from.fd(), None, w, None, chunk, SPLICE)?)
            });
            if let Some(p) = pacer.as_deref_mut() {
                p.give_back(chunk - spliced.as_ref().map_or(0, |n| *n));
            }
            match spliced {
                Ok(0) => self.close(to),
                Ok(n) => {
                    self.in_pipe = n;
                    total.fetch_add(n as u64, Ordering::Relaxed);
                    activity.store(now_ms(), Ordering::Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// The sender closed its side: the half-close is passed on, and the other way runs on.
    fn close(&mut self, to: &End) {
        let _ = nix::sys::socket::shutdown(to.fd().as_raw_fd(), nix::sys::socket::Shutdown::Write);
        self.done = true;
    }
}

/// A pipe between the two ends of one direction.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes moved per splice call: the pipe's size.
    chunk: usize,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let chunk = pipe_size(&w, true);
        Ok(Pipe { r, w, chunk })
    }

    fn from_fds(r: OwnedFd, w: OwnedFd) -> Pipe {
        let chunk = pipe_size(&w, false);
        Pipe { r, w, chunk }
    }

    /// The bytes sitting in the pipe (FIONREAD): after a move, what the last generation
    /// read but did not write yet.
    fn queued(&self) -> io::Result<usize> {
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which points at `n`.
        if unsafe { libc::ioctl(self.r.as_raw_fd(), libc::FIONREAD, &mut n) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n.max(0) as usize)
    }
}

/// The pipe's size, after asking for [`PIPE_SIZE`] when `grow` (a bigger pipe moves more
/// per syscall). The kernel refuses the size for a user past `fs.pipe-user-pages-soft` (and,
/// past it, makes new pipes a page or two): the pipe then works at whatever size it got.
fn pipe_size(pipe_w: &OwnedFd, grow: bool) -> usize {
    if grow
        && let Ok(n) = fcntl(pipe_w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
        && n > 0
    {
        return n as usize;
    }
    match fcntl(pipe_w, FcntlArg::F_GETPIPE_SZ) {
        Ok(n) if n > 0 => n as usize,
        _ => CHUNK,
    }
}

/// How many bytes wait to be read on a non-blocking socket, at most one (0: the end),
/// without taking them.
fn peek(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    Ok(nix::sys::socket::recv(
        fd.as_raw_fd(),
        &mut byte,
        nix::sys::socket::MsgFlags::MSG_PEEK,
    )?)
}

/// Writes `bytes` (if any) to `to`, counted in `total`.
async fn deliver<W: AsyncWrite + Unpin + ?Sized>(to: &mut W, bytes: &[u8], total: &AtomicU64) -> io::Result<()> {
    if !bytes.is_empty() {
        to.write_all(bytes).await?;
        total.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// A tunnel inside a TLS client connection to a plain origin socket: its early bytes
/// delivered, then relayed by [`TlsRelay`], which can move.
async fn tls_relayed(
    mut client: TlsClient,
    mut origin: TcpStream,
    early: Early,
    limits: Relay,
    counters: Counters,
    handover: Handover<'_>,
) -> Relayed {
    let Relay { idle, cut, throttle } = limits;
    let delivered = async {
        deliver(&mut origin, &early.to_origin, &counters.up).await?;
        deliver(&mut client, &early.to_client, &counters.down).await?;
        client.flush().await
    };
    if let Err(e) = delivered.await {
        return Relayed::ended(end_of(&e), "copy", &counters);
    }
    drop(early);
    TlsRelay::new(client, origin)
        .throttled(throttle)
        .run(idle, cut, counters, Some(handover))
        .await
}

/// A tunnel that cannot splice (the client's connection is not a plain socket): copied
/// through user-space buffers; it does not move at a handoff.
async fn copied(
    mut client: Box<dyn CopyIo>,
    mut origin: HopStream,
    early: Early,
    limits: Relay,
    counters: Counters,
) -> Relayed {
    let Relay { idle, cut, throttle } = limits;
    let delivered = async {
        deliver(&mut origin, &early.to_origin, &counters.up).await?;
        deliver(&mut client, &early.to_client, &counters.down).await
    };
    if let Err(e) = delivered.await {
        return Relayed::ended(end_of(&e), "copy", &counters);
    }
    let end = tokio::select! {
        r = copy_both(client, origin, &counters, throttle) => match r {
            Ok(()) => "closed",
            Err(e) => end_of(&e),
        },
        _ = idle_for(&counters.activity, idle) => "idle timeout",
        _ = cut.cancelled() => "cut at drain timeout",
    };
    Relayed::ended(end, "copy", &counters)
}

/// The buffered copy, counted as it goes, and paced under a bandwidth limit.
async fn copy_both<C: AsyncRead + AsyncWrite + Unpin>(
    client: C,
    origin: HopStream,
    counters: &Counters,
    throttle: Option<Throttle>,
) -> io::Result<()> {
    let mut client = Counting {
        io: client,
        activity: &counters.activity,
        total: &counters.up,
        pacer: throttle.clone().map(Pacer::new),
    };
    let mut origin = Counting {
        io: origin,
        activity: &counters.activity,
        total: &counters.down,
        pacer: throttle.map(Pacer::new),
    };
    tokio::io::copy_bidirectional_with_sizes(&mut client, &mut origin, CHUNK, CHUNK).await?;
    Ok(())
}

/// One end of a copied tunnel: the bytes read from it are counted, and mark the tunnel
/// active (so `idle` measures quiet time, not the tunnel's age).
struct Counting<'a, T> {
    io: T,
    activity: &'a AtomicU64,
    total: &'a AtomicU64,
    /// Under a bandwidth limit: a read takes no more than the buckets allow.
    pacer: Option<Pacer>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<'_, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(pacer) = this.pacer.as_mut().filter(|_| buf.remaining() > 0) {
            let allowed = ready!(pacer.poll_take(cx, buf.remaining()));
            let mut part = ReadBuf::new(buf.initialize_unfilled_to(allowed));
            let polled = Pin::new(&mut this.io).poll_read(cx, &mut part);
            let n = part.filled().len();
            buf.advance(n);
            pacer.give_back(allowed - n);
            this.count(n);
            return polled;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.count(n);
        polled
    }
}

impl<T> Counting<'_, T> {
    fn count(&self, n: usize) {
        if n > 0 {
            self.total.fetch_add(n as u64, Ordering::Relaxed);
            self.activity.store(now_ms(), Ordering::Relaxed);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counting<'_, T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A tunnel's part in the stash: where, its entry once stashed, the timer until then.
struct Stashing {
    stash: Arc<Stash>,
    entry: Option<Box<Entry>>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Stashing {
    /// With a stash: a tunnel stashed before it came here is kept under its name at once;
    /// another is stashed once it has lived `stash_after`.
    fn start(tunnel: &Spliced, h: &Handover<'_>, counters: &Counters) -> Option<Box<Stashing>> {
        let stash = h.stash.clone()?;
        let mut s = Box::new(Stashing {
            stash,
            entry: None,
            timer: None,
        });
        match h.record.stashed.as_deref() {
            Some(name) => s.entry = tunnel.keep_stashed(&s.stash, name, &h.record, counters),
            None => {
                let at = stash_due(h.record.started_ms, s.stash.after());
                s.timer = Some(Box::pin(tokio::time::sleep_until(at)));
            }
        }
        Some(s)
    }
}

/// When a tunnel that started at `started_ms` (Unix epoch) has lived `after`.
fn stash_due(started_ms: u64, after: Duration) -> tokio::time::Instant {
    let age = Duration::from_millis(TunnelRecord::now_ms().saturating_sub(started_ms));
    tokio::time::Instant::now() + after.saturating_sub(age)
}

/// A throttled tunnel's two pacers, one for each direction (up, down).
fn each_way(pacers: &mut Option<Box<[Pacer; 2]>>) -> (Option<&mut Pacer>, Option<&mut Pacer>) {
    match pacers.as_deref_mut() {
        Some([a, b]) => (Some(a), Some(b)),
        None => (None, None),
    }
}

/// Resolves once no byte has moved through the tunnel for `idle` (`activity`: when one last
/// did, on [`now_ms`]'s clock). It wakes once per `idle` while bytes move, not per byte.
async fn idle_for(activity: &AtomicU64, idle: Duration) {
    let idle = idle.as_millis() as u64;
    loop {
        let due = activity.load(Ordering::Relaxed).saturating_add(idle);
        let now = now_ms();
        if now >= due {
            return;
        }
        tokio::time::sleep(Duration::from_millis(due - now)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle tunnel costs its task (mostly this future) and its two sockets'
    /// registrations: it stays small (the target is 4 KiB all told). 1,352 bytes in a debug
    /// build when this was written: a movable tunnel carries the hand-over's futures, which
    /// the 872-byte task before tunnels moved did not (its record is boxed). 1,560 bytes once
    /// tunnels were stashed in systemd's fd store (the stash's state is one boxed word, but
    /// the timer's arm of the relay's `select!` and the hand-over's stash entry take room).
    #[tokio::test]
    async fn a_tunnel_task_is_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let origin = TcpStream::connect(addr).await.unwrap();
        let migration = Migration::default();
        let early = Early {
            to_origin: Vec::new(),
            to_client: bytes::Bytes::new(),
        };
        let handover = Handover {
            migration: &migration,
            record: Box::default(),
            stash: None,
        };
        let task = relay(
            TunnelClient::Socket(Stream::Tcp(client)),
            HopStream::Plain(origin),
            early,
            Relay {
                idle: Duration::from_secs(1),
                cut: CancellationToken::new(),
                throttle: None,
            },
            handover,
        );
        let size = std::mem::size_of_val(&task);
        eprintln!("the tunnel's relay future: {size} bytes");
        assert!(size <= 1600, "the tunnel's relay future is {size} bytes");
    }

    /// A copied tunnel (a TLS client's) is paced too: 2 MB at 1 MB/s, with one second's
    /// burst, take a second more; the same bytes with no limit take next to nothing.
    #[tokio::test]
    async fn the_copy_path_is_paced() {
        use tokio::io::AsyncReadExt;
        let text = "[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n[limits.per_client]\nbandwidth = 1000000\n";
        let config = crate::config::Config::parse(text, None).unwrap();
        let limits = crate::proxy::limits::Limits::new(&config.limits, None).unwrap();
        let peer = baton_handoff::Peer::Ip("127.0.0.1:1".parse().unwrap());
        for (throttle, least, most) in [(limits.throttle(&peer, None), 900, 1600), (None, 0, 500)] {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let mut client = TcpStream::connect(addr).await.unwrap();
            let (client_side, _) = listener.accept().await.unwrap();
            let mut origin = TcpStream::connect(addr).await.unwrap();
            let (origin_side, _) = listener.accept().await.unwrap();
            let migration = Migration::default();
            let early = Early {
                to_origin: Vec::new(),
                to_client: bytes::Bytes::new(),
            };
            let handover = Handover {
                migration: &migration,
                record: Box::default(),
                stash: None,
            };
            let limits = Relay {
                idle: Duration::from_secs(10),
                cut: CancellationToken::new(),
                throttle,
            };
            let start = std::time::Instant::now();
            let send = async {
                origin.write_all(&vec![7u8; 2_000_000]).await.unwrap();
                origin.shutdown().await.unwrap();
            };
            let receive = async {
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                let took = start.elapsed().as_millis();
                // The other way closes too: the tunnel ends.
                client.shutdown().await.unwrap();
                (got.len(), took)
            };
            let other = TunnelClient::Other(Box::new(client_side));
            let (relayed, (), (got, took)) = tokio::join!(
                relay(other, HopStream::Plain(origin_side), early, limits, handover),
                send,
                receive
            );
            assert_eq!((got, relayed.down), (2_000_000, 2_000_000));
            assert!((least..most).contains(&took), "{took} ms");
        }
    }
}
