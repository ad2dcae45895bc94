//! TLS inspection (`[inspect]`, rule actions `bump` and `splice`) through the real binary,
//! against loopback HTTPS origins whose own test CA is baton's `origin_roots`: curl, Python
//! `requests` and headless Chromium trusting only the inspection CA get answers from the
//! origin through the bump; a `paths` rule refuses inside the TLS; the access log names
//! `https://` URLs; origins with an expired certificate or one for another name get a 502
//! naming the reason; a `splice` rule relays the origin's own certificate; 20 handoffs under
//! bumped keep-alive load fail no request.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use baton::control::{self, Event, Request};
use common::{Baton, curl, testkit};
use testkit::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DAY: Duration = Duration::from_secs(86_400);
const STOP: Duration = Duration::from_secs(20);

/// Two CAs (the origins' and baton's inspection CA, told apart by name) and their files.
struct Pki {
    dir: tempfile::TempDir,
    origin_ca: TestCa,
    origin_ca_pem: PathBuf,
    inspect_ca_pem: PathBuf,
    inspect_ca_key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().expect("tempdir");
        let origin_ca = TestCa::named("origin test CA").expect("origin CA");
        let inspect_ca = TestCa::named("baton inspection CA").expect("inspection CA");
        let origin_ca_pem = dir.path().join("origin-ca.pem");
        let inspect_ca_pem = dir.path().join("inspect-ca.pem");
        let inspect_ca_key = dir.path().join("inspect-ca.key");
        origin_ca.write_ca(&origin_ca_pem).expect("write");
        inspect_ca.write_ca(&inspect_ca_pem).expect("write");
        inspect_ca.write_key(&inspect_ca_key).expect("write");
        Pki {
            dir,
            origin_ca,
            origin_ca_pem,
            inspect_ca_pem,
            inspect_ca_key,
        }
    }

    /// An origin whose leaf (for 127.0.0.1 and localhost) is valid from `from` to `to`.
    async fn origin(&self, names: &[&str], from: SystemTime, to: SystemTime) -> SocketAddr {
        let leaf = self.origin_ca.leaf_for(names, 7, from, to).expect("leaf");
        testkit::start_tls_origin(&leaf).await.expect("TLS origin")
    }

    fn ca(&self) -> &str {
        self.inspect_ca_pem.to_str().expect("utf-8")
    }

    /// `[inspect]` and the rules: `/admin` denied, localhost bumped, 127.0.0.1 spliced.
    fn config(&self, ports: &[u16]) -> String {
        let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
        format!(
            "[inspect]\nca_cert = \"{}\"\nca_key = \"{}\"\norigin_roots = [\"{}\"]\n\n\
             [access]\nconnect_ports = [{}]\n\n\
             [[access.rule]]\nname = \"no-admin\"\naction = \"deny\"\npaths = [\"/admin\"]\n\n\
             [[access.rule]]\nname = \"inspect-localhost\"\naction = \"bump\"\nhosts = [\"localhost\"]\n\n\
             [[access.rule]]\nname = \"relay-address\"\naction = \"splice\"\nhosts = [\"127.0.0.1\"]\n",
            self.inspect_ca_pem.display(),
            self.inspect_ca_key.display(),
            self.origin_ca_pem.display(),
            ports.join(", ")
        )
    }
}

fn now_and_in(valid: Duration) -> (SystemTime, SystemTime) {
    let now = SystemTime::now();
    (now - Duration::from_secs(3600), now + valid)
}

