//! Operating baton: the admin listener (`/metrics`, `/healthz`, `/status`) across handoffs,
//! the upgrade report (`baton upgrade --json [--wait-drain]`), the access log and logrotate.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::testkit::{Load, LoadSpec};
use common::{Baton, alive, listener_addr, testkit, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const ADMIN: &str = "[admin]\naddress = \"127.0.0.1:0\"\n";

fn connect_port(port: u16) -> String {
    format!("[access]\nconnect_ports = [{port}]\n")
}

/// GET `path` from the admin listener on a new connection: (status, body).
async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let get = async {
        let mut s = tokio::net::TcpStream::connect(admin).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes())
            .await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&buf).into_owned())
    };
    let text = tokio::time::timeout(Duration::from_secs(10), get)
        .await
        .expect("admin answers within 10 s")
        .expect("admin request");
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad admin response: {text}"));
    (status, body.to_string())
}

async fn scrape(admin: SocketAddr) -> String {
    let (status, body) = admin_get(admin, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of the series whose line starts with `series` (name and labels, as encoded).
fn value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let rest = l.strip_prefix(series)?;
        let v = rest.strip_prefix(' ')?;
        v.trim().parse().ok()
    })
}

/// Sum of every series of `name` whose labels contain all of `labels` (`key="value"`).
fn sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').unwrap_or((series, ""));
            (n == name && labels.iter().all(|lab| rest.contains(lab))).then_some(())?;
            v.parse::<f64>().ok()
        })
        .sum()
}

/// Runs the `baton` CLI off the async runtime.
async fn cli(baton: &Baton, args: &[&str]) -> (bool, String) {
    let control = baton.control.clone();
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new(common::BATON)
            .args(&args)
            .arg("--control")
            .arg(&control)
            .output()
            .expect("run baton cli");
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    })
    .await
    .unwrap()
}

fn parse_report(out: &str) -> serde_json::Value {
    let line = out.lines().find(|l| l.starts_with('{')).unwrap_or("");
    serde_json::from_str(line).unwrap_or_else(|e| panic!("upgrade --json must print one JSON object ({e}): {out}"))
}

/// Clients in the background: a keep-alive connection and a new connection per request, both
/// fetching from `origin` until finished, a short pause between requests.
fn start_load(proxy: SocketAddr, origin: SocketAddr) -> Load {
    let spec = LoadSpec::new(format!("http://{origin}/bytes?n=2048"))
        .body_len(2048)
        .pause(Duration::from_millis(2));
    Load::start(proxy, spec)
}

async fn echo_through(tunnel: &mut TcpStream, msg: &[u8]) {
    tunnel.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut buf))
        .await
        .expect("echo within 5 s")
        .unwrap();
    assert_eq!(buf, msg);
}

/// `n` tunnels to `echo`, each checked with one message.
async fn open_tunnels(proxy: SocketAddr, echo: SocketAddr, n: usize, msg: &[u8]) -> Vec<TcpStream> {
    let mut tunnels = Vec::new();
    for _ in 0..n {
        let mut t = testkit::open_tunnel(proxy, echo).await.unwrap();
        echo_through(&mut t, msg).await;
        tunnels.push(t);
    }
    tunnels
}

const GET_2XX: [&str; 2] = ["method=\"GET\"", "status_class=\"2xx\""];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_follow_a_handoff_under_load() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let baton = Baton::start(&format!(
        "{ADMIN}[timeouts]\ndrain = \"20s\"\n\n{}",
        connect_port(echo.port())
    ))
    .await;
    // The tunnels stay with generation 1 (the new one is told not to take them), so that
    // generation 2 reports them draining.
    baton.set_top_level("migrate = false");
    let old = baton.pid();
    let admin = listener_addr(&baton.status().await, "admin");
    let load = start_load(baton.proxy, origin);
    // Three tunnels held open across the handoff.
    let tunnels = open_tunnels(baton.proxy, echo, 3, b"before").await;
    generation_one_counts_requests_and_tunnels(admin).await;

    let (ok, out) = cli(&baton, &["upgrade", "--json"]).await;
    assert!(ok, "{out}");
    let report = parse_report(&out);
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["draining_tunnels"], 3, "{report}");
    let new = report["new_pid"].as_u64().unwrap() as u32;

    // The scrape now reaches generation 2, which reports generation 1 draining its tunnels.
    let series = format!("baton_draining_tunnels{{pid=\"{old}\",generation=\"1\"}}");
    generation_two_reports_the_drain(admin, &series).await;
    let status = baton.status().await;
    assert_eq!(status["pid"], new);
    assert_eq!(status["draining"][0]["pid"], old, "{status}");
    assert_eq!(status["draining"][0]["tunnels"], 3, "{status}");

    close_tunnels_one_by_one(admin, tunnels, &series).await;
    wait_for(Duration::from_secs(10), "the old generation to exit", || async {
        (!alive(old)).then_some(())
    })
    .await;
    drain_is_recorded(admin, &series).await;

    let report = load.finish().await;
    assert!(report.is_clean(), "client failures during the handoff: {report}");
    assert!(report.ok > 20, "{report}");
}

