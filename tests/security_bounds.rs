//! Issue 31, part A, through the real binary on loopback: connections (tunnels included)
//! bounded in total and per client, the idle origin pool bounded in total, one own-address
//! check for every spelling of this host, local destinations closed by default, and a `Via`
//! token that does not name the host.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{Baton, connect_ports, testkit, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How long any one answer may take on a loaded machine.
const ANSWER: Duration = Duration::from_secs(10);

/// A loopback listener that counts the connections it accepts and answers each request head
/// with `200 ok`: the destination a refusal must never reach, and the witness that an allowed
/// request does. With `v6`, the same port on `::1` too (if this host has IPv6 loopback).
struct Counted {
    addr: SocketAddr,
    v6: Option<SocketAddr>,
    accepted: Arc<AtomicUsize>,
}

impl Counted {
    async fn start() -> Counted {
        let accepted = Arc::new(AtomicUsize::new(0));
        let v4 = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1");
        let addr = v4.local_addr().expect("addr");
        let v6 = TcpListener::bind(("::1", addr.port())).await.ok();
        let v6_addr = v6.as_ref().and_then(|l| l.local_addr().ok());
        tokio::spawn(Counted::serve(v4, accepted.clone()));
        if let Some(l) = v6 {
            tokio::spawn(Counted::serve(l, accepted.clone()));
        }
        Counted {
            addr,
            v6: v6_addr,
            accepted,
        }
    }

