//! Relaying a CONNECT tunnel. When both ends are TCP sockets (the usual case) the bytes move
//! with splice(2) through a pipe per direction, never copied into user space (faster than a
//! buffered copy, docs/benchmarks.md); otherwise a buffered copy. A direction's pipe (two
//! fds) is made when its first byte waits to move, so an idle tunnel holds none. Either way:
//! half-close is passed on, an idle tunnel ends after `idle` (the activity is counted as
//! bytes move), and a drain deadline (`cut`) ends it at once. The access line says which
//! (`relay="splice"` or `"copy"`).

use std::future::Future;
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
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
/// CONNECT head), then writes its access line and metrics. A function returning an
/// `async move` block that uses what it captures in place, and [`relay`] borrows: an
/// `async fn` would keep a second copy of its arguments in every tunnel's task.
#[allow(clippy::manual_async_fn)] // see above
pub fn serve(
    mut accepted: Accepted,
    mut stream: Stream,
    mut early: Vec<u8>,
    idle: Duration,
    cut: CancellationToken,
) -> impl Future<Output = ()> {
    async move {
        let Relayed { outcome, up, down } = relay(&mut stream, &mut early, &mut accepted.origin, idle, &cut).await;
        AccessLine::new(Kind::Tunnel, accepted.peer)
            .request(&Method::CONNECT, &accepted.target, StatusCode::OK)
            .traffic(up, down, accepted.started)
            .outcome(outcome)
            .write();
        metrics::request_done(&Method::CONNECT, StatusCode::OK, accepted.started, up, down, true);
    }
}

/// Relays between the client's stream and the origin until both sides closed, either
/// failed, the tunnel idled for `idle`, or `cut` fired. `early` is sent first, then freed.
pub async fn relay(
    client: &mut Stream,
    early: &mut Vec<u8>,
    origin: &mut TcpStream,
    idle: Duration,
    cut: &CancellationToken,
) -> Relayed {
    let activity = AtomicU64::new(0);
    let up = AtomicU64::new(0);
    let down = AtomicU64::new(0);
    let spliced = matches!(client, Stream::Tcp(_));
    let moving = async {
        // Bytes the client sent right behind its CONNECT head (a TLS ClientHello, say).
        let early = std::mem::take(early);
        if !early.is_empty() {
            origin.write_all(&early).await?;
            up.fetch_add(early.len() as u64, Ordering::Relaxed);
        }
        drop(early);
        match client {
            Stream::Tcp(client) => splice_both(client, origin, &activity, &up, &down).await,
            // Boxed: Unix-socket clients are rare, and every tunnel's task would keep room
            // for the copy's state.
            Stream::Unix(client) => Box::pin(copy_both(client, origin, &activity, &up, &down)).await,
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
/// wait for a peer that is gone). One poll function over two [`OneWay`]s: each socket's
/// reader and writer slots are each used by one direction, so no waiter is needed, and an
/// idle tunnel's task holds only these few words.
async fn splice_both(
    client: &TcpStream,
    origin: &TcpStream,
    activity: &AtomicU64,
    up: &AtomicU64,
    down: &AtomicU64,
) -> io::Result<()> {
    let mut to_origin = OneWay::default();
    let mut to_client = OneWay::default();
    std::future::poll_fn(|cx| {
        let a = to_origin.poll_move(cx, client, origin, activity, up)?;
        let b = to_client.poll_move(cx, origin, client, activity, down)?;
        if a.is_ready() && b.is_ready() {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// One direction of a spliced tunnel: from one socket through a pipe to the other. The pipe
/// is made when the first byte waits to move: an idle tunnel holds none.
#[derive(Default)]
struct OneWay {
    pipe: Option<Pipe>,
    /// Bytes in the pipe not yet passed on.
    in_pipe: usize,
    /// The sender closed and everything was passed on (and the half-close too).
    done: bool,
}

struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    /// Bytes moved per splice call: the pipe's size.
    chunk: usize,
}

const SPLICE: SpliceFFlags = SpliceFFlags::SPLICE_F_MOVE.union(SpliceFFlags::SPLICE_F_NONBLOCK);

impl OneWay {
    /// Moves what can move now; `Ready(Ok)` once the sender closed and all was passed on.
    /// The readiness polls take tokio's cooperative budget, so a busy tunnel yields.
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        from: &TcpStream,
        to: &TcpStream,
        activity: &AtomicU64,
        total: &AtomicU64,
    ) -> Poll<io::Result<()>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if let Some(pipe) = self.pipe.as_ref().filter(|_| self.in_pipe > 0) {
                ready!(to.poll_write_ready(cx))?;
                let n = self.in_pipe;
                match to.try_io(Interest::WRITABLE, || {
                    Ok(splice(pipe.r.as_fd(), None, to.as_fd(), None, n, SPLICE)?)
                }) {
                    Ok(m) => {
                        self.in_pipe -= m;
                        total.fetch_add(m as u64, Ordering::Relaxed);
                        activity.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                continue;
            }
            ready!(from.poll_read_ready(cx))?;
            let pipe = match &self.pipe {
                Some(pipe) => pipe,
                // Readiness can be stale (tokio takes an accepted socket for readable until a
                // read says otherwise): a peek says whether a byte, or the end, is there.
                None => match from.try_io(Interest::READABLE, || peek(from.as_raw_fd())) {
                    Ok(0) => {
                        self.close(to);
                        continue;
                    }
                    Ok(_) => self.pipe.insert(Pipe::new()?),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Poll::Ready(Err(e)),
                },
            };
            let (w, chunk) = (pipe.w.as_fd(), pipe.chunk);
            match from.try_io(Interest::READABLE, || {
                Ok(splice(from.as_fd(), None, w, None, chunk, SPLICE)?)
            }) {
                Ok(0) => self.close(to),
                Ok(n) => self.in_pipe = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// The sender closed its side: the half-close is passed on, and the other way runs on.
    fn close(&mut self, to: &TcpStream) {
        let _ = nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write);
        self.done = true;
    }
}

impl Pipe {
    fn new() -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        let chunk = pipe_size(&w);
        Ok(Pipe { r, w, chunk })
    }
}

/// How many bytes wait to be read on a non-blocking socket, at most one (0: the end), without
/// taking them.
fn peek(fd: std::os::fd::RawFd) -> io::Result<usize> {
    let mut byte = [0u8; 1];
    Ok(nix::sys::socket::recv(
        fd,
        &mut byte,
        nix::sys::socket::MsgFlags::MSG_PEEK,
    )?)
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
async fn copy_both<C: AsyncRead + AsyncWrite + Unpin, O: AsyncRead + AsyncWrite + Unpin>(
    client: C,
    origin: O,
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

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle tunnel costs its task (this future) and its two sockets' registrations: it
    /// stays small (872 bytes when this was written; the target is 4 KiB all told).
    #[tokio::test]
    async fn a_tunnel_task_is_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let origin = TcpStream::connect(addr).await.unwrap();
        let accepted = Accepted {
            origin,
            peer: Peer::Ip(addr),
            target: Uri::from_static("127.0.0.1:443"),
            started: Instant::now(),
        };
        let task = serve(
            accepted,
            Stream::Tcp(client),
            Vec::new(),
            Duration::from_secs(1),
            CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 1024, "the tunnel task's future is {size} bytes");
    }
}
