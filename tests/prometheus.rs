//! The Grafana dashboard (`contrib/grafana/baton.json`) and the alert rules
//! (`contrib/prometheus/baton-rules.yml`) against a real scrape: the Debian `prometheus`
//! scrapes a baton under load (requests, errors, denials, tunnels) every second while it
//! fails one handoff and completes another with a slow request in flight, and every panel
//! query and alert expression, read from those files, is evaluated by it. `promtool` checks
//! the rules (and runs their unit tests) and the scrape configuration.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::testkit::{self, Load, LoadSpec};
use common::{Baton, KillOnDrop, alive, connect_ports, listener_addr, wait_for};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

const PROMETHEUS: &str = "/usr/bin/prometheus";
const PROMTOOL: &str = "/usr/bin/promtool";

fn contrib(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib").join(path)
}

/// Runs a program to its end; (success, stdout + stderr).
fn run(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program} must be installed (Debian package prometheus): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// GET with curl (bounded by its --max-time), off the async runtime: the body.
async fn get(args: Vec<String>) -> String {
    tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, body, err) = common::curl(&refs);
        assert!(ok, "curl {args:?}: {err}");
        String::from_utf8_lossy(&body).into_owned()
    })
    .await
    .expect("curl task")
}

/// A Prometheus on 127.0.0.1 with its own storage, killed when dropped (pass or fail).
struct Prometheus {
    process: KillOnDrop,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// Every second: scrape `target`'s /metrics, evaluate the rules.
fn prometheus_config(target: SocketAddr, rules: &Path) -> String {
    format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n  - job_name: baton\n    static_configs:\n      - targets: ['{target}']\n",
        rules.display()
    )
}

impl Prometheus {
    /// Writes the configuration, has `promtool check config` pass it, and starts Prometheus
    /// on a free loopback port (another one if that port was taken meanwhile).
    async fn start(target: SocketAddr, rules: &Path) -> Prometheus {
        let mut dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(&config, prometheus_config(target, rules)).expect("write config");
        let (ok, out) = run(PROMTOOL, &["check", "config", &config.display().to_string()]);
        assert!(ok, "promtool check config: {out}");
        for _ in 0..3 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let log = std::fs::File::create(dir.path().join("prometheus.log")).expect("log");
            let child = Command::new(PROMETHEUS)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("{PROMETHEUS} must be installed: {e}"));
            let mut p = Prometheus {
                process: KillOnDrop(child),
                addr,
                dir,
            };
            if p.wait_ready().await {
                return p;
            }
            dir = p.dir;
        }
        panic!("prometheus did not start on three ports");
    }

    /// Polls `/-/ready` for up to 30 s; false if the process exited (its port was taken).
    async fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("http://{}/-/ready", self.addr);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.process.0.try_wait() {
                return false;
            }
            let (ok, body, _) = tokio::task::spawn_blocking({
                let url = url.clone();
                move || common::curl(&["--max-time", "2", &url])
            })
            .await
            .expect("curl task");
            if ok && String::from_utf8_lossy(&body).contains("Ready") {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("prometheus not ready within 30 s:\n{}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through `/api/v1/query`: the series, or Prometheus' error.
    async fn query(&self, expr: &str) -> Result<Vec<Value>, String> {
        let body = get(vec![
            "-G".into(),
            "--data-urlencode".into(),
            format!("query={expr}"),
            format!("http://{}/api/v1/query", self.addr),
        ])
        .await;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))?;
        if v["status"] != "success" {
            return Err(format!("{}: {}", v["errorType"], v["error"]));
        }
        if v["data"]["resultType"] != "vector" {
            return Err(format!("not an instant vector: {v}"));
        }
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// GET `/api/v1/<path>`'s `data`.
    async fn api(&self, path: &str) -> Value {
        let body = get(vec![format!("http://{}/api/v1/{path}", self.addr)]).await;
        let v: Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {body}"));
        assert_eq!(v["status"], "success", "{path}: {v}");
        v["data"].clone()
    }
}

/// The value of one series of a query's answer.
fn sample(series: &Value) -> f64 {
    series["value"][1]
        .as_str()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no value in {series}"))
}

