//! Operating baton: the admin listener (`/metrics`, `/healthz`, `/status`) across handoffs,
//! the upgrade report (`baton upgrade --json [--wait-drain]`), the access log and logrotate.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{Baton, alive, listener_addr, testkit, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

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

/// Clients in the background: one keep-alive connection and a new connection per request,
/// both fetching from `origin` until stopped. Counts failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<Vec<String>>>,
}

impl Load {
    fn start(proxy: SocketAddr, origin: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let url = format!("http://{origin}/bytes?n=2048");
        let mut tasks = Vec::new();
        for keep_alive in [false, true] {
            let (stop, ok, url) = (stop.clone(), ok.clone(), url.clone());
            tasks.push(tokio::spawn(async move {
                let mut errors = Vec::new();
                let mut conn: Option<testkit::ProxyConnection> = None;
                while !stop.load(Ordering::Relaxed) {
                    let reuse = keep_alive && conn.as_ref().is_some_and(|c| !c.is_closed());
                    let result = tokio::time::timeout(Duration::from_secs(10), async {
                        if !reuse {
                            conn = Some(testkit::ProxyConnection::open(proxy).await?);
                        }
                        conn.as_mut().expect("opened").get(&url).await
                    })
                    .await;
                    match result {
                        Ok(Ok((st, body))) if st == 200 && body.len() == 2048 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        // RFC 9112 §9.3.1: a keep-alive connection closed by a draining
                        // generation while idle may fail the next request; clients retry.
                        Ok(Err(e)) if reuse && e.is_closed_before_response() => conn = None,
                        other => errors.push(format!("{other:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                errors
            }));
        }
        Load { stop, ok, tasks }
    }

    async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = Vec::new();
        for t in self.tasks {
            errors.extend(t.await.unwrap_or_default());
        }
        (self.ok.load(Ordering::Relaxed), errors)
    }
}

async fn echo_through(tunnel: &mut tokio::net::TcpStream, msg: &[u8]) {
    tunnel.write_all(msg).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), tunnel.read_exact(&mut buf))
        .await
        .expect("echo within 5 s")
        .unwrap();
    assert_eq!(buf, msg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_follow_a_handoff_under_load() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let baton = Baton::start(&format!(
        "{ADMIN}[timeouts]\ndrain = \"20s\"\n\n{}",
        connect_port(echo.port())
    ))
    .await;
    let old = baton.pid();
    let admin = listener_addr(&baton.status().await, "admin");
    let load = Load::start(baton.proxy, origin);

    // Three tunnels held open across the handoff.
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let mut t = testkit::open_tunnel(baton.proxy, echo).await.unwrap();
        echo_through(&mut t, b"before").await;
        tunnels.push(t);
    }

    // Generation 1 counts requests and sees its tunnels.
    let m = wait_for(Duration::from_secs(10), "requests counted by generation 1", || async {
        let m = scrape(admin).await;
        (sum(&m, "baton_requests_total", &["method=\"GET\"", "status_class=\"2xx\""]) >= 10.0).then_some(m)
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

    let (ok, out) = cli(&baton, &["upgrade", "--json"]).await;
    assert!(ok, "{out}");
    let report = parse_report(&out);
    assert_eq!(report["result"], "ok", "{report}");
    assert_eq!(report["draining_tunnels"], 3, "{report}");
    let new = report["new_pid"].as_u64().unwrap() as u32;

    // The scrape now reaches generation 2, which reports generation 1 draining its tunnels.
    let series = format!("baton_draining_tunnels{{pid=\"{old}\",generation=\"1\"}}");
    let m = wait_for(Duration::from_secs(10), "generation 2 counting requests", || async {
        let m = scrape(admin).await;
        (value(&m, "baton_generation") == Some(2.0)
            && sum(&m, "baton_requests_total", &["method=\"GET\"", "status_class=\"2xx\""]) >= 10.0)
            .then_some(m)
    })
    .await;
    assert_eq!(value(&m, &series), Some(3.0), "{m}");
    assert_eq!(value(&m, "baton_draining_generations"), Some(1.0), "{m}");
    assert_eq!(value(&m, "baton_tunnels"), Some(0.0), "{m}");
    assert_eq!(value(&m, "baton_handoffs_total{result=\"ok\"}"), Some(1.0), "{m}");
    assert_eq!(
        value(&m, "baton_handoff_phase_seconds_count{phase=\"spawn_to_ready\"}"),
        Some(1.0),
        "{m}"
    );
    let status = baton.status().await;
    assert_eq!(status["pid"], new);
    assert_eq!(status["draining"][0]["pid"], old, "{status}");
    assert_eq!(status["draining"][0]["tunnels"], 3, "{status}");

    // The old generation's tunnels still work; as they close, its count falls to zero.
    for (i, mut t) in tunnels.into_iter().enumerate() {
        echo_through(&mut t, b"after").await;
        drop(t);
        let left = 2 - i;
        wait_for(
            Duration::from_secs(10),
            &format!("{left} draining tunnels reported"),
            || async {
                let m = scrape(admin).await;
                let v = value(&m, &series);
                (v == Some(left as f64) || (left == 0 && v.is_none())).then_some(())
            },
        )
        .await;
    }
    wait_for(Duration::from_secs(10), "the old generation to exit", || async {
        (!alive(old)).then_some(())
    })
    .await;
    let m = wait_for(Duration::from_secs(10), "the drain to be recorded", || async {
        let m = scrape(admin).await;
        (value(&m, "baton_handoff_phase_seconds_count{phase=\"drain\"}") == Some(1.0)).then_some(m)
    })
    .await;
    assert_eq!(value(&m, "baton_draining_generations"), Some(0.0), "{m}");
    assert!(value(&m, &series).is_none(), "{m}");
    assert_eq!(
        value(&m, "baton_drained_connections_total{outcome=\"cut\"}"),
        Some(0.0),
        "{m}"
    );
    assert!(
        value(&m, "baton_drained_connections_total{outcome=\"finished\"}").unwrap() >= 3.0,
        "{m}"
    );

    let (served, errors) = load.finish().await;
    assert!(errors.is_empty(), "client failures during the handoff: {errors:?}");
    assert!(served > 20);
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
    let old = baton.pid();
    let admin = listener_addr(&baton.status().await, "admin");

    // One idle keep-alive connection and three tunnels.
    let mut idle = testkit::ProxyConnection::open(baton.proxy).await.unwrap();
    let (st, _) = idle.get(&format!("http://{origin}/bytes?n=10")).await.unwrap();
    assert_eq!(st, 200);
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let mut t = testkit::open_tunnel(baton.proxy, echo).await.unwrap();
        echo_through(&mut t, b"x").await;
        tunnels.push(t);
    }
    wait_for(Duration::from_secs(5), "the tunnels to be counted", || async {
        (baton.status().await["active_tunnels"] == 3).then_some(())
    })
    .await;

    let upgrade = {
        let control = baton.control.clone();
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(common::BATON)
                .args(["upgrade", "--json", "--wait-drain", "--control"])
                .arg(&control)
                .output()
                .expect("run baton upgrade")
        })
    };
    // Once the new generation serves, one tunnel ends by itself; two stay until the cut.
    wait_for(Duration::from_secs(10), "the new generation", || async {
        (baton.status().await["pid"] != old).then_some(())
    })
    .await;
    drop(tunnels.remove(0));
    let out = tokio::time::timeout(Duration::from_secs(20), upgrade)
        .await
        .expect("upgrade --wait-drain returns after the drain")
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let r = parse_report(&text);
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

