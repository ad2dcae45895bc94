//! Request framing on the client→proxy byte stream, checked before hyper reads it.
//!
//! [`Framed`] wraps the accepted stream; hyper reads through it. It follows the framing the
//! way hyper will (request head, then a Content-Length or chunked body, then the next
//! request; after a CONNECT it waits for the answer: a 2xx makes the rest a tunnel it no
//! longer looks at) and
//!
//! - judges every request head by [`strict`]'s rules; a faulty head still reaches hyper
//!   (which refuses some itself; held back, it would leave the client waiting), and the
//!   [`RequestSignal`] tells the service to answer it with the fault, then close: after a
//!   fault the framing is no longer followed;
//! - validates chunked framing byte by byte: a chunk-size line is `1*HEXDIG`, then chunk
//!   extensions by the grammar (`;` token [`=` token / quoted-string], only BWS around
//!   them), then CRLF; chunk data is followed by CRLF; trailer fields follow the header
//!   rules. A violation fails the read (hyper's body error, which the service answers 400 and
//!   closes); the bytes before it are delivered first.
//! - accepts bare LF line ends in chunked framing (RFC 9112 §2.2) by inserting the CR that
//!   hyper's decoder insists on, so the origin gets a re-serialised body either way;
//! - counts each request from its first byte, for the drain's grace period.
//!
//! Why here and not in hyper: hyper's chunk decoder takes any bytes up to CR as extensions
//! and whitespace after the size, and refuses bare LF. A fix upstream would be welcome; until
//! then this layer is small, sees every byte once, and is tested on its own (every good and
//! bad line split at every byte). It costs a scan of each head (hyper scans it again) and of
//! chunk framing lines; Content-Length bodies and chunk data are only counted down. Bytes
//! are handed to hyper where they were read, without a copy, except after an inserted CR.

use std::io;
use std::pin::Pin;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::task::{Context, Poll, ready};

use futures_util::task::AtomicWaker;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::proxy::strict::{self, Fault, Framing, Head};

/// What a connection's requests look like to the drain and to the service: requests begun
/// (a first byte read), started (handed to the service) and finished (their response body
/// dropped by hyper: written, or abandoned), the fault found in a head, the answer to a
/// CONNECT the framing waits for, and where the stream stands ([`RequestSignal::at_rest`]).
#[derive(Default)]
pub struct RequestSignal {
    begun: AtomicU64,
    started: AtomicU64,
    finished: AtomicU64,
    fault: OnceLock<(u64, Fault)>,
    connect: AtomicU8,
    /// 1 + the index of the request whose answer the framing waits for (a CONNECT, or an
    /// `Upgrade` without content); 0: none yet.
    awaited: AtomicU64,
    waker: AtomicWaker,
    /// [`Framed`]'s view of the stream: the `IO_*` bits.
    io: AtomicU8,
}

const UNDECIDED: u8 = 0;
const TUNNEL: u8 = 1;
const REFUSED: u8 = 2;

/// hyper's last read found the stream empty (it would block).
const IO_READ_BLOCKED: u8 = 1;
/// No write since the last flush. hyper flushes its IO only once its own write buffer is
/// empty, so this also says that buffer is.
const IO_FLUSHED: u8 = 2;
/// The framing is between requests and holds no byte back.
const IO_BETWEEN: u8 = 4;
/// Some byte was handed to hyper.
const IO_DELIVERED: u8 = 8;

impl RequestSignal {
    /// A request reached the service; returns its index on the connection (from 0).
    pub fn start(&self) -> u64 {
        self.started.fetch_add(1, Ordering::AcqRel)
    }

    pub fn started(&self) -> u64 {
        self.started.load(Ordering::Acquire)
    }

    /// Whether a request has begun (its first byte was read) that the service has not seen.
    pub fn busy(&self) -> bool {
        self.begun.load(Ordering::Acquire) > self.started()
    }

    /// The fault found in the head of request `index`, if any (and in any later one: after a
    /// fault the framing is no longer followed, and the connection closes).
    pub fn fault(&self, index: u64) -> Option<Fault> {
        self.fault.get().filter(|(at, _)| index >= *at).map(|(_, f)| *f)
    }

    /// A response body was dropped by hyper (all of it written, or the exchange abandoned).
    pub fn finish(&self) {
        self.finished.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether hyper's connection is idle and can be taken apart without losing anything:
    /// every request begun was started and its response finished, the framing is between
    /// requests, hyper's write buffer is flushed and its last read found nothing. On a
    /// connection that has not started a request, hyper must not have been handed a byte
    /// (say a lone CRLF it keeps in its buffer): only then is its state the initial one.
    pub fn at_rest(&self) -> bool {
        let io = self.io.load(Ordering::Relaxed);
        let started = self.started();
        io & (IO_READ_BLOCKED | IO_FLUSHED | IO_BETWEEN) == IO_READ_BLOCKED | IO_FLUSHED | IO_BETWEEN
            && self.begun.load(Ordering::Acquire) == started
            && self.finished.load(Ordering::Acquire) == started
            && (started > 0 || io & IO_DELIVERED == 0)
    }

    /// Whether a CONNECT was answered with a 2xx: the rest of the stream is a tunnel's.
    pub fn tunnel(&self) -> bool {
        self.connect.load(Ordering::Acquire) == TUNNEL
    }

    /// Whether everything hyper wrote has reached the stream.
    pub fn flushed(&self) -> bool {
        self.io.load(Ordering::Relaxed) & IO_FLUSHED != 0
    }

    fn set_io(&self, bit: u8, on: bool) {
        self.update_io(bit, if on { bit } else { 0 });
    }

    /// Sets the `mask` bits to those of `bits`, with one load and at most one store (only the
    /// connection's own task reads and writes them).
    fn update_io(&self, mask: u8, bits: u8) {
        let io = self.io.load(Ordering::Relaxed);
        let next = (io & !mask) | bits;
        if next != io {
            self.io.store(next, Ordering::Relaxed);
        }
    }

    /// Whether the framing waits for request `index`'s answer to know what follows it: the
    /// service must then call [`RequestSignal::answered_connect`] once it has answered.
    pub fn awaits_answer(&self, index: u64) -> bool {
        self.awaited.load(Ordering::Acquire) == index + 1
    }

    /// The framing holds back what follows request `index` until its answer.
    fn await_answer(&self, index: u64) {
        self.connect.store(UNDECIDED, Ordering::Release);
        self.awaited.store(index + 1, Ordering::Release);
    }

    /// The service answered the request the framing waits for (a CONNECT, or an upgrade):
    /// `tunnel` (a 2xx to the CONNECT, a 101 to the upgrade), the rest of the stream is the
    /// tunnel's; else the next request follows.
    pub fn answered_connect(&self, tunnel: bool) {
        self.connect
            .store(if tunnel { TUNNEL } else { REFUSED }, Ordering::Release);
        self.waker.wake();
    }

    /// `count` requests have begun (only the framing counts them: a plain store).
    fn begun(&self, count: u64) {
        self.begun.store(count, Ordering::Release);
    }

    fn record_fault(&self, fault: Fault) {
        let index = self.begun.load(Ordering::Acquire).saturating_sub(1);
        let _ = self.fault.set((index, fault));
    }

    fn connect_answer(&self, cx: &mut Context<'_>) -> Option<bool> {
        self.waker.register(cx.waker());
        match self.connect.load(Ordering::Acquire) {
            TUNNEL => Some(true),
            REFUSED => Some(false),
            _ => None,
        }
    }
}

/// The client stream as hyper reads it: framing followed and checked (module docs).
pub struct Framed<S> {
    io: S,
    parser: Parser,
    signal: std::sync::Arc<RequestSignal>,
    /// Checked bytes not yet handed over (after an inserted CR).
    out: Held,
    /// Bytes not yet checked: held back after a CONNECT head until its answer.
    raw: Held,
}

impl<S> Framed<S> {
    /// `max_head` is hyper's head limit: a longer head is hyper's to refuse (431).
    pub fn new(io: S, signal: std::sync::Arc<RequestSignal>, max_head: usize) -> Framed<S> {
        Framed::resume(io, Vec::new(), signal, max_head)
    }