/// The series of `name` in a `/metrics` text: (labels as encoded, value).
fn scraped(metrics: &str, name: &str) -> Vec<(String, f64)> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, v) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?;
            let whole_name = labels.is_empty() || labels.starts_with('{');
            whole_name.then_some((labels.to_string(), v.parse().ok()?))
        })
        .collect()
}

async fn scrape(admin: SocketAddr) -> String {
    get(vec![
        "--max-time".into(),
        "10".into(),
        format!("http://{admin}/metrics"),
    ])
    .await
}

// ---- The dashboard: its queries, with Grafana's variables as a test gives them ----

/// A panel query: where it is, and the PromQL with the variables substituted.
struct PanelQuery {
    panel: String,
    ref_id: String,
    expr: String,
}

fn dashboard() -> Value {
    let path = contrib("grafana/baton.json");
    let text = std::fs::read_to_string(&path).expect("contrib/grafana/baton.json");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: not JSON: {e}", path.display()))
}

/// Every panel, rows' nested panels included.
fn panels(dash: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in dash["panels"].as_array().expect("panels") {
        out.push(p);
        out.extend(p["panels"].as_array().into_iter().flatten());
    }
    out
}

/// What Grafana would put for its own variables and the dashboard's: 10 s intervals (the
/// test scrapes every second), a 5-minute range, and "all" (`allValue`) for the query
/// variables.
fn variables(dash: &Value) -> Vec<(String, String)> {
    let mut vars: Vec<(String, String)> = [("__rate_interval", "10s"), ("__interval", "10s"), ("__range", "5m")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for v in dash["templating"]["list"].as_array().expect("templating.list") {
        if v["type"] == "query" || v["type"] == "custom" {
            let all = v["allValue"].as_str().unwrap_or(".+");
            vars.push((v["name"].as_str().expect("variable name").to_string(), all.to_string()));
        }
    }
    // Longest names first, so that a name cannot replace the start of a longer one.
    vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
    vars
}

fn substitute(expr: &str, vars: &[(String, String)]) -> String {
    let mut out = expr.to_string();
    for (k, v) in vars {
        out = out.replace(&format!("${{{k}}}"), v).replace(&format!("${k}"), v);
    }
    assert!(!out.contains('$'), "a variable the test does not know in {expr}");
    out
}

/// The dashboard is one Grafana can import: unique panel ids, every query panel on the
/// datasource variable (of type `prometheus`), every target with an expression and a
/// refId unique in its panel. Returns the queries.
fn panel_queries(dash: &Value) -> Vec<PanelQuery> {
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 30), "schemaVersion");
    assert!(dash["uid"].is_string() && dash["title"].is_string());
    let ds = dash["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .find(|v| v["type"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(ds["query"], "prometheus", "{ds}");
    let ds_ref = format!("${{{}}}", ds["name"].as_str().expect("name"));
    let vars = variables(dash);
    let mut ids = std::collections::HashSet::new();
    let mut out = Vec::new();
    for p in panels(dash) {
        let title = p["title"].as_str().expect("panel title").to_string();
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate id: {title}");
        assert!(
            p["gridPos"]["w"].is_u64() && p["gridPos"]["h"].is_u64(),
            "gridPos: {title}"
        );
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], ds_ref.as_str(), "{title}");
        assert_eq!(p["datasource"]["type"], "prometheus", "{title}");
        let targets = p["targets"].as_array().unwrap_or_else(|| panic!("no targets: {title}"));
        assert!(!targets.is_empty(), "no targets: {title}");
        let mut refs = std::collections::HashSet::new();
        for t in targets {
            let ref_id = t["refId"].as_str().expect("refId").to_string();
            assert!(refs.insert(ref_id.clone()), "duplicate refId in {title}");
            let expr = t["expr"].as_str().unwrap_or_else(|| panic!("no expr: {title}"));
            out.push(PanelQuery {
                panel: title.clone(),
                ref_id,
                expr: substitute(expr, &vars),
            });
        }
    }
    out
}

// ---- What the test drives: a held origin and a mix of errors, denials and tunnels ----

