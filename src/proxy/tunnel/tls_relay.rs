//! A tunnel inside a TLS connection to the proxy, to a plain origin socket: copied through
//! one buffer per direction, and movable at a handoff. To move, it stops reading, writes out
//! what its buffers hold, and, if rustls (or a resumed record layer) holds nothing either,
//! departs with its two sockets and the client connection's TLS record state
//! ([`crate::tls::moving`]). What cannot move relays on here and drains as before, counted
//! by reason.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{CHUNK, Counters, Handover, Relayed, end_of, idle_for, stream_from_fd, stream_into_fd};
use crate::proxy::limits::{Pacer, Throttle};
use crate::proxy::migrate::{Moved, TlsTunnelRecord, TunnelRecord};
use crate::tls::moving::{Refusal, Secrets, TlsClient};

/// How long a tunnel that is to move may take to write out what its buffers hold; past it
/// the tunnel stays (it drains).
const QUIET_WITHIN: Duration = Duration::from_secs(1);
/// A tunnel caught with bytes buffered in its TLS layer (a record half read: the client was
/// sending) relays on and tries again this often, for this long.
const RETRY_EVERY: Duration = Duration::from_millis(10);
const MOVE_PATIENCE: Duration = Duration::from_secs(1);

/// The tunnel: the client's TLS connection, the origin's socket, and each direction.
pub struct TlsRelay {
    client: TlsClient,
    origin: TcpStream,
    up: Leg,
    down: Leg,
    /// Each direction's pacer under a bandwidth limit (up, down).
    pacers: Option<Box<[Pacer; 2]>>,
}

/// One direction: bytes read from one side and not yet written to the other.
#[derive(Default)]
struct Leg {
    /// Made at the first read: an idle tunnel holds no buffer.
    buf: Vec<u8>,
    start: usize,
    end: usize,
    /// Written since the last flush.
    unflushed: bool,
    /// The sender closed; `done` once that was passed on.
    eof: bool,
    done: bool,
}

impl Leg {
    /// Moves bytes until the sender's end was passed on (`Ready(Ok)`), or, when not
    /// `reading`, until what the buffer held is written and flushed.
    #[allow(clippy::too_many_arguments)]
    fn poll_move<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
        reading: bool,
        pacer: Option<&mut Pacer>,
        counters: (&AtomicU64, &AtomicU64),
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let (activity, total) = counters;
        let mut pacer = pacer;
        loop {
            if self.start < self.end {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.buf[self.start..self.end]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.start += n;
                self.unflushed = true;
                continue;
            }
            if self.unflushed {
                ready!(Pin::new(&mut *to).poll_flush(cx))?;
                self.unflushed = false;
            }
            if self.done {
                return Poll::Ready(Ok(()));
            }
            if self.eof {
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if !reading {
                return Poll::Ready(Ok(()));
            }
            if self.buf.is_empty() {
                self.buf = vec![0; CHUNK];
            }
            let mut want = self.buf.len();
            if let Some(p) = pacer.as_deref_mut() {
                want = ready!(p.poll_take(cx, want));
            }
            let mut read = ReadBuf::new(&mut self.buf[..want]);
            let polled = Pin::new(&mut *from).poll_read(cx, &mut read);
            let n = read.filled().len();
            if let Some(p) = pacer.as_deref_mut() {
                p.give_back(want - n);
            }
            ready!(polled)?;
            if n == 0 {
                self.eof = true;
                continue;
            }
            (self.start, self.end) = (0, n);
            total.fetch_add(n as u64, Ordering::Relaxed);
            activity.store(super::now_ms(), Ordering::Relaxed);
        }
    }
}

impl TlsRelay {
    pub fn new(client: TlsClient, origin: TcpStream) -> TlsRelay {
        TlsRelay {
            client,
            origin,
            up: Leg::default(),
            down: Leg::default(),
            pacers: None,
        }
    }

    /// The tunnel under `throttle`'s buckets (both directions), if any.
    pub fn throttled(mut self, throttle: Option<Throttle>) -> TlsRelay {
        self.pacers = throttle.map(|t| Box::new([Pacer::new(t.clone()), Pacer::new(t)]));
        self
    }

