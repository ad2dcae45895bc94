//! `[upstream]`: the parent proxies baton forwards through, and which destinations go
//! through which (or directly). Validated once into [`Parents`]; `proxy::route` makes the
//! choice per request. Credentials are read from their files here and kept only as the
//! ready `Proxy-Authorization` value, marked sensitive: never printed, never in an error.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use http::{HeaderValue, Uri};
use serde::Deserialize;
use toml::Spanned;

use super::hosts::HostPattern;
use super::inspect::{OriginRoots, RawRoots, roots};
use super::{line_of, resolve};

/// `[upstream]` as written.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawUpstream {
    proxy: Option<Spanned<String>>,
    credentials: Option<Spanned<PathBuf>>,
    bypass: Vec<Spanned<String>>,
    route: Vec<Spanned<RawRoute>>,
    /// What `https://` parents' certificates are verified against.
    roots: Option<RawRoots>,
}

/// One `[[upstream.route]]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    hosts: Vec<Spanned<String>>,
    proxy: Spanned<String>,
    credentials: Option<Spanned<PathBuf>>,
}

/// The parent proxies and which destinations use them. With neither `proxy` nor a route,
/// every destination is reached directly.
#[derive(Debug, Clone, Default)]
pub struct Parents {
    /// The parent of every destination no bypass entry or route decides; `None`: direct.
    pub default: Option<Arc<Parent>>,
    /// Destinations that never go through a parent (like `no_proxy`); checked first.
    pub bypass: Vec<HostPattern>,
    /// Checked in order after `bypass`; the first route whose hosts match decides.
    pub routes: Vec<Route>,
    /// What `https://` parents are verified against (`[upstream] roots`; default: the
    /// system's store). There is no way to skip the check.
    pub roots: OriginRoots,
}

impl Parents {
    /// Whether every destination is reached directly (nothing to choose per request).
    pub fn all_direct(&self) -> bool {
        self.default.is_none() && self.routes.iter().all(|r| r.parent.is_none())
    }

    /// Whether any parent is reached over TLS (`https://`).
    pub fn any_tls(&self) -> bool {
        let routed = self.routes.iter().filter_map(|r| r.parent.as_ref());
        self.default.iter().chain(routed).any(|p| p.tls)
    }
}

/// `[[upstream.route]]`: destinations matching `hosts` go through `parent` (`None`: direct).
#[derive(Debug, Clone)]
pub struct Route {
    pub hosts: Vec<HostPattern>,
    pub parent: Option<Arc<Parent>>,
}

/// A parent proxy (`http://host:port`, or `https://host:port`: TLS to the parent, its
/// certificate verified for `host` against [`Parents::roots`]).
#[derive(Clone)]
pub struct Parent {
    /// Spoken to over TLS (`https://`).
    pub tls: bool,
    /// `host:port` as configured: what answers and logs name it by (shared by every
    /// request's access line).
    pub authority: Arc<str>,
    /// The host to connect to (an IPv6 address without its brackets).
    pub host: String,
    pub port: u16,
    /// `Proxy-Authorization: Basic …` from the credentials file, marked sensitive.
    pub authorization: Option<HeaderValue>,
    /// The key its connections are pooled under; it contains a space, so no origin's
    /// `host:port` can equal it.
    pub pool_key: String,
}

impl fmt::Debug for Parent {
    // Written by hand so that the credentials never reach a log line or a panic message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Parent")
            .field("authority", &self.authority)
            .field("credentials", &self.authorization.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl fmt::Display for Parent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "parent proxy {}", self.authority)
    }
}

/// Validates `[upstream]`; errors name the line and the key. `base`: the configuration
/// file's directory, which relative credential paths are relative to.
pub(super) fn parents(text: &str, raw: &RawUpstream, base: Option<&Path>) -> Result<Parents, String> {
    let cx = Context { text, base };
    let default = match &raw.proxy {
        Some(url) => Some(cx.parent(url, raw.credentials.as_ref(), "upstream")?),
        None => match &raw.credentials {
            Some(c) => return Err(cx.at(c, "upstream.credentials", "without a `proxy` to send them to")),
            None => None,
        },
    };
    let bypass = raw
        .bypass
        .iter()
        .map(|p| HostPattern::parse(p.get_ref()).map_err(|m| cx.at(p, "upstream.bypass", &m)))
        .collect::<Result<_, _>>()?;
    let routes = raw.route.iter().map(|r| cx.route(r)).collect::<Result<_, _>>()?;
    let roots = roots(raw.roots.clone(), base, "[upstream] roots")?;
    Ok(Parents {
        default,
        bypass,
        routes,
        roots,
    })
}

