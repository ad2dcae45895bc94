//! Runs `examples/hello` under keep-alive load from four clients and upgrades it three times
//! with SIGUSR2: no client may see a refused, reset or cut connection or a non-200 answer,
//! every generation must serve, and every old generation must exit.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_handoff::process::alive;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CLIENTS: usize = 4;
const UPGRADES: u64 = 3;
/// Responses each generation must have served before the test moves on.
const SERVED_PER_GENERATION: u64 = 1000;
/// Bound on every single wait (a generation starting, exiting, serving; one request).
const STEP: Duration = Duration::from_secs(10);
/// Hard bound on the clients' load, whatever happens to the orchestration.
const LOAD_LIMIT: Duration = Duration::from_secs(15);
const MAX_REQUESTS_PER_CLIENT: u64 = 2_000_000;
/// A client gives up after this many failures: enough to diagnose, not a flood.
const MAX_FAILURES: usize = 20;
const POLL: Duration = Duration::from_millis(2);
/// The example answers in under 100 bytes; anything longer is a broken response.
const MAX_RESPONSE: usize = 16 * 1024;
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: example_under_load\r\n\r\n";

/// A `serving pid=<pid> generation=<n> on <addr>` line.
#[derive(Debug, Clone, Copy)]
struct Generation {
    pid: u32,
    generation: u64,
}

/// What the generations printed, shared by the stdout reader and the cleanup guard.
#[derive(Default)]
struct Seen {
    generations: Vec<Generation>,
    /// Every generation holds the stdout pipe: end of file means all of them are gone.
    stdout_closed: bool,
}

#[derive(Default)]
struct Tally {
    served_by: HashMap<u32, u64>,
    failures: Vec<String>,
    /// Responses with `Connection: close` (the client reconnects).
    told_to_close: u64,
    /// Keep-alive connections found closed by the server before reuse (legal; the client reconnects).
    closed_while_idle: u64,
}

impl Tally {
    fn served(&self, pid: u32) -> u64 {
        self.served_by.get(&pid).copied().unwrap_or(0)
    }
}

/// Kills every generation still running when the test ends, passed or failed, and waits until
/// the stdout pipe closes (every generation gone), killing any successor that showed up late.
struct Cleanup {
    first: Child,
    seen: Arc<Mutex<Seen>>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = self.first.kill();
        let _ = self.first.wait();
        for _ in 0..50 {
            let (pids, closed) = {
                let seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
                (
                    seen.generations.iter().map(|g| g.pid).collect::<Vec<_>>(),
                    seen.stdout_closed,
                )
            };
            if closed {
                return;
            }
            for pid in pids.into_iter().filter(|&pid| alive(pid) && is_example(pid)) {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("cleanup: the example's stdout is still open after 5 s; a generation may be left running");
    }
}

/// Guards against a recycled pid: only the example's processes are killed.
fn is_example(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|comm| comm.trim_end() == "hello")
}

/// `target/<profile>/examples/hello`, next to this test's `target/<profile>/deps/`. Plain
/// `cargo test` builds it; `cargo test --test example_under_load` alone does not, so a binary
/// older than its sources is refused rather than tested.
fn example_binary() -> PathBuf {
    let test_exe = std::env::current_exe().expect("current_exe");
    let target_dir = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let binary = target_dir.join("examples/hello");
    let built = std::fs::metadata(&binary).and_then(|m| m.modified());
    let built = built.unwrap_or_else(|e| panic!("{}: {e}; run `cargo test -p baton-handoff`", binary.display()));
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = std::fs::read_dir(crate_dir.join("src"))
        .expect("src/")
        .filter_map(|e| Some(e.ok()?.path()));
    for source in sources.chain([crate_dir.join("examples/hello.rs")]) {
        let changed = std::fs::metadata(&source)
            .and_then(|m| m.modified())
            .expect("source mtime");
        assert!(
            changed <= built,
            "{} is older than {}; run `cargo test -p baton-handoff`",
            binary.display(),
            source.display()
        );
    }
    binary
}

fn free_loopback_addr() -> String {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    probe.local_addr().expect("local_addr").to_string()
}

fn parse_serving_line(line: &str) -> Option<Generation> {
    let mut words = line.strip_prefix("serving ")?.split(' ');
    let pid = words.next()?.strip_prefix("pid=")?.parse().ok()?;
    let generation = words.next()?.strip_prefix("generation=")?.parse().ok()?;
    Some(Generation { pid, generation })
}

