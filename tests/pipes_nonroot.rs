//! CONNECT tunnels keep working when baton runs as an unprivileged user past the kernel's
//! `fs.pipe-user-pages-soft` limit. Each spliced tunnel direction has a pipe, and baton asks
//! for 256 KiB pipes (F_SETPIPE_SZ); past the per-user soft limit (16384 pages, 64 MiB, by
//! default) the kernel refuses that size and gives new pipes only a page or two, and baton
//! must relay through them at whatever size they got. Root is exempt from the limit, so
//! baton runs here as `nobody` (uid and gid 65534) under `setpriv`.
//!
//! Switching users needs root: CI runs the tests as root. Run as another user, the test
//! says so on stderr and returns without checking anything.

mod common;

use std::collections::HashSet;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Baton, config_text, connect_ports, testkit, wait_for};
use testkit::{LongTunnels, start_echo};

const NOBODY: u32 = 65534;
const TUNNELS: usize = 1000;
/// Two pipes per tunnel once bytes have gone both ways.
const PIPES: usize = 2 * TUNNELS;
/// What baton asks for per pipe, in 4 KiB pages.
const ASKED_PAGES: u64 = 256 * 1024 / 4096;

fn raise_own_fd_limit() {
    baton_handoff::process::raise_open_files_limit().expect("raise RLIMIT_NOFILE");
}

/// The real, effective, saved and filesystem uids of `pid`.
fn uids(pid: u32) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/<pid>/status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .expect("a Uid line in /proc/<pid>/status");
    line.split_whitespace().map(|u| u.parse().expect("a uid")).collect()
}

/// The fds of `pid` that are pipe ends, and the distinct pipes they belong to.
fn pipes_of(pid: u32) -> (usize, usize) {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return (0, 0);
    };
    let mut fds = 0;
    let mut pipes = HashSet::new();
    for entry in dir.flatten() {
        if let Ok(target) = std::fs::read_link(entry.path())
            && let Some(name) = target.to_str().filter(|t| t.starts_with("pipe:"))
        {
            fds += 1;
            pipes.insert(name.to_string());
        }
    }
    (fds, pipes.len())
}

fn chown_nobody(path: &Path) {
    std::os::unix::fs::chown(path, Some(NOBODY), Some(NOBODY)).expect("chown to nobody");
}

/// Whether the kernel, now, refuses a 256 KiB pipe to a new pipe of `nobody`'s: the proof
/// that the user is past its soft limit. Asked from a thread of our own that drops to
/// `nobody` with raw setresgid/setresuid syscalls, which change only the calling thread's
/// credentials (glibc's wrappers would change every thread's) and, as every uid leaves 0,
/// clear its capabilities; the thread ends right after.
fn nobody_is_refused_a_big_pipe() -> Result<bool, String> {
    std::thread::spawn(|| {
        // SAFETY: raw syscalls with integer arguments; they touch only this thread's credentials.
        let dropped = unsafe {
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) == 0
                && libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY) == 0
                && libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY) == 0
        };
        if !dropped {
            return Err(format!("dropping to nobody: {}", std::io::Error::last_os_error()));
        }
        let (_r, w) = nix::unistd::pipe().map_err(|e| format!("pipe: {e}"))?;
        // SAFETY: fcntl on a pipe fd we own, with an integer argument.
        let set = unsafe { libc::fcntl(w.as_raw_fd(), libc::F_SETPIPE_SZ, 256 * 1024) };
        match std::io::Error::last_os_error().raw_os_error() {
            _ if set >= 0 => Ok(false),
            Some(libc::EPERM) => Ok(true),
            _ => Err(format!("F_SETPIPE_SZ: {}", std::io::Error::last_os_error())),
        }
    })
    .join()
    .expect("probe thread")
}

/// `fs.pipe-user-pages-soft`: pages of pipe buffers per user (0: no limit).
fn pipe_soft_limit_pages() -> u64 {
    std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .expect("read fs.pipe-user-pages-soft")
        .trim()
        .parse()
        .expect("a page count")
}

