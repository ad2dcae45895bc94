//! Long-lived CONNECT tunnels to an echo server, each sending a chunk of the pattern at a
//! steady pace and checking that exactly those bytes come back, for "no tunnel is cut or
//! corrupted while baton hands off". At the end each tunnel half-closes and reads to the
//! end, and reports its byte count and the SHA-256 of everything it got back, next to the
//! hash of everything it sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::client::open_tunnel_via;
use crate::data::pattern_byte;
use crate::tls::ProxyTls;

/// How one tunnel did.
#[derive(Debug, Clone)]
pub struct TunnelReport {
    pub bytes: u64,
    pub sent_sha256: String,
    pub received_sha256: String,
    /// Why it stopped early: the proxy closed it, an echo differed, a round trip stalled.
    pub error: Option<String>,
}

/// Panics unless there are `n` reports and every tunnel came through intact; `context`
/// (say, the proxy's log) goes into the message.
pub fn assert_intact(reports: &[TunnelReport], n: usize, context: &str) {
    assert_eq!(reports.len(), n);
    let broken: Vec<_> = reports.iter().filter(|r| !r.is_intact()).collect();
    assert!(
        broken.is_empty(),
        "{} of {n} tunnels broke, e.g. {:?}\n{context}",
        broken.len(),
        broken.first()
    );
}

impl TunnelReport {
    pub fn is_intact(&self) -> bool {
        self.error.is_none() && self.sent_sha256 == self.received_sha256
    }
}

/// Tunnels running in the background until [`LongTunnels::finish`].
pub struct LongTunnels {
    stop: CancellationToken,
    tasks: JoinSet<TunnelReport>,
    round_trips: Arc<AtomicU64>,
    broken: Arc<AtomicU64>,
}

impl LongTunnels {
    /// Opens `n` tunnels through `proxy` to the echo server `echo`; each sends `chunk` bytes
    /// every `every`. Fails if any tunnel cannot be opened.
    pub async fn open(
        proxy: SocketAddr,
        echo: SocketAddr,
        n: usize,
        chunk: usize,
        every: Duration,
    ) -> std::io::Result<LongTunnels> {
        LongTunnels::open_via(proxy, echo, n, chunk, every, None).await
    }

    /// [`LongTunnels::open`], inside TLS connections to the proxy with `tls` (a TLS
    /// listener's tunnels move with their TLS record state).
    pub async fn open_via(
        proxy: SocketAddr,
        echo: SocketAddr,
        n: usize,
        chunk: usize,
        every: Duration,
        tls: Option<&ProxyTls>,
    ) -> std::io::Result<LongTunnels> {
        let mut streams = Vec::with_capacity(n);
        for _ in 0..n {
            streams.push(open_tunnel_via(proxy, echo, tls).await?);
        }
        let stop = CancellationToken::new();
        let round_trips = Arc::new(AtomicU64::new(0));
        let broken = Arc::new(AtomicU64::new(0));
        let mut tasks = JoinSet::new();
        for (i, s) in streams.into_iter().enumerate() {
            let (stop, trips, broken) = (stop.clone(), round_trips.clone(), broken.clone());
            tasks.spawn(async move {
                let report = run(s, i as u64 * 7919, chunk, every, stop, trips).await;
                if report.error.is_some() {
                    broken.fetch_add(1, Ordering::Relaxed);
                }
                report
            });
        }
        Ok(LongTunnels {
            stop,
            tasks,
            round_trips,
            broken,
        })
    }

    /// Tunnels that stopped early (cut, corrupted, stalled) so far.
    pub fn broken(&self) -> u64 {
        self.broken.load(Ordering::Relaxed)
    }

    /// Round trips completed so far, over all tunnels.
    pub fn round_trips(&self) -> u64 {
        self.round_trips.load(Ordering::Relaxed)
    }

    /// Stops every tunnel (half-close, read to the end) and reports each.
    pub async fn finish(mut self) -> Vec<TunnelReport> {
        self.stop.cancel();
        let mut out = Vec::new();
        while let Some(r) = self.tasks.join_next().await {
            out.push(r.unwrap_or_else(|e| TunnelReport {
                bytes: 0,
                sent_sha256: String::new(),
                received_sha256: String::new(),
                error: Some(format!("task failed: {e}")),
            }));
        }
        out
    }
}

/// One tunnel: round trips of `chunk` pattern bytes (from `offset` on) until stopped.
async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    offset: u64,
    chunk: usize,
    every: Duration,
    stop: CancellationToken,
    trips: Arc<AtomicU64>,
) -> TunnelReport {
    let (mut sent, mut received) = (Sha256::new(), Sha256::new());
    let mut pos = offset;
    let mut bytes = 0u64;
    let mut back = vec![0u8; chunk];
    let error = loop {
        if stop.is_cancelled() {
            break finish(&mut s, &mut received).await.err();
        }
        let out: Vec<u8> = (pos..pos + chunk as u64).map(pattern_byte).collect();
        sent.update(&out);
        pos += chunk as u64;
        let trip = async {
            s.write_all(&out).await?;
            s.read_exact(&mut back).await?;
            Ok::<_, std::io::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(10), trip).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => break Some(format!("after {bytes} bytes: {e}")),
            Err(_) => break Some(format!("after {bytes} bytes: no echo within 10 s")),
        }
        received.update(&back);
        if back != out {
            break Some(format!("after {bytes} bytes: the echo differs"));
        }
        bytes += chunk as u64;
        trips.fetch_add(1, Ordering::Relaxed);
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => {}
        }
    };
    TunnelReport {
        bytes,
        sent_sha256: hex::encode(sent.finalize()),
        received_sha256: hex::encode(received.finalize()),
        error,
    }
}

/// Half-closes and reads until the echo server closes too: nothing more may arrive.
async fn finish<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, received: &mut Sha256) -> Result<(), String> {
    s.shutdown().await.map_err(|e| format!("half-close: {e}"))?;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    match read {
        Ok(Ok(_)) if rest.is_empty() => Ok(()),
        Ok(Ok(n)) => {
            received.update(&rest);
            Err(format!("{n} unexpected bytes after the last echo"))
        }
        Ok(Err(e)) => Err(format!("reading to the end: {e}")),
        Err(_) => Err("the tunnel did not close within 10 s of the half-close".into()),
    }
}
