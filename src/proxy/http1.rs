//! hyper's HTTP/1.1 server connection over a client stream, only while the client is busy.
//!
//! hyper's connection costs about 18 KiB from its first read to its end (an 8 KiB read
//! buffer, an 8 KiB write buffer it never shrinks, the box of the service future in flight,
//! the header map it caches; docs/benchmarks.md), and most client connections of a forward
//! proxy are idle most of the time. So none of it is kept while a client is idle:
//!
//! - a [`Stretch`] is hyper's connection built when the socket is readable;
//! - once it is at rest ([`RequestSignal::at_rest`]: every request answered, the framing
//!   between requests, hyper's write buffer flushed, its last read blocked) for `linger`, it
//!   asks hyper to close its idle state (`graceful_shutdown`, which on an idle connection
//!   closes at once without writing anything), polls it to its end without shutting the
//!   stream (`poll_without_shutdown`) and takes it apart (`into_parts`);
//! - what is left is a [`Parked`] connection: the bare stream and the bytes hyper had read
//!   but not parsed. It is served again by a new [`Stretch`]. On a plain socket its fd and
//!   those bytes are all of it, so it could as well be handed to another process (a
//!   successor generation); a TLS connection adds its TLS record state ([`ClientIo::take_apart`]).
//!
//! A stretch also ends when hyper ends the connection itself ([`Ended::Done`]: the client
//! closed, `Connection: close`, or a CONNECT answered 2xx, whose stream becomes the tunnel's).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use baton_handoff::{Drain, Stream};
use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::server::conn::http1;
use hyper::service::HttpService;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use crate::proxy::access::{Sending, Sent};
use crate::proxy::framing::{Framed, RequestSignal};
use crate::proxy::tunnel::{TunnelClient, stream_from_fd, stream_into_fd};
use crate::tls::moving::{Secrets, TlsClient};

/// A client connection's stream, as a connection parks and serves it: a plain socket, or
/// TLS over one.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + Sync + Sized + 'static {
    /// Resolves once a read would not block, without reading (see [`Stream::readable`]).
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Closes a stream hyper ended without shutting it down: a FIN, as hyper would, then,
    /// when the client may still be sending (`pipelined`: it sent bytes past the last
    /// request, or bytes wait in the socket), a lingering close ([`linger`]) on a task of
    /// the drain's, so that a generation does not exit (and reset the socket) while it
    /// lingers; the drain deadline ends it. nginx's `lingering_close on` asks the same.
    fn close(self, pipelined: bool, drain: &Drain);

    /// The stream as a CONNECT's tunnel relays it.
    fn into_tunnel(self) -> TunnelClient;

    /// Whether it is a TLS connection (its move is counted apart, by reason, when it stays).
    const TLS: bool;

    /// The connection taken apart to move to another process, at rest; else the
    /// connection back (`None`: it could not be kept either) and why it stays.
    fn take_apart(self) -> Result<Apart, (Option<Self>, &'static str)>;

    /// The socket, borrowed, when it can be kept in systemd's fd store (`proxy::stash`).
    fn stash_fd(&self) -> Option<BorrowedFd<'_>>;

    /// A connection [`ClientIo::take_apart`] gave (here or in another process), in this
    /// runtime. The socket is non-blocking already: the flag belongs to the open file
    /// description, which SCM_RIGHTS shares (no syscalls to set it again, for each of
    /// thousands at a handoff).
    fn put_together(apart: Apart) -> io::Result<Self>;
}

/// A client connection taken apart to move: its socket, whether that is a Unix socket, and
/// a TLS connection's record state.
pub struct Apart {
    pub fd: OwnedFd,
    pub unix: bool,
    pub tls: Option<Secrets>,
}

impl ClientIo for Stream {
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Stream::poll_readable(self, cx)
    }

    fn close(self, pipelined: bool, drain: &Drain) {
        // Fails only on a stream already gone.
        let _ = self.shutdown_write();
        if pipelined || self.has_unread_bytes() {
            drain.connections().spawn(linger(self, drain.cut_token()));
        }
    }

    fn into_tunnel(self) -> TunnelClient {
        TunnelClient::Socket(self)
    }

    const TLS: bool = false;

    fn stash_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        })
    }

    fn take_apart(self) -> Result<Apart, (Option<Self>, &'static str)> {
        let (fd, unix) = stream_into_fd(self).map_err(|_| (None, "error"))?;
        Ok(Apart { fd, unix, tls: None })
    }

    fn put_together(apart: Apart) -> io::Result<Stream> {
        stream_from_fd(apart.fd, apart.unix)
    }
}