/// Starts baton as nobody (setpriv execs it in place: same pid), allowing CONNECT to
/// `port`, in a directory nobody owns (config, log, pid file, control socket), and checks
/// from /proc that all four of its uids are nobody's.
async fn start_as_nobody(port: u16) -> Baton {
    let dir = tempfile::tempdir().expect("tempdir");
    chown_nobody(dir.path());
    // A thousand tunnels from one client: no bound of its own (the default is 256).
    let extra = format!("{}\n[limits]\nmax_connections_per_client = 0\n", connect_ports(&[port]));
    let config = config_text(dir.path(), &extra);
    let id = NOBODY.to_string();
    let (reuid, regid) = (format!("--reuid={id}"), format!("--regid={id}"));
    let wrapper = ["setpriv", reuid.as_str(), regid.as_str(), "--clear-groups"];
    let baton = Baton::start_wrapped(dir, &config, &wrapper, None).await;
    for file in ["baton.toml", "baton.log"] {
        chown_nobody(&baton.dir.path().join(file));
    }
    let pid = baton.pid();
    assert_eq!(
        uids(pid),
        vec![NOBODY; 4],
        "baton (pid {pid}) does not run as nobody\n{}",
        baton.log()
    );
    baton
}

/// With baton holding `pipes` pipes as nobody, the kernel refuses nobody a 256 KiB pipe,
/// when the soft limit is one that 2,000 such pipes exceed (else says this run is not past
/// it). Returns whether it refused.
fn assert_past_the_soft_limit(soft_pages: u64, pipes: usize) -> bool {
    let refused = nobody_is_refused_a_big_pipe().expect("probe the pipe limit");
    if soft_pages > 0 && soft_pages < PIPES as u64 * ASKED_PAGES {
        assert!(
            refused,
            "with baton holding {pipes} pipes the kernel still gives nobody 256 KiB pipes \
             (fs.pipe-user-pages-soft = {soft_pages})"
        );
    } else {
        eprintln!(
            "fs.pipe-user-pages-soft = {soft_pages}: 2,000 pipes of 256 KiB fit, so this run \
             does not go past the limit"
        );
    }
    refused
}

/// 1,000 tunnels, each moving hash-checked bytes both ways for a few seconds, through
/// baton running as `nobody`: 2,000 pipes, which at 256 KiB each would be 512 MiB, 8x the
/// default soft limit. Every tunnel ends intact; /proc shows baton ran as uid 65534 and
/// held at least 2,000 pipes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_tunnels_as_nobody_past_the_pipe_soft_limit_stay_intact() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "SKIPPED a_thousand_tunnels_as_nobody_past_the_pipe_soft_limit_stay_intact: \
             running baton as another user (nobody) needs root; this test checked nothing"
        );
        return;
    }
    raise_own_fd_limit();
    let soft_pages = pipe_soft_limit_pages();
    let echo = start_echo().await.expect("echo");
    let mut baton = start_as_nobody(echo.port()).await;
    let pid = baton.pid();

    let started = Instant::now();
    let tunnels = LongTunnels::open(baton.proxy, echo, TUNNELS, 1024, Duration::from_millis(100))
        .await
        .expect("open tunnels");
    let opened_after = started.elapsed();
    // Bytes went both ways through every tunnel: each direction has made its pipe.
    let mut peak = (0, 0);
    let (fds, pipes) = wait_for(Duration::from_secs(60), "baton to hold 2,000 pipes", || {
        let seen = pipes_of(pid);
        peak = peak.max(seen);
        async move { (seen.1 >= PIPES).then_some(seen) }
    })
    .await;
    let pipes_after = started.elapsed();
    // Asked now, while baton holds them all: nobody is past the soft limit.
    let refused = assert_past_the_soft_limit(soft_pages, pipes);
    // A few more seconds of round trips, most of them through pipes of a page or two.
    let before = tunnels.round_trips();
    wait_for(Duration::from_secs(60), "20 more round trips per tunnel", || {
        peak = peak.max(pipes_of(pid));
        let trips = tunnels.round_trips();
        async move { (trips >= before + 20 * TUNNELS as u64).then_some(()) }
    })
    .await;
    let round_trips = tunnels.round_trips();
    let reports = tunnels.finish().await;
    let took = started.elapsed();

    testkit::assert_intact(&reports, TUNNELS, &baton.log());
    let bytes: u64 = reports.iter().map(|r| r.bytes).sum();
    println!(
        "{TUNNELS} tunnels as uid {NOBODY}: opened in {opened_after:?}; {pipes} pipes ({fds} pipe fds) \
         after {pipes_after:?}, peak {} pipes ({} fds); kernel refused nobody a 256 KiB pipe: {refused} \
         (soft limit {soft_pages} pages); {round_trips} round trips, {bytes} bytes echoed intact in {took:?}",
        peak.1, peak.0
    );
    baton.signal(pid, nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        baton.wait_exit(Duration::from_secs(10)).await,
        Some(0),
        "baton did not exit cleanly on SIGTERM\n{}",
        baton.log()
    );
}
