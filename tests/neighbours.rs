//! Hostile neighbours (issue 14), through the real binary: other local users playing games
//! with the paths baton writes to, relative paths in the configuration, and running out of
//! file descriptors. Tests that need a second user (chown, setpriv) or a private /run (a
//! mount namespace) need root, as CI runs; they say so and skip otherwise.

mod common;

use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{BATON, Baton, KillOnDrop, config_text, curl, testkit, wait_for};
use tokio::net::TcpStream;

/// Another user: `nobody`.
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    baton_handoff::process::euid() == 0
}

fn skip(test: &str, why: &str) {
    eprintln!("{test}: skipped: {why}");
}

fn mkdir_mode(path: &Path, mode: u32) {
    std::fs::create_dir(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).unwrap().mode() & 0o7777
}

fn is_empty_dir(path: &Path) -> bool {
    std::fs::read_dir(path).unwrap().next().is_none()
}

/// Runs `baton run --config <config>` expecting it to refuse to start: it must exit 1 within
/// 10 s. Returns what it printed on stderr.
fn refused(config: &Path) -> String {
    let err_path = config.with_extension("stderr");
    let err = std::fs::File::create(&err_path).unwrap();
    let spawned = Command::new(BATON)
        .arg("run")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(err)
        .spawn();
    let mut child = KillOnDrop(spawned.expect("spawn baton"));
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            break status;
        }
        let text = std::fs::read_to_string(&err_path).unwrap_or_default();
        assert!(Instant::now() < deadline, "baton did not refuse to start:\n{text}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&err_path).unwrap_or_default();
    assert_eq!(status.code(), Some(1), "{text}");
    text
}

#[test]
fn an_unsafe_state_directory_is_refused_and_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, config_text(dir.path(), "")).unwrap();
    let state = dir.path().join("control.sock.d");
    let unsafe_state = format!("unsafe state directory {}", state.display());

    // Pre-created by someone else, open to everyone.
    mkdir_mode(&state, 0o777);
    let err = refused(&config);
    assert!(err.contains(&unsafe_state) && err.contains("mode 0777"), "{err}");
    assert!(err.contains("`control_socket`"), "says what to do: {err}");
    assert_eq!(mode(&state), 0o777);
    assert!(is_empty_dir(&state), "nothing was written into it");
    assert!(!dir.path().join("control.sock").exists(), "refused before binding");

    // Owned by another user, even with a private mode.
    if is_root() {
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::os::unix::fs::chown(&state, Some(NOBODY), Some(NOBODY)).unwrap();
        let err = refused(&config);
        assert!(
            err.contains(&unsafe_state) && err.contains("owned by uid 65534"),
            "{err}"
        );
        assert_eq!(std::fs::metadata(&state).unwrap().uid(), NOBODY);
        assert!(is_empty_dir(&state));
    } else {
        skip("state directory of another user", "needs root to chown");
    }
    std::fs::remove_dir(&state).unwrap();

    // A symlink in its place, even to a private directory of ours.
    let elsewhere = dir.path().join("elsewhere");
    mkdir_mode(&elsewhere, 0o700);
    std::os::unix::fs::symlink(&elsewhere, &state).unwrap();
    let err = refused(&config);
    assert!(err.contains(&unsafe_state) && err.contains("is a symlink"), "{err}");
    assert!(is_empty_dir(&elsewhere));
}

#[test]
fn an_unsafe_control_socket_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let open = dir.path().join("open");
    mkdir_mode(&open, 0o777);
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, config_text(&open, "")).unwrap();
    let err = refused(&config);
    let want = format!("unsafe control socket directory {}", open.display());
    assert!(err.contains(&want) && err.contains("mode 0777"), "{err}");
    assert!(is_empty_dir(&open), "no socket, no state directory: {err}");

    // Sticky, like /tmp: no one may remove or rename another user's entries, so a path
    // there given explicitly is the operator's choice (the state directory is still checked).
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let state = open.join("control.sock.d");
    mkdir_mode(&state, 0o777);
    let err = refused(&config);
    assert!(err.contains("unsafe state directory"), "{err}");
}

