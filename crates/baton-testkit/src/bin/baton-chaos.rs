//! `baton-chaos`: the handoff's load test. Starts loopback origins and a real baton, runs a
//! client pool against it (keep-alive requests, a new connection per request, requests whose
//! origin answers after 2 s, CONNECT tunnels echoing continuously) and triggers handoffs back
//! to back. Any client-visible failure (refused, reset, truncated, closed before a response,
//! 5xx) is counted and makes the exit status non-zero. Used by `tests/chaos.rs` and, at larger
//! scale, `scripts/chaos`.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton::control::{self, Event, Request, Status};
use baton_testkit::{self as testkit, Load, LoadReport, LoadSpec};
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;
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
    /// A fraction P of the successors is SIGKILLed at a random moment inside its canary
    /// window; those handoffs must fail ("failed after ready") and cost only the connections
    /// the crashed successor had accepted.
    #[arg(long, default_value_t = 0.0)]
    crash_after_ready: f64,
    /// baton's canary window in ms (default: 1000 with --crash-after-ready, else 100).
    #[arg(long)]
    canary_ms: Option<u64>,
    /// Long tunnels: echo hash-checked data for the whole run, across every handoff (they
    /// move to each new generation; none may break).
    #[arg(long, default_value_t = 0)]
    long_tunnels: usize,
    /// How often each long tunnel sends its 4 KiB (ms).
    #[arg(long, default_value_t = 20)]
    long_tunnel_every_ms: u64,
    /// WebSocket sessions (absolute-form upgrades) echoing numbered messages for the whole
    /// run, across every handoff (they move as tunnels do; none may break or reorder).
    #[arg(long, default_value_t = 0)]
    websockets: usize,
    /// baton's drain timeout in ms.
    #[arg(long, default_value_t = 30_000)]
    drain_ms: u64,
    /// Keep the work directory (config, baton's log) even when nothing failed.
    #[arg(long)]
    keep_workdir: bool,
    /// Make the proxy listener a TLS listener (a certificate from a throw-away CA) and speak
    /// TLS to it; new connections resume earlier sessions, across handoffs too.
    #[arg(long)]
    tls: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
    /// The seed of the dice that choose which successors crash, and when (default: from the
    /// clock). The summary prints it, so that a failing run can be replayed.
    #[arg(long)]
    seed: Option<u64>,
    /// Refused triggers (`max_draining_generations` still draining) that may be retried; a
    /// run that needs more fails: handoffs that pile up draining generations are a finding.
    #[arg(long, default_value_t = 10)]
    max_deferred: u32,
}

impl Args {
    fn canary(&self) -> Duration {
        let default = if self.crash_after_ready > 0.0 { 1000 } else { 100 };
        Duration::from_millis(self.canary_ms.unwrap_or(default))
    }
}

