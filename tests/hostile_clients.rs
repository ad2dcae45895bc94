//! Holes a hostile client could use, closed and checked through the real binary: login
//! failures as a timing oracle and a CPU lever, and requests that loop back into the proxy.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine as _;
use common::{Baton, connect_ports, testkit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A connection to the proxy from the loopback address `from` (the budget is per client).
/// The two tests that time baton take turns: the flood of one (8 connections running bcrypt)
/// would otherwise be the noise in the other's measurement (both in this binary's threads).
static TIMED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn connect_from(from: &str, proxy: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.bind(format!("{from}:0").parse().expect("addr")).expect("bind");
    socket.connect(proxy).await.expect("connect")
}

/// Sends `req` and reads one response head and body (Content-Length framed); returns the
/// head and the time it took.
async fn exchange(s: &mut TcpStream, req: &str) -> (String, Duration) {
    let started = Instant::now();
    s.write_all(req.as_bytes()).await.expect("send");
    let head = tokio::time::timeout(Duration::from_secs(30), testkit::read_head(s))
        .await
        .expect("answer in time")
        .expect("a response head");
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).await.expect("body");
    (head, started.elapsed())
}

fn get_with(origin: SocketAddr, user: &str, password: &str) -> String {
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("GET http://{origin}/bytes?n=10 HTTP/1.1\r\nHost: {origin}\r\nProxy-Authorization: Basic {token}\r\n\r\n")
}

/// A baton whose htpasswd has `alice` (cost 5, `htpasswd -B`'s default) with password
/// `right`, and `extra` configuration under `[access]`.
async fn baton_with_users(access: &str) -> Baton {
    let (dir, users) = common::dir_with_users();
    let extra = format!("[access]\nhtpasswd = \"{}\"\n{access}", users.display());
    Baton::start_in(dir, std::path::Path::new(common::BATON), &extra, &[]).await
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::test]
async fn bcrypt_timing_does_not_tell_which_users_exist() {
    let _turn = TIMED.lock().await;
    let origin = testkit::start_origin().await.unwrap();
    let baton = baton_with_users("auth_failures = 0\n").await;
    let mut conn = connect_from("127.0.0.1", baton.proxy).await;
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    // Alternate which goes first: the first of a pair measured slower in some runs.
    for i in 0..16 {
        for user in if i % 2 == 0 {
            ["alice", "mallory"]
        } else {
            ["mallory", "alice"]
        } {
            let (head, t) = exchange(&mut conn, &get_with(origin, user, "wrong")).await;
            assert!(head.starts_with("HTTP/1.1 407"), "{head}");
            if user == "alice" {
                known.push(t)
            } else {
                unknown.push(t)
            }
        }
    }
    // The fastest of each: what the work costs when nothing else ran. A loaded machine adds
    // to single samples, medians included (1.7x either way at a load of 17); a leak would
    // not (an unknown user answered without bcrypt: 1 ms against 40).
    let fastest = |t: Vec<Duration>| t.into_iter().min().expect("samples");
    let (k, u) = (fastest(known), fastest(unknown));
    let ratio = k.max(u).as_secs_f64() / k.min(u).as_secs_f64();
    eprintln!("407 for a known user: {k:?}, for an unknown user: {u:?} ({ratio:.2}×)");
    // A leak is an order of magnitude (bcrypt skipped: under 1 ms against 5-40); a loaded
    // machine moved even the fastest samples 1.56x apart.
    assert!(ratio < 3.0, "known user {k:?}, unknown user {u:?}: {ratio:.2}×");
    let (head, _) = exchange(&mut conn, &get_with(origin, "alice", "right")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
}

/// Bad logins from 127.0.0.3 on 8 connections until `stop`; returns (407s, 429s).
async fn flood_bad_logins(proxy: SocketAddr, origin: SocketAddr, stop: Instant) -> (u64, u64) {
    let workers: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(async move {
                let (mut unauthorized, mut limited) = (0, 0);
                let mut conn = connect_from("127.0.0.3", proxy).await;
                while Instant::now() < stop {
                    let (head, _) = exchange(&mut conn, &get_with(origin, "alice", "guess")).await;
                    if head.starts_with("HTTP/1.1 429") {
                        assert!(head.to_ascii_lowercase().contains("retry-after: "), "{head}");
                        limited += 1;
                    } else {
                        assert!(head.starts_with("HTTP/1.1 407"), "{head}");
                        unauthorized += 1;
                    }
                }
                (unauthorized, limited)
            })
        })
        .collect();
    let mut total = (0, 0);
    for w in workers {
        let (a, b) = w.await.expect("flood worker");
        total = (total.0 + a, total.1 + b);
    }
    total
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_logins_is_throttled_and_others_stay_fast() {
    let _turn = TIMED.lock().await;
    let origin = testkit::start_origin().await.unwrap();
    let baton = baton_with_users("").await;
    let mut good = connect_from("127.0.0.2", baton.proxy).await;
    let mut sample = async |n: usize| {
        let mut times = Vec::new();
        for _ in 0..n {
            let (head, t) = exchange(&mut good, &get_with(origin, "alice", "right")).await;
            assert!(head.starts_with("HTTP/1.1 200"), "{head}");
            times.push(t);
        }
        median(times)
    };
    let baseline = sample(20).await;
    let flood = tokio::spawn(flood_bad_logins(
        baton.proxy,
        origin,
        Instant::now() + Duration::from_secs(2),
    ));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let during = sample(20).await;
    let (unauthorized, limited) = flood.await.expect("flood");
    eprintln!("median {baseline:?} alone, {during:?} during the flood; flood: {unauthorized} × 407, {limited} × 429");
    assert!(
        unauthorized <= 10 + 8,
        "the budget (10 a minute) bounds bcrypt runs: {unauthorized} 407s"
    );
    assert!(limited > 100, "beyond the budget the flood gets 429s: {limited}");
    let bound = baseline * 3 + Duration::from_millis(20);
    assert!(
        during < bound,
        "a served client's median went from {baseline:?} to {during:?} during the flood"
    );
    assert!(baton.log().contains("rule=\"auth_failures\""), "{}", baton.log());
}

