//! Load tool for scripts/bench's inspect section: requests through a bumping proxy (baton's
//! `action = "bump"`, Squid's `ssl_bump bump`, goproxy's `AlwaysMitm`).
//!
//!   inspect_bench keepalive --proxy HOST:PORT --ca PEM --target NAME:PORT [--conns 32] [--secs 5] [--path /small]
//!   inspect_bench conns     --proxy HOST:PORT --ca PEM --target NAME:PORT [--conns 32] [--secs 5] [--path /small]
//!
//! Each of `conns` workers sends `CONNECT NAME:PORT`, then makes TLS to NAME inside the tunnel
//! trusting only `--ca` (the proxy's inspection CA: the proxy's minted leaf must verify), with
//! no session resumption (every connection a full handshake), offering ALPN `http/1.1`.
//! keepalive: GET after GET on that connection (req/s through the bump); conns: one GET with
//! `Connection: close`, then close, and again (bumped connections per second). keepalive's
//! window opens once every worker has its connection (the handshakes are not in it); conns'
//! once as many connections completed as there are workers, and it lasts until as many more
//! did (at least `--secs`). A response
//! must be a 200 with a body (Content-Length or chunked, as goproxy sends). On stdout, a line
//! `{"window":"open"}` when the measured window opens (scripts/bench reads the proxy's CPU
//! then), and one JSON line with the figures as soon as it closes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

struct Args {
    mode: String,
    proxy: SocketAddr,
    ca: String,
    target: String,
    path: String,
    conns: usize,
    secs: f64,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .context("usage: inspect_bench keepalive|conns --proxy HOST:PORT --ca PEM --target NAME:PORT")?;
    if mode != "keepalive" && mode != "conns" {
        bail!("unknown mode {mode}");
    }
    let (mut proxy, mut ca, mut target) = (None, None, None);
    let (mut path, mut conns, mut secs) = ("/small".to_string(), 32, 5.0);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--proxy" => proxy = Some(val()?.parse().context("--proxy HOST:PORT")?),
            "--ca" => ca = Some(std::fs::read_to_string(val()?).context("--ca PEM")?),
            "--target" => target = Some(val()?),
            "--path" => path = val()?,
            "--conns" => conns = val()?.parse()?,
            "--secs" => secs = val()?.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(Args {
        mode,
        proxy: proxy.context("--proxy needed")?,
        ca: ca.context("--ca needed")?,
        target: target.context("--target needed")?,
        path,
        conns,
        secs,
    })
}

/// TLS trusting only the certificates in `pem`, without session resumption, ALPN `http/1.1`.
fn connector(pem: &str) -> anyhow::Result<TlsConnector> {
    let mut config = baton_testkit::tls::client_config(pem, &[b"http/1.1"])?;
    config.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(config)))
}

/// How long CONNECT and the handshake may take: goproxy 1.1 makes an RSA key for every
/// CONNECT, and 32 of them queue on its core for seconds.
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);

/// What every worker shares: how to open a bumped connection and what to ask.
struct Job {
    proxy: SocketAddr,
    target: String,
    name: ServerName<'static>,
    tls: TlsConnector,
    request: Vec<u8>,
    close: bool,
    stop: AtomicBool,
    opened: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

impl Job {
    async fn open(&self) -> anyhow::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut tcp = TcpStream::connect(self.proxy).await?;
        tcp.set_nodelay(true)?;
        let connect = format!("CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n\r\n", self.target);
        tcp.write_all(connect.as_bytes()).await?;
        let mut head = Vec::new();
        read_head(&mut tcp, &mut head).await?;
        let line = String::from_utf8_lossy(&head);
        if !line.starts_with("HTTP/1.1 200") && !line.starts_with("HTTP/1.0 200") {
            bail!("CONNECT: {}", line.lines().next().unwrap_or(""));
        }
        Ok(self.tls.connect(self.name.clone(), tcp).await?)
    }

    fn failed(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_error.lock().expect("not poisoned");
        if first.is_none() {
            *first = Some(format!("{e:#}"));
        }
    }

    /// One worker: a bumped connection, requests on it (one when `close`), again.
    async fn worker(self: Arc<Job>) {
        let mut buf = Vec::with_capacity(4096);
        while !self.stop.load(Ordering::Relaxed) {
            let mut s = match tokio::time::timeout(OPEN_TIMEOUT, self.open()).await {
                Ok(Ok(s)) => {
                    self.opened.fetch_add(1, Ordering::Relaxed);
                    s
                }
                Ok(Err(e)) => {
                    self.failed(&e);
                    continue;
                }
                Err(_) => {
                    self.failed(&anyhow::anyhow!("CONNECT and handshake took over {OPEN_TIMEOUT:?}"));
                    continue;
                }
            };
            buf.clear();
            while !self.stop.load(Ordering::Relaxed) {
                let one = async {
                    s.write_all(&self.request).await?;
                    read_response(&mut s, &mut buf).await
                };
                match tokio::time::timeout(Duration::from_secs(5), one).await {
                    Ok(Ok(())) => self.done.fetch_add(1, Ordering::Relaxed),
                    Ok(Err(e)) => {
                        self.failed(&e);
                        break;
                    }
                    Err(_) => {
                        self.failed(&anyhow::anyhow!("a response took over 5 s"));
                        break;
                    }
                };
                if self.close {
                    break;
                }
            }
        }
    }
}

