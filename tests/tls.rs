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
async fn tls_connections_drain_and_are_counted_apart_while_plain_ones_move() {
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
    for c in [&mut over_tls, &mut plain] {
        assert_eq!(c.get(&url).await.expect("GET").1.len(), 100);
    }
    let (ok, out) = baton.cli(&["upgrade", "--json", "--wait-drain"]);
    assert!(ok, "{out}");
    let report: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(report["draining_connections"], 2, "{report}");
    assert_eq!(report["draining_tls_connections"], 1, "{report}");
    assert_eq!(report["drain"]["cut"], 0, "{report}");
    assert_eq!(report["drain"]["moved"], 1, "{report}");
    // The TLS connection was closed by the drain, between requests (its session state
    // cannot move); the plain one moved, and the new generation serves it.
    common::wait_for(Duration::from_secs(5), "the drained TLS connection to close", || {
        let closed = over_tls.is_closed();
        async move { closed.then_some(()) }
    })
    .await;
    assert!(!plain.is_closed(), "the plain connection was closed");
    assert_eq!(plain.get(&url).await.expect("GET after the move").1.len(), 100);
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