    // The cut tunnels are closed; the new generation's metrics agree.
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

    // Without --wait-drain the report comes as soon as the new generation serves.
    let (ok, out) = cli(&baton, &["upgrade", "--json"]).await;
    assert!(ok, "{out}");
    let r = parse_report(&out);
    assert_eq!(r["result"], "ok", "{r}");
    assert_eq!(r["new_generation"], 3, "{r}");
    assert!(r.get("drain").is_none(), "{r}");

    // A failing handoff: the report says why, the counter says which kind.
    let good = std::fs::read_to_string(&baton.config).unwrap();
    std::fs::write(&baton.config, format!("{good}\nnot = = toml\n")).unwrap();
    let (ok, out) = cli(&baton, &["upgrade", "--json"]).await;
    std::fs::write(&baton.config, &good).unwrap();
    assert!(!ok, "{out}");
    let r = parse_report(&out);
    assert_eq!(r["result"], "failed", "{r}");
    assert!(r["reason"].as_str().unwrap().contains("exit status 1"), "{r}");
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
async fn access_log_file_follows_logrotate_across_a_handoff() {
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
    // logrotate renames; the serving generation keeps its open file until the handoff.
    std::fs::rename(&log, &rotated).unwrap();
    get("tag=second").await;
    wait_for(
        Duration::from_secs(5),
        "the second line in the renamed file",
        || async { contains(&rotated, "tag=second").then_some(()) },
    )
    .await;
    assert!(!log.exists());

    let (ok, out) = cli(&baton, &["upgrade"]).await;
    assert!(ok, "{out}");
    get("tag=third").await;
    wait_for(Duration::from_secs(5), "the third line in the new file", || async {
        contains(&log, "tag=third").then_some(())
    })
    .await;
    assert!(!contains(&rotated, "tag=third"));
    let new_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        !new_text.contains("tag=first") && !new_text.contains("tag=second"),
        "{new_text}"
    );

    // JSON lines with the request's fields; none of them on stderr.
    let line = new_text.lines().find(|l| l.contains("tag=third")).unwrap();
    let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    assert_eq!(v["method"], "GET", "{v}");
    assert_eq!(v["status"], 200, "{v}");
    assert_eq!(v["target"], format!("http://{origin}/bytes?n=5&tag=third"), "{v}");
    assert_eq!(v["bytes_out"], 5, "{v}");
    assert!(!baton.log().contains("tag=third"), "{}", baton.log());
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
    let _ = baton.wait_exit(Duration::from_secs(1)).await;
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