/// Generation 1 counts requests and sees its three tunnels; `/healthz` says it serves.
async fn generation_one_counts_requests_and_tunnels(admin: SocketAddr) {
    let m = wait_for(Duration::from_secs(10), "requests counted by generation 1", || async {
        let m = scrape(admin).await;
        (sum(&m, "baton_requests_total", &GET_2XX) >= 10.0).then_some(m)
    })
    .await;
    assert_eq!(value(&m, "baton_generation"), Some(1.0), "{m}");
    assert_eq!(value(&m, "baton_tunnels"), Some(3.0), "{m}");
    assert!(value(&m, "baton_client_connections").unwrap() >= 1.0, "{m}");
    assert!(
        sum(&m, "baton_client_sent_bytes_total", &["kind=\"http\""]) >= 20480.0,
        "{m}"
    );
    assert!(m.contains("baton_request_duration_seconds_bucket"), "{m}");
    let (code, body) = admin_get(admin, "/healthz").await;
    assert_eq!((code, body.trim()), (200, "serving"));
}

/// Generation 2 serves the scrape, counts its own requests, and reports generation 1 (its
/// `series`) draining three tunnels.
async fn generation_two_reports_the_drain(admin: SocketAddr, series: &str) {
    let m = wait_for(Duration::from_secs(10), "generation 2 counting requests", || async {
        let m = scrape(admin).await;
        (value(&m, "baton_generation") == Some(2.0) && sum(&m, "baton_requests_total", &GET_2XX) >= 10.0).then_some(m)
    })
    .await;
    assert_eq!(value(&m, series), Some(3.0), "{m}");
    assert_eq!(value(&m, "baton_draining_generations"), Some(1.0), "{m}");
    assert_eq!(value(&m, "baton_tunnels"), Some(0.0), "{m}");
    assert_eq!(value(&m, "baton_handoffs_total{result=\"ok\"}"), Some(1.0), "{m}");
    assert_eq!(
        value(&m, "baton_handoff_phase_seconds_count{phase=\"spawn_to_ready\"}"),
        Some(1.0),
        "{m}"
    );
}

/// The old generation's tunnels still work; as they close, its count falls to zero.
async fn close_tunnels_one_by_one(admin: SocketAddr, tunnels: Vec<TcpStream>, series: &str) {
    let n = tunnels.len();
    for (i, mut t) in tunnels.into_iter().enumerate() {
        echo_through(&mut t, b"after").await;
        drop(t);
        let left = n - 1 - i;
        wait_for(
            Duration::from_secs(10),
            &format!("{left} draining tunnels reported"),
            || async {
                let m = scrape(admin).await;
                let v = value(&m, series);
                (v == Some(left as f64) || (left == 0 && v.is_none())).then_some(())
            },
        )
        .await;
    }
}