/// Reads the generations' stdout (shared by all of them) until every one has closed it.
fn spawn_stdout_reader(stdout: impl Read + Send + 'static, seen: Arc<Mutex<Seen>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            eprintln!("[hello stdout] {line}");
            if let Some(g) = parse_serving_line(&line) {
                seen.lock().unwrap_or_else(|e| e.into_inner()).generations.push(g);
            }
        }
        seen.lock().unwrap_or_else(|e| e.into_inner()).stdout_closed = true;
    });
}

/// Forwards the generations' stderr into the test's (captured) output.
fn spawn_stderr_forwarder(stderr: impl Read + Send + 'static) {
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("[hello stderr] {line}");
        }
    });
}

/// Polls `probe` every [`POLL`] until it yields, for at most `limit`.
async fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    let max_polls = limit.as_millis() / POLL.as_millis() + 1;
    for _ in 0..max_polls {
        if let Some(v) = probe() {
            return v;
        }
        if started.elapsed() > limit {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("timed out after {limit:?} waiting for {what}");
}

/// Whether the server has closed an idle connection (end of file waiting to be read).
fn closed_by_server(stream: &TcpStream) -> bool {
    use nix::sys::socket::{MsgFlags, recv};
    let mut byte = [0u8; 1];
    matches!(
        recv(
            stream.as_raw_fd(),
            &mut byte,
            MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT
        ),
        Ok(0)
    )
}

/// Sends one GET on `conn` (connecting first if there is none) and reads one complete response.
/// Returns the pid in the body and whether the server closes the connection; `conn` keeps the
/// stream unless it does.
async fn one_request(conn: &mut Option<TcpStream>, addr: &str) -> Result<(u32, bool), String> {
    let mut stream = match conn.take() {
        Some(s) => s,
        None => TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?,
    };
    stream.write_all(REQUEST).await.map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let (head_end, body_len) = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break (end + 4, content_length(&buf[..end])?);
        }
        read_more(&mut stream, &mut buf).await?;
    };
    if head_end + body_len > MAX_RESPONSE {
        return Err(format!("response of {} bytes", head_end + body_len));
    }
    while buf.len() < head_end + body_len {
        read_more(&mut stream, &mut buf).await?;
    }
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200 ") {
        return Err(format!("not a 200: {head:?}"));
    }
    let body = String::from_utf8_lossy(&buf[head_end..head_end + body_len]).to_string();
    let pid = body
        .split_whitespace()
        .find_map(|w| w.strip_prefix("pid=")?.parse().ok())
        .ok_or_else(|| format!("no pid in body {body:?}"))?;
    let close = head.contains("\r\nconnection: close\r\n");
    if !close {
        *conn = Some(stream);
    }
    Ok((pid, close))
}

/// Appends what arrives next to `buf`; end of file here is a cut response.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    if buf.len() > MAX_RESPONSE {
        return Err(format!("no complete response in {} bytes", buf.len()));
    }
    let mut chunk = [0u8; 1024];
    match stream.read(&mut chunk).await {
        Ok(0) => Err("connection closed before a complete response".to_string()),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(format!("read: {e}")),
    }
}

fn content_length(head: &[u8]) -> Result<usize, String> {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
        .ok_or_else(|| format!("no content-length in {head:?}"))
}

/// Keep-alive GETs in a loop until `stop` (or [`LOAD_LIMIT`], or [`MAX_FAILURES`]), recording
/// every outcome.
async fn client(id: usize, addr: String, stop: Arc<AtomicBool>, tally: Arc<Mutex<Tally>>) {
    let started = Instant::now();
    let mut conn: Option<TcpStream> = None;
    for _ in 0..MAX_REQUESTS_PER_CLIENT {
        if stop.load(Ordering::Relaxed) || started.elapsed() > LOAD_LIMIT {
            return;
        }
        if conn.as_ref().is_some_and(closed_by_server) {
            conn = None;
            tally.lock().unwrap().closed_while_idle += 1;
        }
        let outcome = tokio::time::timeout(STEP, one_request(&mut conn, &addr)).await;
        let mut tally = tally.lock().unwrap();
        match outcome {
            Ok(Ok((pid, close))) => {
                *tally.served_by.entry(pid).or_default() += 1;
                tally.told_to_close += u64::from(close);
            }
            Ok(Err(e)) => tally
                .failures
                .push(format!("client {id} at {:?}: {e}", started.elapsed())),
            Err(_) => tally.failures.push(format!("client {id}: no response within {STEP:?}")),
        }
        if tally.failures.len() >= MAX_FAILURES {
            return;
        }
    }
}

