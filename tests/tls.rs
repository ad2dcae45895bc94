//! TLS listeners ("HTTPS to the proxy") through the real binary, with certificates made in the
//! test by a throw-away CA: curl `--proxy https://` for absolute-form GET and POST and for
//! CONNECT, Basic auth inside TLS, a certificate swapped by a handoff (openssl sees the new
//! serial) and a broken one rolled back, sessions resumed across handoffs (openssl's
//! `-sess_out`, then `-sess_in` reports `Reused`) and across a fleet sharing `ticket_keys`,
//! a flood of silent handshakes, TLS connections counted apart in the upgrade report, and
//! `baton check` on certificate pairs.

mod common;

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use baton::control::{self, Event, Request};
use common::{Baton, curl, listener_addr, testkit};
use testkit::{ProxyConnection, TestCa};
use tokio::io::AsyncReadExt;

const DAY: Duration = Duration::from_secs(86_400);

/// A CA of this test and a leaf for 127.0.0.1 at `<dir>/proxy.crt` and `<dir>/proxy.key`.
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
    cert: PathBuf,
    key: PathBuf,
    ca_pem: PathBuf,
}

impl Pki {
    fn new(serial: u64) -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = TestCa::new().expect("CA");
        let ca_pem = dir.path().join("ca.pem");
        ca.write_ca(&ca_pem).expect("write CA");
        let (cert, key) = ca.write_leaf(dir.path(), "proxy", serial, 30 * DAY).expect("leaf");
        Pki {
            dir,
            ca,
            cert,
            key,
            ca_pem,
        }
    }

    /// Replaces the leaf in place (what certbot's deploy hook does) with serial `serial`.
    fn reissue(&self, serial: u64) {
        self.ca
            .write_leaf(self.dir.path(), "proxy", serial, 30 * DAY)
            .expect("leaf");
    }

    /// A `[[listener]]` named `secure` on an ephemeral port with this leaf.
    fn listener(&self) -> String {
        format!(
            "[[listener]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
            self.cert.display(),
            self.key.display()
        )
    }

    fn ca(&self) -> &str {
        self.ca_pem.to_str().expect("utf-8 path")
    }
}

async fn secure_addr(baton: &Baton) -> SocketAddr {
    listener_addr(&baton.status().await, "secure")
}

fn https(addr: SocketAddr) -> String {
    format!("https://{addr}")
}

