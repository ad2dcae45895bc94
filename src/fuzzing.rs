//! The properties the fuzz targets check (`fuzz/fuzz_targets/`), one function per target, for
//! the fuzz targets and their corpus replay (`tests/fuzz_corpora.rs`, on stable): a crash
//! found once stays found without nightly. Not an API (hidden from the docs).
//!
//! Each function takes the fuzzer's bytes and panics when a property fails:
//!
//! - [`request_head`]: [`strict::parse_head`] judges only complete lines (a prefix of a head
//!   is partial or has the whole head's verdict), a complete head's `Content-Length` framing
//!   is its field's decimal, and the stream checker gives the same verdict however the bytes
//!   are split;
//! - [`connection_tokens`]: [`hop_by_hop::token_list`] returns exactly the list's elements,
//!   each a non-empty token, or refuses a value that is not a token list;
//!   [`hop_by_hop::strip_hop_by_hop`] leaves no field `Connection` names;
//!   [`strict::content_length`] accepts exactly the decimals that fit in 64 bits;
//! - [`chunked`]: the bytes as the body of a chunked request: the stream checker's verdict
//!   does not depend on the split, and what it passes hyper's decoder reads;
//! - [`response_head`]: [`response_framing::relayed_head`] relays a head whose framing is
//!   unambiguous, without hop-by-hop fields, and relays that head unchanged.
//!
//! The stream checker's verdict ([`Verdict`]): what hyper reads, the read error, and the
//! first faulty head. It must hold that what hyper reads is what was sent, up to the error,
//! with a CR inserted before a bare LF and nothing else changed.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use crate::proxy::framing::{Framed, RequestSignal, STAND_IN_END};
use crate::proxy::strict::{self, Fault, Framing, Head};
use crate::proxy::{hop_by_hop, response_framing};

/// The request head limit of the fuzzed stream: above any input, so that every head is
/// judged (over the limit, hyper refuses the head before any fault is looked at).
const MAX_HEAD: usize = 1 << 20;

/// Ends every fuzzed stream: a head still open ends here, so that its fault is found however
/// the stream is split (an unfinished head is judged early or at its end, and hyper never
/// reads an unfinished one).
const END: &[u8] = b"\r\n\r\n";

/// The head the [`chunked`] target's bytes follow.
const CHUNKED_HEAD: &[u8] = b"POST http://a/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";

/// At most this many prefixes of a head are judged again (each costs a parse).
const MAX_PREFIXES: usize = 64;

/// The `request_head` target: `data` as a client's byte stream, starting with a head.
pub fn request_head(data: &[u8]) {
    head_prefixes(data);
    let stream = [data, END].concat();
    let verdict = stream_verdict(&stream);
    // The first head's fault is the one `parse_head` finds (a stream starting with a line end
    // skips it, or refuses a CR without LF).
    if !matches!(stream[0], b'\r' | b'\n') {
        let first = verdict.fault.filter(|(index, _)| *index == 0).map(|(_, f)| f);
        assert_eq!(first, strict::parse_head(&stream).err(), "the first head's fault");
    }
}

/// The `connection_tokens` target: `data` as a field value.
pub fn connection_tokens(data: &[u8]) {
    token_list_is_the_elements(data);
    connection_names_are_stripped(data);
    content_length_is_the_decimal(data);
}

/// The `chunked` target: `data` as a chunked request body (and what follows it).
pub fn chunked(data: &[u8]) {
    let stream = [CHUNKED_HEAD, data, END].concat();
    let verdict = stream_verdict(&stream);
    if verdict.error.is_none() {
        hyper_reads_the_chunks(&verdict.read[CHUNKED_HEAD.len()..]);
    }
}

