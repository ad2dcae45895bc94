//! Load tool for scripts/bench: what wrk cannot measure.
//!
//!   tunnel_bench open --proxy HOST:PORT [--conns 32] [--secs 5]
//!       CONNECT tunnels opened per second: each worker loops CONNECT → 200 → read one byte
//!       from the target through the tunnel → close. The target is a server inside this tool.
//!   tunnel_bench bulk (--proxy HOST:PORT | --direct) [--tunnels 1] [--secs 5] [--copy]
//!       Bulk bytes/s through N tunnels (target writes as fast as it can, we read and count);
//!       --direct reads from the target without a proxy (the loopback ceiling). The reader
//!       discards with recv(MSG_TRUNC) (no copy) unless --copy: with copying, this tool's core
//!       is the limit and every proxy that splices measures about the same.
//!   tunnel_bench http --proxy HOST:PORT --url http://origin/path [--conns 32] [--secs 8]
//!       [--out FILE]
//!       Keep-alive GETs (absolute form) through the proxy, closed loop; writes one line per
//!       request to FILE: start offset in µs since the start, latency in µs, 1 ok / 0 failed.
//!       A failed request (reset, EOF mid-response, non-2xx) is counted, the worker reconnects.
//!
//! open and bulk take --target-port N: the target listens on 127.0.0.1:N instead of a free
//! port (for proxies that tunnel only to listed ports).
//!
//! Each mode prints one JSON line on stdout. Build: cargo build --release --example tunnel_bench

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use nix::sys::socket::MsgFlags;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::{TcpListener, TcpStream};

struct Args {
    mode: String,
    proxy: Option<SocketAddr>,
    direct: bool,
    conns: usize,
    secs: f64,
    url: String,
    out: Option<String>,
    target_port: u16,
    copy: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it.next().context("usage: tunnel_bench open|bulk|http [options]")?;
    let mut a = Args {
        mode,
        proxy: None,
        direct: false,
        conns: 0,
        secs: 5.0,
        url: String::new(),
        out: None,
        target_port: 0,
        copy: false,
    };
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--proxy" => a.proxy = Some(val()?.parse().context("--proxy HOST:PORT")?),
            "--direct" => a.direct = true,
            "--copy" => a.copy = true,
            "--conns" | "--tunnels" => a.conns = val()?.parse()?,
            "--secs" => a.secs = val()?.parse()?,
            "--url" => a.url = val()?,
            "--out" => a.out = Some(val()?),
            "--target-port" => a.target_port = val()?.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // One thread: the load generator is pinned to one core by scripts/bench.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async move {
        match args.mode.as_str() {
            "open" => open(&args).await,
            "bulk" => bulk(&args).await,
            "http" => http(&args).await,
            m => bail!("unknown mode {m} (open, bulk, http)"),
        }
    })
}

