//! A TLS client connection that can move to another process at rest (issue 29).
//!
//! rustls keeps a connection's record state in this process. At rest (nothing buffered
//! either way) it hands over its traffic keys and sequence numbers (TLS 1.3's, or TLS 1.2's
//! with their fixed IV and explicit nonce)
//! (`dangerous_extract_secrets`), and the successor goes on with the record layer alone:
//! [`Resumed`] frames records and has them sealed and opened by the cipher suite's own
//! `MessageEncrypter`/`MessageDecrypter` from rustls's *ring* provider (no AEAD code here).
//! A resumed connection moves again the same way at the next handoff.
//!
//! - [`Aligned`] is the socket under rustls: it follows the record boundaries of what it
//!   gives rustls, since rustls would keep a partial record in a buffer no API shows.
//! - [`TlsClient`] is what a client connection on a TLS listener is: rustls's, or resumed.
//! - [`Secrets`] travel only inside the transfer's record (never a file or the
//!   environment), and are zeroized when dropped.
//!
//! What cannot move ([`Refusal`]) stays in this generation and drains as before. A client
//! `KeyUpdate` on a resumed connection cannot be applied (the extracted secrets are the key
//! and IV, not the traffic secret the next key derives from), nor a TLS 1.2 client's
//! renegotiation (rustls refuses those too): the connection is closed cleanly, with a
//! close_notify.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use baton_handoff::Stream;
use rustls::crypto::cipher::{
    AeadKey, InboundOpaqueMessage, Iv, MessageDecrypter, MessageEncrypter, OutboundChunks, OutboundPlainMessage,
};
use rustls::crypto::tls13::{HkdfExpander, OkmBlock, OutputLengthError};
use rustls::{ConnectionTrafficSecrets, ContentType, ProtocolVersion, SupportedCipherSuite, Tls13CipherSuite};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;
use zeroize::Zeroize;

/// The largest TLS 1.3 record body: 2^14 bytes of plaintext, its content type, padding and
/// the AEAD tag (RFC 8446 §5.2).
const MAX_CIPHERTEXT: usize = (1 << 14) + 256;
/// Plaintext per record written.
const MAX_PLAINTEXT: usize = 1 << 14;
const HEADER: usize = 5;
/// Records per key a resumed connection seals or opens at most: rustls updates its keys
/// before AES-GCM's confidentiality limit (2^24.5 records, RFC 9147 §4.5.3), which a resumed
/// connection cannot do (it has no traffic secret), so it closes, with a close_notify,
/// well before it (128 GiB each way at full records).
const MAX_RECORDS: u64 = 1 << 23;

/// The socket under rustls: every byte read is followed through the record headers, so
/// that [`Aligned::aligned`] says whether rustls holds part of a record.
pub struct Aligned {
    io: Stream,
    header: [u8; HEADER],
    have: usize,
    body_left: usize,
}

impl Aligned {
    pub fn new(io: Stream) -> Aligned {
        Aligned {
            io,
            header: [0; HEADER],
            have: 0,
            body_left: 0,
        }
    }

    pub fn get_ref(&self) -> &Stream {
        &self.io
    }

    /// Whether everything read so far ends at a record boundary.
    fn aligned(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }

    fn follow(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == HEADER {
                self.have = 0;
                self.body_left = usize::from(u16::from_be_bytes([self.header[3], self.header[4]]));
            }
        }
    }
}

