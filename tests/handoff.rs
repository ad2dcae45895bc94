//! The handoff through the real binary: under faults with clients running, under a signal
//! storm, fd hygiene, and with a binary installed in place. The handoff under heavy load is
//! `baton-chaos`, run by `crates/baton-testkit/tests/chaos.rs`.

mod common;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton::control::{self, Event, Request};
use common::testkit::{Load, LoadSpec};
use common::{BATON, Baton, alive, fd_count, testkit, wait_for, zombie_children};
use nix::sys::signal::Signal;

/// Replaces `path` the way `install` does: a new inode renamed over the old name.
fn install_script(path: &Path, body: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, body).unwrap();
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn install_copy(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

/// Starts baton from a copy of the binary in its own directory, so a test can break it.
async fn baton_from_copy(extra: &str) -> (Baton, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("bin")).unwrap();
    let program = dir.path().join("bin/baton");
    install_copy(Path::new(BATON), &program);
    let baton = Baton::start_in(dir, &program, extra, &[]).await;
    (baton, program)
}

fn assert_rolled_back(baton: &Baton, pid: u32, why: &str) {
    // The old generation still serves: same pid, generation 1, no zombie child left.
    let zombies = zombie_children(pid);
    assert!(zombies.is_empty(), "{why}: zombie children {zombies:?}");
    assert!(alive(pid), "{why}: old generation died:\n{}", baton.log());
}