/// The `response_head` target: `data` as a response's field lines (`name: value`, one a
/// line; lines that are not a valid field are left out). The head relayed to the client has
/// no hop-by-hop field, never both `Content-Length` and `Transfer-Encoding`, at most one
/// `Content-Length` and no `chunked` coding; relayed again, it stays as it is.
pub fn response_head(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let name = HeaderName::from_bytes(&line[..colon]);
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii());
        if let (Ok(name), Ok(value)) = (name, value) {
            headers.append(name, value);
        }
    }
    let Ok(()) = response_framing::relayed_head(&mut headers) else {
        return;
    };
    for name in [
        "connection",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "keep-alive",
    ] {
        assert!(!headers.contains_key(name), "{name} relayed");
    }
    let lengths = headers.get_all(http::header::CONTENT_LENGTH).iter().count();
    let codings = headers.get_all(http::header::TRANSFER_ENCODING).iter().count();
    assert!(
        lengths <= 1 && codings <= 1 && lengths + codings <= 1,
        "framing fields relayed"
    );
    if let Some(codings) = headers.get(http::header::TRANSFER_ENCODING) {
        let tokens = hop_by_hop::token_list(codings.as_bytes()).expect("relayed codings are a list");
        assert!(!tokens.is_empty(), "an empty Transfer-Encoding relayed");
        assert!(
            !tokens.iter().any(|t| t.eq_ignore_ascii_case(b"chunked")),
            "chunked relayed"
        );
    }
    let mut again = headers.clone();
    assert_eq!(response_framing::relayed_head(&mut again), Ok(()), "relayed again");
    assert_eq!(again, headers, "relayed again, changed");
}

/// A prefix of a head cut at a line end is partial or has the whole head's verdict: only
/// complete lines are judged, and once one is faulty (or the head is complete) the verdict
/// stays. A complete head is judged the same without what follows it.
fn head_prefixes(data: &[u8]) {
    let whole = strict::parse_head(data);
    if let Ok(Head::Complete { len, framing }) = whole {
        assert!(len <= data.len() && data[..len].ends_with(b"\n"), "complete at {len}");
        assert_eq!(strict::parse_head(&data[..len]), whole, "the head alone");
        if let Framing::Length(n) = framing {
            length_field_says(&data[..len], n);
        }
    }
    let mut decided = false;
    let cuts = data.iter().enumerate().filter(|(_, b)| **b == b'\n');
    for (lf, _) in cuts.take(MAX_PREFIXES) {
        // Before the LF (its line unfinished) and after it.
        for cut in [lf, lf + 1] {
            let prefix = strict::parse_head(&data[..cut]);
            if prefix == Ok(Head::Partial) {
                assert!(!decided, "partial again at {cut} after a verdict");
            } else {
                assert_eq!(prefix, whole, "the prefix of {cut} bytes");
                decided = true;
            }
        }
    }
}

/// A head framed by a length has one `Content-Length` field, and `n` is its value.
fn length_field_says(head: &[u8], n: u64) {
    let values: Vec<&[u8]> = head
        .split(|&b| b == b'\n')
        .filter_map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let (name, value) = line.split_at(line.iter().position(|&b| b == b':')?);
            name.eq_ignore_ascii_case(b"content-length")
                .then(|| value[1..].trim_ascii())
        })
        .collect();
    assert_eq!(values.len(), 1, "Content-Length fields of a head framed by length");
    assert_eq!(without_leading_zeros(values[0]), n.to_string().as_bytes());
}

/// A decimal without its leading zeros (`0` stays).
fn without_leading_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&b| b == b'0').count();
    &digits[zeros.min(digits.len().saturating_sub(1))..]
}

/// What the stream checker makes of a client's bytes: what hyper reads (until the end or a
/// read error), the error, and the first faulty head with its request's index.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    read: Vec<u8>,
    error: Option<String>,
    fault: Option<(u64, Fault)>,
}

/// `stream` fed whole, in two pieces (split where its bytes say) and byte by byte, read in
/// reads of several sizes: one verdict, in which hyper reads what was sent.
fn stream_verdict(stream: &[u8]) -> Verdict {
    // From the bytes alone: the split, and whether a CONNECT is answered 2xx (a tunnel).
    let sum = stream
        .iter()
        .fold(0usize, |sum, &b| sum.wrapping_mul(31).wrapping_add(usize::from(b)));
    let tunnel = sum % 2 == 1;
    let at = sum % (stream.len() + 1);
    let whole = run(vec![stream.to_vec()], 64 * 1024, tunnel);
    let halves = vec![stream[..at].to_vec(), stream[at..].to_vec()];
    assert_eq!(run(halves.clone(), 7, tunnel), whole, "split at {at}, reads of 7");
    assert_eq!(run(halves, 64 * 1024, tunnel), whole, "split at {at}");
    let bytes = stream.iter().map(|&b| vec![b]).collect();
    assert_eq!(run(bytes, 2, tunnel), whole, "byte by byte");
    only_crs_inserted(stream, &whole);
    whole
}

