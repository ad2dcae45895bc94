//! The access log: one line per answered request, refusal, tunnel, or connection hyper
//! closed itself, all written by [`AccessLine::write`] under the target [`ACCESS_TARGET`]
//! (the daemon's logging sends that target to its own sink). As text or JSON the fields keep
//! one order, and a field without a value is left out.
//!
//! In Squid's native format (`access_format = "squid"`, laid out by [`squid`]) a line logs
//! the bytes written to the client, status line and header included, as Squid does. Each
//! client connection counts them ([`Sent`], through the [`Sending`] stream hyper writes to),
//! and the line of an answer waits until the answer has been written.

mod squid;

use std::borrow::Cow;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use baton_handoff::Peer;
use http::{HeaderValue, Method, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tracing::{info, warn};

use squid::Code;

use crate::proxy::target::Redacted;

/// The `tracing` target of access lines.
pub const ACCESS_TARGET: &str = "baton::access";

/// Whether lines are in Squid's format: one setting for the whole process, like the
/// `tracing` subscriber the lines go to.
static SQUID: AtomicBool = AtomicBool::new(false);

/// Writes access lines in Squid's native format from now on (called once by the logging
/// setup, before anything is served).
pub fn use_squid_format() {
    SQUID.store(true, Ordering::Relaxed);
}

/// Whether access lines are in Squid's format; what only that format logs (the answer's
/// content type) is collected only then.
pub fn squid_format() -> bool {
    SQUID.load(Ordering::Relaxed)
}

/// What the line is about; it sets the message and the level (refusals are warnings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request forwarded to its origin, logged when its response body ended.
    Request,
    /// A CONNECT tunnel, logged when it ended.
    Tunnel,
    /// Answered by the proxy with an error status.
    Refused,
    /// Refused by a policy rule.
    Denied,
    /// Closed without an answer (the request head did not arrive in time).
    Closed,
}

/// One access line. Build it with [`AccessLine::new`] and the setters, then write it.
#[derive(Debug)]
pub struct AccessLine {
    kind: Kind,
    client: Peer,
    method: Option<Method>,
    target: Option<Uri>,
    status: Option<u16>,
    rule: Option<&'static str>,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
    /// When the request started; the line's `ms` is computed only if the line is written.
    started: Option<Instant>,
    complete: Option<bool>,
    outcome: Option<&'static str>,
    relay: Option<&'static str>,
    reason: Option<Cow<'static, str>>,
    /// `h2` for a stream of an HTTP/2 connection; HTTP/1.1 goes unsaid.
    proto: Option<&'static str>,
    /// The parent proxy the request or tunnel went through (`host:port` as configured).
    parent: Option<Arc<str>>,
    squid: SquidPart,
}

/// What only the Squid line shows, and the byte count it takes its bytes from.
#[derive(Debug, Default)]
struct SquidPart {
    user: Option<String>,
    server: Option<IpAddr>,
    via_parent: bool,
    content_type: Option<HeaderValue>,
    sent: Option<Arc<Sent>>,
    /// Bytes written to the client, when the line knows them itself (a tunnel's).
    wire: Option<u64>,
}

/// How a tunnel ended (`outcome`), and how its bytes moved (`relay`: `splice` or `copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub end: &'static str,
    pub relay: Option<&'static str>,
}

impl From<&'static str> for Outcome {
    fn from(end: &'static str) -> Outcome {
        Outcome { end, relay: None }
    }
}

impl AccessLine {
    pub fn new(kind: Kind, client: Peer) -> AccessLine {
        AccessLine {
            kind,
            client,
            method: None,
            target: None,
            status: None,
            rule: None,
            bytes_in: None,
            bytes_out: None,
            started: None,
            complete: None,
            outcome: None,
            relay: None,
            reason: None,
            proto: None,
            parent: None,
            squid: SquidPart::default(),
        }
    }

    /// The request as the client sent it, and its answer's status.
    pub fn request(mut self, method: Method, target: Uri, status: StatusCode) -> Self {
        (self.method, self.target, self.status) = (Some(method), Some(target), Some(status.as_u16()));
        self
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = Some(status.as_u16());
        self
    }

