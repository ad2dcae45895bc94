//! HTTP/2 to a TLS listener (issue 24), with hyper's HTTP/2 client over rustls offering
//! ALPN `h2`, the h2 crate's client for a rapid-reset flood, and headless Chromium:
//! forward-proxy GET and POST (hash-checked), many CONNECT streams on one connection
//! (echo-checked), a stream reset mid-body while the others go on, the per-client
//! connection limit applied to CONNECT streams, GOAWAY at a handoff and 20 handoffs under
//! load, rapid reset answered by GOAWAY, and a listener that offers only `http/1.1`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use baton::control::{self, Event, Request};
use bytes::Bytes;
use common::{Baton, listener_addr, testkit};
use testkit::TestCa;
use testkit::h2::H2Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STOP: Duration = Duration::from_secs(10);

/// A baton with a TLS listener `secure` (`alpn` as given, or the default) and `extra`; the
/// CA, its PEM file and the listener's address.
async fn start(alpn: Option<&str>, extra: &str) -> (Baton, TestCa, PathBuf, SocketAddr) {
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = TestCa::new().expect("CA");
    let ca_pem = dir.path().join("ca.pem");
    ca.write_ca(&ca_pem).expect("CA file");
    let (cert, key) = ca
        .write_leaf(dir.path(), "proxy", 1, Duration::from_secs(86_400))
        .expect("leaf");
    let alpn = alpn.map(|a| format!(", alpn = {a}")).unwrap_or_default();
    let listener = format!(
        "[[listener]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\"{alpn} }}\n",
        cert.display(),
        key.display()
    );
    let baton = Baton::start_in(
        dir,
        std::path::Path::new(common::BATON),
        &format!("{listener}\n{extra}"),
        &[],
    )
    .await;
    let secure = listener_addr(&baton.status().await, "secure");
    let ca_pem = baton.dir.path().join("ca.pem");
    (baton, ca, ca_pem, secure)
}

async fn h2(secure: SocketAddr, ca: &TestCa) -> H2Proxy {
    let tls = ca.client_offering(&[b"h2", b"http/1.1"]).expect("client");
    H2Proxy::connect(secure, &tls).await.expect("HTTP/2 to the proxy")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_proxy_get_and_post_over_h2() {
    let origin = testkit::start_origin().await.expect("origin");
    let (mut baton, ca, _, secure) = start(None, "").await;
    let client = h2(secure, &ca).await;
    let (status, body) = client
        .get(&format!("http://{origin}/bytes?n=1048576"))
        .await
        .expect("GET");
    assert_eq!(status, 200);
    assert_eq!(body, testkit::pattern(1 << 20), "the 1 MiB body, byte for byte");
    let sent = Bytes::from(testkit::pattern(1 << 20));
    let url = format!("http://{origin}/sha256");
    let (status, hash) = client.send(http::Method::POST, &url, sent.clone()).await.expect("POST");
    assert_eq!(status, 200);
    let want = format!("{} {}", testkit::sha256_hex(&sent), sent.len());
    assert_eq!(
        String::from_utf8_lossy(&hash).trim(),
        want,
        "the origin hashed the whole upload"
    );
    let log = baton.log();
    let line = log
        .lines()
        .find(|l| l.contains("/sha256"))
        .unwrap_or_default()
        .to_string();
    assert!(
        line.contains("proto=\"h2\"") && line.contains("method=POST"),
        "the line says h2: {line}"
    );
    baton.stop(STOP).await;
}

/// 1,000 CONNECT streams at once on one connection, each echoing its own bytes (the test
/// holds 2,000 sockets: the tunnels' ends and the echo server's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_connect_streams_share_one_connection() {
    baton_handoff::process::raise_open_files_limit().expect("raise RLIMIT_NOFILE");
    let echo = testkit::start_echo().await.expect("echo");
    let extra = format!(
        "{}\n[limits]\nh2_max_streams = 1000\nmax_connections_per_client = 0\n",
        common::connect_ports(&[echo.port()])
    );
    let (mut baton, ca, _, secure) = start(None, &extra).await;
    let client = h2(secure, &ca).await;
    let mut tasks = Vec::new();
    // Every stream is open before any echoes: 1,000 at once, not one after the other.
    let all_open = std::sync::Arc::new(tokio::sync::Barrier::new(1000));
    for i in 0..1000u32 {
        let (client, all_open) = (client.clone(), all_open.clone());
        tasks.push(tokio::spawn(async move {
            let opened = client.tunnel(echo).await;
            all_open.wait().await;
            let mut t = opened?;
            let msg = format!("stream {i} ").repeat(100).into_bytes();
            t.write_all(&msg).await?;
            let mut back = vec![0; msg.len()];
            t.read_exact(&mut back).await?;
            assert_eq!(back, msg, "stream {i} echoed its own bytes");
            t.shutdown().await?;
            std::io::Result::Ok(())
        }));
    }
    for t in tasks {
        t.await.expect("task").expect("tunnel echoed");
    }
    wait_lines(&baton, "CONNECT", 1000).await;
    baton.stop(STOP).await;
}