#[derive(serde::Serialize, Default)]
struct Summary {
    /// The proxy listener spoke TLS (`--tls`).
    tls: bool,
    handoffs_requested: u32,
    handoffs_ok: u32,
    /// Triggers refused while `limits.max_draining_generations` drained, retried once one
    /// had exited.
    handoffs_deferred: u32,
    /// The dice's seed (`--seed` replays the run's choices).
    seed: u64,
    handoff_failures: Vec<String>,
    ready_ms_max: u64,
    pids_distinct: bool,
    requests_ok: u64,
    /// Requests on a reused keep-alive connection that closed before a response: what a
    /// client would retry (RFC 9112 §9.3.1). Counted in `failures` too.
    keepalive_retries: u64,
    /// Keep-alive connections the proxy closed between requests (the worker opened a new
    /// one): what moving idle connections at a handoff avoids.
    keepalive_closed: u64,
    /// Keep-alive connections reset between requests with no `Connection: close` announced.
    /// Must be 0 unless successors were crashed on purpose.
    keepalive_resets: u64,
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
    /// Successors killed on purpose inside their canary window (`--crash-after-ready`).
    crashed_successors: usize,
    /// Connections those successors had open at their last ping, as baton reported them.
    connections_lost_reported: u64,
    /// Client connections the crashed successors held when they were killed (read from
    /// their socket fds with each one stopped, just before the kill).
    connections_held_at_crashes: usize,
    /// Client failures on those connections: the crash's.
    failures_at_crashes: u64,
    /// Client failures anywhere else: must be 0.
    failures_elsewhere: u64,
    /// The longest a new connection waited for its complete answer (accept included).
    max_new_connection_ms: u64,
    /// `--long-tunnels`: how many, how many came through intact, bytes echoed, and the
    /// first few that broke.
    long_tunnels: usize,
    long_tunnels_intact: usize,
    long_tunnel_bytes: u64,
    long_tunnel_problems: Vec<String>,
    /// `--websockets`: how many, how many came through intact, messages echoed in order,
    /// and the first few that broke.
    websockets: usize,
    websockets_intact: usize,
    websocket_messages: u64,
    websocket_problems: Vec<String>,
    /// From each successful handoff's verdict to its old generation's exit (it waits only
    /// for its own requests in flight: slow ones take 2 s).
    old_exit_ms_median: u64,
    old_exit_ms_max: u64,
    /// Kept when something failed: config and baton's log.
    workdir: Option<String>,
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
const REAP_TIMEOUT: Duration = Duration::from_secs(40);

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Long tunnels hold two sockets each here (client and echo server).
    baton_handoff::process::raise_open_files_limit().context("cannot raise RLIMIT_NOFILE")?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let summary = runtime.block_on(run(&args))?;
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    }
    runtime.shutdown_background();
    let crashed = summary.crashed_successors as u32;
    let clean = summary.failures_elsewhere == 0
        && (crashed > 0 || summary.keepalive_retries == 0)
        && summary.handoffs_ok + crashed == summary.handoffs_requested
        && summary.handoffs_deferred <= args.max_deferred
        // A crashed successor resets the idle connections it held: expected there.
        && (crashed > 0 || summary.keepalive_resets == 0)
        && summary.handoff_failures.is_empty()
        && summary.long_tunnels_intact == summary.long_tunnels
        && summary.websockets_intact == summary.websockets
        && summary.pids_distinct
        && summary.old_generations_exited_zero == summary.old_generations;
    std::process::exit(if clean { 0 } else { 1 });
}

async fn run(args: &Args) -> anyhow::Result<Summary> {
    // Old generations are re-parented to us when their parent exits: we reap and count them.
    nix::sys::prctl::set_child_subreaper(true).context("PR_SET_CHILD_SUBREAPER")?;
    let origin = testkit::start_origin().await?;
    let echo = testkit::start_echo().await?;
    let baton = Launched::start(args, echo).await?;
    let traffic = Traffic::start(baton.proxy, origin, echo, args.workers, baton.tls.clone());
    let riders = Riders::open(args, baton.proxy, echo, baton.tls.as_ref()).await?;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_millis(500)).await;

    let mut handoffs = Handoffs::run(&baton, args).await?;
    let total = Duration::from_secs(args.seconds);
    tokio::time::sleep(total.saturating_sub(started.elapsed()).max(Duration::from_millis(2500))).await;
    let traffic = traffic.finish().await;
    let riders = riders.finish().await;
    let exits = handoffs.old_exit_times().await;

    let final_status = wait_status(&baton.control).await?;
    let (exited_zero, old_problems) = stop_generations(&handoffs.pids).await;
    let held: HashSet<u16> = handoffs.crashes.iter().flatten().copied().collect();
    let (failures_at_crashes, failures_elsewhere) = traffic.failures_on(&held);
    let failed = failures_elsewhere > 0 || !handoffs.failures.is_empty() || !old_problems.is_empty() || riders.broken();
    let workdir = baton.keep_workdir_if(failed || args.keep_workdir);
    let mut summary = Summary {
        tls: args.tls,
        handoffs_requested: args.handoffs,
        handoffs_ok: (handoffs.pids.len() - 1) as u32,
        handoffs_deferred: handoffs.deferred,
        seed: handoffs.seed,
        pids_distinct: handoffs.pids_distinct(),
        ready_ms_max: handoffs.ready_ms_max,
        old_generations: handoffs.pids.len() - 1,
        handoff_failures: handoffs.failures,
        requests_ok: traffic.requests.ok,
        keepalive_retries: traffic.requests.closed_on_reuse,
        keepalive_closed: traffic.requests.reconnects,
        keepalive_resets: traffic.requests.resets,
        slow_ok: traffic.slow.ok,
        tunnels_ok: traffic.tunnels.ok,
        tunnel_bytes: traffic.tunnels.bytes,
        failures: traffic.failures(),
        failure_samples: traffic.samples(),
        old_generations_exited_zero: exited_zero,
        old_generation_problems: old_problems,
        final_generation: final_status.generation,
        final_workers: final_status.workers as u64,
        crashed_successors: handoffs.crashes.len(),
        connections_lost_reported: handoffs.lost_reported,
        connections_held_at_crashes: handoffs.crashes.iter().map(HashSet::len).sum(),
        failures_at_crashes,
        failures_elsewhere,
        max_new_connection_ms: traffic.requests.max_new_connection_ms,
        old_exit_ms_median: exits.get(exits.len() / 2).copied().unwrap_or(0),
        old_exit_ms_max: exits.last().copied().unwrap_or(0),
        workdir,
        ..Summary::default()
    };
    riders.report(&mut summary);
    Ok(summary)
}

