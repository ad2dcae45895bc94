//! Test support shared by the integration tests and the `baton-chaos` load tool: loopback
//! origins (HTTP and TCP echo) and small proxy clients. Not part of the proxy itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

type Body = BoxBody<Bytes, Infallible>;

/// The byte at offset `i` of every generated body: cheap, deterministic, not all-equal.
pub fn pattern_byte(i: u64) -> u8 {
    ((i.wrapping_mul(31) + 7) % 251) as u8
}

pub fn pattern(n: usize) -> Vec<u8> {
    (0..n as u64).map(pattern_byte).collect()
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// An HTTP origin on 127.0.0.1:<ephemeral>. Routes:
/// - `GET /bytes?n=N` N pattern bytes with Content-Length; `/chunked?n=N` the same, chunked;
/// - `GET /slow?ms=M&n=N` waits M ms, then N bytes;
/// - `POST|PUT /sha256` the hex SHA-256 and length of the request body (streamed);
/// - `GET /headers` the request headers as received, one per line;
/// - `GET /hang` never answers.
pub async fn start_origin() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(route))
                    .await;
            });
        }
    });
    Ok(addr)
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn route(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let n = query(&req, "n").unwrap_or(1024);
    let resp = match req.uri().path() {
        "/bytes" => streamed(n, true),
        "/chunked" => streamed(n, false),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(2000))).await;
            streamed(n, true)
        }
        "/sha256" => {
            let mut hasher = Sha256::new();
            let mut len = 0u64;
            let mut body = req.into_body();
            while let Some(frame) = body.frame().await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            len += d.len() as u64;
                            hasher.update(d);
                        }
                    }
                    Err(_) => return Ok(text(StatusCode::BAD_REQUEST, "body error".into())),
                }
            }
            text(StatusCode::OK, format!("{} {len}", hex::encode(hasher.finalize())))
        }
        "/headers" => {
            let mut s = String::new();
            for (k, v) in req.headers() {
                s.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("?")));
            }
            text(StatusCode::OK, s)
        }
        "/hang" => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        _ => text(StatusCode::NOT_FOUND, "no such route".into()),
    };
    Ok(resp)
}

fn text(status: StatusCode, s: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s)).boxed());
    *r.status_mut() = status;
    r
}

/// N pattern bytes in 64 KiB frames; with a Content-Length when `sized`, else chunked.
fn streamed(n: u64, sized: bool) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let body = if sized {
        // A known length: hyper sends Content-Length, not chunked.
        Full::new(Bytes::from(pattern(n as usize))).boxed()
    } else {
        let frames = futures_util::stream::iter((0..n.div_ceil(CHUNK)).map(move |c| {
            let data: Vec<u8> = (c * CHUNK..((c + 1) * CHUNK).min(n)).map(pattern_byte).collect();
            Ok::<_, Infallible>(Frame::data(Bytes::from(data)))
        }));
        StreamBody::new(frames).boxed()
    };
    Response::new(body)
}

/// A TCP echo server on 127.0.0.1:<ephemeral>; it half-closes after the client does.
pub async fn start_echo() -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let (mut r, mut w) = stream.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Ok(addr)
}

/// A keep-alive HTTP/1.1 connection to the proxy that sends absolute-form requests.
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
    /// lets a client retry on a fresh connection for an idempotent request.
    pub fn is_closed_before_response(&self) -> bool {
        matches!(self, ClientError::Http(e) if e.is_incomplete_message() || e.is_canceled() || e.is_closed())
    }
}

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
