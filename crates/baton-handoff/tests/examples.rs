//! Runs each example (`examples/hello.rs`, `examples/axum.rs`) under load and upgrades it
//! three times with SIGHUP: every request must succeed, each handoff must bring a new pid
//! that answers, and every old generation must exit. The load is keep-alive clients and
//! clients that open a new connection per request, on a loopback ephemeral port. Every wait
//! is for an event (a line, a response, a process's pidfd) and bounded.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc};

const KEEP_ALIVE_CLIENTS: usize = 3;
const NEW_CONNECTION_CLIENTS: usize = 3;
const UPGRADES: usize = 3;
/// Responses each generation must have served before the next handoff: the load runs
/// through every handoff, not only around it.
const SERVED_PER_GENERATION: u64 = 200;
/// Bound on every single wait: a generation starting, serving, exiting; one request.
const STEP: Duration = Duration::from_secs(20);
/// Hard bound on the clients' load, whatever happens to the orchestration.
const LOAD_LIMIT: Duration = Duration::from_secs(120);
/// A client gives up after this many failures: enough to diagnose, not a flood.
const MAX_FAILURES: usize = 20;
/// The examples answer in under 200 bytes; anything longer is a broken response.
const MAX_RESPONSE: usize = 16 * 1024;

/// What the clients saw, and a wake-up for whoever waits on it.
#[derive(Default)]
struct Tally {
    served_by: HashMap<u32, u64>,
    failures: Vec<String>,
    /// Responses with `Connection: close` to keep-alive clients (they reconnect).
    told_to_close: u64,
    /// Keep-alive connections found closed by the server before reuse (legal; they reconnect).
    closed_while_idle: u64,
}

struct Load {
    tally: Mutex<Tally>,
    changed: Notify,
    stop: AtomicBool,
}

impl Load {
    fn served(&self, pid: u32) -> u64 {
        self.tally.lock().unwrap().served_by.get(&pid).copied().unwrap_or(0)
    }

    fn record(&self, outcome: Result<(u32, bool), String>, what: &str) {
        let mut tally = self.tally.lock().unwrap();
        match outcome {
            Ok((pid, close)) => {
                *tally.served_by.entry(pid).or_default() += 1;
                tally.told_to_close += u64::from(close);
            }
            Err(e) => tally.failures.push(format!("{what}: {e}")),
        }
        drop(tally);
        self.changed.notify_waiters();
    }

    fn gave_up(&self) -> bool {
        self.tally.lock().unwrap().failures.len() >= MAX_FAILURES
    }

    /// Waits until `pid` has served `n` responses (woken by each response), at most [`STEP`].
    async fn until_served(&self, pid: u32, n: u64, what: &str) {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let changed = self.changed.notified();
            if self.served(pid) >= n {
                return;
            }
            let failures = self.tally.lock().unwrap().failures.clone();
            assert!(
                failures.is_empty(),
                "requests failed while waiting for {what}: {failures:#?}"
            );
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                panic!(
                    "{what}: pid {pid} served {} of {n} responses within {STEP:?}",
                    self.served(pid)
                );
            }
        }
    }
}

/// A generation of the example: its pid, and its pidfd (so that neither a wait nor a kill
/// can reach another process that got the pid later).
struct Generation {
    pid: u32,
    pidfd: OwnedFd,
}

impl Generation {
    fn new(pid: u32) -> Generation {
        // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1; no memory.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::c_int, 0) };
        assert!(fd >= 0, "pidfd_open({pid}): {}", std::io::Error::last_os_error());
        // SAFETY: pidfd_open returned a fresh fd that nothing else owns.
        Generation {
            pid,
            pidfd: unsafe { OwnedFd::from_raw_fd(fd as i32) },
        }
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: pidfd_send_signal(2) with a pidfd we own, no siginfo, no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<u8>(),
                0,
            )
        };
    }

    /// Waits until the process has ended (its pidfd turns readable), at most `limit`.
    async fn exited_within(&self, limit: Duration) -> bool {
        let dup = self.pidfd.try_clone().expect("dup pidfd");
        // SAFETY: the AsyncFd owns `dup`, an open fd, until it is dropped at the end of this
        // function; OwnedFd's as_raw_fd always returns that fd.
        let fd = unsafe { AsyncFd::register(dup) }
            .map_err(|e| e.to_string())
            .expect("register pidfd");
        tokio::time::timeout(limit, fd.readable()).await.is_ok()
    }
}

/// The example's process tree: the first generation (our child) and every generation seen.
/// Dropped, it kills whichever still runs, passed or failed.
struct Example {
    first: Child,
    generations: Vec<Generation>,
    lines: mpsc::UnboundedReceiver<String>,
}

