//! Live CONNECT tunnels move to the new generation at a handoff (issue 13): none is cut or
//! corrupted, the old generation exits as soon as its own work is done (not at the drain
//! deadline), and each tunnel writes one access line at its real end, with its totals across
//! generations. A successor that will not take them, or dies taking them, leaves them with
//! the old generation, which relays on.

mod common;

use std::time::{Duration, Instant};

use baton::control::{self, Event, Request};
use common::{Baton, alive, connect_ports, testkit, wait_for};
use testkit::{LongTunnels, assert_intact, start_echo};

/// `baton upgrade` through the typed client: the pid of the generation that handed over.
async fn upgrade(baton: &Baton) -> u32 {
    let mut events = Vec::new();
    control::events(&baton.control, Request::Upgrade { wait_drain: false }, |e| {
        events.push(e)
    })
    .await
    .expect("control socket");
    match events.last() {
        Some(Event::Done(r)) => r.old_pid,
        other => panic!("upgrade failed: {other:?}\n{}", baton_log(baton)),
    }
}

fn baton_log(baton: &Baton) -> String {
    let log = baton.log();
    let tail: Vec<&str> = log.lines().rev().take(40).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// baton with `[timeouts] drain` and CONNECT allowed to a fresh echo server, and `n` long
/// tunnels through it, each echoing `chunk` bytes every `every`.
async fn baton_with_tunnels(drain: &str, n: usize, chunk: usize, every: Duration) -> (Baton, LongTunnels) {
    let echo = start_echo().await.expect("echo");
    // All the tunnels come from one client: no bound of its own (the default is 256).
    let config = format!(
        "{}\n[timeouts]\ndrain = \"{drain}\"\n\n[limits]\nmax_connections_per_client = 0\n",
        connect_ports(&[echo.port()])
    );
    let baton = Baton::start(&config).await;
    let tunnels = LongTunnels::open(baton.proxy, echo, n, chunk, every)
        .await
        .expect("open tunnels");
    (baton, tunnels)
}

fn raise_own_fd_limit() {
    baton_handoff::process::raise_open_files_limit().expect("raise RLIMIT_NOFILE");
}

/// Access lines of tunnels (the CONNECT lines that end with how the tunnel ended).
fn tunnel_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("CONNECT") && l.contains("outcome="))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_tunnels_survive_twenty_handoffs_intact() {
    let (mut baton, tunnels) = baton_with_tunnels("10s", 20, 4096, Duration::from_millis(20)).await;
    let mut slowest = Duration::ZERO;
    for round in 0..20 {
        let before = tunnels.round_trips();
        let old = upgrade(&baton).await;
        let handed = Instant::now();
        // Nothing of its own in flight: the old generation goes long before its 10 s drain
        // deadline (it takes tens of ms; the bound is for a loaded machine).
        wait_for(Duration::from_secs(10), "the old generation to exit", || async {
            (!alive(old)).then_some(())
        })
        .await;
        let took = handed.elapsed();
        slowest = slowest.max(took);
        assert!(
            took < Duration::from_secs(3),
            "round {round}: the old generation exited {took:?} after the verdict\n{}",
            baton_log(&baton)
        );
        // Bytes flow through the new generation before the next round.
        wait_for(Duration::from_secs(5), "round trips after the handoff", || async {
            (tunnels.round_trips() >= before + 40).then_some(())
        })
        .await;
    }
    println!("20 handoffs: the slowest old generation exited {slowest:?} after its verdict");
    let reports = tunnels.finish().await;
    let log = baton.log();
    assert_intact(&reports, 20, &baton_log(&baton));
    // One line per tunnel, at its real end, in the last generation, with the bytes of all 20.
    let status = baton.status().await;
    assert_eq!(status["generation"], 21, "{status}");
    assert_eq!(
        status["adopted_tunnels"], 20,
        "the last generation adopted all 20: {status}"
    );
    wait_for(Duration::from_secs(5), "20 tunnel access lines", || async {
        (tunnel_lines(&baton.log()).len() >= 20).then_some(())
    })
    .await;
    let lines = tunnel_lines(&log);
    let log = baton.log();
    let lines_now = tunnel_lines(&log);
    assert_eq!(lines_now.len(), 20, "{lines:?}");
    assert!(
        lines_now
            .iter()
            .all(|l| l.contains("outcome=\"closed\"") || l.contains("outcome=closed")),
        "{lines_now:?}"
    );
    let moved = log.matches("handed to the new generation").count();
    assert!(
        moved >= 20,
        "each handoff moved the tunnels: {moved} reports\n{}",
        baton_log(&baton)
    );
    baton.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tunnels_move_in_one_handoff() {
    raise_own_fd_limit();
    let (mut baton, tunnels) = baton_with_tunnels("5s", 1000, 64, Duration::from_millis(200)).await;
    wait_for(Duration::from_secs(10), "every tunnel to carry bytes", || async {
        (tunnels.round_trips() >= 2000).then_some(())
    })
    .await;
    let old = upgrade(&baton).await;
    let handed = Instant::now();
    wait_for(Duration::from_secs(5), "the old generation to exit", || async {
        (!alive(old)).then_some(())
    })
    .await;
    let gone_after = handed.elapsed();
    let before = tunnels.round_trips();
    wait_for(
        Duration::from_secs(10),
        "round trips through the new generation",
        || async { (tunnels.round_trips() >= before + 2000).then_some(()) },
    )
    .await;
    let reports = tunnels.finish().await;
    assert_intact(&reports, 1000, &baton_log(&baton));
    let log = baton.log();
    assert!(log.contains("moved=1000"), "all 1000 moved\n{}", baton_log(&baton));
    assert!(
        gone_after < Duration::from_secs(3),
        "the old generation lingered {gone_after:?}"
    );
    println!("1000 tunnels: the old generation exited {gone_after:?} after the verdict");
    baton.stop(Duration::from_secs(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_migrate_off_the_new_generation_takes_nothing_and_tunnels_drain() {
    let (mut baton, tunnels) = baton_with_tunnels("1s", 5, 512, Duration::from_millis(20)).await;
    // The new generation's configuration turns moving off: it does not offer to take them.
    baton.set_top_level("migrate = false");
    let old = upgrade(&baton).await;
    wait_for(
        Duration::from_secs(5),
        "the old generation to exit at its drain deadline",
        || async { (!alive(old)).then_some(()) },
    )
    .await;
    // Each tunnel sees the cut at its next round trip.
    wait_for(Duration::from_secs(5), "all 5 tunnels to see the cut", || async {
        (tunnels.broken() == 5).then_some(())
    })
    .await;
    let reports = tunnels.finish().await;
    let intact = reports.iter().filter(|r| r.is_intact()).count();
    assert_eq!(
        intact,
        0,
        "drained tunnels are cut at the deadline: {reports:?}\n{}",
        baton.log()
    );
    let log = baton.log();
    assert!(
        log.contains("does not take tunnels or connections: they drain here"),
        "{}",
        baton_log(&baton)
    );
    assert_eq!(log.matches("cut at drain timeout").count(), 5, "{}", baton_log(&baton));
    baton.stop(Duration::from_secs(10)).await;
}

/// A successor that passes its predecessor's canary window, offers to take its tunnels, and
/// dies as the first batch arrives, before acknowledging it: the handoff protocol by hand
/// (`BATON_READY_FD` gets `ready <pid> canary xfer=3`; `BATON_CHANNEL_FD`, a seqpacket
/// socket, gets a ping every 250 ms until `pass`; the next message is the batch).
const FAKE_SUCCESSOR: &str = r#"#!/usr/bin/env python3
import os, socket, sys
os.write(int(os.environ["BATON_READY_FD"]), b"ready %d canary xfer=3\n" % os.getpid())
chan = socket.socket(fileno=int(os.environ["BATON_CHANNEL_FD"]))
chan.settimeout(0.25)
passed = False
for _ in range(400):
    if not passed:
        chan.send(b"ping 0\n")
    try:
        msg = chan.recv(262144)
    except socket.timeout:
        continue
    if not msg:
        sys.exit("the predecessor closed the channel")
    if msg.startswith(b"pass"):
        passed = True
    elif passed and msg.startswith(b"XFER"):
        print("fake successor: got a batch of %d bytes; dying before the ack" % len(msg), file=sys.stderr)
        os._exit(3)
sys.exit("no batch within 100 s")
"#;

/// The fake successor above takes the first batch and dies before acknowledging it: the
/// old generation keeps every tunnel and relays on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_dies_mid_transfer_loses_no_tunnel() {
    dies_mid_transfer(false).await;
}

/// The same inside TLS: the tunnels taken apart (their TLS record state in the batch) are
/// rebuilt from their fds and that state, and relay on in the old generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_dies_mid_transfer_loses_no_tls_tunnel() {
    dies_mid_transfer(true).await;
}

async fn dies_mid_transfer(tls: bool) {
    let echo = start_echo().await.expect("echo");
    let dir = tempfile::tempdir().expect("tempdir");
    let program = dir.path().join("baton-copy");
    std::fs::copy(common::BATON, &program).expect("copy baton");
    let ca = testkit::TestCa::new().expect("CA");
    let mut config = format!("{}\n[timeouts]\ndrain = \"30s\"\n", connect_ports(&[echo.port()]));
    if tls {
        let (cert, key) = ca
            .write_leaf(dir.path(), "proxy", 9, Duration::from_secs(86_400))
            .expect("leaf");
        config += &format!(
            "[[listener]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            cert.display(),
            key.display()
        );
    }
    let baton = Baton::start_in(dir, &program, &config, &[]).await;
    let client = ca.client_offering(&[b"http/1.1"]).expect("client");
    let (proxy, client) = match tls {
        true => (common::listener_addr(&baton.status().await, "secure"), Some(&client)),
        false => (baton.proxy, None),
    };
    let tunnels = LongTunnels::open_via(proxy, echo, 10, 1024, Duration::from_millis(20), client)
        .await
        .expect("open tunnels");
    // The next "binary" is the fake successor, installed over the program path.
    let staged = program.with_extension("new");
    std::fs::write(&staged, FAKE_SUCCESSOR).expect("write the fake");
    std::fs::set_permissions(&staged, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    std::fs::rename(&staged, &program).expect("install the fake");
    let old = upgrade(&baton).await;
    wait_for(Duration::from_secs(10), "the failed batch to be logged", || async {
        baton
            .log()
            .contains("stay in this generation (they drain)")
            .then_some(())
    })
    .await;
    let before = tunnels.round_trips();
    wait_for(
        Duration::from_secs(5),
        "round trips through the old generation",
        || async { (tunnels.round_trips() >= before + 100).then_some(()) },
    )
    .await;
    assert!(alive(old), "the old generation relays on");
    let reports = tunnels.finish().await;
    assert_intact(&reports, 10, &baton_log(&baton));
    assert!(baton.log().contains("dying before the ack"), "{}", baton_log(&baton));
    baton.signal(old, nix::sys::signal::Signal::SIGKILL);
}

fn get_line(origin: std::net::SocketAddr, path: &str) -> String {
    format!("GET http://{origin}{path} HTTP/1.1\r\nHost: {origin}\r\n\r\n")
}

/// Idle keep-alive connections move with the handoff instead of being closed: 10 that
/// were served, one that never sent a request, and one with a pipelined pair whose first
/// answer is slow (in flight at the handoff: it finishes in the old generation, the second
/// is answered without `Connection: close`, and then the connection moves). The old
/// generation exits long before its 30 s drain deadline; every client then goes on over
/// the same connection, which only the new generation can be serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connections_move_and_stay_open() {
    use tokio::io::AsyncWriteExt;
    let origin = testkit::start_origin().await.expect("origin");
    let mut baton = Baton::start("[timeouts]\ndrain = \"30s\"\n").await;
    let url = format!("http://{origin}/bytes?n=100");
    let mut clients = Vec::new();
    for _ in 0..10 {
        let mut c = testkit::ProxyConnection::open(baton.proxy).await.expect("connect");
        let (status, body) = c.get(&url).await.expect("first request");
        assert_eq!((status.as_u16(), body.len()), (200, 100));
        clients.push(c);
    }
    let mut fresh = tokio::net::TcpStream::connect(baton.proxy).await.expect("connect");
    let mut piped = tokio::net::TcpStream::connect(baton.proxy).await.expect("connect");
    let pair = get_line(origin, "/slow?ms=1500&n=10") + &get_line(origin, "/bytes?n=20");
    piped.write_all(pair.as_bytes()).await.expect("pipelined pair");

    let started = Instant::now();
    let old = upgrade(&baton).await;
    wait_for(Duration::from_secs(10), "the old generation to exit", || async {
        (!alive(old)).then_some(())
    })
    .await;
    let gone_after = started.elapsed();
    for (n, expect) in [(10, "slow"), (20, "second")] {
        let (head, body) = testkit::read_response(&mut piped).await.expect("an answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{expect}: {head}");
        assert!(
            !head.to_ascii_lowercase().contains("connection: close"),
            "{expect}: {head}"
        );
        assert_eq!(body.len(), n);
    }
    assert!(
        gone_after < Duration::from_secs(5),
        "the old generation waited {gone_after:?} (drain deadline 30 s)\n{}",
        baton_log(&baton)
    );
    for (i, c) in clients.iter_mut().enumerate() {
        let (status, body) = c
            .get(&url)
            .await
            .unwrap_or_else(|e| panic!("client {i} after the move: {e:?}"));
        assert_eq!((status.as_u16(), body.len()), (200, 100), "client {i}");
        assert!(!c.is_closed(), "client {i}'s connection was closed");
    }
    for s in [&mut fresh, &mut piped] {
        s.write_all(get_line(origin, "/bytes?n=30").as_bytes())
            .await
            .expect("request after the move");
        let (head, body) = testkit::read_response(s).await.expect("an answer");
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body.len(), 30);
    }
    let status = baton.status().await;
    assert_eq!(status["adopted_connections"], 12, "{status}");
    eprintln!("old generation gone {gone_after:?} after the trigger; 12 connections moved");
    baton.stop(Duration::from_secs(10)).await;
}

/// A client that never comes to rest (it pipelines: 32 requests always wait behind the one
/// in flight; one that keeps only one waiting comes to rest between answers, and moves)
/// cannot move, as a connection moves at rest. It is not kept to the drain deadline
/// either: about a second into the move, the exchange in flight is its last, answered with
/// `Connection: close`, and the old generation exits long before its 30 s deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_rests_gets_connection_close_instead_of_a_cut() {
    use tokio::io::AsyncWriteExt;
    let origin = testkit::start_origin().await.expect("origin");
    let mut baton = Baton::start("[timeouts]\ndrain = \"30s\"\n").await;
    let mut s = tokio::net::TcpStream::connect(baton.proxy).await.expect("connect");
    // Each answer takes the origin 30 ms: a client that writes its next request as it reads
    // an answer stays ahead of baton however slowly a loaded machine runs it. (With instant
    // answers a starved client let baton answer all 33 and come to rest, and it moved.)
    let request = get_line(origin, "/slow?ms=30&n=10");
    s.write_all(request.repeat(33).as_bytes()).await.expect("33 requests");
    let (first, _) = testkit::read_response(&mut s).await.expect("first answer");
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let started = Instant::now();
    let trigger = {
        let control = baton.control.clone();
        tokio::spawn(async move {
            let mut events = Vec::new();
            control::events(&control, Request::Upgrade { wait_drain: false }, |e| events.push(e))
                .await
                .expect("control socket");
            events
        })
    };
    // Keep 32 requests waiting behind the one in flight, until an answer closes.
    let mut answers = 1;
    let closed_after = loop {
        // The answer that closes may already be on its way when this request is written:
        // a failed write is judged by what is read after it (RFC 9112 §9.6: the answers
        // sent before the close must still arrive).
        let wrote = s.write_all(request.as_bytes()).await;
        let (head, body) = testkit::read_response(&mut s)
            .await
            .unwrap_or_else(|e| panic!("an answer, never a cut: {e:?} (the write before it: {wrote:?})"));
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body.len(), 10);
        answers += 1;
        if head.to_ascii_lowercase().contains("connection: close") {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no Connection: close after {answers} answers\n{}",
            baton
                .log()
                .lines()
                .filter(|l| !l.contains("baton::access"))
                .collect::<Vec<_>>()
                .join("\n")
        );
    };
    let events = trigger.await.expect("upgrade task");
    let Some(Event::Done(report)) = events.last() else {
        panic!("upgrade failed: {events:?}")
    };
    wait_for(Duration::from_secs(10), "the old generation to exit", || async {
        (!alive(report.old_pid)).then_some(())
    })
    .await;
    eprintln!("{answers} answers; Connection: close {closed_after:?} after the trigger");
    assert!(closed_after < Duration::from_secs(10), "{closed_after:?}");
    baton.stop(Duration::from_secs(10)).await;
}

