//! The status page (`GET /` on the admin listener) in a real headless Chromium, driven over
//! the DevTools protocol so that the page's own refresh script runs: under client load, with a
//! slow request and a tunnel in flight, a handoff must show generation 1 draining and then
//! gone, the handoff on the timeline with its phases, and every request in the history.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::testkit::{Browser, Load, LoadSpec, ProxyConnection};
use common::{Baton, alive, connect_ports, listener_addr, testkit, wait_for};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A tag with markup: the page must show it as text.
const TAG: &str = "<b id=\"injected\">build</b>";
const SLOW_BODY: usize = 50_000;
const ERRORS: u64 = 3;

/// Runs `f` with the browser off the async scheduler's cooperative budget (the driver blocks).
fn with<T>(browser: &mut Browser, f: impl FnOnce(&mut Browser) -> anyhow::Result<T>) -> T {
    tokio::task::block_in_place(|| f(browser)).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Where screenshots go: `target/status-page/` (the directory above the test binary's profile).
fn screenshot_path(name: &str) -> PathBuf {
    let bin = PathBuf::from(common::BATON);
    let target = bin.parent().and_then(|p| p.parent()).expect("target directory");
    let dir = target.join("status-page");
    std::fs::create_dir_all(&dir).expect("screenshot directory");
    dir.join(name)
}

/// Saves a screenshot and checks it is a PNG of the page's width with some content.
fn save_screenshot(browser: &mut Browser, name: &str) -> PathBuf {
    let png = with(browser, |b| b.screenshot());
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!(width, 1280, "screenshot width");
    assert!(height >= 700, "screenshot height {height}");
    assert!(
        png.len() > 20_000,
        "a {}-byte screenshot is too small to show the page",
        png.len()
    );
    let path = screenshot_path(name);
    std::fs::write(&path, &png).expect("write screenshot");
    eprintln!("screenshot: {} ({} bytes, {width}x{height})", path.display(), png.len());
    path
}

/// Sends a GET for a slow answer on a connection of its own and returns the stream once the
/// request is written: from its first byte it belongs to generation 1.
async fn send_slow(proxy: SocketAddr, origin: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let url = format!("http://{origin}/slow?ms=7000&n={SLOW_BODY}");
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

async fn finish_slow(mut s: TcpStream) {
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer))
        .await
        .expect("the slow answer within 20 s")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.starts_with("HTTP/1.1 200"),
        "{}",
        text.lines().next().unwrap_or("")
    );
    let body = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(answer.len() - body, SLOW_BODY, "the slow answer must arrive whole");
}

/// `n` requests to a closed port: each answered 502 (an error in the history).
async fn bad_gateway(proxy: SocketAddr, n: u64) {
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let mut c = ProxyConnection::open(proxy).await.unwrap();
    for _ in 0..n {
        let (status, _) = c.get(&format!("http://{closed}/")).await.unwrap();
        assert_eq!(status.as_u16(), 502);
    }
}

fn number(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().unwrap_or(f64::NAN),
        Value::String(s) => s.parse().unwrap_or(f64::NAN),
        _ => f64::NAN,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_status_page_follows_a_handoff_under_load() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let extra = format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n\n{}\n[timeouts]\ndrain = \"20s\"\ncanary = \"3s\"\n",
        connect_ports(&[echo.port()])
    );
    let baton = Baton::start_program(std::path::Path::new(common::BATON), &extra, &["--tag", TAG]).await;
    // The tunnel stays with generation 1 (not moved), so the page shows it draining there.
    baton.set_top_level("migrate = false");
    let old = baton.pid();
    let admin = listener_addr(&baton.status().await, "admin");
    let spec = LoadSpec::new(format!("http://{origin}/bytes?n=2048"))
        .body_len(2048)
        .pause(Duration::from_millis(2));
    let load = Load::start(baton.proxy, spec);
    bad_gateway(baton.proxy, ERRORS).await;

    let mut browser = with_launch();
    with(&mut browser, |b| b.open(&format!("http://{admin}/"), 1280, 900));
    page_shows_generation_one(&mut browser);

    // Held across the handoff: a slow request and a tunnel.
    let slow = send_slow(baton.proxy, origin).await;
    let mut tunnel = testkit::open_tunnel(baton.proxy, echo).await.unwrap();
    tunnel.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tunnel.read_exact(&mut pong).await.unwrap();

    let upgrade = tokio::task::spawn_blocking({
        let control = baton.control.clone();
        move || common::cli_at(&control, &["upgrade", "--json"])
    });
    page_shows_the_canary_window(&mut browser, old);
    let (ok, out) = upgrade.await.unwrap();
    assert!(ok, "{out}");
    let shot = page_shows_the_drain(&mut browser);

    drop(tunnel);
    finish_slow(slow).await;
    wait_for(Duration::from_secs(20), "generation 1 to exit", || async {
        (!alive(old)).then_some(())
    })
    .await;
    page_shows_the_drain_ended(&mut browser);

    let report = load.finish().await;
    assert!(report.is_clean(), "client failures during the handoff: {report}");
    // Every request baton answered: the load's, the 502s, the slow one and the tunnel.
    let expected = report.ok + ERRORS + 2;
    page_counts_every_request(&mut browser, expected);
    save_screenshot(&mut browser, "after-handoff.png");
    eprintln!(
        "{report}; the page counted {expected} requests; screenshot during the handoff: {}",
        shot.display()
    );
}