/// A client's stream, the pieces one per read: what the framing hands hyper, in reads of at
/// most `cap` bytes. A CONNECT is answered as `tunnel` says.
fn run(pieces: Vec<Vec<u8>>, cap: usize, tunnel: bool) -> Verdict {
    // An empty piece would read as the end of the stream.
    let pieces: VecDeque<Vec<u8>> = pieces.into_iter().filter(|p| !p.is_empty()).collect();
    let sent: usize = pieces.iter().map(Vec::len).sum();
    let signal = Arc::new(RequestSignal::default());
    let mut framed = Framed::new(Pieces(pieces), signal.clone(), MAX_HEAD);
    let mut buf = vec![0; cap];
    let mut read = Vec::new();
    let mut waits = 0;
    let error = loop {
        match framed.read(&mut buf).now_or_never() {
            // The pieces never wait: the framing waits for a CONNECT's answer.
            None => {
                waits += 1;
                assert!(waits <= sent, "the framing waits with no CONNECT to answer");
                signal.answered_connect(tunnel);
            }
            Some(Ok(0)) => break None,
            Some(Ok(n)) => read.extend_from_slice(&buf[..n]),
            Some(Err(e)) => break Some(e.to_string()),
        }
    };
    let fault = (0..=sent as u64).find_map(|i| signal.fault(i).map(|f| (i, f)));
    Verdict { read, error, fault }
}

/// A stream that returns the given pieces, one per read, then the end (the framing's own
/// unit tests read through it too).
pub(crate) struct Pieces(pub(crate) VecDeque<Vec<u8>>);

impl AsyncRead for Pieces {
    fn poll_read(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(mut piece) = this.0.pop_front() {
            let n = piece.len().min(buf.remaining());
            buf.put_slice(&piece[..n]);
            if n < piece.len() {
                this.0.push_front(piece.split_off(n));
            }
        }
        Poll::Ready(Ok(()))
    }
}

/// What hyper read is what was sent (all of it, unless a read failed), but for a CR inserted
/// before an LF (a bare LF ending a line of chunked framing).
fn only_crs_inserted(sent: &[u8], verdict: &Verdict) {
    // An overlong method ends what hyper reads with a stand-in head (the method's first
    // bytes were read as sent): see `framing::overlong_method`.
    let long = verdict.fault.is_some_and(|(_, f)| f.reason == strict::LONG_METHOD);
    let read = match long {
        true => verdict
            .read
            .strip_suffix(STAND_IN_END)
            .expect("an overlong method's stand-in"),
        false => &verdict.read[..],
    };
    let mut s = 0;
    for (r, &b) in read.iter().enumerate() {
        if sent.get(s) == Some(&b) {
            s += 1;
        } else {
            // Not "an LF after no CR": the CR before it may be the last byte of chunk data.
            let lf = sent.get(s) == Some(&b'\n');
            assert!(b == b'\r' && lf, "byte {r} read is {b:#04x}, not sent byte {s}");
        }
    }
    if verdict.error.is_none() && !long {
        assert_eq!(s, sent.len(), "bytes sent and read without an error");
    }
}

/// `token_list` returns the list's elements, in order and without the whitespace around them:
/// every byte outside them is a comma or whitespace, and a comma separates any two. It refuses
/// only a value with a byte of none of these kinds, or whitespace inside an element.
fn token_list_is_the_elements(value: &[u8]) {
    let separator = |b: &u8| matches!(b, b',' | b' ' | b'\t');
    let Some(tokens) = hop_by_hop::token_list(value) else {
        let stray = value.iter().any(|b| !strict::is_tchar(*b) && !separator(b));
        let mut elements = value.split(|&b| b == b',').map(<[u8]>::trim_ascii);
        let spaced = elements.any(|e| e.iter().any(separator));
        assert!(stray || spaced, "a token list refused");
        return;
    };
    let base = value.as_ptr() as usize;
    let mut end = 0;
    for (i, token) in tokens.iter().enumerate() {
        assert!(
            !token.is_empty() && token.iter().all(|&b| strict::is_tchar(b)),
            "token {i}"
        );
        let start = token.as_ptr() as usize - base;
        assert!(start >= end && start + token.len() <= value.len(), "token {i} in place");
        let between = &value[end..start];
        assert!(between.iter().all(separator), "only separators before token {i}");
        assert!(i == 0 || between.contains(&b','), "a comma before token {i}");
        end = start + token.len();
    }
    assert!(
        value[end..].iter().all(separator),
        "only separators after the last token"
    );
    assert!(value.iter().all(|b| strict::is_tchar(*b) || separator(b)));
}