    /// Bytes received from and sent to the client (bodies or tunnel payload), and the time
    /// since the request started.
    pub fn traffic(mut self, bytes_in: u64, bytes_out: u64, started: Instant) -> Self {
        (self.bytes_in, self.bytes_out) = (Some(bytes_in), Some(bytes_out));
        self.started = Some(started);
        self
    }

    pub fn rule(mut self, rule: &'static str) -> Self {
        self.rule = Some(rule);
        self
    }

    /// The rule that allowed the request, if the line knows it.
    /// The client's protocol, from its request's version: only HTTP/2 is said.
    pub fn proto_of(mut self, version: http::Version) -> Self {
        self.proto = (version == http::Version::HTTP_2).then_some("h2");
        self
    }

    pub fn rule_of(mut self, rule: Option<&'static str>) -> Self {
        if rule.is_some() {
            self.rule = rule;
        }
        self
    }

    /// Whether the response body reached its end (else the client or the origin left).
    pub fn complete(mut self, complete: bool) -> Self {
        self.complete = Some(complete);
        self
    }

    /// How a tunnel ended (and how it relayed, when known).
    pub fn outcome(mut self, outcome: impl Into<Outcome>) -> Self {
        let Outcome { end, relay } = outcome.into();
        (self.outcome, self.relay) = (Some(end), relay);
        self
    }

    pub fn reason(mut self, reason: impl Into<Cow<'static, str>>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// The client connection's byte count: a Squid line takes its bytes from it.
    pub fn sent(mut self, sent: Arc<Sent>) -> Self {
        // A multiplexed connection's count is no one stream's: the line takes its body's.
        if !sent.multiplexed {
            self.squid.sent = Some(sent);
        }
        self
    }

    /// Squid line only: the authenticated user.
    pub fn user(mut self, user: Option<String>) -> Self {
        self.squid.user = user;
        self
    }

    /// Squid line only: the address baton connected to for the client.
    pub fn server(mut self, server: Option<IpAddr>) -> Self {
        self.squid.server = server;
        self
    }

    /// The parent proxy the request went through, if any: `parent=` in the fields, and the
    /// Squid line's `FIRSTUP_PARENT` (not `HIER_DIRECT`).
    pub fn parent(mut self, parent: Option<Arc<str>>) -> Self {
        self.squid.via_parent = parent.is_some();
        self.parent = parent;
        self
    }

    /// Squid line only: the answer's `Content-Type`.
    pub fn content_type(mut self, value: Option<HeaderValue>) -> Self {
        self.squid.content_type = value;
        self
    }

    /// Squid line only: the bytes written to the client, when the caller counted them (a
    /// tunnel: its `200` answer and the payload).
    pub fn wire(mut self, bytes: u64) -> Self {
        self.squid.wire = Some(bytes);
        self
    }

    /// Writes the line. In Squid's format the line of an answer (a response, a refusal)
    /// waits in the connection's [`Sent`] until the answer has been written.
    pub fn write(mut self) {
        if !squid_format() {
            return self.write_fields();
        }
        let answer = matches!(self.kind, Kind::Request | Kind::Refused | Kind::Denied);
        match (self.squid.sent.take(), self.squid.wire) {
            (Some(sent), None) if answer => sent.hold(self),
            (Some(sent), None) => self.write_squid(sent.take()),
            (_, wire) => {
                let bytes = wire.or(self.bytes_out).unwrap_or(0);
                self.write_squid(bytes);
            }
        }
    }

    fn write_fields(&self) {
        let method = self.method.as_ref().map(tracing::field::display);
        let target = self.target.as_ref().map(|t| tracing::field::display(Redacted(t)));
        let reason = self.reason.as_deref();
        macro_rules! line {
            ($level:ident, $message:literal) => {
                $level!(
                    target: "baton::access",
                    client = %self.client,
                    user = self.squid.user.as_deref(),
                    method,
                    target,
                    proto = self.proto,
                    parent = self.parent.as_deref(),
                    status = self.status,
                    rule = self.rule,
                    bytes_in = self.bytes_in,
                    bytes_out = self.bytes_out,
                    ms = self.started.map(|s| s.elapsed().as_millis() as u64),
                    complete = self.complete,
                    outcome = self.outcome,
                    relay = self.relay,
                    reason,
                    $message
                )
            };
        }
        match self.kind {
            Kind::Request => line!(info, "request"),
            Kind::Tunnel => line!(info, "tunnel"),
            Kind::Refused => line!(warn, "refused"),
            Kind::Denied => line!(warn, "denied"),
            Kind::Closed => line!(info, "closed"),
        }
    }

    /// The Squid line, `bytes` being what was written to the client for it.
    fn write_squid(&self, bytes: u64) {
        let (code, aborted) = self.squid_code();
        let entry = squid::Entry {
            at: SystemTime::now(),
            elapsed_ms: self.started.map_or(0, |s| s.elapsed().as_millis() as u64),
            client: match self.client {
                Peer::Ip(a) => Some(a.ip()),
                Peer::Local => None,
            },
            code,
            aborted,
            status: self.status.unwrap_or(0),
            bytes,
            method: self.method.as_ref(),
            url: self.target.as_ref().ok_or_else(|| self.why_no_url()),
            user: self.squid.user.as_deref(),
            server: self.squid.server,
            via_parent: self.squid.via_parent,
            content_type: self.squid.content_type.as_ref().map(HeaderValue::as_bytes),
        };
        match self.kind {
            Kind::Refused | Kind::Denied => warn!(target: "baton::access", "{entry}"),
            Kind::Request | Kind::Tunnel | Kind::Closed => info!(target: "baton::access", "{entry}"),
        }
    }

    /// Squid's result code, and whether the transfer was cut short.
    fn squid_code(&self) -> (Code, bool) {
        match self.kind {
            Kind::Request => (Code::Miss, self.complete == Some(false)),
            Kind::Tunnel => (Code::Tunnel, !matches!(self.outcome, Some("closed" | "idle timeout"))),
            Kind::Denied => (Code::Denied, false),
            // The origin failed or did not answer in time: a miss that failed, for Squid too.
            Kind::Refused if matches!(self.status, Some(502 | 504)) => (Code::Miss, false),
            Kind::Refused | Kind::Closed => (Code::None, false),
        }
    }

    /// What Squid writes (after `error:`) in place of the URL of a request it could not read.
    fn why_no_url(&self) -> &'static str {
        match (self.kind, self.status) {
            (Kind::Closed, _) => "transaction-end-before-headers",
            (_, Some(431)) => "request-too-large",
            _ => "invalid-request",
        }
    }
}