fn with_launch() -> Browser {
    tokio::task::block_in_place(Browser::launch).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The script ran (more than once), shows generation 1 serving, the tag as text, and the
/// first requests and errors in the history.
fn page_shows_generation_one(browser: &mut Browser) {
    let t = Duration::from_secs(15);
    with(browser, |b| {
        b.wait_for(
            r#"document.querySelector('tr.generation[data-state="serving"][data-generation="1"]') !== null"#,
            t,
            "generation 1 serving on the page",
        )?;
        let version = b.eval(r#"document.querySelector('[data-fact="version"]').textContent"#)?;
        anyhow::ensure!(
            version.as_str().is_some_and(|v| v.contains(TAG)),
            "tag not shown as text: {version}"
        );
        let injected = b.eval("document.getElementById('injected') === null")?;
        anyhow::ensure!(injected == Value::Bool(true), "the tag's markup became an element");
        b.wait_for(
            "Number(document.getElementById('traffic').dataset.totalServerErrors) >= 3 \
             && Number(document.getElementById('traffic').dataset.totalRequests) > 20",
            t,
            "requests and 502s in the history",
        )?;
        b.wait_for("Number(document.body.dataset.polls) >= 3", t, "three refreshes")?;
        Ok(())
    });
}

/// Generation 2 answers in its canary window, and says that generation 1 watches it.
fn page_shows_the_canary_window(browser: &mut Browser, old: u32) {
    let expr = format!(
        r#"document.querySelector('tr.generation[data-state="watching"][data-generation="1"][data-pid="{old}"]') !== null
           && document.querySelector('tr.generation[data-state="serving"][data-generation="2"]') !== null
           && document.querySelector('li.handoff[data-result="in_progress"][data-new-generation="2"]') !== null"#
    );
    with(browser, |b| {
        b.wait_for(
            &expr,
            Duration::from_secs(10),
            "generation 1 watching generation 2's canary window",
        )
    });
    save_screenshot(browser, "canary-window.png");
}

/// Generation 2 serves and generation 1 drains the slow request and the tunnel: screenshot.
fn page_shows_the_drain(browser: &mut Browser) -> PathBuf {
    let draining = with(browser, |b| {
        b.wait_for(
            r#"(() => {
                const d = document.querySelector('tr.generation[data-state="draining"][data-generation="1"]');
                const s = document.querySelector('tr.generation[data-state="serving"][data-generation="2"]');
                return d && s && d.dataset.tunnels === "1" ? { ...d.dataset } : null;
            })()"#,
            Duration::from_secs(10),
            "generation 1 draining its tunnel beside generation 2",
        )
    });
    assert!(number(&draining["connections"]) >= 1.0, "{draining}");
    // The last minute, and the drain phase running on the timeline, in the picture.
    with(browser, |b| {
        b.eval(r#"document.querySelector('#window button[data-window="60"]').click()"#)?;
        b.wait_for(
            r#"document.querySelector('li.handoff[data-result="ok"][data-new-generation="2"] .phase.drain.running') !== null"#,
            Duration::from_secs(10),
            "the handoff on the timeline, draining",
        )
    });
    save_screenshot(browser, "during-handoff.png")
}

/// Generation 1 is gone from the table; its handoff shows its phases and drain time.
fn page_shows_the_drain_ended(browser: &mut Browser) {
    let handoff = with(browser, |b| {
        b.wait_for(
            r#"document.querySelector('tr.generation[data-generation="1"]') === null"#,
            Duration::from_secs(10),
            "generation 1 gone from the page",
        )?;
        b.wait_for(
            r#"(() => {
                const h = document.querySelector('li.handoff[data-result="ok"][data-new-generation="2"]');
                return h && h.dataset.drainMs !== undefined ? { ...h.dataset } : null;
            })()"#,
            Duration::from_secs(10),
            "the handoff's drain time on the timeline",
        )
    });
    assert_eq!(number(&handoff["canaryMs"]), 3000.0, "{handoff}");
    assert!(number(&handoff["readyMs"]) >= 0.0, "{handoff}");
    assert!(
        number(&handoff["drainMs"]) >= 1000.0,
        "the slow request held the drain: {handoff}"
    );
    let total = with(browser, |b| {
        b.eval(r#"document.querySelector('#handoff-totals [data-result="ok"]').dataset.count"#)
    });
    assert_eq!(total, "1");
    let rows = with(browser, |b| b.eval("document.querySelectorAll('tr.generation').length"));
    assert_eq!(rows, 1);
}

/// The history adds up, across both generations, to what the clients were answered.
fn page_counts_every_request(browser: &mut Browser, expected: u64) {
    let expr = format!(
        "Number(document.getElementById('traffic').dataset.totalRequests) === {expected} \
         && Number(document.getElementById('traffic').dataset.totalServerErrors) === {ERRORS}"
    );
    let seen = with(browser, |b| {
        let r = b.wait_for(&expr, Duration::from_secs(10), "the history to count every request");
        let counts = b.eval("JSON.stringify(document.getElementById('traffic').dataset)")?;
        r.map_err(|e| e.context(format!("expected {expected} requests, page shows {counts}")))
    });
    assert_eq!(seen, Value::Bool(true));
}