/// `max_connections_per_client` counts CONNECT streams: past it a stream gets 503 and the
/// connection goes on. The witness: the streams before the limit opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_streams_count_under_the_per_client_limit() {
    let echo = testkit::start_echo().await.expect("echo");
    let extra = format!(
        "{}\n[limits]\nmax_connections_per_client = 4\n",
        common::connect_ports(&[echo.port()])
    );
    let (mut baton, ca, _, secure) = start(None, &extra).await;
    let client = h2(secure, &ca).await;
    // The connection holds one place; three tunnels take the others.
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(client.tunnel(echo).await.expect("a tunnel within the limit"));
    }
    let refused = client.tunnel(echo).await.expect_err("the fifth place is refused");
    assert!(refused.to_string().contains("503"), "503 on the stream: {refused}");
    let origin = testkit::start_origin().await.expect("origin");
    let (status, _) = client.get(&format!("http://{origin}/bytes?n=10")).await.expect("GET");
    assert_eq!(status, 200, "the connection serves on");
    drop(open);
    baton.stop(STOP).await;
}

/// A response body dropped mid-way (RST_STREAM from the client): the other streams and the
/// next request on the connection are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_reset_mid_body_leaves_the_connection_serving() {
    let origin = testkit::start_origin().await.expect("origin");
    let (mut baton, ca, _, secure) = start(None, "").await;
    let client = h2(secure, &ca).await;
    let big = format!("http://{origin}/bytes?n=104857600");
    let mut resp = client
        .start(http::Method::GET, &big, Bytes::new())
        .await
        .expect("the big GET's head");
    let first = http_body_util::BodyExt::frame(resp.body_mut()).await;
    assert!(first.is_some_and(|f| f.is_ok()), "the body has begun");
    let (status, body) = client
        .get(&format!("http://{origin}/bytes?n=1000"))
        .await
        .expect("GET beside it");
    assert_eq!((status.as_u16(), body.len()), (200, 1000));
    drop(resp); // RST_STREAM mid-body
    let (status, _) = client
        .get(&format!("http://{origin}/bytes?n=10"))
        .await
        .expect("GET after the reset");
    assert_eq!(status, 200);
    let line = wait_lines(&baton, "/bytes?n=104857600", 1).await;
    assert!(
        line[0].contains("complete=false"),
        "the reset stream's line says so: {line:?}"
    );
    baton.stop(STOP).await;
}