/// Reads up to the end of a response head from a plain stream (the CONNECT's answer: the
/// proxy sends nothing more before the client's ClientHello).
async fn read_head(s: &mut TcpStream, head: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut b = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).await?;
        if n == 0 {
            bail!("the proxy closed before answering CONNECT");
        }
        head.extend_from_slice(&b[..n]);
        if head.len() > 16384 {
            bail!("CONNECT answer over 16 KiB");
        }
    }
    Ok(())
}

/// Reads more into `buf`; an error at EOF.
async fn fill<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut b = [0u8; 8192];
    let n = s.read(&mut b).await?;
    if n == 0 {
        bail!("connection closed mid-response");
    }
    buf.extend_from_slice(&b[..n]);
    Ok(())
}

fn find(buf: &[u8], pat: &[u8]) -> Option<usize> {
    buf.windows(pat.len()).position(|w| w == pat)
}

/// Reads one response (a 200, with a Content-Length or chunked body) from `s`, whose bytes
/// already read are in `buf`; leaves in `buf` what follows it.
async fn read_response<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let head_end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i + 4;
        }
        fill(s, buf).await?;
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        bail!("response: {}", head.lines().next().unwrap_or(""));
    }
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map(|v| v.trim().parse::<usize>())
        .transpose()?;
    let end = match length {
        Some(n) => {
            while buf.len() < head_end + n {
                fill(s, buf).await?;
            }
            head_end + n
        }
        None if head.contains("transfer-encoding: chunked") => chunked_end(s, buf, head_end).await?,
        None => bail!("a response without Content-Length or chunked encoding"),
    };
    buf.drain(..end);
    Ok(())
}

/// Where a chunked body that starts at `at` ends (no trailers).
async fn chunked_end<S: AsyncRead + Unpin>(s: &mut S, buf: &mut Vec<u8>, mut at: usize) -> anyhow::Result<usize> {
    loop {
        let line_end = loop {
            if let Some(i) = find(&buf[at..], b"\r\n") {
                break at + i;
            }
            fill(s, buf).await?;
        };
        let size_text = String::from_utf8_lossy(&buf[at..line_end]).to_string();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size_text:?}"))?;
        // The chunk and its CRLF; the last (empty) chunk is followed by the final CRLF.
        let end = line_end + 2 + size + 2;
        while buf.len() < end {
            fill(s, buf).await?;
        }
        if size == 0 {
            return Ok(end);
        }
        at = end;
    }
}

fn main() -> anyhow::Result<()> {
    let a = parse_args()?;
    let host = a.target.rsplit_once(':').map_or(a.target.as_str(), |(h, _)| h);
    let close = a.mode == "conns";
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\n{}\r\n",
        a.path,
        a.target,
        if close { "Connection: close\r\n" } else { "" }
    );
    let job = Arc::new(Job {
        proxy: a.proxy,
        name: ServerName::try_from(host.to_string()).context("--target NAME:PORT")?,
        target: a.target.clone(),
        tls: connector(&a.ca)?,
        request: request.into_bytes(),
        close,
        stop: AtomicBool::new(false),
        opened: AtomicU64::new(0),
        done: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        first_error: std::sync::Mutex::new(None),
    });
    // One thread: scripts/bench pins the load generator to one core.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (done, secs) = rt.block_on(async {
        let tasks: Vec<_> = (0..a.conns.max(1))
            .map(|_| tokio::spawn(job.clone().worker()))
            .collect();
        // The window opens once every worker has its bumped connection (keepalive) or has
        // completed one (conns), at most OPEN_TIMEOUT * 2 from now: a proxy that makes a key
        // per CONNECT finishes its first 32 together, seconds in. conns' window lasts until it
        // has counted `conns` too (at most OPEN_TIMEOUT * 2 more), so that a slow proxy's
        // figure is not 0 or 1 batch.
        let (started, want) = (Instant::now(), a.conns as u64);
        let count = if close { &job.done } else { &job.opened };
        while count.load(Ordering::Relaxed) < want && started.elapsed() < 2 * OPEN_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (d0, t0) = (job.done.load(Ordering::Relaxed), Instant::now());
        println!("{{\"window\":\"open\"}}");
        tokio::time::sleep(Duration::from_secs_f64(a.secs)).await;
        while close && job.done.load(Ordering::Relaxed) - d0 < want && t0.elapsed() < 2 * OPEN_TIMEOUT {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let counted = (job.done.load(Ordering::Relaxed) - d0, t0.elapsed().as_secs_f64());
        job.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.abort();
        }
        counted
    });
    let first = job
        .first_error
        .lock()
        .expect("not poisoned")
        .clone()
        .unwrap_or_default();
    println!(
        "{{\"mode\":\"{}\",\"done\":{done},\"per_sec\":{:.1},\"errors\":{},\"first_error\":{}}}",
        a.mode,
        done as f64 / secs,
        job.errors.load(Ordering::Relaxed),
        serde_json::to_string(&first)?
    );
    Ok(())
}
