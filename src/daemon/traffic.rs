//! Requests and errors per second over the last minutes, for the status page: a small ring of
//! per-second counts in the state directory (`traffic.json`, at most [`SECONDS`] buckets),
//! to which every live generation adds what it answered. Kept in the state directory rather
//! than in memory so the history spans handoffs: a page opened on a generation that started
//! a moment ago still shows the minutes before, and a draining generation's last requests
//! land in the same seconds as its successor's.
//!
//! Each generation samples its own counters (`proxy::metrics::answered`) once a second and
//! adds the difference since its last sample, if any (an idle baton writes nothing).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tracing::debug;

use crate::daemon::state_dir::StateDir;
use crate::proxy::metrics::{self, Answered};

/// How many seconds of history are kept (and shown).
pub const SECONDS: u64 = 300;
const FILE: &str = "traffic";

/// One second's counts, across generations.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct Bucket {
    /// The second (since the Unix epoch).
    pub t: u64,
    pub requests: u64,
    pub client_errors: u64,
    pub server_errors: u64,
}

/// The file: buckets in time order, none older than [`SECONDS`].
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
struct Ring {
    buckets: Vec<Bucket>,
}

impl Ring {
    /// Adds `delta` to second `t`, and drops what is older than the window ending at `t`.
    fn add(&mut self, t: u64, delta: Answered) {
        let b = match self.buckets.iter().position(|b| b.t >= t) {
            Some(i) if self.buckets[i].t == t => &mut self.buckets[i],
            Some(i) => {
                self.buckets.insert(i, Bucket { t, ..Bucket::default() });
                &mut self.buckets[i]
            }
            None => {
                self.buckets.push(Bucket { t, ..Bucket::default() });
                self.buckets.last_mut().expect("just pushed")
            }
        };
        b.requests += delta.requests;
        b.client_errors += delta.client_errors;
        b.server_errors += delta.server_errors;
        let newest = self.buckets.last().map_or(t, |b| b.t);
        self.buckets.retain(|b| b.t + SECONDS > newest);
    }
}

/// The last [`SECONDS`] whole seconds before `now`, oldest first, one bucket each (zero
/// where nothing was answered).
pub fn history(state: &StateDir, now: SystemTime) -> Vec<Bucket> {
    let ring: Ring = state.read_json(FILE);
    let end = unix_seconds(now);
    let start = end.saturating_sub(SECONDS);
    let mut out: Vec<Bucket> = (start..end).map(|t| Bucket { t, ..Bucket::default() }).collect();
    for b in ring.buckets.iter().filter(|b| b.t >= start && b.t < end) {
        out[(b.t - start) as usize] = *b;
    }
    out
}

fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// This generation's sampler: what it has already added to the ring.
#[derive(Clone)]
pub struct Sampler {
    state: StateDir,
    added: Arc<Mutex<Answered>>,
}

impl Sampler {
    /// Samples once a second while the process lives; [`Sampler::flush`] adds the rest at
    /// exit.
    pub fn spawn(state: StateDir) -> Sampler {
        let sampler = Sampler {
            state,
            added: Arc::new(Mutex::new(Answered::default())),
        };
        let s = sampler.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                s.flush();
            }
        });
        sampler
    }

    /// Adds what this process answered since the last sample to the current second.
    pub fn flush(&self) {
        let now = metrics::answered();
        let mut added = self.added.lock().unwrap_or_else(|p| p.into_inner());
        let delta = Answered {
            requests: now.requests.saturating_sub(added.requests),
            client_errors: now.client_errors.saturating_sub(added.client_errors),
            server_errors: now.server_errors.saturating_sub(added.server_errors),
        };
        if delta.requests == 0 {
            return;
        }
        let t = unix_seconds(SystemTime::now());
        match self.state.update_json(FILE, |ring: &mut Ring| ring.add(t, delta)) {
            Ok(()) => *added = now,
            // Kept for the next sample: the history is late, not wrong.
            Err(e) => debug!(dir = %self.state.path().display(), "cannot update the traffic history: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(requests: u64, server_errors: u64) -> Answered {
        Answered {
            requests,
            client_errors: 0,
            server_errors,
        }
    }

    #[test]
    fn buckets_merge_by_second_and_age_out() {
        let mut ring = Ring::default();
        ring.add(1000, answered(5, 1));
        ring.add(1002, answered(2, 0));
        ring.add(1000, answered(3, 0));
        ring.add(1001, answered(1, 0));
        let ts: Vec<u64> = ring.buckets.iter().map(|b| b.t).collect();
        assert_eq!(ts, [1000, 1001, 1002]);
        assert_eq!(ring.buckets[0].requests, 8);
        assert_eq!(ring.buckets[0].server_errors, 1);
        ring.add(1000 + SECONDS, answered(1, 0));
        let ts: Vec<u64> = ring.buckets.iter().map(|b| b.t).collect();
        assert_eq!(ts, [1001, 1002, 1000 + SECONDS], "the window is bounded");
    }

    #[test]
    fn history_is_dense_and_ends_before_the_current_second() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::for_control_socket(&dir.path().join("c.sock"));
        state.create().unwrap();
        let now = UNIX_EPOCH + Duration::from_millis(5_000_500);
        let t = unix_seconds(now);
        state
            .update_json(FILE, |r: &mut Ring| {
                r.add(t - 10, answered(7, 2));
                r.add(t, answered(100, 0));
            })
            .unwrap();
        let h = history(&state, now);
        assert_eq!(h.len() as u64, SECONDS);
        assert_eq!(h.last().unwrap().t, t - 1);
        assert_eq!(h.iter().map(|b| b.requests).sum::<u64>(), 7);
        assert_eq!(
            h[(SECONDS - 10) as usize],
            Bucket {
                t: t - 10,
                requests: 7,
                client_errors: 0,
                server_errors: 2
            }
        );
    }
}
