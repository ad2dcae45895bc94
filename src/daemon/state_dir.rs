//! State shared by the generations of one baton through a small directory next to the
//! control socket (`<control socket>.d/`, mode 0700). Both directories are checked before
//! use (`files::DirRule`): another user able to write to them could redirect what baton
//! writes, so baton refuses to start instead.
//!
//! - `draining/<pid>.json`: a draining generation's remaining connections and tunnels, and
//!   when it began draining (Unix time, so that `baton status --json` shows it as is),
//!   rewritten atomically (write + rename) every 250 ms and removed when it exits, so the
//!   serving generation can report them (files of dead pids are ignored and removed);
//! - `ledger.json` (+ `ledger.lock`): what outlives a generation — handoffs by result, the
//!   spawn→ready and drain durations, connections that finished or were cut in drains, the
//!   last handoffs one by one — updated under an exclusive `flock` by whichever generation
//!   saw the event. A generation started without a predecessor starts a new ledger;
//! - `traffic.json` (+ `traffic.lock`): requests per second over the last minutes, added to
//!   by every live generation (`daemon::traffic` owns its format).

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use baton_handoff::Drain;

use crate::control::DrainingGeneration;
use crate::daemon::files::{DirError, create_private_dir, prepare_socket_dir, write_atomically};

/// Upper bounds (seconds) of the handoff phase histograms; the last bucket is +Inf.
pub const PHASE_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// How a handoff ended: the ledger's keys and the `result` label of the metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffResult {
    Ok,
    /// The successor exited (or its exec failed) before it was ready.
    ChildExit,
    /// The successor was ready, then exited or went silent inside its canary window.
    FailedAfterReady,
    /// The successor was not ready within `timeouts.upgrade`.
    Timeout,
    /// The successor could not be started (not executable, fork failed).
    SpawnError,
    /// The trigger was refused (a handoff in progress, or a draining generation).
    Refused,
}

impl HandoffResult {
    /// Every result, in the order they are exported.
    pub const ALL: [HandoffResult; 6] = [
        HandoffResult::Ok,
        HandoffResult::ChildExit,
        HandoffResult::FailedAfterReady,
        HandoffResult::Timeout,
        HandoffResult::SpawnError,
        HandoffResult::Refused,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HandoffResult::Ok => "ok",
            HandoffResult::ChildExit => "child_exit",
            HandoffResult::FailedAfterReady => "failed_after_ready",
            HandoffResult::Timeout => "timeout",
            HandoffResult::SpawnError => "spawn_error",
            HandoffResult::Refused => "refused",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseHistogram {
    pub sum: f64,
    pub count: u64,
    /// Per-bucket (not cumulative) counts: one per [`PHASE_BUCKETS`] bound, then +Inf.
    pub buckets: Vec<u64>,
}

impl PhaseHistogram {
    pub fn observe(&mut self, seconds: f64) {
        if self.buckets.len() != PHASE_BUCKETS.len() + 1 {
            self.buckets = vec![0; PHASE_BUCKETS.len() + 1];
        }
        let idx = PHASE_BUCKETS
            .iter()
            .position(|b| seconds <= *b)
            .unwrap_or(PHASE_BUCKETS.len());
        self.buckets[idx] += 1;
        self.sum += seconds;
        self.count += 1;
    }

    /// `(upper bound, count)` pairs as `prometheus-client` encodes them.
    pub fn pairs(&self) -> Vec<(f64, u64)> {
        PHASE_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .enumerate()
            .map(|(i, b)| (b, self.buckets.get(i).copied().unwrap_or(0)))
            .collect()
    }
}

/// What outlives a generation.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Ledger {
    /// Keyed by [`HandoffResult::as_str`]: the file is shared with generations of other
    /// versions, which may know other results.
    pub handoffs: BTreeMap<String, u64>,
    pub spawn_to_ready: PhaseHistogram,
    pub drain: PhaseHistogram,
    /// Connections and tunnels handed to drains that ended by themselves.
    pub drain_finished: u64,
    /// ... and those cut at the drain timeout.
    pub drain_cut: u64,
    /// Connections a successor that failed its canary had open at its last ping: lost.
    pub canary_lost: u64,
    /// The last [`RECENT_HANDOFFS`] handoffs (refused triggers included), by start time,
    /// oldest first.
    pub recent: Vec<HandoffRecord>,
}

impl Ledger {
    /// Adds a finished drain to the record of the handoff `old_pid` made (its last `ok` one).
    pub fn drained(&mut self, old_pid: u32, drain_ms: u64, cut: usize) {
        let ok = HandoffResult::Ok.as_str();
        if let Some(r) = self
            .recent
            .iter_mut()
            .rev()
            .find(|r| r.old_pid == old_pid && r.result == ok)
        {
            r.drain_ms = Some(drain_ms);
            r.drain_cut = Some(cut);
        }
    }
}

/// How many handoffs the ledger keeps one by one.
pub const RECENT_HANDOFFS: usize = 30;
/// A failure's reason is cut to this many characters in a [`HandoffRecord`].
const MAX_REASON: usize = 300;

/// One handoff as the status page shows it: when, between which generations, its phases and
/// how it ended. Written by the old generation when the outcome is known; its drain is added
/// when the drain ends.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct HandoffRecord {
    /// When the trigger arrived (ms since the Unix epoch).
    pub started_unix_ms: u64,
    /// A [`HandoffResult::as_str`].
    pub result: String,
    /// What asked for it: `SIGUSR2`, `SIGHUP`, `control socket`.
    pub trigger: String,
    pub old_pid: u32,
    pub old_generation: u64,
    /// None when no successor was started (refused, spawn error).
    pub new_pid: Option<u32>,
    /// Spawn to readiness.
    pub ready_ms: Option<u64>,
    /// The canary window passed, or how long the successor lived in it before it failed.
    pub canary_ms: Option<u64>,
    /// What the old generation handed to its drain ...
    pub draining_connections: usize,
    pub draining_tunnels: usize,
    /// ... and, once drained, how long it took and how many were cut at the drain timeout.
    pub drain_ms: Option<u64>,
    pub drain_cut: Option<usize>,
    /// Why it failed or was refused.
    pub reason: Option<String>,
}