    /// Like [`Framed::new`], on a stream of which `unread` was read already (by an earlier
    /// `Framed` and hyper, which parsed none of it): those bytes are read first.
    pub fn resume(io: S, unread: Vec<u8>, signal: std::sync::Arc<RequestSignal>, max_head: usize) -> Framed<S> {
        signal.set_io(IO_FLUSHED | IO_BETWEEN, true);
        Framed {
            io,
            parser: Parser::new(max_head),
            signal,
            out: Held::default(),
            raw: Held { buf: unread, pos: 0 },
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.io
    }

    /// The stream, and the bytes read from it that were not handed over yet (to be sent on
    /// before anything else read from the stream).
    pub fn into_parts(self) -> (S, Vec<u8>) {
        let mut held = self.out.rest().to_vec();
        held.extend_from_slice(self.raw.rest());
        (self.io, held)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Framed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let start = buf.filled().len();
        let polled = this.poll_framed(cx, buf);
        let blocked = polled.is_pending() && this.parser.phase != Phase::Connect;
        let delivered = buf.filled().len() > start;
        let bit = |on: bool, bit: u8| if on { bit } else { 0 };
        let bits = bit(blocked, IO_READ_BLOCKED) | bit(this.is_between(), IO_BETWEEN) | bit(delivered, IO_DELIVERED);
        // DELIVERED is only ever set: it says whether any byte was handed over.
        let mask = IO_READ_BLOCKED | IO_BETWEEN | bit(delivered, IO_DELIVERED);
        this.signal.update_io(mask, bits);
        polled
    }
}

impl<S: AsyncRead + Unpin> Framed<S> {
    /// Between requests, with no byte held back.
    fn is_between(&self) -> bool {
        matches!(self.parser.phase, Phase::Idle { .. }) && self.out.is_empty() && self.raw.is_empty()
    }

    fn poll_framed(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self;
        loop {
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            if !this.out.is_empty() {
                this.out.take_into(buf);
                this.out.release();
                return Poll::Ready(Ok(()));
            }
            match this.parser.phase {
                Phase::Failed(reason) => return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, reason))),
                Phase::Connect => match this.signal.connect_answer(cx) {
                    None => return Poll::Pending,
                    Some(true) => this.parser.phase = Phase::Opaque,
                    Some(false) => this.parser.phase = Phase::Idle { cr: false },
                },
                Phase::Opaque if this.raw.is_empty() => return Pin::new(&mut this.io).poll_read(cx, buf),
                _ => {}
            }
            let start = buf.filled().len();
            let from_raw = !this.raw.is_empty();
            if from_raw {
                this.raw.take_into(buf);
            } else {
                ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
                if buf.filled().len() == start {
                    return Poll::Ready(Ok(())); // end of stream
                }
            }
            let region = &buf.filled()[start..];
            let p = this.parser.process(region, &mut this.out.buf, &this.signal);
            if from_raw {
                this.raw.unread(region.len() - p.consumed);
                this.raw.release();
            } else {
                this.raw.buf.extend_from_slice(&region[p.consumed..]);
            }
            buf.set_filled(start + p.delivered);
            if !this.out.is_empty() {
                this.out.take_into(buf);
                this.out.release();
            }
            if buf.filled().len() > start {
                return Poll::Ready(Ok(()));
            }
            // Nothing to hand over: a fault at the first byte, answered by the next round.
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Framed<S> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.signal.set_io(IO_FLUSHED, false);
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        this.signal.set_io(IO_FLUSHED, false);
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        if matches!(polled, Poll::Ready(Ok(()))) {
            this.signal.set_io(IO_FLUSHED, true);
        }
        polled
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Bytes kept for a later read: `buf[pos..]`.
#[derive(Default)]
struct Held {
    buf: Vec<u8>,
    pos: usize,
}

impl Held {
    fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    fn rest(&self) -> &[u8] {
        &self.buf[self.pos..]
    }

    fn take_into(&mut self, dst: &mut ReadBuf<'_>) {
        let n = dst.remaining().min(self.buf.len() - self.pos);
        dst.put_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
    }

    /// Gives back the last `n` bytes taken (they are still in place).
    fn unread(&mut self, n: usize) {
        self.pos -= n;
    }

    /// Frees the space of bytes taken, once all are.
    fn release(&mut self) {
        if self.is_empty() {
            self.buf.clear();
            self.pos = 0;
        }
    }
}

/// Where the request stream stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Between requests: empty lines are skipped (as hyper does); `cr` after a CR.
    Idle {
        cr: bool,
    },
    /// In a request head (its first bytes in `Parser::head` if it spans reads).
    Head,
    /// In a Content-Length body: `Parser::left` bytes to go.
    Length,
    Chunked(Ck),
    /// After a CONNECT head, until its answer.
    Connect,
    /// Not followed any more: after a faulty head (the connection closes after its answer),
    /// a head over the limit (hyper answers 431), or in a tunnel.
    Opaque,
    /// A chunked body broke its framing: reads fail with this reason.
    Failed(&'static str),
    /// After a method too long to answer as a request (its stand-in went to hyper): the
    /// rest of the stream is read and dropped until the connection closes after the answer.
    Discard,
}

/// A state of the chunked body (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ck {
    SizeStart,
    Size,
    SizeWs,
    ExtStart,
    ExtName,
    ExtNameWs,
    ValStart,
    ValToken,
    Quoted,
    QuotedPair,
    AfterQuote,
    ValWs,
    /// A CR was read; the LF must follow, then the line leads to the given state (or, for
    /// [`Ck::Size`], to data or trailers by the chunk size).
    Lf(Line),
    Data,
    DataEnd,
    TrailerStart,
    TrailerName,
    TrailerValue,
}

/// Which line a line end closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    Size,
    Data,
    Trailer,
    Last,
}

