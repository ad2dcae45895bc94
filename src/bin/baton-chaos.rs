//! `baton-chaos`: the handoff's load test. Starts loopback origins and a real baton, runs a
//! client pool against it (keep-alive requests, a new connection per request, requests whose
//! origin answers after 2 s, CONNECT tunnels echoing continuously) and triggers handoffs back
//! to back. Any client-visible failure (refused, reset, truncated, 5xx) is counted and makes
//! the exit status non-zero. Used by `tests/handoff.rs` and, at larger scale, `scripts/chaos`.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton::testkit::{self, ProxyConnection};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(about = "Load baton while handing off; report every client-visible failure")]
struct Args {
    /// The baton binary (default: `baton` next to this program).
    #[arg(long)]
    baton: Option<PathBuf>,
    /// Consecutive handoffs, each started when the previous one completed.
    #[arg(long, default_value_t = 20)]
    handoffs: u32,
    /// Seconds of load in all (handoffs are spread over the first half, at least).
    #[arg(long, default_value_t = 6)]
    seconds: u64,
    /// Workers of each kind (keep-alive, new connection, slow, tunnel).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// baton's `workers` setting (0: one per CPU; 1: the single-threaded scheduler).
    #[arg(long, default_value_t = 0)]
    baton_workers: usize,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Default)]
struct Counters {
    requests_ok: AtomicU64,
    keepalive_retries: AtomicU64,
    slow_ok: AtomicU64,
    tunnels_ok: AtomicU64,
    tunnel_bytes: AtomicU64,
    failures: AtomicU64,
    failure_samples: std::sync::Mutex<Vec<String>>,
}

impl Counters {
    fn fail(&self, what: String) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.failure_samples.lock()
            && s.len() < 20
        {
            s.push(what);
        }
    }
}

