//! The origin connector behind the pooled HTTP client: resolves the origin, checks every
//! address against the [`Policy`] and connects only to addresses it approved.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::policy::{Denial, Policy, ResolveError};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("{0}")]
    Denied(Denial),
    #[error("{0}")]
    Resolve(String),
    #[error("connect timed out after {0:?}")]
    TimedOut(Duration),
    #[error("{0}")]
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

#[derive(Clone)]
pub struct GuardedConnector {
    pub policy: Arc<Policy>,
    pub timeout: Duration,
}

impl tower_service::Service<Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let policy = self.policy.clone();
        let timeout = self.timeout;
        Box::pin(async move {
            let host = uri.host().unwrap_or_default().to_string();
            let port = uri.port_u16().unwrap_or(80);
            connect_checked(&policy, &host, port, timeout).await.map(TokioIo::new)
        })
    }
}
