//! Process-level tests for the proxy holes of issue 14, against the real binary on loopback:
//! a request head half received when a drain's grace period ends, a busy tunnel from a
//! Unix-socket client, and CONNECT tunnels that must stay on splice(2) behind the framing
//! layer.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{Baton, testkit, wait_for};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};

/// How long any single read waits for the proxy.
const READ_WAIT: Duration = Duration::from_secs(5);

/// One response read from `s` (head and Content-Length body); `buf` keeps what follows.
async fn response<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> Result<(String, Vec<u8>), String> {
    let deadline = Instant::now() + READ_WAIT;
    let end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf, deadline).await?;
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| format!("no content-length in {head:?}"))?;
    while buf.len() < end + len {
        fill(s, buf, deadline).await?;
    }
    let body = buf[end..end + len].to_vec();
    buf.drain(..end + len);
    Ok((head, body))
}

async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, deadline: Instant) -> Result<(), String> {
    let mut chunk = [0u8; 8192];
    let left = deadline.saturating_duration_since(Instant::now());
    match tokio::time::timeout(left, s.read(&mut chunk)).await {
        Ok(Ok(0)) => Err(format!("closed by the proxy after {:?}", String::from_utf8_lossy(buf))),
        Ok(Ok(n)) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Ok(Err(e)) => Err(format!("read: {e}")),
        Err(_) => Err(format!("nothing within {READ_WAIT:?}")),
    }
}

/// Whether `s` reaches its end (the proxy closed it) within `within`; bytes are an error.
async fn closes_within<S: AsyncRead + Unpin>(s: &mut S, within: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    let mut byte = [0u8; 1];
    match tokio::time::timeout(within, s.read(&mut byte)).await {
        Ok(Ok(0) | Err(_)) => Ok(start.elapsed()),
        Ok(Ok(_)) => Err("unexpected bytes".into()),
        Err(_) => Err(format!("still open after {within:?}")),
    }
}

fn get(origin: SocketAddr, path: &str) -> String {
    format!("GET http://{origin}{path} HTTP/1.1\r\nHost: {origin}\r\n\r\n")
}

/// A keep-alive client has sent the first 20 bytes of its next request when `baton upgrade`
/// runs, and the rest 1.6 s later (beyond the drain's 1 s grace period): a request counts from
/// its first byte, so it is answered (with `Connection: close`), not cut. (With
/// `migrate = false`; moving, the connection stays open: the next test.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_head_during_the_drain_grace_is_answered() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("").await;
    baton.set_top_level("migrate = false");
    let mut c = TcpStream::connect(baton.proxy).await.unwrap();
    let mut buf = Vec::new();
    let req = get(origin, "/bytes?n=5");
    c.write_all(req.as_bytes()).await.unwrap();
    let (head, body) = response(&mut c, &mut buf).await.expect("first request");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body.len(), 5);

    c.write_all(&req.as_bytes()[..20]).await.unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "upgrade failed: {out}\n{}", baton.log());
    // The point of the test: the client is slower than the grace period.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    c.write_all(&req.as_bytes()[20..]).await.expect("rest of the head");
    let (head, body) = response(&mut c, &mut buf).await.unwrap_or_else(|e| {
        panic!(
            "the request begun before the drain was not answered: {e}\n{}",
            baton.log()
        )
    });
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("connection: close"), "{head}");
    assert_eq!(body.len(), 5);
    closes_within(&mut c, Duration::from_secs(3))
        .await
        .expect("closed after the answer");
}

/// The access line of the tunnel that ended last with `relay=` in it (the log is read until
/// one appears, at most 5 s).
async fn tunnel_relay(baton: &Baton) -> String {
    wait_for(READ_WAIT, "the tunnel's access line", || async {
        let log = baton.log();
        log.lines()
            .rev()
            .find(|l| l.contains("tunnel") && l.contains("relay="))
            .map(str::to_string)
    })
    .await
}