/// Clients through the proxy during the faulty handoffs: a keep-alive connection and a new
/// connection per request.
fn start_load(proxy: SocketAddr, origin: SocketAddr) -> Load {
    Load::start(
        proxy,
        LoadSpec::new(format!("http://{origin}/bytes?n=2048")).body_len(2048),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_successors_roll_back() {
    let origin = testkit::start_origin().await.unwrap();
    let (baton, program) = baton_from_copy("[timeouts]\nupgrade = \"1s\"\n").await;
    let pid = baton.pid();
    let load = start_load(baton.proxy, origin);
    assert!(
        load.answered(1, Duration::from_secs(10)).await,
        "the load flows before the handoffs"
    );

    upgrade_to_programs_that_never_serve(&baton, &program, pid);
    upgrade_with_a_broken_configuration(&baton, &program, pid);
    upgrade_to_a_successor_killed_before_ready(&baton, &program, pid).await;
    let status = baton.status().await;
    assert_eq!(status["generation"], 1);
    assert_eq!(status["pid"], pid);
    assert_eq!(status["state"], "serving");

    // The next good handoff succeeds.
    install_copy(Path::new(BATON), &program);
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok && out.contains("ready after"), "{out}");
    let status = baton.status().await;
    assert_eq!(status["generation"], 2, "{status}");
    assert_ne!(status["pid"], pid);

    let report = load.finish().await;
    assert!(report.is_clean(), "requests failed during faulty upgrades: {report}");
    assert!(report.ok > 0, "{report}");
}

/// Nothing at the binary path, a program that exits 1, one that never becomes ready (the
/// upgrade timeout is 1 s): each handoff fails with its reason and generation 1 serves on.
fn upgrade_to_programs_that_never_serve(baton: &Baton, program: &Path, pid: u32) {
    std::fs::remove_file(program).unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(!ok && out.contains("cannot execute"), "{out}");
    assert_rolled_back(baton, pid, "missing binary");

    install_script(program, "#!/bin/sh\nexit 1\n");
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(!ok && out.contains("exit status 1"), "{out}");
    assert_rolled_back(baton, pid, "exit 1");

    install_script(program, "#!/bin/sh\nexec sleep 30\n");
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(!ok && out.contains("not ready within"), "{out}");
    assert_rolled_back(baton, pid, "never ready");
}

/// The real binary with a configuration that does not parse: it says why on stderr and to
/// its predecessor (so `baton upgrade` shows the file and line), and exits 1; the
/// configuration is restored afterwards.
fn upgrade_with_a_broken_configuration(baton: &Baton, program: &Path, pid: u32) {
    install_copy(Path::new(BATON), program);
    let good_config = std::fs::read_to_string(&baton.config).unwrap();
    std::fs::write(&baton.config, format!("{good_config}\nthis is = = not toml\n")).unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(
        !ok && out.contains("exited before it was ready: ") && out.contains("baton.toml: line"),
        "{out}"
    );
    assert!(
        baton.log().contains("baton.toml: line"),
        "the child says why on stderr:\n{}",
        baton.log()
    );
    assert_rolled_back(baton, pid, "broken config");
    std::fs::write(&baton.config, &good_config).unwrap();
}

/// A successor killed with SIGKILL as soon as it is spawned: the handoff fails naming it.
async fn upgrade_to_a_successor_killed_before_ready(baton: &Baton, program: &Path, pid: u32) {
    install_script(program, &format!("#!/bin/sh\nsleep 30\nexec {BATON} \"$@\"\n"));
    let mut events = Vec::new();
    control::events(&baton.control, Request::Upgrade { wait_drain: false }, |ev| {
        if let Event::Spawned { pid: child, .. } = ev {
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child as i32), Signal::SIGKILL).unwrap();
        }
        events.push(ev);
    })
    .await
    .unwrap();
    match events.last() {
        Some(Event::Failed { reason }) => assert!(reason.contains("SIGKILL"), "{reason}"),
        _ => panic!("the handoff must end failed: {events:?}"),
    }
    assert_rolled_back(baton, pid, "SIGKILL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn signal_storm_runs_one_handoff_at_a_time() {
    let mut baton = Baton::start("").await;
    let first = baton.pid();
    for _ in 0..50 {
        baton.signal(first, Signal::SIGUSR2);
    }
    // The first generation hands off once, refuses the rest, drains and exits.
    assert_eq!(
        baton.wait_exit(Duration::from_secs(15)).await,
        Some(0),
        "{}",
        baton.log()
    );
    let status = baton.status().await;
    assert_eq!(
        status["generation"],
        2,
        "exactly one handoff: {status}\n{}",
        baton.log()
    );
    assert_eq!(status["state"], "serving");
    let serving = status["pid"].as_u64().unwrap() as u32;
    let batons: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| c.contains(baton.config.to_str().unwrap()))
                && alive(*p)
        })
        .collect();
    assert_eq!(batons, vec![serving], "one serving generation at the end");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fd_count_is_stable_across_handoffs() {
    let baton = Baton::start("").await;
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "{out}");
    let after_one = baton.status().await["pid"].as_u64().unwrap() as u32;
    // The control connection that just answered closes asynchronously: take settled counts.
    let fds_after_one = settled_fd_count(after_one).await;
    for i in 0..19 {
        let (ok, out) = baton.cli(&["upgrade"]);
        assert!(ok, "handoff {i}: {out}");
    }
    let status = baton.status().await;
    assert_eq!(status["generation"], 21);
    let serving = status["pid"].as_u64().unwrap() as u32;
    assert_eq!(
        settled_fd_count(serving).await,
        fds_after_one,
        "fd leak across handoffs"
    );
}