impl HandoffRecord {
    /// A record of a handoff `old_generation` (this process) started at `started`.
    pub fn new(
        started: std::time::SystemTime,
        result: HandoffResult,
        trigger: String,
        old_generation: u64,
    ) -> HandoffRecord {
        let started_unix_ms = started
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        HandoffRecord {
            started_unix_ms,
            result: result.as_str().into(),
            trigger,
            old_pid: std::process::id(),
            old_generation,
            ..HandoffRecord::default()
        }
    }

    /// With `reason`, cut to a bounded length so the ledger stays small.
    pub fn because(mut self, reason: &str) -> HandoffRecord {
        let mut r: String = reason.chars().take(MAX_REASON).collect();
        if r.len() < reason.len() {
            r.push('…');
        }
        self.reason = Some(r);
        self
    }
}

#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    /// The state directory belonging to `control_socket`.
    pub fn for_control_socket(control_socket: &Path) -> StateDir {
        let mut name = control_socket.as_os_str().to_owned();
        name.push(".d");
        StateDir {
            dir: PathBuf::from(name),
        }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn draining_dir(&self) -> PathBuf {
        self.dir.join("draining")
    }

    /// The state directory of `control_socket`, ready for use: the socket's directory is
    /// created if missing, and both are checked ([`DirError::Unsafe`] when another user could
    /// tamper with them: the caller must refuse to start). A state directory that cannot be
    /// written otherwise only costs the shared metrics, with a warning.
    pub fn open(control_socket: &Path) -> Result<StateDir, DirError> {
        prepare_socket_dir(control_socket)?;
        let state = StateDir::for_control_socket(control_socket);
        match state.create() {
            Err(e @ DirError::Unsafe(_)) => return Err(e),
            Err(e) => warn!("cannot use the state directory (metrics of other generations unavailable): {e}"),
            Ok(()) => {}
        }
        Ok(state)
    }

    /// Creates (or checks) the directory and removes leftovers of dead processes.
    pub fn create(&self) -> Result<(), DirError> {
        create_private_dir(&self.dir)?;
        create_private_dir(&self.draining_dir())?;
        let _ = self.draining();
        Ok(())
    }

    /// Starts a new ledger: what a generation without a predecessor does once its listeners
    /// are its own.
    pub fn start_ledger(&self) {
        self.record(|l| *l = Ledger::default());
    }

    /// Reads the ledger (empty if none).
    pub fn ledger(&self) -> Ledger {
        self.read_json("ledger")
    }

    /// Read-modify-write of the ledger under an exclusive lock.
    pub fn update_ledger(&self, f: impl FnOnce(&mut Ledger)) -> std::io::Result<()> {
        self.update_json("ledger", f)
    }

    /// Reads `<name>.json`: the default value if it is missing (a first start), or, with a
    /// warning that names the file and the reason, if it cannot be read or parsed. These
    /// files are history (the ledger, the traffic ring): starting without it is right, and
    /// refusing to start over it would cost more than it saves.
    pub fn read_json<T: serde::de::DeserializeOwned + Default>(&self, name: &str) -> T {
        let path = self.dir.join(format!("{name}.json"));
        let parsed = match std::fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return T::default(),
            Err(e) => Err(e.to_string()),
            Ok(b) => serde_json::from_slice(&b).map_err(|e| e.to_string()),
        };
        parsed.unwrap_or_else(|e| {
            warn!(file = %path.display(), "state file ignored, starting from empty: {e}");
            T::default()
        })
    }

    /// Read-modify-write of `<name>.json` under an exclusive lock on `<name>.lock`. The lock
    /// file is shared by the generations, so it cannot be created exclusively; it is never
    /// opened through a symlink, and lives in the private state directory.
    pub fn update_json<T>(&self, name: &str, f: impl FnOnce(&mut T)) -> std::io::Result<()>
    where
        T: Serialize + serde::de::DeserializeOwned + Default,
    {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(self.dir.join(format!("{name}.lock")))?;
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))?;
        let mut value: T = self.read_json(name);
        f(&mut value);
        let text = serde_json::to_vec(&value).map_err(std::io::Error::other)?;
        write_atomically(&self.dir.join(format!("{name}.json")), &text)
    }

    /// Counts one handoff by its result, keeps its record among the recent ones, and applies
    /// `also` in the same ledger update.
    pub fn record_handoff(&self, record: HandoffRecord, also: impl FnOnce(&mut Ledger)) {
        self.record(|l| {
            *l.handoffs.entry(record.result.clone()).or_default() += 1;
            // In the order they started: a refusal during a canary window is recorded before
            // the handoff whose verdict was still pending.
            let at = l
                .recent
                .partition_point(|r| r.started_unix_ms <= record.started_unix_ms);
            l.recent.insert(at, record);
            let excess = l.recent.len().saturating_sub(RECENT_HANDOFFS);
            l.recent.drain(..excess);
            also(l);
        });
    }

    /// Like [`StateDir::update_ledger`], logging instead of failing: metrics never stop baton.
    pub fn record(&self, f: impl FnOnce(&mut Ledger)) {
        if let Err(e) = self.update_ledger(f) {
            debug!(dir = %self.dir.display(), "cannot update the metrics ledger: {e}");
        }
    }

    /// The draining generations other than this process, alive; files of dead ones are removed.
    pub fn draining(&self) -> Vec<DrainingGeneration> {
        let Ok(entries) = std::fs::read_dir(self.draining_dir()) else {
            return Vec::new();
        };
        let me = std::process::id();
        let mut out: Vec<DrainingGeneration> = entries
            .filter_map(|e| {
                let path = e.ok()?.path();
                let pid: u32 = path.file_stem()?.to_str()?.parse().ok()?;
                if path.extension().and_then(|x| x.to_str()) != Some("json") || pid == me {
                    return None;
                }
                if !baton_handoff::process::alive(pid) {
                    let _ = std::fs::remove_file(&path);
                    return None;
                }
                let d: DrainingGeneration = serde_json::from_slice(&std::fs::read(&path).ok()?).ok()?;
                (d.pid == pid).then_some(d)
            })
            .collect();
        out.sort_by_key(|d| d.generation);
        out
    }

    /// Starts publishing this generation's remaining work every 250 ms until the returned
    /// guard is finished (or dropped), which removes the file.
    pub fn publish_draining(&self, generation: u64, drain: Drain) -> DrainingFile {
        let path = self.draining_dir().join(format!("{}.json", std::process::id()));
        let stopped = Arc::new(Mutex::new(false));
        let since_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .ok();
        let file = DrainingFile {
            path: path.clone(),
            stopped: stopped.clone(),
        };
        let failing = AtomicBool::new(false);
        let write = move || {
            let d = DrainingGeneration {
                pid: std::process::id(),
                generation,
                connections: drain.active_connections(),
                tunnels: drain.active_tunnels(),
                since_unix_ms,
            };
            let guard = stopped.lock().unwrap_or_else(|p| p.into_inner());
            if *guard {
                return false;
            }
            // Plain fields: serializing cannot fail. A write that fails is said once (the
            // status page then lacks this generation) and again if it failed anew after a
            // success, not every 250 ms.
            let written = serde_json::to_vec(&d)
                .map_err(io::Error::from)
                .and_then(|t| write_atomically(&path, &t));
            match written {
                Err(e) if !failing.swap(true, Ordering::Relaxed) => {
                    warn!(path = %path.display(), error = %e, "cannot publish this draining generation's state")
                }
                Err(_) => {}
                Ok(()) => failing.store(false, Ordering::Relaxed),
            }
            true
        };
        write();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                if !write() {
                    break;
                }
            }
        });
        file
    }
}

