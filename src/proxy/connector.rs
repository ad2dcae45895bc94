//! Connecting to origins and CONNECT targets: resolve, check every address against the
//! [`Policy`], connect only to addresses it approved.

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
    let attempt = async {
        let addrs = policy.resolve_checked(host, port).await?;
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
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| ConnectError::TimedOut(timeout))?
}
