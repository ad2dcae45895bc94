//! The handoff under load through `baton-chaos` and the real `baton` binary: every handoff
//! succeeds, no client sees a failure, every old generation exits 0.
//!
//! This test lives in the package that owns `baton-chaos` (cargo only tells a package's own
//! tests where its binaries are). `baton` belongs to the root package: `cargo test` on the
//! workspace builds it into the same directory, because that package has integration tests.

use std::path::PathBuf;
use std::process::Output;

use serde_json::Value;

const CHAOS: &str = env!("CARGO_BIN_EXE_baton-chaos");

/// With 10 WebSocket sessions (absolute-form upgrades) echoing numbered messages across
/// the 20 handoffs: each moves with every handoff, and every message comes back in order.
#[test]
fn upgrade_under_load_loses_nothing() {
    let s = chaos_with(20, 6, 0, &["--websockets", "10"]);
    assert_eq!(s["websockets_intact"], 10, "every session through 20 handoffs: {s}");
    // Each session echoes one message every ~5 ms for 6 s: far more than one per handoff.
    let messages = s["websocket_messages"].as_u64().unwrap_or(0);
    assert!(messages > 10 * 20, "the sessions carried messages throughout: {s}");
}

/// The same with `workers = 1`: tokio's single-threaded scheduler, the one baton picks when it
/// may run on one CPU only.
#[test]
fn upgrade_under_load_loses_nothing_single_threaded() {
    chaos(10, 4, 1);
}

/// A TLS listener: 50 handoffs under TLS load (keep-alive requests, new connections that
/// resume earlier sessions, slow requests, tunnels inside TLS), no client failure. Every
/// generation loads the certificate and takes the ticket keys over before it accepts.
#[test]
fn upgrade_under_tls_load_loses_nothing() {
    let s = chaos_with(50, 20, 0, &["--tls"]);
    assert_eq!(s["tls"], true, "{s}");
}

/// Half the successors are killed at a random moment inside their canary window: those
/// handoffs fail, the old generation serves on, and clients fail only on the connections a
/// crashed successor held when it died. Each failure is matched to its connection by the
/// client's port, against the crashed process's sockets read from `/proc` before the kill.
#[test]
fn successors_crashing_in_their_canary_window_cost_only_their_own_connections() {
    let out = std::process::Command::new(CHAOS)
        .arg("--baton")
        .arg(baton())
        .args([
            "--handoffs",
            "6",
            "--seconds",
            "8",
            "--crash-after-ready",
            "0.5",
            "--canary-ms",
            "1000",
        ])
        .arg("--json")
        .output()
        .expect("run baton-chaos");
    let s = summary(&out);
    assert_eq!(
        s["failures_elsewhere"], 0,
        "a failure on a connection no crashed successor held: {s}"
    );
    let crashed = s["crashed_successors"].as_u64().unwrap_or(0);
    let at_crashes = s["failures_at_crashes"].as_u64().unwrap_or(0);
    let held = s["connections_held_at_crashes"].as_u64().unwrap_or(0);
    // The witness that the match can find something: a successor killed in its window held
    // client connections (the pool keeps 16 busy), and what failed there was among them.
    assert!(
        crashed == 0 || held > 0,
        "crashed successors held no client connection: {s}"
    );
    // A connection carries one request or one tunnel at a time, and fails once.
    assert!(
        at_crashes <= held,
        "more failures than the crashed successors had connections: {s}"
    );
    assert!(
        s["max_new_connection_ms"].as_u64().unwrap_or(u64::MAX) < 1000,
        "an accept waited 1 s: {s}"
    );
    assert_eq!(s["handoffs_ok"].as_u64().unwrap_or(0) + crashed, 6, "{s}");
    assert_eq!(s["old_generations_exited_zero"], s["old_generations"], "{s}");
    assert!(out.status.success(), "{s}");
}

/// The `baton` binary next to `baton-chaos`.
fn baton() -> PathBuf {
    let baton = PathBuf::from(CHAOS).with_file_name("baton");
    assert!(
        baton.is_file(),
        "{} is missing: it is built by `cargo test` on the whole workspace; with `-p baton-testkit` alone, run `cargo build -p baton --bin baton` first",
        baton.display()
    );
    baton
}

fn chaos(handoffs: u32, seconds: u32, workers: u32) {
    chaos_with(handoffs, seconds, workers, &[]);
}

/// Runs `baton-chaos` with `extra` arguments, asserts a clean run, returns its summary.
fn chaos_with(handoffs: u32, seconds: u32, workers: u32, extra: &[&str]) -> Value {
    let out = std::process::Command::new(CHAOS)
        .arg("--baton")
        .arg(baton())
        .args(["--handoffs", &handoffs.to_string()])
        .args(["--seconds", &seconds.to_string()])
        .args(["--baton-workers", &workers.to_string()])
        .args(extra)
        .arg("--json")
        .output()
        .expect("run baton-chaos");
    let s = summary(&out);
    assert_no_client_failures(&s);
    assert_every_handoff_completed(&s, handoffs);
    if workers > 0 {
        assert_eq!(s["final_workers"], workers, "{s}");
    } else {
        assert!(s["final_workers"].as_u64().unwrap_or(0) >= 1, "{s}");
    }
    for k in ["requests_ok", "slow_ok", "tunnels_ok", "tunnel_bytes"] {
        assert!(s[k].as_u64().unwrap_or(0) > 0, "no {k} traffic: {s}");
    }
    assert!(out.status.success(), "{s}");
    s
}

/// The JSON summary `baton-chaos --json` prints.
fn summary(out: &Output) -> Value {
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)))
}

fn assert_no_client_failures(s: &Value) {
    assert_eq!(s["failures"], 0, "client-visible failures: {s}");
    assert_eq!(
        s["keepalive_retries"], 0,
        "keep-alive requests met a closing connection: {s}"
    );
}

fn assert_every_handoff_completed(s: &Value, handoffs: u32) {
    assert_eq!(s["handoffs_ok"], handoffs, "{s}");
    assert_eq!(s["pids_distinct"], true, "{s}");
    assert_eq!(
        s["old_generations_exited_zero"], handoffs,
        "old generations must all exit 0: {s}"
    );
    assert_eq!(s["final_generation"], handoffs + 1, "{s}");
}