/// Removes the draining file (and stops its writer) when dropped.
pub struct DrainingFile {
    path: PathBuf,
    stopped: Arc<Mutex<bool>>,
}

impl Drop for DrainingFile {
    fn drop(&mut self) {
        let mut guard = self.stopped.lock().unwrap_or_else(|p| p.into_inner());
        *guard = true;
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A missing state file and a corrupt one both give the default (a start from empty,
    /// the corrupt one with a warning); the witness is a good file read back.
    #[test]
    fn a_corrupt_state_file_starts_from_empty() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::for_control_socket(&dir.path().join("c.sock"));
        s.create().unwrap();
        let missing: BTreeMap<String, u64> = s.read_json("history");
        assert!(missing.is_empty(), "no file yet");
        std::fs::write(s.path().join("history.json"), r#"{"a":1}"#).unwrap();
        let good: BTreeMap<String, u64> = s.read_json("history");
        assert_eq!(good.get("a"), Some(&1), "a good file is read");
        std::fs::write(s.path().join("history.json"), b"{\"a\":").unwrap();
        let corrupt: BTreeMap<String, u64> = s.read_json("history");
        assert!(corrupt.is_empty(), "a truncated file is ignored, not half-read");
    }

    #[test]
    fn ledger_round_trip_and_histogram() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::for_control_socket(&dir.path().join("c.sock"));
        s.create().unwrap();
        s.record(|l| {
            *l.handoffs.entry(HandoffResult::Ok.as_str().into()).or_default() += 1;
            l.spawn_to_ready.observe(0.007);
            l.spawn_to_ready.observe(1000.0);
        });
        let l = s.ledger();
        assert_eq!(l.handoffs["ok"], 1);
        assert_eq!(l.spawn_to_ready.count, 2);
        let pairs = l.spawn_to_ready.pairs();
        assert_eq!(pairs[1], (0.01, 1));
        assert_eq!(pairs.last().unwrap().1, 1);
        s.start_ledger();
        assert_eq!(s.ledger(), Ledger::default());
    }

    #[test]
    fn recent_handoffs_are_bounded_in_start_order_and_get_their_drain() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::for_control_socket(&dir.path().join("c.sock"));
        s.create().unwrap();
        s.start_ledger();
        let at = |ms| std::time::UNIX_EPOCH + Duration::from_millis(ms);
        for i in 0..RECENT_HANDOFFS as u64 + 5 {
            s.record_handoff(
                HandoffRecord::new(at(1000 + i), HandoffResult::Ok, "SIGUSR2".into(), i),
                |_| {},
            );
        }
        // A refusal recorded before the verdict of a handoff that started earlier.
        let refused = HandoffRecord::new(at(5000), HandoffResult::Refused, "control socket".into(), 9);
        s.record_handoff(refused.because(&"x".repeat(1000)), |_| {});
        let late = HandoffRecord::new(at(4000), HandoffResult::Ok, "SIGHUP".into(), 8);
        s.record_handoff(late, |l| l.drained(std::process::id(), 1500, 2));
        let l = s.ledger();
        assert_eq!(l.recent.len(), RECENT_HANDOFFS);
        assert_eq!(l.handoffs["ok"], RECENT_HANDOFFS as u64 + 6);
        assert_eq!(l.handoffs["refused"], 1);
        let starts: Vec<u64> = l.recent.iter().map(|r| r.started_unix_ms).collect();
        assert!(starts.is_sorted(), "{starts:?}");
        let n = l.recent.len();
        assert_eq!(
            (l.recent[n - 2].trigger.as_str(), l.recent[n - 2].drain_ms),
            ("SIGHUP", Some(1500))
        );
        assert_eq!(l.recent[n - 2].drain_cut, Some(2));
        assert_eq!(l.recent[n - 1].result, "refused");
        assert!(l.recent[n - 1].reason.as_ref().unwrap().chars().count() <= MAX_REASON + 1);
    }

