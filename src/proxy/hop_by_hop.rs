//! Hop-by-hop fields (RFC 9110 §7.6.1): removed from every message the proxy forwards, in
//! both directions, with the fields `Connection` names and the proxy's own credentials.

use http::header::{self, HeaderMap, HeaderName};

pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the distinct names notes which hop-by-hop fields are present (most
    // messages carry at most `Connection`); only those are then removed.
    let seen = headers.keys().fold(0u8, |seen, name| seen | hop_by_hop_bit(name));
    if seen == 0 {
        return;
    }
    if seen & 1 != 0 {
        // Fields the Connection header names are hop-by-hop too.
        let mut named: Vec<HeaderName> = Vec::new();
        for value in headers.get_all(header::CONNECTION) {
            for token in value.to_str().unwrap_or_default().split(',').map(str::trim) {
                // `close` names no field; `keep-alive` is hop-by-hop already.
                if token.is_empty() || token.eq_ignore_ascii_case("close") || token.eq_ignore_ascii_case("keep-alive") {
                    continue;
                }
                if let Ok(n) = HeaderName::from_bytes(token.as_bytes()) {
                    named.push(n);
                }
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
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-keep"));
    }
}