/// The pid file and the ledger are written through a temporary file named after baton's
/// pid: symlinks planted at those names (by a shell that then execs baton, keeping its pid)
/// are not followed.
#[tokio::test]
async fn planted_symlinks_at_temporary_names_are_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let victim = d.join("victim");
    std::fs::write(&victim, "keep").unwrap();
    let state = d.join("control.sock.d");
    mkdir_mode(&state, 0o700);
    let plant = format!(
        "ln -s '{v}' '{d}/baton.tmp.'$$ && ln -s '{v}' '{s}/ledger.tmp.'$$ && exec \"$0\" \"$@\"",
        v = victim.display(),
        d = d.display(),
        s = state.display()
    );
    let baton = Baton::start_wrapped(dir, &config_text(&d, ""), &["sh", "-c", &plant], None).await;
    let pid = baton.pid().to_string();
    let pid_file = d.join("baton.pid");
    wait_for(Duration::from_secs(10), "the pid file", || async {
        std::fs::read_to_string(&pid_file).ok().filter(|p| p.trim() == pid)
    })
    .await;
    let ledger = std::fs::symlink_metadata(state.join("ledger.json")).expect("ledger written");
    assert!(ledger.is_file());
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    for planted in [
        d.join(format!("baton.tmp.{pid}")),
        state.join(format!("ledger.tmp.{pid}")),
    ] {
        assert!(std::fs::symlink_metadata(&planted).is_err(), "{}", planted.display());
    }
}

