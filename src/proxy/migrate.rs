//! Moving live tunnels to the next generation once its canary passed (the hand-over
//! protocol is `baton_handoff::transfer`). The old generation's side: [`Migration`] is
//! requested at the verdict; each spliced tunnel then stops relaying at once (its bytes wait
//! in the kernel: sockets and pipes) and *departs* with its fds and its [`TunnelRecord`];
//! one task batches the departures over the channel and tells each tunnel whether it moved
//! or stays (a batch the successor did not acknowledge). A tunnel that stays relays on and
//! drains as before. The successor's side is `Proxy::adopt`.

use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use baton_handoff::{Item, Transfer, batches};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How long the successor has to acknowledge a batch before the tunnels in it stay here.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// After the first departure, how long to wait for the others that woke with it, so that
/// they share batches.
const GATHER: Duration = Duration::from_millis(2);

/// What the next generation needs to know of a tunnel besides its fds: who, where, how
/// much so far, and how the fds are laid out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TunnelRecord {
    /// The client's address; `None` for a Unix-socket client.
    pub client: Option<SocketAddr>,
    /// The CONNECT target as the client sent it (`host:port`).
    pub target: String,
    /// The authenticated user, if the proxy asked for one.
    pub user: Option<String>,
    /// Opened through a parent proxy: the origin socket leads to the parent.
    #[serde(default)]
    pub via_parent: bool,
    /// When the CONNECT request arrived (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// Bytes so far, client→origin and origin→client (across generations).
    pub up: u64,
    pub down: u64,
    pub client_unix: bool,
    /// For the Squid access line, in whichever generation the tunnel ends: the address it
    /// leads to (the target, or the parent), and the bytes of the `200` answer the client was
    /// sent. Absent from an older generation's record.
    #[serde(default)]
    pub server: Option<IpAddr>,
    #[serde(default)]
    pub answer: u64,
    /// Which pipes travel (up, down): each is two fds after the client's and the origin's.
    pub pipes: [bool; 2],
}

impl TunnelRecord {
    pub fn encode(&self) -> Vec<u8> {
        // A struct of plain fields always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<TunnelRecord, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("bad tunnel record: {e}"))
    }

    /// Milliseconds since the Unix epoch, now.
    pub fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A tunnel on its way out, and where to say how it went: `Ok` it moved, `Err` its fds
/// come back and it stays.
struct Departure {
    item: Item,
    back: oneshot::Sender<Result<(), Vec<OwnedFd>>>,
}

/// One generation's side of moving its tunnels out.
pub struct Migration {
    requested: CancellationToken,
    tx: mpsc::UnboundedSender<Departure>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Departure>>>,
    moved: AtomicU64,
    stayed: AtomicU64,
    /// Tunnels this generation adopted from its predecessor.
    adopted: AtomicU64,
}

impl Default for Migration {
    fn default() -> Migration {
        let (tx, rx) = mpsc::unbounded_channel();
        Migration {
            requested: CancellationToken::new(),
            tx,
            rx: Mutex::new(Some(rx)),
            moved: AtomicU64::new(0),
            stayed: AtomicU64::new(0),
            adopted: AtomicU64::new(0),
        }
    }
}

impl Migration {
    /// Resolves once tunnels are to move.
    pub async fn requested(&self) {
        self.requested.cancelled().await;
    }

    /// (tunnels moved, tunnels that stayed) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.moved.load(Ordering::Relaxed), self.stayed.load(Ordering::Relaxed))
    }

    /// Tunnels adopted from the previous generation so far.
    pub fn adopted(&self) -> u64 {
        self.adopted.load(Ordering::Relaxed)
    }

    /// One more tunnel adopted from the previous generation.
    pub fn count_adopted(&self) {
        self.adopted.fetch_add(1, Ordering::Relaxed);
    }

    /// Called by a tunnel that stopped relaying: `Ok` once the successor holds it (our
    /// copies are closed by then), else its fds back.
    pub async fn depart(&self, record: Vec<u8>, fds: Vec<OwnedFd>) -> Result<(), Vec<OwnedFd>> {
        let (back, answer) = oneshot::channel();
        let item = Item { record, fds };
        if let Err(unsent) = self.tx.send(Departure { item, back }) {
            return Err(unsent.0.item.fds);
        }
        // The sender answers every departure; if it were gone, so would be the fds.
        answer.await.unwrap_or_else(|_| Err(Vec::new()))
    }

    /// Starts moving tunnels over `transfer` (once: a second call does nothing).
    pub fn start(self: &Arc<Self>, transfer: Transfer) {
        let Some(rx) = self.rx.lock().ok().and_then(|mut rx| rx.take()) else {
            return;
        };
        tokio::spawn(self.clone().send_departures(transfer, rx));
        self.requested.cancel();
    }

    /// Batches the departures as they come and answers each. After a batch fails, the
    /// successor is not trusted with more: every later departure stays.
    async fn send_departures(self: Arc<Self>, mut transfer: Transfer, mut rx: mpsc::UnboundedReceiver<Departure>) {
        let mut broken: Option<String> = None;
        while let Some(first) = rx.recv().await {
            tokio::time::sleep(GATHER).await;
            let mut all = vec![first];
            while let Ok(d) = rx.try_recv() {
                all.push(d);
            }
            for batch in batches(all, |d: &Departure| &d.item) {
                let (items, backs): (Vec<Item>, Vec<_>) = batch.into_iter().map(|d| (d.item, d.back)).unzip();
                if broken.is_some() {
                    self.stay(items, backs);
                    continue;
                }
                match transfer.send_batch(items, ACK_TIMEOUT).await {
                    Ok(n) => {
                        self.moved.fetch_add(n as u64, Ordering::Relaxed);
                        for b in backs {
                            let _ = b.send(Ok(()));
                        }
                    }
                    Err((e, items)) => {
                        warn!("tunnels stay in this generation (they drain): {e}");
                        broken = Some(e.to_string());
                        self.stay(items, backs);
                    }
                }
            }
            let (moved, stayed) = self.counts();
            info!(moved, stayed, "tunnels handed to the new generation");
        }
    }

    fn stay(&self, items: Vec<Item>, backs: Vec<oneshot::Sender<Result<(), Vec<OwnedFd>>>>) {
        self.stayed.fetch_add(items.len() as u64, Ordering::Relaxed);
        for (item, back) in items.into_iter().zip(backs) {
            let _ = back.send(Err(item.fds));
        }
    }
}