impl ClientIo for TlsClient {
    /// Readable at once when rustls holds plaintext nobody read (a client's first request
    /// often arrives with its last handshake flight, and is decrypted with it) or a
    /// close_notify: it does not want the socket read then. Otherwise the socket's
    /// readiness (a partial record completes only with more bytes on the socket).
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        TlsClient::poll_readable(self, cx)
    }

    fn close(mut self, _pipelined: bool, drain: &Drain) {
        // close_notify, then the FIN, bounded; then what the client still sends is read and
        // discarded on the socket (records after our close_notify mean nothing to us).
        let cut = drain.cut_token();
        drain.connections().spawn(async move {
            let shut = tokio::time::timeout(Duration::from_secs(5), self.shutdown());
            tokio::select! {
                _ = shut => {}
                () = cut.cancelled() => return,
            }
            linger(self.into_socket(), cut).await;
        });
    }

    fn into_tunnel(self) -> TunnelClient {
        TunnelClient::Tls(self)
    }

    const TLS: bool = true;

    /// Its record state changes with every record: a TLS connection is not stashed.
    fn stash_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    /// At rest, rustls's record state moves with the socket (`tls::moving`); what it cannot
    /// hand over keeps the connection here, and says why.
    fn take_apart(self) -> Result<Apart, (Option<Self>, &'static str)> {
        let (stream, secrets) = TlsClient::take_apart(self).map_err(|(c, why)| (c, why.label()))?;
        let (fd, unix) = stream_into_fd(stream).map_err(|_| (None, "error"))?;
        Ok(Apart {
            fd,
            unix,
            tls: Some(secrets),
        })
    }

    fn put_together(apart: Apart) -> io::Result<TlsClient> {
        let stream = stream_from_fd(apart.fd, apart.unix)?;
        let secrets = apart
            .tls
            .ok_or_else(|| io::Error::other("a TLS connection without its record state"))?;
        TlsClient::resume(stream, secrets).map_err(io::Error::other)
    }
}

/// How long a closing connection is read at most, in all, between two reads, and in bytes
/// (nginx's `lingering_time` and `lingering_timeout` are 30 s and 5 s; shorter here, as a
/// lingering socket holds an fd outside the connection limit).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_READ: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;

/// The close RFC 9112 §9.6 asks of a server that closes with requests possibly unread (a
/// pipelining client, or one writing its next request while the answer with
/// `Connection: close` is on its way): the write side is already shut, and what the client
/// still sends is read and discarded until it closes too, or for a bounded time and number
/// of bytes. Closing a socket with unread bytes sends a reset, and a reset that arrives
/// before the client read the last answer makes its TCP stack drop that answer.
async fn linger(mut stream: Stream, cut: CancellationToken) {
    let deadline = Instant::now() + LINGER_TIME;
    let mut discarded = 0;
    let mut buf = [0u8; 2048];
    while discarded < LINGER_BYTES {
        let until = deadline.min(Instant::now() + LINGER_READ);
        let read = tokio::select! {
            r = tokio::time::timeout_at(until, stream.read(&mut buf)) => r,
            () = cut.cancelled() => return,
        };
        match read {
            Ok(Ok(n)) if n > 0 => discarded += n,
            _ => return,
        }
    }
}

/// The stream as hyper reads and writes it.
pub type Io<T> = TokioIo<Sending<Framed<T>>>;

/// A client connection between requests: no HTTP state, no buffer, only the stream and the
/// bytes read from it that no request has used yet.
#[derive(Debug)]
pub struct Parked<T> {
    pub stream: T,
    /// Read before the stream. Never a slice of hyper's read buffer (that would keep all
    /// 8 KiB of it): copied out, and usually empty (then no allocation).
    pub unread: Box<[u8]>,
}

impl<T: ClientIo> Parked<T> {
    pub fn new(stream: T) -> Parked<T> {
        Parked {
            stream,
            unread: Box::default(),
        }
    }

    /// hyper's parts: the stream, and what hyper and the framing read past the last request.
    fn from_parts(io: Io<T>, read_buf: &Bytes) -> Parked<T> {
        let (stream, held) = io.into_inner().into_inner().into_parts();
        let unread = [&read_buf[..], &held[..]].concat().into_boxed_slice();
        Parked { stream, unread }
    }

    /// Empty lines between requests mean nothing (RFC 9112 §2.2): dropped, so that a client
    /// that sent one is parked with nothing unread.
    fn drop_empty_lines(&mut self) {
        let lines = self.unread.iter().take_while(|b| matches!(b, b'\r' | b'\n')).count();
        if lines > 0 {
            self.unread = self.unread[lines..].into();
        }
    }

    /// The stream and its unread bytes, to be served elsewhere.
    pub fn into_parts(self) -> (T, Vec<u8>) {
        (self.stream, self.unread.into_vec())
    }
}

/// How a [`Stretch`] ended.
#[derive(Debug)]
pub enum Ended<T> {
    /// The client went idle: hyper was taken apart. `since`: when it came to rest (the start
    /// of the idle time).
    Rest { parked: Parked<T>, since: Instant },
    /// hyper ended the connection itself, without shutting the stream down: the client
    /// closed its side, a response closed the connection, or a CONNECT was answered with a
    /// 2xx (then the stream is the tunnel's, `unread` its first bytes).
    Done(Parked<T>),
    /// hyper failed (a malformed head, a timeout, an I/O error): the stream is gone.
    Failed(hyper::Error),
}