/// Sends `ping` and reads its echo every 200 ms for `busy`, then stays quiet: the tunnel
/// must stay open while busy and close within 3 s of quiet (`tunnel_idle` is 1 s).
async fn busy_then_idle<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, busy: Duration) -> Result<Duration, String> {
    let start = Instant::now();
    for round in 0..50 {
        if start.elapsed() >= busy {
            break;
        }
        s.write_all(b"ping").await.map_err(|e| format!("round {round}: {e}"))?;
        let mut echo = [0u8; 4];
        match tokio::time::timeout(READ_WAIT, s.read_exact(&mut echo)).await {
            Ok(Ok(_)) if &echo == b"ping" => {}
            other => return Err(format!("round {round} after {:?}: {other:?}", start.elapsed())),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    closes_within(s, Duration::from_secs(3)).await
}

async fn connect<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, target: SocketAddr) {
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let deadline = Instant::now() + READ_WAIT;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        fill(s, &mut buf, deadline).await.expect("CONNECT answer");
    }
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
}

/// A tunnel from a Unix-socket client echoing every 200 ms for 3 s stays open although
/// `tunnel_idle` is 1 s (its activity counts as bytes move); once quiet it is closed. It
/// splices like a TCP client's (so it can move at a handoff).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_unix_tunnel_stays_open_and_idle_one_closes() {
    let echo = testkit::start_echo().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.sock");
    let extra = format!(
        "[[listener]]\nname = \"unix\"\npath = \"{}\"\n\n[timeouts]\ntunnel_idle = \"1s\"\n\n[access]\nconnect_ports = [443, {}]\n",
        path.display(),
        echo.port()
    );
    let baton = Baton::start(&extra).await;
    let mut c = UnixStream::connect(&path).await.unwrap();
    connect(&mut c, echo).await;
    let closed = busy_then_idle(&mut c, Duration::from_secs(3))
        .await
        .unwrap_or_else(|e| panic!("busy Unix tunnel: {e}\n{}", baton.log()));
    eprintln!("idle Unix tunnel closed after {closed:?}");
    let line = tunnel_relay(&baton).await;
    assert!(line.contains("idle timeout") && line.contains("splice"), "{line}");
}

/// A tunnel between TCP sockets still uses splice(2) behind the framing layer, and the bytes
/// sent right behind the CONNECT head reach the target first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_tunnel_is_spliced() {
    let echo = testkit::start_echo().await.unwrap();
    let baton = Baton::start(&format!("[access]\nconnect_ports = [443, {}]\n", echo.port())).await;
    let mut c = TcpStream::connect(baton.proxy).await.unwrap();
    let head = format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\nearly;");
    c.write_all(head.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let deadline = Instant::now() + READ_WAIT;
    while !buf.windows(6).any(|w| w == b"early;") {
        fill(&mut c, &mut buf, deadline).await.expect("CONNECT answer and echo");
    }
    assert!(buf.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf));
    c.write_all(b"late").await.unwrap();
    c.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(READ_WAIT, c.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"late");
    let line = tunnel_relay(&baton).await;
    assert!(line.contains("splice") && line.contains("closed"), "{line}");
}

/// The same half head at a handoff that moves connections: the old generation answers it
/// (without `Connection: close`), then the connection moves, and the next request on it is
/// the new generation's (the old one is gone by then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_head_at_a_moving_handoff_is_answered_and_the_connection_moves() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("").await;
    let old = baton.pid();
    let mut c = TcpStream::connect(baton.proxy).await.unwrap();
    let mut buf = Vec::new();
    let req = get(origin, "/bytes?n=5");
    c.write_all(req.as_bytes()).await.unwrap();
    response(&mut c, &mut buf).await.expect("first request");
    c.write_all(&req.as_bytes()[..20]).await.unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "upgrade failed: {out}\n{}", baton.log());
    tokio::time::sleep(Duration::from_millis(1600)).await;
    c.write_all(&req.as_bytes()[20..]).await.expect("rest of the head");
    let (head, body) = response(&mut c, &mut buf)
        .await
        .expect("the request begun before the handoff");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(!head.contains("connection: close"), "{head}");
    assert_eq!(body.len(), 5);
    common::wait_for(Duration::from_secs(10), "the old generation to exit", || async {
        (!common::alive(old)).then_some(())
    })
    .await;
    c.write_all(req.as_bytes()).await.unwrap();
    let (head, body) = response(&mut c, &mut buf).await.expect("a request after the move");
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert_eq!(body.len(), 5);
}