/// An origin that answers one request only when told: the request in flight that keeps
/// the old generation draining. (address, request arrived, release the answer).
async fn held_origin() -> (SocketAddr, oneshot::Receiver<()>, oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (arrived_tx, arrived) = oneshot::channel();
    let (release, release_rx) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let Ok((mut s, _)) = listener.accept().await else {
            return;
        };
        let mut head = Vec::new();
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let _ = arrived_tx.send(());
        let _ = release_rx.await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nslow!").await;
        // Keep the connection until the proxy closes it.
        let _ = s.read(&mut buf).await;
    });
    (addr, arrived, release)
}

/// What [`mixed_load`] saw: 502s, refused CONNECTs (403) and tunnels that echoed.
#[derive(Default)]
struct Mixed {
    bad_gateway: AtomicU64,
    denied: AtomicU64,
    tunnels: AtomicU64,
    unexpected: AtomicU64,
}

/// Until `stop` (at most 2,000 rounds or 120 s), every 50 ms: a GET to a closed port (an
/// upstream connect error, 502), a CONNECT to a port not in connect_ports (denied, 403), and
/// a tunnel to `echo` that carries one message and closes.
fn mixed_load(
    proxy: SocketAddr,
    echo: SocketAddr,
    closed: SocketAddr,
    stop: CancellationToken,
) -> (Arc<Mixed>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mixed::default());
    let tally = seen.clone();
    let task = tokio::spawn(async move {
        let deadline = Instant::now() + Duration::from_secs(120);
        for _ in 0..2000 {
            if stop.is_cancelled() || Instant::now() > deadline {
                break;
            }
            let round = tokio::time::timeout(Duration::from_secs(10), mixed_round(proxy, echo, closed, &tally));
            if round.await.is_err() {
                tally.unexpected.fetch_add(1, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    (seen, task)
}

async fn mixed_round(proxy: SocketAddr, echo: SocketAddr, closed: SocketAddr, seen: &Mixed) {
    let count = |ok: bool, counter: &AtomicU64| {
        let c = if ok { counter } else { &seen.unexpected };
        c.fetch_add(1, Ordering::Relaxed);
    };
    let status = match testkit::ProxyConnection::open(proxy).await {
        Ok(mut c) => c.get(&format!("http://{closed}/")).await.map(|(s, _)| s.as_u16()).ok(),
        Err(_) => None,
    };
    count(status == Some(502), &seen.bad_gateway);
    let denied = testkit::open_tunnel(proxy, closed).await;
    count(matches!(&denied, Err(e) if e.to_string().contains("403")), &seen.denied);
    let echoed = async {
        let mut t = testkit::open_tunnel(proxy, echo).await?;
        t.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        t.read_exact(&mut buf).await?;
        Ok::<_, std::io::Error>(&buf == b"ping")
    };
    count(matches!(echoed.await, Ok(true)), &seen.tunnels);
}

// ---- The test ----

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dashboard_and_alerts_against_a_real_scrape() {
    let (rules, dash, queries) = contrib_files_check();
    let origin = testkit::start_origin().await.expect("origin");
    let echo = testkit::start_echo().await.expect("echo");
    let (held, arrived, release) = held_origin().await;
    let baton = Baton::start(&format!(
        "[admin]\naddress = \"127.0.0.1:0\"\n\n[timeouts]\ndrain = \"60s\"\n\n{}",
        connect_ports(&[echo.port()])
    ))
    .await;
    let old = baton.pid();
    let admin = listener_addr(&baton.status().await, "admin");
    let clients = Clients::start(baton.proxy, origin, echo);
    let prom = Prometheus::start(admin, &rules).await;

    failed_handoff(&baton, admin, &prom).await;
    let slow = slow_request(baton.proxy, held, arrived).await;
    let upgrading = Instant::now();
    let (ok, out) = common::cli_at(&baton.control, &["upgrade", "--json"]);
    assert!(ok && out.contains("\"result\":\"ok\""), "{out}");
    let series = format!("{{pid=\"{old}\",generation=\"1\"}}");
    draining_age_is_exported(admin, &series, upgrading).await;
    let (ok, human) = common::cli_at(&baton.control, &["status"]);
    let line = format!("draining    pid {old} (generation 1) for ");
    assert!(ok && human.contains(&line), "`baton status` says how long: {human}");
    every_panel_query_returns_series(&prom, &queries, &dash).await;
    alerts_evaluate(&prom, &rules, admin).await;

    // The slow request ends; the old generation exits and its age series goes.
    let _ = release.send(());
    let answer = tokio::time::timeout(Duration::from_secs(10), slow)
        .await
        .expect("the slow answer within 10 s")
        .expect("slow request task");
    assert_eq!(
        answer,
        Ok((200, b"slow!".to_vec())),
        "the request the old generation drained"
    );
    wait_for(Duration::from_secs(15), "the old generation to exit", || async {
        (!alive(old)).then_some(())
    })
    .await;
    drained_age_vanishes(admin, &prom).await;
    clients.finish().await;
    drop(prom);
}

/// `promtool` passes the rules and their unit tests; the dashboard is well formed. Returns
/// the rules file, the dashboard and its queries.
fn contrib_files_check() -> (PathBuf, Value, Vec<PanelQuery>) {
    let rules = contrib("prometheus/baton-rules.yml");
    let (ok, out) = run(PROMTOOL, &["check", "rules", &rules.display().to_string()]);
    assert!(ok, "promtool check rules: {out}");
    let tests = contrib("prometheus/baton-rules.test.yml");
    let (ok, out) = run(PROMTOOL, &["test", "rules", &tests.display().to_string()]);
    assert!(ok, "promtool test rules: {out}");
    let dash = dashboard();
    let queries = panel_queries(&dash);
    (rules, dash, queries)
}

/// The clients: a load of 2xx requests, and the mixed load of errors, denials and tunnels.
struct Clients {
    load: Load,
    stop: CancellationToken,
    mixed: Arc<Mixed>,
    mixed_task: tokio::task::JoinHandle<()>,
}

impl Clients {
    fn start(proxy: SocketAddr, origin: SocketAddr, echo: SocketAddr) -> Clients {
        // A port nothing listens on: connects to it are refused.
        let closed = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a port to close");
        let spec = LoadSpec::new(format!("http://{origin}/bytes?n=2048"))
            .body_len(2048)
            .pause(Duration::from_millis(5));
        let load = Load::start(proxy, spec);
        let stop = CancellationToken::new();
        let (mixed, mixed_task) = mixed_load(proxy, echo, closed, stop.clone());
        Clients {
            load,
            stop,
            mixed,
            mixed_task,
        }
    }

    /// Stops them: no request failed, and each kind of the mixed load was seen many times.
    async fn finish(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(15), self.mixed_task)
            .await
            .expect("mixed load stops")
            .expect("mixed load task");
        let report = self.load.finish().await;
        let m = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mixed = &self.mixed;
        let (bad_gateway, denied, tunnels) = (m(&mixed.bad_gateway), m(&mixed.denied), m(&mixed.tunnels));
        let unexpected = m(&mixed.unexpected);
        eprintln!(
            "load: {report}; mixed: {bad_gateway} 502, {denied} denied, {tunnels} tunnels, {unexpected} unexpected"
        );
        assert!(report.is_clean() && report.ok > 100, "{report}");
        assert_eq!(unexpected, 0, "an answer of the mixed load was not the expected one");
        assert!(bad_gateway > 10 && denied > 10 && tunnels > 10);
    }
}

/// Once Prometheus has seen the ledger at zero, a broken configuration fails a handoff;
/// baton counts it and Prometheus scrapes the count.
async fn failed_handoff(baton: &Baton, admin: SocketAddr, prom: &Prometheus) {
    let failures = "baton_handoffs_total{job=\"baton\",result=\"child_exit\"}";
    let seen = |want: f64| {
        let q = failures.to_string();
        async move {
            let r = prom.query(&q).await.expect("a valid query");
            r.first().is_some_and(|s| sample(s) == want).then_some(())
        }
    };
    wait_for(Duration::from_secs(30), "prometheus to scrape baton", || seen(0.0)).await;
    let good = std::fs::read_to_string(&baton.config).expect("config");
    std::fs::write(&baton.config, format!("{good}\nnot = = toml\n")).expect("break config");
    let (ok, out) = common::cli_at(&baton.control, &["upgrade"]);
    std::fs::write(&baton.config, &good).expect("restore config");
    assert!(!ok, "a broken configuration must fail the handoff: {out}");
    let m = scrape(admin).await;
    assert_eq!(
        scraped(&m, "baton_handoffs_total"),
        [
            "ok",
            "child_exit",
            "failed_after_ready",
            "timeout",
            "spawn_error",
            "refused"
        ]
        .iter()
        .map(|r| (
            format!("{{result=\"{r}\"}}"),
            if *r == "child_exit" { 1.0 } else { 0.0 }
        ))
        .collect::<Vec<_>>(),
        "{m}"
    );
    wait_for(Duration::from_secs(30), "prometheus to scrape the failure", || {
        seen(1.0)
    })
    .await;
}

/// A request to the held origin, in flight once the origin has it: (status, body) at the end,
/// or what failed (asserted by the test, not in the task, which outlives a failed test).
async fn slow_request(
    proxy: SocketAddr,
    held: SocketAddr,
    arrived: oneshot::Receiver<()>,
) -> tokio::task::JoinHandle<Result<(u16, Vec<u8>), String>> {
    let task = tokio::spawn(async move {
        let mut c = testkit::ProxyConnection::open(proxy).await.map_err(|e| e.to_string())?;
        let (status, body) = c.get(&format!("http://{held}/slow")).await.map_err(|e| e.to_string())?;
        Ok((status.as_u16(), body.to_vec()))
    });
    tokio::time::timeout(Duration::from_secs(10), arrived)
        .await
        .expect("the slow request reaches the origin within 10 s")
        .expect("held origin");
    task
}

/// The serving generation exports the old one's draining age, and it grows.
async fn draining_age_is_exported(admin: SocketAddr, series: &str, upgrading: Instant) {
    let age = || async {
        let m = scrape(admin).await;
        let found = scraped(&m, "baton_draining_age_seconds");
        assert!(found.len() <= 1, "one draining generation: {m}");
        found.into_iter().find(|(l, _)| l == series).map(|(_, v)| v)
    };
    let first = wait_for(Duration::from_secs(10), "the draining age on /metrics", age).await;
    let bound = upgrading.elapsed().as_secs_f64();
    assert!(
        (0.0..=bound + 0.01).contains(&first),
        "age {first} s, {bound} s since the upgrade began"
    );
    let later = wait_for(Duration::from_secs(10), "the draining age to grow", || async {
        age().await.filter(|v| *v >= first + 0.2)
    })
    .await;
    eprintln!("draining age on /metrics: {first:.3} s, then {later:.3} s");
}

/// Every query of every panel is valid and returns a series, waiting (bounded) until
/// Prometheus has enough of the new generation's samples for its rates.
async fn every_panel_query_returns_series(prom: &Prometheus, queries: &[PanelQuery], dash: &Value) {
    // Rates over the last 10 s from the serving generation's samples alone, not the old one's.
    wait_for(Duration::from_secs(30), "10 s of scrapes of generation 2", || async {
        let r = prom
            .query("min_over_time(baton_generation{job=\"baton\"}[10s]) == 2")
            .await;
        (!r.expect("valid").is_empty()).then_some(())
    })
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut empty = Vec::new();
        for q in queries {
            match prom.query(&q.expr).await {
                Err(e) => panic!("panel {:?} query {}: {e}\n{}", q.panel, q.ref_id, q.expr),
                Ok(r) if r.is_empty() => empty.push(format!("{:?} {}: {}", q.panel, q.ref_id, q.expr)),
                Ok(_) => {}
            }
        }
        if empty.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "panel queries without a series after 30 s:\n{}",
            empty.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!("{} panel queries, each with at least one series", queries.len());
    // The instance variable's query: label_values(<metric>, <label>).
    for v in dash["templating"]["list"].as_array().expect("list") {
        let Some(def) = v["definition"].as_str() else { continue };
        let inner = def
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("a variable query the test does not know: {def}"));
        let (metric, label) = inner.split_once(", ").expect("label_values(metric, label)");
        let r = prom.query(metric).await.expect("variable's metric");
        assert!(r.iter().any(|s| s["metric"][label].is_string()), "{def}: {r:?}");
    }
}

/// The alert rules Prometheus loaded from the file: each one evaluates (health ok) and is a
/// valid query; the handoff failure fires, for the child_exit result only.
async fn alerts_evaluate(prom: &Prometheus, rules: &Path, admin: SocketAddr) {
    let text = std::fs::read_to_string(rules).expect("rules file");
    let mut in_file: Vec<String> = text
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("- alert:"))
        .map(|n| n.trim().to_string())
        .collect();
    in_file.sort();
    let loaded = wait_for(Duration::from_secs(30), "every rule evaluated", || async {
        let data = prom.api("rules").await;
        let rules: Vec<Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        (!rules.is_empty() && rules.iter().all(|r| r["health"] != "unknown")).then_some(rules)
    })
    .await;
    let mut names: Vec<String> = loaded
        .iter()
        .map(|r| r["name"].as_str().expect("name").to_string())
        .collect();
    names.sort();
    assert_eq!(names, in_file, "the rules Prometheus loaded are those of the file");
    for r in &loaded {
        let (name, expr) = (&r["name"], r["query"].as_str().expect("query"));
        assert_eq!(
            (&r["type"], &r["health"]),
            (&"alerting".into(), &"ok".into()),
            "{name}: {r}"
        );
        let series = prom.query(expr).await.unwrap_or_else(|e| panic!("{name}: {expr}: {e}"));
        eprintln!("alert {name}: {} series from {expr}", series.len());
        match name.as_str() {
            Some("BatonHandoffFailed") => {
                assert!(!series.is_empty(), "{expr}");
                assert!(
                    series.iter().all(|s| s["metric"]["result"] == "child_exit"),
                    "{series:?}"
                );
            }
            // The drain seen here is seconds old: far from the threshold.
            Some("BatonDrainingTooLong") => assert!(series.is_empty(), "{series:?}"),
            _ => {}
        }
    }
    let instance = admin.to_string();
    wait_for(Duration::from_secs(30), "BatonHandoffFailed to fire", || async {
        let alerts = prom.api("alerts").await;
        alerts["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|a| {
                a["labels"]["alertname"] == "BatonHandoffFailed"
                    && a["labels"]["result"] == "child_exit"
                    && a["labels"]["instance"] == instance.as_str()
                    && a["state"] == "firing"
            })
            .then_some(())
    })
    .await;
}

