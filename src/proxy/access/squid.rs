//! Squid's native access-log line, laid out as Squid's `logformat squid` writes it
//! (`%ts.%03tu %6tr %>a %Ss/%03>Hs %<st %rm %ru %[un %Sh/%<a %mt`, Squid's
//! `src/log/FormatSquidNative.cc`), so that the tools written for Squid's `access.log`
//! read it:
//!
//! ```text
//! 1700000000.123     45 127.0.0.1 TCP_MISS/200 1234 GET http://h/p - HIER_DIRECT/127.0.0.1 text/plain
//! ```
//!
//! Every field is one token without spaces: values that could hold one (the user, the
//! content type) are %-encoded, an absent value is `-`.

use std::fmt;
use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use http::{Method, Uri};

use crate::proxy::target::Redacted;

/// Squid's result code (`%Ss`) for what baton did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Forwarded to the origin (`TCP_MISS`: baton has no cache).
    Miss,
    /// A CONNECT tunnel (`TCP_TUNNEL`).
    Tunnel,
    /// Refused by the access rules (`TCP_DENIED`).
    Denied,
    /// Answered before any of these applied: a malformed request, or none at all
    /// (`NONE_NONE`, as Squid 5 and later write it).
    None,
}

impl Code {
    fn as_str(self) -> &'static str {
        match self {
            Code::Miss => "TCP_MISS",
            Code::Tunnel => "TCP_TUNNEL",
            Code::Denied => "TCP_DENIED",
            Code::None => "NONE_NONE",
        }
    }
}

/// One line's values; its `Display` is the line, without the line end.
#[derive(Debug)]
pub struct Entry<'a> {
    /// When the transaction ended (`%ts.%03tu`).
    pub at: SystemTime,
    /// Milliseconds from the request to the end of its answer (`%6tr`).
    pub elapsed_ms: u64,
    /// `None` for a client on a Unix-socket listener: `-`.
    pub client: Option<IpAddr>,
    pub code: Code,
    /// The transfer ended early (`_ABORTED`, as Squid appends it).
    pub aborted: bool,
    /// `000` when no answer was sent.
    pub status: u16,
    /// Bytes written to the client: status line, header, body and its framing (`%<st`).
    pub bytes: u64,
    /// `NONE` when no request was read (Squid's word for it).
    pub method: Option<&'a Method>,
    /// `Err`: no URL, and the word Squid writes after `error:` instead.
    pub url: Result<&'a Uri, &'static str>,
    pub user: Option<&'a str>,
    /// The address baton connected to (`HIER_DIRECT/ip`); `None`: `HIER_NONE/-`.
    pub server: Option<IpAddr>,
    /// `server` is a parent proxy (`FIRSTUP_PARENT/ip`, Squid's code for the first parent
    /// that fits, which is the one baton's `[upstream]` chose).
    pub via_parent: bool,
    /// The answer's media type, without parameters (Squid cuts at `;` too).
    pub content_type: Option<&'a [u8]>,
}

impl fmt::Display for Entry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let since = self.at.duration_since(UNIX_EPOCH).unwrap_or_default();
        write!(
            f,
            "{:>9}.{:03} {:>6} ",
            since.as_secs(),
            since.subsec_millis(),
            self.elapsed_ms
        )?;
        match self.client {
            Some(ip) => write!(f, "{}", ip.to_canonical())?,
            None => f.write_str("-")?,
        }
        let aborted = if self.aborted { "_ABORTED" } else { "" };
        write!(f, " {}{aborted}/{:03} {} ", self.code.as_str(), self.status, self.bytes)?;
        f.write_str(self.method.map_or("NONE", Method::as_str))?;
        match self.url {
            Ok(uri) => write!(f, " {} ", Redacted(uri))?,
            Err(word) => write!(f, " error:{word} ")?,
        }
        token(f, self.user.map(str::as_bytes))?;
        match (self.server, self.via_parent) {
            (Some(ip), false) => write!(f, " HIER_DIRECT/{} ", ip.to_canonical())?,
            (Some(ip), true) => write!(f, " FIRSTUP_PARENT/{} ", ip.to_canonical())?,
            (None, _) => f.write_str(" HIER_NONE/- ")?,
        }
        let media_type = self
            .content_type
            .map(|v| v.split(|b| matches!(b, b';' | b' ' | b'\t')).next().unwrap_or_default());
        token(f, media_type)
    }
}

