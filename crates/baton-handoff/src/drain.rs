//! Draining: stop accepting, let the work in flight finish, then cut what is left at the
//! deadline. One `Drain` per generation, shared by every task. It tracks two kinds of work,
//! connections and tunnels (long-lived streams), and signals twice: `draining` when work
//! should wind down (how is the server's choice: an HTTP server finishes the request in
//! flight and closes, perhaps after a grace period for an idle client), and `cut` when the
//! deadline passed and whatever still runs must end.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One generation's drain: its two signals and the work they wait for. Clones share it.
#[derive(Clone, Default)]
pub struct Drain {
    /// Cancelled when draining starts: accept loops stop, connections finish and close.
    draining: CancellationToken,
    /// Set when draining starts, before `draining` is cancelled: what [`Drain::is_draining`]
    /// reads (the token's own answer takes a lock that every connection would share).
    begun: Arc<AtomicBool>,
    /// Cancelled at the drain deadline: whatever still runs is ended.
    cut: CancellationToken,
    connections: TaskTracker,
    tunnels: TaskTracker,
}

/// What a drain found and how it ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections open when the drain began.
    pub connections: usize,
    /// Tunnels open when the drain began.
    pub tunnels: usize,
    /// Connections and tunnels that were still open at the deadline and were cut.
    pub cut: usize,
    /// How long the drain took, in milliseconds.
    pub millis: u64,
}

impl Drain {
    /// A drain that has not begun.
    pub fn new() -> Drain {
        Drain::default()
    }

    /// Cancelled when draining begins. Await it; draining is begun with [`Drain::begin`]
    /// (cancelling this clone would not set [`Drain::is_draining`]).
    pub fn draining(&self) -> CancellationToken {
        self.draining.clone()
    }

    /// Whether draining has begun ([`Drain::begin`] or [`Drain::drain_until`]); one atomic
    /// load, cheap enough to ask at every poll of a connection.
    pub fn is_draining(&self) -> bool {
        self.begun.load(Ordering::Acquire)
    }

    /// Cancelled at the drain deadline: whatever still runs must end.
    pub fn cut_token(&self) -> CancellationToken {
        self.cut.clone()
    }

    /// The tracker of connection tasks: spawn them on it so that the drain waits for them.
    pub fn connections(&self) -> &TaskTracker {
        &self.connections
    }

    /// The tracker of tunnel tasks (long-lived streams): they end at the cut, not at `draining`.
    pub fn tunnels(&self) -> &TaskTracker {
        &self.tunnels
    }

    /// Connection tasks still running.
    pub fn active_connections(&self) -> usize {
        self.connections.len()
    }

    /// Tunnel tasks still running.
    pub fn active_tunnels(&self) -> usize {
        self.tunnels.len()
    }

    /// Stops accepting and tells connections to finish; `drain_until` waits for them.
    pub fn begin(&self) {
        self.begun.store(true, Ordering::Release);
        self.draining.cancel();
    }

    /// Starts draining (if not begun yet) and waits until everything finished or `timeout`
    /// passed, then cuts the rest and waits (at most 5 s) for the cut tasks to wind down.
    pub async fn drain_until(&self, timeout: Duration) -> DrainReport {
        let started = Instant::now();
        // Counted before the signal: work that ends as soon as it hears it (an idle
        // connection) was still handed to the drain.
        let mut report = DrainReport {
            connections: self.connections.len(),
            tunnels: self.tunnels.len(),
            ..DrainReport::default()
        };
        self.begin();
        self.connections.close();
        self.tunnels.close();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finished_work_is_not_cut_and_stuck_work_is() {
        let drain = Drain::new();
        let draining = drain.draining();
        drain.connections().spawn(async move { draining.cancelled().await });
        let cut = drain.cut_token();
        drain.tunnels().spawn(async move { cut.cancelled().await });
        let report = drain.drain_until(Duration::from_millis(50)).await;
        assert_eq!((report.connections, report.tunnels, report.cut), (1, 1, 1));
        assert!(drain.is_draining());
        assert_eq!(drain.active_connections() + drain.active_tunnels(), 0);
    }

    #[tokio::test]
    async fn work_is_counted_while_it_runs_and_draining_begins_only_with_begin() {
        let drain = Drain::new();
        assert!(!drain.is_draining(), "a new drain has not begun");
        // Three connections and two tunnels: distinct counts, so a mix-up of the two shows.
        for _ in 0..3 {
            let draining = drain.draining();
            drain.connections().spawn(async move { draining.cancelled().await });
        }
        for _ in 0..2 {
            let cut = drain.cut_token();
            drain.tunnels().spawn(async move { cut.cancelled().await });
        }
        assert_eq!(
            drain.active_connections(),
            3,
            "each connection task counts while it runs"
        );
        assert_eq!(drain.active_tunnels(), 2, "each tunnel task counts while it runs");
        drain.begin();
        assert!(drain.is_draining(), "begin starts the drain");
        let report = drain.drain_until(Duration::from_millis(50)).await;
        assert_eq!(
            (report.connections, report.tunnels, report.cut),
            (3, 2, 2),
            "the connections heard the drain and ended; the tunnels waited for the cut"
        );
    }
}
