//! Who may use the admin listener (`[admin]`): which clients connect (`allow_clients`), how
//! many at once (`max_connections`), which `Host` a request may name (so that a web page
//! cannot read it through DNS rebinding: its requests carry the attacker's name), and the
//! bearer token (`token_file`) every path but `/healthz` needs. Each refusal names its key.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, StatusCode, header};
use ipnet::IpNet;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::{AdminConfig, AdminToken};

/// The admin listener's access rules, shared by every accept loop of one generation (the
/// connection slots survive a failed handoff's restart of the loop).
pub struct AdminGuard {
    hosts: Vec<String>,
    allow_clients: Vec<IpNet>,
    token: Option<AdminToken>,
    slots: Arc<Semaphore>,
}

/// A refusal: its status and the reason the client reads.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    pub status: StatusCode,
    pub reason: String,
}

/// The challenges a 401 carries: `Bearer` for scrapers (Prometheus' `authorization`), and
/// `Basic` (the token as the password, any user name), which makes a browser ask for it and
/// send it again with the status page's own fetches of `/status.json`.
pub const CHALLENGES: [&str; 2] = [
    "Bearer realm=\"baton admin\"",
    "Basic realm=\"baton admin\", charset=\"UTF-8\"",
];

impl AdminGuard {
    pub fn new(config: &AdminConfig) -> AdminGuard {
        AdminGuard {
            hosts: config.hosts.clone(),
            allow_clients: config.allow_clients.clone(),
            token: config.token.clone(),
            slots: Arc::new(Semaphore::new(config.max_connections)),
        }
    }

    /// A connection slot, or `None` when `max_connections` are open (the caller closes).
    pub fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_owned().ok()
    }

    /// Whether `client` may connect (`allow_clients`).
    pub fn admits_client(&self, client: IpAddr) -> bool {
        let ip = client.to_canonical();
        self.allow_clients.iter().any(|n| n.contains(&ip))
    }

    /// Checks one request of a connection from `client`, accepted at `local`.
    pub fn check(&self, client: IpAddr, local: SocketAddr, path: &str, headers: &HeaderMap) -> Result<(), Refused> {
        if !self.admits_client(client) {
            return Err(Refused {
                status: StatusCode::FORBIDDEN,
                reason: format!("client {client} is not in [admin] allow_clients\n"),
            });
        }
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if !names_this_listener(host, local, &self.hosts) {
            return Err(Refused {
                status: StatusCode::MISDIRECTED_REQUEST,
                reason: format!(
                    "Host {:?} does not name this admin listener ({local}, localhost); add the name to [admin] hosts\n",
                    host.unwrap_or("")
                ),
            });
        }
        // Health checks (load balancers, systemd's, a container runtime's) carry no token.
        if path == "/healthz" {
            return Ok(());
        }
        match &self.token {
            Some(token) if !presents(headers.get(header::AUTHORIZATION), token) => Err(Refused {
                status: StatusCode::UNAUTHORIZED,
                reason: "this admin listener needs its token ([admin] token_file): `Authorization: Bearer <token>`, or the token as a Basic password\n".into(),
            }),
            _ => Ok(()),
        }
    }
}

/// Whether a `Host` value names this listener: its own address (ip:port, `[v6]:port`);
/// `localhost` or a loopback address, at any port (an SSH tunnel or a port forward shows
/// its own port); or a name of `[admin] hosts`, at any port. None of these is a name an
/// attacker's web page can be loaded from, which is what DNS rebinding needs.
pub fn names_this_listener(host: Option<&str>, local: SocketAddr, hosts: &[String]) -> bool {
    let Some(authority) = host.and_then(|h| h.parse::<http::uri::Authority>().ok()) else {
        return false;
    };
    let port = authority.port_u16();
    let name = authority.host().trim_end_matches('.').to_ascii_lowercase();
    let bare = name.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<IpAddr>() {
        let ip = ip.to_canonical();
        return ip.is_loopback() || (ip == local.ip().to_canonical() && port == Some(local.port()));
    }
    name == "localhost" || hosts.contains(&name)
}

