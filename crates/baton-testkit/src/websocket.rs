//! WebSockets through the proxy the way clients with an HTTP proxy configured send them: an
//! absolute-form `GET http://origin/path` with `Upgrade: websocket`, answered 101, then
//! WebSocket frames over the same connection (tungstenite speaks them on both sides).
//!
//! [`start_echo`] is a loopback WebSocket server that echoes every message; [`open`] makes
//! the client's handshake by hand (tungstenite's client writes origin-form only) and checks
//! the server's `Sec-WebSocket-Accept`.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::client::generate_key;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

use crate::client::read_head;

/// A WebSocket client connection through the proxy.
pub type Socket = WebSocketStream<TcpStream>;

/// A WebSocket echo server on loopback: every text or binary message comes back as sent,
/// in order; it answers the handshake on any path.
pub async fn start_echo() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(echo(stream));
        }
    });
    Ok(addr)
}

/// The same echo server over TLS with `leaf` (a `wss://` origin, for a WebSocket inside a
/// bumped tunnel).
pub async fn start_tls_echo(leaf: &crate::tls::Leaf) -> anyhow::Result<SocketAddr> {
    let acceptor = crate::origin::tls_acceptor(leaf)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(stream).await {
                    echo(tls).await;
                }
            });
        }
    });
    Ok(addr)
}

/// Echoes every text or binary message of one connection until it ends.
async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: S) {
    let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    while let Some(Ok(msg)) = ws.next().await {
        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
            return;
        }
    }
}

/// Opens `ws://{origin}{path}` through the proxy at `proxy` as an absolute-form request;
/// the socket once the proxy relayed the server's 101, or the answer's status line.
pub async fn open(proxy: SocketAddr, origin: SocketAddr, path: &str) -> io::Result<Socket> {
    let mut stream = crate::client::connect_tcp(proxy).await?;
    let key = generate_key();
    let head = format!(
        "GET http://{origin}{path} HTTP/1.1\r\nHost: {origin}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await?;
    let answer = read_head(&mut stream).await?;
    let status = answer.lines().next().unwrap_or("").to_string();
    if !status.starts_with("HTTP/1.1 101") {
        return Err(io::Error::other(format!("not switched: {status}")));
    }
    let accept = field(&answer, "sec-websocket-accept");
    if accept.as_deref() != Some(derive_accept_key(key.as_bytes()).as_str()) {
        return Err(io::Error::other(format!("wrong Sec-WebSocket-Accept: {accept:?}")));
    }
    Ok(WebSocketStream::from_raw_socket(stream, Role::Client, None).await)
}

/// Sends `n` text messages, each waiting for its echo; `Err` names the first that did not
/// come back as sent. The messages carry their number, so an echo out of order fails.
pub async fn echo_messages(ws: &mut Socket, n: usize, tag: &str) -> io::Result<()> {
    for i in 0..n {
        let sent = format!("{tag} message {i}");
        ws.send(Message::text(sent.clone())).await.map_err(io::Error::other)?;
        match ws.next().await {
            Some(Ok(Message::Text(got))) if got.as_str() == sent => {}
            other => return Err(io::Error::other(format!("{tag}: message {i} came back as {other:?}"))),
        }
    }
    Ok(())
}

/// WebSocket sessions through the proxy, each echoing numbered messages one after the other
/// until [`Sessions::finish`]: what baton-chaos keeps open across its handoffs.
pub struct Sessions {
    stop: CancellationToken,
    echoed: Arc<AtomicU64>,
    tasks: Vec<JoinHandle<Result<u64, String>>>,
}

impl Sessions {
    /// Opens `n` sessions to `ws://{origin}/session-I`; fails if any cannot switch.
    pub async fn open(proxy: SocketAddr, origin: SocketAddr, n: usize) -> io::Result<Sessions> {
        let (stop, echoed) = (CancellationToken::new(), Arc::new(AtomicU64::new(0)));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let ws = open(proxy, origin, &format!("/session-{i}")).await?;
            tasks.push(tokio::spawn(session(ws, i, stop.clone(), echoed.clone())));
        }
        Ok(Sessions { stop, echoed, tasks })
    }

    /// Messages echoed so far, across the sessions.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(Ordering::Relaxed)
    }

    /// Stops and closes every session: for each, the messages it had echoed in order, or
    /// what went wrong.
    pub async fn finish(self) -> Vec<Result<u64, String>> {
        self.stop.cancel();
        let mut out = Vec::with_capacity(self.tasks.len());
        for t in self.tasks {
            out.push(t.await.unwrap_or_else(|e| Err(format!("session task: {e}"))));
        }
        out
    }
}

async fn session(mut ws: Socket, i: usize, stop: CancellationToken, echoed: Arc<AtomicU64>) -> Result<u64, String> {
    let mut n = 0u64;
    while !stop.is_cancelled() {
        echo_messages(&mut ws, 1, &format!("session {i} #{n}"))
            .await
            .map_err(|e| format!("session {i} after {n} messages: {e}"))?;
        n += 1;
        echoed.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    close(ws).await.map_err(|e| format!("session {i}: close: {e}"))?;
    Ok(n)
}

/// Closes `ws` as a client does (a Close frame, then the server's, then EOF).
pub async fn close(mut ws: Socket) -> io::Result<()> {
    ws.close(None).await.map_err(io::Error::other)?;
    while let Some(msg) = ws.next().await {
        msg.map_err(io::Error::other)?;
    }
    Ok(())
}

/// The value of header field `name` (lowercase) in a response head.
fn field(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}
