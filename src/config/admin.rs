//! `[admin]`: the metrics/health/status listener and who may use it. Closed by default:
//! loopback clients only, only `Host` values that name the listener (a web page cannot read
//! it through DNS rebinding), a small connection limit; an optional bearer token read here
//! from its file, which must not be readable by others, and kept only in [`AdminToken`].

use std::fmt;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::Deserialize;

use super::{ADMIN_LISTENER, ListenAddr, ListenerConfig, loopback_v4, loopback_v6, resolve};

/// `[admin]` as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    address: SocketAddr,
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default = "loopback")]
    allow_clients: Vec<IpNet>,
    token_file: Option<PathBuf>,
    #[serde(default = "default_max_connections")]
    max_connections: usize,
}

fn loopback() -> Vec<IpNet> {
    vec![loopback_v4(), loopback_v6()]
}

/// Enough for a few scrapers, a browser and the operator's curl; an admin listener is not a
/// service to the public, and each connection holds an fd outside `limits.max_connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

fn default_max_connections() -> usize {
    DEFAULT_MAX_CONNECTIONS
}

/// `[admin]`: an HTTP listener for `/metrics`, `/healthz` and `/status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// Names a `Host` header may carry besides the listener's own address and `localhost`
    /// (lower case, without a port).
    pub hosts: Vec<String>,
    /// Clients allowed to connect; the default is loopback only.
    pub allow_clients: Vec<IpNet>,
    /// The bearer token every path but `/healthz` requires, if any.
    pub token: Option<AdminToken>,
    /// Connections served at once; more are closed at accept.
    pub max_connections: usize,
}

/// The admin token's bytes: never printed (`Debug` shows only that one is set).
#[derive(Clone, PartialEq, Eq)]
pub struct AdminToken(Vec<u8>);

impl AdminToken {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    #[cfg(test)]
    pub(crate) fn for_tests(token: &str) -> AdminToken {
        AdminToken(token.as_bytes().to_vec())
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Checks `[admin]` against the listeners and reads its token file (relative to `base`).
pub(super) fn admin(
    raw: Option<&RawAdmin>,
    listeners: &[ListenerConfig],
    base: Option<&Path>,
) -> Result<Option<AdminConfig>, String> {
    let Some(raw) = raw else { return Ok(None) };
    if listeners.iter().any(|l| l.name == ADMIN_LISTENER) {
        return Err("listener name \"admin\" is reserved when [admin] is configured".into());
    }
    if raw.address.port() != 0 && listeners.iter().any(|l| l.addr == ListenAddr::Tcp(raw.address)) {
        return Err("key `admin.address`: the same address as a [[listener]]".into());
    }
    if raw.max_connections == 0 {
        return Err("key `admin.max_connections`: must be at least 1".into());
    }
    let hosts = raw.hosts.iter().map(|h| host_name(h)).collect::<Result<_, _>>()?;
    let token = match &raw.token_file {
        Some(p) => Some(read_token(&resolve(base, p.clone()))?),
        None => None,
    };
    Ok(Some(AdminConfig {
        addr: raw.address,
        hosts,
        allow_clients: raw.allow_clients.iter().map(IpNet::trunc).collect(),
        token,
        max_connections: raw.max_connections,
    }))
}

/// One `[admin] hosts` entry: a DNS name, compared without case and without a port.
fn host_name(h: &str) -> Result<String, String> {
    let name = h.trim().trim_end_matches('.').to_ascii_lowercase();
    let valid = !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if !valid {
        return Err(format!(
            "key `admin.hosts`: `{h}` is not a host name (letters, digits, '-', '.', no port)"
        ));
    }
    Ok(name)
}

/// The token file: one line. It must not be open to others: anyone who can
/// read it can read every admin endpoint. The error never shows the content.
fn read_token(path: &Path) -> Result<AdminToken, String> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| format!("key `admin.token_file`: cannot read {shown}: {e}"))?;
    // The rule every secret file is held to (a token never opens to others, whatever
    // `secrets_readable_by_others` says).
    super::check_secret_mode(path, meta.permissions().mode(), false)
        .map_err(|e| format!("key `admin.token_file`: {shown}: {e}"))?;
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("key `admin.token_file`: cannot read {shown}: {e}"))?;
    let token = text.trim_end_matches(['\n', '\r']);
    // A token goes into an `Authorization` header: visible ASCII only, as RFC 6750's b64token.
    if token.len() < 16 || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!(
            "key `admin.token_file`: {shown}: want one line of at least 16 visible ASCII characters"
        ));
    }
    Ok(AdminToken(token.as_bytes().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(text: &str) -> RawAdmin {
        toml::from_str(text).expect("valid [admin]")
    }

    #[test]
    fn the_defaults_are_closed() {
        let a = admin(Some(&raw("address = \"127.0.0.1:0\"")), &[], None)
            .unwrap()
            .unwrap();
        assert_eq!(a.allow_clients, loopback(), "loopback clients only");
        assert!(a.hosts.is_empty());
        assert!(a.token.is_none());
        assert_eq!(a.max_connections, DEFAULT_MAX_CONNECTIONS);
    }

    #[test]
    fn a_token_file_open_to_others_is_refused_naming_file_and_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let text = format!("address = \"127.0.0.1:0\"\ntoken_file = \"{}\"", path.display());
        let err = admin(Some(&raw(&text)), &[], None).unwrap_err();
        assert!(
            err.contains(&path.display().to_string()) && err.contains("0644"),
            "{err}"
        );
        assert!(!err.contains("0123456789"), "the token must not be shown: {err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let a = admin(Some(&raw(&text)), &[], None).unwrap().unwrap();
        assert_eq!(a.token.unwrap().as_bytes(), b"0123456789abcdef0123");
    }

    #[test]
    fn hosts_are_names_without_ports() {
        let ok = admin(
            Some(&raw("address = \"127.0.0.1:0\"\nhosts = [\"Admin.Example.\"]")),
            &[],
            None,
        );
        assert_eq!(ok.unwrap().unwrap().hosts, ["admin.example"]);
        let bad = admin(
            Some(&raw("address = \"127.0.0.1:0\"\nhosts = [\"a.example:9090\"]")),
            &[],
            None,
        );
        assert!(bad.unwrap_err().contains("admin.hosts"));
    }
}