/// hyper's connection for one busy stretch of a client connection, and the timer that ends
/// its linger at rest, both boxed: the task of a parked connection keeps none of their space.
pub struct Stretch<T, S: HttpService<Incoming>> {
    /// `None` once it ended.
    conn: Option<Box<http1::Connection<Io<T>, S>>>,
    timer: Pin<Box<Sleep>>,
    signal: Arc<RequestSignal>,
    /// Since when the connection has been at rest, and how many requests had started then.
    rest: Option<(u64, Instant)>,
    /// hyper was asked to close at rest; requests started at that moment.
    resting: Option<u64>,
    /// hyper closed the connection with bytes still in its write buffer: it is polled as a
    /// future now, which flushes them and shuts the stream down.
    finishing: bool,
}

impl<T, S, B> Stretch<T, S>
where
    T: ClientIo,
    S: HttpService<Incoming, ResBody = B> + Unpin,
    S::Future: Unpin,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    /// Serves `parked` with `service`; `signal` is the one the service starts requests on,
    /// `sent` counts what is written.
    pub fn new(
        http: &http1::Builder,
        parked: Parked<T>,
        signal: Arc<RequestSignal>,
        sent: Arc<Sent>,
        max_head: usize,
        service: S,
    ) -> Self {
        let framed = Framed::resume(parked.stream, parked.unread.into_vec(), signal.clone(), max_head);
        let io = TokioIo::new(Sending::new(framed, sent));
        Stretch {
            conn: Some(Box::new(http.serve_connection(io, service))),
            timer: Box::pin(tokio::time::sleep(Duration::ZERO)),
            signal,
            rest: None,
            resting: None,
            finishing: false,
        }
    }

    pub fn signal(&self) -> &RequestSignal {
        &self.signal
    }

    /// Ends the connection after the exchange in flight (its response says
    /// `Connection: close`), or at once if there is none.
    pub fn close_after_current(&mut self) {
        if let Some(conn) = self.conn.as_mut() {
            Pin::new(&mut **conn).graceful_shutdown();
        }
    }

    /// Serves until the connection ends or has been at rest for `linger` (then it is taken
    /// apart). The stretch's timer wakes the task when `linger` ends: it is reset at most once
    /// per `linger`, however many requests come and go meanwhile.
    pub fn poll_serve(&mut self, cx: &mut Context<'_>, linger: Duration) -> Poll<Ended<T>> {
        loop {
            let Some(mut conn) = self.conn.take() else {
                return Poll::Pending; // ended: never polled again
            };
            let polled = if self.finishing {
                Pin::new(&mut *conn).poll(cx)
            } else {
                conn.poll_without_shutdown(cx)
            };
            match polled {
                Poll::Ready(Err(e)) => return Poll::Ready(Ended::Failed(e)),
                Poll::Ready(Ok(())) if self.must_finish() => {
                    self.finishing = true;
                    self.conn = Some(conn);
                    continue;
                }
                Poll::Ready(Ok(())) => return Poll::Ready(self.ended(*conn)),
                Poll::Pending => self.conn = Some(conn),
            }
            if !self.signal.at_rest() {
                self.rest = None;
                return Poll::Pending;
            }
            if self.resting.is_some() {
                // hyper was not idle after all: the exchange ends with `Connection: close`.
                return Poll::Pending;
            }
            let started = self.signal.started();
            let now = Instant::now();
            let since = match self.rest {
                Some((n, t)) if n == started => t,
                _ => {
                    self.rest = Some((started, now));
                    now
                }
            };
            let due = since + linger;
            if now >= due {
                self.resting = Some(started);
                self.close_after_current();
                continue;
            }
            let timer = self.timer.as_mut();
            if timer.deadline() <= now || timer.deadline() > due {
                self.timer.as_mut().reset(due);
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
        }
    }

    /// `poll_without_shutdown` ends as soon as hyper's state is done, whether or not its
    /// write buffer was flushed, and `into_parts` drops what is left in it. When hyper ended
    /// with bytes left (it closed the connection after a large response to a slow reader,
    /// say), it is polled on as a future: that flushes them, then shuts the stream down.
    /// (At rest nothing is left: that was checked. A tunnel's answer is checked by its
    /// caller.)
    fn must_finish(&self) -> bool {
        !self.finishing && !self.signal.tunnel() && !self.signal.flushed()
    }

    fn ended(&self, conn: http1::Connection<Io<T>, S>) -> Ended<T> {
        let parts = conn.into_parts();
        let mut parked = Parked::from_parts(parts.io, &parts.read_buf);
        match (self.resting, self.rest) {
            (Some(started), Some((_, since))) if started == self.signal.started() => {
                parked.drop_empty_lines();
                Ended::Rest { parked, since }
            }
            _ => Ended::Done(parked),
        }
    }
}

/// A response body that tells the [`RequestSignal`] when hyper drops it: written whole, or
/// abandoned with its connection.
pub struct Tracked<B> {
    inner: B,
    signal: Arc<RequestSignal>,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, signal: Arc<RequestSignal>) -> Tracked<B> {
        Tracked { inner, signal }
    }
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        self.signal.finish();
    }
}
