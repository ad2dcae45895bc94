//! Relaying a CONNECT tunnel. When both ends are TCP sockets (the usual case) the bytes move
//! with splice(2) through a pipe per direction, never copied into user space (faster than a
//! buffered copy, docs/benchmarks.md); otherwise a buffered copy. A direction's pipe (two
//! fds) is made when its first byte waits to move, so an idle tunnel holds none. Either way:
//! half-close is passed on, an idle tunnel ends after `idle` (the activity is counted as
//! bytes move), and a drain deadline (`cut`) ends it at once. The access line says which
//! (`relay="splice"` or `"copy"`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use baton_handoff::{Peer, Stream};
use http::{Method, StatusCode, Uri};
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags, fcntl, splice};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::proxy::access::{AccessLine, Kind, Outcome};
use crate::proxy::metrics;

/// How a tunnel ended and relayed, with the bytes moved each way (client→origin,
/// origin→client).
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    pub outcome: Outcome,
    pub up: u64,
    pub down: u64,
}

/// A tunnel the service opened for a CONNECT it answered with a 2xx: the target's socket and
/// what its access line says.
#[derive(Debug)]
pub struct Accepted {
    pub origin: TcpStream,
    pub peer: Peer,
    /// The request target, owned (not a slice of hyper's read buffer).
    pub target: Uri,
    pub started: Instant,
}

/// Bytes moved per splice call with a default pipe (64 KiB), and the pipe size asked for.
const CHUNK: usize = 64 * 1024;
const PIPE_SIZE: usize = 256 * 1024;

/// Relays `accepted` over the client's `stream` (`early`: bytes the client sent behind its
/// CONNECT head), then writes its access line and metrics.
pub async fn serve(accepted: Accepted, stream: Stream, early: Vec<u8>, idle: Duration, cut: CancellationToken) {
    let Accepted {
        origin,
        peer,
        target,
        started,
    } = accepted;
    let Relayed { outcome, up, down } = relay(stream, early, origin, idle, cut).await;
    AccessLine::new(Kind::Tunnel, peer)
        .request(&Method::CONNECT, &target, StatusCode::OK)
        .traffic(up, down, started)
        .outcome(outcome)
        .write();
    metrics::request_done(&Method::CONNECT, StatusCode::OK, started, up, down, true);
}

/// Relays between the client's stream and the origin until both sides closed, either
/// failed, the tunnel idled for `idle`, or `cut` fired.
pub async fn relay(client: Stream, early: Vec<u8>, origin: TcpStream, idle: Duration, cut: CancellationToken) -> Relayed {
    let activity = AtomicU64::new(0);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let spliced = matches!(client, Stream::Tcp(_));
    let moving = async {
        let mut origin = origin;
        // Bytes the client sent right behind its CONNECT head (a TLS ClientHello, say).
        if !early.is_empty() {
            origin.write_all(&early).await?;
            up.fetch_add(early.len() as u64, Ordering::Relaxed);
        }
        drop(early);
        match client {
            Stream::Tcp(client) => splice_both(&client, &origin, &activity, &up, &down).await,
            Stream::Unix(client) => copy_both(client, origin, &activity, &up, &down).await,
        }
    };
    let end = tokio::select! {
        r = moving => match r {
            Ok(()) => "closed",
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => "reset",
            Err(_) => "error",
        },
        _ = idle_for(&activity, idle) => "idle timeout",
        _ = cut.cancelled() => "cut at drain timeout",
    };
    Relayed {
        outcome: Outcome {
            end,
            relay: Some(if spliced { "splice" } else { "copy" }),
        },
        up: up.load(Ordering::Relaxed),
        down: down.load(Ordering::Relaxed),
    }
}

/// Both directions at once; an error in either ends both (the other side would otherwise
/// wait for a peer that is gone).
async fn splice_both(
    client: &TcpStream,
    origin: &TcpStream,
    activity: &AtomicU64,
    up: &AtomicU64,
    down: &AtomicU64,
) -> io::Result<()> {
    let a = splice_one_way(client, origin, activity, up);
    let b = splice_one_way(origin, client, activity, down);
    tokio::pin!(a, b);
    tokio::select! {
        r = &mut a => { r?; b.await }
        r = &mut b => { r?; a.await }
    }
}

async fn splice_one_way(from: &TcpStream, to: &TcpStream, activity: &AtomicU64, total: &AtomicU64) -> io::Result<()> {
    // No pipe until a byte waits to move (or the sender closes): idle tunnels hold none.
    from.readable().await?;
    let (pipe_r, pipe_w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    let chunk = pipe_size(&pipe_w);
    let flags = SpliceFFlags::SPLICE_F_MOVE | SpliceFFlags::SPLICE_F_NONBLOCK;
    loop {
        let n = from
            .async_io(Interest::READABLE, || {
                Ok(splice(from.as_fd(), None, pipe_w.as_fd(), None, chunk, flags)?)
            })
            .await?;
        if n == 0 {
            // The sender closed its side: pass the half-close on and let the other way run.
            let _ = nix::sys::socket::shutdown(std::os::fd::AsRawFd::as_raw_fd(to), nix::sys::socket::Shutdown::Write);
            return Ok(());
        }
        let mut left = n;
        while left > 0 {
            left -= to
                .async_io(Interest::WRITABLE, || {
                    Ok(splice(pipe_r.as_fd(), None, to.as_fd(), None, left, flags)?)
                })
                .await?;
        }
        total.fetch_add(n as u64, Ordering::Relaxed);
        activity.fetch_add(1, Ordering::Relaxed);
    }
}

/// Asks for a [`PIPE_SIZE`] pipe (a bigger pipe moves more per syscall) and returns the size
/// the pipe has. The kernel refuses the size for a user past `fs.pipe-user-pages-soft` (and,
/// past it, makes new pipes a page or two): the pipe then works at whatever size it got.
fn pipe_size(pipe_w: &OwnedFd) -> usize {
    if let Ok(n) = fcntl(pipe_w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32))
        && n > 0
    {
        return n as usize;
    }
    match fcntl(pipe_w, FcntlArg::F_GETPIPE_SZ) {
        Ok(n) if n > 0 => n as usize,
        _ => CHUNK,
    }
}

/// The fallback for non-TCP clients (a Unix listener): a buffered copy, counted as it goes.
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