/// At a handoff the connection gets GOAWAY once the generation drains: a stream in flight
/// (its origin holds the answer until after the handoff) finishes on the old generation,
/// then the connection closes; a new connection reaches the new generation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_at_a_handoff_lets_the_stream_in_flight_finish() {
    let held = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let held_addr = held.local_addr().unwrap();
    let origin = testkit::start_origin().await.expect("origin");
    let (mut baton, ca, _, secure) = start(None, "[timeouts]\ndrain = \"10s\"\n").await;
    let client = h2(secure, &ca).await;
    let in_flight = tokio::spawn({
        let client = client.clone();
        async move { client.get(&format!("http://{held_addr}/held")).await }
    });
    // The request has reached the origin: the stream is in flight.
    let (mut upstream, _) = held.accept().await.expect("baton forwards the request");
    testkit::read_head(&mut upstream).await.expect("request head");
    let mut last = None;
    control::events(&baton.control, Request::Upgrade { wait_drain: false }, |e| {
        last = Some(e)
    })
    .await
    .expect("control socket");
    assert!(matches!(last, Some(Event::Done(_))), "handoff: {last:?}");
    upstream
        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let (status, body) = in_flight.await.expect("task").expect("the stream in flight finished");
    assert_eq!((status.as_u16(), &body[..]), (200, &b"hello"[..]));
    common::wait_for(Duration::from_secs(10), "the drained connection to close", || async {
        client.is_closed().then_some(())
    })
    .await;
    let fresh = h2(secure, &ca).await;
    let (status, _) = fresh
        .get(&format!("http://{origin}/bytes?n=10"))
        .await
        .expect("new generation");
    assert_eq!(status, 200);
    baton.stop(STOP).await;
}

/// `alpn = ["http/1.1"]`: a client offering h2 and HTTP/1.1 gets HTTP/1.1, and its
/// request is served. The witness: the same client gets h2 from a listener with the default
/// ALPN (`["h2", "http/1.1"]`), as every other test here shows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_is_chosen_per_listener() {
    let origin = testkit::start_origin().await.expect("origin");
    let (mut default, ca, _, secure) = start(None, "").await;
    h2(secure, &ca).await;
    default.stop(STOP).await;
    let (mut only11, ca, _, secure) = start(Some(r#"["http/1.1"]"#), "").await;
    let tls = ca.client_offering(&[b"h2", b"http/1.1"]).expect("client");
    let err = H2Proxy::connect(secure, &tls).await.err().expect("no h2 here");
    assert!(err.to_string().contains("\"http/1.1\""), "HTTP/1.1 chosen: {err}");
    let mut c = testkit::ProxyConnection::open_via(secure, Some(&tls))
        .await
        .expect("HTTP/1.1 over TLS");
    let (status, _) = c.get(&format!("http://{origin}/bytes?n=10")).await.expect("GET");
    assert_eq!(status, 200, "served over HTTP/1.1");
    drop(c);
    only11.stop(STOP).await;
}

/// 10,000 HEADERS+RST_STREAM pairs on one connection (rapid reset, CVE-2023-44487): the
/// proxy answers with GOAWAY (ENHANCE_YOUR_CALM), and another client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_gets_goaway_and_others_are_served() {
    let origin = testkit::start_origin().await.expect("origin");
    let (mut baton, ca, _, secure) = start(None, "").await;
    let tls = ca.client_offering(&[b"h2"]).expect("client");
    let ended = testkit::h2::rapid_reset(secure, &tls, origin, 10_000)
        .await
        .expect("flood");
    assert!(
        ended.contains("connection ended after"),
        "cut before the 10,000th pair: {ended}"
    );
    // The client may meet the closed socket before it reads the GOAWAY: baton's line says
    // what it sent (ENHANCE_YOUR_CALM reads "excessive load generating behavior").
    let line = wait_lines(&baton, "HTTP/2 connection ended", 1).await;
    assert!(
        line[0].contains("excessive load"),
        "GOAWAY with ENHANCE_YOUR_CALM: {line:?}\nclient: {ended}"
    );
    let other = h2(secure, &ca).await;
    let (status, _) = other
        .get(&format!("http://{origin}/bytes?n=10"))
        .await
        .expect("another client");
    assert_eq!(status, 200, "the proxy serves on");
    baton.stop(STOP).await;
}

