//! The control protocol between the CLI (`baton upgrade`, `status`, `stop`) and the serving
//! generation, over its control socket, and the typed client the CLI uses. The daemon's side
//! is `daemon::control_server`; both use the types here, so they cannot drift apart.
//!
//! A client sends one request line ([`Request`]); the daemon answers with JSON lines: one
//! [`Status`], or a stream of [`Event`]s as a handoff moves through its phases.
//!
//! Compatibility across one version either way matters because `systemctl reload` runs the
//! *new* CLI against the *old* daemon, and an old CLI may talk to a new daemon:
//! - request lines are the same since version 1 (0.1.0), plus `rollback`, which a daemon
//!   that does not know it answers with an error naming the command;
//! - every answer carries the protocol version as `"v"` (absent: version 1);
//! - both sides ignore fields they do not know, and a client ignores events it does not know
//!   ([`Event::Unknown`]). `tests/control_compat.rs` replays version 1's recorded messages.

use std::net::SocketAddr;
use std::path::Path;

use baton_handoff::ListenAddr;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The version this build speaks; version 1 (0.1.0) answered without `"v"`.
pub const PROTOCOL_VERSION: u32 = 2;

/// What a client asks; one line each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Hand off; with `wait_drain`, also report how the old generation's drain ended.
    Upgrade {
        wait_drain: bool,
    },
    /// Hand off to the binary the serving generation's predecessor ran (a daemon older than
    /// this request answers "unknown command").
    Rollback {
        wait_drain: bool,
    },
    Status,
    Stop,
}

impl Request {
    /// The request line, without its newline.
    pub fn line(self) -> &'static str {
        match self {
            Request::Upgrade { wait_drain: false } => "upgrade",
            Request::Upgrade { wait_drain: true } => "upgrade wait-drain",
            Request::Rollback { wait_drain: false } => "rollback",
            Request::Rollback { wait_drain: true } => "rollback wait-drain",
            Request::Status => "status",
            Request::Stop => "stop",
        }
    }

    /// Reads a request line; the error is the answer's reason.
    pub fn parse(line: &str) -> Result<Request, String> {
        match line.trim() {
            "upgrade" => Ok(Request::Upgrade { wait_drain: false }),
            "upgrade wait-drain" => Ok(Request::Upgrade { wait_drain: true }),
            "rollback" => Ok(Request::Rollback { wait_drain: false }),
            "rollback wait-drain" => Ok(Request::Rollback { wait_drain: true }),
            "status" => Ok(Request::Status),
            "stop" => Ok(Request::Stop),
            other => Err(format!(
                "unknown command `{other}` (upgrade, upgrade wait-drain, rollback, rollback wait-drain, status, stop)"
            )),
        }
    }
}

/// An answer line other than a status: the phases of a handoff, and one-line outcomes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Spawned {
        pid: u32,
        generation: u64,
        #[serde(default)]
        old_pid: u32,
        #[serde(default)]
        old_generation: u64,
    },
    Done(UpgradeReport),
    /// Only to `upgrade wait-drain`: the old generation finished draining.
    Drained(DrainOutcome),
    Failed {
        reason: String,
    },
    Refused {
        reason: String,
    },
    /// The answer to `stop`.
    Stopping,
    /// A request the daemon could not take.
    Error {
        reason: String,
    },
    /// An event of a newer daemon: ignored.
    #[serde(other)]
    Unknown,
}

impl Event {
    /// Whether this event ends the request unsuccessfully.
    pub fn is_failure(&self) -> bool {
        matches!(self, Event::Failed { .. } | Event::Refused { .. } | Event::Error { .. })
    }
}

/// The outcome of a successful handoff.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UpgradeReport {
    pub old_pid: u32,
    pub new_pid: u32,
    pub old_generation: u64,
    pub new_generation: u64,
    pub ready_ms: u64,
    /// The canary window the new generation passed (absent: no window, or version 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_ms: Option<u64>,
    pub draining_connections: usize,
    pub draining_tunnels: usize,
    /// Of `draining_connections`: those on TLS listeners (absent from daemons before TLS).
    /// Those at rest move like plain ones; the others drain (the drain's
    /// outcome says which, by reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_tls_connections: Option<usize>,
    /// Of `draining_tunnels`: those bumped (TLS inspection), which drain and never move
    /// (absent from daemons before inspection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draining_bumped_connections: Option<usize>,
}

