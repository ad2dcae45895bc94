//! The request rules baton holds clients to, stricter than hyper's parser (RFC 9112 and
//! RFC 9110, taking the strict choice wherever the RFC leaves one): pure functions over the
//! bytes of a request head. [`crate::proxy::framing`] runs them on every head before hyper
//! parses it; a [`Fault`] becomes the request's answer (and the connection closes after it).
//!
//! - Request line: a method of at most 32 token bytes (longer: 501), a target of visible
//!   ASCII only, `HTTP/1.1` or `HTTP/1.0`, single spaces.
//! - Field lines: a token name directly followed by `:`, no obs-fold, and values without
//!   control bytes other than HTAB (VT, FF, DEL and the rest of C0 included).
//! - Host (§3.2): exactly one in an HTTP/1.1 request (absolute-form and CONNECT included),
//!   never a list, userinfo, a path or an empty value. The target's authority still decides
//!   where baton connects: these are validity checks, not routing.
//! - Framing (§6): at most one Content-Length, a decimal number; Transfer-Encoding only as
//!   exactly one final `chunked` (another coding: 501; chunked twice or not last: 400), never
//!   together with Content-Length, never in HTTP/1.0; a CONNECT carries no content.
//!
//! Bare LF line ends are accepted (§2.2), as hyper accepts them: the request is re-serialised
//! on its way to the origin, so nothing ambiguous is forwarded.

use http::StatusCode;

/// Why a request is refused, with its answer's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub status: StatusCode,
    pub reason: &'static str,
}

impl Fault {
    const fn bad(reason: &'static str) -> Fault {
        Fault {
            status: StatusCode::BAD_REQUEST,
            reason,
        }
    }

    pub(crate) const fn not_implemented(reason: &'static str) -> Fault {
        Fault {
            status: StatusCode::NOT_IMPLEMENTED,
            reason,
        }
    }
}

/// How a valid request's content is delimited, as hyper will read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No content: the next byte starts the next request.
    Empty,
    Length(u64),
    Chunked,
    /// A CONNECT: what follows is the tunnel if it is answered 2xx, else the next request.
    Connect,
    /// An HTTP/1.1 request without content that asks to switch protocols (`Upgrade`): what
    /// follows is the new protocol if it is answered 101, else the next request. One with
    /// content is framed by its length, and cannot switch (the service strips `Upgrade`).
    Upgrade,
}

/// What [`parse_head`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Head {
    /// No empty line yet, and nothing wrong in the complete lines so far.
    Partial,
    /// A valid head of `len` bytes (through its empty line).
    Complete { len: usize, framing: Framing },
}

/// The longest method accepted; a longer one is answered 501.
pub const MAX_METHOD: usize = 32;
/// The reason a longer one is refused with.
pub const LONG_METHOD: &str = "method longer than 32 bytes";

/// Parses the request head at the start of `buf` (its request line first: empty lines before
/// it are the caller's). Only complete lines are judged, so a fault in a partial head is
/// reported as soon as its line is complete.
pub fn parse_head(buf: &[u8]) -> Result<Head, Fault> {
    let Some((end, _)) = scan_line(buf, 0) else {
        return Ok(Head::Partial);
    };
    let start = request_line(strip_cr(&buf[..end]))?;
    let mut fields = Fields::default();
    let mut at = end + 1;
    loop {
        let Some((end, control)) = scan_line(buf, at) else {
            return Ok(Head::Partial);
        };
        let line = strip_cr(&buf[at..end]);
        at = end + 1;
        if line.is_empty() {
            let framing = fields.framing(start)?;
            return Ok(Head::Complete { len: at, framing });
        }
        let (name, value) = field_parts(line)?;
        if control {
            return Err(CONTROL_IN_VALUE);
        }
        fields.add(name, value)?;
    }
}

const CONTROL_IN_VALUE: Fault = Fault::bad("control byte in a field value");

/// Checks one field line (`name: value`, without its line end) of a header or trailer
/// section; returns the name and the value without surrounding whitespace. (The fuzz
/// targets hold a chunked body's trailer lines to it: `crate::fuzzing`.)
pub fn field_line(line: &[u8]) -> Result<(&[u8], &[u8]), Fault> {
    let (name, value) = field_parts(line)?;
    if !value.iter().all(|&b| is_field_byte(b)) {
        return Err(CONTROL_IN_VALUE);
    }
    Ok((name, value))
}