/// What an error needs to name its line, and what relative paths are relative to.
struct Context<'a> {
    text: &'a str,
    base: Option<&'a Path>,
}

impl Context<'_> {
    fn at<T>(&self, spanned: &Spanned<T>, key: &str, msg: &str) -> String {
        format!("line {}, key `{key}`: {msg}", line_of(self.text, spanned.span().start))
    }

    fn route(&self, raw: &Spanned<RawRoute>) -> Result<Route, String> {
        let r = raw.get_ref();
        if r.hosts.is_empty() {
            return Err(self.at(raw, "upstream.route", "`hosts` is empty: give at least one pattern"));
        }
        let hosts = r
            .hosts
            .iter()
            .map(|h| HostPattern::parse(h.get_ref()).map_err(|m| self.at(h, "upstream.route.hosts", &m)))
            .collect::<Result<_, _>>()?;
        let parent = match (r.proxy.get_ref().as_str(), &r.credentials) {
            ("direct", None) => None,
            ("direct", Some(c)) => {
                let msg = "credentials on a `direct` route: there is no parent to send them to";
                return Err(self.at(c, "upstream.route.credentials", msg));
            }
            _ => Some(self.parent(&r.proxy, r.credentials.as_ref(), "upstream.route")?),
        };
        Ok(Route { hosts, parent })
    }

    /// A parent from its URL (key `<section>.proxy`) and credentials file
    /// (`<section>.credentials`).
    fn parent(
        &self,
        url: &Spanned<String>,
        credentials: Option<&Spanned<PathBuf>>,
        section: &str,
    ) -> Result<Arc<Parent>, String> {
        let mut p = parent(url.get_ref()).map_err(|m| self.at(url, &format!("{section}.proxy"), &m))?;
        if let Some(c) = credentials {
            let path = resolve(self.base, c.get_ref().clone());
            let value = read_credentials(&path).map_err(|m| self.at(c, &format!("{section}.credentials"), &m))?;
            p.authorization = Some(value);
        }
        Ok(Arc::new(p))
    }
}

