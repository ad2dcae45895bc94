//! What the benchmark tools (`examples/tunnel_bench.rs`, `examples/h2_bench.rs`) share: a
//! closed loop of workers counting what they complete, and a target that writes one byte.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// What a [`closed_loop`] did: completed and failed calls, over `secs`.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    pub done: u64,
    pub errors: u64,
    pub secs: f64,
}

/// `workers` tasks each calling `one` back to back for `secs` seconds; a call that fails,
/// or takes over 5 s, counts as an error.
pub async fn closed_loop<F, Fut>(workers: usize, secs: f64, one: F) -> Counted
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let (stop, done, errors) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut tasks = Vec::new();
    for _ in 0..workers.max(1) {
        let (stop, done, errors, one) = (stop.clone(), done.clone(), errors.clone(), one.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(5), one()).await {
                    Ok(Ok(())) => done.fetch_add(1, Ordering::Relaxed),
                    _ => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    let counted = Counted {
        done: done.load(Ordering::Relaxed),
        errors: errors.load(Ordering::Relaxed),
        secs: t0.elapsed().as_secs_f64(),
    };
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    counted
}

/// A target on `127.0.0.1:port` (0: any) that writes one byte to each connection, then
/// waits for the client to close.
pub async fn one_byte_target(port: u16) -> std::io::Result<SocketAddr> {
    let l = TcpListener::bind(("127.0.0.1", port)).await?;
    let target = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"x").await;
                let mut b = [0u8; 64];
                let _ = s.read(&mut b).await;
            });
        }
    });
    Ok(target)
}