#[tokio::test]
async fn a_stale_control_socket_of_another_user_is_left_alone() {
    if !is_root() {
        return skip(
            "a_stale_control_socket_of_another_user_is_left_alone",
            "needs root to chown",
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, config_text(dir.path(), "")).unwrap();
    let socket = dir.path().join("control.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    std::os::unix::fs::chown(&socket, Some(NOBODY), Some(NOBODY)).unwrap();

    let err = refused(&config);
    let want = format!("{} is a socket owned by uid 65534", socket.display());
    assert!(err.contains(&want) && err.contains("remove it if it is stale"), "{err}");
    let meta = std::fs::symlink_metadata(&socket).expect("left where it was");
    assert!(meta.file_type().is_socket() && meta.uid() == NOBODY);

    // The same stale socket, ours: replaced.
    std::os::unix::fs::chown(&socket, Some(0), Some(0)).unwrap();
    let baton = Baton::start_in(dir, Path::new(BATON), "", &[]).await;
    assert!(baton.cli(&["status"]).0);
}

/// Environment variables for a child.
type Env<'a> = &'a [(&'a str, &'a str)];

/// `baton <args>` as root or (`as_nobody`) as uid 65534, with neither `$RUNTIME_DIRECTORY`
/// nor `$XDG_RUNTIME_DIR` unless `env` sets them: (success, stdout + stderr).
fn run_as(as_nobody: bool, env: Env, args: &[&str]) -> (bool, String) {
    let mut cmd = if as_nobody {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups", BATON]);
        c
    } else {
        Command::new(BATON)
    };
    let out = cmd
        .args(args)
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("XDG_RUNTIME_DIR")
        .envs(env.iter().copied())
        .output()
        .expect("run baton");
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

#[test]
fn the_default_control_socket_is_never_in_a_shared_directory() {
    if !is_root() {
        return skip(
            "the_default_control_socket_is_never_in_a_shared_directory",
            "needs root for setpriv",
        );
    }
    let cases: [(bool, Env, &str); 4] = [
        (false, &[], "control socket /run/baton/control.sock"),
        // Under sudo, $XDG_RUNTIME_DIR may still name the invoking user's directory.
        (
            false,
            &[("XDG_RUNTIME_DIR", "/run/user/1000")],
            "control socket /run/baton/control.sock",
        ),
        (
            true,
            &[("RUNTIME_DIRECTORY", "/run/baton")],
            "control socket /run/baton/control.sock",
        ),
        (
            true,
            &[("XDG_RUNTIME_DIR", "/run/user/65534")],
            "control socket /run/user/65534/baton.sock",
        ),
    ];
    for (as_nobody, env, want) in cases {
        let (ok, out) = run_as(as_nobody, env, &["check"]);
        assert!(ok && out.contains(want), "nobody: {as_nobody}, {env:?}: {out}");
    }
    let (ok, out) = run_as(true, &[], &["check"]);
    assert!(
        !ok && out.contains("<embedded default>: key `control_socket` has no default"),
        "{out}"
    );
    assert!(!out.contains("/tmp"), "{out}");
    // A file (readable by nobody) is named, and the clients use the same rule.
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let file = dir.path().join("baton.toml");
    std::fs::write(&file, "[[listener]]\nname = \"proxy\"\naddress = \"127.0.0.1:0\"\n").unwrap();
    let file_arg = file.to_str().unwrap();
    let (ok, out) = run_as(true, &[], &["check", "--config", file_arg]);
    let want = format!("{file_arg}: key `control_socket` has no default");
    assert!(
        !ok && out.contains(&want) && out.contains("set `control_socket` in this file"),
        "{out}"
    );
    let (ok, out) = run_as(true, &[], &["status"]);
    assert!(!ok && out.contains("key `control_socket` has no default"), "{out}");
}

/// Waits (10 s at most) until baton answers on `control` (true) or exits (false).
async fn serves_or_exits(child: &mut KillOnDrop, control: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if common::status(control).await.is_some() {
            return true;
        }
        if let Ok(Some(_)) = child.0.try_wait() {
            return false;
        }
        assert!(Instant::now() < deadline, "baton neither served nor exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Root without `$RUNTIME_DIRECTORY` or `$XDG_RUNTIME_DIR` (CI, `sudo`): the default control
/// socket is `/run/baton/control.sock`, and baton creates `/run/baton` (mode 0700). Run in a
/// mount namespace with its own /run, so a real system baton is never touched; the test
/// reaches it through `/proc/<pid>/root`.
#[tokio::test]
async fn as_root_the_default_control_socket_is_in_run_baton() {
    if !is_root() {
        return skip("as_root_the_default_control_socket_is_in_run_baton", "needs root");
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, "[[listener]]\nname = \"proxy\"\naddress = \"127.0.0.1:0\"\n").unwrap();
    let log_path = dir.path().join("baton.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let private_run = "mount -t tmpfs -o mode=0755 baton-test /run && exec \"$0\" \"$@\"";
    let spawned = Command::new("unshare")
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            private_run,
            BATON,
            "run",
            "--config",
        ])
        .arg(&config)
        .env_remove("RUNTIME_DIRECTORY")
        .env_remove("XDG_RUNTIME_DIR")
        .stdin(Stdio::null())
        .stderr(log)
        .spawn();
    let mut child = KillOnDrop(spawned.expect("spawn unshare"));
    let pid = child.0.id();
    let run = PathBuf::from(format!("/proc/{pid}/root/run/baton"));
    let control = run.join("control.sock");
    let served = serves_or_exits(&mut child, &control).await;
    if !served {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        assert!(!log.contains("baton:"), "baton failed: {log}");
        return skip(
            "as_root_the_default_control_socket_is_in_run_baton",
            &format!("no mount namespace: {log}"),
        );
    }
    let meta = std::fs::metadata(&run).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o700));
    assert_eq!(mode(&run.join("control.sock.d")), 0o700);
    // The clients find the same default without --control.
    let pid_arg = pid.to_string();
    let nsenter = |cmd: &str| {
        let out = Command::new("nsenter")
            .args(["--target", &pid_arg, "--mount", BATON, cmd])
            .env_remove("RUNTIME_DIRECTORY")
            .env_remove("XDG_RUNTIME_DIR")
            .output()
            .expect("nsenter");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let (ok, out) = nsenter("status");
    assert!(ok && out.contains(&pid_arg), "{out}");
    assert!(nsenter("stop").0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.0.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "baton did not stop");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Every path in the configuration is relative to its file, whatever the working directory:
/// the htpasswd file, the control socket, the pid file and the access log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relative_paths_are_relative_to_the_configuration_file() {
    let origin = testkit::start_origin().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    let hash = bcrypt::hash("secret", 4).unwrap();
    testkit::write_secret(&d.join("htpasswd"), format!("alice:{hash}\n")).unwrap();
    let config = "control_socket = \"control.sock\"\npid_file = \"baton.pid\"\n\
        [[listener]]\nname = \"proxy\"\naddress = \"127.0.0.1:0\"\n\
        [access]\nhtpasswd = \"htpasswd\"\nallow_local_destinations = true\n[log]\naccess = \"access.log\"\n";
    let elsewhere = tempfile::tempdir().unwrap();
    let baton = Baton::start_wrapped(dir, config, &[], Some(elsewhere.path())).await;
    let proxy = format!("http://{}", baton.proxy);
    let url = format!("http://{origin}/bytes?n=3");
    let code = |auth: &[&str]| {
        let mut args = vec!["-x", &proxy, "-o", "/dev/null", "-w", "%{http_code}"];
        args.extend_from_slice(auth);
        args.push(&url);
        let (_, out, err) = curl(&args);
        format!("{}{err}", String::from_utf8_lossy(&out))
    };
    assert_eq!(code(&["--proxy-user", "alice:secret"]), "200");
    assert_eq!(code(&[]), "407");
    let pid = baton.pid().to_string();
    assert_eq!(std::fs::read_to_string(d.join("baton.pid")).unwrap().trim(), pid);
    wait_for(Duration::from_secs(5), "the access log", || async {
        std::fs::read_to_string(d.join("access.log"))
            .ok()
            .filter(|l| l.contains("407"))
    })
    .await;
    assert!(
        is_empty_dir(elsewhere.path()),
        "nothing written to the working directory"
    );
}

/// CPU time (user + system) `pid` has used, in seconds (/proc counts in USER_HZ = 100 ticks).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

fn accept_failures(log: &str) -> usize {
    log.lines().filter(|l| l.contains("accept failed")).count()
}

/// Under a low hard RLIMIT_NOFILE (64) and a flood of 200 connections, accept fails with
/// EMFILE: baton backs off (no busy loop), logs about once a second, and serves again once
/// the flood is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_backs_off_quietly_and_recovers() {
    let origin = testkit::start_origin().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "");
    let baton = Baton::start_wrapped(dir, &text, &["prlimit", "--nofile=64:64"], None).await;
    let pid = baton.pid();
    let mut flood = Vec::new();
    for _ in 0..200 {
        flood.push(TcpStream::connect(baton.proxy).await.expect("queued by the kernel"));
    }
    let first = wait_for(Duration::from_secs(10), "accept to fail", || async {
        (accept_failures(&baton.log()) > 0).then(Instant::now)
    })
    .await;
    let (cpu_before, lines_before) = (cpu_seconds(pid), accept_failures(&baton.log()));
    // The observation window: a loop retrying accept without waiting would burn ~2 s of CPU.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let log = baton.log();
    let lines = accept_failures(&log) - lines_before;
    eprintln!("out of fds: {cpu:.2} s of CPU and {lines} accept failure lines in 2 s");
    assert!(cpu < 0.3, "{cpu} s of CPU in 2 s while out of fds");
    assert!(lines <= 3, "{lines} accept failure lines in 2 s:\n{log}");

    drop(flood);
    // The kernel still holds the flood's connections in the queue; baton accepts and drops
    // them, and until it is through, an origin connect may itself meet EMFILE (a 502 naming
    // it). Service resumes when the fds are free: a 200 within 10 s.
    let url = format!("http://{origin}/bytes?n=3");
    let proxy = baton.proxy;
    wait_for(Duration::from_secs(10), "a request served again", || {
        let url = url.clone();
        async move {
            let mut conn = testkit::ProxyConnection::open(proxy).await.ok()?;
            let (status, body) = conn.get(&url).await.ok()?;
            (status.as_u16() == 200 && body.len() == 3).then_some(())
        }
    })
    .await;
    let log = baton.log();
    assert!(log.contains("accepting again"), "{log}");
    // Also while the flood drains, at the edge of the limit.
    let limit = first.elapsed().as_secs() as usize + 3;
    assert!(accept_failures(&log) <= limit, "more than ~1 line a second:\n{log}");
}

/// A connection task that panics (a bug in one request's path; debug builds panic on
/// `BATON_TEST_PANIC_PATH`) unwinds that task only: its client's connection closes without
/// an answer, the process keeps serving every other client, the panic is in the log, and
/// the connection count comes back to zero (the task's guards gave back its slot). Twenty
/// panics in a row change nothing of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_connection_task_leaves_the_process_serving() {
    let origin = testkit::start_origin().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "");
    let wrapper = ["env", "BATON_TEST_PANIC_PATH=/panic"];
    let mut baton = Baton::start_wrapped(dir, &text, &wrapper, None).await;
    let proxy = format!("http://{}", baton.proxy);
    let fine = format!("http://{origin}/bytes?n=5");
    let (ok, body, err) = curl(&["-sS", "-x", &proxy, &fine]);
    assert!(ok && body.len() == 5, "the witness: a request is served before: {err}");
    for _ in 0..20 {
        let (ok, _, err) = curl(&["-sS", "-x", &proxy, &format!("http://{origin}/panic")]);
        assert!(
            !ok,
            "the panicking request gets no answer (its connection closes): {err}"
        );
    }
    let (ok, body, err) = curl(&["-sS", "-x", &proxy, &fine]);
    assert!(ok && body.len() == 5, "served after 20 panics: {err}\n{}", baton.log());
    assert!(
        baton.log().contains("a test asked this connection's task to panic"),
        "the panic is in the log (stderr): {}",
        baton.log()
    );
    let status = wait_for(Duration::from_secs(5), "no connection counted", || async {
        let s = baton.status().await;
        (s["active_connections"] == 0).then_some(s)
    })
    .await;
    assert_eq!(status["pid"], baton.pid(), "the same process serves on: {status}");
    baton.stop(Duration::from_secs(10)).await;
}