/// After the old generation exited: no age series on /metrics, none in Prometheus (stale),
/// and the ages Prometheus saw fit in the drain the ledger recorded.
async fn drained_age_vanishes(admin: SocketAddr, prom: &Prometheus) {
    let m = scrape(admin).await;
    assert!(scraped(&m, "baton_draining_age_seconds").is_empty(), "{m}");
    assert_eq!(scraped(&m, "baton_draining_generations"), [(String::new(), 0.0)], "{m}");
    wait_for(Duration::from_secs(15), "the age series to go stale", || async {
        let r = prom.query("baton_draining_age_seconds").await.expect("valid");
        r.is_empty().then_some(())
    })
    .await;
    let drain = wait_for(Duration::from_secs(15), "the drain in the ledger", || async {
        let m = scrape(admin).await;
        let count = scraped(&m, "baton_handoff_phase_seconds_count");
        let sum = scraped(&m, "baton_handoff_phase_seconds_sum");
        let drain = "{phase=\"drain\"}".to_string();
        (count.contains(&(drain.clone(), 1.0)))
            .then(|| sum.into_iter().find(|(l, _)| *l == drain).map(|(_, v)| v))
            .flatten()
    })
    .await;
    let max = prom
        .query("max(max_over_time(baton_draining_age_seconds[5m]))")
        .await
        .expect("valid");
    let max = sample(max.first().expect("the ages Prometheus scraped"));
    eprintln!("drain recorded: {drain:.3} s; largest age Prometheus scraped: {max:.3} s");
    assert!(max > 0.0 && max <= drain + 0.05, "age {max} s, drain {drain} s");
}
