//! The control socket (Unix, 0600): `baton upgrade`, `baton status` and `baton stop` talk to
//! the serving generation through it. One request line per connection; answers are JSON
//! lines, streamed as a handoff moves through its phases. The socket is a listener like the
//! others and is handed over with them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::drain::Drain;
use crate::listeners::{Socket, Stream};

/// A request the control socket (or a signal) hands to the generation's controller.
pub enum Command {
    Upgrade {
        trigger: Trigger,
        reply: Option<mpsc::Sender<UpgradeEvent>>,
    },
    Status(oneshot::Sender<Status>),
    Stop(Trigger),
}

/// What asked for a handoff or a stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal(&'static str),
    Control,
}

impl std::fmt::Display for Trigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Trigger::Signal(s) => write!(f, "{s}"),
            Trigger::Control => write!(f, "control socket"),
        }
    }
}

/// The phases of a handoff as `baton upgrade` sees them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum UpgradeEvent {
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
}

/// The outcome of a successful handoff.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UpgradeReport {
    pub old_pid: u32,
    pub new_pid: u32,
    pub old_generation: u64,
    pub new_generation: u64,
    pub ready_ms: u64,
    pub draining_connections: usize,
    pub draining_tunnels: usize,
}

/// How the old generation's drain ended (`baton upgrade --wait-drain`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DrainOutcome {
    pub old_pid: u32,
    /// Connections and tunnels open when the drain began.
    pub connections: usize,
    pub tunnels: usize,
    /// Those that ended by themselves ...
    pub finished: usize,
    /// ... and those cut at the drain timeout.
    pub cut: usize,
    pub drain_ms: u64,
}

impl DrainOutcome {
    pub fn from_report(old_pid: u32, r: &crate::drain::DrainReport) -> DrainOutcome {
        DrainOutcome {
            old_pid,
            connections: r.connections,
            tunnels: r.tunnels,
            finished: (r.connections + r.tunnels).saturating_sub(r.cut),
            cut: r.cut,
            drain_ms: r.millis,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ListenerStatus {
    pub name: String,
    pub address: String,
    pub adopted: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Older generations still draining (read from the state directory).
    #[serde(default)]
    pub draining: Vec<crate::state::DrainingGeneration>,
}

/// Serves the control socket until draining starts. Client tasks run on `clients`, so the
/// generation can let the last answers (the handoff report) reach their reader before exiting.
pub fn spawn_control_loop(socket: Arc<Socket>, drain: &Drain, commands: mpsc::Sender<Command>, clients: TaskTracker) {
    let draining = drain.draining();
    tokio::spawn(async move {
        crate::listeners::accept_until(socket, "control", draining, |stream, _| match stream {
            Stream::Unix(s) => {
                clients.spawn(serve_client(s, commands.clone()));
            }
            Stream::Tcp(_) => warn!("control socket must be a Unix socket"),
        })
        .await;
    });
}

async fn serve_client(stream: UnixStream, commands: mpsc::Sender<Command>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    // One short line is all a client may send.
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 256));
    let got = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    if !matches!(got, Ok(Ok(n)) if n > 0) {
        return;
    }
    match line.trim() {
        cmd @ ("upgrade" | "upgrade wait-drain") => {
            let wait_drain = cmd == "upgrade wait-drain";
            let (tx, mut rx) = mpsc::channel(8);
            let cmd = Command::Upgrade {
                trigger: Trigger::Control,
                reply: Some(tx),
            };
            if commands.send(cmd).await.is_err() {
                return;
            }
            while let Some(ev) = rx.recv().await {
                if write.write_all(json_line(&ev).as_bytes()).await.is_err() {
                    return;
                }
                // Without wait-drain the answer ends with the handoff's outcome.
                if matches!(ev, UpgradeEvent::Done(_)) && !wait_drain {
                    break;
                }
            }
        }
        "status" => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Status(tx)).await.is_err() {
                return;
            }
            if let Ok(st) = rx.await {
                let _ = write.write_all(json_line(&st).as_bytes()).await;
            }
        }
        "stop" => {
            let _ = commands.send(Command::Stop(Trigger::Control)).await;
            let _ = write.write_all(b"{\"event\":\"stopping\"}\n").await;
        }
        other => {
            let msg = serde_json::json!({"event": "error", "reason": format!("unknown command `{other}` (upgrade, upgrade wait-drain, status, stop)")});
            let _ = write.write_all(format!("{msg}\n").as_bytes()).await;
        }
    }
    let _ = write.shutdown().await;
}

fn json_line<T: Serialize>(v: &T) -> String {
    match serde_json::to_string(v) {
        Ok(s) => s + "\n",
        Err(e) => format!("{}\n", serde_json::json!({"event": "error", "reason": e.to_string()})),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach baton's control socket {path}: {cause} (is baton running with this configuration?)")]
    Connect { path: String, cause: std::io::Error },
    #[error("control socket i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected answer from baton: {0}")]
    Protocol(String),
}

/// Client side: sends `command` and calls `on_line` for each JSON line of the answer.
pub async fn request(
    path: &Path,
    command: &str,
    mut on_line: impl FnMut(serde_json::Value),
) -> Result<(), ClientError> {
    let stream = UnixStream::connect(path).await.map_err(|cause| ClientError::Connect {
        path: path.display().to_string(),
        cause,
    })?;
    let (read, mut write) = stream.into_split();
    write.write_all(format!("{command}\n").as_bytes()).await?;
    let mut lines = BufReader::new(read).lines();
    while let Some(line) = lines.next_line().await? {
        let v = serde_json::from_str(&line).map_err(|_| ClientError::Protocol(line.clone()))?;
        on_line(v);
    }
    Ok(())
}