/// Whether `Authorization` carries `token`: `Bearer <token>`, or `Basic` with the token as
/// the password. Compared in constant time (over digests, so the length does not show).
fn presents(value: Option<&HeaderValue>, token: &AdminToken) -> bool {
    let Some(value) = value.and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let (scheme, rest) = value.trim().split_once(' ').unwrap_or((value, ""));
    let offered: Vec<u8> = if scheme.eq_ignore_ascii_case("bearer") {
        rest.trim().as_bytes().to_vec()
    } else if scheme.eq_ignore_ascii_case("basic") {
        let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest.trim()) else {
            return false;
        };
        match decoded.iter().position(|&b| b == b':') {
            Some(colon) => decoded[colon + 1..].to_vec(),
            None => return false,
        }
    } else {
        return false;
    };
    let (a, b) = (Sha256::digest(&offered), Sha256::digest(token.as_bytes()));
    a.as_slice().ct_eq(b.as_slice()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn local() -> SocketAddr {
        "127.0.0.1:9090".parse().unwrap()
    }

    #[test]
    fn host_must_name_the_listener() {
        let hosts = vec!["admin.example".to_string()];
        let ok = |h: &str, local: SocketAddr| names_this_listener(Some(h), local, &hosts);
        for h in [
            "127.0.0.1:9090",
            "localhost",
            "localhost:9090",
            "LOCALHOST:1234",
            "127.0.0.1:9999",
        ] {
            assert!(ok(h, local()), "{h} names a loopback listener");
        }
        for h in ["admin.example", "Admin.Example.:443"] {
            assert!(ok(h, local()), "{h} is in [admin] hosts");
        }
        for h in [
            "evil.example",
            "evil.example:9090",
            "localhost.evil.example",
            "",
            "10.0.0.5:9090",
        ] {
            assert!(!ok(h, local()), "{h} must be refused");
        }
        assert!(!names_this_listener(None, local(), &hosts), "no Host at all");
        let v6: SocketAddr = "[2001:db8::5]:9090".parse().unwrap();
        assert!(ok("[2001:db8::5]:9090", v6), "a v6 listener's own address");
        assert!(!ok("[2001:db8::5]:9091", v6), "another port of a non-loopback address");
        assert!(ok("[::1]:9090", local()), "v6 loopback");
        let wild: SocketAddr = "10.0.0.5:9090".parse().unwrap();
        assert!(ok("10.0.0.5:9090", wild), "the address the client connected to");
    }

    fn guard(token: Option<&str>) -> AdminGuard {
        AdminGuard {
            hosts: Vec::new(),
            allow_clients: vec!["127.0.0.0/8".parse().unwrap()],
            token: token.map(AdminToken::for_tests),
            slots: Arc::new(Semaphore::new(1)),
        }
    }

    fn headers(pairs: &[(header::HeaderName, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:9090"));
        for (k, v) in pairs {
            h.insert(k.clone(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_token_is_needed_for_all_but_healthz() {
        let token = "s3cret-token-0123456789";
        let g = guard(Some(token));
        let me: IpAddr = "127.0.0.1".parse().unwrap();
        let status = |path, h: &HeaderMap| g.check(me, local(), path, h).err().map(|r| r.status);
        assert_eq!(status("/metrics", &headers(&[])), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(status("/healthz", &headers(&[])), None);
        let bearer = headers(&[(header::AUTHORIZATION, &format!("Bearer {token}"))]);
        assert_eq!(status("/metrics", &bearer), None);
        let wrong = headers(&[(header::AUTHORIZATION, "Bearer s3cret-token-012345678")]);
        assert_eq!(status("/metrics", &wrong), Some(StatusCode::UNAUTHORIZED));
        let basic = base64::engine::general_purpose::STANDARD.encode(format!("anyone:{token}"));
        let basic = headers(&[(header::AUTHORIZATION, &format!("Basic {basic}"))]);
        assert_eq!(status("/status.json", &basic), None);
    }

    #[test]
    fn clients_outside_allow_clients_are_refused_first() {
        let g = guard(None);
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        let r = g.check(other, local(), "/metrics", &headers(&[])).unwrap_err();
        assert_eq!(r.status, StatusCode::FORBIDDEN);
        assert!(r.reason.contains("[admin] allow_clients"), "{}", r.reason);
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert!(g.admits_client(mapped), "a v4-mapped loopback client is loopback");
    }
}