    async fn serve(listener: TcpListener, accepted: Arc<AtomicUsize>) {
        while let Ok((mut s, _)) = listener.accept().await {
            accepted.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut seen = Vec::new();
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    seen.extend_from_slice(&buf[..n]);
                    if seen.windows(4).any(|w| w == b"\r\n\r\n") {
                        seen.clear();
                        let ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                        if s.write_all(ok).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// A connection to `proxy` from the loopback address `from` (127.0.0.0/8 is all this host's).
async fn connect_from(from: &str, proxy: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().expect("addr"))?;
    socket.connect(proxy).await
}

/// Sends `req` on a new connection from `from`; the answer's head and body (none for a 200
/// to CONNECT: the stream is the tunnel then, returned).
async fn ask(proxy: SocketAddr, from: &str, req: &str) -> Result<(String, String, TcpStream), String> {
    let exchange = async {
        let mut s = connect_from(from, proxy).await?;
        s.write_all(req.as_bytes()).await?;
        let head = testkit::read_head(&mut s).await?;
        let tunnel = req.starts_with("CONNECT") && head.starts_with("HTTP/1.1 200");
        let mut body = vec![
            0;
            if tunnel {
                0
            } else {
                testkit::content_length(&head).unwrap_or(0)
            }
        ];
        s.read_exact(&mut body).await?;
        Ok::<_, std::io::Error>((head, String::from_utf8_lossy(&body).into_owned(), s))
    };
    match tokio::time::timeout(ANSWER, exchange).await {
        Ok(r) => r.map_err(|e| format!("{req:?}: {e}")),
        Err(_) => Err(format!("{req:?}: no answer within {ANSWER:?}")),
    }
}

fn get(url: &str) -> String {
    let host = url.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap_or("");
    format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

fn connect(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

/// Waits until baton's log has `what` (the access line is written as the answer goes out).
async fn log_has(baton: &Baton, what: &str) {
    let found = wait_for(ANSWER, what, || async { baton.log().contains(what).then_some(()) });
    found.await;
}

/// Every spelling of this host's loopback for the destination `d`: GET and CONNECT.
fn local_spellings(d: &Counted) -> Vec<String> {
    let p = d.addr.port();
    let mut requests = vec![
        get(&format!("http://127.0.0.1:{p}/")),
        get(&format!("http://[::ffff:127.0.0.1]:{p}/")),
        get(&format!("http://0.0.0.0:{p}/")),
        get(&format!("http://localhost:{p}/")),
        // inet_aton's spellings, which the resolver turns into 127.0.0.1.
        get(&format!("http://2130706433:{p}/")),
        get(&format!("http://0x7f.1:{p}/")),
        connect(&format!("127.0.0.1:{p}")),
        connect(&format!("[::ffff:127.0.0.1]:{p}")),
        connect(&format!("0.0.0.0:{p}")),
        connect(&format!("localhost:{p}")),
    ];
    if d.v6.is_some() {
        requests.push(get(&format!("http://[::1]:{p}/")));
        requests.push(connect(&format!("[::1]:{p}")));
    }
    requests
}

/// SSRF closed by default: loopback in every spelling is refused with 403
/// `rule=local_destination`, the reason names the key, the destination saw nothing; the same
/// requests pass with `allow_local_destinations = true`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_destinations_are_refused_by_default_and_open_with_the_key() {
    let dest = Counted::start().await;
    let ports = connect_ports(&[dest.addr.port()]);
    // The helper opens local destinations unless the key is mentioned: here it is left at
    // its default.
    let closed = Baton::start(&format!("{ports}# allow_local_destinations: the default\n")).await;
    for req in local_spellings(&dest) {
        let (head, body, _) = ask(closed.proxy, "127.0.0.1", &req).await.unwrap();
        assert!(
            head.starts_with("HTTP/1.1 403"),
            "{req:?} to a local destination by default: {head}"
        );
        assert!(
            body.contains("allow_local_destinations"),
            "{req:?}: the refusal names the key: {body}"
        );
    }
    log_has(&closed, "rule=\"local_destination\"").await;

    let open = Baton::start(&format!("{ports}allow_local_destinations = true\n")).await;
    // The destination answers a GET itself, so it has accepted this one when the 200 comes;
    // it accepts in order, so a connection from the refusals would have come first.
    let first = get(&format!("http://127.0.0.1:{}/", dest.addr.port()));
    let (head, _, _) = ask(open.proxy, "127.0.0.1", &first).await.unwrap();
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "the witness request with the key set: {head}"
    );
    assert_eq!(dest.accepted(), 1, "a refused request reached the destination");
    for req in local_spellings(&dest) {
        let (head, body, mut s) = ask(open.proxy, "127.0.0.1", &req).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{req:?} with the key set: {head}");
        let body = if req.starts_with("CONNECT") {
            // Through the tunnel, the destination itself answers.
            s.write_all(b"GET / HTTP/1.1\r\nHost: d\r\n\r\n").await.unwrap();
            let answer = tokio::time::timeout(ANSWER, testkit::read_response(&mut s));
            let (_, body) = answer.await.expect("an answer through the tunnel").unwrap();
            String::from_utf8_lossy(&body).into_owned()
        } else {
            body
        };
        assert_eq!(body, "ok", "{req:?} reached the destination");
    }
}

/// A free loopback port (closed again: the caller binds it next).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// The own-address check sees through every spelling: the proxy's listeners and its admin
/// listener, reached as 0.0.0.0, ::, IPv4-mapped or IPv4-compatible, are a loop (403
/// `rule=loop`) even with local destinations allowed; the same spellings reach an origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_addresses_in_every_spelling_are_a_loop() {
    let dest = Counted::start().await;
    let (second, admin) = (free_port(), free_port());
    let extra = format!(
        "[[listener]]\nname = \"second\"\naddress = \"127.0.0.1:{second}\"\n\n[admin]\naddress = \"127.0.0.1:{admin}\"\n\n\
         {}allow_local_destinations = true\n",
        connect_ports(&[second, admin, dest.addr.port()])
    );
    let baton = Baton::start(&extra).await;
    let p = baton.proxy.port();
    let loops = [
        get(&format!("http://0.0.0.0:{admin}/status")),
        get(&format!("http://[::ffff:127.0.0.1]:{admin}/metrics")),
        get(&format!("http://127.0.0.1:{admin}/metrics")),
        get(&format!("http://[::]:{admin}/metrics")),
        get(&format!("http://localhost:{admin}/metrics")),
        get(&format!("http://0.0.0.0:{p}/")),
        get(&format!("http://[::127.0.0.1]:{p}/")),
        connect(&format!("0.0.0.0:{second}")),
        connect(&format!("[::ffff:127.0.0.1]:{second}")),
        connect(&format!("[::ffff:0.0.0.0]:{second}")),
        connect(&format!("0.0.0.0:{admin}")),
    ];
    for req in &loops {
        let (head, body, _) = ask(baton.proxy, "127.0.0.1", req).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 403"), "{req:?} reaches this proxy: {head}");
        assert!(body.contains("is this proxy"), "{req:?}: {body}");
    }
    log_has(&baton, "rule=\"loop\"").await;
    // Witnesses: the same spellings reach a destination that is not this proxy, and the
    // admin listener does serve (what the loop would have shown).
    let d = dest.addr.port();
    for req in [
        get(&format!("http://0.0.0.0:{d}/")),
        connect(&format!("[::ffff:0.0.0.0]:{d}")),
    ] {
        let (head, _, _) = ask(baton.proxy, "127.0.0.1", &req).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{req:?} is not this proxy: {head}");
    }
    let direct = format!("GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\n\r\n");
    let (head, _, _) = ask(format!("127.0.0.1:{admin}").parse().unwrap(), "127.0.0.1", &direct)
        .await
        .unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "the admin listener serves: {head}");
}

/// A new connection from `from` that the proxy refused at once: its 503 answer (read
/// before anything is written, so no reset can overtake it).
async fn refused_at_once(proxy: SocketAddr, from: &str) -> String {
    let mut s = connect_from(from, proxy).await.expect("connect");
    let answer = tokio::time::timeout(ANSWER, async {
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.map(|_| all)
    });
    let all = answer.await.expect("a refusal within ANSWER").expect("read");
    String::from_utf8_lossy(&all).into_owned()
}

/// Opens `n` tunnels to `echo` from `from`, each checked end to end.
async fn open_tunnels(proxy: SocketAddr, from: &str, echo: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut tunnels = Vec::new();
    for i in 0..n {
        let (head, _, mut s) = ask(proxy, from, &connect(&echo.to_string())).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "tunnel {i} from {from}: {head}");
        s.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        s.read_exact(&mut back).await.unwrap();
        tunnels.push(s);
    }
    tunnels
}