/// After the old generation exited: its drain is counted, nothing was cut.
async fn drain_is_recorded(admin: SocketAddr, series: &str) {
    let m = wait_for(Duration::from_secs(10), "the drain to be recorded", || async {
        let m = scrape(admin).await;
        (value(&m, "baton_handoff_phase_seconds_count{phase=\"drain\"}") == Some(1.0)).then_some(m)
    })
    .await;
    assert_eq!(value(&m, "baton_draining_generations"), Some(0.0), "{m}");
    assert!(value(&m, series).is_none(), "{m}");
    assert_eq!(
        value(&m, "baton_drained_connections_total{outcome=\"cut\"}"),
        Some(0.0),
        "{m}"
    );
    assert!(
        value(&m, "baton_drained_connections_total{outcome=\"finished\"}").unwrap() >= 3.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upgrade_report_matches_what_clients_did() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let baton = Baton::start(&format!(
        "{ADMIN}[timeouts]\ndrain = \"1500ms\"\n\n{}",
        connect_port(echo.port())
    ))
    .await;
    // Tunnels stay with the old generation (the new one is told `migrate = false`) so that
    // they drain and are cut as before; tests/migrate.rs covers the moving ones.
    baton.set_top_level("migrate = false");
    let old = baton.pid();
    let admin = listener_addr(&baton.status().await, "admin");

    // One idle keep-alive connection and three tunnels.
    let mut idle = testkit::ProxyConnection::open(baton.proxy).await.unwrap();
    let (st, _) = idle.get(&format!("http://{origin}/bytes?n=10")).await.unwrap();
    assert_eq!(st, 200);
    let mut tunnels = open_tunnels(baton.proxy, echo, 3, b"x").await;
    wait_for(Duration::from_secs(5), "the tunnels to be counted", || async {
        (baton.status().await["active_tunnels"] == 3).then_some(())
    })
    .await;

    let upgrade = spawn_upgrade_wait_drain(&baton);
    // Once the old generation drains (after the canary window), one tunnel ends by itself;
    // two stay until the cut.
    wait_for(Duration::from_secs(10), "the old generation to drain", || async {
        let st = baton.status().await;
        let draining = st["draining"]
            .as_array()
            .is_some_and(|d| d.iter().any(|g| g["pid"] == old));
        (st["pid"] != old && draining).then_some(())
    })
    .await;
    drop(tunnels.remove(0));
    let out = tokio::time::timeout(Duration::from_secs(20), upgrade)
        .await
        .expect("upgrade --wait-drain returns after the drain")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert_wait_drain_report(&parse_report(&text), old);

    cut_tunnels_are_closed_and_counted(admin, tunnels).await;
    upgrade_reports_without_waiting_for_the_drain(&baton).await;
    failed_upgrade_reports_why(&baton, admin).await;
}

/// `baton upgrade --json --wait-drain`, run in the background.
fn spawn_upgrade_wait_drain(baton: &Baton) -> tokio::task::JoinHandle<std::process::Output> {
    let control = baton.control.clone();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(common::BATON)
            .args(["upgrade", "--json", "--wait-drain", "--control"])
            .arg(&control)
            .output()
            .expect("run baton upgrade")
    })
}

/// The report of generation 1 → 2 with one idle connection and three tunnels, one of which
/// closed during the drain and two cut at its 1.5 s timeout.
fn assert_wait_drain_report(r: &serde_json::Value, old: u32) {
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["old_pid"], old, "{r}");
    assert_eq!(r["old_generation"], 1, "{r}");
    assert_eq!(r["new_generation"], 2, "{r}");
    assert_ne!(r["new_pid"], old, "{r}");
    assert!(r["ready_ms"].as_u64().is_some(), "{r}");
    assert_eq!(r["draining_connections"], 1, "{r}");
    assert_eq!(r["draining_tunnels"], 3, "{r}");
    let d = &r["drain"];
    assert_eq!(d["connections"], 1, "{r}");
    assert_eq!(d["tunnels"], 3, "{r}");
    assert_eq!(d["finished"], 2, "idle connection and the closed tunnel: {r}");
    assert_eq!(d["cut"], 2, "the two tunnels left at the drain timeout: {r}");
    assert!(d["drain_ms"].as_u64().unwrap() >= 1400, "{r}");
}

/// The cut tunnels are closed; the new generation's metrics agree with the report.
async fn cut_tunnels_are_closed_and_counted(admin: SocketAddr, tunnels: Vec<TcpStream>) {
    for mut t in tunnels {
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), t.read(&mut buf))
            .await
            .expect("cut tunnel closes");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    }
    let m = scrape(admin).await;
    assert_eq!(
        value(&m, "baton_drained_connections_total{outcome=\"cut\"}"),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        value(&m, "baton_drained_connections_total{outcome=\"finished\"}"),
        Some(2.0),
        "{m}"
    );
}

/// Without --wait-drain the report comes as soon as the new generation serves.
async fn upgrade_reports_without_waiting_for_the_drain(baton: &Baton) {
    let (ok, out) = cli(baton, &["upgrade", "--json"]).await;
    assert!(ok, "{out}");
    let r = parse_report(&out);
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["new_generation"], 3, "{r}");
    assert!(r.get("drain").is_none(), "{r}");
}

