//! The control socket's server side (Unix, mode 0600): reads one [`Request`] line per
//! connection and hands it to the generation's controller as a [`Command`]; streams the
//! answers back as versioned JSON lines (`crate::control`). The socket is a listener like
//! the others and is handed over with them.

use std::sync::Arc;
use std::time::Duration;

use baton_handoff::{Socket, Verdict};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::{Event, Request, Status, answer_line};

/// What the control socket, the admin listener or a signal asks of the controller.
pub enum Command {
    Upgrade {
        trigger: Trigger,
        to: HandoffTo,
        reply: Option<mpsc::Sender<Event>>,
    },
    Status(oneshot::Sender<Status>),
    Stop(Trigger),
    /// The predecessor's canary window ended (this generation's own pinger reports it, and
    /// hears back once the controller took it in).
    PredecessorVerdict(Verdict, oneshot::Sender<()>),
}

/// Which binary a handoff starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandoffTo {
    /// The file at the program path now (an upgrade, a reload).
    Installed,
    /// The binary the predecessor ran, held open since (`baton rollback`).
    Predecessor,
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

/// Serves the control socket until `stop` (a drain, or a successor's canary window). Client
/// tasks run on `clients`, so the generation can let the last answers (the handoff report)
/// reach their reader before exiting.
pub fn spawn_control_loop(
    socket: Arc<Socket>,
    stop: CancellationToken,
    commands: mpsc::Sender<Command>,
    clients: TaskTracker,
) {
    tokio::spawn(async move {
        baton_handoff::accept_until(socket, "control", stop, |stream, _| {
            clients.spawn(serve_client(stream, commands.clone()));
        })
        .await;
    });
}

async fn serve_client<S: AsyncRead + AsyncWrite>(stream: S, commands: mpsc::Sender<Command>) {
    let (read, mut write) = tokio::io::split(stream);
    let mut line = String::new();
    // One short line is all a client may send.
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, 256));
    let got = tokio::time::timeout(Duration::from_secs(5), reader.read_line(&mut line)).await;
    if !matches!(got, Ok(Ok(n)) if n > 0) {
        return;
    }
    match Request::parse(&line) {
        Ok(Request::Upgrade { wait_drain }) => upgrade(&mut write, &commands, HandoffTo::Installed, wait_drain).await,
        Ok(Request::Rollback { wait_drain }) => {
            upgrade(&mut write, &commands, HandoffTo::Predecessor, wait_drain).await;
        }
        Ok(Request::Status) => {
            let (tx, rx) = oneshot::channel();
            if commands.send(Command::Status(tx)).await.is_ok()
                && let Ok(st) = rx.await
            {
                let _ = write.write_all(answer_line(&st).as_bytes()).await;
            }
        }
        Ok(Request::Stop) => {
            let _ = commands.send(Command::Stop(Trigger::Control)).await;
            let _ = write.write_all(answer_line(&Event::Stopping).as_bytes()).await;
        }
        Err(reason) => {
            let _ = write.write_all(answer_line(&Event::Error { reason }).as_bytes()).await;
        }
    }
    let _ = write.shutdown().await;
}

/// Streams a handoff's events; without `wait_drain` the answer ends with its outcome.
async fn upgrade<W: AsyncWrite + Unpin>(
    write: &mut W,
    commands: &mpsc::Sender<Command>,
    to: HandoffTo,
    wait_drain: bool,
) {
    let (tx, mut rx) = mpsc::channel(8);
    let cmd = Command::Upgrade {
        trigger: Trigger::Control,
        to,
        reply: Some(tx),
    };
    if commands.send(cmd).await.is_err() {
        return;
    }
    while let Some(ev) = rx.recv().await {
        if write.write_all(answer_line(&ev).as_bytes()).await.is_err() {
            return;
        }
        if matches!(ev, Event::Done(_)) && !wait_drain {
            break;
        }
    }
}