/// How far one call to [`Parser::process`] got: `delivered` bytes of its input go to hyper
/// as they are (then whatever it appended to `out`), `consumed` bytes were judged.
#[derive(Debug, PartialEq, Eq)]
struct Progress {
    delivered: usize,
    consumed: usize,
}

struct Parser {
    phase: Phase,
    /// A head that spans reads, and where the search for its end stands.
    head: Vec<u8>,
    scan: u8,
    /// Bytes left of a Content-Length body or of a chunk's data; a chunk size being read.
    left: u64,
    /// Requests begun on the connection.
    begun: u64,
    max_head: usize,
}

/// The stand-in head for a request whose method is longer than [`strict::MAX_METHOD`]
/// (`held`, the head's bytes hyper already has, then `rest`), once its first
/// `MAX_METHOD + 1` bytes are all token bytes: `held` is shorter than that, or the method
/// was found too long before.
fn overlong_method(held: &[u8], rest: &[u8]) -> Option<Vec<u8>> {
    let need = strict::MAX_METHOD + 1;
    if held.len() >= need || held.len() + rest.len() < need {
        return None;
    }
    // Every head is asked: the line's first bytes on the stack, judged by `strict`'s rule,
    // and an allocation only for a method that is too long.
    let mut start = [0u8; strict::MAX_METHOD + 1];
    let (have, new) = start.split_at_mut(held.len());
    have.copy_from_slice(held);
    new.copy_from_slice(&rest[..need - held.len()]);
    strict::long_method(&start).then(|| [&start[..strict::MAX_METHOD], STAND_IN_END].concat())
}

/// What follows an overlong method's first bytes in its stand-in head.
pub(crate) const STAND_IN_END: &[u8] = b" / HTTP/1.1\r\n\r\n";

/// The input of one [`Parser::process`] call and what it passed on: `input[..r]` unchanged,
/// unless a CR was inserted at `frozen`, after which the output continues in `out`.
struct Cursor<'a> {
    input: &'a [u8],
    r: usize,
    frozen: Option<usize>,
    out: &'a mut Vec<u8>,
}

impl Cursor<'_> {
    fn rest(&self) -> &[u8] {
        &self.input[self.r..]
    }

    fn pass(&mut self, n: usize) {
        if self.frozen.is_some() {
            self.out.extend_from_slice(&self.input[self.r..self.r + n]);
        }
        self.r += n;
    }

    /// Hands `bytes` over in place of the rest of the input, which is consumed unseen.
    fn replace_rest(&mut self, bytes: &[u8]) {
        self.frozen.get_or_insert(self.r);
        self.out.extend_from_slice(bytes);
        self.r = self.input.len();
    }

    fn insert_cr(&mut self) {
        self.frozen.get_or_insert(self.r);
        self.out.push(b'\r');
    }
}

impl Parser {
    fn new(max_head: usize) -> Parser {
        Parser {
            phase: Phase::Idle { cr: false },
            head: Vec::new(),
            scan: 0,
            left: 0,
            begun: 0,
            max_head,
        }
    }

    fn process(&mut self, input: &[u8], out: &mut Vec<u8>, signal: &RequestSignal) -> Progress {
        let mut c = Cursor {
            input,
            r: 0,
            frozen: None,
            out,
        };
        let consumed = loop {
            if c.r == input.len() {
                break input.len();
            }
            match self.phase {
                Phase::Idle { cr } => self.idle(cr, &mut c, signal),
                Phase::Head => self.head(&mut c, signal),
                Phase::Length => {
                    let n = c.rest().len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
                    c.pass(n);
                    self.left -= n as u64;
                    if self.left == 0 {
                        self.phase = Phase::Idle { cr: false };
                    }
                }
                Phase::Chunked(ck) => self.chunked(ck, &mut c),
                Phase::Connect => break c.r,
                Phase::Opaque => c.pass(c.rest().len()),
                Phase::Discard => c.replace_rest(&[]),
                Phase::Failed(_) => break input.len(),
            }
        };
        Progress {
            delivered: c.frozen.unwrap_or(c.r),
            consumed,
        }
    }

    fn idle(&mut self, cr: bool, c: &mut Cursor<'_>, signal: &RequestSignal) {
        match (cr, c.rest()[0]) {
            (_, b'\n') => {
                c.pass(1);
                self.phase = Phase::Idle { cr: false };
            }
            (false, b'\r') => {
                c.pass(1);
                self.phase = Phase::Idle { cr: true };
            }
            // hyper refuses a CR without LF before a request line.
            (true, _) => self.phase = Phase::Opaque,
            (false, _) => {
                self.begun += 1;
                signal.begun(self.begun);
                self.head.clear();
                self.phase = Phase::Head;
            }
        }
    }

    fn head(&mut self, c: &mut Cursor<'_>, signal: &RequestSignal) {
        if let Some(stand_in) = overlong_method(&self.head, c.rest()) {
            // Its own answer is 501, which hyper would never reach: a method near the head
            // limit is a head over it (431). hyper gets a short head in its place (the
            // method's first bytes, those it has already included), the service answers
            // the recorded fault, and the connection closes.
            c.replace_rest(&stand_in[self.head.len()..]);
            signal.record_fault(strict::Fault::not_implemented(strict::LONG_METHOD));
            self.head.clear();
            self.phase = Phase::Discard;
            return;
        }
        // A head longer than the limit is hyper's to refuse (431): not judged, not kept.
        let judged = if self.head.is_empty() {
            // The head starts in this input: judged in place when it is complete here.
            let rest = c.rest();
            let window = &rest[..rest.len().min(self.max_head + 1)];
            let parsed = strict::parse_head(window);
            match parsed {
                Ok(Head::Partial) if window.len() <= self.max_head => {
                    self.head.extend_from_slice(rest);
                    self.scan = 0;
                    head_end(&mut self.scan, rest);
                    c.pass(rest.len());
                    return;
                }
                Ok(Head::Complete { len, .. }) if len <= self.max_head => {
                    c.pass(len);
                    parsed
                }
                other => other,
            }
        } else {
            let rest = c.rest();
            let end = head_end(&mut self.scan, rest);
            let taken = end.unwrap_or(rest.len());
            self.head.extend_from_slice(&rest[..taken]);
            c.pass(taken);
            match end {
                _ if self.head.len() > self.max_head => Ok(Head::Partial),
                None => return,
                Some(_) => strict::parse_head(&self.head),
            }
        };
        self.phase = match judged {
            Ok(Head::Complete { len, framing }) if len <= self.max_head => self.after_head(framing, signal),
            Ok(_) => Phase::Opaque,
            Err(fault) => {
                signal.record_fault(fault);
                Phase::Opaque
            }
        };
        if self.head.capacity() > MAX_KEPT {
            self.head = Vec::new();
        } else {
            self.head.clear();
        }
    }