/// `value` as one token: `-` when absent or empty, else %-encoded where a byte could split
/// the line into other fields or is not printable ASCII (Squid %-encodes user names too).
fn token(f: &mut fmt::Formatter<'_>, value: Option<&[u8]>) -> fmt::Result {
    let Some(value) = value.filter(|v| !v.is_empty()) else {
        return f.write_str("-");
    };
    for &b in value {
        if b.is_ascii_graphic() && b != b'%' {
            fmt::Write::write_char(f, char::from(b))?;
        } else {
            write!(f, "%{b:02X}")?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn entry<'a>(method: &'a Method, uri: &'a Uri) -> Entry<'a> {
        Entry {
            at: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            elapsed_ms: 45,
            client: Some("127.0.0.1".parse().unwrap()),
            code: Code::Miss,
            aborted: false,
            status: 200,
            bytes: 1234,
            method: Some(method),
            url: Ok(uri),
            user: None,
            server: Some("127.0.0.1".parse().unwrap()),
            via_parent: false,
            content_type: Some(b"text/plain; charset=utf-8"),
        }
    }

    #[test]
    fn lines_are_laid_out_as_squid_writes_them() {
        let (get, uri) = (Method::GET, Uri::from_static("http://h/p"));
        assert_eq!(
            entry(&get, &uri).to_string(),
            "1700000000.123     45 127.0.0.1 TCP_MISS/200 1234 GET http://h/p - HIER_DIRECT/127.0.0.1 text/plain"
        );
        let (connect, authority) = (Method::CONNECT, Uri::from_static("h:443"));
        let tunnel = Entry {
            code: Code::Tunnel,
            elapsed_ms: 1_234_567,
            content_type: None,
            server: Some("::ffff:10.0.0.1".parse().unwrap()),
            ..entry(&connect, &authority)
        };
        assert_eq!(
            tunnel.to_string(),
            "1700000000.123 1234567 127.0.0.1 TCP_TUNNEL/200 1234 CONNECT h:443 - HIER_DIRECT/10.0.0.1 -"
        );
    }

    #[test]
    fn denials_refusals_and_aborts_use_squids_codes() {
        let (get, uri) = (Method::GET, Uri::from_static("http://h/"));
        let denied = Entry {
            code: Code::Denied,
            status: 403,
            server: None,
            ..entry(&get, &uri)
        };
        assert!(
            denied
                .to_string()
                .ends_with(" TCP_DENIED/403 1234 GET http://h/ - HIER_NONE/- text/plain")
        );
        let aborted = Entry {
            aborted: true,
            ..entry(&get, &uri)
        };
        assert!(aborted.to_string().contains(" TCP_MISS_ABORTED/200 "));
        let parent = Entry {
            via_parent: true,
            ..entry(&get, &uri)
        };
        assert!(
            parent.to_string().ends_with(" - FIRSTUP_PARENT/127.0.0.1 text/plain"),
            "{parent}"
        );
        let closed = Entry {
            code: Code::None,
            status: 0,
            bytes: 0,
            method: None,
            url: Err("transaction-end-before-headers"),
            client: None,
            server: None,
            content_type: None,
            ..entry(&get, &uri)
        };
        assert_eq!(
            closed.to_string(),
            "1700000000.123     45 - NONE_NONE/000 0 NONE error:transaction-end-before-headers - HIER_NONE/- -"
        );
    }

    #[test]
    fn users_and_types_stay_one_token() {
        let (get, uri) = (Method::GET, Uri::from_static("http://h/"));
        let e = Entry {
            user: Some("ann smith%"),
            content_type: Some(b"text/html\tq"),
            ..entry(&get, &uri)
        };
        assert!(
            e.to_string()
                .ends_with(" ann%20smith%25 HIER_DIRECT/127.0.0.1 text/html"),
            "{e}"
        );
        let e = Entry {
            user: Some(""),
            content_type: Some(b"caf\xc3\xa9/x"),
            ..entry(&get, &uri)
        };
        assert!(e.to_string().ends_with(" - HIER_DIRECT/127.0.0.1 caf%C3%A9/x"), "{e}");
    }
}
