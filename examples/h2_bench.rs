//! Load tool for scripts/bench's h2 section: CONNECT tunnels opened per second to a TLS
//! listener, over HTTP/2 streams of one connection against HTTP/1.1 (a TLS connection per
//! tunnel, sessions resumed, as a client does).
//!
//!   h2_bench h2open  --proxy HOST:PORT --ca PEM [--conns 32] [--secs 5] [--target-port N]
//!   h2_bench tlsopen --proxy HOST:PORT --ca PEM [--conns 32] [--secs 5] [--target-port N]
//!   h2_bench h2bulk  --proxy HOST:PORT --ca PEM [--secs 5] [--target-port N]
//!   h2_bench tlsbulk --proxy HOST:PORT --ca PEM [--secs 5] [--target-port N]
//!
//! open: each worker loops CONNECT → 200 → read the one byte the target (a server inside
//! this tool) writes → close. bulk: one tunnel, the target writing as fast as it can, bytes
//! per second read through it (is one HTTP/2 stream held far below an HTTP/1.1 tunnel by
//! flow control?). One JSON line on stdout. Request rates over HTTP/2 come from
//! h2load, which speaks forward-proxy form with `-H ':scheme: http' -H ':authority: …'`.

use std::net::SocketAddr;
use std::time::Instant;

use anyhow::{Context, bail};
use baton_testkit::ProxyTls;
use baton_testkit::h2::H2Proxy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

struct Args {
    mode: String,
    proxy: SocketAddr,
    ca: String,
    conns: usize,
    secs: f64,
    target_port: u16,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let mode = it
        .next()
        .context("usage: h2_bench h2open|tlsopen --proxy HOST:PORT --ca PEM")?;
    let (mut proxy, mut ca, mut conns, mut secs, mut target_port) = (None, None, 32, 5.0, 0);
    while let Some(flag) = it.next() {
        let mut val = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--proxy" => proxy = Some(val()?.parse().context("--proxy HOST:PORT")?),
            "--ca" => ca = Some(std::fs::read_to_string(val()?).context("--ca PEM")?),
            "--conns" => conns = val()?.parse()?,
            "--secs" => secs = val()?.parse()?,
            "--target-port" => target_port = val()?.parse()?,
            other => bail!("unknown option {other}"),
        }
    }
    Ok(Args {
        mode,
        proxy: proxy.context("--proxy needed")?,
        ca: ca.context("--ca needed")?,
        conns,
        secs,
        target_port,
    })
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    // One thread: scripts/bench pins the load generator to one core.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    if args.mode.ends_with("bulk") {
        rt.block_on(bulk(args))
    } else {
        rt.block_on(run(args))
    }
}

/// One tunnel's bytes per second from a target that writes as fast as the tunnel takes.
async fn bulk(a: Args) -> anyhow::Result<()> {
    let l = TcpListener::bind(("127.0.0.1", a.target_port)).await?;
    let target = l.local_addr()?;
    tokio::spawn(async move {
        let chunk = vec![0x5a_u8; 256 * 1024];
        while let Ok((mut s, _)) = l.accept().await {
            let chunk = chunk.clone();
            tokio::spawn(async move { while s.write_all(&chunk).await.is_ok() {} });
        }
    });
    let h2 = a.mode == "h2bulk";
    let tls = ProxyTls::trusting(&a.ca, if h2 { &[b"h2"] } else { &[b"http/1.1"] })?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut tunnel: Box<dyn tokio::io::AsyncRead + Unpin> = if h2 {
        Box::new(H2Proxy::connect(a.proxy, &tls).await?.tunnel(target).await?)
    } else {
        Box::new(baton_testkit::open_tunnel_via(a.proxy, target, Some(&tls)).await?)
    };
    let (t0, mut n) = (Instant::now(), 0u64);
    while t0.elapsed().as_secs_f64() < a.secs {
        n += tunnel.read(&mut buf).await? as u64;
    }
    let per_sec = n as f64 / t0.elapsed().as_secs_f64();
    println!(
        "{{\"mode\":\"{}\",\"bytes\":{n},\"bytes_per_sec\":{per_sec:.0}}}",
        a.mode
    );
    Ok(())
}

async fn run(a: Args) -> anyhow::Result<()> {
    let target = baton_testkit::bench::one_byte_target(a.target_port).await?;
    let h2 = a.mode == "h2open";
    let tls = ProxyTls::trusting(&a.ca, if h2 { &[b"h2"] } else { &[b"http/1.1"] })?;
    let shared = if h2 {
        Some(H2Proxy::connect(a.proxy, &tls).await?)
    } else {
        None
    };
    let proxy = a.proxy;
    let c = baton_testkit::bench::closed_loop(a.conns, a.secs, move || {
        let (tls, shared) = (tls.clone(), shared.clone());
        async move {
            let mut b = [0u8; 1];
            match shared {
                Some(c) => c.tunnel(target).await?.read_exact(&mut b).await?,
                None => {
                    baton_testkit::open_tunnel_via(proxy, target, Some(&tls))
                        .await?
                        .read_exact(&mut b)
                        .await?
                }
            };
            anyhow::Ok(())
        }
    })
    .await;
    println!(
        "{{\"mode\":\"{}\",\"tunnels\":{},\"per_sec\":{:.1},\"errors\":{}}}",
        a.mode,
        c.done,
        c.done as f64 / c.secs,
        c.errors
    );
    Ok(())
}