    #[test]
    fn a_symlinked_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::for_control_socket(&dir.path().join("c.sock"));
        s.create().unwrap();
        s.start_ledger();
        std::fs::remove_file(s.path().join("ledger.lock")).unwrap();
        let elsewhere = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&elsewhere, s.path().join("ledger.lock")).unwrap();
        assert!(s.update_ledger(|l| l.drain_cut += 1).is_err());
        assert!(!elsewhere.exists());
    }

    #[test]
    fn an_open_state_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("c.sock");
        let s = StateDir::for_control_socket(&socket);
        std::fs::create_dir(s.path()).unwrap();
        std::fs::set_permissions(s.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = StateDir::open(&socket).unwrap_err();
        assert!(matches!(err, DirError::Unsafe(_)), "{err}");
        assert!(err.to_string().contains("c.sock.d"), "{err}");
    }

    #[test]
    fn dead_pids_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateDir::for_control_socket(&dir.path().join("c.sock"));
        s.create().unwrap();
        s.start_ledger();
        let stale = s.draining_dir().join("999999999.json");
        std::fs::write(
            &stale,
            r#"{"pid":999999999,"generation":1,"connections":1,"tunnels":0}"#,
        )
        .unwrap();
        assert!(s.draining().is_empty());
        assert!(!stale.exists());
    }
}