/// Starts the first generation with its stdout and stderr read by threads.
fn start_example(addr: &str) -> (Cleanup, Arc<Mutex<Seen>>) {
    let binary = example_binary();
    let mut first = Command::new(&binary)
        .arg(addr)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the example");
    let seen = Arc::new(Mutex::new(Seen::default()));
    spawn_stdout_reader(first.stdout.take().expect("stdout"), seen.clone());
    spawn_stderr_forwarder(first.stderr.take().expect("stderr"));
    let cleanup = Cleanup {
        first,
        seen: seen.clone(),
    };
    (cleanup, seen)
}

/// The pid of generation `n` once it printed its `serving` line.
fn generation(seen: &Arc<Mutex<Seen>>, n: u64) -> impl FnMut() -> Option<u32> + use<> {
    let seen = seen.clone();
    move || {
        let seen = seen.lock().unwrap();
        seen.generations.iter().find(|g| g.generation == n).map(|g| g.pid)
    }
}

/// Whether `pid` has served [`SERVED_PER_GENERATION`] responses.
fn has_served(tally: &Arc<Mutex<Tally>>, pid: u32) -> impl FnMut() -> Option<()> + use<> {
    let tally = tally.clone();
    move || (tally.lock().unwrap().served(pid) >= SERVED_PER_GENERATION).then_some(())
}

/// SIGUSR2 to generation `n - 1`; returns generation `n`'s pid once `n - 1` has exited and `n`
/// has served its share.
async fn upgrade(seen: &Arc<Mutex<Seen>>, tally: &Arc<Mutex<Tally>>, old: u32, n: u64) -> u32 {
    kill(Pid::from_raw(old as i32), Signal::SIGUSR2).expect("SIGUSR2");
    let new = wait_for(&format!("generation {n} to start"), STEP, generation(seen, n)).await;
    assert_ne!(new, old, "generation {n} has its predecessor's pid");
    let exited = || (!alive(old)).then_some(());
    wait_for(&format!("generation {} (pid {old}) to exit", n - 1), STEP, exited).await;
    wait_for(
        &format!("generation {n} (pid {new}) to serve"),
        STEP,
        has_served(tally, new),
    )
    .await;
    new
}

/// Every request answered 200 by a known generation, each generation served, every old one exited.
fn check(tally: &Tally, pids: &[u32], started: Instant) {
    let per_generation: Vec<(u32, u64)> = pids.iter().map(|&p| (p, tally.served(p))).collect();
    eprintln!(
        "{} requests in {:?}; served by (pid, responses): {per_generation:?}; {} failures; \
         {} `Connection: close` answers; {} idle connections closed by the server",
        tally.served_by.values().sum::<u64>(),
        started.elapsed(),
        tally.failures.len(),
        tally.told_to_close,
        tally.closed_while_idle,
    );
    let failures = &tally.failures;
    assert!(failures.is_empty(), "{} failed requests: {failures:#?}", failures.len());
    let unknown: Vec<_> = tally.served_by.keys().filter(|p| !pids.contains(p)).collect();
    assert!(
        unknown.is_empty(),
        "answers from pids that never printed a serving line: {unknown:?}"
    );
    for (pid, served) in per_generation {
        assert!(served > 0, "generation with pid {pid} served nothing");
    }
    for &old in &pids[..pids.len() - 1] {
        assert!(!alive(old), "old generation {old} still runs");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_upgrades_under_keep_alive_load_lose_nothing() {
    let started = Instant::now();
    let addr = free_loopback_addr();
    let (_cleanup, seen) = start_example(&addr);
    let mut pids = vec![wait_for("generation 1 to start", STEP, generation(&seen, 1)).await];

    let (stop, tally) = (Arc::new(AtomicBool::new(false)), Arc::new(Mutex::new(Tally::default())));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|id| tokio::spawn(client(id, addr.clone(), stop.clone(), tally.clone())))
        .collect();
    wait_for("generation 1 to serve", STEP, has_served(&tally, pids[0])).await;
    for n in 2..=UPGRADES + 1 {
        let old = *pids.last().expect("a generation");
        pids.push(upgrade(&seen, &tally, old, n).await);
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(STEP, c)
            .await
            .expect("client stops")
            .expect("client task");
    }

    check(&tally.lock().unwrap(), &pids, started);
    let last = *pids.last().expect("a generation");
    kill(Pid::from_raw(last as i32), Signal::SIGTERM).expect("SIGTERM");
    wait_for("the last generation to exit", STEP, || (!alive(last)).then_some(())).await;
}