/// Waits until a tunnel from `from` opens.
async fn served_again(proxy: SocketAddr, from: &str, echo: SocketAddr) -> TcpStream {
    let what = format!("a tunnel from {from} once a slot is free");
    wait_for(ANSWER, &what, || async {
        match ask(proxy, from, &connect(&echo.to_string())).await {
            Ok((head, _, s)) if head.starts_with("HTTP/1.1 200") => Some(s),
            _ => None,
        }
    })
    .await
}

/// Tunnels count against max_connections: with 20, the 21st connection (from any client) is
/// answered 503; once a tunnel closes, another client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_count_against_max_connections() {
    let echo = testkit::start_echo().await.unwrap();
    let extra = format!(
        "[limits]\nmax_connections = 20\nmax_connections_per_client = 0\n\n{}",
        connect_ports(&[echo.port()])
    );
    let baton = Baton::start(&extra).await;
    let mut tunnels = open_tunnels(baton.proxy, "127.0.0.1", echo, 20).await;
    for from in ["127.0.0.1", "127.0.0.2"] {
        let answer = refused_at_once(baton.proxy, from).await;
        assert!(
            answer.starts_with("HTTP/1.1 503"),
            "connection 21 from {from}: {answer:?}"
        );
        assert!(
            answer.contains("max_connections = 20"),
            "the reason names the key: {answer:?}"
        );
    }
    log_has(&baton, "rule=\"max_connections\"").await;
    drop(tunnels.pop());
    let _served = served_again(baton.proxy, "127.0.0.2", echo).await;
    assert_eq!(tunnels.len(), 19, "the other tunnels are still open");
}

/// One client holds at most max_connections_per_client connections (tunnels included): its
/// next is answered 503 naming the key, while another client is still served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_is_bounded_by_max_connections_per_client() {
    let echo = testkit::start_echo().await.unwrap();
    let extra = format!(
        "[limits]\nmax_connections = 20\nmax_connections_per_client = 5\n\n{}",
        connect_ports(&[echo.port()])
    );
    let baton = Baton::start(&extra).await;
    let mut tunnels = open_tunnels(baton.proxy, "127.0.0.1", echo, 5).await;
    let answer = refused_at_once(baton.proxy, "127.0.0.1").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "the 6th from 127.0.0.1: {answer:?}");
    assert!(
        answer.contains("max_connections_per_client = 5"),
        "the reason names the key: {answer:?}"
    );
    log_has(&baton, "rule=\"max_connections_per_client\"").await;
    let other = open_tunnels(baton.proxy, "127.0.0.2", echo, 5).await;
    assert_eq!(
        other.len(),
        5,
        "another client is served while the first is at its bound"
    );
    drop(tunnels.pop());
    let _served = served_again(baton.proxy, "127.0.0.1", echo).await;
}

