//! Connecting to origins and CONNECT targets: resolve, check every address against the
//! [`Policy`], connect only to addresses it approved. And connecting to a parent proxy,
//! which the operator chose: it is not held to the destination rules (they apply to the
//! destinations it reaches, see `Policy::check_name`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::net::TcpStream;

use crate::proxy::policy::{Denial, Policy, ResolveError};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Denied(Denial),
    #[error("{0}")]
    Resolve(String),
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl From<ResolveError> for ConnectError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Denied(d) => ConnectError::Denied(d),
            ResolveError::Lookup(s) => ConnectError::Resolve(s),
        }
    }
}

/// Resolves, checks and connects (trying each approved address in turn) within `timeout`.
pub async fn connect_checked(
    policy: &Policy,
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let attempt = async { connect_first(policy.resolve_checked(host, port).await?).await };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ConnectError::TimedOut(timeout))?
}

/// Resolves and connects to a parent proxy (`host` without brackets) within `timeout`.
pub async fn connect_parent(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let attempt = async {
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => tokio::net::lookup_host((host, port))
                .await
                .map_err(|e| ConnectError::Resolve(format!("cannot resolve {host}: {e}")))?
                .collect(),
        };
        connect_first(addrs).await
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ConnectError::TimedOut(timeout))?
}

/// Connects to the first of `addrs` that accepts.
async fn connect_first(addrs: Vec<SocketAddr>) -> Result<TcpStream, ConnectError> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(ConnectError::Io(
        last.unwrap_or_else(|| std::io::Error::other("no address")),
    ))
}
