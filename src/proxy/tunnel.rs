//! Relaying a CONNECT tunnel. When the client's connection is a plain socket (TCP or Unix)
//! the bytes move with splice(2) through a pipe per direction, never copied into user space
//! (faster than a buffered copy, docs/benchmarks.md; each pipe is two fds, made when its
//! direction's first byte arrives); otherwise a buffered copy. Either way: half-close is
//! passed on, an idle tunnel ends after `idle` (the activity is counted as bytes move), and
//! a drain deadline (`cut`) ends it at once. A spliced tunnel is nothing but fds, so at a
//! handoff it moves to the next generation ([`crate::proxy::migrate`]). The access line
//! says how it relayed (`relay="splice"` or `"copy"`).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use baton_handoff::Stream;
use bytes::Bytes;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::proxy::access::{Outcome, Sending};
use crate::proxy::framing::Framed;
use crate::proxy::migrate::{Migration, TunnelRecord};

/// How a tunnel ended and relayed, with the bytes moved each way (client→origin,
/// origin→client).
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    pub outcome: Outcome,
    pub up: u64,
    pub down: u64,
}

/// The client connection as hyper upgrades it.
type Client = TokioIo<Sending<Framed<Stream>>>;

/// Bytes moved per splice call with a default pipe (64 KiB), and the pipe size asked for.
const CHUNK: usize = 64 * 1024;
const PIPE_SIZE: usize = 256 * 1024;

/// How the relay is told to hand its tunnel over, and whom to give it to.
pub struct Handover<'a> {
    pub migration: &'a Migration,
    pub record: TunnelRecord,
}

/// Relays between the upgraded client connection and the origin until both sides closed,
/// either failed, the tunnel idled for `idle`, `cut` fired, or the tunnel moved to the next
/// generation (`handover`, for tunnels that splice). `from_origin`: bytes already read from
/// the origin side (behind a parent proxy's answer), delivered to the client first.
pub async fn relay(
    upgraded: Upgraded,
    origin: TcpStream,
    from_origin: Bytes,
    idle: Duration,
    cut: CancellationToken,
    handover: Handover<'_>,
) -> Relayed {
    let counters = Counters::default();
    let parts = match upgraded.downcast::<Client>() {
        Ok(parts) => parts,
        Err(upgraded) => {
            let mut client = TokioIo::new(upgraded);
            if let Err(e) = deliver(&mut client, &from_origin, &counters.down).await {
                return Relayed::ended(end_of(&e), "copy", &counters);
            }
            return copied(client, origin, idle, cut, counters).await;
        }
    };
    let mut origin = origin;
    let (client, held) = parts.io.into_inner().into_inner().into_parts();
    let mut client = match client {
        Stream::Tcp(s) => End::Tcp(s),
        Stream::Unix(s) => End::Unix(s),
    };
    // Bytes the client sent right behind its CONNECT head (a TLS ClientHello, say): those
    // hyper read, then those the framing held back; and the parent's early bytes.
    let early = async {
        deliver(&mut origin, &parts.read_buf, &counters.up).await?;
        deliver(&mut origin, &held, &counters.up).await?;
        match &mut client {
            End::Tcp(s) => deliver(s, &from_origin, &counters.down).await,
            End::Unix(s) => deliver(s, &from_origin, &counters.down).await,
        }
    };
    if let Err(e) = early.await {
        return Relayed::ended(end_of(&e), "splice", &counters);
    }
    let tunnel = Spliced::new(client, End::Tcp(origin));
    tunnel.run(idle, cut, counters, Some(handover)).await
}

