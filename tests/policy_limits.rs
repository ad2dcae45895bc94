//! Limits per client and per user (`[limits.per_client]`, `[limits.per_user]`) through the
//! real binary, each measured over 3 s or more: `requests_per_second` (429 with
//! `Retry-After` beyond it, per client and per user through a group), and `bandwidth` over
//! a spliced tunnel (both directions) and over a forwarded response body. Two connections
//! of one client share its limit; another client is not slowed.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{BATON, Baton, testkit, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

/// How long the rates are measured, after [`WARM_UP`] has used up the buckets' burst.
const WINDOW: Duration = Duration::from_secs(3);
const WARM_UP: Duration = Duration::from_secs(1);
/// The bandwidth limit of the bandwidth tests: bytes a second.
const LIMIT: f64 = 2_000_000.0;

/// A baton with `files` written beside its configuration (`extra`).
async fn start_with(files: &[(&str, &str)], extra: &str) -> Baton {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        testkit::write_secret(&dir.path().join(name), text).expect("write file");
    }
    Baton::start_in(dir, Path::new(BATON), extra, &[]).await
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(format!("{from}:0").parse().expect("address"))
        .expect("bind");
    tokio::time::timeout(Duration::from_secs(5), socket.connect(to))
        .await
        .expect("connect in time")
        .expect("connect")
}

/// `GET url` on a kept-alive connection to the proxy: the status and the response head.
async fn get(s: &mut TcpStream, url: &str, login: Option<&str>) -> (u16, String) {
    let auth = login.map_or(String::new(), |l| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(l);
        format!("Proxy-Authorization: Basic {b64}\r\n")
    });
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: x\r\n{auth}\r\n").as_bytes())
        .await
        .expect("send");
    let read = testkit::client::read_response(s);
    let (head, _) = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("an answer in time")
        .expect("a response");
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head)
}

/// Requests as fast as one connection from `from` goes, for `for_`: (200s, 429s), every
/// 429 checked for its `Retry-After`.
async fn flood(proxy: SocketAddr, from: &str, url: &str, login: Option<&str>, for_: Duration) -> (u32, u32) {
    let mut s = connect_from(from, proxy).await;
    let (mut ok, mut limited) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < for_ {
        match get(&mut s, url, login).await {
            (200, _) => ok += 1,
            (429, head) => {
                assert!(head.to_ascii_lowercase().contains("retry-after: 1"), "{head}");
                limited += 1;
            }
            (other, head) => panic!("{from}: {other} is neither 200 nor 429: {head}"),
        }
    }
    (ok, limited)
}

/// Waits until the log has `text` (access lines are written as requests end).
async fn log_has(baton: &Baton, text: &str) {
    let what = format!("`{text}` in the log");
    wait_for(Duration::from_secs(5), &what, || async {
        baton.log().contains(text).then_some(())
    })
    .await;
}

/// Within ±25 % of `limit`.
fn near(rate: f64, limit: f64) -> bool {
    (limit * 0.75..=limit * 1.25).contains(&rate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_second_per_client() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = start_with(&[], "[limits.per_client]\nrequests_per_second = 5\n").await;
    let url = format!("http://{origin}/bytes?n=10");
    let proxy = baton.proxy;
    // Another client, halfway through the flood: served (its own bucket).
    let other = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut s = connect_from("127.0.0.2", proxy).await;
        let url = format!("http://{origin}/bytes?n=10");
        (get(&mut s, &url, None).await.0, get(&mut s, &url, None).await.0)
    });
    let (ok, limited) = flood(proxy, "127.0.0.1", &url, None, WINDOW).await;
    // The burst (5), then 5 a second for 3 s.
    eprintln!("requests_per_second = 5 over 3 s: {ok} served, {limited} refused");
    assert!((17..=22).contains(&ok), "5 + 3 s x 5/s = 20 served, got {ok}");
    assert!(limited > ok, "the rest are refused: {limited}");
    assert_eq!(
        other.await.unwrap(),
        (200, 200),
        "127.0.0.2 is not limited by 127.0.0.1's rate"
    );
    log_has(&baton, "rule=\"requests_per_second\"").await;
    log_has(
        &baton,
        "client 127.0.0.1 is over limits.per_client.requests_per_second = 5",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_per_second_per_user_through_a_group() {
    let origin = testkit::start_origin().await.unwrap();
    let alice = bcrypt::hash("right", 4).unwrap();
    let bob = bcrypt::hash("right", 4).unwrap();
    let users = format!("alice:{alice}\nbob:{bob}\n");
    let baton = start_with(
        &[("htpasswd", &users), ("groups", "contractors: bob\n")],
        "[access]\nhtpasswd = \"htpasswd\"\ngroups = \"groups\"\n\
         [limits.per_user]\nrequests_per_second = { \"*\" = 100_000, \"@contractors\" = 3 }\n",
    )
    .await;
    let url = format!("http://{origin}/bytes?n=10");
    let proxy = baton.proxy;
    // alice, from the same client address meanwhile: "*" is 100,000 a second.
    let url2 = url.clone();
    let alice = tokio::spawn(async move { flood(proxy, "127.0.0.1", &url2, Some("alice:right"), WINDOW).await });
    let (ok, limited) = flood(proxy, "127.0.0.1", &url, Some("bob:right"), WINDOW).await;
    eprintln!("@contractors = 3 over 3 s: bob {ok} served, {limited} refused");
    assert!((10..=14).contains(&ok), "3 + 3 s x 3/s = 12 served, got {ok}");
    assert!(limited > 0, "bob is refused beyond his group's rate");
    let (alice_ok, alice_limited) = alice.await.unwrap();
    assert!(
        alice_ok > 2 * ok && alice_limited == 0,
        "alice is not in @contractors: {alice_ok} served, {alice_limited} refused"
    );
    log_has(
        &baton,
        "user bob (@contractors) is over limits.per_user.requests_per_second = 3",
    )
    .await;
}

/// A flow's byte count, read by the test as it goes.
type Count = Arc<AtomicU64>;

/// The counts' rates over [`WINDOW`], after [`WARM_UP`].
async fn rates(counts: &[Count]) -> Vec<f64> {
    tokio::time::sleep(WARM_UP).await;
    let before: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
    let start = Instant::now();
    tokio::time::sleep(WINDOW).await;
    let took = start.elapsed().as_secs_f64();
    counts
        .iter()
        .zip(before)
        .map(|(c, b)| (c.load(Ordering::Relaxed) - b) as f64 / took)
        .collect()
}

/// Reads `s` to its end (or an error), counting.
fn count_reads(mut s: TcpStream) -> Count {
    let count = Count::default();
    let c = count.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            c.fetch_add(n as u64, Ordering::Relaxed);
        }
    });
    count
}