/// A failing handoff (a broken configuration): the report says why, the counter says which
/// kind. The configuration is restored afterwards.
async fn failed_upgrade_reports_why(baton: &Baton, admin: SocketAddr) {
    let good = std::fs::read_to_string(&baton.config).unwrap();
    std::fs::write(&baton.config, format!("{good}\nnot = = toml\n")).unwrap();
    let (ok, out) = cli(baton, &["upgrade", "--json"]).await;
    std::fs::write(&baton.config, &good).unwrap();
    assert!(!ok, "{out}");
    let r = parse_report(&out);
    assert_eq!(r["result"], "failed", "{r}");
    // The new generation's own words, not just its exit status.
    let reason = r["reason"].as_str().unwrap();
    assert!(
        reason.contains("exited before it was ready: ") && reason.contains("baton.toml: line"),
        "{r}"
    );
    assert_eq!(r["old_generation"], 3, "{r}");
    let m = scrape(admin).await;
    assert_eq!(
        value(&m, "baton_handoffs_total{result=\"child_exit\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(value(&m, "baton_handoffs_total{result=\"ok\"}"), Some(2.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_log_file_is_reopened_after_logrotate_and_kept_across_a_handoff() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("[log]\naccess = \"access.log\"\naccess_format = \"json\"\n").await;
    let log = baton.dir.path().join("access.log");
    let rotated = baton.dir.path().join("access.log.1");
    let get = |tag: &'static str| {
        let proxy = baton.proxy;
        async move {
            let mut c = testkit::ProxyConnection::open(proxy).await.unwrap();
            let (st, _) = c.get(&format!("http://{origin}/bytes?n=5&{tag}")).await.unwrap();
            assert_eq!(st, 200);
        }
    };
    let contains = |path: &std::path::Path, tag: &str| std::fs::read_to_string(path).unwrap_or_default().contains(tag);

    get("tag=first").await;
    wait_for(Duration::from_secs(5), "the first access line", || async {
        contains(&log, "tag=first").then_some(())
    })
    .await;
    // logrotate renames (no signal, no copytruncate): the generation opens a new file at the
    // path within about a second, and says so.
    std::fs::rename(&log, &rotated).unwrap();
    wait_for(Duration::from_secs(5), "a new access.log after the rename", || async {
        log.exists().then_some(())
    })
    .await;
    // The generation says so once it has opened the file (the file exists first).
    wait_for(Duration::from_secs(5), "the \"access log reopened\" line", || async {
        baton.log().contains("access log reopened").then_some(())
    })
    .await;
    get("tag=second").await;
    wait_for(Duration::from_secs(5), "the second line in the new file", || async {
        contains(&log, "tag=second").then_some(())
    })
    .await;
    assert!(contains(&rotated, "tag=first") && !contains(&rotated, "tag=second"));

    // A handoff: the new generation appends to the same file.
    let (ok, out) = cli(&baton, &["upgrade"]).await;
    assert!(ok, "{out}");
    get("tag=third").await;
    wait_for(Duration::from_secs(5), "the third line in the same file", || async {
        contains(&log, "tag=third").then_some(())
    })
    .await;
    let new_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        new_text.contains("tag=second") && !new_text.contains("tag=first"),
        "{new_text}"
    );
    assert!(!contains(&rotated, "tag=third"));

    // JSON lines with the request's fields; none of them on stderr.
    let line = new_text.lines().find(|l| l.contains("tag=third")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["method"], "GET", "{v}");
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["target"], format!("http://{origin}/bytes?n=5&tag=third"), "{v}");
    assert_eq!(v["bytes_out"], 5, "{v}");
    assert!(!baton.log().contains("tag=third"), "{}", baton.log());
}

/// `$JOURNAL_STREAM` counts only when it names stderr (systemd.exec(5)): a variable inherited
/// by a process whose stderr goes elsewhere leaves the lines on stderr, with timestamps.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn journal_stream_naming_another_stream_leaves_lines_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_text(dir.path(), "");
    let baton = Baton::start_wrapped(dir, &config, &["env", "JOURNAL_STREAM=1:2"], None).await;
    let log = baton.log();
    let line = log
        .lines()
        .find(|l| l.contains("baton serving"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        line.starts_with(|c: char| c.is_ascii_digit()),
        "a timestamp first: {line}"
    );
    assert!(!log.contains("journal"), "{log}");
}

