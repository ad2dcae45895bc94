//! Clients of the proxy: a keep-alive HTTP/1.1 connection sending absolute-form requests, and
//! CONNECT tunnels.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

impl ProxyConnection {
    pub async fn open(proxy: SocketAddr) -> Result<ProxyConnection, ClientError> {
        let stream = TcpStream::connect(proxy).await?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(ProxyConnection { sender })
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
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    let head = read_head(&mut s).await?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!(
            "CONNECT refused: {}",
            head.lines().next().unwrap_or("")
        )));
    }
    Ok(s)
}

/// Reads a response head byte by byte (so nothing after it is consumed).
pub async fn read_head(s: &mut TcpStream) -> std::io::Result<String> {
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
