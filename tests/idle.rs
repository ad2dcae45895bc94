//! Idle connections cost little: an idle client connection holds no HTTP state (hyper's
//! connection is taken apart when it rests, and built again when the client sends), and idle
//! origin connections are bounded per origin (`limits.idle_per_host`), never one per idle
//! client. Through the real binary: origin connection counts as the origin sees them, the
//! idle gauge on `/metrics`, and clients that must not notice any of it.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use testkit::{ProxyConnection, open_tunnel, pattern, read_head, start_counted_origin, start_echo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// baton with an admin listener; returns it and the admin address.
async fn start(extra: &str) -> (Baton, SocketAddr) {
    let baton = Baton::start(&format!("[admin]\naddress = \"127.0.0.1:0\"\n{extra}")).await;
    let status = baton.status().await;
    let admin = listener_addr(&status, "admin");
    (baton, admin)
}

/// The value of `name` (a metric without labels) on `/metrics`.
async fn metric(admin: SocketAddr, name: &str) -> Option<f64> {
    let mut s = TcpStream::connect(admin).await.ok()?;
    s.write_all(format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).await.ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

async fn wait_idle(admin: SocketAddr, n: usize) {
    wait_for(
        Duration::from_secs(15),
        &format!("{n} idle client connections"),
        || async move { (metric(admin, "baton_client_connections_idle").await? == n as f64).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_origin_connections_stay_within_the_pool_bound() {
    const CLIENTS: usize = 40;
    const BOUND: usize = 4;
    let (origin, open) = start_counted_origin().await.unwrap();
    let (baton, admin) = start(&format!("[limits]\nidle_per_host = {BOUND}\n")).await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(ProxyConnection::open(baton.proxy).await.unwrap());
    }
    // All at once, and slow: each needs an origin connection of its own meanwhile.
    let slow = format!("http://{origin}/slow?ms=500&n=100");
    let mut peak = 0;
    let answers = {
        let all = futures_util::future::join_all(clients.iter_mut().map(|c| c.get(&slow)));
        tokio::pin!(all);
        loop {
            tokio::select! {
                a = &mut all => break a,
                () = tokio::time::sleep(Duration::from_millis(10)) => peak = peak.max(open.load(Ordering::SeqCst)),
            }
        }
    };
    for a in answers {
        let (status, body) = a.unwrap();
        assert_eq!((status.as_u16(), body.len()), (200, 100));
    }
    assert!(peak >= CLIENTS, "the origin saw only {peak} connections at once");
    // Idle now: the clients' origin connections went back to the pool, which kept BOUND.
    wait_idle(admin, CLIENTS).await;
    wait_for(Duration::from_secs(10), "the pool bound", || async {
        (open.load(Ordering::SeqCst) <= BOUND).then_some(())
    })
    .await;
    assert!(clients.iter().all(|c| !c.is_closed()), "idle clients were closed");
    // Every client is served again on its own connection, rebuilt from idle.
    let url = format!("http://{origin}/bytes?n=5000");
    for c in &mut clients {
        let (status, body) = c.get(&url).await.unwrap();
        assert_eq!(status.as_u16(), 200);
        assert_eq!(&body[..], &pattern(5000)[..]);
    }
    wait_idle(admin, CLIENTS).await;
    let held = open.load(Ordering::SeqCst);
    assert!(held <= BOUND, "{held} idle origin connections held, bound {BOUND}");
    assert!(clients.iter().all(|c| !c.is_closed()));
}

/// Reads one response (Content-Length framed) from `s`; returns its head and body.
async fn read_response(s: &mut TcpStream) -> (String, Vec<u8>) {
    testkit::read_response(s).await.expect("a response")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_request_right_after_idle_is_answered() {
    let (origin, _) = start_counted_origin().await.unwrap();
    let (baton, admin) = start("").await;
    let mut s = TcpStream::connect(baton.proxy).await.unwrap();
    let get = |n: usize| format!("GET http://{origin}/bytes?n={n} HTTP/1.1\r\nHost: {origin}\r\n\r\n");
    s.write_all(get(10).as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, pattern(10));
    wait_idle(admin, 1).await;
    // Two requests in one write, then a POST with a body, on the parked connection.
    s.write_all(format!("{}{}", get(20), get(30)).as_bytes()).await.unwrap();
    for n in [20, 30] {
        let (head, body) = read_response(&mut s).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("connection: close"), "{head}");
        assert_eq!(body, pattern(n));
    }
    wait_idle(admin, 1).await;
    let data = pattern(70_000);
    let post = format!(
        "POST http://{origin}/sha256 HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {}\r\n\r\n",
        data.len()
    );
    s.write_all(post.as_bytes()).await.unwrap();
    s.write_all(&data).await.unwrap();
    let (head, body) = read_response(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let expected = format!("{} {}", testkit::sha256_hex(&data), data.len());
    assert_eq!(String::from_utf8_lossy(&body).trim(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_opens_on_a_connection_that_was_idle_and_idle_tunnels_hold_no_pipe() {
    let (origin, _) = start_counted_origin().await.unwrap();
    let echo = start_echo().await.unwrap();
    let (baton, admin) = start(&connect_ports(&[echo.port()])).await;
    let base = pipe_fds(baton.pid());
    let mut s = TcpStream::connect(baton.proxy).await.unwrap();
    let get = format!("GET http://{origin}/bytes?n=10 HTTP/1.1\r\nHost: {origin}\r\n\r\n");
    s.write_all(get.as_bytes()).await.unwrap();
    read_response(&mut s).await;
    wait_idle(admin, 1).await;
    // The CONNECT and the first tunnel bytes in one write: those bytes were read with the
    // head, and must reach the target first.
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\nhello").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await.unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s.write_all(b" tunnel").await.unwrap();
    let mut echoed = [0u8; 12];
    s.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"hello tunnel");
    // Bytes went both ways: a pipe each way (two fds each).
    wait_for(Duration::from_secs(5), "the first tunnel's pipes", || async {
        (pipe_fds(baton.pid()) == base + 4).then_some(())
    })
    .await;
    // A tunnel that moved nothing yet holds none; its first byte brings them.
    let mut quiet = open_tunnel(baton.proxy, echo).await.unwrap();
    // Its relay runs once the generation counts it (a relay that made pipes at its start
    // would have them then); the first tunnel's pipes are the witness that they show.
    wait_for(Duration::from_secs(5), "the quiet tunnel's relay to run", || async {
        (baton.status().await["active_tunnels"] == 2).then_some(())
    })
    .await;
    assert_eq!(pipe_fds(baton.pid()), base + 4, "an idle tunnel holds a pipe");
    // The first bytes go out by copy (read for a server name: [access] sni); bytes in
    // each direction after them bring the pipes.
    for byte in [b"x", b"y"] {
        quiet.write_all(byte).await.unwrap();
        let mut b = [0u8; 1];
        quiet.read_exact(&mut b).await.unwrap();
    }
    wait_for(Duration::from_secs(5), "the second tunnel's pipes", || async {
        (pipe_fds(baton.pid()) == base + 8).then_some(())
    })
    .await;
}

fn pipe_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().starts_with("pipe:")))
                .count()
        })
        .unwrap_or(0)
}
