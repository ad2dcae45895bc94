//! Clients of the proxy: a keep-alive HTTP/1.1 connection sending absolute-form requests, and
//! CONNECT tunnels; over plain TCP or, to a TLS listener, over TLS ([`ProxyTls`]).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::ProxyTls;

/// Why a client request failed: the connection itself, or HTTP on it.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
}

impl ClientError {
    /// The connection closed before any of the response arrived: the case RFC 9112 §9.3.1
    /// lets a client retry on a fresh connection for an idempotent request (and the one
    /// baton's drain promises never to cause).
    pub fn is_closed_before_response(&self) -> bool {
        matches!(self, ClientError::Http(e) if e.is_incomplete_message() || e.is_canceled() || e.is_closed())
    }
}

/// A keep-alive HTTP/1.1 connection to the proxy that sends absolute-form requests.
pub struct ProxyConnection {
    /// This side's port (see [`connect_tcp`]).
    port: u16,
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    /// The last answer said `Connection: close`.
    announced_close: bool,
    /// How hyper's connection ended: its error, if any (a reset, say).
    ended: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
}

/// How the proxy closed a keep-alive connection between requests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Closed {
    /// After an answer that said `Connection: close`.
    Announced,
    /// A FIN with nothing announced (an idle connection closed).
    Quietly,
    /// An error ended the connection (a reset), nothing announced: a client loses what it
    /// had sent meanwhile.
    Reset(String),
}

impl ProxyConnection {
    pub async fn open(proxy: SocketAddr) -> Result<ProxyConnection, ClientError> {
        ProxyConnection::open_via(proxy, None).await
    }

    /// Opens a connection to the proxy, over TLS with `tls` (a TLS listener).
    pub async fn open_via(proxy: SocketAddr, tls: Option<&ProxyTls>) -> Result<ProxyConnection, ClientError> {
        ProxyConnection::over(connect_tcp(proxy).await?, tls).await
    }

    /// [`ProxyConnection::open_via`] on a TCP connection already made (whose port the caller
    /// noted: see [`connect_tcp`]).
    pub async fn over(tcp: TcpStream, tls: Option<&ProxyTls>) -> Result<ProxyConnection, ClientError> {
        let port = tcp.local_addr()?.port();
        let stream = ClientStream::over(tcp, tls).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let (tx, ended) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = tx.send(conn.await.map_err(|e| format!("{e:?}")));
        });
        Ok(ProxyConnection {
            port,
            sender,
            announced_close: false,
            ended: Some(ended),
        })
    }

    /// How the connection, found closed, was closed (waits up to 1 s for hyper's connection
    /// task to say how it ended).
    pub async fn how_closed(&mut self) -> Closed {
        if self.announced_close {
            return Closed::Announced;
        }
        let Some(ended) = self.ended.take() else {
            return Closed::Quietly;
        };
        match tokio::time::timeout(Duration::from_secs(1), ended).await {
            Ok(Ok(Err(e))) => Closed::Reset(e),
            Ok(Ok(Ok(()))) => Closed::Quietly,
            Ok(Err(_)) | Err(_) => Closed::Reset("the connection task did not end".into()),
        }
    }

    /// The connection's port on this side.
    pub fn local_port(&self) -> u16 {
        self.port
    }

    /// Whether the proxy closed this connection (e.g. after `Connection: close`).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Waits until the connection can take the next request; `false` if the proxy closed it
    /// meanwhile (after a `Connection: close` answer, or idle). Nothing is sent either way.
    pub async fn ready(&mut self) -> bool {
        self.sender.ready().await.is_ok()
    }

    /// GETs `url` (absolute) and reads the whole body.
    pub async fn get(&mut self, url: &str) -> Result<(StatusCode, Bytes), ClientError> {
        self.sender.ready().await?;
        let req = Request::get(url)
            .header(http::header::HOST, host_of(url))
            .body(Empty::new())
            .expect("static request parts are valid");
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        self.announced_close = resp
            .headers()
            .get_all(http::header::CONNECTION)
            .iter()
            .any(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = resp.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}

fn host_of(url: &str) -> String {
    url.split("://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or("")
        .to_string()
}

/// Opens a CONNECT tunnel through the proxy to `target`; returns the stream after the 200.
pub async fn open_tunnel(proxy: SocketAddr, target: SocketAddr) -> std::io::Result<TcpStream> {
    let mut s = TcpStream::connect(proxy).await?;
    let _ = s.set_nodelay(true);
    connect_through(&mut s, target).await?;
    Ok(s)
}

/// [`open_tunnel`] to a plain listener, or over TLS with `tls`.
pub async fn open_tunnel_via(
    proxy: SocketAddr,
    target: SocketAddr,
    tls: Option<&ProxyTls>,
) -> io::Result<ClientStream> {
    open_tunnel_over(connect_tcp(proxy).await?, target, tls).await
}

/// [`open_tunnel_via`] on a TCP connection already made (see [`connect_tcp`]).
pub async fn open_tunnel_over(tcp: TcpStream, target: SocketAddr, tls: Option<&ProxyTls>) -> io::Result<ClientStream> {
    let mut s = ClientStream::over(tcp, tls).await?;
    connect_through(&mut s, target).await?;
    Ok(s)
}

/// A TCP connection to the proxy, without delay on small writes. Its local port names the
/// connection on both sides: a client that then fails (in the TLS handshake, the request or
/// the tunnel) can say which connection it was on, and baton-chaos matches that against the
/// sockets a crashed generation held.
pub async fn connect_tcp(proxy: SocketAddr) -> io::Result<TcpStream> {
    let tcp = TcpStream::connect(proxy).await?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// Sends `CONNECT target` on `s` and reads the answer head: a 200, or an error.
async fn connect_through<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, target: SocketAddr) -> io::Result<()> {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let head = read_head(s).await?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "CONNECT refused: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(())
}

/// Reads a response head byte by byte (so nothing after it is consumed).
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<String> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before response head",
            ));
        }
        head.push(b[0]);
        if head.len() > 16 * 1024 {
            return Err(std::io::Error::other("response head too long"));
        }
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// The `Content-Length` of a response head, if it has one.
pub fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        l.to_ascii_lowercase()
            .strip_prefix("content-length:")
            .and_then(|v| v.trim().parse().ok())
    })
}

/// Reads one `Content-Length`-framed response: its head and its body.
pub async fn read_response<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(String, Vec<u8>)> {
    let head = read_head(s).await?;
    let len = content_length(&head).ok_or_else(|| std::io::Error::other(format!("no content-length: {head}")))?;
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    Ok((head, body))
}

/// A connection to the proxy: plain TCP, or TLS to a TLS listener.
pub enum ClientStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl ClientStream {
    pub async fn connect(proxy: SocketAddr, tls: Option<&ProxyTls>) -> io::Result<ClientStream> {
        ClientStream::over(connect_tcp(proxy).await?, tls).await
    }

    /// The stream on `tcp`: as it is, or over TLS with `tls`.
    pub async fn over(tcp: TcpStream, tls: Option<&ProxyTls>) -> io::Result<ClientStream> {
        match tls {
            None => Ok(ClientStream::Plain(tcp)),
            Some(tls) => Ok(ClientStream::Tls(Box::new(tls.connect(tcp).await?))),
        }
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ClientStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_flush(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ClientStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ClientStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
