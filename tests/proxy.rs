//! The forward proxy through the real binary: curl -x, a Rust client, raw TCP.

mod common;

use std::time::Duration;

use common::{Baton, curl, testkit, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MIB: usize = 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn get_post_put_stream_10mib_bodies_intact() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("").await;
    let proxy = format!("http://{}", baton.proxy);

    let body = testkit::pattern(10 * MIB);
    let upload = baton.dir.path().join("upload.bin");
    std::fs::write(&upload, &body).unwrap();
    let expected = format!("{} {}", testkit::sha256_hex(&body), body.len());
    for method in ["POST", "PUT"] {
        let (ok, out, err) = curl(&[
            "-x",
            &proxy,
            "-X",
            method,
            "--data-binary",
            &format!("@{}", upload.display()),
            &format!("http://{origin}/sha256"),
        ]);
        assert!(ok, "{method}: {err}");
        assert_eq!(String::from_utf8_lossy(&out), expected, "{method} body arrived altered");
    }
    // Chunked upload (no Content-Length) too.
    let (ok, out, err) = curl(&[
        "-x",
        &proxy,
        "-H",
        "Transfer-Encoding: chunked",
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("http://{origin}/sha256"),
    ]);
    assert!(ok, "chunked upload: {err}");
    assert_eq!(String::from_utf8_lossy(&out), expected);

    let (ok, out, err) = curl(&["-x", &proxy, &format!("http://{origin}/bytes?n={}", 10 * MIB)]);
    assert!(ok, "{err}");
    assert_eq!(out.len(), 10 * MIB);
    assert_eq!(
        testkit::sha256_hex(&out),
        testkit::sha256_hex(&body),
        "download altered"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chunked_response_is_relayed_whole() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("").await;
    let (ok, out, err) = curl(&[
        "-x",
        &format!("http://{}", baton.proxy),
        "-D",
        "-",
        &format!("http://{origin}/chunked?n=300000"),
    ]);
    assert!(ok, "{err}");
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "{text}"
    );
    let body_start = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(&out[body_start..], &testkit::pattern(300000)[..]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keep_alive_serves_many_requests_on_one_connection() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("").await;
    let mut conn = testkit::ProxyConnection::open(baton.proxy).await.unwrap();
    for i in 0..20 {
        let (status, body) = conn
            .get(&format!("http://{origin}/bytes?n={}", 1000 + i))
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(body.len(), 1000 + i);
        assert!(
            !conn.is_closed(),
            "proxy closed a keep-alive connection after request {i}"
        );
    }
    let status = baton.status().await;
    assert_eq!(
        status["active_connections"], 1,
        "all 20 requests used one client connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hop_by_hop_headers_removed_and_via_added() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("").await;
    let (ok, out, err) = curl(&[
        "-x",
        &format!("http://{}", baton.proxy),
        "-H",
        "Connection: X-Secret",
        "-H",
        "X-Secret: 1",
        "-H",
        "Proxy-Authorization: Basic Zm9vOmJhcg==",
        "-H",
        "Keep-Alive: timeout=5",
        "-H",
        "TE: trailers",
        "-H",
        "X-Kept: yes",
        &format!("http://{origin}/headers"),
    ]);
    assert!(ok, "{err}");
    let seen = String::from_utf8_lossy(&out).to_ascii_lowercase();
    for gone in [
        "x-secret",
        "proxy-authorization",
        "keep-alive",
        "te:",
        "proxy-connection",
    ] {
        assert!(!seen.contains(gone), "{gone} reached the origin:\n{seen}");
    }
    assert!(seen.contains("x-kept: yes"), "{seen}");
    // The default Via token: derived from the host and the first listener's port, showing
    // neither.
    let via = format!(
        "via: 1.1 {}",
        baton::proxy::policy::default_via_token(Some(baton.proxy.port()))
    );
    assert!(seen.contains(&via), "{via} in {seen}");
    assert!(seen.contains(&format!("host: {origin}")), "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expect_100_continue_upload_completes() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("").await;
    let body = testkit::pattern(2 * MIB);
    let upload = baton.dir.path().join("upload.bin");
    std::fs::write(&upload, &body).unwrap();
    let (ok, out, err) = curl(&[
        "-v",
        "-x",
        &format!("http://{}", baton.proxy),
        "-H",
        "Expect: 100-continue",
        "--data-binary",
        &format!("@{}", upload.display()),
        &format!("http://{origin}/sha256"),
    ]);
    assert!(ok, "{err}");
    assert!(err.contains("100 Continue"), "no interim 100 answer:\n{err}");
    assert_eq!(
        String::from_utf8_lossy(&out),
        format!("{} {}", testkit::sha256_hex(&body), body.len())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connect_tunnel_carries_echo_both_ways_with_half_close() {
    let echo = testkit::start_echo().await.unwrap();
    let baton = Baton::start(&common::connect_ports(&[echo.port()])).await;
    let mut tunnel = testkit::open_tunnel(baton.proxy, echo).await.unwrap();
    let payload = testkit::pattern(256 * 1024);
    let (mut r, mut w) = tunnel.split();
    let writer = async {
        w.write_all(&payload).await.unwrap();
        // Half-close: the echo server must still send everything back.
        w.shutdown().await.unwrap();
    };
    let reader = async {
        let mut back = Vec::new();
        r.read_to_end(&mut back).await.unwrap();
        back
    };
    let (_, back) = tokio::join!(writer, reader);
    assert_eq!(back, payload);
}

async fn raw_exchange(proxy: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn errors_are_answers_with_reasons() {
    let origin = testkit::start_origin().await.unwrap();
    // A port nothing listens on: bind and drop to find one.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let extra = format!(
        "{}[timeouts]\nupstream_response = \"1s\"\n",
        common::connect_ports(&[closed.port()])
    );
    let baton = Baton::start(&extra).await;
    let proxy = format!("http://{}", baton.proxy);

    let (_, out, _) = curl(&["-x", &proxy, "-w", "\n%{http_code}", &format!("http://{closed}/")]);
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.ends_with("502") && text.contains("cannot connect to origin"),
        "{text}"
    );

    let (_, out, _) = curl(&["-x", &proxy, "-w", "\n%{http_code}", &format!("http://{origin}/hang")]);
    let text = String::from_utf8_lossy(&out);
    assert!(text.ends_with("504") && text.contains("did not answer"), "{text}");

    let resp = raw_exchange(
        baton.proxy,
        format!("CONNECT {closed} HTTP/1.1\r\nHost: {closed}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 502"), "{resp}");

    // Origin-form sent to the proxy: a clear 400, not a loop to itself.
    let resp = raw_exchange(
        baton.proxy,
        b"GET /index.html HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 400") && resp.contains("origin-form"),
        "{resp}"
    );

    let resp = raw_exchange(
        baton.proxy,
        b"CONNECT nowhere HTTP/1.1\r\nHost: nowhere\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");

    let resp = raw_exchange(baton.proxy, b"THIS IS NOT HTTP\r\n\r\n").await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");

    // Still serving after all of that.
    let (ok, out, err) = curl(&["-x", &proxy, &format!("http://{origin}/bytes?n=10")]);
    assert!(ok && out.len() == 10, "{err}");
    let log = baton.log();
    assert!(
        log.contains("status=502") && log.contains("status=504") && log.contains("status=400"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_finishes_slow_request_then_exits_zero() {
    let origin = testkit::start_origin().await.unwrap();
    let mut baton = Baton::start("").await;
    let proxy = format!("http://{}", baton.proxy);
    let url = format!("http://{origin}/slow?ms=1500&n=100000");
    let slow = std::thread::spawn(move || curl(&["-x", &proxy, &url]));
    wait_for(Duration::from_secs(5), "the slow request to reach baton", || async {
        (baton.status().await["active_connections"] == 1).then_some(())
    })
    .await;
    baton.signal(baton.pid(), nix::sys::signal::Signal::SIGTERM);
    // Not accepting any more: a new connection is refused once the listener closed.
    let code = baton.wait_exit(Duration::from_secs(10)).await;
    let (ok, out, err) = slow.join().unwrap();
    assert!(ok, "slow request failed during stop: {err}");
    assert_eq!(out, testkit::pattern(100000), "slow response truncated");
    assert_eq!(code, Some(0), "{}", baton.log());
    assert!(
        !baton.dir.path().join("baton.pid").exists(),
        "a stopped baton removes its pid file"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_open_tunnel_cuts_it_at_drain_timeout() {
    let echo = testkit::start_echo().await.unwrap();
    let mut baton = Baton::start(&format!(
        "{}[timeouts]\ndrain = \"1s\"\n",
        common::connect_ports(&[echo.port()])
    ))
    .await;
    let mut tunnel = testkit::open_tunnel(baton.proxy, echo).await.unwrap();
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tunnel.read_exact(&mut buf).await.unwrap();
    let sent = std::time::Instant::now();
    baton.signal(baton.pid(), nix::sys::signal::Signal::SIGTERM);
    // The tunnel keeps working during the drain...
    tunnel.write_all(b"pong").await.unwrap();
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    // ...and is closed at the drain timeout.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), tunnel.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "tunnel not closed at the drain timeout");
    let waited = sent.elapsed();
    assert!(
        waited >= Duration::from_millis(900),
        "tunnel closed before the drain timeout ({waited:?})"
    );
    assert_eq!(
        baton.wait_exit(Duration::from_secs(10)).await,
        Some(0),
        "{}",
        baton.log()
    );
    assert!(baton.log().contains("cut at drain timeout"), "{}", baton.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adopts_socket_passed_by_systemd_socket_activate() {
    let origin = testkit::start_origin().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("baton.toml");
    let text = common::config_text(dir.path(), "").replace("127.0.0.1:0", &format!("127.0.0.1:{port}"));
    std::fs::write(&config, text).unwrap();
    let child = std::process::Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.1:{port}"),
            "--fdname=proxy",
            common::BATON,
            "run",
            "--config",
        ])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("systemd-socket-activate (from systemd) must be installed");
    let _guard = common::KillOnDrop(child);
    // Wait until systemd-socket-activate listens (without connecting: that would activate).
    wait_for(Duration::from_secs(10), "systemd-socket-activate to listen", || async {
        common::tcp_listening(port).then_some(())
    })
    .await;
    // The first connection makes systemd-socket-activate exec baton with the listening socket
    // as fd 3; baton then accepts that very connection from the socket's queue.
    let proxy_url = format!("http://127.0.0.1:{port}");
    let url = format!("http://{origin}/bytes?n=77");
    let first = tokio::task::spawn_blocking(move || curl(&["-x", &proxy_url, &url]));
    let (ok, out, err) = first.await.unwrap();
    assert!(ok && out.len() == 77, "{err}");
    let control = dir.path().join("control.sock");
    let status = common::status(&control)
        .await
        .expect("baton answers on its control socket");
    let proxy = status["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == "proxy")
        .unwrap()
        .clone();
    assert_eq!(proxy["adopted"], true, "{status}");
    assert_eq!(proxy["address"], format!("127.0.0.1:{port}"), "{status}");
}

#[test]
fn check_validates_like_nginx_t() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[[listener]]\nname = \"proxy\"\naddress = \"[::1]:3128\"\n").unwrap();
    let out = std::process::Command::new(common::BATON)
        .args(["check", "--config"])
        .arg(&good)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("listener proxy on [::1]:3128"));

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[[listener]]\nname = \"proxy\"\naddress = \"127.0.0.1:3128\"\n\n[timeouts]\ndrain = \"soon\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::BATON)
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("line 6") && err.contains("drain"),
        "{err}"
    );

    let out = std::process::Command::new(common::BATON)
        .args(["check"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("listener proxy on 127.0.0.1:8080"));
}