#[derive(serde::Serialize)]
struct Summary {
    handoffs_requested: u32,
    handoffs_ok: u32,
    handoff_failures: Vec<String>,
    ready_ms_max: u64,
    pids_distinct: bool,
    requests_ok: u64,
    keepalive_retries: u64,
    slow_ok: u64,
    tunnels_ok: u64,
    tunnel_bytes: u64,
    failures: u64,
    failure_samples: Vec<String>,
    old_generations: usize,
    old_generations_exited_zero: usize,
    /// Old generations that did not exit 0 in time, and how they ended.
    old_generation_problems: Vec<String>,
    final_generation: u64,
    /// The last generation's runtime worker threads (`baton status`).
    final_workers: u64,
    /// Kept when something failed: config and baton's log.
    workdir: Option<String>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let summary = runtime.block_on(run(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    runtime.shutdown_background();
    // A keep-alive request that met a closing connection would need a client retry: a draining
    // generation must not cause one, so it counts against a clean run too.
    let clean = summary.failures == 0
        && summary.keepalive_retries == 0
        && summary.handoffs_ok == summary.handoffs_requested
        && summary.pids_distinct
        && summary.old_generations_exited_zero == summary.old_generations;
    std::process::exit(if clean { 0 } else { 1 });
}

async fn run(args: &Args) -> anyhow::Result<Summary> {
    // Old generations are re-parented to us when their parent exits: we reap and count them.
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    let baton = match &args.baton {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("baton"),
    };
    let origin = testkit::start_origin().await?;
    let echo = testkit::start_echo().await?;
    let dir = std::env::temp_dir().join(format!("baton-chaos-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let control = dir.join("control.sock");
    let config = dir.join("baton.toml");
    std::fs::write(
        &config,
        format!(
            "control_socket = \"{}\"\npid_file = \"{}\"\nworkers = {}\n[[listener]]\nname = \"proxy\"\naddress = \"127.0.0.1:0\"\n[timeouts]\ndrain = \"30s\"\nupgrade = \"10s\"\n[access]\nconnect_ports = [{}]\n",
            control.display(),
            dir.join("baton.pid").display(),
            args.baton_workers,
            echo.port()
        ),
    )?;
    let log = std::fs::File::create(dir.join("baton.log"))?;
    let first = std::process::Command::new(&baton)
        .args(["run", "--config"])
        .arg(&config)
        .env("BATON_LOG", "info,baton::access=warn")
        .stderr(log)
        .stdout(std::process::Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", baton.display()))?;
    let first_pid = first.id();
    let status = wait_status(&control).await?;
    let proxy = status["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == "proxy"))
        .and_then(|l| l["address"].as_str())
        .and_then(|a| a.parse().ok())
        .context("no proxy listener in status")?;

    let counters = Arc::new(Counters::default());
    let stop = CancellationToken::new();
    let mut workers = Vec::new();
    for _ in 0..args.workers {
        let small = format!("http://{origin}/bytes?n=1024");
        workers.push(tokio::spawn(keepalive_worker(
            proxy,
            small.clone(),
            counters.clone(),
            stop.clone(),
        )));
        workers.push(tokio::spawn(fresh_worker(proxy, small, counters.clone(), stop.clone())));
        let slow = format!("http://{origin}/slow?ms=2000&n=65536");
        workers.push(tokio::spawn(slow_worker(proxy, slow, counters.clone(), stop.clone())));
        workers.push(tokio::spawn(tunnel_worker(proxy, echo, counters.clone(), stop.clone())));
    }
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut pids = vec![first_pid];
    let mut failures = Vec::new();
    let mut ready_ms_max = 0;
    let spacing = Duration::from_millis(args.seconds * 1000 / 2 / u64::from(args.handoffs.max(1)));
    for _ in 0..args.handoffs {
        let mut done = None;
        let mut failed = None;
        baton::control::request(&control, "upgrade", |v| match v["event"].as_str() {
            Some("done") => done = Some(v),
            Some("failed" | "refused") => failed = Some(v["reason"].to_string()),
            _ => {}
        })
        .await?;
        match (done, failed) {
            (Some(d), _) => {
                pids.push(d["new_pid"].as_u64().unwrap_or(0) as u32);
                ready_ms_max = ready_ms_max.max(d["ready_ms"].as_u64().unwrap_or(0));
            }
            (None, reason) => failures.push(reason.unwrap_or_else(|| "no answer".into())),
        }
        tokio::time::sleep(spacing).await;
    }
    let total = Duration::from_secs(args.seconds);
    tokio::time::sleep(total.saturating_sub(started.elapsed()).max(Duration::from_millis(2500))).await;
    stop.cancel();
    for w in workers {
        let _ = tokio::time::timeout(Duration::from_secs(30), w).await;
    }
    let final_status = wait_status(&control).await?;
    let serving = *pids.last().unwrap_or(&first_pid);
    let old: Vec<u32> = pids[..pids.len() - 1].to_vec();
    let (exited_zero, old_problems) = reap_old_generations(&old, Duration::from_secs(40)).await;
    // Stop the serving generation and reap it too.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(serving as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = reap_old_generations(&[serving], Duration::from_secs(40)).await;
    let failed = counters.failures.load(Ordering::Relaxed) > 0 || !failures.is_empty() || !old_problems.is_empty();
    let workdir = if failed {
        Some(dir.display().to_string())
    } else {
        let _ = std::fs::remove_dir_all(&dir);
        None
    };
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let samples = counters.failure_samples.lock().map(|s| s.clone()).unwrap_or_default();
    Ok(Summary {
        handoffs_requested: args.handoffs,
        handoffs_ok: (pids.len() - 1) as u32,
        handoff_failures: failures,
        ready_ms_max,
        pids_distinct: distinct.len() == pids.len(),
        requests_ok: counters.requests_ok.load(Ordering::Relaxed),
        keepalive_retries: counters.keepalive_retries.load(Ordering::Relaxed),
        slow_ok: counters.slow_ok.load(Ordering::Relaxed),
        tunnels_ok: counters.tunnels_ok.load(Ordering::Relaxed),
        tunnel_bytes: counters.tunnel_bytes.load(Ordering::Relaxed),
        failures: counters.failures.load(Ordering::Relaxed),
        failure_samples: samples,
        old_generations: old.len(),
        old_generations_exited_zero: exited_zero,
        old_generation_problems: old_problems,
        final_generation: final_status["generation"].as_u64().unwrap_or(0),
        final_workers: final_status["workers"].as_u64().unwrap_or(0),
        workdir,
    })
}

async fn wait_status(control: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    for _ in 0..500 {
        let mut out = None;
        if baton::control::request(control, "status", |v| out = Some(v))
            .await
            .is_ok()
            && let Some(v) = out
        {
            return Ok(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("baton did not answer on {}", control.display())
}

/// Reaps `pids` (our children, or orphans re-parented to us); returns how many exited 0 and
/// what happened to the others.
async fn reap_old_generations(pids: &[u32], timeout: Duration) -> (usize, Vec<String>) {
    use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
    let deadline = Instant::now() + timeout;
    let mut left: Vec<u32> = pids.to_vec();
    let mut zero = 0;
    let mut problems = Vec::new();
    while !left.is_empty() && Instant::now() < deadline {
        let (pid, outcome) = match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => (pid, Ok(code)),
            Ok(WaitStatus::Signaled(pid, sig, _)) => (pid, Err(format!("killed by {sig}"))),
            Ok(_) => {
                // A generation whose parent generation was still draining is reaped by that
                // parent (it logs "successor exited"); here it is simply gone.
                left.retain(|p| {
                    let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p as i32), None).is_err();
                    zero += usize::from(gone);
                    !gone
                });
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Err(e) => {
                problems.push(format!("waitpid: {e}"));
                break;
            }
        };
        let pid = pid.as_raw() as u32;
        let Some(i) = left.iter().position(|p| *p == pid) else {
            continue;
        };
        left.remove(i);
        match outcome {
            Ok(0) => zero += 1,
            Ok(code) => problems.push(format!("pid {pid} exited {code}")),
            Err(e) => problems.push(format!("pid {pid} {e}")),
        }
    }
    problems.extend(left.iter().map(|p| format!("pid {p} still running after {timeout:?}")));
    (zero, problems)
}

async fn keepalive_worker(proxy: std::net::SocketAddr, url: String, c: Arc<Counters>, stop: CancellationToken) {
    let mut conn: Option<ProxyConnection> = None;
    while !stop.is_cancelled() {
        let reused = conn.as_ref().is_some_and(|k| !k.is_closed());
        if !reused {
            match ProxyConnection::open(proxy).await {
                Ok(k) => conn = Some(k),
                Err(e) => {
                    c.fail(format!("keep-alive connect: {e}"));
                    conn = None;
                    continue;
                }
            }
        }
        let Some(k) = conn.as_mut() else { continue };
        match tokio::time::timeout(REQUEST_TIMEOUT, k.get(&url)).await {
            Ok(Ok((s, body))) if s == 200 && body.len() == 1024 => {
                c.requests_ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok((s, body))) => c.fail(format!("keep-alive: status {s}, {} bytes", body.len())),
            // The server closed an idle keep-alive connection as we sent on it: a real client
            // would retry on a new connection (RFC 9112 §9.3.1). Counted apart, and a run
            // with any is not clean: a draining generation must not close under a request.
            Ok(Err(e)) if reused && e.is_closed_before_response() => {
                c.keepalive_retries.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
            Ok(Err(e)) => {
                c.fail(format!("keep-alive: {e}"));
                conn = None;
            }
            Err(_) => c.fail("keep-alive: timeout".into()),
        }
    }
}

async fn one_request(proxy: std::net::SocketAddr, url: &str, expect_len: usize) -> Result<(), String> {
    let mut k = ProxyConnection::open(proxy).await.map_err(|e| e.to_string())?;
    match tokio::time::timeout(REQUEST_TIMEOUT, k.get(url)).await {
        Ok(Ok((s, body))) if s == 200 && body.len() == expect_len => Ok(()),
        Ok(Ok((s, body))) => Err(format!("status {s}, {} bytes", body.len())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timeout".into()),
    }
}

async fn fresh_worker(proxy: std::net::SocketAddr, url: String, c: Arc<Counters>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        match one_request(proxy, &url, 1024).await {
            Ok(()) => c.requests_ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                c.fail(format!("new connection: {e}"));
                0
            }
        };
    }
}

async fn slow_worker(proxy: std::net::SocketAddr, url: String, c: Arc<Counters>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        match one_request(proxy, &url, 65536).await {
            Ok(()) => c.slow_ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                c.fail(format!("slow request: {e}"));
                0
            }
        };
    }
}

async fn tunnel_worker(
    proxy: std::net::SocketAddr,
    echo: std::net::SocketAddr,
    c: Arc<Counters>,
    stop: CancellationToken,
) {
    while !stop.is_cancelled() {
        match tokio::time::timeout(REQUEST_TIMEOUT, one_tunnel(proxy, echo, &c)).await {
            Ok(Ok(())) => c.tunnels_ok.fetch_add(1, Ordering::Relaxed),
            Ok(Err(e)) => {
                c.fail(format!("tunnel: {e}"));
                0
            }
            Err(_) => {
                c.fail("tunnel: timeout".into());
                0
            }
        };
    }
}

/// A tunnel that echoes 4 KiB messages for 1.5 s, then half-closes and expects a clean EOF.
async fn one_tunnel(proxy: std::net::SocketAddr, echo: std::net::SocketAddr, c: &Counters) -> std::io::Result<()> {
    let mut t = testkit::open_tunnel(proxy, echo).await?;
    let msg = testkit::pattern(4096);
    let mut back = vec![0u8; msg.len()];
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        t.write_all(&msg).await?;
        t.read_exact(&mut back).await?;
        if back != msg {
            return Err(std::io::Error::other("echo corrupted"));
        }
        c.tunnel_bytes.fetch_add(msg.len() as u64, Ordering::Relaxed);
    }
    t.shutdown().await?;
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).await?;
    if rest.is_empty() {
        Ok(())
    } else {
        Err(std::io::Error::other("unexpected bytes after half-close"))
    }
}