impl AsyncRead for Aligned {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut this.io).poll_read(cx, buf))?;
        this.follow(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Aligned {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    /// Passed on: rustls writes its queued records in one vectored write, and a handshake
    /// that fails gets one last write for its alert (without this, only the first record
    /// would go, and a refused client would see no alert).
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Why a TLS connection did not move (the label of `baton_tls_not_moved_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Decrypted bytes nobody read yet.
    Plaintext,
    /// Part of a record read, or records not yet written.
    Ciphertext,
    /// A cipher suite the successor's provider cannot rebuild.
    Suite,
    /// The client closed (close_notify), or the connection failed.
    Closing,
    /// rustls refused to give its secrets (the connection is lost then).
    Extraction,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Plaintext => "plaintext_buffered",
            Refusal::Ciphertext => "ciphertext_buffered",
            Refusal::Suite => "suite",
            Refusal::Closing => "closing",
            Refusal::Extraction => "extraction",
        }
    }
}

/// One direction's record state: the sequence number of its next record, its key and IV.
#[derive(Serialize, Deserialize)]
pub struct Direction {
    pub seq: u64,
    key: Vec<u8>,
    iv: Vec<u8>,
}

impl Drop for Direction {
    fn drop(&mut self) {
        self.key.zeroize();
        self.iv.zeroize();
    }
}

impl std::fmt::Debug for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Direction {{ seq: {}, .. }}", self.seq)
    }
}

/// A TLS connection's record state, as it travels in a transfer record. Its keys are
/// zeroized when it is dropped; `Debug` shows none of them.
#[derive(Debug, Serialize, Deserialize)]
pub struct Secrets {
    /// The cipher suite's IANA number (it says the protocol version too).
    pub suite: u16,
    /// Server to client, and client to server.
    pub tx: Direction,
    pub rx: Direction,
    /// The protocol ALPN chose (`http/1.1`, or none).
    #[serde(default)]
    pub alpn: Option<Vec<u8>>,
}

impl Secrets {
    fn direction(seq: u64, secrets: ConnectionTrafficSecrets) -> Direction {
        let (key, iv) = match &secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv }
            | ConnectionTrafficSecrets::Aes256Gcm { key, iv }
            | ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (key.as_ref().to_vec(), iv.as_ref().to_vec()),
            // A variant a later rustls adds: the suite check refused it before extraction.
            _ => (Vec::new(), Vec::new()),
        };
        Direction { seq, key, iv }
    }
}

/// The cipher suite of this number in the provider baton uses (*ring*).
fn suite_of(number: u16) -> Option<SupportedCipherSuite> {
    rustls::crypto::ring::ALL_CIPHER_SUITES
        .iter()
        .copied()
        .find(|s| u16::from(s.suite()) == number)
}

/// Whether the suite of this number is a TLS 1.2 one (its records carry their real content
/// type, and a handshake record is a renegotiation).
fn is_tls12(number: u16) -> bool {
    matches!(suite_of(number), Some(SupportedCipherSuite::Tls12(_)))
}

/// Gives rustls's key derivation our key bytes as its output: the only public way to make
/// an `AeadKey` shorter than 32 bytes (AES-128's) is `derive_traffic_key`, which takes an
/// `HkdfExpander` and cuts the key to the suite's length. No derivation happens here.
struct GivenKey<'a>(&'a [u8]);

impl HkdfExpander for GivenKey<'_> {
    fn expand_slice(&self, _info: &[&[u8]], output: &mut [u8]) -> Result<(), OutputLengthError> {
        let out = output.get_mut(..self.0.len()).ok_or(OutputLengthError)?;
        out.copy_from_slice(self.0);
        Ok(())
    }

    fn expand_block(&self, _info: &[&[u8]]) -> OkmBlock {
        OkmBlock::new(self.0)
    }

    fn hash_len(&self) -> usize {
        32
    }
}

/// A direction's sealer and the other's opener.
type Sealers = (Box<dyn MessageEncrypter>, Box<dyn MessageDecrypter>);

/// The suite's encrypter and decrypter for `secrets`.
fn rebuild(secrets: &Secrets) -> Result<Sealers, String> {
    match suite_of(secrets.suite) {
        Some(SupportedCipherSuite::Tls13(suite)) => rebuild13(suite, secrets),
        Some(SupportedCipherSuite::Tls12(suite)) => rebuild12(suite, secrets),
        None => Err(format!("cipher suite {:#06x} unknown here", secrets.suite)),
    }
}

/// TLS 1.2's: rustls extracts each direction's IV as the fixed part (4 bytes for AES-GCM,
/// all 12 for ChaCha20) followed by the explicit nonce's start, as its encrypter takes them.
fn rebuild12(suite: &rustls::Tls12CipherSuite, secrets: &Secrets) -> Result<Sealers, String> {
    let aead = suite.aead_alg;
    let shape = aead.key_block_shape();
    for d in [&secrets.tx, &secrets.rx] {
        if d.key.len() != shape.enc_key_len || d.iv.len() != 12 || shape.fixed_iv_len > 12 {
            return Err(format!("a key of {} bytes and an IV of {}", d.key.len(), d.iv.len()));
        }
    }
    let fixed = shape.fixed_iv_len;
    let (tx, rx) = (&secrets.tx, &secrets.rx);
    let enc = aead.encrypter(aead_key(&tx.key)?, &tx.iv[..fixed], &tx.iv[fixed..]);
    let dec = aead.decrypter(aead_key(&rx.key)?, &rx.iv[..fixed]);
    Ok((enc, dec))
}

/// An `AeadKey` of exactly `key`'s bytes: rustls makes one of a length other than 32 only
/// through a TLS 1.3 algorithm's key derivation, so one of that key length cuts it.
fn aead_key(key: &[u8]) -> Result<AeadKey, String> {
    let aead = rustls::crypto::ring::ALL_CIPHER_SUITES
        .iter()
        .filter_map(|s| s.tls13())
        .map(|s| s.aead_alg)
        .find(|a| a.key_len() == key.len())
        .ok_or_else(|| format!("no AEAD here takes a key of {} bytes", key.len()))?;
    Ok(rustls::internal::derive_traffic_key(&GivenKey(key), aead))
}

fn rebuild13(suite: &Tls13CipherSuite, secrets: &Secrets) -> Result<Sealers, String> {
    let aead = suite.aead_alg;
    let parts = |d: &Direction| -> Result<(AeadKey, Iv), String> {
        if d.key.len() != aead.key_len() || d.iv.len() != 12 {
            return Err(format!("a key of {} bytes and an IV of {}", d.key.len(), d.iv.len()));
        }
        let key = rustls::internal::derive_traffic_key(&GivenKey(&d.key), aead);
        Ok((key, Iv::copy(&d.iv)))
    };
    let (tx_key, tx_iv) = parts(&secrets.tx)?;
    let (rx_key, rx_iv) = parts(&secrets.rx)?;
    Ok((aead.encrypter(tx_key, tx_iv), aead.decrypter(rx_key, rx_iv)))
}

/// A client connection on a TLS listener: rustls's own, or one resumed from moved secrets.
pub enum TlsClient {
    Live(Box<TlsStream<Aligned>>),
    Resumed(Box<Resumed>),
}

impl TlsClient {
    pub fn socket(&self) -> &Stream {
        match self {
            TlsClient::Live(s) => s.get_ref().0.get_ref(),
            TlsClient::Resumed(r) => &r.io,
        }
    }

    pub fn alpn(&self) -> Option<&[u8]> {
        match self {
            TlsClient::Live(s) => s.get_ref().1.alpn_protocol(),
            TlsClient::Resumed(r) => r.secrets.alpn.as_deref(),
        }
    }

    /// Ready at once when decrypted bytes wait (a request that came with the last
    /// handshake flight) or the client closed; otherwise the socket's readiness.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self {
            TlsClient::Live(s) if !s.get_ref().1.wants_read() => Poll::Ready(Ok(())),
            TlsClient::Resumed(r) if r.plain_pos < r.plain.len() || !r.inbuf.is_empty() || r.read_closed => {
                Poll::Ready(Ok(()))
            }
            _ => self.socket().poll_readable(cx),
        }
    }

    /// The socket and the record state, if nothing is buffered either way; else the
    /// connection back (`None` if rustls failed after giving up its state) and why.
    pub fn take_apart(self) -> Result<(Stream, Secrets), (Option<TlsClient>, Refusal)> {
        match self {
            TlsClient::Live(live) => take_live(live).map_err(|(l, r)| (l.map(TlsClient::Live), r)),
            TlsClient::Resumed(r) => r.take_apart().map_err(|(r, why)| (Some(TlsClient::Resumed(r)), why)),
        }
    }

    /// A connection another generation took apart, going on from its record state.
    pub fn resume(io: Stream, secrets: Secrets) -> Result<TlsClient, String> {
        let (enc, dec) = rebuild(&secrets)?;
        let tls12 = is_tls12(secrets.suite);
        Ok(TlsClient::Resumed(Box::new(Resumed {
            tls12,
            io,
            enc,
            dec,
            secrets,
            inbuf: Vec::new(),
            plain: Vec::new(),
            plain_pos: 0,
            out: Vec::new(),
            out_pos: 0,
            read_closed: false,
            write_closed: false,
        })))
    }
}

/// rustls's connection back when it stays (`None`: lost), and why.
type KeptLive = (Option<Box<TlsStream<Aligned>>>, Refusal);

/// rustls's connection taken apart, once the checks rustls does not make passed.
fn take_live(mut live: Box<TlsStream<Aligned>>) -> Result<(Stream, Secrets), KeptLive> {
    let (aligned, conn) = live.get_mut();
    let Some(suite) = conn.negotiated_cipher_suite().map(|s| u16::from(s.suite())) else {
        return Err((Some(live), Refusal::Suite));
    };
    if suite_of(suite).is_none() {
        return Err((Some(live), Refusal::Suite));
    }
    if !aligned.aligned() {
        return Err((Some(live), Refusal::Ciphertext));
    }
    let state = match conn.process_new_packets() {
        Ok(state) => state,
        Err(_) => return Err((Some(live), Refusal::Closing)),
    };
    if state.peer_has_closed() {
        return Err((Some(live), Refusal::Closing));
    }
    if state.plaintext_bytes_to_read() > 0 {
        return Err((Some(live), Refusal::Plaintext));
    }
    if state.tls_bytes_to_write() > 0 {
        return Err((Some(live), Refusal::Ciphertext));
    }
    let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
    let (aligned, conn) = (*live).into_inner();
    let extracted = conn
        .dangerous_extract_secrets()
        .map_err(|_| (None, Refusal::Extraction))?;
    let secrets = Secrets {
        suite,
        tx: Secrets::direction(extracted.tx.0, extracted.tx.1),
        rx: Secrets::direction(extracted.rx.0, extracted.rx.1),
        alpn,
    };
    Ok((aligned.io, secrets))
}

/// The record layer (TLS 1.3's or 1.2's) over a moved connection's socket, from its [`Secrets`]: records
/// framed here, sealed and opened by the suite's own encrypter and decrypter.
pub struct Resumed {
    io: Stream,
    enc: Box<dyn MessageEncrypter>,
    dec: Box<dyn MessageDecrypter>,
    /// The keys (to move again) and the next sequence numbers.
    secrets: Secrets,
    /// Read from the socket, not yet a whole record.
    inbuf: Vec<u8>,
    /// Decrypted, not yet read from `plain_pos` on.
    plain: Vec<u8>,
    plain_pos: usize,
    /// Sealed records not yet written, from `out_pos` on.
    out: Vec<u8>,
    out_pos: usize,
    /// The client's close_notify came (reads end).
    read_closed: bool,
    /// Ours was queued.
    write_closed: bool,
    /// A TLS 1.2 suite's records (their type in the clear).
    tls12: bool,
}

/// An error that ends a resumed connection.
fn broken(why: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, why.into())
}

impl Resumed {
    fn take_apart(self: Box<Self>) -> Result<(Stream, Secrets), (Box<Resumed>, Refusal)> {
        if self.read_closed || self.write_closed {
            return Err((self, Refusal::Closing));
        }
        if self.plain_pos < self.plain.len() {
            return Err((self, Refusal::Plaintext));
        }
        if !self.inbuf.is_empty() || self.out_pos < self.out.len() {
            return Err((self, Refusal::Ciphertext));
        }
        let this = *self;
        Ok((this.io, this.secrets))
    }

    /// Seals one record of `typ` into `out`.
    fn seal(&mut self, typ: ContentType, payload: &[u8]) -> io::Result<()> {
        // The limit leaves room for the close_notify that ends it.
        if self.secrets.tx.seq >= MAX_RECORDS + u64::from(typ == ContentType::Alert) {
            return Err(broken("the moved connection's key reached its record limit"));
        }
        let msg = OutboundPlainMessage {
            typ,
            version: ProtocolVersion::TLSv1_2,
            payload: OutboundChunks::Single(payload),
        };
        let sealed = self
            .enc
            .encrypt(msg, self.secrets.tx.seq)
            .map_err(|e| broken(format!("cannot seal a record: {e}")))?;
        self.secrets.tx.seq += 1;
        if self.out_pos == self.out.len() {
            self.out.clear();
            self.out_pos = 0;
        }
        self.out.extend_from_slice(&sealed.encode());
        Ok(())
    }

    /// Queues our close_notify (once).
    fn queue_close_notify(&mut self) -> io::Result<()> {
        if !self.write_closed {
            self.write_closed = true;
            self.seal(ContentType::Alert, &[1, 0])?;
        }
        Ok(())
    }

    /// Writes what is sealed; `Ready(Ok)` once all of it is on the socket.
    fn poll_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_pos += n;
        }
        (self.out, self.out_pos) = (Vec::new(), 0);
        Poll::Ready(Ok(()))
    }

    /// The length of the whole record at the start of `inbuf`, once it is all there.
    fn whole_record(&self) -> io::Result<Option<usize>> {
        let Some(header) = self.inbuf.get(..HEADER) else {
            return Ok(None);
        };
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        // TLS 1.3 hides the type (every record says application data); TLS 1.2 shows it:
        // an alert, a handshake message (a renegotiation) or data.
        let typed = matches!(header[0], 21 | 22) && self.tls12;
        if (header[0] != 23 && !typed) || len > MAX_CIPHERTEXT {
            return Err(broken(format!("not a TLS record (type {}, {len} bytes)", header[0])));
        }
        Ok((self.inbuf.len() >= HEADER + len).then_some(HEADER + len))
    }

    /// Opens the record of `len` bytes at the start of `inbuf` and acts on what it holds.
    fn open(&mut self, len: usize) -> io::Result<()> {
        if self.secrets.rx.seq >= MAX_RECORDS {
            self.queue_close_notify()?;
            return Err(broken("the moved connection's key reached its record limit"));
        }
        let mut record: Vec<u8> = self.inbuf.drain(..len).collect();
        if self.inbuf.is_empty() {
            // An idle connection keeps no buffer (the first read made one of 16 KiB).
            self.inbuf = Vec::new();
        }
        // The header's type: TLS 1.2's decrypter authenticates it.
        let typ = ContentType::from(record[0]);
        let msg = InboundOpaqueMessage::new(typ, ProtocolVersion::TLSv1_2, &mut record[HEADER..]);
        let plain = self
            .dec
            .decrypt(msg, self.secrets.rx.seq)
            .map_err(|e| broken(format!("cannot open a record: {e}")))?;
        self.secrets.rx.seq += 1;
        match plain.typ {
            ContentType::ApplicationData => {
                if self.plain_pos == self.plain.len() {
                    self.plain.clear();
                    self.plain_pos = 0;
                }
                self.plain.extend_from_slice(plain.payload);
                Ok(())
            }
            ContentType::Alert if plain.payload.get(1) == Some(&0) => {
                // close_notify: reads end; ours answers it when the connection closes.
                self.read_closed = true;
                Ok(())
            }
            ContentType::Alert => Err(broken(format!("the client sent alert {:?}", plain.payload))),
            ContentType::Handshake if self.tls12 => {
                // A renegotiation: rustls refuses them, and a moved connection has no
                // handshake state to carry one out.
                self.queue_close_notify()?;
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the client renegotiated a moved TLS 1.2 connection: closed with close_notify",
                ))
            }
            ContentType::Handshake if plain.payload.first() == Some(&24) => {
                // KeyUpdate: the next key derives from a traffic secret we do not have.
                self.queue_close_notify()?;
                Err(io::Error::new(
                    io::ErrorKind::ConnectionAborted,
                    "the client sent a KeyUpdate to a moved connection: closed with close_notify",
                ))
            }
            other => Err(broken(format!("unexpected {other:?} record after a move"))),
        }
    }

    /// Reads more of the socket into `inbuf`; `false` at its end.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        let mut chunk = [0u8; 16 * 1024];
        let mut buf = ReadBuf::new(&mut chunk);
        ready!(Pin::new(&mut self.io).poll_read(cx, &mut buf))?;
        self.inbuf.extend_from_slice(buf.filled());
        Poll::Ready(Ok(!buf.filled().is_empty()))
    }
}

impl AsyncRead for Resumed {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_pos < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.plain_pos);
                buf.put_slice(&this.plain[this.plain_pos..this.plain_pos + n]);
                this.plain_pos += n;
                if this.plain_pos == this.plain.len() {
                    (this.plain, this.plain_pos) = (Vec::new(), 0);
                }
                return Poll::Ready(Ok(()));
            }
            if this.read_closed {
                return Poll::Ready(Ok(()));
            }
            if let Some(len) = this.whole_record()? {
                if let Err(e) = this.open(len) {
                    // A queued close_notify goes out before the error ends the connection.
                    let _ = this.poll_out(cx);
                    return Poll::Ready(Err(e));
                }
                continue;
            }
            if !ready!(this.poll_fill(cx))? {
                if this.inbuf.is_empty() {
                    return Poll::Ready(Ok(()));
                }
                return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
            }
        }
    }
}

impl AsyncWrite for Resumed {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        if this.write_closed {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        let n = buf.len().min(MAX_PLAINTEXT);
        if n == 0 {
            return Poll::Ready(Ok(0));
        }
        if let Err(e) = this.seal(ContentType::ApplicationData, &buf[..n]) {
            let _ = this.queue_close_notify();
            let _ = this.poll_out(cx);
            return Poll::Ready(Err(e));
        }
        // Started now; flushed by the next write or flush.
        if let Poll::Ready(Err(e)) = this.poll_out(cx) {
            return Poll::Ready(Err(e));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.queue_close_notify()?;
        ready!(this.poll_out(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

impl AsyncRead for TlsClient {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsClient::Live(s) => Pin::new(&mut **s).poll_read(cx, buf),
            TlsClient::Resumed(r) => Pin::new(&mut **r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for TlsClient {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TlsClient::Live(s) => Pin::new(&mut **s).poll_write(cx, buf),
            TlsClient::Resumed(r) => Pin::new(&mut **r).poll_write(cx, buf),
        }
    }

    /// rustls takes a head and its body in one call (hyper writes vectored when told so);
    /// a resumed connection seals one slice at a time.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            TlsClient::Live(s) => Pin::new(&mut **s).poll_write_vectored(cx, bufs),
            TlsClient::Resumed(r) => Pin::new(&mut **r).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        matches!(self, TlsClient::Live(_))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsClient::Live(s) => Pin::new(&mut **s).poll_flush(cx),
            TlsClient::Resumed(r) => Pin::new(&mut **r).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            TlsClient::Live(s) => Pin::new(&mut **s).poll_shutdown(cx),
            TlsClient::Resumed(r) => Pin::new(&mut **r).poll_shutdown(cx),
        }
    }
}

impl TlsClient {
    /// The socket alone, for a lingering close once the TLS side is shut.
    pub fn into_socket(self) -> Stream {
        match self {
            TlsClient::Live(s) => s.into_inner().0.io,
            TlsClient::Resumed(r) => r.io,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use rustls::crypto::ring::cipher_suite as cs;
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    type Client = tokio_rustls::client::TlsStream<tokio::net::UnixStream>;

    /// A handshake over a socketpair: baton's side as a connection on a TLS listener (with
    /// secret extraction, as `tls::certs` configures it), a rustls client speaking `suite`.
    async fn pair(suite: rustls::SupportedCipherSuite) -> (TlsClient, Client) {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let der = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .unwrap();
        server.enable_secret_extraction = true;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let version = match suite {
            rustls::SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
            rustls::SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
        };
        let only = rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::ring::default_provider()
        };
        let client = rustls::ClientConfig::builder_with_provider(Arc::new(only))
            .with_protocol_versions(&[version])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let accept = tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(Aligned::new(Stream::Unix(a)));
        let name = ServerName::try_from("localhost").unwrap();
        let connect = tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, b);
        let (server, client) = tokio::join!(accept, connect);
        (TlsClient::Live(Box::new(server.unwrap())), client.unwrap())
    }

    /// `n` bytes each way between the two ends.
    async fn exchange(server: &mut TlsClient, client: &mut Client, n: usize) {
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        let mut got = vec![0u8; n];
        let (wrote, read) = tokio::join!(client.write_all(&data), server.read_exact(&mut got));
        wrote.unwrap();
        read.unwrap();
        assert!(got == data, "the client's bytes arrive intact");
        let (wrote, read) = tokio::join!(
            async { server.write_all(&data).await.and(server.flush().await) },
            client.read_exact(&mut got)
        );
        wrote.unwrap();
        read.unwrap();
        assert!(got == data, "the server's bytes arrive intact");
    }

    /// Takes `server` apart and resumes it from its state, as a successor would.
    fn moved(server: TlsClient) -> TlsClient {
        let (stream, secrets) = server.take_apart().map_err(|(_, why)| why).expect("at rest it moves");
        TlsClient::resume(stream, secrets).expect("rebuilt")
    }

    #[tokio::test]
    async fn a_connection_goes_on_from_its_moved_state_with_each_suite() {
        let suites = [
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ];
        for suite in suites {
            let (mut server, mut client) = pair(suite).await;
            exchange(&mut server, &mut client, 1000).await;
            let mut server = moved(server);
            // More than one record each way, then a second move from the resumed state.
            exchange(&mut server, &mut client, 100_000).await;
            let mut server = moved(server);
            exchange(&mut server, &mut client, 10).await;
            // The client's close_notify ends reads; the server's answers it.
            client.shutdown().await.unwrap();
            let mut rest = Vec::new();
            assert_eq!(
                server.read_to_end(&mut rest).await.unwrap(),
                0,
                "{suite:?}: a clean end"
            );
            server.shutdown().await.unwrap();
            let end = client.read_to_end(&mut rest).await;
            assert!(
                end.is_ok(),
                "{suite:?}: rustls saw our close_notify, not a truncation: {end:?}"
            );
        }
    }

    #[tokio::test]
    async fn what_is_buffered_keeps_the_connection_here() {
        // Plaintext read by rustls but not by us.
        let (mut server, mut client) = pair(cs::TLS13_AES_128_GCM_SHA256).await;
        client.write_all(b"0123456789").await.unwrap();
        let mut one = [0u8; 1];
        server.read_exact(&mut one).await.unwrap();
        let Err((Some(mut server), Refusal::Plaintext)) = server.take_apart() else {
            panic!("unread plaintext stays")
        };
        let mut rest = [0u8; 9];
        server.read_exact(&mut rest).await.unwrap();
        assert_eq!(&rest, b"123456789", "and the connection goes on");
        // Part of a record: a header, its body not yet here.
        client.get_mut().0.write_all(&[23, 3, 3, 0, 40, 1, 2]).await.unwrap();
        let mut buf = [0u8; 1];
        let partial = tokio::time::timeout(std::time::Duration::from_millis(100), server.read(&mut buf)).await;
        assert!(partial.is_err(), "nothing to read yet");
        let Err((Some(_), Refusal::Ciphertext)) = server.take_apart() else {
            panic!("a partial record stays")
        };
    }

    #[tokio::test]
    async fn forged_state_and_bad_records_are_errors_not_panics() {
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let direction = |key: usize| Direction {
            seq: 0,
            key: vec![7; key],
            iv: vec![1; 12],
        };
        let forged = |suite, key| Secrets {
            suite,
            tx: direction(key),
            rx: direction(key),
            alpn: None,
        };
        let err = TlsClient::resume(Stream::Unix(a), forged(0x1301, 5))
            .err()
            .expect("refused");
        assert!(err.contains("a key of 5 bytes"), "{err}");
        let (a, _b) = tokio::net::UnixStream::pair().unwrap();
        let err = TlsClient::resume(Stream::Unix(a), forged(0x9999, 16))
            .err()
            .expect("refused");
        assert!(err.contains("unknown"), "{err}");
        // A record that does not open, and one that is not TLS 1.3's: errors to the reader.
        for garbage in [
            &[
                23u8, 3, 3, 0, 20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
            ][..],
            &[22, 3, 1, 0, 1, 0],
        ] {
            let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
            let mut server = TlsClient::resume(Stream::Unix(a), forged(0x1301, 16)).expect("well formed");
            b.write_all(garbage).await.unwrap();
            let err = server.read(&mut [0u8; 10]).await.expect_err("refused");
            assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        }
    }

    #[tokio::test]
    async fn a_moved_key_ends_at_its_record_limit_with_close_notify() {
        let (server, mut client) = pair(cs::TLS13_AES_128_GCM_SHA256).await;
        let (stream, mut secrets) = server.take_apart().map_err(|(_, why)| why).expect("moves");
        let tx = secrets.tx.seq;
        secrets.tx.seq = MAX_RECORDS;
        let mut server = TlsClient::resume(stream, secrets).expect("rebuilt");
        let err = server.write_all(b"one more").await.expect_err("refused");
        assert!(err.to_string().contains("record limit"), "{err}");
        // Its close_notify went out sealed at the limit's number: the client, which counts
        // from `tx`, cannot open it, and reads an error rather than the data.
        assert!(tx < MAX_RECORDS, "a fresh connection is far from it");
        let mut buf = [0u8; 8];
        assert!(client.read(&mut buf).await.is_err(), "nothing readable past the limit");
    }

    #[test]
    fn aligned_follows_record_boundaries_however_bytes_arrive() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .unwrap();
        let _in = rt.enter();
        let mut aligned = Aligned::new(Stream::Unix(tokio::net::UnixStream::from_std(a).unwrap()));
        let records = [&[23u8, 3, 3, 0, 2, 9, 9][..], &[23, 3, 3, 0, 0], &[21, 3, 3, 0, 1, 5]].concat();
        for split in 1..records.len() {
            let (head, tail) = records.split_at(split);
            aligned.follow(head);
            assert!(!aligned.aligned() || [7, 12].contains(&split), "split at {split}");
            aligned.follow(tail);
            assert!(aligned.aligned(), "whole records after split {split}");
        }
    }
}