/// What one client connection was sent, counted by [`Sending`]: every byte written to it
/// (status lines, headers, bodies with their chunk framing), and the Squid line of the
/// answer being written, which waits for the answer's last byte. hyper drops a response's
/// body (whose drop writes the line) or receives the proxy's own answer before it writes
/// that response's last bytes, and it flushes the stream only once it has written all it
/// buffered: so a line held until the next flush sees its whole answer. Each line takes the
/// bytes written since the line before it; a connection's lines add up to what it was sent.
#[derive(Debug, Default)]
pub struct Sent {
    /// The connection carries many exchanges at once (HTTP/2): no line takes a share.
    multiplexed: bool,
    written: AtomicU64,
    /// Whether a line waits: read at every flush without taking the lock.
    waiting: AtomicBool,
    state: Mutex<SentState>,
}

#[derive(Debug, Default)]
struct SentState {
    /// `written` when the last line took its share.
    mark: u64,
    line: Option<AccessLine>,
    closed: bool,
}

impl SentState {
    fn share(&mut self, written: &AtomicU64) -> u64 {
        let now = written.load(Ordering::Relaxed);
        let share = now.saturating_sub(self.mark);
        self.mark = now;
        share
    }
}

impl Sent {
    /// The count of an HTTP/2 stream: its lines are written at once, with the bytes of
    /// their bodies (the connection's bytes are shared by its streams).
    pub fn multiplexed() -> Arc<Sent> {
        Arc::new(Sent {
            multiplexed: true,
            ..Sent::default()
        })
    }

