//! Hop-by-hop fields (RFC 9110 §7.6.1): removed from every message the proxy forwards, in
//! both directions, with the fields `Connection` names and the proxy's own credentials.
//!
//! `Connection` is read as bytes, as a list of tokens: a value that is not one (a non-ASCII
//! byte, a quoted string, a space inside an element) cannot say which fields it names, so
//! the message is refused rather than forwarded with fields that might have been named.

use http::header::{self, HeaderMap, HeaderName};

use crate::proxy::strict::is_tchar;

/// Why a message's hop-by-hop fields cannot be removed: its `Connection` is not a token list.
pub const BAD_CONNECTION: &str = "Connection field is not a comma-separated list of tokens";

/// Removes the hop-by-hop fields of `headers`, and those its `Connection` names. `Err` (and
/// `headers` unchanged) when a `Connection` value is not a token list: the caller refuses
/// the message (a request: 400; a response: 502).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> Result<(), &'static str> {
    // One pass over the distinct names notes which hop-by-hop fields are present (most
    // messages carry at most `Connection`); only those are then removed.
    let seen = headers.keys().fold(0u8, |seen, name| seen | hop_by_hop_bit(name));
    if seen == 0 {
        return Ok(());
    }
    if seen & 1 != 0 {
        // Fields the Connection header names are hop-by-hop too.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in token_list(value.as_bytes()).ok_or(BAD_CONNECTION)? {
                // `close` names no field; `keep-alive` is hop-by-hop already.
                if token.eq_ignore_ascii_case(b"close") || token.eq_ignore_ascii_case(b"keep-alive") {
                    continue;
                }
                // A token is always a valid field name.
                named.push(HeaderName::from_bytes(token).map_err(|_| BAD_CONNECTION)?);
            }
        }
        for name in named {
            headers.remove(name);
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if seen & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    Ok(())
}

/// The tokens of one list-valued field value such as `Connection` (RFC 9110 §7.6.1
/// `#connection-option`) or `Transfer-Encoding` without parameters, as §5.6.1 writes a list: elements separated by commas with optional whitespace around them,
/// empty elements allowed and ignored). `None` when an element is not a token.
pub fn token_list(value: &[u8]) -> Option<Vec<&[u8]>> {
    let mut tokens = Vec::new();
    for element in value.split(|&b| b == b',') {
        let element = trim_ows(element);
        if element.is_empty() {
            continue;
        }
        if !element.iter().all(|&b| is_tchar(b)) {
            return None;
        }
        tokens.push(element);
    }
    Some(tokens)
}

/// `s` without OWS around it (space and HTAB only; `trim_ascii` would take more).
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) plus the proxy's own credentials; `Connection`
/// first. A `static`: a `const` array would be built and dropped at every use.
static HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
];

/// `1 << i` when `name` is `HOP_BY_HOP[i]`, else 0. Names are lowercase in a `HeaderName`,
/// so one match on the bytes decides (their lengths rule out almost every other field).
fn hop_by_hop_bit(name: &HeaderName) -> u8 {
    let i = match name.as_str().as_bytes() {
        b"connection" => 0,
        b"keep-alive" => 1,
        b"te" => 2,
        b"trailer" => 3,
        b"transfer-encoding" => 4,
        b"upgrade" => 5,
        b"proxy-authorization" => 6,
        b"proxy-connection" => 7,
        _ => return 0,
    };
    1 << i
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn hop_by_hop_bits_match_the_table() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_bit(name), 1 << i, "{name}");
        }
        for other in [
            header::CONTENT_LENGTH,
            header::HOST,
            HeaderName::from_static("x-upgrade"),
        ] {
            assert_eq!(hop_by_hop_bit(&other), 0, "{other}");
        }
    }

    #[test]
    fn hop_by_hop_and_connection_named_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("proxy-authorization", HeaderValue::from_static("Basic x"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h).unwrap();
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn each_hop_by_hop_field_is_removed_when_it_is_the_only_one() {
        // Alone, each sets a single bit of `seen`: the test of that bit must find it.
        for name in &HOP_BY_HOP {
            let mut h = HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static("1"));
            h.insert("x-keep", HeaderValue::from_static("1"));
            strip_hop_by_hop(&mut h).unwrap();
            assert!(!h.contains_key(name), "{name} is hop-by-hop, so it is not forwarded");
            assert!(h.contains_key("x-keep"), "{name}: an end-to-end field is forwarded");
        }
    }

    #[test]
    fn a_field_named_only_by_connection_is_removed() {
        // Connection is the only hop-by-hop field here: the fields it names go with it.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("X-Secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h).unwrap();
        assert!(!h.contains_key("x-secret"), "Connection names it: hop-by-hop");
        assert!(!h.contains_key(header::CONNECTION), "Connection itself is hop-by-hop");
        assert!(
            h.contains_key("x-keep"),
            "a field Connection does not name is forwarded"
        );
    }

    #[test]
    fn the_close_option_names_no_field() {
        // `close` is a connection option, not a field name (RFC 9110 §7.6.1): a field that
        // happens to be called `Close` is end-to-end, and is forwarded.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("close, X-Secret"));
        h.insert("close", HeaderValue::from_static("1"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h).unwrap();
        assert!(
            h.contains_key("close"),
            "the close option does not name the Close field"
        );
        assert!(
            !h.contains_key("x-secret"),
            "the other token of the same list does name a field"
        );
    }

    #[test]
    fn connection_is_a_token_list() {
        let tokens = |v: &[u8]| token_list(v).map(|t| t.iter().map(|t| t.to_vec()).collect::<Vec<_>>());
        let list = |l: &[&str]| Some(l.iter().map(|t| t.as_bytes().to_vec()).collect::<Vec<_>>());
        assert_eq!(tokens(b"close"), list(&["close"]));
        assert_eq!(tokens(b" X-Secret ,\tclose\t"), list(&["X-Secret", "close"]));
        assert_eq!(tokens(b",, a,,b ,"), list(&["a", "b"]), "empty elements are allowed");
        assert_eq!(tokens(b""), list(&[]));
        for bad in [
            "X-Secret, caf\u{e9}".as_bytes(),
            b"X-Secret, \"quoted\"",
            b"a b",
            b"a;b",
            b"X-Secret, \xff",
        ] {
            assert_eq!(
                tokens(bad),
                None,
                "{:?} is not a token list",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_connection_that_is_not_a_token_list_strips_nothing_and_fails() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_bytes("X-Secret, caf\u{e9}".as_bytes()).unwrap(),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        assert_eq!(strip_hop_by_hop(&mut h), Err(BAD_CONNECTION));
        assert!(h.contains_key("x-secret"), "the caller refuses the whole message");
    }
}
