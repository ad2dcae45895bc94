//! An HTTP/2 client of a TLS proxy listener (ALPN `h2`): requests in forward-proxy form
//! (`:scheme http`, `:authority` the origin) and CONNECT streams (RFC 9113 §8.5), many on one
//! connection, as Chrome and `curl --proxy-http2` use a secure web proxy.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::client::connect_tcp;
use crate::tls::ProxyTls;

/// One HTTP/2 connection to the proxy; clones share it (each request is a stream).
#[derive(Clone)]
pub struct H2Proxy {
    sender: http2::SendRequest<Full<Bytes>>,
    /// The connection's local port: the proxy's access lines name it (`client=…:port`).
    pub port: u16,
}

impl H2Proxy {
    /// Connects over TLS with `tls` (which must offer `h2`); an error if the proxy chose
    /// another protocol.
    pub async fn connect(proxy: SocketAddr, tls: &ProxyTls) -> io::Result<H2Proxy> {
        let tcp = connect_tcp(proxy).await?;
        let port = tcp.local_addr()?.port();
        let stream = tls.connect(tcp).await?;
        let alpn = stream
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        if alpn.as_deref() != Some("h2") {
            return Err(io::Error::other(format!("the proxy chose ALPN {alpn:?}, not h2")));
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            // Chrome's windows are 6 MiB a stream, 15 MiB a connection: the client's decide
            // how fast a download (or a tunnel's bytes towards it) may go.
            .initial_stream_window_size(4 * 1024 * 1024)
            .initial_connection_window_size(16 * 1024 * 1024)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H2Proxy { sender, port })
    }

    /// Whether the connection is closed (after GOAWAY and its last stream, say).
    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// A request for `url` (absolute `http://`) with `body`: the status and the whole body.
    pub async fn send(&self, method: http::Method, url: &str, body: Bytes) -> io::Result<(StatusCode, Bytes)> {
        let resp = self.start(method, url, body).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await.map_err(io::Error::other)?.to_bytes();
        Ok((status, body))
    }

    /// A request whose response is returned once its head arrives (its body still to
    /// read, or to drop: a dropped body resets the stream).
    pub async fn start(&self, method: http::Method, url: &str, body: Bytes) -> io::Result<Response<Incoming>> {
        let req = Request::builder()
            .method(method)
            .uri(url)
            .body(Full::new(body))
            .map_err(io::Error::other)?;
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(io::Error::other)?;
        sender.send_request(req).await.map_err(io::Error::other)
    }

    pub async fn get(&self, url: &str) -> io::Result<(StatusCode, Bytes)> {
        self.send(http::Method::GET, url, Bytes::new()).await
    }

    /// A CONNECT stream to `target`: the tunnel once the proxy answered 200.
    pub async fn tunnel(&self, target: SocketAddr) -> io::Result<TokioIo<Upgraded>> {
        let req = Request::connect(target.to_string())
            .body(Full::new(Bytes::new()))
            .map_err(io::Error::other)?;
        let mut sender = self.sender.clone();
        sender.ready().await.map_err(io::Error::other)?;
        let resp = sender.send_request(req).await.map_err(io::Error::other)?;
        if resp.status() != StatusCode::OK {
            return Err(io::Error::other(format!("CONNECT answered {}", resp.status())));
        }
        let upgraded = hyper::upgrade::on(resp).await.map_err(io::Error::other)?;
        Ok(TokioIo::new(upgraded))
    }
}

/// The rapid-reset attack (CVE-2023-44487) on a new connection: `pairs` streams, each a
/// HEADERS frame at once followed by RST_STREAM, with the h2 crate's client (which sends
/// frames as asked, where hyper's would not open a stream it was told to drop). Returns how
/// the proxy ended the connection: its GOAWAY's reason, or what happened instead.
pub async fn rapid_reset(proxy: SocketAddr, tls: &ProxyTls, origin: SocketAddr, pairs: usize) -> io::Result<String> {
    let stream = tls.connect(connect_tcp(proxy).await?).await?;
    let (mut client, conn) = ::h2::client::handshake(stream).await.map_err(io::Error::other)?;
    let ended = tokio::spawn(conn);
    let mut sent = 0;
    while sent < pairs {
        let req = Request::get(format!("http://{origin}/bytes?n=10"))
            .body(())
            .map_err(io::Error::other)?;
        // A send that fails means the connection is gone: how, the connection task says.
        let Ok(ready) = client.clone().ready().await else { break };
        client = ready;
        let Ok((_, mut stream)) = client.send_request(req, true) else {
            break;
        };
        stream.send_reset(::h2::Reason::CANCEL);
        sent += 1;
    }
    drop(client);
    match tokio::time::timeout(std::time::Duration::from_secs(10), ended).await {
        Ok(Ok(Err(e))) => Ok(format!("connection ended after {sent} pairs: {e}")),
        Ok(Ok(Ok(()))) => Ok("connection ended cleanly, without GOAWAY".into()),
        Ok(Err(e)) => Err(io::Error::other(e)),
        Err(_) => Ok("connection still open 10 s after the last pair".into()),
    }
}