/// What rides through every handoff for the whole run: long tunnels (`--long-tunnels`) and
/// WebSocket sessions (`--websockets`).
struct Riders {
    long: Option<testkit::LongTunnels>,
    sessions: Option<testkit::websocket::Sessions>,
}

/// How each rider came through.
struct RidersReport {
    long: Vec<testkit::TunnelReport>,
    sessions: Vec<Result<u64, String>>,
}

impl Riders {
    /// `tls`: the proxy listener speaks TLS, and the long tunnels go inside it.
    async fn open(
        args: &Args,
        proxy: SocketAddr,
        echo: SocketAddr,
        tls: Option<&testkit::ProxyTls>,
    ) -> anyhow::Result<Riders> {
        let every = Duration::from_millis(args.long_tunnel_every_ms);
        let long = match args.long_tunnels {
            0 => None,
            n => Some(testkit::LongTunnels::open_via(proxy, echo, n, 4096, every, tls).await?),
        };
        let sessions = match args.websockets {
            0 => None,
            n => Some(testkit::websocket::Sessions::open(proxy, testkit::websocket::start_echo().await?, n).await?),
        };
        Ok(Riders { long, sessions })
    }

    async fn finish(self) -> RidersReport {
        RidersReport {
            long: match self.long {
                Some(l) => l.finish().await,
                None => Vec::new(),
            },
            sessions: match self.sessions {
                Some(s) => s.finish().await,
                None => Vec::new(),
            },
        }
    }
}

impl RidersReport {
    fn long_intact(&self) -> usize {
        self.long.iter().filter(|r| r.is_intact()).count()
    }

    /// Sessions that echoed messages and closed cleanly.
    fn sessions_intact(&self) -> usize {
        self.sessions
            .iter()
            .filter(|s| s.as_ref().is_ok_and(|n| *n > 0))
            .count()
    }

    fn broken(&self) -> bool {
        self.long_intact() < self.long.len() || self.sessions_intact() < self.sessions.len()
    }

    fn report(&self, s: &mut Summary) {
        s.long_tunnels = self.long.len();
        s.long_tunnels_intact = self.long_intact();
        s.long_tunnel_bytes = self.long.iter().map(|r| r.bytes).sum();
        s.long_tunnel_problems = self.long.iter().filter_map(|r| r.error.clone()).take(5).collect();
        s.websockets = self.sessions.len();
        s.websockets_intact = self.sessions_intact();
        s.websocket_messages = self.sessions.iter().filter_map(|r| r.as_ref().ok()).sum();
        s.websocket_problems = self.sessions.iter().filter_map(|r| r.clone().err()).take(5).collect();
    }
}

/// The first generation, started in its own work directory.
struct Launched {
    dir: PathBuf,
    control: PathBuf,
    first_pid: u32,
    proxy: SocketAddr,
    /// The client side when the listener speaks TLS.
    tls: Option<testkit::ProxyTls>,
}