/// stderr is the journal's stream but journald's socket cannot be reached: plain lines on
/// stderr as journald's stream expects them (no timestamps), after one warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn journal_stream_without_journald_socket_falls_back_to_stderr() {
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        eprintln!("skipped: this machine runs journald (scripts/systemd-test covers the journal)");
        return;
    }
    use std::os::unix::fs::MetadataExt as _;
    let dir = tempfile::tempdir().unwrap();
    // start_wrapped truncates this file and gives it to baton as stderr: same device and inode.
    let m = std::fs::File::create(dir.path().join("baton.log"))
        .unwrap()
        .metadata()
        .unwrap();
    let stream = format!("JOURNAL_STREAM={}:{}", m.dev(), m.ino());
    let config = common::config_text(dir.path(), "");
    let baton = Baton::start_wrapped(dir, &config, &["env", &stream], None).await;
    let log = baton.log();
    assert!(
        log.lines()
            .next()
            .is_some_and(|l| l.trim_start().starts_with("WARN") && l.contains("native socket failed")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l
            .trim_start()
            .starts_with("INFO baton::daemon::generation: baton serving")),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_log_text_to_stderr_by_default() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("").await;
    let mut c = testkit::ProxyConnection::open(baton.proxy).await.unwrap();
    let (st, _) = c.get(&format!("http://{origin}/bytes?n=5&tag=plain")).await.unwrap();
    assert_eq!(st, 200);
    let line = wait_for(Duration::from_secs(5), "the access line on stderr", || async {
        baton
            .log()
            .lines()
            .find(|l| l.contains("tag=plain"))
            .map(str::to_string)
    })
    .await;
    assert!(line.contains("status=200") && line.contains("method=GET"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn healthz_and_status_on_the_admin_listener() {
    let echo = testkit::start_echo().await.unwrap();
    let mut baton = Baton::start(&format!(
        "{ADMIN}[timeouts]\ndrain = \"10s\"\n\n{}",
        connect_port(echo.port())
    ))
    .await;
    let admin = listener_addr(&baton.status().await, "admin");
    let (code, body) = admin_get(admin, "/status").await;
    assert_eq!(code, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    let (ok, cli_out) = cli(&baton, &["status", "--json"]).await;
    assert!(ok);
    let cli_st: serde_json::Value = serde_json::from_str(cli_out.trim()).unwrap();
    assert_eq!(st, cli_st, "/status is `baton status --json`");
    assert_eq!(st["pid"], baton.pid());
    assert_eq!(admin_get(admin, "/nope").await.0, 404);
    let (ok, human) = cli(&baton, &["status"]).await;
    assert!(ok && human.contains("listener    admin 127.0.0.1:"), "{human}");
    // The start as a date and an age, not a bare Unix time: the date is the JSON's second.
    let started = std::time::UNIX_EPOCH + Duration::from_secs(st["started_unix"].as_u64().unwrap());
    let date = humantime::format_rfc3339_seconds(started).to_string();
    assert!(
        human.contains(&format!("started     {date}, ")) && human.contains(" ago\n"),
        "the start is shown as {date} and an age:\n{human}"
    );

    // The admin listener is handed over too.
    let (ok, out) = cli(&baton, &["upgrade"]).await;
    assert!(ok, "{out}");
    let st = baton.status().await;
    assert_eq!(listener_addr(&st, "admin"), admin);
    let (code, body) = admin_get(admin, "/status").await;
    assert_eq!(code, 200);
    let served: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(served["generation"], 2);
    assert!(
        st["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "admin" && l["adopted"] == true),
        "{st}"
    );

    // Stopping with a tunnel open: the generation drains and says so on /healthz.
    let mut t = testkit::open_tunnel(baton.proxy, echo).await.unwrap();
    echo_through(&mut t, b"x").await;
    let serving = st["pid"].as_u64().unwrap() as u32;
    wait_for(Duration::from_secs(10), "generation 1 to exit", || async {
        (!alive(baton.pid())).then_some(())
    })
    .await;
    assert_eq!(
        baton.wait_exit(Duration::from_secs(1)).await,
        Some(0),
        "generation 1 exits 0 once it handed off"
    );
    baton.signal(serving, nix::sys::signal::Signal::SIGTERM);
    let (code, body) = wait_for(Duration::from_secs(5), "healthz 503 while draining", || async {
        let r = admin_get(admin, "/healthz").await;
        (r.0 == 503).then_some(r)
    })
    .await;
    assert_eq!((code, body.trim()), (503, "draining"));
    let m = scrape(admin).await;
    assert_eq!(value(&m, "baton_draining"), Some(1.0), "{m}");
    drop(t);
    wait_for(Duration::from_secs(10), "the stopped generation to exit", || async {
        (!alive(serving)).then_some(())
    })
    .await;
}
