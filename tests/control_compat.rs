//! The control protocol stays compatible across one version either way: `systemctl reload`
//! runs the *new* CLI against the *old* daemon, and an old CLI may meet a new daemon. The
//! messages of version 1 (baton 0.1.0) were recorded from its binary in
//! `tests/fixtures/control-v1.json`: each request line with the answer it got. The keys
//! with a suffix (`upgrade-refused`, ...) are answers to `upgrade` in other situations.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{BATON, Baton};
use serde_json::Value;

fn recorded() -> BTreeMap<String, String> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/control-v1.json"))
        .expect("fixture");
    serde_json::from_str(&text).expect("fixture is a JSON object of strings")
}

/// The request line a recorded answer belongs to (`upgrade-refused` → `upgrade`).
fn request_of(key: &str) -> &str {
    if key.starts_with("upgrade-") { "upgrade" } else { key }
}

fn lines(answer: &str) -> Vec<Value> {
    answer
        .lines()
        .map(|l| serde_json::from_str(l).expect("answer lines are JSON"))
        .collect()
}

/// A version-1 daemon: answers one connection on a fresh socket with `answer`, and returns
/// the request line it got.
fn old_daemon(answer: String) -> (tempfile::TempDir, PathBuf, std::thread::JoinHandle<String>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("control.sock");
    let listener = UnixListener::bind(&path).expect("bind");
    let serve = std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).expect("request line");
        (&stream).write_all(answer.as_bytes()).expect("answer");
        line
    });
    (dir, path, serve)
}

/// Runs the new CLI against a version-1 daemon that answers with the recording `key`.
fn new_cli_against_old(key: &str, args: &[&str]) -> (bool, String, String) {
    let rec = recorded();
    let (_dir, socket, daemon) = old_daemon(rec[key].clone());
    let out = Command::new(BATON)
        .args(args)
        .arg("--control")
        .arg(&socket)
        .output()
        .expect("run baton");
    let sent = daemon.join().expect("old daemon");
    let sent = sent.trim_end();
    assert!(
        rec.contains_key(sent),
        "the new CLI sent `{sent}`, which version 1 does not know"
    );
    assert_eq!(sent, request_of(key), "the request line for {key}");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn new_cli_reads_an_old_daemons_upgrade_report() {
    let (ok, out, _) = new_cli_against_old("upgrade", &["upgrade"]);
    assert!(ok, "{out}");
    assert!(out.contains("new generation 2 started: pid 4650"), "{out}");
    assert!(
        out.contains(
            "ready after 8 ms: pid 4650 (generation 2) serving; old pid 4592 draining 0 connections, 0 tunnels"
        ),
        "{out}"
    );
    let (ok, out, _) = new_cli_against_old("upgrade", &["upgrade", "--json"]);
    assert!(ok, "{out}");
    let report: Value = serde_json::from_str(out.trim()).expect("one JSON object");
    assert_eq!(report["result"], "ok");
    assert_eq!(report["new_pid"], 4650);
    assert_eq!(report["ready_ms"], 8);
}

#[test]
fn new_cli_reads_an_old_daemons_drain_report() {
    let (ok, out, _) = new_cli_against_old("upgrade wait-drain", &["upgrade", "--wait-drain"]);
    assert!(ok, "{out}");
    // A version 1 daemon sends no `moved`: it reads as 0.
    assert!(
        out.contains("old pid 4650 drained in 0 ms: 0 finished, 0 moved to the new generation, 0 cut"),
        "{out}"
    );
}

#[test]
fn new_cli_reports_an_old_daemons_failures_and_exits_non_zero() {
    for (key, reason) in [
        ("upgrade-timeout", "was not ready within 2s; killed"),
        ("upgrade-exit", "exited before it was ready: exit status 3"),
        (
            "upgrade-noexec",
            "cannot execute /tmp/rec/baton: No such file or directory",
        ),
        ("upgrade-refused", "a handoff is already in progress"),
    ] {
        let (ok, _, err) = new_cli_against_old(key, &["upgrade"]);
        assert!(!ok, "{key} must fail");
        assert!(err.contains(reason), "{key}: {err}");
        let (ok, out, _) = new_cli_against_old(key, &["upgrade", "--json"]);
        assert!(!ok, "{key} --json must fail");
        let report: Value = serde_json::from_str(out.trim()).expect("one JSON object");
        assert!(
            report["reason"].as_str().is_some_and(|r| r.contains(reason)),
            "{key}: {report}"
        );
    }
}

#[test]
fn new_cli_reads_an_old_daemons_status_and_stop() {
    let (ok, out, _) = new_cli_against_old("status", &["status"]);
    assert!(ok, "{out}");
    for want in [
        "pid         4592",
        "generation  1",
        "workers     2",
        "listener    proxy 127.0.0.1:33959",
    ] {
        assert!(out.contains(want), "{want} in {out}");
    }
    let (ok, out, _) = new_cli_against_old("stop", &["stop"]);
    assert!(ok && out.contains("stopping: draining"), "{out}");
}

/// Every field a version-1 client read is still there, with the same JSON type; what is
/// new (the protocol version `v`, say) is extra.
fn assert_superset(old: &Value, new: &Value, at: &str) {
    match (old, new) {
        (Value::Object(o), Value::Object(n)) => {
            for (k, v) in o {
                let got = n
                    .get(k)
                    .unwrap_or_else(|| panic!("{at}: field `{k}` is gone from {new}"));
                assert_superset(v, got, &format!("{at}.{k}"));
            }
        }
        (Value::Array(o), Value::Array(n)) => {
            if let (Some(o), Some(n)) = (o.first(), n.first()) {
                assert_superset(o, n, &format!("{at}[0]"));
            }
        }
        (Value::Null, _) | (_, Value::Null) => {}
        (o, n) => assert_eq!(
            std::mem::discriminant(o),
            std::mem::discriminant(n),
            "{at}: {o} became {n}"
        ),
    }
}

/// Sends a version-1 request line and returns the answer lines.
async fn old_cli_request(control: &Path, line: &str) -> Vec<Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(control).await.expect("connect");
    s.write_all(format!("{line}\n").as_bytes()).await.expect("send");
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_string(&mut answer))
        .await
        .expect("answer in time")
        .expect("read");
    lines(&answer)
}

#[tokio::test]
async fn old_cli_reads_a_new_daemons_answers() {
    let rec = recorded();
    let baton = Baton::start("").await;
    for request in ["status", "upgrade", "upgrade wait-drain", "bogus"] {
        let old = lines(&rec[request]);
        let new = old_cli_request(&baton.control, request).await;
        assert_eq!(old.len(), new.len(), "{request}: {new:?}");
        for (o, n) in old.iter().zip(&new) {
            assert_eq!(o.get("event"), n.get("event"), "{request}");
            assert_superset(o, n, request);
            assert_eq!(
                n["v"],
                baton::control::PROTOCOL_VERSION,
                "{request}: answers carry the version"
            );
        }
    }
    let new = old_cli_request(&baton.control, "stop").await;
    assert_superset(&lines(&rec["stop"])[0], &new[0], "stop");
}