/// Sends CONNECT for `target` on a fresh connection to `proxy` and reads the response head.
async fn tunnel(proxy: SocketAddr, target: SocketAddr) -> anyhow::Result<BufReader<TcpStream>> {
    let s = TcpStream::connect(proxy).await?;
    s.set_nodelay(true)?;
    let mut s = BufReader::new(s);
    let req = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
    s.get_mut().write_all(req.as_bytes()).await?;
    let mut line = String::new();
    s.read_line(&mut line).await?;
    if !(line.starts_with("HTTP/1.1 200") || line.starts_with("HTTP/1.0 200")) {
        bail!("CONNECT refused: {}", line.trim());
    }
    loop {
        line.clear();
        if s.read_line(&mut line).await? == 0 {
            bail!("EOF in CONNECT response");
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
    }
    Ok(s)
}

async fn open(a: &Args) -> anyhow::Result<()> {
    let proxy = a.proxy.context("--proxy needed")?;
    let target = baton_testkit::bench::one_byte_target(a.target_port).await?;
    let conns = a.conns.max(1);
    let c = baton_testkit::bench::closed_loop(conns, a.secs, move || async move {
        let mut t = tunnel(proxy, target).await?;
        let mut b = [0u8; 1];
        t.read_exact(&mut b).await?;
        anyhow::Ok(())
    })
    .await;
    println!(
        "{{\"mode\":\"open\",\"conns\":{conns},\"tunnels\":{},\"per_sec\":{:.1},\"errors\":{}}}",
        c.done,
        c.done as f64 / c.secs,
        c.errors
    );
    Ok(())
}

async fn bulk(a: &Args) -> anyhow::Result<()> {
    if a.proxy.is_none() && !a.direct {
        bail!("--proxy or --direct needed");
    }
    // The target: writes 256 KiB chunks as fast as the reader takes them.
    let l = TcpListener::bind(("127.0.0.1", a.target_port)).await?;
    let target = l.local_addr()?;
    tokio::spawn(async move {
        let chunk: Arc<Vec<u8>> = Arc::new(vec![0x5a; 256 * 1024]);
        while let Ok((mut s, _)) = l.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move { while s.write_all(&chunk).await.is_ok() {} });
        }
    });
    // The reader discards what it receives with recv(MSG_TRUNC): TCP drops the bytes without
    // copying them to user space, which takes that work off the tool's core (it also runs the
    // target). --copy reads into a buffer like an ordinary client.
    let copy = a.copy;
    let n = a.conns.max(1);
    let bytes = Arc::new(AtomicU64::new(0));
    let mut streams = Vec::new();
    for _ in 0..n {
        let s = match a.proxy {
            Some(p) if !a.direct => tunnel(p, target).await?,
            _ => BufReader::new(TcpStream::connect(target).await?),
        };
        streams.push(s);
    }
    let mut tasks = Vec::new();
    for s in streams {
        let bytes = bytes.clone();
        tasks.push(tokio::spawn(async move {
            // Bytes already read past the CONNECT response count too.
            bytes.fetch_add(s.buffer().len() as u64, Ordering::Relaxed);
            let mut s = s.into_inner();
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let got = if copy {
                    s.read(&mut buf).await
                } else {
                    s.async_io(Interest::READABLE, || {
                        Ok(nix::sys::socket::recv(s.as_raw_fd(), &mut buf, MsgFlags::MSG_TRUNC)?)
                    })
                    .await
                };
                match got {
                    Ok(0) | Err(_) => break,
                    Ok(k) => bytes.fetch_add(k as u64, Ordering::Relaxed),
                };
            }
        }));
    }
    // Warm up a little, then measure.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b0 = bytes.load(Ordering::Relaxed);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(a.secs)).await;
    let b = bytes.load(Ordering::Relaxed) - b0;
    let el = t0.elapsed().as_secs_f64();
    for t in tasks {
        t.abort();
    }
    println!(
        "{{\"mode\":\"bulk\",\"tunnels\":{n},\"copy\":{copy},\"bytes\":{b},\"bytes_per_sec\":{:.0}}}",
        b as f64 / el
    );
    Ok(())
}

/// One GET over `conn` (absolute form); returns Ok(true) if the connection stays usable.
async fn get_once(conn: &mut BufReader<TcpStream>, req: &[u8]) -> anyhow::Result<bool> {
    conn.get_mut().write_all(req).await?;
    let mut line = String::new();
    if conn.read_line(&mut line).await? == 0 {
        bail!("EOF before response");
    }
    let ok = line.starts_with("HTTP/1.1 2") || line.starts_with("HTTP/1.0 2");
    let mut len: Option<usize> = None;
    let mut keep = line.starts_with("HTTP/1.1");
    loop {
        line.clear();
        if conn.read_line(&mut line).await? == 0 {
            bail!("EOF in response head");
        }
        if line == "\r\n" {
            break;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = Some(v.trim().parse()?);
        } else if lower.starts_with("connection:") && lower.contains("close") {
            keep = false;
        }
    }
    let Some(mut left) = len else {
        bail!("no content-length")
    };
    let mut buf = [0u8; 16 * 1024];
    while left > 0 {
        let k = conn.read(&mut buf[..left.min(16 * 1024)]).await?;
        if k == 0 {
            bail!("EOF in body");
        }
        left -= k;
    }
    if !ok {
        bail!("non-2xx status");
    }
    Ok(keep)
}