impl Drop for Example {
    fn drop(&mut self) {
        for g in &self.generations {
            g.signal(libc::SIGKILL);
        }
        let _ = self.first.kill();
        let _ = self.first.wait();
    }
}

impl Example {
    /// Starts `name` on an ephemeral loopback port; returns it and its address once its first
    /// generation printed its `serving` line.
    async fn start(name: &str) -> (Example, String) {
        let mut first = Command::new(example_binary(name))
            .arg("127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn the {name} example: {e}"));
        let (tx, lines) = mpsc::unbounded_channel();
        let stdout = first.stdout.take().expect("stdout");
        // Every generation shares the pipe: its lines come from all of them, in order.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                eprintln!("[example stdout] {line}");
                let _ = tx.send(line);
            }
        });
        let stderr = first.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[example stderr] {line}");
            }
        });
        let mut example = Example {
            first,
            generations: Vec::new(),
            lines,
        };
        let (pid, addr) = example.next_serving("the first generation to serve").await;
        assert_eq!(pid, example.first.id(), "the first serving line is our child's");
        (example, addr)
    }

    /// The next `serving pid=<pid> on <addr>` line, at most [`STEP`] away; the generation it
    /// names is held from here on.
    async fn next_serving(&mut self, what: &str) -> (u32, String) {
        let line = tokio::time::timeout(STEP, self.lines.recv())
            .await
            .unwrap_or_else(|_| panic!("{what}: no serving line within {STEP:?}"))
            .unwrap_or_else(|| panic!("{what}: every generation closed stdout (all exited)"));
        let parsed = line
            .strip_prefix("serving pid=")
            .and_then(|rest| rest.split_once(" on "));
        let (pid, addr) = parsed.unwrap_or_else(|| panic!("{what}: not a serving line: {line:?}"));
        let pid: u32 = pid.parse().unwrap_or_else(|_| panic!("{what}: pid in {line:?}"));
        self.generations.push(Generation::new(pid));
        (pid, addr.to_string())
    }

    fn current(&self) -> &Generation {
        self.generations.last().expect("a generation")
    }
}