/// The smallest fd count seen over 20 samples 25 ms apart.
async fn settled_fd_count(pid: u32) -> usize {
    let mut min = usize::MAX;
    for _ in 0..20 {
        min = min.min(fd_count(pid));
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    min
}

fn socket_inodes(pid: u32) -> Vec<(i32, String)> {
    let mut v: Vec<(i32, String)> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let fd: i32 = e.file_name().to_str()?.parse().ok()?;
            let target = std::fs::read_link(e.path()).ok()?.to_string_lossy().into_owned();
            Some((fd, target))
        })
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn successor_inherits_only_the_listeners() {
    let echo = testkit::start_echo().await.unwrap();
    let baton = Baton::start(&format!(
        "{}[timeouts]\ndrain = \"20s\"\n",
        common::connect_ports(&[echo.port()])
    ))
    .await;
    let old = baton.pid();
    // An open tunnel gives the old generation sockets that must not leak into the new one
    // (kept in the old generation: the new one is told not to take tunnels).
    baton.set_top_level("migrate = false");
    let _tunnel = testkit::open_tunnel(baton.proxy, echo).await.unwrap();
    // The old generation's fds before the handoff: listeners, the tunnel's two sockets, ...
    let old_fds = socket_inodes(old);
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "{out}");
    let new = baton.status().await["pid"].as_u64().unwrap() as u32;
    assert_ne!(new, old, "status must come from the new generation");
    assert!(alive(old), "old generation should still drain the tunnel");
    let new_fds = socket_inodes(new);
    // The binary, held open (O_PATH) twice: its own (for its successor's rollback) and its
    // predecessor's (passed on purpose, for its own).
    let binary = std::fs::canonicalize(common::BATON)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let binaries = new_fds.iter().filter(|(_, t)| *t == binary).count();
    assert_eq!(binaries, 2, "its own binary and its predecessor's: {new_fds:?}");
    let shared: Vec<&(i32, String)> = new_fds
        .iter()
        // anon_inode names (epoll, eventfd) are the same text in every process: skip them.
        .filter(|(fd, t)| {
            *fd > 2 && !t.starts_with("anon_inode:") && *t != binary && old_fds.iter().any(|(_, ot)| ot == t)
        })
        .collect();
    // Exactly the proxy listener and the control socket, as fds 3 and 4.
    let fds: Vec<i32> = shared.iter().map(|(fd, _)| *fd).collect();
    assert_eq!(
        fds,
        vec![3, 4],
        "new generation shares more than its listeners: {shared:?}\nnew: {new_fds:?}"
    );
    assert!(
        !new_fds.iter().any(|(_, t)| t.starts_with("pipe:")),
        "readiness pipe leaked: {new_fds:?}"
    );
    let status = baton.status().await;
    assert!(
        status["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["adopted"] == true),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_place_install_is_what_runs_next() {
    let (baton, program) = baton_from_copy("").await;
    assert_eq!(baton.status().await["tag"], serde_json::Value::Null);
    // A differently-tagged build, installed over the running binary's path.
    let wrapper = baton.dir.path().join("wrapper.sh");
    std::fs::write(&wrapper, format!("#!/bin/sh\nexec {BATON} \"$@\" --tag v2\n")).unwrap();
    let st = std::process::Command::new("install")
        .arg("-m")
        .arg("755")
        .arg(&wrapper)
        .arg(&program)
        .status()
        .unwrap();
    assert!(st.success());
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "{out}");
    let status = baton.status().await;
    assert_eq!(status["tag"], "v2", "{status}");
    assert_eq!(status["generation"], 2);
    let (ok, out) = baton.cli(&["status"]);
    assert!(ok && out.contains("(v2)"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn triggers_are_refused_while_a_handoff_runs() {
    let (baton, program) = baton_from_copy("[timeouts]\nupgrade = \"3s\"\n").await;
    install_script(&program, "#!/bin/sh\nexec sleep 30\n");
    let control = baton.control.clone();
    let first = tokio::spawn(async move {
        let mut events = Vec::new();
        control::events(&control, Request::Upgrade { wait_drain: false }, |ev| events.push(ev))
            .await
            .unwrap();
        events
    });
    wait_for(Duration::from_secs(5), "the handoff to start", || async {
        (baton.status().await["handoff_in_progress"] == true).then_some(())
    })
    .await;
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(!ok && out.contains("already in progress"), "{out}");
    let events = first.await.unwrap();
    assert!(
        matches!(events.last(), Some(Event::Failed { .. })),
        "the refused trigger must not end the first handoff: {events:?}"
    );
}