impl Launched {
    async fn start(args: &Args, echo: SocketAddr) -> anyhow::Result<Launched> {
        let baton = match &args.baton {
            Some(p) => p.clone(),
            None => std::env::current_exe()?.with_file_name("baton"),
        };
        let dir = std::env::temp_dir().join(format!("baton-chaos-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let control = dir.join("control.sock");
        let config = dir.join("baton.toml");
        let (tls, tls_line) = if args.tls {
            let ca = testkit::TestCa::new()?;
            let (cert, key) = ca.write_leaf(&dir, "proxy", 1, Duration::from_secs(86_400))?;
            let line = format!(
                "tls = {{ cert = \"{}\", key = \"{}\" }}\n",
                cert.display(),
                key.display()
            );
            (Some(ca.client()?), line)
        } else {
            (None, String::new())
        };
        let text = config_text(&dir, args.baton_workers, echo.port(), args.canary(), args.drain_ms);
        std::fs::write(
            &config,
            text.replace(LISTENER_END, &format!("{LISTENER_END}{tls_line}")),
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
        let proxy = wait_status(&control)
            .await?
            .tcp_listener("proxy")
            .context("no TCP proxy listener in status")?;
        Ok(Launched {
            dir,
            control,
            first_pid: first.id(),
            proxy,
            tls,
        })
    }

    /// The work directory's path if something failed (kept for its log), else removed.
    fn keep_workdir_if(&self, failed: bool) -> Option<String> {
        if failed {
            return Some(self.dir.display().to_string());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
        None
    }
}

/// The end of the proxy listener's table in [`config_text`] (a `tls` line goes after it).
const LISTENER_END: &str = "address = \"127.0.0.1:0\"\n";

fn config_text(dir: &Path, baton_workers: usize, connect_port: u16, canary: Duration, drain_ms: u64) -> String {
    let canary = canary.as_millis();
    format!(
        "control_socket = \"{}\"\npid_file = \"{}\"\nworkers = {baton_workers}\n\
         [[listener]]\nname = \"proxy\"\naddress = \"127.0.0.1:0\"\n\
         [timeouts]\ndrain = \"{drain_ms}ms\"\nupgrade = \"10s\"\ncanary = \"{canary}ms\"\n\
         [access]\nconnect_ports = [{connect_port}]\nallow_local_destinations = true\nno_sni = \"allow\"\n",
        dir.join("control.sock").display(),
        dir.join("baton.pid").display(),
    )
}

async fn wait_status(control: &Path) -> anyhow::Result<Status> {
    for _ in 0..500 {
        if let Ok((status, _)) = control::status(control).await {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("baton did not answer on {}", control.display())
}

/// The handoffs triggered, back to back: every generation's pid, first to serving, and the
/// successors crashed on purpose.
struct Handoffs {
    pids: Vec<u32>,
    failures: Vec<String>,
    ready_ms_max: u64,
    /// Handoffs whose successor was killed in its canary window, each with the ports of the
    /// client connections it held.
    crashes: Vec<HashSet<u16>>,
    /// Connections the crashed successors had open at their last ping (baton's report).
    lost_reported: u64,
    /// Per successful handoff: how long its old generation lived after the verdict.
    exits: Vec<JoinHandle<u64>>,
    /// Triggers refused because `limits.max_draining_generations` were still draining, and
    /// tried again once one had exited (an operator's move; no client sees it).
    deferred: u32,
    seed: u64,
}

impl Handoffs {
    async fn run(baton: &Launched, args: &Args) -> anyhow::Result<Handoffs> {
        let mut dice = Dice::new(args.seed);
        let mut h = Handoffs {
            pids: vec![baton.first_pid],
            failures: Vec::new(),
            ready_ms_max: 0,
            crashes: Vec::new(),
            lost_reported: 0,
            exits: Vec::new(),
            deferred: 0,
            seed: dice.seed,
        };
        let spacing = Duration::from_millis(args.seconds * 1000 / 2 / u64::from(args.handoffs.max(1)));
        for _ in 0..args.handoffs {
            let crash = (dice.next() < args.crash_after_ready).then(|| Crash {
                log: baton.dir.join("baton.log"),
                port: baton.proxy.port(),
                // In the first half: a loaded machine may run the strike late, and a kill
                // after the verdict would crash the serving generation instead.
                after: args.canary().mul_f64(0.5 * dice.next()),
            });
            let planned = crash.is_some();
            let mut outcome = handoff(&baton.control, crash.clone()).await?;
            while let (Err(reason), _) = &outcome
                && reason.contains("still draining")
                && h.deferred <= args.max_deferred
            {
                h.deferred += 1;
                h.wait_for_an_exit().await;
                outcome = handoff(&baton.control, crash.clone()).await?;
            }
            match (outcome, planned) {
                ((Ok(report), _), false) => {
                    h.exits.push(tokio::spawn(exit_ms(report.old_pid, Instant::now())));
                    h.pids.push(report.new_pid);
                    h.ready_ms_max = h.ready_ms_max.max(report.ready_ms);
                }
                ((Err(reason), Some(held)), true) if reason.contains("failed after ready") => {
                    h.crashes.push(held);
                    h.lost_reported += lost_connections(&reason);
                }
                ((outcome, _), planned) => h.failures.push(format!("crash planned: {planned}; {outcome:?}")),
            }
            tokio::time::sleep(spacing).await;
        }
        Ok(h)
    }

    /// Waits (at most the drain timeout's worth) until one of the old generations still
    /// draining has exited.
    async fn wait_for_an_exit(&self) {
        let old = &self.pids[..self.pids.len().saturating_sub(1)];
        let draining = old.iter().filter(|p| baton_handoff::process::alive(**p)).count();
        for _ in 0..6_000 {
            if old.iter().filter(|p| baton_handoff::process::alive(**p)).count() < draining {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The old generations' times from verdict to exit, in ms, sorted.
    async fn old_exit_times(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for h in self.exits.drain(..) {
            out.push(h.await.unwrap_or(u64::MAX));
        }
        out.sort_unstable();
        out
    }

    fn pids_distinct(&self) -> bool {
        let mut distinct = self.pids.clone();
        distinct.sort_unstable();
        distinct.dedup();
        distinct.len() == self.pids.len()
    }
}

/// Milliseconds from `since` until `pid` exits (a zombie counts as exited), polled every
/// 5 ms for at most a minute.
async fn exit_ms(pid: u32, since: Instant) -> u64 {
    for _ in 0..12_000 {
        if !baton_handoff::process::alive(pid) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    since.elapsed().as_millis() as u64
}

/// `lived N ms, M connections lost` in a canary failure's reason: M.
fn lost_connections(reason: &str) -> u64 {
    let before = reason.split(" connections lost").next().unwrap_or("");
    before.rsplit(' ').next().and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// A successor to kill `after` its readiness, which its log line `baton serving` shows.
#[derive(Clone)]
struct Crash {
    log: PathBuf,
    /// The proxy listener's port: the successor's client connections are on it.
    port: u16,
    after: Duration,
}

impl Crash {
    /// Waits until generation `pid` serves, then `after`, then kills it; the ports of the
    /// client connections it held. It is stopped (SIGSTOP) while they are read, so that it
    /// accepts none after: connections still in the listener's queue are the listening
    /// socket's, which the old generation holds too, and survive.
    async fn strike(self, pid: u32) -> Option<HashSet<u16>> {
        let serving = format!("pid={pid} generation=");
        for _ in 0..5000 {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            if log.lines().any(|l| l.contains("baton serving") && l.contains(&serving)) {
                tokio::time::sleep(self.after).await;
                let target = nix::unistd::Pid::from_raw(pid as i32);
                nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGSTOP).ok()?;
                let held = testkit::sockets::wait_stopped(pid, Duration::from_secs(5))
                    .and_then(|()| testkit::sockets::client_ports(pid, self.port));
                nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL).ok()?;
                return held
                    .inspect_err(|e| eprintln!("reading generation {pid}'s sockets: {e}"))
                    .ok();
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        None
    }
}

/// A small xorshift generator: which handoffs crash, and when (no dependency for that).
struct Dice {
    seed: u64,
    state: u64,
}

impl Dice {
    /// From `seed`, or the clock.
    fn new(seed: Option<u64>) -> Dice {
        let seed = seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0x9e37_79b9, |d| d.as_nanos() as u64)
        });
        // xorshift never leaves 0: an odd state.
        Dice { seed, state: seed | 1 }
    }

    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.state ^= self.state << 13;
        self.state ^= self.state >> 7;
        self.state ^= self.state << 17;
        (self.state >> 11) as f64 / (1u64 << 53) as f64
    }
}

type Outcome = (Result<control::UpgradeReport, String>, Option<HashSet<u16>>);

/// One `baton upgrade`: the report, or why it failed; with `crash`, the successor is killed
/// in its window, and the client connections it held are returned.
async fn handoff(control: &Path, crash: Option<Crash>) -> anyhow::Result<Outcome> {
    let mut outcome = None;
    let mut striker = None;
    let mut crash = crash;
    control::events(control, Request::Upgrade { wait_drain: false }, |ev| match ev {
        Event::Spawned { pid, .. } => {
            striker = crash.take().map(|c| tokio::spawn(c.strike(pid)));
        }
        Event::Done(report) => {
            // The window is over: a strike still waiting would kill the serving generation.
            if let Some(s) = &striker {
                s.abort();
            }
            outcome = Some(Ok(report));
        }
        Event::Failed { reason } | Event::Refused { reason } | Event::Error { reason } => {
            outcome = Some(Err(reason));
        }
        _ => {}
    })
    .await?;
    let struck = match striker {
        Some(s) => s.await.ok().flatten(),
        None => None,
    };
    Ok((outcome.unwrap_or_else(|| Err("no answer".into())), struck))
}

/// Reaps the old generations (all but the last of `pids`), then stops the serving one and
/// reaps it too; returns how many old generations exited 0 and what happened to the others.
async fn stop_generations(pids: &[u32]) -> (usize, Vec<String>) {
    let Some((serving, old)) = pids.split_last() else {
        return (0, Vec::new());
    };
    let outcome = reap_generations(old, REAP_TIMEOUT).await;
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(*serving as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = reap_generations(&[*serving], REAP_TIMEOUT).await;
    outcome
}

/// Reaps `pids` (our children, or orphans re-parented to us); returns how many exited 0 and
/// what happened to the others.
async fn reap_generations(pids: &[u32], timeout: Duration) -> (usize, Vec<String>) {
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

/// The client pool: small requests (keep-alive and a new connection each), slow requests
/// (a new connection each) and tunnels, `workers` of each kind.
struct Traffic {
    requests: Load,
    slow: Load,
    tunnels: Tunnels,
}

/// What the pool saw.
struct TrafficReport {
    requests: LoadReport,
    slow: LoadReport,
    tunnels: TunnelReport,
}

impl Traffic {
    fn start(
        proxy: SocketAddr,
        origin: SocketAddr,
        echo: SocketAddr,
        workers: usize,
        tls: Option<testkit::ProxyTls>,
    ) -> Traffic {
        let mut small = LoadSpec::new(format!("http://{origin}/bytes?n=1024"))
            .body_len(1024)
            .workers(workers, workers)
            .timeout(REQUEST_TIMEOUT);
        let mut slow = LoadSpec::new(format!("http://{origin}/slow?ms=2000&n=65536"))
            .body_len(65536)
            .workers(0, workers)
            .timeout(REQUEST_TIMEOUT);
        (small.tls, slow.tls) = (tls.clone(), tls.clone());
        Traffic {
            requests: Load::start(proxy, small),
            slow: Load::start(proxy, slow),
            tunnels: Tunnels::start(proxy, echo, workers, tls),
        }
    }

    async fn finish(self) -> TrafficReport {
        let (requests, slow, tunnels) = tokio::join!(self.requests.finish(), self.slow.finish(), self.tunnels.finish());
        TrafficReport {
            requests,
            slow,
            tunnels,
        }
    }
}

impl TrafficReport {
    fn failures(&self) -> u64 {
        self.requests.failed + self.slow.failed + self.tunnels.failed
    }

    /// Failures on one of the connections in `held` (a request or tunnel on a crashed
    /// successor fails when it dies), and the others. A failure past the pools' record limit
    /// has no port and counts among the others.
    fn failures_on(&self, held: &HashSet<u16>) -> (u64, u64) {
        let ports = [
            &self.requests.failure_ports,
            &self.slow.failure_ports,
            &self.tunnels.failure_ports,
        ];
        let attributed = ports
            .iter()
            .flat_map(|v| v.iter())
            .filter(|p| p.is_some_and(|p| held.contains(&p)))
            .count() as u64;
        (attributed, self.failures() - attributed)
    }

    /// The first failures of every kind, at most 20 in all.
    fn samples(&self) -> Vec<String> {
        let slow = self.slow.samples.iter().map(|s| format!("slow request, {s}"));
        let tunnels = self.tunnels.samples.iter().map(|s| format!("tunnel: {s}"));
        self.requests
            .samples
            .iter()
            .cloned()
            .chain(slow)
            .chain(tunnels)
            .take(testkit::load::MAX_SAMPLES)
            .collect()
    }
}

/// Workers each holding a CONNECT tunnel to the echo server, one after the other.
struct Tunnels {
    stop: CancellationToken,
    tally: Arc<TunnelTally>,
    workers: Vec<JoinHandle<()>>,
}

#[derive(Default)]
struct TunnelTally {
    ok: AtomicU64,
    bytes: AtomicU64,
    failed: AtomicU64,
    samples: std::sync::Mutex<Vec<String>>,
    failure_ports: std::sync::Mutex<Vec<Option<u16>>>,
}

struct TunnelReport {
    ok: u64,
    bytes: u64,
    failed: u64,
    samples: Vec<String>,
    failure_ports: Vec<Option<u16>>,
}

impl TunnelTally {
    /// A tunnel failed, on the connection from `port` (`None`: none was made).
    fn fail(&self, what: String, port: Option<u16>) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut s) = self.samples.lock()
            && s.len() < testkit::load::MAX_SAMPLES
        {
            s.push(what);
        }
        if let Ok(mut ports) = self.failure_ports.lock()
            && ports.len() < testkit::load::MAX_FAILURE_PORTS
        {
            ports.push(port);
        }
    }
}

impl Tunnels {
    fn start(proxy: SocketAddr, echo: SocketAddr, workers: usize, tls: Option<testkit::ProxyTls>) -> Tunnels {
        let stop = CancellationToken::new();
        let tally = Arc::new(TunnelTally::default());
        let workers = (0..workers)
            .map(|_| {
                let to = Tunnel {
                    proxy,
                    echo,
                    tls: tls.clone(),
                };
                tokio::spawn(tunnel_worker(to, tally.clone(), stop.clone()))
            })
            .collect();
        Tunnels { stop, tally, workers }
    }

    async fn finish(self) -> TunnelReport {
        self.stop.cancel();
        for w in self.workers {
            if let Err(e) = w.await {
                self.tally.fail(format!("worker panicked: {e}"), None);
            }
        }
        let t = &self.tally;
        TunnelReport {
            ok: t.ok.load(Ordering::Relaxed),
            bytes: t.bytes.load(Ordering::Relaxed),
            failed: t.failed.load(Ordering::Relaxed),
            samples: t.samples.lock().map(|s| s.clone()).unwrap_or_default(),
            failure_ports: t.failure_ports.lock().map(|s| s.clone()).unwrap_or_default(),
        }
    }
}

/// Where a tunnel worker's tunnels go: through `proxy` (over TLS with `tls`) to `echo`.
struct Tunnel {
    proxy: SocketAddr,
    echo: SocketAddr,
    tls: Option<testkit::ProxyTls>,
}

async fn tunnel_worker(to: Tunnel, tally: Arc<TunnelTally>, stop: CancellationToken) {
    while !stop.is_cancelled() {
        let mut port = None;
        match tokio::time::timeout(REQUEST_TIMEOUT, one_tunnel(&to, &tally, &mut port)).await {
            Ok(Ok(())) => {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Err(e)) => tally.fail(e.to_string(), port),
            Err(_) => tally.fail(format!("no clean end within {REQUEST_TIMEOUT:?}"), port),
        }
    }
}

/// A tunnel that echoes 4 KiB messages for 1.5 s, then half-closes and expects a clean EOF.
/// `port` is set to its connection's port as soon as there is one.
async fn one_tunnel(to: &Tunnel, tally: &TunnelTally, port: &mut Option<u16>) -> std::io::Result<()> {
    let tcp = testkit::connect_tcp(to.proxy).await?;
    *port = Some(tcp.local_addr()?.port());
    let mut t = testkit::open_tunnel_over(tcp, to.echo, to.tls.as_ref()).await?;
    let msg = testkit::pattern(4096);
    let mut back = vec![0u8; msg.len()];
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        t.write_all(&msg).await?;
        t.read_exact(&mut back).await?;
        if back != msg {
            return Err(std::io::Error::other("echo corrupted"));
        }
        tally.bytes.fetch_add(msg.len() as u64, Ordering::Relaxed);
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