/// A field line's name (checked) and value (trimmed, its bytes not checked).
fn field_parts(line: &[u8]) -> Result<(&[u8], &[u8]), Fault> {
    let colon = line.iter().position(|&b| !is_tchar(b)).unwrap_or(line.len());
    if colon == 0 {
        return Err(if matches!(line.first(), Some(b' ' | b'\t')) {
            Fault::bad("obsolete line folding in a field")
        } else {
            Fault::bad("invalid field name")
        });
    }
    if line.get(colon) != Some(&b':') {
        return Err(Fault::bad("invalid field name"));
    }
    Ok((&line[..colon], trim_ows(&line[colon + 1..])))
}

/// A Host value (RFC 9110 §7.2): `uri-host [":" port]`, no userinfo, path or list.
pub fn check_host(value: &[u8]) -> Result<(), Fault> {
    // One pass finds the worst byte class; a plain name without port needs nothing more.
    let worst = value.iter().fold(0, |worst, &b| worst.max(HOST[usize::from(b)]));
    match worst {
        _ if value.is_empty() => Err(Fault::bad("empty Host")),
        REG_NAME => Ok(()),
        LIST => Err(Fault::bad("Host with more than one value")),
        USERINFO => Err(Fault::bad("Host with userinfo")),
        PATH => Err(Fault::bad("Host with a path")),
        INVALID => Err(Fault::bad("invalid Host")),
        _ => host_and_port(value).ok_or(Fault::bad("invalid Host")),
    }
}

/// A Host with a port, an IP literal or a pct-encoded byte.
fn host_and_port(value: &[u8]) -> Option<()> {
    let port = if let Some(literal) = value.strip_prefix(b"[") {
        let close = literal.iter().position(|&b| b == b']')?;
        let inside = &literal[..close];
        let ip = |b: &u8| b.is_ascii_hexdigit() || *b == b':' || *b == b'.';
        (!inside.is_empty() && inside.iter().all(ip)).then_some(())?;
        &literal[close + 1..]
    } else {
        let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
        (end > 0 && reg_name(&value[..end])).then_some(())?;
        &value[end..]
    };
    match port.split_first() {
        None => Some(()),
        Some((b':', digits)) if digits.len() <= 5 && digits.iter().all(u8::is_ascii_digit) => Some(()),
        Some(_) => None,
    }
}

/// A reg-name or IPv4 address: unreserved, pct-encoded and sub-delims but the comma.
fn reg_name(host: &[u8]) -> bool {
    let mut i = 0;
    while i < host.len() {
        if host[i] == b'%' {
            let hex = host.get(i + 1..i + 3);
            if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                return false;
            }
            i += 3;
        } else if HOST[usize::from(host[i])] == REG_NAME {
            i += 1;
        } else {
            return false;
        }
    }
    true
}

/// Byte classes of a Host value, by how bad they are.
const REG_NAME: u8 = 0;
const STRUCTURE: u8 = 1;
const INVALID: u8 = 2;
const PATH: u8 = 3;
const USERINFO: u8 = 4;
const LIST: u8 = 5;

static HOST: [u8; 256] = {
    let mut table = [INVALID; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' => REG_NAME,
            b'-' | b'.' | b'_' | b'~' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b';' | b'=' => {
                REG_NAME
            }
            b':' | b'[' | b']' | b'%' => STRUCTURE,
            b'/' | b'?' | b'#' => PATH,
            b'@' => USERINFO,
            b',' => LIST,
            _ => INVALID,
        };
        i += 1;
    }
    table
};

/// A Content-Length value: one decimal number that fits in 64 bits.
pub fn content_length(value: &[u8]) -> Result<u64, Fault> {
    let invalid = Fault::bad("invalid Content-Length");
    if value.is_empty() {
        return Err(invalid);
    }
    value.iter().try_fold(0u64, |n, &b| {
        if !b.is_ascii_digit() {
            return Err(invalid);
        }
        n.checked_mul(10)
            .and_then(|n| n.checked_add(u64::from(b - b'0')))
            .ok_or(invalid)
    })
}

/// Whether `start`, the first bytes of a request line, already holds a method longer than
/// [`MAX_METHOD`]: its first `MAX_METHOD + 1` bytes are token bytes.
pub fn long_method(start: &[u8]) -> bool {
    start.len() > MAX_METHOD && start[..=MAX_METHOD].iter().all(|&b| is_tchar(b))
}

