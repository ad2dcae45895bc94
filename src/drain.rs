//! Draining: stop accepting, let requests in flight finish (HTTP/1.1 connections close after
//! their current response; idle ones at once), let tunnels run until they end or the drain
//! timeout passes, then cut what is left. One `Drain` per generation, shared by every task.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Default)]
pub struct Drain {
    /// Cancelled when draining starts: accept loops stop, connections finish and close.
    draining: CancellationToken,
    /// Cancelled at the drain deadline: whatever still runs is ended.
    cut: CancellationToken,
    connections: TaskTracker,
    tunnels: TaskTracker,
}

/// What a drain found and how it ended.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct DrainReport {
    pub connections: usize,
    pub tunnels: usize,
    /// Connections and tunnels that were still open at the deadline and were cut.
    pub cut: usize,
    pub millis: u64,
}

impl Drain {
    pub fn new() -> Drain {
        Drain::default()
    }

    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    pub fn is_draining(&self) -> bool {
        self.draining.is_cancelled()
    }

    pub fn cut_token(&self) -> CancellationToken {
        self.cut.clone()
    }

    pub fn connections(&self) -> &TaskTracker {
        &self.connections
    }

    pub fn tunnels(&self) -> &TaskTracker {
        &self.tunnels
    }

    pub fn active_connections(&self) -> usize {
        self.connections.len()
    }

    pub fn active_tunnels(&self) -> usize {
        self.tunnels.len()
    }

    /// Stops accepting and tells connections to finish; `drain_until` waits for them.
    pub fn begin(&self) {
        self.draining.cancel();
    }

    /// Starts draining (if not begun yet) and waits until everything finished or `timeout` passed, then cuts
    /// the rest and waits (briefly) for the cut tasks to wind down.
    pub async fn drain_until(&self, timeout: Duration) -> DrainReport {
        let started = Instant::now();
        self.draining.cancel();
        self.connections.close();
        self.tunnels.close();
        let mut report = DrainReport {
            connections: self.connections.len(),
            tunnels: self.tunnels.len(),
            ..DrainReport::default()
        };
        let all_done = async {
            self.connections.wait().await;
            self.tunnels.wait().await;
        };
        if tokio::time::timeout(timeout, all_done).await.is_err() {
            report.cut = self.connections.len() + self.tunnels.len();
            self.cut.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                self.connections.wait().await;
                self.tunnels.wait().await;
            })
            .await;
        }
        report.millis = started.elapsed().as_millis() as u64;
        report
    }
}