    fn after_head(&mut self, framing: Framing, signal: &RequestSignal) -> Phase {
        match framing {
            Framing::Empty => Phase::Idle { cr: false },
            Framing::Length(n) => {
                self.left = n;
                Phase::Length
            }
            Framing::Chunked => Phase::Chunked(Ck::SizeStart),
            // Both wait for the answer, which decides what the next byte is.
            Framing::Connect | Framing::Upgrade => {
                signal.await_answer(self.begun.saturating_sub(1));
                Phase::Connect
            }
        }
    }

    fn chunked(&mut self, mut ck: Ck, c: &mut Cursor<'_>) {
        while let Some(&b) = c.rest().first() {
            if ck == Ck::Data {
                let n = c.rest().len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
                c.pass(n);
                self.left -= n as u64;
                if self.left == 0 {
                    ck = Ck::DataEnd;
                }
                continue;
            }
            match chunk_step(ck, b, &mut self.left) {
                Ok(Step { next, bare_lf }) => {
                    if bare_lf {
                        c.insert_cr();
                    }
                    c.pass(1);
                    match next {
                        Some(next) => ck = next,
                        None => {
                            self.phase = Phase::Idle { cr: false };
                            return;
                        }
                    }
                }
                Err(reason) => {
                    self.phase = Phase::Failed(reason);
                    return;
                }
            }
        }
        self.phase = Phase::Chunked(ck);
    }
}

/// The largest head buffer kept for the next head that spans reads.
const MAX_KEPT: usize = 8 * 1024;

/// Looks for the empty line that ends a head; `state` is 0 inside a line, 1 after its LF, 2
/// after LF CR. Returns the length through the empty line.
fn head_end(state: &mut u8, bytes: &[u8]) -> Option<usize> {
    for (i, &b) in bytes.iter().enumerate() {
        *state = match (*state, b) {
            (1 | 2, b'\n') => return Some(i + 1),
            (_, b'\n') => 1,
            (1, b'\r') => 2,
            _ => 0,
        };
    }
    None
}

/// One byte of chunked framing: the next state (`None`: the body ended), and whether the
/// byte is an LF without CR, before which a CR is inserted.
struct Step {
    next: Option<Ck>,
    bare_lf: bool,
}

const WS_BEFORE_END: &str = "whitespace before the end of a chunk line";
const BAD_EXT: &str = "invalid chunk extension";

fn go(next: Ck) -> Result<Step, &'static str> {
    Ok(Step {
        next: Some(next),
        bare_lf: false,
    })
}

fn chunk_step(ck: Ck, b: u8, size: &mut u64) -> Result<Step, &'static str> {
    // Where a chunk-size line may end: CR (then LF), or a bare LF.
    if matches!(ck, Ck::Size | Ck::ExtName | Ck::ValToken | Ck::AfterQuote) {
        match b {
            b'\r' => return go(Ck::Lf(Line::Size)),
            b'\n' => return Ok(line_end(Line::Size, *size, true)),
            _ => {}
        }
    }
    match ck {
        Ck::Lf(line) if b == b'\n' => Ok(line_end(line, *size, false)),
        Ck::Lf(_) => Err("CR without LF in chunked framing"),
        Ck::DataEnd => match b {
            b'\r' => go(Ck::Lf(Line::Data)),
            b'\n' => Ok(line_end(Line::Data, *size, true)),
            _ => Err("chunk data not followed by CRLF"),
        },
        Ck::TrailerStart => match b {
            b'\r' => go(Ck::Lf(Line::Last)),
            b'\n' => Ok(line_end(Line::Last, *size, true)),
            b' ' | b'\t' => Err("obsolete line folding in a trailer field"),
            _ if strict::is_tchar(b) => go(Ck::TrailerName),
            _ => Err("invalid trailer field name"),
        },
        Ck::TrailerName => match b {
            _ if strict::is_tchar(b) => go(ck),
            b':' => go(Ck::TrailerValue),
            _ => Err("invalid trailer field name"),
        },
        Ck::TrailerValue => match b {
            b'\r' => go(Ck::Lf(Line::Trailer)),
            b'\n' => Ok(line_end(Line::Trailer, *size, true)),
            _ if strict::is_field_byte(b) => go(ck),
            _ => Err("control byte in a trailer field"),
        },
        Ck::Data => unreachable!("chunk data is counted, not stepped"),
        _ => size_line_step(ck, b, size),
    }
}

/// One byte of a chunk-size line before its end: `1*HEXDIG *( BWS ";" BWS name [ BWS "="
/// BWS ( token / quoted-string ) ] )`.
fn size_line_step(ck: Ck, b: u8, size: &mut u64) -> Result<Step, &'static str> {
    let ws = b == b' ' || b == b'\t';
    match ck {
        Ck::SizeStart | Ck::Size => match hex(b) {
            Some(d) => {
                let grown = if ck == Ck::SizeStart {
                    Some(0)
                } else {
                    size.checked_mul(16)
                };
                *size = grown.and_then(|s| s.checked_add(d)).ok_or("chunk size too large")?;
                go(Ck::Size)
            }
            None if ck == Ck::SizeStart => Err("missing chunk size"),
            None if ws => go(Ck::SizeWs),
            None if b == b';' => go(Ck::ExtStart),
            None => Err("invalid chunk size"),
        },
        Ck::SizeWs | Ck::ExtNameWs | Ck::ValWs => match b {
            _ if ws => go(ck),
            b';' => go(Ck::ExtStart),
            b'=' if ck == Ck::ExtNameWs => go(Ck::ValStart),
            b'\r' | b'\n' => Err(WS_BEFORE_END),
            _ if ck == Ck::SizeWs => Err("invalid chunk size"),
            _ => Err(BAD_EXT),
        },
        Ck::ExtStart => match b {
            _ if ws => go(ck),
            _ if strict::is_tchar(b) => go(Ck::ExtName),
            _ => Err("empty chunk extension"),
        },
        Ck::ExtName => match b {
            _ if strict::is_tchar(b) => go(ck),
            _ if ws => go(Ck::ExtNameWs),
            b'=' => go(Ck::ValStart),
            b';' => go(Ck::ExtStart),
            _ => Err(BAD_EXT),
        },
        Ck::ValStart => match b {
            _ if ws => go(ck),
            _ if strict::is_tchar(b) => go(Ck::ValToken),
            b'"' => go(Ck::Quoted),
            _ => Err(BAD_EXT),
        },
        Ck::ValToken | Ck::AfterQuote => match b {
            _ if ck == Ck::ValToken && strict::is_tchar(b) => go(ck),
            _ if ws => go(Ck::ValWs),
            b';' => go(Ck::ExtStart),
            _ => Err(BAD_EXT),
        },
        Ck::Quoted => match b {
            b'"' => go(Ck::AfterQuote),
            b'\\' => go(Ck::QuotedPair),
            _ if strict::is_field_byte(b) => go(ck),
            _ => Err(BAD_EXT),
        },
        Ck::QuotedPair if strict::is_field_byte(b) => go(Ck::Quoted),
        _ => Err(BAD_EXT),
    }
}