/// What the request line says about the rest of the head.
#[derive(Debug, Clone, Copy)]
struct Start {
    connect: bool,
    http11: bool,
}

/// `method SP request-target SP HTTP-version`.
fn request_line(line: &[u8]) -> Result<Start, Fault> {
    // Judged first, as the framing judges it before the line ends (`long_method`).
    if long_method(line) {
        return Err(Fault::not_implemented(LONG_METHOD));
    }
    let (rest, http11) = if let Some(rest) = line.strip_suffix(b" HTTP/1.1") {
        (rest, true)
    } else if let Some(rest) = line.strip_suffix(b" HTTP/1.0") {
        (rest, false)
    } else if line.iter().filter(|&&b| b == b' ').count() < 2 {
        return Err(Fault::bad("malformed request line"));
    } else {
        return Err(Fault::bad("unsupported HTTP version"));
    };
    let Some(sp) = rest.iter().position(|&b| b == b' ') else {
        return Err(Fault::bad("malformed request line"));
    };
    let (method, target) = (&rest[..sp], &rest[sp + 1..]);
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(Fault::bad("invalid method"));
    }
    if target.is_empty() || !all_graphic(target) {
        return Err(Fault::bad("request target with a space, a control or a non-ASCII byte"));
    }
    Ok(Start {
        connect: method == b"CONNECT",
        http11,
    })
}

/// The header fields that decide validity and framing, gathered line by line.
#[derive(Debug, Default)]
struct Fields {
    hosts: u32,
    length: Option<u64>,
    codings: Option<Codings>,
    /// An `Upgrade` field was seen (its value is the service's to judge).
    upgrade: bool,
}

impl Fields {
    fn add(&mut self, name: &[u8], value: &[u8]) -> Result<(), Fault> {
        // Only four names matter; the length check first keeps the others cheap.
        match name.len() {
            7 if name.eq_ignore_ascii_case(b"upgrade") => {
                self.upgrade = true;
                Ok(())
            }
            4 if name.eq_ignore_ascii_case(b"host") => {
                self.hosts += 1;
                if self.hosts > 1 {
                    return Err(Fault::bad("more than one Host field"));
                }
                check_host(value)
            }
            14 if name.eq_ignore_ascii_case(b"content-length") => {
                if self.length.is_some() {
                    return Err(Fault::bad("more than one Content-Length field"));
                }
                self.length = Some(content_length(value)?);
                Ok(())
            }
            17 if name.eq_ignore_ascii_case(b"transfer-encoding") => self.codings.get_or_insert_default().add(value),
            _ => Ok(()),
        }
    }

    fn framing(&self, start: Start) -> Result<Framing, Fault> {
        if start.http11 && self.hosts == 0 {
            return Err(Fault::bad("HTTP/1.1 request without Host"));
        }
        if let Some(codings) = &self.codings {
            if !start.http11 {
                return Err(Fault::bad("Transfer-Encoding in an HTTP/1.0 request"));
            }
            if self.length.is_some() {
                return Err(Fault::bad("both Content-Length and Transfer-Encoding"));
            }
            codings.check()?;
            if start.connect {
                return Err(Fault::bad("CONNECT request with content"));
            }
            return Ok(Framing::Chunked);
        }
        match self.length {
            _ if start.connect && self.length.unwrap_or(0) > 0 => Err(Fault::bad("CONNECT request with content")),
            _ if start.connect => Ok(Framing::Connect),
            None | Some(0) if self.upgrade && start.http11 => Ok(Framing::Upgrade),
            None | Some(0) => Ok(Framing::Empty),
            Some(n) => Ok(Framing::Length(n)),
        }
    }
}

/// The transfer codings of every Transfer-Encoding line, in order.
#[derive(Debug, Default)]
struct Codings {
    count: u32,
    chunked: u32,
    last_is_chunked: bool,
}

