//! HTTP Upgrade through the proxy (RFC 9110 §7.8), as header fields: an absolute-form
//! request that asks to switch to a protocol of `[access] upgrade_protocols` (WebSocket by
//! default) goes to the origin with its `Upgrade`, under the request's own rules, and the
//! origin's 101 is held to what was offered. What a 101 then does (the two connections
//! become a tunnel like a CONNECT's) is `proxy::connect`'s. Any other answer is relayed as
//! usual and the connection goes on.
//!
//! Only a request without content can switch (the framing then waits for its answer, as
//! after a CONNECT: [`SwitchAwaited`] says so). Anything else keeps today's rule: `Upgrade`
//! is hop-by-hop and stripped.

use http::header::{self, HeaderMap, HeaderValue};

use crate::proxy::hop_by_hop::token_list;

/// In a request's extensions: the framing waits for this request's answer (it has no
/// content), so a 101 can make the rest of the connection a tunnel.
#[derive(Debug, Clone, Copy)]
pub struct SwitchAwaited;

/// The protocols a request offers that the proxy relays, as its `Upgrade` value for the
/// next hop. `None`: the request does not switch (no [`SwitchAwaited`], `Connection` does
/// not name `upgrade`, or no offered protocol is allowed): its `Upgrade` is stripped.
pub fn offer(headers: &HeaderMap, awaited: bool, allowed: &[String]) -> Option<HeaderValue> {
    if !awaited || !connection_names_upgrade(headers) {
        return None;
    }
    let mut kept: Vec<&str> = Vec::new();
    for value in headers.get_all(header::UPGRADE) {
        for p in value.to_str().ok()?.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if allowed.iter().any(|a| protocol_is(p, a)) {
                kept.push(p);
            }
        }
    }
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_str(&kept.join(", ")).ok()
}

/// RFC 9110 §7.8: a sender of `Upgrade` also sends `Connection: upgrade`; a field that
/// `Connection` does not name is not meant for this hop.
fn connection_names_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| token_list(v.as_bytes()).is_some_and(|t| t.iter().any(|t| t.eq_ignore_ascii_case(b"upgrade"))))
}

/// Whether protocol `p` (`name` or `name/version`) is `allowed` (a lowercase name, or
/// name/version for that version only).
fn protocol_is(p: &str, allowed: &str) -> bool {
    if allowed.contains('/') {
        return p.eq_ignore_ascii_case(allowed);
    }
    p.split('/')
        .next()
        .is_some_and(|name| name.eq_ignore_ascii_case(allowed))
}

/// Puts the switch back into a request head whose hop-by-hop fields were stripped.
pub fn restore(headers: &mut HeaderMap, offered: HeaderValue) {
    headers.insert(header::UPGRADE, offered);
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// The protocol a 101 switched to: one `Upgrade` value, among those `offered`, with a
/// `Connection` that is a token list. `Err`: why the 101 cannot be relayed.
pub fn chosen(headers: &HeaderMap, offered: Option<&HeaderValue>) -> Result<HeaderValue, &'static str> {
    let Some(offered) = offered else {
        return Err("switched protocols, which the request did not ask for");
    };
    let mut values = headers.get_all(header::UPGRADE).iter();
    let (Some(value), None) = (values.next(), values.next()) else {
        return Err("switched protocols without naming one protocol in Upgrade");
    };
    let is_offered = offered.to_str().is_ok_and(|o| {
        o.split(',')
            .any(|p| value.to_str().is_ok_and(|v| p.trim().eq_ignore_ascii_case(v.trim())))
    });
    if !is_offered {
        return Err("switched to a protocol the request did not offer");
    }
    if headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| token_list(v.as_bytes()).is_none())
    {
        return Err("switched protocols with a Connection field that is not a token list");
    }
    Ok(value.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn only_allowed_protocols_named_by_connection_are_offered() {
        let ws = vec!["websocket".to_string()];
        let asked = headers(&[("connection", "keep-alive, Upgrade"), ("upgrade", "h2c, WebSocket")]);
        assert_eq!(
            offer(&asked, true, &ws).unwrap(),
            "WebSocket",
            "websocket kept, h2c dropped"
        );
        assert!(
            offer(&asked, false, &ws).is_none(),
            "a request with content never switches"
        );
        let unnamed = headers(&[("upgrade", "websocket")]);
        assert!(offer(&unnamed, true, &ws).is_none(), "Connection must name upgrade");
        let other = headers(&[("connection", "upgrade"), ("upgrade", "irc/6.9")]);
        assert!(offer(&other, true, &ws).is_none(), "a protocol not allowed");
        let irc6 = vec!["irc/6.9".to_string()];
        assert_eq!(
            offer(&other, true, &irc6).unwrap(),
            "irc/6.9",
            "name/version allows that version"
        );
        let irc7 = headers(&[("connection", "upgrade"), ("upgrade", "irc/7")]);
        assert!(offer(&irc7, true, &irc6).is_none(), "and no other");
    }

    #[test]
    fn a_101_is_relayed_only_to_an_offered_protocol() {
        let offered = HeaderValue::from_static("websocket");
        let good = headers(&[("upgrade", "websocket"), ("connection", "Upgrade")]);
        assert_eq!(chosen(&good, Some(&offered)).unwrap(), "websocket");
        let err = chosen(&good, None).unwrap_err();
        assert!(err.contains("did not ask"), "{err}");
        let other = headers(&[("upgrade", "irc/6.9"), ("connection", "upgrade")]);
        assert!(chosen(&other, Some(&offered)).unwrap_err().contains("did not offer"));
        let none = headers(&[("connection", "upgrade")]);
        assert!(chosen(&none, Some(&offered)).unwrap_err().contains("one protocol"));
        let bad = headers(&[("upgrade", "websocket"), ("connection", "up grade")]);
        assert!(chosen(&bad, Some(&offered)).unwrap_err().contains("token list"));
    }
}