/// How the old generation's drain ended (`baton upgrade --wait-drain`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainOutcome {
    pub old_pid: u32,
    /// Connections and tunnels open when the drain began.
    pub connections: usize,
    pub tunnels: usize,
    /// Those that ended by themselves ...
    pub finished: usize,
    /// ... those that moved to the new generation (tunnels; absent from version 2) ...
    #[serde(default)]
    pub moved: usize,
    /// ... and those cut at the drain timeout.
    pub cut: usize,
    pub drain_ms: u64,
    /// Of `moved`: TLS connections and tunnels, with their record state (absent from
    /// daemons before they moved).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub tls_moved: usize,
    /// TLS connections and tunnels that could not move and drained, by reason
    /// (`plaintext_buffered`, `ciphertext_buffered`, `suite`, `closing`, `busy`, `extraction`).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tls_stayed: std::collections::BTreeMap<String, u64>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl DrainOutcome {
    pub fn from_report(old_pid: u32, r: &baton_handoff::DrainReport, moved: usize) -> DrainOutcome {
        DrainOutcome {
            old_pid,
            connections: r.connections,
            tunnels: r.tunnels,
            finished: (r.connections + r.tunnels).saturating_sub(r.cut + moved),
            moved,
            cut: r.cut,
            drain_ms: r.millis,
            tls_moved: 0,
            tls_stayed: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    /// As [`ListenAddr`] displays it: `host:port` or `unix:/path`.
    pub address: String,
    pub adopted: bool,
    /// Who bound it: `supervisor` (systemd passed it) or `bound` (a generation bound it);
    /// absent from older daemons.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
}

/// A draining generation's remaining work, as the serving generation reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DrainingGeneration {
    pub pid: u32,
    pub generation: u64,
    pub connections: usize,
    pub tunnels: usize,
    /// When it began draining (Unix time, milliseconds). Absent from generations of versions
    /// that did not publish it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since_unix_ms: Option<u64>,
}

impl DrainingGeneration {
    /// Seconds it has been draining at `now`; `None` when its start is unknown. A wall clock
    /// stepped back reads as 0, not negative.
    pub fn draining_seconds(&self, now: std::time::SystemTime) -> Option<f64> {
        let since = std::time::UNIX_EPOCH + std::time::Duration::from_millis(self.since_unix_ms?);
        Some(now.duration_since(since).map_or(0.0, |d| d.as_secs_f64()))
    }
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub tag: Option<String>,
    pub pid: u32,
    pub generation: u64,
    pub started_unix: u64,
    pub state: String,
    /// Runtime worker threads (1: the single-threaded scheduler).
    #[serde(default)]
    pub workers: usize,
    pub listeners: Vec<ListenerStatus>,
    pub active_connections: usize,
    pub active_tunnels: usize,
    pub handoff_in_progress: bool,
    pub config: Option<String>,
    /// Older generations still draining.
    #[serde(default)]
    pub draining: Vec<DrainingGeneration>,
    /// While this generation's canary window runs: the pid of the previous generation, which
    /// watches it (and still serves the connections it had).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watched_by: Option<u32>,
    /// Tunnels this generation adopted from the previous one at its handoff.
    #[serde(default)]
    pub adopted_tunnels: u64,
    /// Idle client connections this generation adopted from the previous one.
    #[serde(default)]
    pub adopted_connections: u64,
    /// Of the adopted tunnels and connections: those on TLS listeners, with their TLS
    /// record state (absent from older daemons).
    #[serde(default)]
    pub adopted_tls: u64,
}

impl Status {
    /// The address of the listener called `name`.
    pub fn listener(&self, name: &str) -> Option<ListenAddr> {
        let l = self.listeners.iter().find(|l| l.name == name)?;
        l.address.parse().ok()
    }

    /// The TCP address of the listener called `name`.
    pub fn tcp_listener(&self, name: &str) -> Option<SocketAddr> {
        match self.listener(name)? {
            ListenAddr::Tcp(a) => Some(a),
            ListenAddr::Unix(_) => None,
        }
    }
}

/// One answer line as sent: the message with the protocol version beside its fields.
#[derive(Serialize)]
struct Versioned<'a, T> {
    v: u32,
    #[serde(flatten)]
    message: &'a T,
}