impl Codings {
    /// One field value: a list of `token *( OWS ";" OWS parameter )`; empty elements are
    /// ignored (RFC 9110 §5.6.1).
    fn add(&mut self, value: &[u8]) -> Result<(), Fault> {
        for element in value.split(|&b| b == b',') {
            let element = trim_ows(element);
            if element.is_empty() {
                continue;
            }
            let name_end = element.iter().position(|&b| !is_tchar(b)).unwrap_or(element.len());
            let (name, rest) = element.split_at(name_end);
            if name.is_empty() || !(rest.is_empty() || trim_ows(rest).starts_with(b";")) {
                return Err(Fault::bad("malformed Transfer-Encoding"));
            }
            self.count += 1;
            self.last_is_chunked = name.eq_ignore_ascii_case(b"chunked");
            if self.last_is_chunked {
                self.chunked += 1;
                if !rest.is_empty() {
                    return Err(Fault::bad("chunked with parameters"));
                }
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), Fault> {
        if !self.last_is_chunked {
            Err(Fault::bad("chunked is not the final transfer coding"))
        } else if self.chunked > 1 {
            Err(Fault::bad("chunked applied more than once"))
        } else if self.count > 1 {
            Err(Fault::not_implemented("transfer coding other than chunked"))
        } else {
            Ok(())
        }
    }
}

/// The line of `buf` starting at `from`: the index of its LF, and whether it holds a control
/// byte other than HTAB (a CR right before the LF aside). Eight bytes at a time: a word
/// without a byte below 0x20 or DEL costs a few instructions.
fn scan_line(buf: &[u8], from: usize) -> Option<(usize, bool)> {
    let mut control = false;
    let mut i = from;
    while i < buf.len() {
        if let Some(word) = buf.get(i..i + 8) {
            let w = u64::from_le_bytes(word.try_into().unwrap_or_default());
            if !has_less(w, 0x20) && !has_less(w ^ (LO * 0x7f), 1) {
                i += 8;
                continue;
            }
        }
        for j in i..buf.len().min(i + 8) {
            match buf[j] {
                b'\n' => return Some((j, control)),
                b'\r' if buf.get(j + 1) == Some(&b'\n') => {}
                b => control |= !is_field_byte(b),
            }
        }
        i += 8;
    }
    None
}

const LO: u64 = 0x0101_0101_0101_0101;
const HI: u64 = 0x8080_8080_8080_8080;

/// Whether a byte of `w` is below `n` (exact for n <= 128).
fn has_less(w: u64, n: u8) -> bool {
    w.wrapping_sub(LO * u64::from(n)) & !w & HI != 0
}

/// Whether every byte is visible ASCII (0x21..=0x7e), eight at a time.
fn all_graphic(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    let clean = words.by_ref().all(|word| {
        let w = u64::from_le_bytes(word.try_into().unwrap_or_default());
        // Below 0x21, or 0x7f and above (adding 1 sets the high bit).
        !has_less(w, 0x21) && (w.wrapping_add(LO) | w) & HI == 0
    });
    clean && words.remainder().iter().all(u8::is_ascii_graphic)
}

fn strip_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// RFC 9110 §5.6.2 tchar.
pub fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

static TCHAR: [bool; 256] = {
    let mut table = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#' | b'$' | b'%' | b'&' | b'\'' | b'*' | b'+' | b'-' | b'.' | b'^' | b'_' | b'`' | b'|' | b'~'
            );
        i += 1;
    }
    table
};