/// A request with `Connection: value`: stripped, no field it names is left (nor any
/// hop-by-hop field), and the others are; refused, the fields are as they were.
fn connection_names_are_stripped(value: &[u8]) {
    let Ok(connection) = HeaderValue::from_bytes(value) else {
        return; // not a value hyper would have parsed
    };
    let mut headers = HeaderMap::new();
    headers.insert(http::header::CONNECTION, connection);
    headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    headers.insert("x-kept", HeaderValue::from_static("1"));
    let tokens = hop_by_hop::token_list(value).unwrap_or_default();
    let named: Vec<HeaderName> = tokens.iter().filter_map(|t| HeaderName::from_bytes(t).ok()).collect();
    // Not `Connection` itself: its value is the one under test.
    for name in named.iter().filter(|n| *n != http::header::CONNECTION) {
        headers.insert(name.clone(), HeaderValue::from_static("named"));
    }
    let before = headers.clone();
    match hop_by_hop::strip_hop_by_hop(&mut headers) {
        Ok(()) => {
            for name in named.iter().filter(|n| n.as_str() != "close") {
                assert!(!headers.contains_key(name), "{name} named by Connection");
            }
            for name in ["connection", "te"] {
                assert!(!headers.contains_key(name), "{name} is hop-by-hop");
            }
            let kept = named.iter().all(|n| n.as_str() != "x-kept");
            assert_eq!(headers.contains_key("x-kept"), kept, "x-kept, unless named");
        }
        Err(_) => {
            assert!(hop_by_hop::token_list(value).is_none(), "refused a token list");
            assert_eq!(headers, before, "refused, nothing stripped");
        }
    }
}

/// `content_length` accepts exactly the decimals that fit in 64 bits, and returns their value.
fn content_length_is_the_decimal(value: &[u8]) {
    let digits = !value.is_empty() && value.iter().all(u8::is_ascii_digit);
    let significant = without_leading_zeros(value);
    match strict::content_length(value) {
        Ok(n) => {
            assert!(digits, "accepted a Content-Length that is not a decimal");
            assert_eq!(significant, n.to_string().as_bytes(), "the decimal's value");
        }
        Err(_) => {
            let max = u64::MAX.to_string();
            let too_large = (significant.len(), significant) > (max.len(), max.as_bytes());
            assert!(!digits || too_large, "refused a Content-Length that fits in 64 bits");
        }
    }
}

/// A chunked body the framing passed (CRs inserted) as hyper's decoder reads it: `1*HEXDIG`,
/// any bytes but CR and LF up to CRLF, the data and CRLF; after the last chunk, trailer
/// lines up to an empty one. It must not fail where the framing passed (it may end first).
fn hyper_reads_the_chunks(mut body: &[u8]) {
    let line = |body: &[u8]| -> Option<usize> { body.iter().position(|&b| b == b'\n') };
    loop {
        let Some(lf) = line(body) else { return };
        let size_line = &body[..lf];
        assert!(size_line.ends_with(b"\r"), "a chunk-size line ends with CRLF");
        let hex = size_line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        assert!(hex > 0, "a chunk size");
        assert!(!size_line[..lf - 1].contains(&b'\r'), "no CR in a chunk-size line");
        let size = u64::from_str_radix(std::str::from_utf8(&size_line[..hex]).unwrap_or("?"), 16);
        let size = size.expect("a chunk size that fits in 64 bits");
        body = &body[lf + 1..];
        if size == 0 {
            return trailers_end(body);
        }
        let Some(after) = usize::try_from(size).ok().and_then(|n| body.get(n..)) else {
            return; // the stream ended in the data
        };
        match after {
            [b'\r', b'\n', rest @ ..] => body = rest,
            [] | [b'\r'] => return,
            _ => panic!("chunk data not followed by CRLF"),
        }
    }
}

/// Trailer field lines, each `name:value` CRLF, until an empty line.
fn trailers_end(mut body: &[u8]) {
    while let Some(lf) = body.iter().position(|&b| b == b'\n') {
        let line = &body[..lf];
        assert!(line.ends_with(b"\r"), "a trailer line ends with CRLF");
        if line.len() == 1 {
            return;
        }
        assert!(strict::field_line(&line[..lf - 1]).is_ok(), "a trailer field line");
        body = &body[lf + 1..];
    }
}