/// curl through `baton` to `url`, trusting only the inspection CA: (status, body, stderr).
fn curl_bumped(baton: &Baton, pki: &Pki, url: &str, extra: &[&str]) -> (u16, Vec<u8>, String) {
    let proxy = format!("http://{}", baton.proxy);
    let mut args = vec!["-x", &proxy, "--cacert", pki.ca(), "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(url);
    let (_, mut out, err) = curl(&args);
    let at = out.iter().rposition(|b| *b == b'\n').unwrap_or(0);
    let status = String::from_utf8_lossy(&out[at..]).trim().parse().unwrap_or(0);
    out.truncate(at);
    (status, out, err)
}

/// Waits until the access log has a line containing every one of `texts`; returns it.
async fn access_line(baton: &Baton, texts: &[&str]) -> String {
    common::wait_for(Duration::from_secs(10), &format!("a line with {texts:?}"), || async {
        let log = baton.log();
        log.lines()
            .find(|l| l.contains("baton::access") && texts.iter().all(|t| l.contains(t)))
            .map(str::to_string)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bumped_requests_are_served_checked_and_logged_as_https() {
    let pki = Pki::new();
    let (from, to) = now_and_in(30 * DAY);
    let origin = pki.origin(&["127.0.0.1", "localhost"], from, to).await;
    let mut baton = Baton::start(&pki.config(&[origin.port()])).await;
    let base = format!("https://localhost:{}", origin.port());

    let n = 1 << 20;
    let (status, body, err) = curl_bumped(&baton, &pki, &format!("{base}/bytes?n={n}"), &[]);
    assert_eq!(
        status,
        200,
        "GET through the bump (curl trusts only baton's CA): {err}\n{}",
        baton.log()
    );
    assert_eq!(body.len(), n, "the whole body");
    assert!(body == testkit::pattern(n), "the origin's bytes, unchanged");

    let upload = testkit::pattern(n);
    let file = pki.dir.path().join("upload");
    std::fs::write(&file, &upload).expect("upload file");
    let data = format!("@{}", file.display());
    let (status, body, err) = curl_bumped(&baton, &pki, &format!("{base}/sha256"), &["--data-binary", &data]);
    let answer = String::from_utf8_lossy(&body);
    assert_eq!(status, 200, "POST through the bump: {err}");
    assert!(
        answer.starts_with(&format!("{} {n}", testkit::sha256_hex(&upload))),
        "the origin received the 1 MiB body intact: {answer}"
    );

    // The access line names the full https:// URL and the rule that allowed the request.
    let line = access_line(&baton, &[&format!("{base}/bytes?n={n}"), "status=200"]).await;
    assert!(line.contains("https://"), "{line}");

    // A `paths` rule refuses inside the TLS, with its reason; /bytes (above) was allowed.
    let (status, body, _) = curl_bumped(&baton, &pki, &format!("{base}/admin/users"), &[]);
    let reason = String::from_utf8_lossy(&body);
    assert_eq!(
        status, 403,
        "the paths rule denies /admin inside the bumped TLS: {reason}"
    );
    assert!(reason.contains("no-admin"), "the reason names the rule: {reason}");
    access_line(&baton, &[&format!("{base}/admin/users"), "status=403", "no-admin"]).await;

    // A client that does not trust baton's CA (as a pinned app) refuses the leaf with an
    // alert: logged with its server name, as a reason to splice it.
    let proxy = format!("http://{}", baton.proxy);
    let (ok, _, err) = curl(&["-x", &proxy, &format!("{base}/bytes?n=10")]);
    assert!(!ok, "curl with the system's roots refuses baton's leaf: {err}");
    access_line(&baton, &["bumped localhost", "refused the minted certificate"]).await;

    // The origin saw baton's Via, as any proxied request.
    let (_, body, _) = curl_bumped(&baton, &pki, &format!("{base}/headers"), &[]);
    let headers = String::from_utf8_lossy(&body).to_ascii_lowercase();
    assert!(headers.contains("via: 1.1 "), "Via added: {headers}");
    baton.stop(STOP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origins_that_fail_verification_get_502_naming_the_reason() {
    let pki = Pki::new();
    let now = SystemTime::now();
    let good = pki.origin(&["localhost"], now - DAY, now + 30 * DAY).await;
    let expired = pki.origin(&["localhost"], now - 30 * DAY, now - DAY).await;
    let wrong = pki.origin(&["other.example"], now - DAY, now + 30 * DAY).await;
    let mut baton = Baton::start(&pki.config(&[good.port(), expired.port(), wrong.port()])).await;

    let url = |o: SocketAddr| format!("https://localhost:{}/bytes?n=10", o.port());
    let (status, _, err) = curl_bumped(&baton, &pki, &url(good), &[]);
    assert_eq!(status, 200, "the witness: a valid origin answers: {err}");
    for (origin, why) in [(expired, "expired"), (wrong, "not valid for")] {
        let (status, body, _) = curl_bumped(&baton, &pki, &url(origin), &[]);
        let reason = String::from_utf8_lossy(&body).to_ascii_lowercase();
        assert_eq!(
            status, 502,
            "an origin whose certificate fails ({why}) is a 502: {reason}"
        );
        assert!(
            reason.contains("invalid peer certificate") && reason.contains(why),
            "the 502 names the verification error ({why}): {reason}"
        );
    }
    baton.stop(STOP).await;
}

/// `openssl s_client` through baton's CONNECT (`-proxy`) to `target`; its output.
fn s_client_via(baton: &Baton, target: &str, servername: Option<&str>, ca: &str) -> String {
    let mut cmd = Command::new("openssl");
    cmd.args([
        "s_client",
        "-proxy",
        &baton.proxy.to_string(),
        "-connect",
        target,
        "-CAfile",
        ca,
    ]);
    match servername {
        Some(name) => cmd.args(["-servername", name]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd.stdin(Stdio::null()).output().expect("openssl must be installed");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_splice_rule_relays_the_origins_own_certificate() {
    let pki = Pki::new();
    let (from, to) = now_and_in(30 * DAY);
    let origin = pki.origin(&["127.0.0.1", "localhost"], from, to).await;
    let mut baton = Baton::start(&pki.config(&[origin.port()])).await;
    let origin_ca = pki.origin_ca_pem.to_str().unwrap();

    // 127.0.0.1 is spliced: the origin's own certificate, issued by the origin CA.
    let spliced = s_client_via(&baton, &format!("127.0.0.1:{}", origin.port()), None, origin_ca);
    assert!(
        spliced.contains("origin test CA"),
        "spliced: the origin's issuer: {spliced}"
    );
    assert!(spliced.contains("Verify return code: 0 (ok)"), "{spliced}");
    // The witness: localhost is bumped, and the same tool sees baton's CA as issuer.
    let target = format!("localhost:{}", origin.port());
    let bumped = s_client_via(&baton, &target, Some("localhost"), pki.ca());
    assert!(
        bumped.contains("baton inspection CA"),
        "bumped: baton's issuer: {bumped}"
    );
    assert!(bumped.contains("Verify return code: 0 (ok)"), "{bumped}");
    assert!(!bumped.contains("origin test CA"), "{bumped}");
    baton.stop(STOP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_requests_trusting_the_ca_goes_through_the_bump() {
    let pki = Pki::new();
    let (from, to) = now_and_in(30 * DAY);
    let origin = pki.origin(&["localhost"], from, to).await;
    let mut baton = Baton::start(&pki.config(&[origin.port()])).await;
    let url = format!("https://localhost:{}/bytes?n=4096", origin.port());
    let script = "import os, sys, requests\n\
                  r = requests.get(sys.argv[1], proxies={'https': sys.argv[2]}, timeout=20)\n\
                  print(r.status_code, len(r.content))";
    let out = Command::new("python3")
        .args(["-c", script, &url, &format!("http://{}", baton.proxy)])
        .env("REQUESTS_CA_BUNDLE", pki.ca())
        .output()
        .expect("python3 with requests (.ci/run installs it)");
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        "200 4096",
        "requests trusting baton's CA: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    access_line(&baton, &[&url, "status=200"]).await;
    baton.stop(STOP).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chromium_trusting_the_leaf_loads_a_page_through_the_bump() {
    let pki = Pki::new();
    let (from, to) = now_and_in(30 * DAY);
    let origin = pki.origin(&["localhost"], from, to).await;
    let mut baton = Baton::start(&pki.config(&[origin.port()])).await;
    // The leaf baton minted for localhost (kept in its cache): what Chromium is told to trust.
    let shown = s_client_via(
        &baton,
        &format!("localhost:{}", origin.port()),
        Some("localhost"),
        pki.ca(),
    );
    let leaf = pki.dir.path().join("leaf.pem");
    let begin = shown
        .find("-----BEGIN CERTIFICATE-----")
        .expect("s_client shows the leaf");
    let end = shown.find("-----END CERTIFICATE-----").expect("its end") + 25;
    std::fs::write(&leaf, &shown[begin..end]).expect("write leaf");
    let spki = testkit::browser::spki_hash(&leaf).expect("SPKI hash");
    let url = format!("https://localhost:{}/page?n=10", origin.port());
    let proxy = format!("http://{}", baton.proxy);
    let (dom, stderr) = tokio::task::spawn_blocking(move || testkit::browser::dump_dom_through(&proxy, &spki, &url))
        .await
        .unwrap()
        .expect("chromium runs");
    assert!(
        dom.contains("<title>done 10</title>"),
        "every sub-resource loaded through the bump: {dom:.300}\n{stderr}"
    );
    let image = format!("https://localhost:{}/bytes?n=100&i=9", origin.port());
    access_line(&baton, &[&image, "status=200"]).await;
    baton.stop(STOP).await;
}

/// The base64 SHA-256 of a certificate's public key (what Chromium's SPKI list takes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_handoffs_under_bumped_keep_alive_load_fail_no_request() {
    let pki = Pki::new();
    let (from, to) = now_and_in(30 * DAY);
    let origin = pki.origin(&["localhost"], from, to).await;
    let extra = format!("{}\n[timeouts]\ndrain = \"10s\"\n", pki.config(&[origin.port()]));
    let mut baton = Baton::start(&extra).await;
    let load = BumpLoad::start(baton.proxy, origin.port(), &pki.inspect_ca_pem, 6);
    for round in 0..20 {
        let before = load.ok.load(Ordering::Relaxed);
        let mut last = None;
        control::events(&baton.control, Request::Upgrade { wait_drain: false }, |e| {
            last = Some(e)
        })
        .await
        .expect("control socket");
        match &last {
            Some(Event::Done(r)) => assert!(r.draining_bumped_connections.is_some(), "{r:?}"),
            other => panic!("round {round}: {other:?}\n{}", baton.log()),
        }
        common::wait_for(Duration::from_secs(10), "requests after the handoff", || async {
            (load.ok.load(Ordering::Relaxed) >= before + 50).then_some(())
        })
        .await;
    }
    let (ok, failed, errors) = load.finish().await;
    println!("20 handoffs under bumped load: {ok} ok, {failed} failed");
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 1000, "the load ran throughout: {ok}");
    baton.stop(STOP).await;
}

/// Keep-alive clients inside bumped tunnels: each CONNECTs to localhost, trusts only the
/// inspection CA, and sends GETs until a response closes the connection (a draining
/// generation's), then opens a new tunnel. A request that fails is counted with its error.
struct BumpLoad {
    ok: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl BumpLoad {
    fn start(proxy: SocketAddr, port: u16, ca: &std::path::Path, workers: usize) -> BumpLoad {
        let pem = std::fs::read_to_string(ca).expect("CA");
        let tls = testkit::ProxyTls::trusting(&pem, &[b"http/1.1"]).expect("client");
        let (ok, stop) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let workers = (0..workers)
            .map(|_| {
                let (tls, ok, stop) = (tls.clone(), ok.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut errors = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        if let Err(e) = one_tunnel(proxy, port, &tls, &ok, &stop).await {
                            errors.push(e);
                        }
                    }
                    errors
                })
            })
            .collect();
        BumpLoad { ok, stop, workers }
    }

    async fn finish(self) -> (u64, usize, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for w in self.workers {
            errors.extend(w.await.expect("worker"));
        }
        (self.ok.load(Ordering::Relaxed), errors.len(), errors)
    }
}

/// One tunnel's requests, until the proxy closes it or the load stops.
async fn one_tunnel(
    proxy: SocketAddr,
    port: u16,
    tls: &testkit::ProxyTls,
    ok: &AtomicU64,
    stop: &AtomicBool,
) -> Result<(), String> {
    let mut tcp = tokio::net::TcpStream::connect(proxy)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let head = format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tcp.read(&mut byte).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err(format!("CONNECT closed: {}", String::from_utf8_lossy(&answer)));
        }
        answer.push(byte[0]);
    }
    if !answer.starts_with(b"HTTP/1.1 200") {
        return Err(format!("CONNECT: {}", String::from_utf8_lossy(&answer)));
    }
    let stream = tls
        .connect_as("localhost", tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    while !stop.load(Ordering::Relaxed) {
        if sender.ready().await.is_err() {
            return Ok(()); // closed after a `Connection: close` answer: a new tunnel
        }
        let req = http::Request::get("/bytes?n=1024")
            .header("host", format!("localhost:{port}"))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .expect("request");
        let resp = sender.send_request(req).await.map_err(|e| format!("request: {e}"))?;
        let closing = resp.headers().get("connection").is_some_and(|v| v == "close");
        let status = resp.status();
        let body = http_body_util::BodyExt::collect(resp.into_body())
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        if status != 200 || body.len() != 1024 {
            return Err(format!("answer {status} with {} bytes", body.len()));
        }
        ok.fetch_add(1, Ordering::Relaxed);
        if closing {
            return Ok(());
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_an_inspection_ca_that_is_not_a_ca_and_warns_of_one_expiring() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let good = dir.join("good.toml");
    std::fs::write(&good, common::config_text(dir, &pki.config(&[443]))).expect("config");
    let (ok, out) = common::check_config(&good);
    assert!(ok, "the witness: the inspection CA passes: {out}");
    assert!(
        out.contains("inspection CA") && out.contains("baton inspection CA"),
        "{out}"
    );
    assert!(
        !out.contains("warning: the inspection CA expires"),
        "the witness for the expiry warning: a CA valid for years gets none: {out}"
    );
    // A CA with 10 days left still passes (its leaves are valid until then) but is warned of,
    // since every client must be given its successor first. Ten and a half days, so that the
    // whole days counted are 10 whatever the seconds the certificate's time drops.
    let soon = TestCa::named_until("short-lived CA", SystemTime::now() + 10 * DAY + DAY / 2).expect("CA");
    soon.write_ca(&pki.inspect_ca_pem).expect("write");
    soon.write_key(&pki.inspect_ca_key).expect("write");
    let (ok, out) = common::check_config(&good);
    assert!(ok, "a CA with 10 days left is still usable: {out}");
    assert!(
        out.contains("warning: the inspection CA expires in 10 days"),
        "under 30 days left is warned of, with the days the check line counts: {out}"
    );
    // A leaf (no basicConstraints CA:TRUE) with its own key, in the CA's place.
    let (from, to) = now_and_in(30 * DAY);
    let leaf = pki.origin_ca.leaf_for(&["localhost"], 9, from, to).expect("leaf");
    std::fs::write(dir.join("leaf.pem"), &leaf.cert_pem).expect("leaf");
    testkit::write_secret(&dir.join("leaf.key"), &leaf.key_pem).expect("key");
    let text = pki
        .config(&[443])
        .replace("inspect-ca.pem", "leaf.pem")
        .replace("inspect-ca.key", "leaf.key");
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, common::config_text(dir, &text)).expect("config");
    let (ok, out) = common::check_config(&bad);
    assert!(!ok, "a leaf is no CA: {out}");
    assert!(out.contains("not a CA certificate"), "the reason names it: {out}");
    // A CA key others may read is refused, naming the file.
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(&pki.inspect_ca_key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, out) = common::check_config(&good);
    assert!(
        !ok && out.contains("inspect-ca.key") && out.contains("mode 0644"),
        "{out}"
    );
}

/// `CONNECT localhost:port` through `proxy`, TLS inside trusting `tls`'s roots, `raw` sent
/// as it is; everything read until the proxy closes.
async fn raw_inside_bump(proxy: SocketAddr, port: u16, tls: &testkit::ProxyTls, raw: &[u8]) -> String {
    let mut tcp = tokio::net::TcpStream::connect(proxy).await.expect("connect");
    let head = format!("CONNECT localhost:{port} HTTP/1.1\r\nHost: localhost:{port}\r\n\r\n");
    tcp.write_all(head.as_bytes()).await.expect("CONNECT");
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        assert_eq!(tcp.read(&mut byte).await.expect("read"), 1, "CONNECT answered");
        answer.push(byte[0]);
    }
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    let mut inside = tls.connect_as("localhost", tcp).await.expect("TLS inside");
    inside.write_all(raw).await.expect("send");
    let mut all = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), inside.read_to_end(&mut all)).await;
    assert!(
        read.is_ok(),
        "the proxy closed within 10 s: {}",
        String::from_utf8_lossy(&all)
    );
    String::from_utf8_lossy(&all).into_owned()
}

/// Requests inside a bumped tunnel meet the same framing rules as a plain connection's: a
/// Content-Length beside Transfer-Encoding (smuggling) and a broken chunk line get 400 naming
/// the fault, and the connection closes. The witness: a well-formed chunked POST on the same
/// path reaches the origin whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_inside_the_bump_are_held_to_the_framing_rules() {
    let pki = Pki::new();
    let (from, to) = now_and_in(30 * DAY);
    let origin = pki.origin(&["localhost"], from, to).await;
    let baton = Baton::start(&pki.config(&[origin.port()])).await;
    let pem = std::fs::read_to_string(&pki.inspect_ca_pem).expect("CA");
    let tls = testkit::ProxyTls::trusting(&pem, &[b"http/1.1"]).expect("client");
    let port = origin.port();
    let post = |framing: &str, body: &str| {
        format!("POST /sha256 HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n{framing}\r\n{body}")
            .into_bytes()
    };
    let good = raw_inside_bump(
        baton.proxy,
        port,
        &tls,
        &post("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
    )
    .await;
    let hash = testkit::sha256_hex(b"hello");
    assert!(
        good.starts_with("HTTP/1.1 200") && good.contains(&format!("{hash} 5")),
        "witness: {good}"
    );
    for (framing, body, fault) in [
        (
            "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
            "5\r\nhello\r\n0\r\n\r\n",
            "Transfer-Encoding",
        ),
        ("Transfer-Encoding: chunked\r\n", "0_2e\r\n\r\n", "invalid chunk size"),
    ] {
        let got = raw_inside_bump(baton.proxy, port, &tls, &post(framing, body)).await;
        assert!(
            got.starts_with("HTTP/1.1 400") && got.contains(fault),
            "{framing:?} {body:?}: 400 naming {fault}: {got}"
        );
    }
}

/// A bumped request whose host `[upstream]` routes to a parent reaches its origin through the
/// parent's CONNECT, TLS inside it still verified against `origin_roots`; the access line
/// names the parent, and the parent logged the CONNECT. The witness for "through": the
/// parent's own line for `CONNECT localhost:port`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bumped_request_routed_to_a_parent_goes_through_its_connect() {
    let pki = Pki::new();
    let (from, to) = now_and_in(30 * DAY);
    let origin = pki.origin(&["localhost"], from, to).await;
    let parent = Baton::start(&common::connect_ports(&[origin.port()])).await;
    let extra = format!(
        "{}\n[upstream]\nproxy = \"http://{}\"\n",
        pki.config(&[origin.port()]),
        parent.proxy
    );
    let baton = Baton::start(&extra).await;
    let url = format!("https://localhost:{}/bytes?n=4096", origin.port());
    let (status, body, err) = curl_bumped(&baton, &pki, &url, &[]);
    assert_eq!(
        (status, body.len()),
        (200, 4096),
        "through the bump and the parent: {err}"
    );
    let named = format!("parent=\"{}\"", parent.proxy);
    let line = access_line(&baton, &[&url, "status=200"]).await;
    assert!(line.contains(&named), "the line names the parent: {line}");
    let connect = format!("target=localhost:{}", origin.port());
    let seen = common::wait_for(Duration::from_secs(10), "the parent's CONNECT line", || async {
        let log = parent.log();
        log.lines()
            .find(|l| l.contains("baton::access") && l.contains(&connect))
            .map(str::to_string)
    })
    .await;
    assert!(seen.contains("method=CONNECT"), "{seen}");
}

/// A WebSocket inside a bumped tunnel (aiohttp with the proxy configured, trusting only the
/// inspection CA: `CONNECT`, TLS to baton's leaf, then the upgrade): the origin's 101 over
/// its own TLS is relayed, 1,000 messages echo in order, and the line is the upgrade's,
/// with the `https://` URL and the bytes both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_inside_the_bump_echoes_and_is_logged_as_its_upgrade() {
    let pki = Pki::new();
    let (from, to) = now_and_in(30 * DAY);
    let leaf = pki.origin_ca.leaf_for(&["localhost"], 8, from, to).expect("leaf");
    let origin = testkit::websocket::start_tls_echo(&leaf).await.expect("wss origin");
    let mut baton = Baton::start(&pki.config(&[origin.port()])).await;
    let proxy = format!("http://{}", baton.proxy);
    let url = format!("wss://localhost:{}/inside", origin.port());
    let (script, ca) = (
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ws_client.py"),
        pki.ca().to_string(),
    );
    let aiohttp = |url: String| {
        let args = [script, proxy.as_str(), url.as_str(), "1000", ca.as_str()].map(str::to_string);
        tokio::task::spawn_blocking(move || {
            let out = Command::new("python3")
                .args(args)
                .output()
                .expect("python3 runs (aiohttp is installed by .ci/run)");
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            (out.status.success(), said)
        })
    };
    let (ok, said) = aiohttp(url).await.unwrap();
    assert!(
        ok && said.contains("echoed 1000"),
        "aiohttp's wss:// through the bump: {said}\n{}",
        baton.log()
    );
    // The rules apply inside: the `paths` rule refuses the upgrade to /admin before any origin.
    let (ok, said) = aiohttp(format!("wss://localhost:{}/admin/ws", origin.port()))
        .await
        .unwrap();
    assert!(
        !ok && said.contains("403"),
        "the no-admin rule refuses the switch: {said}"
    );
    let https = format!("https://localhost:{}/inside", origin.port());
    let line = access_line(&baton, &[&https, "status=101", "outcome="]).await;
    let bytes = |key: &str| -> u64 {
        line.split_whitespace()
            .find_map(|f| f.strip_prefix(key))
            .and_then(|v| v.trim_matches('"').parse().ok())
            .unwrap_or(0)
    };
    // 1,000 messages each way ("aiohttp message N": 17-19 bytes, and a frame head).
    assert!(
        bytes("bytes_in=") > 17_000 && bytes("bytes_out=") > 17_000,
        "the frames are counted both ways on the upgrade's line: {line}"
    );
    // The CONNECT's own line says the bump served the upgrade inside it.
    access_line(&baton, &["bumped localhost", "1 requests served inside"]).await;
    baton.stop(STOP).await;
}
