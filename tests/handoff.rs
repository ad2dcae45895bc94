//! The handoff through the real binary: under load, under faults, under a signal storm, and
//! with a binary installed in place.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{BATON, Baton, alive, fd_count, testkit, wait_for, zombie_children};
use nix::sys::signal::Signal;

#[test]
fn upgrade_under_load_loses_nothing() {
    chaos(20, 6, 0);
}

/// The same with `workers = 1`: tokio's single-threaded scheduler, the one baton picks when it
/// may run on one CPU only.
#[test]
fn upgrade_under_load_loses_nothing_single_threaded() {
    chaos(10, 4, 1);
}

fn chaos(handoffs: u32, seconds: u32, workers: u32) {
    let (h, secs, w) = (handoffs.to_string(), seconds.to_string(), workers.to_string());
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_baton-chaos"))
        .args([
            "--baton",
            BATON,
            "--handoffs",
            &h,
            "--seconds",
            &secs,
            "--baton-workers",
            &w,
            "--json",
        ])
        .output()
        .expect("run baton-chaos");
    let text = String::from_utf8_lossy(&out.stdout);
    let s: serde_json::Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(s["failures"], 0, "client-visible failures: {s}");
    assert_eq!(
        s["keepalive_retries"], 0,
        "keep-alive requests met a closing connection: {s}"
    );
    assert_eq!(s["handoffs_ok"], handoffs, "{s}");
    assert_eq!(s["pids_distinct"], true, "{s}");
    assert_eq!(
        s["old_generations_exited_zero"], handoffs,
        "old generations must all exit 0: {s}"
    );
    assert_eq!(s["final_generation"], handoffs + 1, "{s}");
    if workers > 0 {
        assert_eq!(s["final_workers"], workers, "{s}");
    } else {
        assert!(s["final_workers"].as_u64().unwrap_or(0) >= 1, "{s}");
    }
    for k in ["requests_ok", "slow_ok", "tunnels_ok", "tunnel_bytes"] {
        assert!(s[k].as_u64().unwrap_or(0) > 0, "no {k} traffic: {s}");
    }
    assert!(out.status.success(), "{s}");
}

/// A client pool running in the background; counts failures until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    fn start(proxy: std::net::SocketAddr, origin: std::net::SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (s, o, f) = (stop.clone(), ok.clone(), failed.clone());
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            let url = format!("http://{origin}/bytes?n=2048");
            while !s.load(Ordering::Relaxed) {
                let result = async {
                    let mut c = testkit::ProxyConnection::open(proxy).await?;
                    c.get(&url).await
                };
                match tokio::time::timeout(Duration::from_secs(10), result).await {
                    Ok(Ok((st, body))) if st == 200 && body.len() == 2048 => {
                        o.fetch_add(1, Ordering::Relaxed);
                    }
                    other => {
                        f.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("{other:?}"));
                    }
                }
            }
            errors
        });
        Load { stop, ok, failed, task }
    }

    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let errors = self.task.await.unwrap_or_default();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_successors_roll_back() {
    let origin = testkit::start_origin().await.unwrap();
    let (baton, program) = baton_from_copy("[timeouts]\nupgrade = \"1s\"\n").await;
    let pid = baton.pid();
    let load = Load::start(baton.proxy, origin);

    // (a) nothing at the binary path.
    std::fs::remove_file(&program).unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(!ok && out.contains("cannot execute"), "{out}");
    assert_rolled_back(&baton, pid, "missing binary");

    // (b) a program that exits 1.
    install_script(&program, "#!/bin/sh\nexit 1\n");
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(!ok && out.contains("exit status 1"), "{out}");
    assert_rolled_back(&baton, pid, "exit 1");

    // (c) a program that never becomes ready (upgrade timeout 1 s).
    install_script(&program, "#!/bin/sh\nexec sleep 30\n");
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(!ok && out.contains("not ready within"), "{out}");
    assert_rolled_back(&baton, pid, "never ready");

    // (d) the real binary with a broken configuration.
    install_copy(Path::new(BATON), &program);
    let good_config = std::fs::read_to_string(&baton.config).unwrap();
    std::fs::write(&baton.config, format!("{good_config}\nthis is = = not toml\n")).unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(!ok && out.contains("exit status 1"), "{out}");
    assert!(
        baton.log().contains("baton.toml: line"),
        "the child says why on stderr:\n{}",
        baton.log()
    );
    assert_rolled_back(&baton, pid, "broken config");
    std::fs::write(&baton.config, &good_config).unwrap();

    // (e) a child killed with SIGKILL before it is ready.
    install_script(&program, &format!("#!/bin/sh\nsleep 30\nexec {BATON} \"$@\"\n"));
    let mut events = Vec::new();
    baton::control::request(&baton.control, "upgrade", |v| {
        if v["event"] == "spawned" {
            let child = v["pid"].as_i64().unwrap() as i32;
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(child), Signal::SIGKILL).unwrap();
        }
        events.push(v);
    })
    .await
    .unwrap();
    let last = events.last().unwrap();
    assert_eq!(last["event"], "failed", "{events:?}");
    assert!(last["reason"].as_str().unwrap().contains("SIGKILL"), "{last}");
    assert_rolled_back(&baton, pid, "SIGKILL");

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

    let (served, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "requests failed during faulty upgrades: {errors:?}");
    assert!(served > 0);
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
    // An open tunnel gives the old generation sockets that must not leak into the new one.
    let _tunnel = testkit::open_tunnel(baton.proxy, echo).await.unwrap();
    // The old generation's fds before the handoff: listeners, the tunnel's two sockets, ...
    let old_fds = socket_inodes(old);
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "{out}");
    let new = baton.status().await["pid"].as_u64().unwrap() as u32;
    assert_ne!(new, old, "status must come from the new generation");
    assert!(alive(old), "old generation should still drain the tunnel");
    let new_fds = socket_inodes(new);
    let shared: Vec<&(i32, String)> = new_fds
        .iter()
        // anon_inode names (epoll, eventfd) are the same text in every process: skip them.
        .filter(|(fd, t)| *fd > 2 && !t.starts_with("anon_inode:") && old_fds.iter().any(|(_, ot)| ot == t))
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
        baton::control::request(&control, "upgrade", |v| events.push(v))
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
    assert_eq!(events.last().unwrap()["event"], "failed");
}