#[tokio::test]
async fn a_request_carrying_our_via_token_is_a_loop() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start("").await;
    let token = baton::proxy::policy::default_via_token(Some(baton.proxy.port()));
    let mut conn = connect_from("127.0.0.1", baton.proxy).await;
    let req = |via: &str| format!("GET http://{origin}/bytes?n=3 HTTP/1.1\r\nHost: {origin}\r\nVia: {via}\r\n\r\n");
    let (head, _) = exchange(&mut conn, &req(&format!("1.1 other-baton:3128, 1.1 {token}"))).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    let (head, _) = exchange(&mut conn, &req("1.1 other-baton:3128")).await;
    assert!(head.starts_with("HTTP/1.1 200"), "another proxy's token passes: {head}");
    assert!(baton.log().contains("rule=\"loop\""), "{}", baton.log());
}

/// This host's addresses, loopback ones too.
fn host_addresses() -> Vec<IpAddr> {
    let addrs = nix::ifaddrs::getifaddrs().expect("getifaddrs");
    addrs
        .filter_map(|i| i.address)
        .filter_map(|a| a.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())))
        .collect()
}

/// A CONNECT to any address of this host at a wildcard listener's port would tunnel into
/// the proxy itself. The proxy refuses it before connecting (no packet goes to the address).
#[tokio::test]
async fn a_wildcard_listener_refuses_a_tunnel_to_itself() {
    let wild = std::net::TcpListener::bind("0.0.0.0:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let extra = format!(
        "[[listener]]\nname = \"wild\"\naddress = \"0.0.0.0:{wild}\"\n{}",
        connect_ports(&[wild])
    );
    let baton = Baton::start(&extra).await;
    let addrs = host_addresses();
    assert!(addrs.iter().any(IpAddr::is_loopback), "{addrs:?}");
    for ip in addrs {
        let mut conn = connect_from("127.0.0.1", baton.proxy).await;
        let target = SocketAddr::new(ip, wild);
        let (head, _) = exchange(
            &mut conn,
            &format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n"),
        )
        .await;
        assert!(head.starts_with("HTTP/1.1 403"), "{target}: {head}");
        let refused = format!("destination {target} is this proxy");
        assert!(baton.log().contains(&refused), "{refused}:\n{}", baton.log());
    }
}