/// `openssl s_client` to `addr` with `args`, stdin closed; its stdout and stderr.
fn s_client(addr: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &addr.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl must be installed");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The serial of the certificate `addr` serves, as `openssl x509 -serial` prints it.
fn served_serial(addr: SocketAddr, ca: &str) -> String {
    let shown = s_client(addr, &["-CAfile", ca]);
    let mut x509 = Command::new("openssl")
        .args(["x509", "-noout", "-serial"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl x509");
    x509.stdin
        .take()
        .expect("stdin")
        .write_all(shown.as_bytes())
        .expect("write");
    let out = x509.wait_with_output().expect("openssl x509 output");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `baton upgrade` through the typed client: the report, or the reason it failed.
async fn upgrade(baton: &Baton) -> Result<control::UpgradeReport, String> {
    let mut outcome = Err("no answer".to_string());
    control::events(&baton.control, Request::Upgrade { wait_drain: false }, |e| match e {
        Event::Done(r) => outcome = Ok(r),
        Event::Failed { reason } | Event::Refused { reason } => outcome = Err(reason),
        _ => {}
    })
    .await
    .expect("control socket");
    outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_post_and_connect_inside_tls() {
    let origin = testkit::start_origin().await.expect("origin");
    let pki = Pki::new(0x1001);
    let extra = format!("{}{}", common::connect_ports(&[origin.port()]), pki.listener());
    let baton = Baton::start(&extra).await;
    let secure = secure_addr(&baton).await;
    let proxy = https(secure);

    let url = format!("http://{origin}/bytes?n=100000");
    let (ok, body, err) = curl(&["--proxy", &proxy, "--proxy-cacert", pki.ca(), &url]);
    assert!(ok, "GET inside TLS: {err}\n{}", baton.log());
    assert_eq!(body, testkit::pattern(100_000));

    let upload = testkit::pattern(1 << 20);
    let file = pki.dir.path().join("upload");
    std::fs::write(&file, &upload).expect("upload file");
    let data = format!("@{}", file.display());
    let url = format!("http://{origin}/sha256");
    let (ok, body, err) = curl(&[
        "--proxy",
        &proxy,
        "--proxy-cacert",
        pki.ca(),
        "--data-binary",
        &data,
        &url,
    ]);
    assert!(ok, "POST inside TLS: {err}");
    let answer = String::from_utf8_lossy(&body);
    assert!(answer.starts_with(&testkit::sha256_hex(&upload)), "{answer}");

    // `-p`: curl opens a CONNECT tunnel inside the TLS connection and speaks HTTP through it.
    let url = format!("http://{origin}/bytes?n=5000");
    let (ok, body, err) = curl(&["-p", "--proxy", &proxy, "--proxy-cacert", pki.ca(), &url]);
    assert!(ok, "CONNECT inside TLS: {err}");
    assert_eq!(body, testkit::pattern(5000));
    // Its access line is written when the tunnel ends, just after curl is done.
    let tunnel_line = format!("target={origin} status=200");
    common::wait_for(Duration::from_secs(5), "the tunnel's access line", || {
        let seen = baton
            .log()
            .lines()
            .any(|l| l.contains("tunnel") && l.contains(&tunnel_line));
        async move { seen.then_some(()) }
    })
    .await;

    // The plain listener is unchanged; plain HTTP on the TLS port is no HTTP at all.
    let (ok, body, _) = curl(&["-x", &format!("http://{}", baton.proxy), &url]);
    assert!(ok && body.len() == 5000);
    let (_, body, _) = curl(&["-x", &format!("http://{secure}"), &url]);
    assert!(body.is_empty(), "a plain request on the TLS port was answered");
    // ALPN: a client that offers neither protocol is refused; h2 is preferred when offered
    // (the default `alpn`), http/1.1 chosen when it is the only one.
    let other = s_client(secure, &["-CAfile", pki.ca(), "-alpn", "spdy/3"]);
    assert!(other.contains("no application protocol"), "{other}");
    let h2 = s_client(secure, &["-CAfile", pki.ca(), "-alpn", "http/1.1,h2"]);
    assert!(h2.contains("ALPN protocol: h2"), "{h2}");
    let h1 = s_client(secure, &["-CAfile", pki.ca(), "-alpn", "http/1.1"]);
    assert!(h1.contains("ALPN protocol: http/1.1"), "{h1}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_inside_tls() {
    let origin = testkit::start_origin().await.expect("origin");
    let pki = Pki::new(0x2001);
    let htpasswd = pki.dir.path().join("htpasswd");
    let hash = bcrypt::hash("right", 5).expect("hash");
    testkit::write_secret(&htpasswd, format!("alice:{hash}\n")).expect("htpasswd");
    let extra = format!(
        "[access]\nhtpasswd = \"{}\"\nconnect_ports = [{}]\n{}",
        htpasswd.display(),
        origin.port(),
        pki.listener()
    );
    let baton = Baton::start(&extra).await;
    let proxy = https(secure_addr(&baton).await);
    let url = format!("http://{origin}/bytes?n=10");
    let status = |user: Option<&str>, tunnel: bool| {
        let mut args = vec!["--proxy", &proxy, "--proxy-cacert", pki.ca(), "-o", "/dev/null"];
        args.extend(["-w", "%{http_code} %{http_connect}"]);
        if let Some(u) = user {
            args.extend(["--proxy-user", u]);
        }
        if tunnel {
            args.push("-p");
        }
        args.push(&url);
        String::from_utf8_lossy(&curl(&args).1).into_owned()
    };
    assert_eq!(status(None, false), "407 000");
    assert_eq!(status(Some("alice:wrong"), false), "407 000");
    assert_eq!(status(Some("alice:right"), false), "200 000");
    assert_eq!(status(Some("alice:wrong"), true), "000 407");
    assert_eq!(status(Some("alice:right"), true), "200 200");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handoff_swaps_the_certificate_and_a_broken_one_is_rolled_back() {
    let origin = testkit::start_origin().await.expect("origin");
    let pki = Pki::new(0x3001);
    let baton = Baton::start(&pki.listener()).await;
    let secure = secure_addr(&baton).await;
    assert_eq!(served_serial(secure, pki.ca()), "serial=3001");
    let tls = pki.ca.client().expect("client");
    let url = format!("http://{origin}/bytes?n=100");
    let mut before = ProxyConnection::open_via(secure, Some(&tls))
        .await
        .expect("TLS connection");
    assert_eq!(before.get(&url).await.expect("GET").1.len(), 100);

    pki.reissue(0x3002);
    let report = upgrade(&baton)
        .await
        .unwrap_or_else(|e| panic!("handoff with the renewed certificate: {e}\n{}", baton.log()));
    assert_eq!(served_serial(secure, pki.ca()), "serial=3002");
    // The connection made before the handoff drains: its next request is still answered.
    assert_eq!(
        before.get(&url).await.expect("GET on the draining generation").1.len(),
        100
    );

    // A key that does not match: the new generation exits before it is ready, saying which
    // files; the generation that serves keeps the certificate it has.
    let other = pki.ca.leaf(0x3999, DAY).expect("leaf");
    std::fs::write(&pki.key, other.key_pem).expect("write key");
    let reason = upgrade(&baton)
        .await
        .expect_err("a mismatched key must fail the handoff");
    assert!(
        reason.contains("does not match") && reason.contains(&pki.key.display().to_string()),
        "{reason}"
    );
    assert_eq!(served_serial(secure, pki.ca()), "serial=3002");
    std::fs::remove_file(&pki.cert).expect("rm cert");
    let reason = upgrade(&baton)
        .await
        .expect_err("a missing certificate must fail the handoff");
    assert!(
        reason.contains("cannot read") && reason.contains(&pki.cert.display().to_string()),
        "{reason}"
    );
    assert_eq!(served_serial(secure, pki.ca()), "serial=3002");
    let status = baton.status().await;
    assert_eq!(status["pid"], report.new_pid, "{status}");

    pki.reissue(0x3003);
    upgrade(&baton).await.expect("handoff after the fix");
    assert_eq!(served_serial(secure, pki.ca()), "serial=3003");
}

/// `openssl s_client -sess_out`: connects and, once the session with its ticket is saved
/// (TLS 1.3 sends tickets after the handshake), closes its input so that it ends by itself.
/// Runs on a blocking thread; waits for the file, never for a fixed time.
fn save_session(addr: SocketAddr, ca: &str, version: &str, path: &Path) {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &addr.to_string(),
            "-CAfile",
            ca,
            version,
            "-sess_out",
        ])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_client");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::metadata(path).is_ok_and(|m| m.len() > 0) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(child.stdin.take());
    let exited = wait_child(&mut child, Duration::from_secs(10));
    assert!(exited, "openssl s_client did not end after its input closed");
    assert!(std::fs::metadata(path).is_ok_and(|m| m.len() > 0), "no session saved");
}

/// Waits (bounded) for `child` to exit; kills it if it did not.
fn wait_child(child: &mut std::process::Child, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    false
}

fn resumed(addr: SocketAddr, ca: &str, version: &str, path: &Path) -> String {
    let out = s_client(
        addr,
        &["-CAfile", ca, version, "-sess_in", path.to_str().expect("utf-8")],
    );
    out.lines()
        .find(|l| l.starts_with("Reused,") || l.starts_with("New,"))
        .unwrap_or("no session line")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_resume_across_handoffs() {
    let pki = Pki::new(0x4001);
    let baton = Baton::start(&pki.listener()).await;
    let secure = secure_addr(&baton).await;
    let ca = pki.ca().to_string();
    let mut sessions = Vec::new();
    for version in ["-tls1_3", "-tls1_2"] {
        let path = pki.dir.path().join(format!("session{version}"));
        let (ca, saved) = (ca.clone(), path.clone());
        tokio::task::spawn_blocking(move || save_session(secure, &ca, version, &saved))
            .await
            .expect("s_client");
        sessions.push((version, path));
    }
    // Two handoffs: the keys travel from generation 1 to 2 to 3, none of them on disk.
    for _ in 0..2 {
        upgrade(&baton).await.expect("handoff");
    }
    assert_eq!(baton.status().await["generation"], 3);
    for (version, path) in &sessions {
        let line = resumed(secure, &ca, version, path);
        let want = if *version == "-tls1_3" {
            "Reused, TLSv1.3"
        } else {
            "Reused, TLSv1.2"
        };
        assert!(line.starts_with(want), "{version}: {line}");
    }
    // Another baton with keys of its own does not resume them: the reuse above was real.
    let stranger = Baton::start(&pki.listener()).await;
    let line = resumed(secure_addr(&stranger).await, &ca, "-tls1_3", &sessions[0].1);
    assert!(line.starts_with("New,"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_sharing_ticket_keys_resumes_each_others_sessions() {
    let pki = Pki::new(0x5001);
    let keys = pki.dir.path().join("ticket.key");
    std::fs::write(&keys, testkit::pattern(80)).expect("ticket key file");
    let extra = format!("[tls]\nticket_keys = \"{}\"\n{}", keys.display(), pki.listener());
    let a = Baton::start(&extra).await;
    let b = Baton::start(&extra).await;
    let (a_addr, b_addr) = (secure_addr(&a).await, secure_addr(&b).await);
    let path = pki.dir.path().join("session");
    let (ca, saved) = (pki.ca().to_string(), path.clone());
    tokio::task::spawn_blocking(move || save_session(a_addr, &ca, "-tls1_3", &saved))
        .await
        .expect("s_client");
    let line = resumed(b_addr, pki.ca(), "-tls1_3", &path);
    assert!(line.starts_with("Reused, TLSv1.3"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_silent_handshakes_does_not_starve_a_real_client() {
    const FLOOD: usize = 300;
    const MAX_HANDSHAKES: usize = 16;
    let origin = testkit::start_origin().await.expect("origin");
    let pki = Pki::new(0x6001);
    let extra = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n[tls]\nmax_handshakes = {MAX_HANDSHAKES}\nhandshake_timeout = \"4s\"\n{}",
        pki.listener()
    );
    let baton = Baton::start(&extra).await;
    let secure = secure_addr(&baton).await;
    let mut silent = Vec::new();
    for _ in 0..FLOOD {
        silent.push(tokio::net::TcpStream::connect(secure).await.expect("connect"));
    }
    // A real client arrives behind the flood: served at once, not after the flood's timeout.
    let url = format!("http://{origin}/bytes?n=10");
    let started = Instant::now();
    let (ok, body, err) = tokio::task::spawn_blocking({
        let (proxy, ca) = (https(secure), pki.ca().to_string());
        move || curl(&["--proxy", &proxy, "--proxy-cacert", &ca, &url])
    })
    .await
    .expect("curl");
    let took = started.elapsed();
    assert!(ok && body.len() == 10, "{err}");
    assert!(took < Duration::from_secs(2), "the real client waited {took:?}");
    // The flood beyond the bound was dropped at once, the rest at the handshake timeout.
    let mut closed_at_once = 0;
    let at_once = Instant::now() + Duration::from_secs(1);
    for s in &mut silent {
        let mut b = [0u8; 1];
        let wait = at_once.saturating_duration_since(Instant::now());
        if matches!(tokio::time::timeout(wait, s.read(&mut b)).await, Ok(Ok(0) | Err(_))) {
            closed_at_once += 1;
        }
    }
    assert!(
        closed_at_once >= FLOOD - MAX_HANDSHAKES,
        "{closed_at_once} closed at once"
    );
    for s in &mut silent {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(Duration::from_secs(6), s.read(&mut b)).await;
        assert!(
            matches!(r, Ok(Ok(0) | Err(_))),
            "a silent connection outlived handshake_timeout: {r:?}"
        );
    }
    let admin = listener_addr(&baton.status().await, "admin");
    let (_, metrics, _) = curl(&[&format!("http://{admin}/metrics")]);
    let metrics = String::from_utf8_lossy(&metrics);
    let count = |result: &str| -> u64 {
        let series = format!("baton_tls_handshakes_total{{result=\"{result}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(count("evicted") >= (FLOOD - MAX_HANDSHAKES) as u64, "{metrics}");
    assert!(count("timeout") >= 1 && count("ok") >= 1, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_tls_connections_move_with_plain_ones() {
    let origin = testkit::start_origin().await.expect("origin");
    let pki = Pki::new(0x7001);
    let baton = Baton::start(&format!(
        "[timeouts]\ncanary = \"100ms\"\ndrain = \"5s\"\n{}",
        pki.listener()
    ))
    .await;
    let secure = secure_addr(&baton).await;
    let url = format!("http://{origin}/bytes?n=100");
    let tls = pki.ca.client().expect("client");
    let mut over_tls = ProxyConnection::open_via(secure, Some(&tls)).await.expect("TLS");
    let mut plain = ProxyConnection::open(baton.proxy).await.expect("plain");
    // A second real client: Python's ssl (OpenSSL), on its own keep-alive connection.
    let mut python = PyClient::start(secure, pki.ca(), "get", &url).await;
    for c in [&mut over_tls, &mut plain] {
        assert_eq!(c.get(&url).await.expect("GET").1.len(), 100);
    }
    assert_eq!(python.ask("get").await, "ok 200 100", "Python's first GET");
    let (ok, out) = baton.cli(&["upgrade", "--json", "--wait-drain"]);
    assert!(ok, "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(report["draining_connections"], 3, "{report}");
    assert_eq!(report["draining_tls_connections"], 2, "{report}");
    assert_eq!(report["drain"]["cut"], 0, "nothing was cut: {report}");
    assert_eq!(
        report["drain"]["moved"], 3,
        "all three idle connections moved: {report}"
    );
    assert_eq!(
        report["drain"]["tls_moved"], 2,
        "the two TLS ones with their keys: {report}"
    );
    // The new generation serves each on the same connection: the TLS ones go on from the
    // record state the old generation handed over.
    assert_eq!(
        over_tls.get(&url).await.expect("rustls GET after the move").1.len(),
        100
    );
    assert_eq!(python.ask("get").await, "ok 200 100", "Python's GET after the move");
    assert_eq!(plain.get(&url).await.expect("GET after the move").1.len(), 100);
    let status = baton.status().await;
    assert_eq!(status["adopted_connections"], 3, "{status}");
    assert_eq!(status["adopted_tls"], 2, "two of them with their TLS state: {status}");
    // And they move again at the next handoff (a resumed connection takes itself apart).
    let (ok, out) = baton.cli(&["upgrade", "--json", "--wait-drain"]);
    assert!(ok, "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(report["drain"]["tls_moved"], 2, "moved again: {report}");
    assert_eq!(python.ask("get").await, "ok 200 100", "Python's GET after two moves");
    assert_eq!(over_tls.get(&url).await.expect("GET after two moves").1.len(), 100);
    // The client's close_notify is answered with baton's.
    assert_eq!(python.ask("close").await, "closed notify", "a clean TLS close");
}

/// A real TLS client in a child process: `tests/fixtures/tls_proxy_client.py` (Python's ssl,
/// that is OpenSSL), driven one line at a time so that the test hands off between steps.
struct PyClient {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    lines: tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
}

impl PyClient {
    /// Connects (and, for `tunnel`, opens the tunnel to `target`); waits for its `ready`.
    async fn start(proxy: SocketAddr, ca: &str, mode: &str, target: &str) -> PyClient {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tls_proxy_client.py");
        let mut child = tokio::process::Command::new("python3")
            .args([script, &proxy.to_string(), ca, mode, target])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 must be installed");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = child.stdout.take().expect("stdout");
        let mut client = PyClient {
            _child: child,
            stdin,
            lines: tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout)),
        };
        let ready = client.answer().await;
        assert!(ready.starts_with("ready TLSv1.3"), "the client is connected: {ready}");
        client
    }

    /// Its next line, within 20 s.
    async fn answer(&mut self) -> String {
        let line = tokio::time::timeout(Duration::from_secs(20), self.lines.next_line()).await;
        line.expect("the Python client answers within 20 s")
            .expect("its stdout")
            .unwrap_or_else(|| "exited".to_string())
    }

    async fn ask(&mut self, line: &str) -> String {
        use tokio::io::AsyncWriteExt as _;
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .expect("stdin");
        self.stdin.flush().await.expect("stdin");
        self.answer().await
    }
}

/// A TLS listener, CONNECT allowed to `echo`'s port, and a 2 s drain.
fn tunnel_config(pki: &Pki, echo: SocketAddr) -> String {
    format!(
        "{}\n[timeouts]\ndrain = \"2s\"\n{}",
        common::connect_ports(&[echo.port()]),
        pki.listener()
    )
}

/// `baton upgrade --wait-drain --json`: the summary, with the drain.
fn upgrade_waiting(baton: &Baton) -> serde_json::Value {
    let (ok, out) = baton.cli(&["upgrade", "--json", "--wait-drain"]);
    assert!(ok, "{out}");
    serde_json::from_str(out.trim()).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_inside_tls_moves_intact_across_twenty_handoffs() {
    let echo = testkit::start_echo().await.expect("echo");
    let pki = Pki::new(0x7101);
    let baton = Baton::start(&tunnel_config(&pki, echo)).await;
    let secure = secure_addr(&baton).await;
    let mut client = PyClient::start(secure, pki.ca(), "tunnel", &echo.to_string()).await;
    let mut slowest = Duration::ZERO;
    for round in 0..20 {
        let echoed = client.ask("round 65536").await;
        assert!(
            echoed.starts_with("ok "),
            "round {round}: 64 KiB echoed intact: {echoed}"
        );
        let old = upgrade(&baton).await.expect("upgrade").old_pid;
        let verdict = Instant::now();
        common::wait_for(Duration::from_secs(10), "the old generation to exit", || async {
            (!common::alive(old)).then_some(())
        })
        .await;
        let took = verdict.elapsed();
        slowest = slowest.max(took);
        // With the tunnel moved, nothing is left to drain: it exits long before its 2 s
        // deadline (a tunnel left behind would hold it there).
        assert!(
            took < Duration::from_millis(1500),
            "round {round}: the old generation exited {took:?} after the verdict\n{}",
            baton.log()
        );
    }
    println!("20 handoffs: the slowest old generation exited {slowest:?} after its verdict");
    let echoed = client.ask("round 1000000").await;
    assert!(echoed.starts_with("ok "), "1 MB through the 21st generation: {echoed}");
    let status = baton.status().await;
    assert_eq!(status["generation"], 21, "{status}");
    assert_eq!(status["adopted_tunnels"], 1, "the last generation adopted it: {status}");
    // The client's close_notify reaches the echo server as the end of its input; its
    // end comes back as baton's close_notify.
    assert_eq!(client.ask("close").await, "closed notify", "a clean TLS close");
    common::wait_for(Duration::from_secs(5), "the tunnel's access line", || async {
        let log = baton.log();
        log.lines()
            .any(|l| l.contains("CONNECT") && l.contains("outcome=") && l.contains("closed"))
            .then_some(())
    })
    .await;
}

/// A rustls client of the TLS listener speaking only `suite` (and its version).
fn connector(pki: &Pki, suite: rustls::SupportedCipherSuite) -> tokio_rustls::TlsConnector {
    let pem = std::fs::read_to_string(&pki.ca_pem).expect("CA");
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject as _;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert.expect("PEM")).expect("root");
    }
    let version = match suite {
        rustls::SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        rustls::SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
    };
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites: vec![suite],
        ..rustls::crypto::ring::default_provider()
    };
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(provider))
        .with_protocol_versions(&[version])
        .expect("version")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

type ClientTls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A CONNECT tunnel to `target` inside a TLS connection made by `tls`.
async fn tls_tunnel(proxy: SocketAddr, tls: &tokio_rustls::TlsConnector, target: SocketAddr) -> ClientTls {
    use tokio::io::AsyncWriteExt as _;
    let tcp = tokio::net::TcpStream::connect(proxy).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").expect("name");
    let mut s = tls.connect(name, tcp).await.expect("handshake");
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.write_all(head.as_bytes()).await.expect("CONNECT");
    let answer = testkit::client::read_head(&mut s).await.expect("answer");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    s
}

/// Sends `n` bytes through an echo tunnel and reads them back: `Ok` when they are the same.
async fn echo_round(s: &mut ClientTls, n: usize, seed: u8) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    let data: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
    s.write_all(&data).await?;
    s.flush().await?;
    let mut back = vec![0u8; n];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut back))
        .await
        .map_err(|_| std::io::Error::other("no echo within 10 s"))??;
    if back != data {
        return Err(std::io::Error::other("the echo differs"));
    }
    Ok(())
}

/// A tunnel inside TLS moves with each cipher suite the listener offers, TLS 1.3's and TLS
/// 1.2's (whose records carry an explicit nonce and their real type), twice: the second
/// time from the resumed record layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_move_with_each_tls13_and_tls12_suite() {
    use rustls::crypto::ring::cipher_suite as cs;
    let echo = testkit::start_echo().await.expect("echo");
    let pki = Pki::new(0x7201);
    let baton = Baton::start(&tunnel_config(&pki, echo)).await;
    let secure = secure_addr(&baton).await;
    let suites = [
        ("TLS 1.3 AES-128-GCM", cs::TLS13_AES_128_GCM_SHA256),
        ("TLS 1.3 AES-256-GCM", cs::TLS13_AES_256_GCM_SHA384),
        ("TLS 1.3 ChaCha20-Poly1305", cs::TLS13_CHACHA20_POLY1305_SHA256),
        ("TLS 1.2 AES-128-GCM", cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256),
        ("TLS 1.2 AES-256-GCM", cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384),
        (
            "TLS 1.2 ChaCha20-Poly1305",
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
        ),
    ];
    let mut moving = Vec::new();
    for (name, suite) in suites {
        let mut s = tls_tunnel(secure, &connector(&pki, suite), echo).await;
        echo_round(&mut s, 50_000, 1).await.expect(name);
        moving.push((name, s));
    }
    let report = upgrade_waiting(&baton);
    let drain = &report["drain"];
    assert_eq!(drain["moved"], 6, "every tunnel moved: {report}");
    assert_eq!(drain["tls_moved"], 6, "each with its TLS state: {report}");
    assert_eq!(drain["cut"], 0, "none stayed to be cut: {report}");
    for (i, (name, s)) in moving.iter_mut().enumerate() {
        echo_round(s, 200_000, 3 + i as u8)
            .await
            .unwrap_or_else(|e| panic!("{name} after the move: {e}"));
    }
    // Again: a resumed record layer takes itself apart and moves on.
    let report = upgrade_waiting(&baton);
    assert_eq!(report["drain"]["tls_moved"], 6, "{report}");
    for (i, (name, s)) in moving.iter_mut().enumerate() {
        echo_round(s, 100_000, 11 + i as u8)
            .await
            .unwrap_or_else(|e| panic!("{name} after the second move: {e}"));
    }
}

/// A client `KeyUpdate` after the move cannot be applied (the record state handed over is
/// the key and IV, not the traffic secret the next key derives from): the moved connection
/// answers it with a close_notify and closes, which the client reads as a clean end. Before
/// the move, rustls applies it, and the connection moves afterwards with the new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_update_after_the_move_closes_cleanly() {
    use rustls::crypto::ring::cipher_suite as cs;
    let echo = testkit::start_echo().await.expect("echo");
    let pki = Pki::new(0x7301);
    let baton = Baton::start(&tunnel_config(&pki, echo)).await;
    let secure = secure_addr(&baton).await;
    let mut s = tls_tunnel(secure, &connector(&pki, cs::TLS13_AES_128_GCM_SHA256), echo).await;
    s.get_mut().1.refresh_traffic_keys().expect("KeyUpdate before the move");
    echo_round(&mut s, 10_000, 1).await.expect("rustls applied it");
    let report = upgrade_waiting(&baton);
    assert_eq!(report["drain"]["tls_moved"], 1, "{report}");
    echo_round(&mut s, 10_000, 2)
        .await
        .expect("moved with the updated keys");
    s.get_mut().1.refresh_traffic_keys().expect("KeyUpdate after the move");
    let sent = echo_round(&mut s, 10, 3).await;
    assert!(sent.is_err(), "the moved connection does not go on after a KeyUpdate");
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    let end = end.expect("closed within 5 s");
    // rustls reads a close without close_notify as UnexpectedEof: `Ok` is baton's.
    assert!(end.is_ok(), "a clean end (close_notify), not a truncation: {end:?}");
}

/// Writes a configuration with one TLS listener using `cert` and `key` and runs `baton check`.
fn check(dir: &Path, cert: &Path, key: &Path, extra: &str) -> (bool, String) {
    let config = dir.join("check.toml");
    let text = format!(
        "control_socket = \"{}\"\n{extra}[[listener]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        dir.join("c.sock").display(),
        cert.display(),
        key.display()
    );
    std::fs::write(&config, text).expect("config");
    common::check_config(&config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn baton_check_validates_the_pair_and_its_expiry() {
    let pki = Pki::new(0x7a01);
    let dir = pki.dir.path();
    let (ok, out) = check(dir, &pki.cert, &pki.key, "");
    assert!(
        ok && out.contains("serial 7a:01") && out.contains("days left") && !out.contains("warning"),
        "{out}"
    );

    let (soon_cert, soon_key) = pki.ca.write_leaf(dir, "soon", 0x7a02, 5 * DAY).expect("leaf");
    let (ok, out) = check(dir, &soon_cert, &soon_key, "");
    assert!(
        ok && out.contains("warning: the certificate of listener `secure` expires in"),
        "{out}"
    );

    let now = SystemTime::now();
    let expired = pki.ca.leaf_between(0x7a03, now - 10 * DAY, now - DAY).expect("leaf");
    let expired_cert = dir.join("expired.crt");
    std::fs::write(&expired_cert, expired.cert_pem).expect("write");
    testkit::write_secret(&dir.join("expired.key"), expired.key_pem).expect("write");
    let (ok, out) = check(dir, &expired_cert, &dir.join("expired.key"), "");
    assert!(!ok && out.contains("expired") && out.contains("expired.crt"), "{out}");

    let (ok, out) = check(dir, &pki.cert, &soon_key, "");
    assert!(
        !ok && out.contains("does not match") && out.contains("soon.key") && out.contains("proxy.crt"),
        "{out}"
    );
    let (ok, out) = check(dir, &dir.join("nope.crt"), &pki.key, "");
    assert!(!ok && out.contains("cannot read") && out.contains("nope.crt"), "{out}");
    testkit::write_secret(&dir.join("garbage.key"), "not a key\n").expect("write");
    let (ok, out) = check(dir, &pki.cert, &dir.join("garbage.key"), "");
    assert!(
        !ok && out.contains("garbage.key") && out.contains("no private key"),
        "{out}"
    );
    std::fs::write(dir.join("short.key"), [1u8; 16]).expect("write");
    let short = format!("[tls]\nticket_keys = \"{}\"\n", dir.join("short.key").display());
    let (ok, out) = check(dir, &pki.cert, &pki.key, &short);
    assert!(!ok && out.contains("short.key") && out.contains("16 bytes"), "{out}");

    // Serving with an expired certificate is allowed (warned), so that a restart does not
    // take the plain listeners down with it.
    let expired_listener = pki
        .listener()
        .replace("proxy.crt", "expired.crt")
        .replace("proxy.key", "expired.key");
    let baton = Baton::start(&expired_listener).await;
    assert!(baton.log().contains("TLS certificate has EXPIRED"), "{}", baton.log());
}

/// The scale: a thousand idle keep-alive TLS clients (each after one request) and a
/// hundred TLS tunnels move in one handoff; the drain report's time from the verdict to the
/// old generation drained is printed (docs/benchmarks.md, "TLS connections at a handoff").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_tls_clients_and_a_hundred_tunnels_move_in_one_handoff() {
    baton_handoff::process::raise_open_files_limit().expect("raise RLIMIT_NOFILE");
    let (origin, echo) = (
        testkit::start_origin().await.expect("origin"),
        testkit::start_echo().await.expect("echo"),
    );
    let pki = Pki::new(0x7401);
    let config = format!(
        "{}\n[timeouts]\ndrain = \"10s\"\n[limits]\nmax_connections_per_client = 0\n{}",
        common::connect_ports(&[echo.port(), origin.port()]),
        pki.listener()
    );
    let baton = Baton::start(&config).await;
    let secure = secure_addr(&baton).await;
    let tls = pki.ca.client_offering(&[b"http/1.1"]).expect("client");
    let url = format!("http://{origin}/bytes?n=10");
    let mut idle = Vec::new();
    for _ in 0..1000 {
        let mut c = ProxyConnection::open_via(secure, Some(&tls)).await.expect("TLS client");
        assert_eq!(c.get(&url).await.expect("GET").1.len(), 10, "its first request");
        idle.push(c);
    }
    let mut tunnels = Vec::new();
    for _ in 0..100 {
        let mut t = testkit::client::open_tunnel_via(secure, echo, Some(&tls))
            .await
            .expect("tunnel");
        // A first round trip: a tunnel relays (and can move) once its first bytes were
        // read (a tunnel still waiting for them is held by the SNI check, `sni_wait`).
        ping(&mut t).await;
        tunnels.push(t);
    }
    let report = upgrade_waiting(&baton);
    let drain = &report["drain"];
    println!(
        "1,000 idle TLS clients + 100 TLS tunnels: verdict to drained in {} ms ({report})",
        drain["drain_ms"]
    );
    assert_eq!(drain["tls_moved"], 1100, "every one moved with its keys: {report}");
    assert_eq!(drain["cut"], 0, "{report}");
    for c in idle.iter_mut().step_by(50) {
        assert_eq!(c.get(&url).await.expect("GET after the move").1.len(), 10);
    }
    for t in tunnels.iter_mut().step_by(10) {
        ping(t).await;
    }
}

/// One round trip of `ping` through an echo tunnel.
async fn ping<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(t: &mut S) {
    use tokio::io::AsyncWriteExt as _;
    t.write_all(b"ping").await.expect("write");
    let mut back = [0u8; 4];
    let read = tokio::time::timeout(Duration::from_secs(10), t.read_exact(&mut back)).await;
    read.expect("an echo within 10 s").expect("echo");
    assert_eq!(&back, b"ping", "the tunnel echoes");
}
