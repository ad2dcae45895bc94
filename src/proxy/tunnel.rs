//! Relaying a CONNECT tunnel. When both ends are TCP sockets (the usual case) the bytes move
//! with splice(2) through a pipe per direction, never copied into user space (faster than a
//! buffered copy, docs/benchmarks.md; it costs four pipe fds per tunnel); otherwise a
//! buffered copy. Either way: half-close is passed on, an idle tunnel ends after `idle`, and
//! a drain deadline (`cut`) ends it at once.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_handoff::Stream;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use nix::fcntl::{OFlag, SpliceFFlags, splice};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, Interest};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How a tunnel ended, with the bytes moved each way (client→origin, origin→client).
#[derive(Debug, Clone, Copy)]
pub struct Relayed {
    pub outcome: &'static str,
    pub up: u64,
    pub down: u64,
}

/// Bytes moved per splice call with a default pipe (64 KiB), and the pipe size asked for.
const CHUNK: usize = 64 * 1024;
const PIPE_SIZE: usize = 256 * 1024;

/// Relays between the upgraded client connection and the origin until both sides closed,
/// either failed, the tunnel idled for `idle`, or `cut` fired.
pub async fn relay(upgraded: Upgraded, origin: TcpStream, idle: Duration, cut: CancellationToken) -> Relayed {
    let activity = Arc::new(AtomicU64::new(0));
    let up = Arc::new(AtomicU64::new(0));
    let down = Arc::new(AtomicU64::new(0));
    let moving = async {
        // The client connection is the accepted `Stream` that hyper upgraded.
        match upgraded.downcast::<TokioIo<Stream>>() {
            Ok(parts) => {
                let mut origin = origin;
                // Bytes the client sent right behind its CONNECT head (a TLS ClientHello, say).
                if !parts.read_buf.is_empty() {
                    origin.write_all(&parts.read_buf).await?;
                    up.fetch_add(parts.read_buf.len() as u64, Ordering::Relaxed);
                }
                match parts.io.into_inner() {
                    Stream::Tcp(client) => splice_both(&client, &origin, &activity, &up, &down).await,
                    Stream::Unix(client) => copy_both(client, origin, &activity, &up, &down).await,
                }
            }
            Err(upgraded) => copy_both(TokioIo::new(upgraded), origin, &activity, &up, &down).await,
        }
    };
    let outcome = tokio::select! {
        r = moving => match r {
            Ok(()) => "closed",
            Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe) => "reset",
            Err(_) => "error",
        },
        _ = idle_for(&activity, idle) => "idle timeout",
        _ = cut.cancelled() => "cut at drain timeout",
    };
    Relayed {
        outcome,
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
    let (pipe_r, pipe_w): (OwnedFd, OwnedFd) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
    // A bigger pipe moves more per syscall; if the limit refuses, 64 KiB still works.
    let chunk = match nix::fcntl::fcntl(&pipe_w, nix::fcntl::FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32)) {
        Ok(n) if n > 0 => n as usize,
        _ => CHUNK,
    };
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

/// The fallback for non-TCP clients (a Unix listener): a buffered copy.
async fn copy_both<C: AsyncRead + AsyncWrite + Unpin>(
    mut client: C,
    mut origin: TcpStream,
    activity: &AtomicU64,
    up: &AtomicU64,
    down: &AtomicU64,
) -> io::Result<()> {
    let (u, d) = tokio::io::copy_bidirectional_with_sizes(&mut client, &mut origin, CHUNK, CHUNK).await?;
    up.fetch_add(u, Ordering::Relaxed);
    down.fetch_add(d, Ordering::Relaxed);
    activity.fetch_add(1, Ordering::Relaxed);
    Ok(())
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