/// `target/<profile>/examples/<name>`, next to this test's `target/<profile>/deps/`. Plain
/// `cargo test -p baton-handoff` builds the examples first; `--test examples` alone does
/// not, so a binary older than its sources is refused rather than tested.
fn example_binary(name: &str) -> PathBuf {
    let test_exe = std::env::current_exe().expect("current_exe");
    let target = test_exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let binary = target.join("examples").join(name);
    let built = std::fs::metadata(&binary).and_then(|m| m.modified());
    let built = built.unwrap_or_else(|e| panic!("{}: {e}; run `cargo test -p baton-handoff`", binary.display()));
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sources = std::fs::read_dir(crate_dir.join("src"))
        .expect("src/")
        .filter_map(|e| Some(e.ok()?.path()));
    for source in sources.chain([crate_dir.join(format!("examples/{name}.rs"))]) {
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

/// One GET on `conn` (connecting first if there is none) and its complete response: the pid
/// in the body, and whether the server closes a keep-alive connection. `conn` keeps the stream if
/// the client keeps it alive and the server does not close it.
async fn one_request(conn: &mut Option<TcpStream>, addr: &str, keep_alive: bool) -> Result<(u32, bool), String> {
    let mut stream = match conn.take() {
        Some(s) => s,
        None => TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?,
    };
    let close = if keep_alive { "" } else { "Connection: close\r\n" };
    let request = format!("GET / HTTP/1.1\r\nHost: {addr}\r\n{close}\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let (head_end, body_len) = loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break (end + 4, content_length(&buf[..end])?);
        }
        read_more(&mut stream, &mut buf).await?;
    };
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
        .ok_or_else(|| format!("no pid in the body {body:?}"))?;
    let closed = head.contains("\r\nconnection: close\r\n");
    if keep_alive && !closed {
        *conn = Some(stream);
    }
    Ok((pid, keep_alive && closed))
}

/// Appends what arrives next to `buf`; end of file here is a cut response.
async fn read_more(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Result<(), String> {
    if buf.len() > MAX_RESPONSE {
        return Err(format!("no complete response in {} bytes", buf.len()));
    }
    let mut chunk = [0u8; 1024];
    match stream.read(&mut chunk).await {
        Ok(0) => Err(format!("connection closed after {} bytes of a response", buf.len())),
        Ok(n) => {
            buf.extend_from_slice(&chunk[..n]);
            Ok(())
        }
        Err(e) => Err(format!("read after {} bytes of a response: {e}", buf.len())),
    }
}

fn content_length(head: &[u8]) -> Result<usize, String> {
    let head = String::from_utf8_lossy(head).to_ascii_lowercase();
    head.lines()
        .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
        .ok_or_else(|| format!("no content-length in {head:?}"))
}

/// Whether the server has closed an idle keep-alive connection (end of file waiting).
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

/// GETs in a loop until the load stops (or [`LOAD_LIMIT`], or [`MAX_FAILURES`]): on one
/// connection while the server keeps it (`keep_alive`), else on a new one each.
async fn client(id: usize, addr: String, keep_alive: bool, load: Arc<Load>) {
    let started = Instant::now();
    let mut conn: Option<TcpStream> = None;
    let kind = if keep_alive { "keep-alive" } else { "new-connection" };
    while !load.stop.load(Ordering::Relaxed) && started.elapsed() < LOAD_LIMIT && !load.gave_up() {
        if conn.as_ref().is_some_and(closed_by_server) {
            conn = None;
            load.tally.lock().unwrap().closed_while_idle += 1;
        }
        let outcome = tokio::time::timeout(STEP, one_request(&mut conn, &addr, keep_alive)).await;
        let outcome = outcome.unwrap_or_else(|_| Err(format!("no response within {STEP:?}")));
        load.record(outcome, &format!("{kind} client {id} at {:?}", started.elapsed()));
    }
}

/// SIGHUP to the current generation; returns once a new one printed its serving line and
/// answered [`SERVED_PER_GENERATION`] requests, and the old one exited.
async fn upgrade(example: &mut Example, load: &Load, n: usize) {
    let old = example.current().pid;
    example.current().signal(libc::SIGHUP);
    let (new, _) = example.next_serving(&format!("handoff {n}")).await;
    assert_ne!(new, old, "handoff {n}: the new generation must be another process");
    load.until_served(new, SERVED_PER_GENERATION, &format!("handoff {n}'s new generation"))
        .await;
    let old_generation = &example.generations[example.generations.len() - 2];
    assert!(
        old_generation.exited_within(STEP).await,
        "handoff {n}: the old generation (pid {old}) must exit once it handed over and drained"
    );
}

/// The whole run for example `name`.
async fn three_upgrades_under_load(name: &str) {
    let started = Instant::now();
    let (mut example, addr) = Example::start(name).await;
    let load = Arc::new(Load {
        tally: Mutex::default(),
        changed: Notify::new(),
        stop: AtomicBool::new(false),
    });
    let clients: Vec<_> = (0..KEEP_ALIVE_CLIENTS + NEW_CONNECTION_CLIENTS)
        .map(|id| tokio::spawn(client(id, addr.clone(), id < KEEP_ALIVE_CLIENTS, load.clone())))
        .collect();
    let first = example.current().pid;
    load.until_served(first, SERVED_PER_GENERATION, "the first generation")
        .await;
    for n in 1..=UPGRADES {
        upgrade(&mut example, &load, n).await;
    }
    load.stop.store(true, Ordering::Relaxed);
    for c in clients {
        tokio::time::timeout(STEP, c)
            .await
            .expect("a client stops within a request")
            .expect("client task");
    }
    let pids: Vec<u32> = example.generations.iter().map(|g| g.pid).collect();
    check(name, &load.tally.lock().unwrap(), &pids, started);
    example.current().signal(libc::SIGTERM);
    assert!(
        example.current().exited_within(STEP).await,
        "{name}: the last generation ends on SIGTERM"
    );
}

/// Every request answered 200 by a generation that printed its serving line, and every
/// generation served.
fn check(name: &str, tally: &Tally, pids: &[u32], started: Instant) {
    let per_generation: Vec<(u32, u64)> = pids
        .iter()
        .map(|&p| (p, tally.served_by.get(&p).copied().unwrap_or(0)))
        .collect();
    eprintln!(
        "{name}: {} requests in {:?}; served by (pid, responses): {per_generation:?}; {} failures; \
         {} `Connection: close` answers; {} idle keep-alive connections closed by the server",
        tally.served_by.values().sum::<u64>(),
        started.elapsed(),
        tally.failures.len(),
        tally.told_to_close,
        tally.closed_while_idle,
    );
    let failures = &tally.failures;
    assert!(
        failures.is_empty(),
        "{name}: {} requests failed during the handoffs: {failures:#?}",
        failures.len()
    );
    let unknown: Vec<_> = tally.served_by.keys().filter(|p| !pids.contains(p)).collect();
    assert!(
        unknown.is_empty(),
        "{name}: answers from pids that never printed a serving line: {unknown:?}"
    );
    assert_eq!(
        pids.len(),
        UPGRADES + 1,
        "{name}: one generation per handoff, and the first"
    );
    for (pid, served) in per_generation {
        assert!(
            served >= SERVED_PER_GENERATION,
            "{name}: generation pid {pid} served only {served}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_upgrades_three_times_under_load_without_a_failed_request() {
    three_upgrades_under_load("hello").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn axum_upgrades_three_times_under_load_without_a_failed_request() {
    three_upgrades_under_load("axum").await;
}