/// A server that writes to each connection as fast as it can (`source`), or reads from
/// each and counts what all of them got (not `source`).
async fn bulk_server(source: bool) -> (SocketAddr, Count) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Count::default();
    let total = count.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let total = total.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let moved = if source {
                        s.write(&buf).await
                    } else {
                        s.read(&mut buf).await
                    };
                    match moved {
                        Ok(n @ 1..) => _ = total.fetch_add(n as u64, Ordering::Relaxed),
                        _ => return,
                    }
                }
            });
        }
    });
    (addr, count)
}

/// A CONNECT tunnel to `target` from `from`.
async fn tunnel_from(from: &str, proxy: SocketAddr, target: SocketAddr) -> TcpStream {
    let mut s = connect_from(from, proxy).await;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = testkit::client::read_head(&mut s).await.expect("CONNECT answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_per_client_over_spliced_tunnels() {
    let (source, _) = bulk_server(true).await;
    let (sink, uploaded) = bulk_server(false).await;
    // The source speaks first: tunnels are relayed as they come (no wait for a ClientHello).
    let ports = common::connect_ports(&[source.port(), sink.port()]);
    let extra = format!("{ports}sni = \"ignore\"\n[limits.per_client]\nbandwidth = {LIMIT}\n");
    let baton = start_with(&[], &extra).await;
    let p = baton.proxy;
    // 127.0.0.1: two tunnels that share its limit; 127.0.0.2: one, which is not slowed.
    let a1 = count_reads(tunnel_from("127.0.0.1", p, source).await);
    let a2 = count_reads(tunnel_from("127.0.0.1", p, source).await);
    let b = count_reads(tunnel_from("127.0.0.2", p, source).await);
    // 127.0.0.3 uploads as fast as it can: counted where it arrives.
    let mut up = tunnel_from("127.0.0.3", p, sink).await;
    tokio::spawn(async move {
        let chunk = vec![0u8; 64 * 1024];
        while up.write_all(&chunk).await.is_ok() {}
    });
    let r = rates(&[a1, a2, b, uploaded]).await;
    let mb = |x: f64| x / 1e6;
    eprintln!(
        "bandwidth = {} MB/s over 3 s: 127.0.0.1 {:.2} + {:.2} = {:.2} MB/s, 127.0.0.2 {:.2} MB/s, upload {:.2} MB/s",
        mb(LIMIT),
        mb(r[0]),
        mb(r[1]),
        mb(r[0] + r[1]),
        mb(r[2]),
        mb(r[3])
    );
    assert!(
        near(r[0] + r[1], LIMIT),
        "127.0.0.1's two tunnels share its limit: {r:?}"
    );
    assert!(r[0] > 0.0 && r[1] > 0.0, "both of them move: {r:?}");
    assert!(
        near(r[2], LIMIT),
        "127.0.0.2 has its own limit, not slowed by 127.0.0.1: {r:?}"
    );
    assert!(near(r[3], LIMIT), "the upload direction is limited too: {r:?}");
}

/// `GET /bytes?n=...` through the proxy from `from`, the body counted as it comes.
async fn download_from(from: &str, proxy: SocketAddr, origin: SocketAddr) -> Count {
    download_as(from, proxy, origin, None).await
}

/// [`download_from`] logged in as `login` (`user:password`), if given.
async fn download_as(from: &str, proxy: SocketAddr, origin: SocketAddr, login: Option<&str>) -> Count {
    let mut s = connect_from(from, proxy).await;
    let url = format!("http://{origin}/bytes?n=100000000");
    let auth = login.map_or(String::new(), |l| {
        let b64 = base64::engine::general_purpose::STANDARD.encode(l);
        format!("Proxy-Authorization: Basic {b64}\r\n")
    });
    s.write_all(format!("GET {url} HTTP/1.1\r\nHost: {origin}\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let head = testkit::client::read_head(&mut s).await.expect("response head");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    count_reads(s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_per_client_over_response_bodies() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = start_with(&[], &format!("[limits.per_client]\nbandwidth = {LIMIT}\n")).await;
    let p = baton.proxy;
    let a1 = download_from("127.0.0.1", p, origin).await;
    let a2 = download_from("127.0.0.1", p, origin).await;
    let b = download_from("127.0.0.2", p, origin).await;
    let r = rates(&[a1, a2, b]).await;
    let mb = |x: f64| x / 1e6;
    eprintln!(
        "bandwidth = {} MB/s over 3 s, bodies: 127.0.0.1 {:.2} + {:.2} = {:.2} MB/s, 127.0.0.2 {:.2} MB/s",
        mb(LIMIT),
        mb(r[0]),
        mb(r[1]),
        mb(r[0] + r[1]),
        mb(r[2])
    );
    assert!(
        near(r[0] + r[1], LIMIT),
        "127.0.0.1's two downloads share its limit: {r:?}"
    );
    assert!(r[0] > 0.0 && r[1] > 0.0, "both of them move: {r:?}");
    assert!(
        near(r[2], LIMIT),
        "127.0.0.2 has its own limit, not slowed by 127.0.0.1: {r:?}"
    );
}

/// A group's bandwidth: each member gets it (a bucket of their own); a user the table
/// does not name is not limited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_per_user_through_a_group() {
    let origin = testkit::start_origin().await.unwrap();
    let hash = |_| bcrypt::hash("right", 4).unwrap();
    let users = format!("alice:{}\nbob:{}\ncarol:{}\n", hash(1), hash(2), hash(3));
    let baton = start_with(
        &[("htpasswd", &users), ("groups", "contractors: bob carol\n")],
        &format!(
            "[access]\nhtpasswd = \"htpasswd\"\ngroups = \"groups\"\n\
             [limits.per_user]\nbandwidth = {{ \"@contractors\" = {LIMIT} }}\n"
        ),
    )
    .await;
    let p = baton.proxy;
    let bob = download_as("127.0.0.1", p, origin, Some("bob:right")).await;
    let carol = download_as("127.0.0.1", p, origin, Some("carol:right")).await;
    let alice = download_as("127.0.0.1", p, origin, Some("alice:right")).await;
    let r = rates(&[bob, carol]).await;
    // alice may be done before the window: her bytes over the whole time, which at the
    // limit would be at most the burst and 4 s' worth.
    let alice = alice.load(Ordering::Relaxed) as f64;
    let whole = (WARM_UP + WINDOW).as_secs_f64();
    eprintln!(
        "@contractors bandwidth = {} MB/s over 3 s: bob {:.2}, carol {:.2} MB/s; alice (not named) {:.0} MB in {whole} s",
        LIMIT / 1e6,
        r[0] / 1e6,
        r[1] / 1e6,
        alice / 1e6
    );
    assert!(
        near(r[0], LIMIT) && near(r[1], LIMIT),
        "each member has the group's limit: {r:?}"
    );
    assert!(
        alice > 3.0 * LIMIT * whole,
        "alice is not named: not limited: {alice} bytes"
    );
}

/// A tunnel moved at a handoff takes the new generation's bucket of its key (and its
/// limit): a halved limit halves its rate; were it still relayed by the old generation, it
/// would keep the old rate until the drain ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moved_tunnel_takes_the_new_generations_bucket() {
    let (source, _) = bulk_server(true).await;
    let ports = common::connect_ports(&[source.port()]);
    let extra = |limit: f64| format!("{ports}sni = \"ignore\"\n[limits.per_client]\nbandwidth = {limit}\n");
    let mut baton = start_with(&[], &extra(LIMIT)).await;
    let first = baton.status().await["pid"].as_u64();
    let count = count_reads(tunnel_from("127.0.0.1", baton.proxy, source).await);
    let before = rates(std::slice::from_ref(&count)).await[0];
    std::fs::write(
        &baton.config,
        common::config_text(baton.dir.path(), &extra(LIMIT / 2.0)),
    )
    .unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "{out}");
    let after = rates(std::slice::from_ref(&count)).await[0];
    eprintln!(
        "a moved tunnel: {:.2} MB/s before the handoff (limit {:.1}), {:.2} MB/s after (limit {:.1})",
        before / 1e6,
        LIMIT / 1e6,
        after / 1e6,
        LIMIT / 2e6
    );
    assert_ne!(
        baton.wait_status(Duration::from_secs(5)).await["pid"].as_u64(),
        first,
        "handed off"
    );
    assert!(near(before, LIMIT), "before: {before}");
    assert!(near(after, LIMIT / 2.0), "after: the new generation's limit: {after}");
}