    /// Both directions; `reading`: until both senders' ends were passed on, else until both
    /// buffers are written out.
    async fn copy(&mut self, counters: &Counters, reading: bool) -> io::Result<()> {
        let TlsRelay {
            client,
            origin,
            up,
            down,
            pacers,
        } = self;
        std::future::poll_fn(|cx| {
            let (p_up, p_down) = super::each_way(pacers);
            let a = up.poll_move(cx, client, origin, reading, p_up, (&counters.activity, &counters.up))?;
            let b = down.poll_move(
                cx,
                origin,
                client,
                reading,
                p_down,
                (&counters.activity, &counters.down),
            )?;
            if a.is_ready() && b.is_ready() {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Relays until the tunnel ends, or moves. A move that found bytes buffered (a record
    /// half read, plaintext unread) is tried again every [`RETRY_EVERY`] for
    /// [`MOVE_PATIENCE`]; any other failure, or the last try's, keeps the tunnel here.
    pub async fn run(
        mut self,
        idle: Duration,
        cut: CancellationToken,
        counters: Counters,
        mut handover: Option<Handover<'_>>,
    ) -> Relayed {
        let (mut first_try, mut next_try): (Option<Instant>, Option<Instant>) = (None, None);
        loop {
            let requested = async {
                match &handover {
                    Some(h) => {
                        h.migration.requested().await;
                        if let Some(at) = next_try {
                            tokio::time::sleep_until(at).await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            let end = tokio::select! {
                r = self.copy(&counters, true) => match r {
                    Ok(()) => "closed",
                    Err(e) => end_of(&e),
                },
                _ = idle_for(&counters.activity, idle) => "idle timeout",
                _ = cut.cancelled() => "cut at drain timeout",
                () = requested => {
                    let Some(h) = handover.as_ref() else { continue };
                    let last = first_try.get_or_insert_with(Instant::now).elapsed() >= MOVE_PATIENCE;
                    match Box::pin(self.hand_over(h, &counters, &cut, last)).await {
                        Ok(end) => end,
                        Err((kept, retry)) => {
                            self = *kept;
                            next_try = Some(Instant::now() + RETRY_EVERY);
                            if !retry {
                                handover = None;
                            }
                            continue;
                        }
                    }
                }
            };
            return Relayed::ended(end, "copy", &counters);
        }
    }

    /// Gives the tunnel to the next generation (`Ok("moved")`), or back to relay on here,
    /// and whether to try again (not on the `last` try; a reason that stays is counted).
    async fn hand_over(
        mut self,
        h: &Handover<'_>,
        counters: &Counters,
        cut: &CancellationToken,
        last: bool,
    ) -> Result<&'static str, (Box<TlsRelay>, bool)> {
        if self.up.eof || self.down.eof {
            // Half closed: the record has no room for it.
            h.migration.tls_stayed("closing");
            return Err((Box::new(self), false));
        }
        let quiet = tokio::select! {
            r = tokio::time::timeout(QUIET_WITHIN, self.copy(counters, false)) => r,
            () = cut.cancelled() => return Ok("cut at drain timeout"),
        };
        match quiet {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Ok(end_of(&e)),
            Err(_) => {
                h.migration.tls_stayed("busy");
                return Err((Box::new(self), false));
            }
        }
        let TlsRelay {
            client,
            origin,
            up,
            down,
            pacers,
        } = self;
        let (stream, secrets) = match client.take_apart() {
            Ok(apart) => apart,
            Err((kept, why)) => {
                let retry = !last && matches!(why, Refusal::Plaintext | Refusal::Ciphertext);
                if !retry {
                    h.migration.tls_stayed(why.label());
                }
                let Some(client) = kept else {
                    warn!("a TLS tunnel was lost taking it apart: {}", why.label());
                    return Ok("error");
                };
                debug!(retry, "a TLS tunnel did not move: {}", why.label());
                let relay = TlsRelay {
                    client,
                    origin,
                    up,
                    down,
                    pacers,
                };
                return Err((Box::new(relay), retry));
            }
        };
        depart(h, counters, stream, origin, secrets)
            .await
            .map_err(|kept| (kept, false))
    }
}

/// The tunnel's sockets and record on their way out; back as a relay if the successor did
/// not take them.
async fn depart(
    h: &Handover<'_>,
    counters: &Counters,
    stream: baton_handoff::Stream,
    origin: TcpStream,
    secrets: Secrets,
) -> Result<&'static str, Box<TlsRelay>> {
    let mut tunnel: TunnelRecord = (*h.record).clone();
    tunnel.up = counters.up.load(Ordering::Relaxed);
    tunnel.down = counters.down.load(Ordering::Relaxed);
    tunnel.quiet_ms = counters.quiet_ms();
    tunnel.pipes = [false, false];
    let fds = match (stream_into_fd(stream), origin.into_std()) {
        (Ok((client, unix)), Ok(origin)) => {
            tunnel.client_unix = unix;
            vec![client, origin.into()]
        }
        _ => {
            warn!("cannot take a TLS tunnel apart to move it");
            return Ok("error");
        }
    };
    let moved = Moved::TlsTunnel(TlsTunnelRecord { tunnel, tls: secrets });
    let Err(fds) = h.migration.depart(&moved, fds).await else {
        return Ok("moved");
    };
    let Moved::TlsTunnel(record) = moved else {
        return Ok("error");
    };
    match rebuild(&record.tunnel, fds, record.tls) {
        Ok(relay) => Err(Box::new(relay)),
        Err(e) => {
            warn!("cannot rebuild a TLS tunnel that did not move: {e}");
            Ok("error")
        }
    }
}

/// The tunnel from its two fds (the client's socket, the origin's) and the client
/// connection's record state: a moved one here, or one the successor did not take.
pub fn rebuild(record: &TunnelRecord, fds: Vec<std::os::fd::OwnedFd>, tls: Secrets) -> io::Result<TlsRelay> {
    if record.pipes != [false, false] {
        return Err(io::Error::other("a TLS tunnel's record names pipes"));
    }
    let [client, origin]: [std::os::fd::OwnedFd; 2] = fds
        .try_into()
        .map_err(|fds: Vec<_>| io::Error::other(format!("a TLS tunnel has {} fds, not 2", fds.len())))?;
    let client = stream_from_fd(client, record.client_unix)?;
    let client = TlsClient::resume(client, tls).map_err(io::Error::other)?;
    let origin = TcpStream::from_std(std::net::TcpStream::from(origin))?;
    Ok(TlsRelay::new(client, origin))
}

impl TlsRelay {
    /// The origin's address, for a policy check.
    pub fn origin_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.origin.peer_addr()
    }
}