/// Writes `bytes` (if any) to `to`, counted in `total`.
async fn deliver<W: AsyncWrite + Unpin>(to: &mut W, bytes: &[u8], total: &AtomicU64) -> io::Result<()> {
    if !bytes.is_empty() {
        to.write_all(bytes).await?;
        total.fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// A tunnel whose bytes move with splice(2): its two ends and, per direction, the pipe
/// the bytes pass through (made when the first byte arrives). All of it is fds, so it can
/// move to the next generation whole, bytes in the pipes included.
pub struct Spliced {
    client: End,
    origin: End,
    up: Option<Pipe>,
    down: Option<Pipe>,
}

/// Counts that outlive a hand-over: bytes each way (counted as they leave their sender,
/// so bytes sitting in a pipe are counted already) and an activity tick for the idle timer.
#[derive(Default)]
pub struct Counters {
    pub up: AtomicU64,
    pub down: AtomicU64,
    activity: AtomicU64,
}

impl Counters {
    /// A moved tunnel's counts go on from the last generation's.
    pub fn starting_at(up: u64, down: u64) -> Counters {
        Counters {
            up: AtomicU64::new(up),
            down: AtomicU64::new(down),
            activity: AtomicU64::new(0),
        }
    }
}

impl Spliced {
    fn new(client: End, origin: End) -> Spliced {
        Spliced {
            client,
            origin,
            up: None,
            down: None,
        }
    }

    /// Relays until the tunnel ends, or moves (once: a hand-over that fails is not retried;
    /// the tunnel relays on here).
    pub async fn run(
        mut self,
        idle: Duration,
        cut: CancellationToken,
        counters: Counters,
        mut handover: Option<Handover<'_>>,
    ) -> Relayed {
        loop {
            let requested = async {
                match &handover {
                    Some(h) => h.migration.requested().await,
                    None => std::future::pending().await,
                }
            };
            let end = tokio::select! {
                r = self.splice_both(&counters) => match r {
                    Ok(()) => "closed",
                    Err(e) => end_of(&e),
                },
                _ = idle_for(&counters.activity, idle) => "idle timeout",
                _ = cut.cancelled() => "cut at drain timeout",
                () = requested => {
                    let Some(h) = handover.take() else { continue };
                    match self.hand_over(h, &counters).await {
                        Ok(end) => end,
                        Err(kept) => {
                            self = kept;
                            continue;
                        }
                    }
                }
            };
            return Relayed::ended(end, "splice", &counters);
        }
    }

    /// Both directions at once; an error in either ends both (the other side would
    /// otherwise wait for a peer that is gone).
    async fn splice_both(&mut self, counters: &Counters) -> io::Result<()> {
        let a = splice_one_way(
            &self.client,
            &self.origin,
            &mut self.up,
            &counters.up,
            &counters.activity,
        );
        let b = splice_one_way(
            &self.origin,
            &self.client,
            &mut self.down,
            &counters.down,
            &counters.activity,
        );
        tokio::pin!(a, b);
        tokio::select! {
            r = &mut a => { r?; b.await }
            r = &mut b => { r?; a.await }
        }
    }

    /// The origin's address, for a policy check.
    pub fn origin_addr(&self) -> io::Result<std::net::SocketAddr> {
        match &self.origin {
            End::Tcp(s) => s.peer_addr(),
            End::Unix(_) => Err(io::Error::other("the origin is not a TCP socket")),
        }
    }

    /// Gives the tunnel to the next generation (`Ok("moved")`); back on failure.
    async fn hand_over(self, h: Handover<'_>, counters: &Counters) -> Result<&'static str, Spliced> {
        let mut record = h.record;
        record.up = counters.up.load(Ordering::Relaxed);
        record.down = counters.down.load(Ordering::Relaxed);
        record.client_unix = matches!(self.client, End::Unix(_));
        record.pipes = [self.up.is_some(), self.down.is_some()];
        let fds = match self.into_fds() {
            Ok(fds) => fds,
            Err(e) => {
                warn!("cannot take a tunnel apart to move it: {e}");
                return Ok("error");
            }
        };
        match h.migration.depart(record.encode(), fds).await {
            Ok(()) => Ok("moved"),
            Err(fds) => match Spliced::from_fds(&record, fds) {
                Ok(kept) => Err(kept),
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
        for pipe in [self.up, self.down].into_iter().flatten() {
            fds.extend([pipe.r, pipe.w]);
        }
        Ok(fds)
    }

    /// The tunnel as [`Spliced::into_fds`] laid it out, and `record` describes it.
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
        let mut pipe = |present: bool| -> io::Result<Option<Pipe>> {
            Ok(if present {
                Some(Pipe::from_fds(next()?, next()?))
            } else {
                None
            })
        };
        let up = pipe(record.pipes[0])?;
        let down = pipe(record.pipes[1])?;
        Ok(Spliced {
            client,
            origin,
            up,
            down,
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
    async fn io<R>(&self, interest: Interest, f: impl FnMut() -> io::Result<R>) -> io::Result<R> {
        match self {
            End::Tcp(s) => s.async_io(interest, f).await,
            End::Unix(s) => s.async_io(interest, f).await,
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

    /// Call it inside a tokio runtime: the socket is registered with its reactor.
    fn from_fd(fd: OwnedFd, unix: bool) -> io::Result<End> {
        Ok(if unix {
            let s = std::os::unix::net::UnixStream::from(fd);
            s.set_nonblocking(true)?;
            End::Unix(UnixStream::from_std(s)?)
        } else {
            let s = std::net::TcpStream::from(fd);
            s.set_nonblocking(true)?;
            End::Tcp(TcpStream::from_std(s)?)
        })
    }
}

/// A pipe between the two ends of one direction.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A bigger pipe moves more per syscall; if the limit refuses, 64 KiB still works.
        let _ = nix::fcntl::fcntl(&w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
        Ok(Pipe { r, w })
    }

    fn from_fds(r: OwnedFd, w: OwnedFd) -> Pipe {
        Pipe { r, w }
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

    fn capacity(&self) -> usize {
        match nix::fcntl::fcntl(&self.w, nix::fcntl::FcntlArg::F_GETPIPE_SZ) {
            Ok(n) if n > 0 => n as usize,
            _ => CHUNK,
        }
    }
}

/// Moves `from` → `to` through `pipe` until `from` closes. Bytes count as they leave
/// `from`; what a pipe held when the tunnel arrived goes out first.
async fn splice_one_way(
    from: &End,
    to: &End,
    pipe: &mut Option<Pipe>,
    total: &AtomicU64,
    activity: &AtomicU64,
) -> io::Result<()> {
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    if let Some(p) = pipe.as_ref() {
        flush_pipe(p, to, p.queued()?, flags).await?;
    }
    loop {
        // No pipe until the first byte (or the end) is there: an idle tunnel costs no pipe.
        if pipe.is_none() {
            from.io(Interest::READABLE, || peek(from.fd())).await?;
            *pipe = Some(Pipe::new()?);
        }
        let Some(p) = pipe.as_ref() else {
            unreachable!("made above")
        };
        let chunk = p.capacity();
        let n = from
            .io(Interest::READABLE, || {
                Ok(splice(from.fd(), None, p.w.as_fd(), None, chunk, flags)?)
            })
            .await?;
        if n == 0 {
            // The sender closed its side: pass the half-close on and let the other way run.
            let _ = nix::sys::socket::shutdown(to.fd().as_raw_fd(), nix::sys::socket::Shutdown::Write);
            return Ok(());
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
        activity.fetch_add(1, Ordering::Relaxed);
        flush_pipe(p, to, n, flags).await?;
    }
}

/// Whether a byte (or the end of the stream) is there to read, without taking it.
fn peek(fd: BorrowedFd<'_>) -> io::Result<()> {
    let mut byte = [0u8; 1];
    nix::sys::socket::recv(fd.as_raw_fd(), &mut byte, nix::sys::socket::MsgFlags::MSG_PEEK)?;
    Ok(())
}

/// Writes `n` bytes out of the pipe into `to`.
async fn flush_pipe(p: &Pipe, to: &End, n: usize, flags: SpliceFFlags) -> io::Result<()> {
    let mut left = n;
    while left > 0 {
        left -= to
            .io(Interest::WRITABLE, || {
                Ok(splice(p.r.as_fd(), None, to.fd(), None, left, flags)?)
            })
            .await?;
    }
    Ok(())
}

/// A tunnel that cannot splice (the client's connection is not a plain socket): copied
/// through user-space buffers; it does not move at a handoff.
async fn copied<C: AsyncRead + AsyncWrite + Unpin>(
    client: C,
    origin: TcpStream,
    idle: Duration,
    cut: CancellationToken,
    counters: Counters,
) -> Relayed {
    let end = tokio::select! {
        r = copy_both(client, origin, &counters.activity, &counters.up, &counters.down) => match r {
            Ok(()) => "closed",
            Err(e) => end_of(&e),
        },
        _ = idle_for(&counters.activity, idle) => "idle timeout",
        _ = cut.cancelled() => "cut at drain timeout",
    };
    Relayed::ended(end, "copy", &counters)
}

/// The buffered copy, counted as it goes.
async fn copy_both<C: AsyncRead + AsyncWrite + Unpin>(
    client: C,
    origin: TcpStream,
    activity: &AtomicU64,
    up: &AtomicU64,
    down: &AtomicU64,
) -> io::Result<()> {
    let mut client = Counting {
        io: client,
        activity,
        total: up,
    };
    let mut origin = Counting {
        io: origin,
        activity,
        total: down,
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
}

impl<T: AsyncRead + Unpin> AsyncRead for Counting<'_, T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.total.fetch_add(n as u64, Ordering::Relaxed);
            this.activity.fetch_add(1, Ordering::Relaxed);
        }
        polled
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

/// Resolves once no byte has moved through the tunnel for `idle`.
async fn idle_for(activity: &AtomicU64, idle: Duration) {
    let mut seen = activity.load(Ordering::Relaxed);
    loop {
        tokio::time::sleep(idle).await;
        let now = activity.load(Ordering::Relaxed);
        if now == seen {
            return;
        }
        seen = now;
    }
}
