//! Connecting to origins and CONNECT targets: resolve, check every address against the
//! [`Policy`], connect only to addresses it approved. And connecting to a parent proxy,
//! which the operator chose: it is not held to the destination rules (they apply to the
//! destinations it reaches, see `Policy::check_name`).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::config::Parent;
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
    /// The TLS handshake with an `https://` parent failed (its certificate did not verify,
    /// say): the reason is rustls'.
    #[error("TLS handshake failed: {0}")]
    Tls(String),
}

impl From<ResolveError> for ConnectError {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Denied(d) => ConnectError::Denied(d),
            ResolveError::Lookup(s) => ConnectError::Resolve(s),
        }
    }
}

/// A connection to the next hop: a plain socket, or TLS to an `https://` parent proxy.
pub enum HopStream {
    Plain(TcpStream),
    /// Boxed: rustls' connection state is large, and most hops are plain.
    Tls(Box<TlsStream<TcpStream>>),
}

impl HopStream {
    /// The address connected to (the Squid line's `FIRSTUP_PARENT/…` or `HIER_DIRECT/…`).
    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            HopStream::Plain(s) => s.peer_addr(),
            HopStream::Tls(s) => s.get_ref().0.peer_addr(),
        }
    }
}

impl AsyncRead for HopStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HopStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            HopStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for HopStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            HopStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            HopStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HopStream::Plain(s) => Pin::new(s).poll_flush(cx),
            HopStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            HopStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            HopStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
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

/// Connects to a parent proxy within `timeout`: over TLS with `tls` for an `https://` one,
/// its certificate verified for its host name (or address).
pub async fn connect_parent(
    parent: &Parent,
    tls: Option<&TlsConnector>,
    timeout: Duration,
) -> Result<HopStream, ConnectError> {
    let started = tokio::time::Instant::now();
    let tcp = connect_host(&parent.host, parent.port, timeout).await?;
    if !parent.tls {
        return Ok(HopStream::Plain(tcp));
    }
    // Loaded at start whenever a parent is https://: its absence is a bug, not a setting.
    let tls = tls.ok_or_else(|| ConnectError::Tls("no TLS configuration was loaded for https:// parents".into()))?;
    let name = rustls::pki_types::ServerName::try_from(parent.host.clone())
        .map_err(|e| ConnectError::Tls(format!("{:?} is not a name to verify: {e}", parent.host)))?;
    let left = timeout.saturating_sub(started.elapsed());
    match tokio::time::timeout(left, tls.connect(name, tcp)).await {
        Err(_) => Err(ConnectError::TimedOut(timeout)),
        Ok(Err(e)) => Err(ConnectError::Tls(e.to_string())),
        Ok(Ok(s)) => Ok(HopStream::Tls(Box::new(s))),
    }
}

/// Resolves and connects to `host` (without brackets) within `timeout`.
async fn connect_host(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, ConnectError> {
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
