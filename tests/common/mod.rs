//! Shared helpers: start the real `baton` binary on an ephemeral loopback port with a config
//! of the test's choosing, ask it for its status, wait for events with a deadline.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton::control::Status;
use serde::Deserialize;

// Not every test file uses every helper.
#[allow(unused_imports)]
pub use baton_handoff::process::alive;
#[allow(unused_imports)]
pub use baton_testkit as testkit;

pub const BATON: &str = env!("CARGO_BIN_EXE_baton");

/// A running baton with its own temporary directory (config, control socket, pid file, log).
pub struct Baton {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub control: PathBuf,
    pub proxy: SocketAddr,
}

/// A config with one proxy listener on an ephemeral port, plus `extra` TOML. The canary
/// window is 100 ms unless `extra` sets one: long enough to watch a successor, short enough
/// for tests that hand off many times.
pub fn config_text(dir: &Path, extra: &str) -> String {
    const CANARY: &str = "canary = \"100ms\"\n";
    let extra = &allow_local_destinations(extra);
    let extra = if extra.contains("canary") {
        extra.to_string()
    } else if extra.contains("[timeouts]\n") {
        extra.replacen("[timeouts]\n", &format!("[timeouts]\n{CANARY}"), 1)
    } else {
        format!("{extra}\n[timeouts]\n{CANARY}")
    };
    format!(
        "control_socket = \"{}\"\npid_file = \"{}\"\n\n[[listener]]\nname = \"proxy\"\naddress = \"127.0.0.1:0\"\n\n{extra}\n",
        dir.join("control.sock").display(),
        dir.join("baton.pid").display(),
    )
}

/// The tests' origins listen on loopback, which baton refuses by default: every test config
/// opens it explicitly (`[access] allow_local_destinations = true`), unless `extra` already
/// says what it wants.
pub fn allow_local_destinations(extra: &str) -> String {
    let extra = access_key(extra, "allow_local_destinations", "allow_local_destinations = true");
    // Most tests tunnel plain bytes to echo servers: TLS is the business of tests/policy.rs
    // and tests/tls.rs, which say what they want.
    access_key(&extra, "no_sni", "no_sni = \"allow\"")
}

/// `extra` with `line` under `[access]`, unless it already names `key`.
fn access_key(extra: &str, key: &str, line: &str) -> String {
    if extra.contains(key) {
        extra.to_string()
    } else if extra.contains("[access]\n") {
        extra.replacen("[access]\n", &format!("[access]\n{line}\n"), 1)
    } else {
        format!("{extra}\n[access]\n{line}\n")
    }
}

impl Baton {
    pub async fn start(extra: &str) -> Baton {
        Baton::start_program(Path::new(BATON), extra, &[]).await
    }

    /// Starts `program run --config <dir>/baton.toml extra_args...`.
    pub async fn start_program(program: &Path, extra: &str, extra_args: &[&str]) -> Baton {
        let dir = tempfile::tempdir().expect("tempdir");
        Baton::start_in(dir, program, extra, extra_args).await
    }