/// Where the end of `line` leads.
fn line_end(line: Line, size: u64, bare_lf: bool) -> Step {
    let next = match line {
        Line::Size if size == 0 => Some(Ck::TrailerStart),
        Line::Size => Some(Ck::Data),
        Line::Data => Some(Ck::SizeStart),
        Line::Trailer => Some(Ck::TrailerStart),
        Line::Last => None,
    };
    Step { next, bare_lf }
}

fn hex(b: u8) -> Option<u64> {
    char::from(b).to_digit(16).map(u64::from)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};

    use super::*;

    use crate::fuzzing::Pieces;

    fn framed(pieces: Vec<Vec<u8>>) -> (Framed<Pieces>, Arc<RequestSignal>) {
        let signal = Arc::new(RequestSignal::default());
        (Framed::new(Pieces(pieces.into()), signal.clone(), 1024), signal)
    }

    /// Everything hyper would read, with reads of at most `cap` bytes, until the end or an
    /// error (or a pause, waiting for a CONNECT's answer).
    fn read_all(f: &mut Framed<Pieces>, cap: usize) -> (Vec<u8>, Option<String>) {
        let mut got = Vec::new();
        let mut buf = vec![0u8; cap];
        loop {
            match f.read(&mut buf).now_or_never() {
                None => return (got, None),
                Some(Ok(0)) => return (got, None),
                Some(Ok(n)) => got.extend_from_slice(&buf[..n]),
                Some(Err(e)) => return (got, Some(e.to_string())),
            }
        }
    }

    /// `input` in two pieces split at every byte, and byte by byte, read with several buffer
    /// sizes: each time `check` gets what hyper read and the error.
    fn every_split(input: &[u8], check: impl Fn(&[u8], Option<&str>, &str)) {
        let mut ways: Vec<(String, Vec<Vec<u8>>)> = (0..=input.len())
            .map(|at| {
                let pieces = [&input[..at], &input[at..]].into_iter().filter(|p| !p.is_empty());
                (format!("split at {at}"), pieces.map(<[u8]>::to_vec).collect())
            })
            .collect();
        ways.push(("byte by byte".into(), input.iter().map(|&b| vec![b]).collect()));
        for (how, pieces) in ways {
            for cap in [1, 2, 7, 8192] {
                let (mut f, _) = framed(pieces.clone());
                let (got, err) = read_all(&mut f, cap);
                check(&got, err.as_deref(), &format!("{how}, reads of {cap}"));
            }
        }
    }

    const CHUNKED_HEAD: &str = "POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";

    #[test]
    fn good_chunked_bodies_pass_with_crlf_line_ends() {
        for (body, canonical) in [
            ("5\r\nhello\r\n0\r\n\r\n", None),
            ("5\nhello\n0\n\n", Some("5\r\nhello\r\n0\r\n\r\n")),
            ("5\r\nhello\n0\r\n\n", Some("5\r\nhello\r\n0\r\n\r\n")),
            ("5;a=b\r\nhello\r\n0\r\n\r\n", None),
            ("5 ; a = b ;c\r\nhello\r\n0\r\n\r\n", None),
            ("5\t;a=\"x y\\\"z\\\\\"\r\nhello\r\n0\r\n\r\n", None),
            ("5;a=\"caf\u{e9}\"\r\nhello\r\n0\r\n\r\n", None),
            ("5;a;b=c\nhello\n0\n\n", Some("5;a;b=c\r\nhello\r\n0\r\n\r\n")),
            ("005\r\nhello\r\n0000\r\n\r\n", None),
            ("A\r\n0123456789\r\n1\r\n\n\r\n0\r\n\r\n", None),
            ("5\r\nhello\r\n0\r\nX-T: 1\r\nY:\t2 \r\n\r\n", None),
            (
                "5\nhello\r\n0\nX-T: 1\nY:\n\n",
                Some("5\r\nhello\r\n0\r\nX-T: 1\r\nY:\r\n\r\n"),
            ),
            ("0;e\r\n\r\n", None),
            // Runs of whitespace, names and values longer than a byte, `;` after a value.
            ("5 \t;a\r\nhello\r\n0\r\n\r\n", None),
            ("5;abc=def;ghi=\"x\";jk\r\nhello\r\n0\r\n\r\n", None),
        ] {
            let input = format!("{CHUNKED_HEAD}{body}GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n");
            let want = input.replace(body, canonical.unwrap_or(body));
            every_split(input.as_bytes(), |got, err, how| {
                assert_eq!(err, None, "{body:?}, {how}");
                assert_eq!(String::from_utf8_lossy(got), want, "{body:?}, {how}");
            });
        }
    }

    #[test]
    fn bad_chunked_bodies_fail_after_the_bytes_before_the_fault() {
        for (body, reason) in [
            ("5\rhello\r\n", "CR without LF in chunked framing"),
            ("5;\r\nhello\r\n", "empty chunk extension"),
            ("5; \r\n", "empty chunk extension"),
            ("5 \r\nhello\r\n", WS_BEFORE_END),
            ("5\t\n", WS_BEFORE_END),
            ("5;a \r\n", WS_BEFORE_END),
            ("5;a=b \r\n", WS_BEFORE_END),
            ("5;a=\"b\" \n", WS_BEFORE_END),
            ("5;a=\r\n", BAD_EXT),
            ("5;a\x01\r\n", BAD_EXT),
            ("5;a=\"x\x01\"\r\n", BAD_EXT),
            ("5;a=\"x\r\n", BAD_EXT),
            ("5;a=\"x\"y\r\n", BAD_EXT),
            ("5;a=b=c\r\n", BAD_EXT),
            ("5;=b\r\n", "empty chunk extension"),
            ("\r\nhello\r\n", "missing chunk size"),
            ("\nhello\r\n", "missing chunk size"),
            (";a\r\n", "missing chunk size"),
            ("-5\r\n", "missing chunk size"),
            ("0x5\r\n", "invalid chunk size"),
            ("5\x0b\r\n", "invalid chunk size"),
            ("5 5\r\n", "invalid chunk size"),
            ("fffffffffffffffff\r\n", "chunk size too large"),
            ("5\r\nhelloXX0\r\n\r\n", "chunk data not followed by CRLF"),
            ("5\r\nhello\rX", "CR without LF in chunked framing"),
            ("0\r\n X: 1\r\n\r\n", "obsolete line folding in a trailer field"),
            ("0\r\nX : 1\r\n\r\n", "invalid trailer field name"),
            ("0\r\n: 1\r\n\r\n", "invalid trailer field name"),
            ("0\r\nX: a\x0bb\r\n\r\n", "control byte in a trailer field"),
            ("0\r\nX: a\x7f\r\n\r\n", "control byte in a trailer field"),
            ("0\r\nX: a\rb\r\n\r\n", "CR without LF in chunked framing"),
            ("0\r\n\r\r", "CR without LF in chunked framing"),
            ("5 =x\r\n", "invalid chunk size"),
            ("5;a b\r\n", BAD_EXT),
            ("5;a=\"x\\\x01\"\r\n", BAD_EXT),
            ("0\r\n@X: 1\r\n\r\n", "invalid trailer field name"),
        ] {
            let input = format!("{CHUNKED_HEAD}{body}");
            every_split(input.as_bytes(), |got, err, how| {
                assert_eq!(err, Some(reason), "{body:?}, {how}");
                let got = String::from_utf8_lossy(got).replace("\r\n", "\n");
                let input = input.replace("\r\n", "\n");
                assert!(
                    input.starts_with(&got) && got.len() >= CHUNKED_HEAD.len() - 4,
                    "{body:?}, {how}: {got:?}"
                );
            });
        }
    }

    #[test]
    fn heads_and_length_bodies_pass_unchanged_and_count_from_their_first_byte() {
        let input = concat!(
            "\r\n\nPOST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
            "GET http://a/ HTTP/1.1\nHost: a\n\n",
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n\r\n\r",
            "GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n",
        );
        every_split(input.as_bytes(), |got, err, how| {
            assert_eq!(err, None, "{how}");
            assert_eq!(got, input.as_bytes(), "{how}");
        });
        let (mut f, signal) = framed(vec![input.as_bytes().to_vec()]);
        read_all(&mut f, 8192);
        assert_eq!(signal.begun.load(Ordering::Relaxed), 4);
        assert_eq!(signal.fault(0), None);
        // A head begun but not complete makes the connection busy.
        let (mut f, signal) = framed(vec![b"GET http://a/ HTTP/1.1\r\nHo".to_vec()]);
        read_all(&mut f, 8192);
        assert!(signal.busy());
        signal.start();
        assert!(!signal.busy());
    }

    #[test]
    fn a_faulty_head_is_passed_on_and_recorded_for_its_request() {
        let good = "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n";
        for bad in [
            "POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\nX: \x0b\r\n\r\n",
        ] {
            let input = format!("{good}{bad}0\r\n\r\n{good}");
            every_split(input.as_bytes(), |got, err, how| {
                assert_eq!(err, None, "{how}");
                assert_eq!(got, input.as_bytes(), "{bad:?} {how}");
            });
            let (mut f, signal) = framed(vec![input.as_bytes().to_vec()]);
            read_all(&mut f, 8192);
            assert_eq!(signal.fault(0), None, "{bad:?}");
            assert_eq!(signal.fault(1).map(|f| f.status.as_u16()), Some(400), "{bad:?}");
            assert!(signal.fault(2).is_some(), "{bad:?}: later requests too");
        }
    }

    #[test]
    fn a_head_over_the_limit_is_left_to_hyper() {
        let pad = "x".repeat(1100);
        let input =
            format!("GET http://a/ HTTP/1.1\r\nHost: a\r\nX-Pad: {pad}\r\nTransfer-Encoding: gzip\r\n\r\nzz\r\n");
        for pieces in [
            vec![input.clone().into_bytes()],
            input.as_bytes().chunks(100).map(<[u8]>::to_vec).collect(),
        ] {
            let (mut f, signal) = framed(pieces);
            let (got, err) = read_all(&mut f, 8192);
            assert_eq!((got, err), (input.clone().into_bytes(), None));
            assert_eq!(signal.fault(0), None);
            assert!(f.parser.head.capacity() <= 2048, "the partial head is not kept");
        }
    }

    #[test]
    fn after_connect_the_framing_waits_for_the_answer() {
        let connect = "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        let next = "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n";
        for refused in [true, false] {
            let input = format!("{connect}{next}");
            let (mut f, signal) = framed(vec![input.as_bytes().to_vec()]);
            let (got, err) = read_all(&mut f, 8192);
            assert_eq!((got, err), (connect.as_bytes().to_vec(), None), "paused after the head");
            signal.start();
            signal.answered_connect(!refused);
            if refused {
                let (got, _) = read_all(&mut f, 8192);
                assert_eq!(got, next.as_bytes(), "then the next request");
                assert_eq!(signal.begun.load(Ordering::Relaxed), 2);
            } else {
                let (_, held) = f.into_parts();
                assert_eq!(held, next.as_bytes(), "the tunnel's first bytes, not judged");
            }
        }
    }

    /// A GET head of exactly `len` bytes, faulty (a space in its target) when `bad`.
    fn head_of(len: usize, bad: bool) -> Vec<u8> {
        let start = if bad {
            "GET http://a/ x HTTP/1.1\r\n"
        } else {
            "GET http://a/ HTTP/1.1\r\n"
        };
        let fixed = start.len() + "Host: a\r\nX: \r\n\r\n".len();
        format!("{start}Host: a\r\nX: {}\r\n\r\n", "y".repeat(len - fixed)).into_bytes()
    }

    const BAD_NEXT: &[u8] = b"BAD REQUEST LINE\r\n\r\n";

    /// A head up to `max_head` long is judged, in one read or across reads; one longer is
    /// hyper's to refuse (431): not judged, and the framing stops following the stream (the
    /// bad request after it is not judged either). The witness for each "not judged": the
    /// same bytes after a head within the limit are.
    #[test]
    fn heads_longer_than_the_limit_are_not_judged_or_kept() {
        for split in [None, Some(300)] {
            let pieces = |head: Vec<u8>| match split {
                None => vec![[&head[..], BAD_NEXT].concat()],
                Some(at) => vec![head[..at].to_vec(), [&head[at..], BAD_NEXT].concat()],
            };
            let (mut f, signal) = framed(pieces(head_of(1024, true)));
            read_all(&mut f, 8192);
            assert!(
                signal.fault(0).is_some(),
                "{split:?}: a bad head of exactly the limit is judged"
            );
            let (mut f, signal) = framed(pieces(head_of(1024, false)));
            read_all(&mut f, 8192);
            assert!(
                signal.fault(0).is_none() && signal.fault(1).is_some(),
                "{split:?}: the next request is judged"
            );
            let (mut f, signal) = framed(pieces(head_of(1025, false)));
            let (got, _) = read_all(&mut f, 8192);
            assert_eq!(got.len(), 1025 + BAD_NEXT.len(), "{split:?}: every byte goes to hyper");
            assert!(
                signal.fault(1).is_none(),
                "{split:?}: after a head over the limit, nothing is judged"
            );
            assert_eq!(f.parser.phase, Phase::Opaque, "{split:?}");
            assert!(f.parser.head.is_empty(), "{split:?}: not kept");
        }
        let (mut f, _) = framed(vec![b"GET /".repeat(600)]);
        read_all(&mut f, 8192);
        assert!(
            f.parser.head.is_empty() && f.parser.phase == Phase::Opaque,
            "a partial head over the limit"
        );
    }

    /// A method longer than 32 bytes gets its 501 even when the head is over hyper's limit
    /// (which would answer 431): hyper reads a short stand-in head, whatever the reads, and
    /// nothing after it. The witness: a 32-byte method goes to hyper as sent.
    #[test]
    fn an_overlong_method_reaches_hyper_as_a_short_head() {
        let long = [vec![b'M'; 3000], b" http://a/ HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()].concat();
        let stand_in = [vec![b'M'; 32], b" / HTTP/1.1\r\n\r\n".to_vec()].concat();
        for at in [1, 10, 32, 33, 34, 2000] {
            let (mut f, signal) = framed(vec![long[..at].to_vec(), long[at..].to_vec()]);
            let (got, err) = read_all(&mut f, 8192);
            assert_eq!((got, err), (stand_in.clone(), None), "split at {at}");
            let fault = signal.fault(0).expect("the method's fault is recorded");
            assert_eq!((fault.status.as_u16(), fault.reason), (501, strict::LONG_METHOD));
            assert_eq!(f.parser.phase, Phase::Discard, "split at {at}");
        }
        let fits = b"MMMMMMMMMMMMMMMMMMMMMMMMMMMMMMMM http://a/ HTTP/1.1\r\nHost: a\r\n\r\n";
        let (mut f, signal) = framed(vec![fits.to_vec()]);
        assert_eq!(read_all(&mut f, 8192).0, fits, "a 32-byte method is passed on");
        assert!(signal.fault(0).is_none(), "and not refused");
    }

    /// A head that spans reads is kept in a buffer, which is kept for the next one unless it
    /// grew past `MAX_KEPT`.
    #[test]
    fn a_large_head_buffer_is_freed_a_small_one_kept() {
        // 8192 split in halves: the buffer grows to exactly MAX_KEPT (4096 doubled), and is kept.
        for (len, split, kept) in [(4000, 100, true), (8192, 4096, true), (20_000, 100, false)] {
            let head = head_of(len, false);
            let signal = Arc::new(RequestSignal::default());
            let pieces = vec![head[..split].to_vec(), head[split..].to_vec()];
            let mut f = Framed::new(Pieces(pieces.into()), signal, 64 * 1024);
            read_all(&mut f, 64 * 1024);
            assert_eq!(f.parser.head.capacity() > 0, kept, "a {len}-byte head's buffer");
        }
    }

    /// Bytes read before (`resume`) are read first; those after a refused CONNECT's head stay
    /// held until the answer, then are judged as the next request.
    #[test]
    fn resumed_bytes_behind_a_refused_connect_are_the_next_request() {
        let connect = "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        let next = "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n";
        let signal = Arc::new(RequestSignal::default());
        let unread = format!("{connect}{next}").into_bytes();
        let mut f = Framed::resume(Pieces(Vec::new().into()), unread, signal.clone(), 1024);
        assert_eq!(read_all(&mut f, 8192).0, connect.as_bytes(), "paused after the CONNECT");
        signal.answered_connect(false);
        assert_eq!(read_all(&mut f, 8192).0, next.as_bytes(), "then the held request");
        assert_eq!(signal.begun.load(Ordering::Relaxed), 2, "judged as the second request");
    }

    /// Reads what is there now (`None`: the read would block).
    fn read_now(f: &mut Framed<DuplexStream>) -> Option<Vec<u8>> {
        let mut buf = [0u8; 256];
        f.read(&mut buf)
            .now_or_never()
            .map(|n| buf[..n.expect("read")].to_vec())
    }

    /// The signal's view of the stream follows the reads: at rest only once a read has
    /// blocked between requests, every request begun was started and finished, and nothing
    /// written waits unflushed; a byte handed over before any request (a lone CRLF) keeps it
    /// busy; so does a body still being read when its response has finished.
    #[tokio::test]
    async fn the_io_bits_follow_the_stream() {
        let (mut client, server) = tokio::io::duplex(4096);
        let signal = Arc::new(RequestSignal::default());
        let mut f = Framed::new(server, signal.clone(), 1024);
        assert!(signal.flushed(), "a new stream has nothing unflushed");
        assert!(!signal.at_rest(), "no read has blocked yet");
        assert_eq!(read_now(&mut f), None, "nothing to read");
        assert!(signal.at_rest(), "blocked between requests, nothing handed over");

        client.write_all(b"\r\n").await.unwrap();
        assert_eq!(read_now(&mut f).as_deref(), Some(&b"\r\n"[..]), "hyper skips it itself");
        assert_eq!(read_now(&mut f), None);
        assert!(!signal.at_rest(), "hyper holds a byte of no request");

        client
            .write_all(b"POST http://a/ HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nab")
            .await
            .unwrap();
        assert!(
            read_now(&mut f).is_some_and(|b| b.ends_with(b"ab")),
            "the head and half the body"
        );
        signal.start();
        signal.finish();
        assert!(!signal.at_rest(), "the last read did not block");
        assert_eq!(read_now(&mut f), None);
        assert!(!signal.at_rest(), "answered and blocked, but inside the body");
        client.write_all(b"cd").await.unwrap();
        assert_eq!(read_now(&mut f).as_deref(), Some(&b"cd"[..]));
        assert!(
            !signal.at_rest(),
            "between requests and answered, but the last read did not block"
        );
        assert_eq!(read_now(&mut f), None);
        assert!(
            signal.at_rest(),
            "the body read, the request answered, blocked: at rest"
        );
    }

    /// A writer without vectored writes (AsyncWrite's default).
    struct Plain;

    impl tokio::io::AsyncWrite for Plain {
        fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes go through to the stream and say the stream is unflushed until a flush;
    /// vectored writes go through too, as the stream supports them; a shutdown reaches it.
    #[tokio::test]
    async fn writes_flushes_and_shutdown_go_through() {
        let (mut client, server) = tokio::io::duplex(4096);
        let signal = Arc::new(RequestSignal::default());
        let mut f = Framed::new(server, signal.clone(), 1024);
        f.write_all(b"HTTP/1.1 200 OK\r\n").await.unwrap();
        assert!(!signal.flushed(), "written, not flushed");
        f.flush().await.unwrap();
        assert!(signal.flushed(), "flushed");
        let slices = [std::io::IoSlice::new(b"ab"), std::io::IoSlice::new(b"cd")];
        let n = f.write_vectored(&slices).await.unwrap();
        assert!(n > 0 && !signal.flushed(), "a vectored write went out: {n} bytes");
        assert_eq!(
            f.is_write_vectored(),
            f.get_ref().is_write_vectored(),
            "the stream's answer"
        );
        f.shutdown().await.unwrap();
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        assert_eq!(
            got,
            [&b"HTTP/1.1 200 OK\r\n"[..], &b"abcd"[..n]].concat(),
            "every byte, then EOF"
        );

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let tcp = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let f = Framed::new(tcp, signal.clone(), 1024);
        assert!(
            f.is_write_vectored(),
            "a TCP stream writes vectored, and so does its Framed"
        );
        let f = Framed::new(Plain, signal, 1024);
        assert!(!f.is_write_vectored(), "a stream that does not, nor does its Framed");
    }

    /// After a CONNECT's 2xx the held bytes come first, then the stream's, unjudged.
    #[tokio::test]
    async fn a_tunnel_reads_its_held_bytes_then_the_stream() {
        let (mut client, server) = tokio::io::duplex(4096);
        let signal = Arc::new(RequestSignal::default());
        let mut f = Framed::new(server, signal.clone(), 1024);
        let connect = b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        client.write_all(&[&connect[..], b"\x16held"].concat()).await.unwrap();
        assert_eq!(read_now(&mut f).as_deref(), Some(&connect[..]));
        assert!(!signal.tunnel(), "not before the answer");
        signal.answered_connect(true);
        assert!(signal.tunnel(), "a 2xx: a tunnel");
        // In reads smaller than what is held: the held bytes come first, in order.
        let mut small = [0u8; 3];
        let n = f.read(&mut small).now_or_never().expect("held bytes").unwrap();
        assert_eq!(&small[..n], b"\x16he", "the held bytes first");
        client.write_all(b"!").await.unwrap();
        assert_eq!(
            read_now(&mut f).as_deref(),
            Some(&b"ld"[..]),
            "the rest of them before the stream's"
        );
        assert_eq!(read_now(&mut f).as_deref(), Some(&b"!"[..]));
        assert!(
            f.raw.buf.is_empty() && f.raw.pos == 0,
            "the held buffer freed once read"
        );
        client.write_all(b"\r\r\nmore").await.unwrap();
        assert_eq!(
            read_now(&mut f).as_deref(),
            Some(&b"\r\r\nmore"[..]),
            "then the stream's, unjudged"
        );
        signal.answered_connect(false);
        assert!(!signal.tunnel(), "a refusal is no tunnel");
    }

    /// A signal in the given state: `io` bits, then requests begun, started and finished.
    fn signal_in(io: u8, begun: u64, started: u64, finished: u64) -> RequestSignal {
        let s = RequestSignal::default();
        s.update_io(0xff, io);
        s.begun(begun);
        for _ in 0..started {
            s.start();
        }
        for _ in 0..finished {
            s.finish();
        }
        s
    }

    /// `at_rest` holds only when every one of its conditions does: each row breaks one of
    /// them (with the others met), beside the rows where all are met.
    #[test]
    fn at_rest_needs_every_condition() {
        const REST: u8 = IO_READ_BLOCKED | IO_FLUSHED | IO_BETWEEN;
        let rows: [(&str, u8, u64, u64, u64, bool); 11] = [
            ("all met, after a request", REST, 1, 1, 1, true),
            (
                "all met, hyper handed bytes of a request",
                REST | IO_DELIVERED,
                2,
                2,
                2,
                true,
            ),
            ("all met, nothing yet", REST, 0, 0, 0, true),
            (
                "hyper's last read did not block",
                IO_FLUSHED | IO_BETWEEN,
                1,
                1,
                1,
                false,
            ),
            (
                "hyper's writes not flushed",
                IO_READ_BLOCKED | IO_BETWEEN,
                1,
                1,
                1,
                false,
            ),
            (
                "the framing is inside a request",
                IO_READ_BLOCKED | IO_FLUSHED,
                1,
                1,
                1,
                false,
            ),
            ("a request begun, not started", REST, 2, 1, 1, false),
            ("a response not finished", REST, 1, 1, 0, false),
            (
                "no request, but a byte handed to hyper",
                REST | IO_DELIVERED,
                0,
                0,
                0,
                false,
            ),
            ("nothing at all set", 0, 0, 0, 0, false),
            ("more finished than started is not rest either", REST, 1, 1, 2, false),
        ];
        for (what, io, begun, started, finished, rest) in rows {
            let s = signal_in(io, begun, started, finished);
            assert_eq!(s.at_rest(), rest, "{what}");
        }
    }

    /// A request asking to switch protocols, without content, is waited on like a CONNECT
    /// (the second request here is its answer's to decide); with content, or without
    /// `Upgrade`, it is not.
    #[test]
    fn after_an_upgrade_request_the_framing_waits_for_the_answer() {
        let upgrade = "GET http://a/ws HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        let next = "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n";
        let (mut f, signal) = framed(vec![format!("{next}{upgrade}{next}").into_bytes()]);
        let (got, _) = read_all(&mut f, 8192);
        assert_eq!(
            got,
            format!("{next}{upgrade}").as_bytes(),
            "paused after the upgrade's head"
        );
        assert!(!signal.awaits_answer(0), "the plain GET is not waited on");
        assert!(signal.awaits_answer(1), "the upgrade is request 1");
        signal.answered_connect(true);
        let (_, held) = f.into_parts();
        assert_eq!(
            held,
            next.as_bytes(),
            "after a 101, the new protocol's bytes, not judged"
        );

        let with_body = "POST http://a/ HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nContent-Length: 3\r\n\r\nabc";
        let (mut f, signal) = framed(vec![format!("{with_body}{next}").into_bytes()]);
        let (got, _) = read_all(&mut f, 8192);
        assert_eq!(got, format!("{with_body}{next}").as_bytes(), "a body: no pause");
        assert!(!signal.awaits_answer(0), "content means no switch");
    }

    #[test]
    fn tunnel_bytes_after_a_2xx_are_not_judged() {
        let connect = "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n";
        let (mut f, signal) = framed(vec![connect.as_bytes().to_vec(), b"\x16\x03\x01\r\r\n".to_vec()]);
        assert_eq!(read_all(&mut f, 8192).0, connect.as_bytes());
        signal.answered_connect(true);
        assert_eq!(read_all(&mut f, 8192), (b"\x16\x03\x01\r\r\n".to_vec(), None));
        assert_eq!(signal.fault(1), None);
    }

    #[test]
    fn bytes_held_after_an_inserted_cr_survive_into_parts() {
        let input = format!("{CHUNKED_HEAD}5\nhello\n");
        let (mut f, _) = framed(vec![input.as_bytes().to_vec()]);
        let mut buf = [0u8; 8192];
        let n = f.read(&mut buf).now_or_never().unwrap().unwrap();
        let (_, held) = f.into_parts();
        let mut all = buf[..n].to_vec();
        all.extend_from_slice(&held);
        assert_eq!(all, format!("{CHUNKED_HEAD}5\r\nhello\r\n").as_bytes());
    }
}
