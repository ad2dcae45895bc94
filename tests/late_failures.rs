//! Late failures and fork hygiene: a successor that fails at its last fallible step costs no
//! client anything, signals and the pid file behave around fork, and the limits on handoffs
//! hold. Each case drives the real binary.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use baton::control::{self, Event, Request};
use common::{Baton, connect_ports, testkit, wait_for};
use nix::sys::signal::Signal;
use testkit::{Load, LoadSpec};

fn rewrite_config(config: &Path, edit: impl FnOnce(String) -> String) {
    let text = std::fs::read_to_string(config).expect("config");
    std::fs::write(config, edit(text)).expect("write config");
}

/// `baton upgrade` through the typed client: (succeeded, the events).
async fn upgrade(baton: &Baton) -> (bool, Vec<Event>) {
    let mut events = Vec::new();
    control::events(&baton.control, Request::Upgrade { wait_drain: false }, |e| {
        events.push(e)
    })
    .await
    .expect("control socket");
    (matches!(events.last(), Some(Event::Done(_))), events)
}

fn reason(events: &[Event]) -> String {
    events
        .iter()
        .find_map(|e| match e {
            Event::Failed { reason } | Event::Refused { reason } => Some(reason.clone()),
            _ => None,
        })
        .unwrap_or_else(|| format!("no reason in {events:?}"))
}

#[tokio::test]
async fn a_missing_pid_file_directory_fails_the_handoff_before_it_serves() {
    let baton = Baton::start("").await;
    let old = baton.pid();
    let pid_file = baton.dir.path().join("baton.pid");
    rewrite_config(&baton.config, |t| {
        t.replace(&pid_file.display().to_string(), "/nonexistent/baton.pid")
    });
    let (ok, events) = upgrade(&baton).await;
    assert!(!ok, "{events:?}");
    assert!(reason(&events).contains("exited before it was ready"), "{events:?}");
    assert!(
        baton.log().contains("pid file directory /nonexistent does not exist"),
        "{}",
        baton.log()
    );
    assert_eq!(std::fs::read_to_string(&pid_file).unwrap().trim(), old.to_string());
    assert_eq!(baton.status().await["pid"], old);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_admin_address_fails_ten_handoffs_under_load_without_a_failed_request() {
    let origin = testkit::start_origin().await.unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let baton = Baton::start("").await;
    let addr = busy.local_addr().unwrap();
    rewrite_config(&baton.config, |t| format!("{t}\n[admin]\naddress = \"{addr}\"\n"));
    let spec = LoadSpec::new(format!("http://{origin}/bytes?n=100"))
        .body_len(100)
        .workers(4, 4);
    let load = Load::start(baton.proxy, spec);
    assert!(
        load.answered(1, Duration::from_secs(10)).await,
        "the load flows before the handoffs"
    );
    for round in 0..10 {
        let (ok, events) = upgrade(&baton).await;
        assert!(!ok, "round {round}: {events:?}");
        // Failed for the reason the test sets up, not any other.
        let why = reason(&events);
        assert!(
            why.contains("admin") && why.contains(&addr.to_string()) && why.contains("in use"),
            "round {round}: the busy admin address is the reason: {why}"
        );
    }
    let report = load.finish().await;
    eprintln!("10 failed handoffs (admin address busy) under load: {report}");
    assert!(report.ok > 0 && report.is_clean(), "{report}");
}

/// A copy of the binary in the test's own directory, so the test can hold it open.
fn copy_binary(dir: &Path) -> PathBuf {
    let program = dir.join("baton-copy");
    std::fs::copy(common::BATON, &program).unwrap();
    program
}

#[tokio::test]
async fn a_signal_during_the_etxtbsy_retry_reaches_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let program = copy_binary(dir.path());
    let baton = Baton::start_in(dir, &program, "", &[]).await;
    // A new binary installed over the path while an installer still holds it open for
    // writing: exec fails with ETXTBSY and the child retries for about a second.
    let staged = program.with_extension("new");
    std::fs::copy(common::BATON, &staged).unwrap();
    let writer = std::fs::OpenOptions::new().write(true).open(&staged).unwrap();
    std::fs::rename(&staged, &program).unwrap();
    let mut events = Vec::new();
    let control_path = baton.control.clone();
    let signalled = control::events(&control_path, Request::Upgrade { wait_drain: false }, |e| {
        if let Event::Spawned { pid, .. } = &e {
            baton.signal(*pid, Signal::SIGTERM);
        }
        events.push(e);
    });
    tokio::time::timeout(Duration::from_secs(10), signalled)
        .await
        .expect("an outcome")
        .unwrap();
    drop(writer);
    let why = reason(&events);
    assert!(
        why.contains("killed by SIGTERM"),
        "the child took the default action: {why}"
    );
}

