//! An HTTP/2 client of a TLS proxy listener (ALPN `h2`): requests in forward-proxy form
//! (`:scheme http`, `:authority` the origin) and CONNECT streams (RFC 9113 §8.5), many on one
//! connection, as Chrome and `curl --proxy-http2` use a secure web proxy.

use std::io;
use std::net::SocketAddr;

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
}

impl H2Proxy {
    /// Connects over TLS with `tls` (which must offer `h2`); an error if the proxy chose
    /// another protocol.
    pub async fn connect(proxy: SocketAddr, tls: &ProxyTls) -> io::Result<H2Proxy> {
        let stream = tls.connect(connect_tcp(proxy).await?).await?;
        let alpn = stream
            .get_ref()
            .1
            .alpn_protocol()
            .map(|p| String::from_utf8_lossy(p).into_owned());
        if alpn.as_deref() != Some("h2") {
            return Err(io::Error::other(format!("the proxy chose ALPN {alpn:?}, not h2")));
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .initial_stream_window_size(1024 * 1024)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(H2Proxy { sender })
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