/// A byte a field value may hold: HTAB, SP, VCHAR, obs-text.
pub fn is_field_byte(b: u8) -> bool {
    b == b'\t' || (b >= b' ' && b != 0x7f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(head: &str) -> Result<Framing, (u16, &'static str)> {
        match parse_head(head.as_bytes()) {
            Ok(Head::Complete { len, framing }) => {
                assert_eq!(len, head.len(), "{head:?}");
                Ok(framing)
            }
            Ok(Head::Partial) => panic!("partial: {head:?}"),
            Err(f) => Err((f.status.as_u16(), f.reason)),
        }
    }

    fn get(fields: &str) -> String {
        format!("GET http://a.example/ HTTP/1.1\r\n{fields}\r\n")
    }

    #[test]
    fn valid_heads_and_their_framing() {
        for (head, framing) in [
            (get("Host: a.example\r\n"), Framing::Empty),
            (get("Host: a.example:8080\r\nContent-Length: 0\r\n"), Framing::Empty),
            (get("Host: a\r\nContent-Length: 12\r\n"), Framing::Length(12)),
            (get("Host: a\r\nTransfer-Encoding: chunked\r\n"), Framing::Chunked),
            (get("Host: a\r\nTransfer-Encoding:   CHUNKED  \r\n"), Framing::Chunked),
            (
                get("host: [::1]:80\r\nX-Obs: caf\u{e9}\r\nX-Tab: a\tb\r\n"),
                Framing::Empty,
            ),
            (
                "CONNECT a.example:443 HTTP/1.1\r\nHost: a.example:443\r\n\r\n".into(),
                Framing::Connect,
            ),
            (
                "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 0\r\n\r\n".into(),
                Framing::Connect,
            ),
            ("GET http://a/ HTTP/1.0\r\n\r\n".into(), Framing::Empty),
            (
                "GET http://a/ HTTP/1.1\nHost: a\nContent-Length: 3\n\n".into(),
                Framing::Length(3),
            ),
            ("GET http://a/ HTTP/1.1\r\nHost: a\n\r\n".into(), Framing::Empty),
            (get("Host: a\r\nTransfer-Encoding: ,chunked,\r\n"), Framing::Chunked),
        ] {
            assert_eq!(verdict(&head), Ok(framing), "{head:?}");
        }
    }

    #[test]
    fn host_rules() {
        for (fields, reason) in [
            ("", "HTTP/1.1 request without Host"),
            ("Host: a\r\nHost: a\r\n", "more than one Host field"),
            ("Host: a\r\nHost: b\r\n", "more than one Host field"),
            ("Host: a, b\r\n", "Host with more than one value"),
            ("Host: u@a\r\n", "Host with userinfo"),
            ("Host: u:p@a:80\r\n", "Host with userinfo"),
            ("Host: a/x\r\n", "Host with a path"),
            ("Host: a?x\r\n", "Host with a path"),
            ("Host:\r\n", "empty Host"),
            ("Host:   \r\n", "empty Host"),
            ("Host: a b\r\n", "invalid Host"),
            ("Host: a:80:80\r\n", "invalid Host"),
            ("Host: a:x\r\n", "invalid Host"),
            ("Host: [::1\r\n", "invalid Host"),
            ("Host: :80\r\n", "invalid Host"),
            ("Host: a%zz\r\n", "invalid Host"),
        ] {
            assert_eq!(verdict(&get(fields)), Err((400, reason)), "{fields:?}");
        }
        let connect = "CONNECT a:443 HTTP/1.1\r\n\r\n";
        assert_eq!(verdict(connect), Err((400, "HTTP/1.1 request without Host")));
        for ok in [
            "a",
            "a.example:8080",
            "a:",
            "[::1]",
            "[::ffff:1.2.3.4]:80",
            "x%41y",
            "1.2.3.4",
        ] {
            assert_eq!(check_host(ok.as_bytes()), Ok(()), "{ok}");
        }
    }

    #[test]
    fn transfer_encoding_rules() {
        for (fields, status, reason) in [
            (
                "Transfer-Encoding: gzip",
                400,
                "chunked is not the final transfer coding",
            ),
            (
                "Transfer-Encoding: chunked, gzip",
                400,
                "chunked is not the final transfer coding",
            ),
            (
                "Transfer-Encoding: xchunked",
                400,
                "chunked is not the final transfer coding",
            ),
            ("Transfer-Encoding:", 400, "chunked is not the final transfer coding"),
            (
                "Transfer-Encoding: chunked, chunked",
                400,
                "chunked applied more than once",
            ),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
                400,
                "chunked applied more than once",
            ),
            (
                "Transfer-Encoding: identity, chunked",
                501,
                "transfer coding other than chunked",
            ),
            (
                "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked",
                501,
                "transfer coding other than chunked",
            ),
            ("Transfer-Encoding: chunked;x=1", 400, "chunked with parameters"),
            ("Transfer-Encoding: chun ked", 400, "malformed Transfer-Encoding"),
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked",
                400,
                "both Content-Length and Transfer-Encoding",
            ),
            (
                "Transfer-Encoding: chunked\r\nContent-Length: 5",
                400,
                "both Content-Length and Transfer-Encoding",
            ),
        ] {
            let head = get(&format!("Host: a\r\n{fields}\r\n"));
            assert_eq!(verdict(&head), Err((status, reason)), "{fields:?}");
        }
        let old = "POST http://a/ HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert_eq!(verdict(old), Err((400, "Transfer-Encoding in an HTTP/1.0 request")));
        let connect = "CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\nContent-Length: 5\r\n\r\n";
        assert_eq!(verdict(connect), Err((400, "CONNECT request with content")));
    }

    #[test]
    fn content_length_rules() {
        for (value, ok) in [
            ("0", Some(0)),
            ("007", Some(7)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("", None),
            ("+5", None),
            ("-1", None),
            ("1,2", None),
            ("5, 5", None),
            ("5 5", None),
            ("0x5", None),
        ] {
            assert_eq!(content_length(value.as_bytes()).ok(), ok, "{value:?}");
        }
        let twice = get("Host: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n");
        assert_eq!(verdict(&twice), Err((400, "more than one Content-Length field")));
    }

    #[test]
    fn field_and_request_line_rules() {
        for (name, line) in [
            ("VT", "X: a\x0bb"),
            ("FF", "X: a\x0cb"),
            ("DEL", "X: a\x7fb"),
            ("NUL", "X: a\0b"),
            ("ESC", "X: \x1b"),
            ("bare CR", "X: a\rb"),
        ] {
            let head = get(&format!("Host: a\r\n{line}\r\n"));
            assert_eq!(verdict(&head), Err((400, "control byte in a field value")), "{name}");
        }
        for (line, reason) in [
            (" folded", "obsolete line folding in a field"),
            ("X Y: 1", "invalid field name"),
            ("X : 1", "invalid field name"),
            (": 1", "invalid field name"),
            ("X", "invalid field name"),
        ] {
            let head = get(&format!("Host: a\r\n{line}\r\n"));
            assert_eq!(verdict(&head), Err((400, reason)), "{line:?}");
        }
        let long = "A".repeat(33);
        for (head, status, reason) in [
            (
                format!("{long} http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"),
                501,
                "method longer than 32 bytes",
            ),
            (
                "G(T http://a/ HTTP/1.1\r\nHost: a\r\n\r\n".into(),
                400,
                "invalid method",
            ),
            (
                "GET http://a/\u{e9} HTTP/1.1\r\nHost: a\r\n\r\n".into(),
                400,
                "request target with a space, a control or a non-ASCII byte",
            ),
            (
                "GET http://a/ b HTTP/1.1\r\nHost: a\r\n\r\n".into(),
                400,
                "request target with a space, a control or a non-ASCII byte",
            ),
            (
                "GET http://a/ HTTP/1.1 \r\nHost: a\r\n\r\n".into(),
                400,
                "unsupported HTTP version",
            ),
            ("GET\r\nHost: a\r\n\r\n".into(), 400, "malformed request line"),
            ("GET HTTP/1.1\r\nHost: a\r\n\r\n".into(), 400, "malformed request line"),
            (
                "GET  http://a/ HTTP/1.1\r\nHost: a\r\n\r\n".into(),
                400,
                "request target with a space, a control or a non-ASCII byte",
            ),
            (
                "GET http://a/ HTTP/2.0\r\nHost: a\r\n\r\n".into(),
                400,
                "unsupported HTTP version",
            ),
            ("GET http://a/\r\nHost: a\r\n\r\n".into(), 400, "malformed request line"),
        ] {
            assert_eq!(verdict(&head), Err((status, reason)), "{head:?}");
        }
        let exactly = "A".repeat(32);
        assert!(verdict(&format!("{exactly} http://a/ HTTP/1.1\r\nHost: a\r\n\r\n")).is_ok());
    }

    #[test]
    fn only_host_content_length_and_transfer_encoding_are_read() {
        // Fields of the same lengths as Host (4), Content-Length (14) and Transfer-Encoding
        // (17), with values those three would refuse: they are other fields, not judged.
        let others = "Date: x, y\r\nAccept-Charset: utf-8\r\nIf-Modified-Since: gzip\r\n";
        assert_eq!(verdict(&get(&format!("Host: a\r\n{others}"))), Ok(Framing::Empty));
        // The witness: under their own names the same values are refused.
        assert_eq!(
            verdict(&get("Host: x, y\r\n")),
            Err((400, "Host with more than one value"))
        );
        assert_eq!(
            verdict(&get("Host: a\r\nContent-Length: utf-8\r\n")),
            Err((400, "invalid Content-Length"))
        );
        assert_eq!(
            verdict(&get("Host: a\r\nTransfer-Encoding: gzip\r\n")),
            Err((400, "chunked is not the final transfer coding"))
        );
    }

    #[test]
    fn empty_method_and_empty_target_are_refused() {
        for (head, reason) in [
            (" http://a/ HTTP/1.1\r\nHost: a\r\n\r\n", "invalid method"),
            (
                "GET  HTTP/1.1\r\nHost: a\r\n\r\n",
                "request target with a space, a control or a non-ASCII byte",
            ),
        ] {
            assert_eq!(verdict(head), Err((400, reason)), "{head:?}: an empty part is no token");
        }
        // The witness: with both parts present the line is good.
        assert_eq!(verdict("G http://a/ HTTP/1.1\r\nHost: a\r\n\r\n"), Ok(Framing::Empty));
    }

    #[test]
    fn a_transfer_coding_without_a_name_is_malformed() {
        // Parameters need a coding to belong to: `;x` alone is not a coding, so the value is
        // malformed (not merely a list whose last coding is not chunked).
        let head = get("Host: a\r\nTransfer-Encoding: ;x\r\n");
        assert_eq!(verdict(&head), Err((400, "malformed Transfer-Encoding")));
        let head = get("Host: a\r\nTransfer-Encoding: gzip;x, chunked\r\n");
        assert_eq!(
            verdict(&head),
            Err((501, "transfer coding other than chunked")),
            "with a name, parameters are allowed (and the coding is then not implemented)"
        );
    }

    #[test]
    fn ip_literals_and_pct_encoding_in_host() {
        for bad in [
            "[]",
            "[::g]",
            "[::1]x",
            "[::1]:123456",
            "a%4",
            "a%4g",
            "ab%41%zz",
            "a:123456",
        ] {
            assert_eq!(
                check_host(bad.as_bytes()),
                Err(Fault::bad("invalid Host")),
                "{bad}: not an IP literal, a reg-name with complete %XX escapes, or a port of 5 digits"
            );
        }
        for ok in ["[1.2.3.4]", "[::1]:65535", "%41b", "ab%41%2a", "a:65535"] {
            assert_eq!(check_host(ok.as_bytes()), Ok(()), "{ok}");
        }
    }

    #[test]
    fn partial_heads_are_judged_by_their_complete_lines() {
        let head = get("Host: a\r\nContent-Length: 3\r\n");
        for cut in 0..head.len() {
            assert_eq!(parse_head(&head.as_bytes()[..cut]), Ok(Head::Partial), "cut at {cut}");
        }
        assert_eq!(
            parse_head(b"GET http://a/ HTTP/1.1\r\nX: \x01\r\nHost: a"),
            Err(Fault::bad("control byte in a field value"))
        );
        // Whatever follows the head is not its business.
        let with_body = format!("{head}abc");
        assert_eq!(
            parse_head(with_body.as_bytes()),
            Ok(Head::Complete {
                len: head.len(),
                framing: Framing::Length(3)
            })
        );
    }

    #[test]
    fn word_scans_agree_with_byte_scans() {
        for b in 0..=255u8 {
            for at in 0..20 {
                for from in [0, 3] {
                    let mut line = vec![b'a'; 20];
                    line[at] = b;
                    line.extend_from_slice(b"\r\nX");
                    let lf = from + line[from..].iter().position(|&x| x == b'\n').unwrap();
                    let control =
                        (from..lf).any(|i| !(is_field_byte(line[i]) || line[i] == b'\r' && line[i + 1] == b'\n'));
                    assert_eq!(
                        scan_line(&line, from),
                        Some((lf, control)),
                        "byte {b:#x} at {at} from {from}"
                    );
                    let target = &line[from..20];
                    assert_eq!(
                        all_graphic(target),
                        target.iter().all(u8::is_ascii_graphic),
                        "byte {b:#x} at {at}"
                    );
                }
            }
        }
        assert_eq!(scan_line(b"abcdefghijklmnop", 0), None);
        assert_eq!(scan_line(b"GET / HTTP/1.1\r", 0), None);
    }

    #[test]
    fn a_field_line_is_its_name_and_its_trimmed_value() {
        assert_eq!(
            field_line(b"X-Sum:  abc \t").unwrap(),
            (&b"X-Sum"[..], &b"abc"[..]),
            "whitespace around the value goes"
        );
        assert_eq!(
            field_line(b"X-Sum: a\x01b").unwrap_err(),
            CONTROL_IN_VALUE,
            "a control byte inside the value"
        );
        assert!(
            field_line(b"X-Sum: a\tb").is_ok(),
            "the witness: a tab inside a value is allowed"
        );
        assert!(field_line(b"no colon").is_err(), "a line without a colon is no field");
    }
}