/// HTTP/2 load across handoffs: `connections` connections, each with `streams` workers
/// fetching `url` one request after the other, as a browser keeps a few HTTP/2 connections
/// busy. A request the proxy did not process (refused by a GOAWAY, or sent as the connection
/// closed) is retried on a new connection, as RFC 9113 §6.8 lets a client, and counted as a
/// retry; anything else that is not a complete 200 is a failure.
pub struct H2Load {
    stop: tokio_util::sync::CancellationToken,
    tally: Arc<H2Tally>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

#[derive(Default)]
struct H2Tally {
    ok: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    samples: std::sync::Mutex<Vec<String>>,
}

/// What an [`H2Load`] saw.
#[derive(Debug, Clone)]
pub struct H2LoadReport {
    pub ok: u64,
    pub retried: u64,
    pub failed: u64,
    pub samples: Vec<String>,
}

impl H2Load {
    pub async fn start(
        proxy: SocketAddr,
        tls: ProxyTls,
        url: String,
        connections: usize,
        streams: usize,
    ) -> io::Result<H2Load> {
        let (stop, tally) = (tokio_util::sync::CancellationToken::new(), Arc::new(H2Tally::default()));
        let mut workers = Vec::new();
        for _ in 0..connections {
            let shared = Arc::new(tokio::sync::Mutex::new(H2Proxy::connect(proxy, &tls).await?));
            for _ in 0..streams {
                let w = H2Worker {
                    proxy,
                    tls: tls.clone(),
                    url: url.clone(),
                    conn: shared.clone(),
                    tally: tally.clone(),
                };
                workers.push(tokio::spawn(w.run(stop.clone())));
            }
        }
        Ok(H2Load { stop, tally, workers })
    }

    pub fn ok(&self) -> u64 {
        self.tally.ok.load(Ordering::Relaxed)
    }

    pub async fn finish(self) -> H2LoadReport {
        self.stop.cancel();
        for w in self.workers {
            let _ = w.await;
        }
        let t = &self.tally;
        H2LoadReport {
            ok: t.ok.load(Ordering::Relaxed),
            retried: t.retried.load(Ordering::Relaxed),
            failed: t.failed.load(Ordering::Relaxed),
            samples: t.samples.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }
}

struct H2Worker {
    proxy: SocketAddr,
    tls: ProxyTls,
    url: String,
    /// The connection this worker's group shares, replaced once it has closed.
    conn: Arc<tokio::sync::Mutex<H2Proxy>>,
    tally: Arc<H2Tally>,
}

impl H2Worker {
    async fn run(self, stop: tokio_util::sync::CancellationToken) {
        while !stop.is_cancelled() {
            let Some(client) = self.current().await else {
                continue;
            };
            let sent = tokio::time::timeout(std::time::Duration::from_secs(20), client.get(&self.url)).await;
            match sent {
                Ok(Ok((status, body))) if status == StatusCode::OK && !body.is_empty() => {
                    self.tally.ok.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Err(e)) if not_processed(&e) => {
                    self.tally.retried.fetch_add(1, Ordering::Relaxed);
                }
                other => self.fail(format!("port {}: {other:?}", client.port)),
            }
        }
    }

    /// The group's connection, a new one if it has closed (`None`: connecting failed,
    /// counted).
    async fn current(&self) -> Option<H2Proxy> {
        let mut conn = self.conn.lock().await;
        if conn.is_closed() {
            match H2Proxy::connect(self.proxy, &self.tls).await {
                Ok(c) => *conn = c,
                Err(e) => {
                    self.fail(format!("reconnect: {e}"));
                    return None;
                }
            }
        }
        Some(conn.clone())
    }

    fn fail(&self, what: String) {
        self.tally.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.tally.samples.lock()
            && s.len() < 20
        {
            s.push(what);
        }
    }
}

/// Whether a request's error says the proxy never processed it: hyper did not send it (the
/// connection was closing), or HTTP/2 refused the stream (REFUSED_STREAM, or a GOAWAY whose
/// last stream id is below it, which h2 reports with the GOAWAY's NO_ERROR).
fn not_processed(e: &io::Error) -> bool {
    let Some(h) = e.get_ref().and_then(|e| e.downcast_ref::<hyper::Error>()) else {
        return false;
    };
    if h.is_canceled() || h.is_closed() {
        return true;
    }
    let h2 = std::error::Error::source(h).and_then(|s| s.downcast_ref::<::h2::Error>());
    h2.is_some_and(|e| {
        e.reason() == Some(::h2::Reason::REFUSED_STREAM)
            || (e.is_go_away() && e.reason() == Some(::h2::Reason::NO_ERROR))
    })
}
