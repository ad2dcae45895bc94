//! The framing of a response baton relays (RFC 9112 §6.3), once hyper's client has parsed its
//! head. hyper reads the body by `Transfer-Encoding` when there is one (chunked last: chunked;
//! else until the connection closes) and by `Content-Length` otherwise, and leaves both
//! fields in the head. Relayed as they came, a `Content-Length` that `Transfer-Encoding`
//! overrode would reach the client with a body of another length (hyper's server trusts a
//! length it is given), and the codings other than chunked would be lost with the hop-by-hop
//! `Transfer-Encoding`. This module decides what the client's head says instead.
//!
//! - `Transfer-Encoding` ending in `chunked` with a `Content-Length`: refused (502). §6.3
//!   says such a message "ought to be handled as an error": it is what response splitting
//!   looks like, and the origin connection it came on is kept for the next request, so a
//!   disagreement between origin and proxy about where it ended would carry into the next
//!   response. The caller closes that connection.
//! - `Transfer-Encoding` not ending in `chunked`: the body runs until the origin closes
//!   (which ends the connection, so nothing can hide behind it): relayed without any
//!   `Content-Length`, keeping its codings (hyper's server adds `chunked` after them).
//! - `chunked` anywhere but last, or a value that is not a list of codings: refused (502).
//! - No `Transfer-Encoding`: `Content-Length` as hyper read it. Equal duplicates (two fields,
//!   or a list `5, 5`) are accepted, as §6.3 allows, and relayed as one value, since the next
//!   recipient may not accept them; differing ones are hyper's parse error, a 502.

use http::header::{self, HeaderMap, HeaderValue};

use crate::proxy::hop_by_hop::{strip_hop_by_hop, token_list};
use crate::proxy::strict;

/// A response the proxy cannot relay: the reason, for the 502.
pub type Refused = &'static str;

/// What the client's head carries for the body's framing.
#[derive(Debug, PartialEq, Eq)]
pub enum Relay {
    /// As hyper read it: one `Content-Length`, or none (a close-delimited body, or none).
    AsIs,
    /// Several equal `Content-Length` values: relayed as one.
    Length(u64),
    /// Read by `Transfer-Encoding`: no `Content-Length`, and these codings (chunked
    /// removed; `None`: none left) for hyper's server to chunk after.
    Coded(Option<HeaderValue>),
}

/// Makes a response head from the next hop the client's: hop-by-hop fields out, the framing
/// as relayed. `Err` (the caller answers 502 and closes the next hop's connection) when it
/// cannot be relayed faithfully.
pub fn relayed_head(headers: &mut HeaderMap) -> Result<(), Refused> {
    let framing = relay(headers)?;
    strip_hop_by_hop(headers)?;
    apply(framing, headers);
    Ok(())
}

/// How a response with `headers` is relayed, or why it is refused.
pub fn relay(headers: &HeaderMap) -> Result<Relay, Refused> {
    if !headers.contains_key(header::TRANSFER_ENCODING) {
        return content_length(headers);
    }
    let mut codings: Vec<&[u8]> = Vec::new();
    for value in headers.get_all(header::TRANSFER_ENCODING) {
        codings.extend(token_list(value.as_bytes()).ok_or("invalid Transfer-Encoding")?);
    }
    let chunked = |c: &&[u8]| c.eq_ignore_ascii_case(b"chunked");
    let last_chunked = codings.last().is_some_and(chunked);
    if last_chunked {
        codings.pop();
    }
    if codings.iter().any(chunked) {
        return Err("Transfer-Encoding with chunked not last");
    }
    if last_chunked && headers.contains_key(header::CONTENT_LENGTH) {
        return Err("both Transfer-Encoding: chunked and Content-Length");
    }
    if codings.is_empty() {
        return Ok(Relay::Coded(None));
    }
    let kept = codings.join(&b", "[..]);
    let kept = HeaderValue::from_bytes(&kept).map_err(|_| "invalid Transfer-Encoding")?;
    Ok(Relay::Coded(Some(kept)))
}

/// `Content-Length` alone: one value is hyper's to have checked; several must be equal.
fn content_length(headers: &HeaderMap) -> Result<Relay, Refused> {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter().peekable();
    let single = values.next().is_some_and(|v| !v.as_bytes().contains(&b',')) && values.peek().is_none();
    if single || !headers.contains_key(header::CONTENT_LENGTH) {
        return Ok(Relay::AsIs);
    }
    let mut length = None;
    for value in headers.get_all(header::CONTENT_LENGTH) {
        for element in value.as_bytes().split(|&b| b == b',') {
            let n = strict::content_length(element.trim_ascii()).map_err(|f| f.reason)?;
            if length.is_some_and(|l| l != n) {
                return Err("differing Content-Length values");
            }
            length = Some(n);
        }
    }
    length.map(Relay::Length).ok_or("invalid Content-Length")
}

/// Puts `relay`'s framing into `headers`, whose hop-by-hop fields (the received
/// `Transfer-Encoding` among them) are already gone.
pub fn apply(relay: Relay, headers: &mut HeaderMap) {
    match relay {
        Relay::AsIs => {}
        Relay::Length(n) => {
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(n));
        }
        Relay::Coded(codings) => {
            headers.remove(header::CONTENT_LENGTH);
            if let Some(codings) = codings {
                headers.insert(header::TRANSFER_ENCODING, codings);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in fields {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn each_framing_of_section_6_3() {
        let gzip = || Ok(Relay::Coded(Some(HeaderValue::from_static("gzip"))));
        type Case<'a> = (&'a [(&'a str, &'a str)], Result<Relay, Refused>);
        let cases: &[Case] = &[
            (&[("content-length", "5")], Ok(Relay::AsIs)),
            (
                &[("content-length", "5"), ("content-length", "5")],
                Ok(Relay::Length(5)),
            ),
            (&[("content-length", "5 , 5")], Ok(Relay::Length(5))),
            (&[("content-length", "5, 6")], Err("differing Content-Length values")),
            (&[], Ok(Relay::AsIs)),
            (&[("transfer-encoding", "chunked")], Ok(Relay::Coded(None))),
            (&[("transfer-encoding", "gzip, chunked")], gzip()),
            (
                &[("transfer-encoding", "gzip"), ("transfer-encoding", "Chunked")],
                gzip(),
            ),
            (&[("transfer-encoding", "gzip")], gzip()),
            (&[("transfer-encoding", "gzip"), ("content-length", "5")], gzip()),
            (
                &[("transfer-encoding", "chunked"), ("content-length", "100")],
                Err("both Transfer-Encoding: chunked and Content-Length"),
            ),
            (
                &[("transfer-encoding", "chunked, gzip")],
                Err("Transfer-Encoding with chunked not last"),
            ),
            (&[("transfer-encoding", "gzip;q=1")], Err("invalid Transfer-Encoding")),
        ];
        for (fields, want) in cases {
            assert_eq!(&relay(&head(fields)), want, "{fields:?}");
        }
    }

    #[test]
    fn a_coded_body_loses_its_length_and_keeps_its_codings() {
        let mut h = head(&[("content-length", "5")]);
        apply(Relay::Coded(Some(HeaderValue::from_static("gzip"))), &mut h);
        assert!(!h.contains_key(header::CONTENT_LENGTH));
        assert_eq!(h.get(header::TRANSFER_ENCODING).unwrap(), "gzip");
    }
}