/// `message` as an answer line (with its newline).
pub fn answer_line<T: Serialize>(message: &T) -> String {
    let versioned = Versioned {
        v: PROTOCOL_VERSION,
        message,
    };
    match serde_json::to_string(&versioned) {
        Ok(s) => s + "\n",
        Err(e) => answer_line(&Event::Error { reason: e.to_string() }),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach baton's control socket {path} (is baton running with this configuration?)")]
    Connect {
        path: String,
        #[source]
        cause: std::io::Error,
    },
    #[error("control socket i/o")]
    Io(#[from] std::io::Error),
    #[error("unexpected answer from baton: {0}")]
    Protocol(String),
    #[error("the control connection closed before the answer")]
    NoAnswer,
}

/// Sends `request` to the control socket at `path`; calls `on_line` with each answer line.
pub async fn send(path: &Path, request: Request, mut on_line: impl FnMut(&str)) -> Result<(), ClientError> {
    let stream = UnixStream::connect(path).await.map_err(|cause| ClientError::Connect {
        path: path.display().to_string(),
        cause,
    })?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{}\n", request.line()).as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        on_line(&line);
    }
    Ok(())
}

/// Asks for the status; returns it with the line as sent (for `--json`).
pub async fn status(path: &Path) -> Result<(Status, String), ClientError> {
    let mut answer = None;
    send(path, Request::Status, |line| {
        answer.get_or_insert_with(|| line.to_string());
    })
    .await?;
    let line = answer.ok_or(ClientError::NoAnswer)?;
    match serde_json::from_str::<Status>(&line) {
        Ok(status) => Ok((status, line)),
        // A failure event says why; any other line keeps the parser's own words.
        Err(e) => Err(ClientError::Protocol(match parse_event(&line) {
            Ok(event) => describe_failure(event),
            Err(_) => format!("not a status ({e}): {line}"),
        })),
    }
}

/// Sends `request` and calls `on_event` with each event of the answer.
pub async fn events(path: &Path, request: Request, mut on_event: impl FnMut(Event)) -> Result<(), ClientError> {
    let mut bad = None;
    send(path, request, |line| match parse_event(line) {
        Ok(ev) => on_event(ev),
        Err(e) => {
            bad.get_or_insert(e);
        }
    })
    .await?;
    bad.map_or(Ok(()), |line| Err(ClientError::Protocol(line)))
}

/// One event line; an error keeps both the line and serde's reason (which field, where).
fn parse_event(line: &str) -> Result<Event, String> {
    serde_json::from_str(line).map_err(|e| format!("{line} ({e})"))
}

fn describe_failure(ev: Event) -> String {
    match ev {
        Event::Failed { reason } | Event::Refused { reason } | Event::Error { reason } => reason,
        other => format!("{other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A line that is not an event keeps serde's reason beside it; the witness is a line
    /// that parses.
    #[test]
    fn a_bad_event_line_keeps_the_reason() {
        let good = serde_json::to_string(&Event::Failed { reason: "x".into() }).unwrap();
        assert!(parse_event(&good).is_ok(), "{good} is an event");
        // An unknown event is `Unknown` by design; a known one without its field is not.
        let bad = parse_event(r#"{"event":"failed"}"#).unwrap_err();
        assert!(bad.starts_with(r#"{"event":"failed"} ("#), "the line first: {bad}");
        assert!(
            bad.contains("missing field `reason`"),
            "serde says what was missing: {bad}"
        );
    }

    #[test]
    fn request_lines_round_trip() {
        for r in [
            Request::Upgrade { wait_drain: false },
            Request::Upgrade { wait_drain: true },
            Request::Rollback { wait_drain: false },
            Request::Rollback { wait_drain: true },
            Request::Status,
            Request::Stop,
        ] {
            assert_eq!(Request::parse(r.line()), Ok(r));
        }
        assert!(
            Request::parse("reload")
                .unwrap_err()
                .contains("unknown command `reload`")
        );
    }

    #[test]
    fn answers_carry_the_version_and_unknown_events_are_ignored() {
        let line = answer_line(&Event::Stopping);
        assert_eq!(line, "{\"v\":2,\"event\":\"stopping\"}\n");
        let ev: Event = serde_json::from_str(r#"{"v":3,"event":"canary_passed","ms":5}"#).unwrap();
        assert_eq!(ev, Event::Unknown);
        let ev: Event = serde_json::from_str(r#"{"v":3,"event":"failed","reason":"x","extra":1}"#).unwrap();
        assert_eq!(ev, Event::Failed { reason: "x".into() });
    }

    #[test]
    fn draining_age_from_the_published_start() {
        use std::time::{Duration, UNIX_EPOCH};
        // A draining file of a version without `since_unix_ms` still reads; its age is unknown.
        let old: DrainingGeneration =
            serde_json::from_str(r#"{"pid":7,"generation":1,"connections":2,"tunnels":0}"#).unwrap();
        assert_eq!(old.since_unix_ms, None);
        assert_eq!(old.draining_seconds(UNIX_EPOCH + Duration::from_secs(5)), None);
        assert!(!serde_json::to_string(&old).unwrap().contains("since"));
        let d = DrainingGeneration {
            since_unix_ms: Some(10_000),
            ..old
        };
        let at = |ms| UNIX_EPOCH + Duration::from_millis(ms);
        assert_eq!(d.draining_seconds(at(12_500)), Some(2.5));
        assert_eq!(d.draining_seconds(at(9_000)), Some(0.0), "a clock stepped back");
    }
}