/// 20 handoffs under 4 connections × 32 streams: no request fails. Requests the old
/// generation refused with its GOAWAY (never processed) are retried on a new connection, as
/// browsers do, and counted apart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_handoffs_under_h2_load_fail_no_request() {
    let origin = testkit::start_origin().await.expect("origin");
    let (mut baton, ca, _, secure) = start(None, "[timeouts]\ndrain = \"10s\"\n").await;
    let tls = ca.client_offering(&[b"h2"]).expect("client");
    let url = format!("http://{origin}/bytes?n=1024");
    let load = testkit::h2::H2Load::start(secure, tls, url, 4, 32).await.expect("load");
    for round in 0..20 {
        let before = load.ok();
        let mut last = None;
        control::events(&baton.control, Request::Upgrade { wait_drain: false }, |e| {
            last = Some(e)
        })
        .await
        .expect("control socket");
        assert!(matches!(last, Some(Event::Done(_))), "round {round}: {last:?}");
        common::wait_for(Duration::from_secs(10), "requests after the handoff", || async {
            (load.ok() >= before + 100).then_some(())
        })
        .await;
    }
    let report = load.finish().await;
    println!("20 handoffs under h2 load: {report:?}");
    if report.failed > 0 {
        // What the proxy logged for the failed requests' connections (`port N: …`).
        let log = baton.log();
        for port in report
            .samples
            .iter()
            .filter_map(|s| s.strip_prefix("port ")?.split(':').next())
        {
            let client = format!("client=127.0.0.1:{port} ");
            log.lines()
                .filter(|l| l.contains(&client))
                .for_each(|l| eprintln!("{l}"));
        }
    }
    assert_eq!(report.failed, 0, "failed requests: {report:?}");
    assert!(report.ok > 2000, "the load ran throughout: {report:?}");
    baton.stop(STOP).await;
}

/// Headless Chromium with baton as its HTTPS proxy (`--proxy-server=https://…`; the proxy's
/// key trusted by `--ignore-certificate-errors-spki-list`) loads a page with 50
/// sub-resources. Chromium negotiates h2 with the proxy: every request's line says
/// `proto="h2"`, and the test prints how many connections it opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_loads_a_page_of_fifty_resources_over_h2() {
    let origin = testkit::start_origin().await.expect("origin");
    let (mut baton, _, _, secure) = start(None, "").await;
    let cert = baton.dir.path().join("proxy.crt");
    let spki = testkit::browser::spki_hash(&cert).expect("SPKI hash");
    let url = format!("http://{origin}/page?n=50");
    let proxy = format!("https://{secure}");
    let (dom, stderr) = tokio::task::spawn_blocking(move || testkit::browser::dump_dom_through(&proxy, &spki, &url))
        .await
        .unwrap()
        .expect("chromium runs");
    assert!(
        dom.contains("<title>done 50</title>"),
        "every sub-resource loaded: {dom:.300}\n{stderr}"
    );
    let lines = wait_lines(&baton, "/bytes?n=100&i=", 50).await;
    let h2 = lines.iter().filter(|l| l.contains("proto=\"h2\"")).count();
    assert_eq!(
        h2,
        lines.len(),
        "Chromium spoke h2 to the proxy for every request: {lines:?}"
    );
    let mut clients: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split(" client=").nth(1)?.split(' ').next())
        .collect();
    clients.sort_unstable();
    clients.dedup();
    println!(
        "Chromium: {} sub-resources over h2 on {} connection(s) to the proxy",
        lines.len(),
        clients.len()
    );
    baton.stop(STOP).await;
}

/// The base64 SHA-256 of a certificate's public key (what Chromium's SPKI list takes).
/// Waits until `n` access lines contain `text` and end a request; returns them.
async fn wait_lines(baton: &Baton, text: &str, n: usize) -> Vec<String> {
    common::wait_for(Duration::from_secs(10), &format!("{n} lines with {text}"), || async {
        let lines: Vec<String> = baton
            .log()
            .lines()
            .filter(|l| l.contains(text) && l.contains("baton::access"))
            .map(str::to_string)
            .collect();
        (lines.len() >= n).then_some(lines)
    })
    .await
}
