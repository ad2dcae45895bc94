//! The request target of an absolute-form request: the origin's authority, host and port,
//! or why the target is refused.

use http::Uri;

/// The origin's `host[:port]` and `host` for an absolute-form `http://` target (or `ws://`,
/// which WebSocket clients such as aiohttp send for a handshake: the same origin over HTTP,
/// RFC 6455 §3), or why it is refused. Byte scans rather than `str::rsplit`: these strings are a few bytes long, and the
/// general searchers cost hundreds of instructions per request here.
pub fn check_target(uri: &Uri) -> Result<(&str, &str, u16), &'static str> {
    check_target_as(uri, false)
}

/// A request read inside a bumped tunnel (`proxy::bump`): its target is the `https://`
/// origin the tunnel's server name gave, and its connection to the origin is TLS to that
/// name (`key`: the origin pool's key, host, port and server name). Only such requests may
/// have an `https://` target: a plain client's goes through CONNECT.
#[derive(Debug, Clone)]
pub struct Inspected {
    pub sni: std::sync::Arc<str>,
    pub key: std::sync::Arc<str>,
}

/// [`check_target`], with `https://` targets (port 443 by default) when `inspected`.
pub fn check_target_as(uri: &Uri, inspected: bool) -> Result<(&str, &str, u16), &'static str> {
    let Some(authority) = uri.authority() else {
        return Err(
            "origin-form request sent to a forward proxy: use an absolute URI (http://host/path), e.g. curl -x",
        );
    };
    let default_port = match uri.scheme_str() {
        Some("http" | "ws") if !inspected => 80,
        Some("https") if inspected => 443,
        _ if inspected => return Err("a bumped tunnel carries https:// requests only"),
        Some("https") => return Err("https:// targets go through CONNECT, not a plain proxy request"),
        Some("wss") => return Err("wss:// targets go through CONNECT, not a plain proxy request"),
        _ => return Err("unsupported scheme in request target (only http:// is proxied)"),
    };
    // `host[:port]`, without any `user@` part.
    let full = authority.as_str();
    let host_port = match full.bytes().rposition(|b| b == b'@') {
        Some(at) => &full[at + 1..],
        None => full,
    };
    // As `Authority::host`: an IPv6 literal keeps its brackets.
    let host_end = if host_port.starts_with('[') {
        host_port
            .bytes()
            .position(|b| b == b']')
            .map_or(host_port.len(), |end| end + 1)
    } else {
        host_port.bytes().position(|b| b == b':').unwrap_or(host_port.len())
    };
    let (host, port) = host_port.split_at(host_end);
    if host.is_empty() {
        return Err("empty host in request target");
    }
    // No port, or an empty one (RFC 3986 §3.2.3): 80.
    let port = match port.strip_prefix(':') {
        None | Some("") => default_port,
        Some(p) => p.parse().map_err(|_| "invalid port in request target")?,
    };
    Ok((host_port, host, port))
}

/// A request target as logs show it: without userinfo (`user:password@`), which is a secret
/// whatever the scheme (RFC 9110 §4.2.4 deprecates it for http, clients still send it).
pub struct Redacted<'a>(pub &'a Uri);

impl std::fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let uri = self.0;
        if let Some(scheme) = uri.scheme_str() {
            write!(f, "{scheme}://")?;
        }
        if let Some(authority) = uri.authority() {
            let full = authority.as_str();
            let host_port = full.rsplit_once('@').map_or(full, |(_, h)| h);
            f.write_str(host_port)?;
        }
        f.write_str(uri.path())?;
        match uri.query() {
            Some(q) => write!(f, "?{q}"),
            None => Ok(()),
        }
    }
}

/// The request target's length as the client sent it (`Uri`'s display form), without
/// formatting it.
pub fn target_len(uri: &Uri) -> usize {
    uri.scheme_str().map_or(0, |s| s.len() + 3)
        + uri.authority().map_or(0, |a| a.as_str().len())
        + uri.path_and_query().map_or(0, |pq| pq.as_str().len())
}

/// The destination a request names, for the rules: CONNECT's `host:port`, or an
/// absolute-form `http://` target's host and port; `None` for a target the request's own
/// path refuses (400), userinfo in a CONNECT target among them.
pub fn destination<B>(req: &http::Request<B>) -> Option<(&str, u16)> {
    if req.method() == http::Method::CONNECT {
        let a = req.uri().authority().filter(|a| !a.as_str().contains('@'))?;
        return Some((a.host(), a.port_u16()?));
    }
    let inspected = req.extensions().get::<Inspected>().is_some();
    check_target_as(req.uri(), inspected)
        .ok()
        .map(|(_, host, port)| (host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_is_refused() {
        assert!(check_target(&"/index.html".parse().unwrap()).is_err());
        assert!(check_target(&"https://a/".parse().unwrap()).is_err());
        assert!(check_target(&"wss://a/".parse().unwrap()).is_err());
        assert_eq!(check_target(&"ws://a/chat".parse().unwrap()).unwrap(), ("a", "a", 80));
        assert!(check_target(&"http://a:99999/".parse().unwrap()).is_err());
        assert_eq!(check_target(&"http://a:/".parse().unwrap()).unwrap().2, 80);
        for t in [
            "http://a:81/x",
            "http://a/x",
            "http://u:p@a:81/",
            "http://[::1]:8080/",
            "http://[::1]/",
            "http://1.2.3.4/",
        ] {
            let uri: Uri = t.parse().unwrap();
            let (authority, host, port) = check_target(&uri).unwrap();
            assert_eq!(port, uri.port_u16().unwrap_or(80), "{t}");
            let expected = uri.authority().unwrap().as_str().rsplit('@').next().unwrap();
            assert_eq!(authority, expected, "{t}");
            assert_eq!(host, uri.host().unwrap(), "{t}");
        }
    }

    #[test]
    fn target_len_is_the_display_length() {
        for t in [
            "http://example.com/a/b?c=d",
            "http://user@example.com:8080/",
            "http://[::1]:80/x",
            "example.com:443",
            "/origin/form?x",
        ] {
            let uri: Uri = t.parse().unwrap();
            assert_eq!(target_len(&uri), uri.to_string().len(), "{t}");
        }
    }

    #[test]
    fn logged_targets_carry_no_userinfo() {
        for (target, shown) in [
            ("http://user:secret@a.example:8080/p?q=1", "http://a.example:8080/p?q=1"),
            ("http://user@a.example/", "http://a.example/"),
            ("http://a.example/x", "http://a.example/x"),
            ("http://[::1]:80/", "http://[::1]:80/"),
            ("a.example:443", "a.example:443"),
        ] {
            let uri: Uri = target.parse().unwrap();
            assert_eq!(Redacted(&uri).to_string(), shown, "{target}");
            if !target.contains('@') {
                assert_eq!(uri.to_string(), shown, "without userinfo, as Uri shows it");
            }
        }
    }
}