    pub async fn start_in(dir: tempfile::TempDir, program: &Path, extra: &str, extra_args: &[&str]) -> Baton {
        let config = dir.path().join("baton.toml");
        std::fs::write(&config, config_text(dir.path(), extra)).expect("write config");
        let log = std::fs::File::create(dir.path().join("baton.log")).expect("log file");
        let child = spawn_retrying_etxtbsy(|| {
            Command::new(program)
                .arg("run")
                .arg("--config")
                .arg(&config)
                .args(extra_args)
                .env("BATON_LOG", "info")
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.try_clone().expect("log fd"))
                .spawn()
        });
        Baton::attach(child, dir, config).await
    }

    /// The started `child` as a `Baton`, once it answers on `<dir>/control.sock`.
    async fn attach(child: Child, dir: tempfile::TempDir, config: PathBuf) -> Baton {
        let control = dir.path().join("control.sock");
        let mut b = Baton {
            child,
            dir,
            config,
            control,
            proxy: "127.0.0.1:1".parse().expect("addr"),
        };
        let status = b.wait_status(Duration::from_secs(10)).await;
        b.proxy = listener_addr(&status, "proxy");
        b
    }

    /// Starts baton with `config` (the whole file, written to `<dir>/baton.toml`; its control
    /// socket must be `<dir>/control.sock`) through `wrapper`: the command line is
    /// `wrapper... baton run --config <file>`, so a wrapper (`prlimit`, or `sh -c '...; exec
    /// "$0" "$@"'`) must exec baton in place, keeping the pid. `cwd`: the working directory.
    pub async fn start_wrapped(dir: tempfile::TempDir, config: &str, wrapper: &[&str], cwd: Option<&Path>) -> Baton {
        let path = dir.path().join("baton.toml");
        std::fs::write(&path, config).expect("write config");
        let log = std::fs::File::create(dir.path().join("baton.log")).expect("log file");
        let child = spawn_retrying_etxtbsy(|| {
            let mut cmd = match wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(BATON);
                    c
                }
                None => Command::new(BATON),
            };
            cmd.arg("run")
                .arg("--config")
                .arg(&path)
                .env("BATON_LOG", "info")
                .process_group(0);
            if let Some(d) = cwd {
                cmd.current_dir(d);
            }
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.try_clone().expect("log fd"))
                .spawn()
        });
        Baton::attach(child, dir, path).await
    }

    /// Puts a top-level key into the configuration file (before its tables), for the next
    /// generation to read.
    pub fn set_top_level(&self, line: &str) {
        let text = std::fs::read_to_string(&self.config).expect("read config");
        std::fs::write(&self.config, format!("{line}\n{text}")).expect("write config");
    }

    /// Polls the control socket until it answers or `timeout` passes (then panics with the log).
    pub async fn wait_status(&mut self, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = status(&self.control).await {
                return s;
            }
            if let Ok(Some(code)) = self.child.try_wait() {
                panic!("baton exited with {code} before serving:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "baton did not answer on its control socket:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn status(&self) -> serde_json::Value {
        status(&self.control)
            .await
            .unwrap_or_else(|| panic!("no status:\n{}", self.log()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("baton.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Runs `baton <args> --control <sock>`; returns (success, stdout+stderr).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        cli_at(&self.control, args)
    }

    pub fn signal(&self, pid: u32, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig).expect("kill");
    }

    /// Waits for the first generation (our child) to exit; returns its exit code.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(code)) = self.child.try_wait() {
                return code.code();
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Baton {
    /// Stops the serving generation as an operator does (SIGTERM) and asserts a clean stop:
    /// it exits within `within`, having logged its drain's end (`drained; exiting`), and the
    /// first generation, our child, exited 0 (the others are not our children: their
    /// status cannot be read here, so their log line is the witness).
    pub async fn stop(&mut self, within: Duration) {
        let serving = self.status().await["pid"].as_u64().expect("status pid") as u32;
        let drained_before = self.log().matches("drained; exiting").count();
        self.signal(serving, nix::sys::signal::Signal::SIGTERM);
        wait_for(within, "the serving generation to exit after SIGTERM", || async {
            (!alive(serving)).then_some(())
        })
        .await;
        let log = self.log();
        assert!(
            log.matches("drained; exiting").count() > drained_before,
            "generation {serving} exited without ending its drain:\n{log}"
        );
        let code = self.wait_exit(within).await;
        assert_eq!(code, Some(0), "the first generation's exit status\n{log}");
    }
}

impl Drop for Baton {
    /// Kills every generation this test started, exactly: each runs in the process group
    /// of the first (successors inherit it), which no other process shares. Says so when
    /// one was still running: a test that meant to stop baton cleanly did not.
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let group = nix::unistd::Pid::from_raw(self.child.id() as i32);
        if nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL).is_ok() {
            eprintln!("killed the baton generations still running in process group {group}");
        }
    }
}

/// A new directory holding `htpasswd` (mode 0600) with the user `alice`, password `right`
/// (bcrypt cost 5, `htpasswd -B`'s default); returns it and the file's path.
pub fn dir_with_users() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("htpasswd");
    let hash = bcrypt::hash("right", 5).expect("hash");
    testkit::write_secret(&path, format!("alice:{hash}\n")).expect("htpasswd");
    (dir, path)
}

/// A test that just wrote a binary can fail to exec it with ETXTBSY: a child forked meanwhile
/// by another test thread holds the write fd until its own exec. Retries, bounded.
fn spawn_retrying_etxtbsy(mut spawn: impl FnMut() -> std::io::Result<Child>) -> Child {
    for _ in 0..50 {
        match spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) => std::thread::sleep(Duration::from_millis(20)),
            other => return other.expect("spawn baton"),
        }
    }
    panic!("binary stayed busy (ETXTBSY) for 1 s");
}

/// `baton check --config <config>`: (exit success, stdout + stderr).
pub fn check_config(config: &Path) -> (bool, String) {
    let out = Command::new(BATON)
        .args(["check", "--config"])
        .arg(config)
        .output()
        .expect("run baton check");
    (out.status.success(), output_text(&out))
}

/// A finished command's stdout, then its stderr.
pub fn output_text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The status as JSON (for tests that index it), from the typed client's answer line.
/// Runs `baton <args> --control <control>`; returns (success, stdout+stderr).
pub fn cli_at(control: &Path, args: &[&str]) -> (bool, String) {
    let out = Command::new(BATON)
        .args(args)
        .arg("--control")
        .arg(control)
        .output()
        .expect("run baton cli");
    (out.status.success(), output_text(&out))
}

pub async fn status(control: &Path) -> Option<serde_json::Value> {
    let (_, line) = baton::control::status(control).await.ok()?;
    serde_json::from_str(&line).ok()
}

/// The TCP address of listener `name` in a status, read through the typed [`Status`].
pub fn listener_addr(status: &serde_json::Value, name: &str) -> SocketAddr {
    let typed = Status::deserialize(status).unwrap_or_else(|e| panic!("not a status ({e}): {status}"));
    typed
        .tcp_listener(name)
        .unwrap_or_else(|| panic!("no TCP listener {name} in {status}"))
}

/// An `[access]` section that allows CONNECT to `ports` (the default is 443 only).
pub fn connect_ports(ports: &[u16]) -> String {
    let list: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!("[access]\nconnect_ports = [{}]\n", list.join(", "))
}

/// Polls `check` every 20 ms until it returns Some or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs curl with `args`; returns (exit success, stdout bytes, stderr).
pub fn curl(args: &[&str]) -> (bool, Vec<u8>, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl must be installed");
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Zombie children of `pid`.
pub fn zombie_children(pid: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit(')').next()?.to_string();
                    let mut f = rest.split_whitespace();
                    let state = f.next()?.to_string();
                    let ppid: u32 = f.next()?.parse().ok()?;
                    Some(state == "Z" && ppid == pid)
                })
                .unwrap_or(false)
        })
        .collect()
}

pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Whether some socket listens on 127.0.0.1:`port` (from /proc/net/tcp, without connecting).
pub fn tcp_listening(port: u16) -> bool {
    let want = format!("0100007F:{port:04X}");
    std::fs::read_to_string("/proc/net/tcp").is_ok_and(|t| {
        t.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == want && f[3] == "0A"
        })
    })
}

/// A child process killed (and reaped) when the test ends, pass or fail.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