async fn http(a: &Args) -> anyhow::Result<()> {
    let proxy = a.proxy.context("--proxy needed")?;
    let host = a
        .url
        .strip_prefix("http://")
        .and_then(|r| r.split('/').next())
        .context("--url http://host/path")?
        .to_string();
    let req: Arc<Vec<u8>> = Arc::new(format!("GET {} HTTP/1.1\r\nHost: {host}\r\n\r\n", a.url).into_bytes());
    let t0 = Instant::now();
    let epoch = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs_f64();
    let deadline = t0 + Duration::from_secs_f64(a.secs);
    let tasks: Vec<_> = (0..a.conns.max(1))
        .map(|_| tokio::spawn(http_worker(proxy, req.clone(), t0, deadline)))
        .collect();
    let mut all = Vec::new();
    let mut reconnects = 0;
    let mut kinds: std::collections::BTreeMap<String, u64> = Default::default();
    for t in tasks {
        let w = t.await?;
        all.extend(w.samples);
        reconnects += w.reconnects;
        for k in w.kinds {
            *kinds.entry(k).or_default() += 1;
        }
    }
    all.sort_unstable();
    let failed = all.iter().filter(|s| !s.2).count();
    if let Some(path) = &a.out {
        let mut w = std::io::BufWriter::new(std::fs::File::create(path)?);
        for (off, lat, ok) in &all {
            writeln!(w, "{off} {lat} {}", *ok as u8)?;
        }
        w.flush()?;
    }
    println!(
        "{{\"mode\":\"http\",\"start_epoch\":{epoch:.6},\"requests\":{},\"failed\":{failed},\"connections\":{reconnects},\"failures\":{}}}",
        all.len(),
        serde_json::to_string(&kinds)?
    );
    Ok(())
}

/// What one closed-loop keep-alive worker saw: (offset µs, latency µs, ok) per request,
/// the connections it opened, and what each failure was.
struct HttpWorker {
    samples: Vec<(u32, u32, bool)>,
    reconnects: u64,
    kinds: Vec<String>,
}

async fn http_worker(proxy: SocketAddr, req: Arc<Vec<u8>>, t0: Instant, deadline: Instant) -> HttpWorker {
    let mut w = HttpWorker {
        samples: Vec::with_capacity(1 << 16),
        reconnects: 0,
        kinds: Vec::new(),
    };
    let mut conn: Option<BufReader<TcpStream>> = None;
    while Instant::now() < deadline {
        let start = Instant::now();
        let reused = conn.is_some();
        let r = async {
            if conn.is_none() {
                let s = TcpStream::connect(proxy).await?;
                s.set_nodelay(true)?;
                conn = Some(BufReader::new(s));
                w.reconnects += 1;
            }
            get_once(conn.as_mut().expect("set"), &req).await
        };
        let ok = match tokio::time::timeout(Duration::from_secs(5), r).await {
            Ok(Ok(keep)) => {
                if !keep {
                    conn = None;
                }
                true
            }
            Ok(Err(e)) => {
                conn = None;
                let what = e
                    .downcast_ref::<std::io::Error>()
                    .map_or_else(|| e.to_string(), |io| format!("{:?}", io.kind()));
                w.kinds
                    .push(format!("{}{what}", if reused { "reused conn: " } else { "new conn: " }));
                false
            }
            Err(_) => {
                conn = None;
                w.kinds.push("timeout".into());
                false
            }
        };
        let off = start.duration_since(t0).as_micros() as u32;
        w.samples.push((off, start.elapsed().as_micros() as u32, ok));
    }
    w
}