/// A parent from its URL, without credentials. The URL is never echoed in an error: it
/// might carry a password the operator pasted into it.
fn parent(url: &str) -> Result<Parent, String> {
    let uri: Uri = url
        .parse()
        .map_err(|e: http::uri::InvalidUri| format!("not a URL ({e}): give the parent as http://host:port"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err("give the parent as http://host:port or https://host:port".into()),
    };
    let Some(authority) = uri.authority() else {
        return Err("give the parent as http://host:port".into());
    };
    if authority.as_str().contains('@') {
        return Err("credentials in the URL are refused: put `user:password` in a file named by `credentials`".into());
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err("a parent URL has no path: give it as http://host:port".into());
    }
    let Some(port) = authority.port_u16() else {
        return Err("the parent's port is required (e.g. http://parent:3128)".into());
    };
    let authority = authority.as_str().to_ascii_lowercase();
    let host = authority.rsplit_once(':').map_or(authority.as_str(), |(h, _)| h);
    Ok(Parent {
        host: host.trim_start_matches('[').trim_end_matches(']').to_string(),
        port,
        authorization: None,
        pool_key: format!("parent {authority}"),
        authority: authority.into(),
        tls,
    })
}

/// The credentials file: one line, `user:password`. The error never shows its content.
fn read_credentials(path: &Path) -> Result<HeaderValue, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let line = text.strip_suffix('\n').unwrap_or(&text);
    let line = line.strip_suffix('\r').unwrap_or(line);
    let valid = line.split_once(':').is_some_and(|(user, _)| !user.is_empty()) && !line.chars().any(char::is_control);
    if !valid {
        return Err(format!(
            "{}: want one line `user:password` (a non-empty user, no control characters)",
            path.display()
        ));
    }
    let encoded = base64::engine::general_purpose::STANDARD.encode(line.as_bytes());
    let mut value = HeaderValue::from_str(&format!("Basic {encoded}"))
        .map_err(|_| format!("{}: unusable credentials", path.display()))?;
    value.set_sensitive(true);
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Parents, String> {
        let raw: RawUpstream = toml::from_str(text).map_err(|e| e.to_string())?;
        parents(text, &raw, None)
    }

    #[test]
    fn urls_and_errors_name_the_line() {
        let p = parse("proxy = \"http://Parent:3128\"\nbypass = [\"localhost\", \"127.0.0.0/8\"]\n").unwrap();
        let d = p.default.unwrap();
        assert_eq!(
            (&*d.authority, d.host.as_str(), d.port),
            ("parent:3128", "parent", 3128)
        );
        assert_eq!(p.bypass.len(), 2);
        let v6 = parse("proxy = \"http://[::1]:3128\"\n").unwrap().default.unwrap();
        assert_eq!(v6.host, "::1");
        for (text, want) in [
            (
                "\nproxy = \"http://p\"\n",
                "line 2, key `upstream.proxy`: the parent's port",
            ),
            ("proxy = \"ftp://p:1\"\n", "http://host:port or https://host:port"),
            (
                "proxy = \"https://p:1\"\nroots = []\n",
                "[upstream] roots is an empty list",
            ),
            ("proxy = \"http://p:1/x\"\n", "no path"),
            ("bypass = [\n\"ok\",\n\"a*b\"]\n", "line 3, key `upstream.bypass`"),
            (
                "credentials = \"c\"\n",
                "line 1, key `upstream.credentials`: without a `proxy`",
            ),
            (
                "[[route]]\nhosts = []\nproxy = \"direct\"\n",
                "line 1, key `upstream.route`: `hosts` is empty",
            ),
            (
                "[[route]]\nhosts = [\"a\"]\nproxy = \"direct\"\ncredentials = \"c\"\n",
                "line 4, key `upstream.route.credentials`",
            ),
        ] {
            let err = parse(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn errors_name_the_file_and_the_line_in_it() {
        let head = "[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n[upstream]\nproxy = \"http://p:1\"\n";
        for (tail, want) in [
            (
                "[[upstream.route]]\nhosts = [\"*.corp\"]\nproxy = \"ftp://x:1\"\n",
                "b.toml: line 8, key `upstream.route.proxy`",
            ),
            (
                "[[upstream.route]]\nhosts = []\nproxy = \"direct\"\n",
                "b.toml: line 6, key `upstream.route`",
            ),
            ("[[upstream.route]]\nhosts = [\"a\"]\n", "b.toml: line 6"),
        ] {
            let err = crate::config::Config::parse(&format!("{head}{tail}"), Some(Path::new("b.toml")))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(want), "{tail:?}: {err}");
        }
    }

    #[test]
    fn credentials_never_show() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c");
        std::fs::write(&path, "alice:s3cret-pw\n").unwrap();
        let text = format!("proxy = \"http://p:1\"\ncredentials = \"{}\"\n", path.display());
        let p = parse(&text).unwrap().default.unwrap();
        let value = p.authorization.clone().unwrap();
        assert!(value.is_sensitive());
        assert_eq!(value, "Basic YWxpY2U6czNjcmV0LXB3");
        assert!(!format!("{p:?}").contains("YWxp"), "{p:?}");
        // A URL with a password in it is refused without being echoed.
        let err = parse("proxy = \"http://alice:s3cret-pw@p:1\"\n").unwrap_err();
        assert!(
            err.contains("credentials in the URL") && !err.contains("s3cret"),
            "{err}"
        );
        // A malformed file: the error names the file, not what is in it.
        std::fs::write(&path, "no-colon-s3cret\n").unwrap();
        let err = parse(&text).unwrap_err();
        assert!(
            err.contains("line 2, key `upstream.credentials`") && !err.contains("s3cret"),
            "{err}"
        );
        let err = parse("proxy = \"http://p:1\"\ncredentials = \"/nonexistent/c\"\n").unwrap_err();
        assert!(err.contains("cannot read /nonexistent/c"), "{err}");
    }
}