    /// The bytes written since the last line took its share (a tunnel's `200` answer).
    pub fn take(&self) -> u64 {
        self.lock().share(&self.written)
    }

    /// The connection has ended: a waiting line is written now, with what was written.
    pub fn close(&self) {
        let mut state = self.lock();
        state.closed = true;
        self.release(state);
    }

    /// Holds the line of an answer being written until the next flush.
    fn hold(&self, line: AccessLine) {
        let mut state = self.lock();
        if state.closed {
            let bytes = state.share(&self.written);
            drop(state);
            return line.write_squid(bytes);
        }
        // A pipelined answer while the previous one's line still waits (its last bytes not
        // yet written): that line takes what was written so far, this one the rest.
        let earlier = state.line.take().map(|l| (state.share(&self.written), l));
        state.line = Some(line);
        self.waiting.store(true, Ordering::Relaxed);
        drop(state);
        if let Some((bytes, l)) = earlier {
            l.write_squid(bytes);
        }
    }

    fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn flushed(&self) {
        if self.waiting.load(Ordering::Relaxed) {
            self.release(self.lock());
        }
    }

    /// Writes the waiting line, if any, with its share (outside the lock).
    fn release(&self, mut state: MutexGuard<'_, SentState>) {
        self.waiting.store(false, Ordering::Relaxed);
        let Some(line) = state.line.take() else { return };
        let bytes = state.share(&self.written);
        drop(state);
        line.write_squid(bytes);
    }

    /// The state is plain numbers and a line: a panic elsewhere cannot leave it half-made.
    fn lock(&self) -> MutexGuard<'_, SentState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A client connection's stream as hyper reads and writes it: counts what is written into
/// [`Sent`], and lets a waiting line go when hyper flushes.
#[derive(Debug)]
pub struct Sending<S> {
    io: S,
    sent: Arc<Sent>,
}

impl<S> Sending<S> {
    pub fn new(io: S, sent: Arc<Sent>) -> Sending<S> {
        Sending { io, sent }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    pub fn into_inner(self) -> S {
        self.io
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Sending<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sending<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            this.sent.wrote(n);
        }
        polled
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = polled {
            this.sent.wrote(n);
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        if let Poll::Ready(Ok(())) = polled {
            this.sent.flushed();
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line() -> AccessLine {
        AccessLine::new(Kind::Request, Peer::Local)
    }

    /// An HTTP/2 stream's line does not wait on the connection's byte count (its Squid
    /// bytes are its body's); an HTTP/1.1 connection's does.
    #[test]
    fn a_multiplexed_count_is_not_a_lines_share() {
        assert!(
            line().sent(Sent::multiplexed()).squid.sent.is_none(),
            "HTTP/2: body bytes"
        );
        assert!(line().sent(Arc::default()).squid.sent.is_some(), "HTTP/1.1: its share");
    }

    #[test]
    fn a_held_line_takes_the_bytes_written_until_the_next_flush() {
        let sent = Sent::default();
        sent.wrote(100);
        sent.hold(line());
        sent.wrote(50);
        assert_eq!(sent.lock().mark, 0, "waits for the flush");
        sent.flushed();
        assert_eq!(sent.lock().mark, 150);
        assert!(sent.lock().line.is_none());
        sent.wrote(7);
        sent.flushed();
        assert_eq!(sent.take(), 7, "bytes no line took yet are the next line's");
    }

    #[test]
    fn lines_add_up_to_what_the_connection_was_sent() {
        let sent = Sent::default();
        sent.hold(line());
        sent.wrote(10);
        // Pipelined: the next answer's line arrives before the flush.
        sent.hold(line());
        assert_eq!(sent.lock().mark, 10);
        sent.wrote(5);
        sent.close();
        assert_eq!(sent.lock().mark, 15);
        // After the close a line is written at once, with what was written since.
        sent.wrote(3);
        sent.hold(line());
        assert!(sent.lock().line.is_none());
        assert_eq!(sent.lock().mark, 18);
    }
}