/// A moved tunnel keeps its idle time (issue 26: timers carry on): quiet for 2.5 s of its
/// 4 s `tunnel_idle` when the handoff moves it, it is closed by the new generation about 1.5 s
/// later, not 4 s after the move. The witnesses: it echoed before, and the new generation
/// adopted it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tunnel_keeps_its_idle_time() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = start_echo().await.expect("echo");
    let config = format!("{}\n[timeouts]\ntunnel_idle = \"4s\"\n", connect_ports(&[echo.port()]));
    let baton = Baton::start(&config).await;
    let mut s = tokio::net::TcpStream::connect(baton.proxy).await.expect("connect");
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
        .await
        .expect("CONNECT");
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.expect("the CONNECT answer"), 1, "answered");
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));
    s.write_all(b"ping").await.expect("ping");
    let mut pong = [0u8; 4];
    s.read_exact(&mut pong).await.expect("the echo through the tunnel");
    let quiet = Instant::now();
    // The quiet time is what is under test: it has to pass, not an event.
    tokio::time::sleep_until((quiet + Duration::from_millis(2500)).into()).await;
    upgrade(&baton).await;
    wait_for(
        Duration::from_secs(10),
        "the new generation adopts the tunnel",
        || async { (baton.status().await["adopted_tunnels"] == 1).then_some(()) },
    )
    .await;
    let mut b = [0u8; 1];
    let end = tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await;
    let after = quiet.elapsed();
    assert!(
        matches!(end, Ok(Ok(0) | Err(_))),
        "the idle tunnel is closed within 10 s: {end:?}"
    );
    assert!(
        after >= Duration::from_millis(3900) && after < Duration::from_millis(6000),
        "closed {after:?} after its last byte: its 4 s tunnel_idle went on across the move \
         (a timer started again by the move would close it 6.5 s after)\n{}",
        baton_log(&baton)
    );
}