#[tokio::test]
async fn sigterm_during_a_handoff_stops_the_successor_and_drains() {
    let mut baton = Baton::start("[timeouts]\ncanary = \"2s\"\n").await;
    let control_path = baton.control.clone();
    let upgrade = tokio::spawn(async move {
        let mut events = Vec::new();
        control::events(&control_path, Request::Upgrade { wait_drain: false }, |e| {
            events.push(e)
        })
        .await
        .expect("the control socket answers the upgrade until the stop");
        events
    });
    let successor = wait_for(Duration::from_secs(10), "the successor to serve", || async {
        baton
            .log()
            .lines()
            .find(|l| l.contains("baton serving") && l.contains("generation=2 "))
            .and_then(|l| l.split("pid=").nth(1)?.split_whitespace().next()?.parse::<u32>().ok())
    })
    .await;
    baton.signal(baton.pid(), Signal::SIGTERM);
    assert_eq!(
        baton.wait_exit(Duration::from_secs(20)).await,
        Some(0),
        "{}",
        baton.log()
    );
    let events = tokio::time::timeout(Duration::from_secs(5), upgrade)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(reason(&events), "baton is stopping", "{events:?}");
    wait_for(Duration::from_secs(5), "the successor to be gone", || async {
        (!common::alive(successor)).then_some(())
    })
    .await;
}

#[tokio::test]
async fn too_many_draining_generations_refuse_the_next_trigger() {
    let echo = testkit::start_echo().await.unwrap();
    let extra = format!(
        "[timeouts]\ndrain = \"20s\"\n[limits]\nmax_draining_generations = 1\n{}",
        connect_ports(&[echo.port()])
    );
    let baton = Baton::start(&extra).await;
    // A tunnel keeps generation 1 draining: one that stays (a moving tunnel would leave it
    // at the verdict, and generation 1 would exit before the second trigger, or not).
    baton.set_top_level("migrate = false");
    let _tunnel = testkit::open_tunnel(baton.proxy, echo).await.unwrap();
    let (ok, events) = upgrade(&baton).await;
    assert!(ok, "{events:?}");
    let (ok, events) = upgrade(&baton).await;
    assert!(!ok, "{events:?}");
    assert!(reason(&events).contains("max_draining_generations = 1"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_moved_across_a_handoff_under_load() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("[[listener]]\nname = \"other\"\naddress = \"127.0.0.2:0\"\n").await;
    let first = common::listener_addr(&baton.status().await, "other");
    let moved = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    rewrite_config(&baton.config, |t| {
        t.replace(
            "name = \"other\"\naddress = \"127.0.0.2:0\"",
            &format!("name = \"other\"\naddress = \"{moved}\""),
        )
    });
    let load = Load::start(
        baton.proxy,
        LoadSpec::new(format!("http://{origin}/bytes?n=64"))
            .body_len(64)
            .workers(2, 2),
    );
    assert!(
        load.answered(1, Duration::from_secs(10)).await,
        "the load flows before the handoff"
    );
    let (ok, events) = upgrade(&baton).await;
    assert!(ok, "{events:?}");
    let before = load.ok();
    assert!(
        load.answered(before + 10, Duration::from_secs(10)).await,
        "the load flows after the handoff"
    );
    let report = load.finish().await;
    assert!(report.is_clean(), "{report}");
    let st = baton.status().await;
    assert_eq!(common::listener_addr(&st, "other"), moved, "{st}");
    assert_ne!(first, moved);
}
