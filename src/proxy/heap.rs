//! Giving freed heap memory back to the system after a burst of busy connections.
//!
//! A busy client connection holds about 20 KiB of hyper's buffers (and its origin
//! connection about 26 KiB), freed when it goes idle (`proxy::http1`). glibc's allocator
//! keeps freed memory for reuse, and returns only what lies at the top of the heap; what a
//! burst freed below memory still in use (a pooled origin connection, a connection accepted
//! meanwhile) stays in the process's RSS. Measured: 4,000 idle clients after one request
//! each kept 0.65 KiB more per client than `malloc_trim` leaves (docs/benchmarks.md).
//!
//! So the busy stretches are counted, and a timer trims the heap once the number running has
//! dropped well below its peak since the last trim: never under steady load, once after a
//! burst.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Stretches running now, and the most that ran at once since the last trim.
static BUSY: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Trim once this many fewer stretches run than at the peak (each freed about 20 KiB).
const TRIM_AFTER: usize = 32;
/// How often the need to trim is checked.
const PERIOD: Duration = Duration::from_secs(1);

/// One busy stretch, counted while it lives.
pub struct Busy(());

impl Busy {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Busy {
        let now = BUSY.fetch_add(1, Ordering::Relaxed) + 1;
        PEAK.fetch_max(now, Ordering::Relaxed);
        Busy(())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        BUSY.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Checks every [`PERIOD`] whether a burst has ended, and trims then. Runs for the life of
/// the runtime it is first called in; later calls do nothing.
pub fn spawn_trimmer() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        tokio::spawn(trimmer());
    });
}

async fn trimmer() {
    {
        let mut tick = tokio::time::interval(PERIOD);
        loop {
            tick.tick().await;
            let busy = BUSY.load(Ordering::Relaxed);
            if PEAK.load(Ordering::Relaxed).saturating_sub(busy) >= TRIM_AFTER {
                PEAK.store(busy, Ordering::Relaxed);
                trim();
            }
        }
    }
}

/// Returns the heap's free memory to the system now (also after connections moved out at a
/// handoff: the generation's memory and its successor's add up until it exits).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn trim() {
    let started = std::time::Instant::now();
    // SAFETY: malloc_trim only returns free memory to the system; glibc documents it as
    // MT-Safe, and it takes no pointer.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::debug!(released, micros = started.elapsed().as_micros() as u64, "heap trimmed");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn trim() {}