/// Tunnels moved at a handoff take their slots in the new generation: with
/// max_connections = 20 and 15 tunnels moved, it admits 5 more and answers the next 503,
/// and the moved tunnels still carry bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_tunnels_keep_their_slots_in_the_new_generation() {
    let echo = testkit::start_echo().await.unwrap();
    let extra = format!(
        "[limits]\nmax_connections = 20\nmax_connections_per_client = 0\n\n{}",
        connect_ports(&[echo.port()])
    );
    let baton = Baton::start(&extra).await;
    let mut moved = open_tunnels(baton.proxy, "127.0.0.1", echo, 15).await;
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "handoff: {out}");
    wait_for(ANSWER, "15 tunnels adopted", || async {
        let status = baton.status().await;
        (status["adopted_tunnels"] == 15).then_some(())
    })
    .await;
    let _more = open_tunnels(baton.proxy, "127.0.0.2", echo, 5).await;
    let answer = refused_at_once(baton.proxy, "127.0.0.2").await;
    assert!(
        answer.starts_with("HTTP/1.1 503"),
        "connection 21 after the handoff: {answer:?}"
    );
    for (i, t) in moved.iter_mut().enumerate() {
        t.write_all(b"pong").await.unwrap();
        let mut back = [0u8; 4];
        let echoed = tokio::time::timeout(ANSWER, t.read_exact(&mut back)).await;
        assert!(matches!(echoed, Ok(Ok(_))), "moved tunnel {i} echoes: {echoed:?}");
    }
}

/// The idle origin connections open to each of `origins`, in order.
fn open_counts(origins: &[(SocketAddr, Arc<AtomicUsize>)]) -> Vec<usize> {
    origins.iter().map(|(_, n)| n.load(Ordering::SeqCst)).collect()
}

/// One keep-alive client asks 8 origins in turn, then leaves; what stays open to each.
async fn idle_after_eight_origins(idle_total: usize, want: Vec<usize>) {
    let mut origins = Vec::new();
    for _ in 0..8 {
        origins.push(testkit::start_counted_origin().await.unwrap());
    }
    let baton = Baton::start(&format!("[limits]\nidle_total = {idle_total}\n")).await;
    let mut client = testkit::ProxyConnection::open(baton.proxy).await.unwrap();
    for (origin, _) in &origins {
        let (status, _) = client.get(&format!("http://{origin}/bytes?n=3")).await.unwrap();
        assert_eq!(status, 200, "origin {origin}");
    }
    drop(client);
    let what = format!("idle_total = {idle_total}: open origin connections {want:?}");
    let seen = wait_for(ANSWER, &what, || async {
        let now = open_counts(&origins);
        (now == want).then_some(now)
    });
    seen.await;
}

/// idle_total bounds the pool across next hops: with 4, of 8 origins asked in turn the 4
/// most recent keep their idle connection; the default keeps all 8.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_total_keeps_the_most_recently_used_origin_connections() {
    idle_after_eight_origins(4, vec![0, 0, 0, 0, 1, 1, 1, 1]).await;
    idle_after_eight_origins(1024, vec![1; 8]).await;
}

/// The `Via` entries `GET /headers` through `proxy` shows the origin, joined by ", ".
async fn via_seen(proxy: SocketAddr, origin: SocketAddr) -> String {
    let mut client = testkit::ProxyConnection::open(proxy).await.unwrap();
    let (status, body) = client.get(&format!("http://{origin}/headers")).await.unwrap();
    assert_eq!(status, 200);
    let headers = String::from_utf8_lossy(&body).to_ascii_lowercase();
    let via: Vec<&str> = headers.lines().filter_map(|l| l.strip_prefix("via: ")).collect();
    assert!(!via.is_empty(), "no via in {headers}");
    via.join(", ")
}

/// The default `Via` token names neither the host nor the port, stays the same across a
/// handoff, and differs between two batons chained (so the loop check still tells them
/// apart: the chained request is served).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_via_token_hides_the_host_and_survives_a_handoff() {
    let origin = testkit::start_origin().await.unwrap();
    let parent = Baton::start("").await;
    let before = via_seen(parent.proxy, origin).await;
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host = host.trim().to_ascii_lowercase();
    assert!(before.starts_with("1.1 baton-"), "{before}");
    assert!(
        !host.is_empty() && !before.contains(&host),
        "{before} names the host {host}"
    );
    assert!(
        !before.contains(&parent.proxy.port().to_string()),
        "{before} names the port"
    );
    let (ok, out) = parent.cli(&["upgrade"]);
    assert!(ok, "handoff: {out}");
    assert_eq!(
        via_seen(parent.proxy, origin).await,
        before,
        "the token after a handoff"
    );

    let child = Baton::start(&format!("[upstream]\nproxy = \"http://{}\"\n", parent.proxy)).await;
    let chained = via_seen(child.proxy, origin).await;
    let (first, second) = chained
        .split_once(", ")
        .unwrap_or_else(|| panic!("two entries: {chained}"));
    assert_eq!(second, before, "the parent's token: {chained}");
    assert_ne!(first, second, "two batons must differ: {chained}");
}
