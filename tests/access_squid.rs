//! `access_format = "squid"` read by the real GoAccess (Debian's `/usr/bin/goaccess`): baton
//! under load (keep-alive and one-shot clients fetching bodies of many sizes, with Content-
//! Length and chunked, CONNECT tunnels, denials, an unreachable origin) writes its access log
//! in Squid's native format, and GoAccess must parse every line, count as many hits as the
//! clients counted answers, and as many bytes as the clients read off their sockets, status
//! lines, headers and chunk framing included (what Squid's `%<st` counts).

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const GOACCESS: &str = "/usr/bin/goaccess";
/// Squid's native line as GoAccess reads it: GoAccess's own `SQUID` format is this same line
/// behind a syslog prefix (`Nov 26 01:03:40 host squid[123]: `), so a plain `access.log` (as
/// Squid writes it, and baton) takes the format without the prefix, every field named.
const NATIVE: &str = "%x.%^ %~%L %h %^/%s %b %m %U %e %^ %M";
const CLIENTS: usize = 6;
const REQUESTS: usize = 25;
const SIZES: [u64; 7] = [0, 1, 700, 4096, 65_536, 300_001, 1 << 20];
const TUNNELS: usize = 3;
const TUNNEL_ROUNDS: usize = 3;

/// What clients counted: answers, and every byte read for them off the socket.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    answers: u64,
    bytes: u64,
    tunnels: u64,
    denied: u64,
}

impl std::ops::AddAssign for Tally {
    fn add_assign(&mut self, o: Tally) {
        self.answers += o.answers;
        self.bytes += o.bytes;
        self.tunnels += o.tunnels;
        self.denied += o.denied;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn goaccess_parses_every_line_and_counts_what_the_clients_received() {
    assert!(
        Path::new(GOACCESS).exists(),
        "{GOACCESS} is missing (Debian package goaccess; .ci/run installs it)"
    );
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let baton = Baton::start(&format!(
        "[log]\naccess = \"access.log\"\naccess_format = \"squid\"\n\n\
         [access]\nconnect_ports = [{}]\ndeny_hosts = [\"denied.example\"]\n",
        echo.port()
    ))
    .await;
    let proxy = baton.proxy;

    let mut load = tokio::task::JoinSet::new();
    for c in 0..CLIENTS {
        // Two clients open a connection per request, the others keep theirs.
        load.spawn(fetch(proxy, origin, c, c >= CLIENTS - 2));
    }
    for t in 0..TUNNELS {
        load.spawn(tunnels(proxy, echo, t));
    }
    load.spawn(refusals(proxy));
    let mut tally = Tally::default();
    while let Some(t) = load.join_next().await {
        tally += t.unwrap();
    }
    assert_eq!(tally.tunnels, (TUNNELS * TUNNEL_ROUNDS) as u64);

    // A line is written once its answer has been sent (a tunnel's when the tunnel closed),
    // so the last ones may follow the clients by a moment.
    let log = baton.dir.path().join("access.log");
    let text = wait_for(Duration::from_secs(10), "an access line per answer", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (text.lines().count() as u64 >= tally.answers).then_some(text)
    })
    .await;
    assert_eq!(
        text.lines().count() as u64,
        tally.answers,
        "one line per answer:\n{text}"
    );
    check_lines(&text, tally, origin, echo);

    let general = goaccess(&log, &["--log-format", NATIVE, "--date-format=%s", "--time-format=%s"]);
    assert_goaccess_counts(&general, tally, "the native format");
    eprintln!("goaccess over baton's access.log: {general}");

    // The same lines as Squid's syslog output carries them, under GoAccess's own SQUID format.
    let syslog = baton.dir.path().join("syslog.log");
    let prefixed: String = text
        .lines()
        .map(|l| format!("Nov 26 01:03:40 host baton[1]: {l}\n"))
        .collect();
    std::fs::write(&syslog, prefixed).unwrap();
    let general = goaccess(&syslog, &["--log-format=SQUID"]);
    assert_goaccess_counts(&general, tally, "--log-format=SQUID");
}

/// A tunnel open across a handoff moves to the new generation, which writes its line when it
/// ends: its bytes are still the `200` answer the first generation sent plus all the client
/// received through both, and GoAccess reads it like the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_moved_by_a_handoff_counts_its_answer_and_all_its_payload() {
    let echo = testkit::start_echo().await.unwrap();
    let baton = Baton::start(&format!(
        "[log]\naccess = \"access.log\"\naccess_format = \"squid\"\n\n{}",
        connect_ports(&[echo.port()])
    ))
    .await;
    let mut s = TcpStream::connect(baton.proxy).await.unwrap();
    s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = testkit::read_head(&mut s).await.unwrap();
    let (before, after) = (testkit::data::pattern(30_000), testkit::data::pattern(50_001));
    let mut echoed = vec![0; before.len()];
    s.write_all(&before).await.unwrap();
    s.read_exact(&mut echoed).await.unwrap();

    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "{out}");
    wait_for(Duration::from_secs(10), "the tunnel to move", || async {
        baton.log().contains("handed to the new generation").then_some(())
    })
    .await;
    let (mut r, mut w) = s.split();
    let send = async {
        w.write_all(&after).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let mut rest = Vec::new();
    let (_, received) = tokio::join!(send, r.read_to_end(&mut rest));
    received.unwrap();
    assert_eq!(rest, after);
    let bytes = (head.len() + before.len() + after.len()) as u64;

    let log = baton.dir.path().join("access.log");
    let text = wait_for(Duration::from_secs(10), "the tunnel's line", || async {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        (!text.is_empty()).then_some(text)
    })
    .await;
    let tally = Tally {
        answers: 1,
        bytes,
        tunnels: 1,
        denied: 0,
    };
    check_lines(&text, tally, echo, echo);
    let general = goaccess(&log, &["--log-format", NATIVE, "--date-format=%s", "--time-format=%s"]);
    assert_goaccess_counts(&general, tally, "a moved tunnel");
}

/// Runs GoAccess over `log` (no configuration file but its arguments) and returns the JSON
/// report's `general` section.
fn goaccess(log: &Path, format: &[&str]) -> serde_json::Value {
    let invalid = log.with_extension("invalid");
    let out = Command::new(GOACCESS)
        .arg(log)
        .arg("--no-global-config")
        .args(format)
        .arg(format!("--invalid-requests={}", invalid.display()))
        .args(["-o", "json"])
        .output()
        .expect("run goaccess");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "goaccess {format:?} failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("goaccess JSON ({e}): {stdout}"));
    let rejected = std::fs::read_to_string(&invalid).unwrap_or_default();
    assert!(rejected.is_empty(), "lines goaccess {format:?} rejected:\n{rejected}");
    report["general"].clone()
}

fn assert_goaccess_counts(general: &serde_json::Value, tally: Tally, how: &str) {
    assert_eq!(general["total_requests"], tally.answers, "{how}: {general}");
    assert_eq!(general["valid_requests"], tally.answers, "{how}: {general}");
    assert_eq!(general["failed_requests"], 0, "{how}: {general}");
    assert_eq!(
        general["bandwidth"], tally.bytes,
        "{how}: bytes the clients read: {general}"
    );
}

/// The log's own figures (so that a failure says which kind of line is off), and the fields
/// of the kinds of lines the load made.
fn check_lines(text: &str, tally: Tally, origin: SocketAddr, echo: SocketAddr) {
    let mut bytes = 0;
    let (mut tunnels, mut denied) = (0, 0);
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(f.len(), 10, "ten fields: {line}");
        assert!(
            f[0].len() == 14 && f[0].as_bytes()[10] == b'.',
            "seconds.milliseconds: {line}"
        );
        assert_eq!(f[2], "127.0.0.1", "{line}");
        bytes += f[4].parse::<u64>().unwrap_or_else(|_| panic!("bytes: {line}"));
        match f[3] {
            "TCP_TUNNEL/200" => {
                tunnels += 1;
                assert_eq!(
                    &f[5..],
                    ["CONNECT", &echo.to_string(), "-", "HIER_DIRECT/127.0.0.1", "-"],
                    "{line}"
                );
            }
            "TCP_DENIED/403" => {
                denied += 1;
                assert_eq!(&f[7..], ["-", "HIER_NONE/-", "text/plain"], "{line}");
            }
            "TCP_MISS/200" | "TCP_MISS/404" => {
                assert!(f[6].starts_with(&format!("http://{origin}/")), "{line}");
                assert_eq!(f[8], "HIER_DIRECT/127.0.0.1", "{line}");
            }
            "TCP_MISS/502" => assert_eq!(f[8], "HIER_NONE/-", "{line}"),
            other => panic!("unexpected result code {other}: {line}"),
        }
    }
    assert_eq!((tunnels, denied), (tally.tunnels, tally.denied), "{text}");
    assert_eq!(bytes, tally.bytes, "the log's bytes against the clients' count");
}

/// One client's GETs of bodies of every size, Content-Length and chunked, and a 404 now
/// and then; `one_shot`: a new connection per request.
async fn fetch(proxy: SocketAddr, origin: SocketAddr, client: usize, one_shot: bool) -> Tally {
    let mut tally = Tally::default();
    let mut conn: Option<BufReader<TcpStream>> = None;
    for i in 0..REQUESTS {
        let n = SIZES[(i * 3 + client) % SIZES.len()];
        let path = match i % 5 {
            4 => "/nope".to_string(),
            k if k % 2 == 0 => format!("/bytes?n={n}"),
            _ => format!("/chunked?n={n}"),
        };
        let s = match conn.as_mut() {
            Some(s) if !one_shot => s,
            _ => conn.insert(BufReader::new(TcpStream::connect(proxy).await.unwrap())),
        };
        let (status, bytes) = exchange(s, &format!("GET http://{origin}{path}"), &origin.to_string()).await;
        let want = if path == "/nope" { 404 } else { 200 };
        assert_eq!(status, want, "{path}");
        tally.answers += 1;
        tally.bytes += bytes;
    }
    tally
}

/// A denied GET (`deny_hosts`), a denied CONNECT (port not in `connect_ports`) and an origin
/// that refuses connections (502), on one keep-alive connection.
async fn refusals(proxy: SocketAddr) -> Tally {
    let mut tally = Tally::default();
    let mut s = BufReader::new(TcpStream::connect(proxy).await.unwrap());
    for (request, host, want) in [
        ("GET http://denied.example/", "denied.example", 403),
        ("CONNECT 127.0.0.1:9", "127.0.0.1:9", 403),
        ("GET http://127.0.0.1:1/", "127.0.0.1:1", 502),
    ] {
        let (status, bytes) = exchange(&mut s, request, host).await;
        assert_eq!(status, want, "{request}");
        tally.answers += 1;
        tally.bytes += bytes;
        tally.denied += u64::from(status == 403);
    }
    tally
}

/// CONNECT tunnels to the echo server: each sends a payload, half-closes, and reads the echo
/// until the tunnel closes.
async fn tunnels(proxy: SocketAddr, echo: SocketAddr, task: usize) -> Tally {
    let mut tally = Tally::default();
    for round in 0..TUNNEL_ROUNDS {
        let payload = testkit::data::pattern(10_000 * (task + 1) + round);
        let mut s = TcpStream::connect(proxy).await.unwrap();
        s.write_all(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let head = testkit::read_head(&mut s).await.unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&payload).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let mut echoed = Vec::new();
        let receive = tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut echoed));
        let (_, received) = tokio::join!(send, receive);
        received.expect("the tunnel closes after the echo").unwrap();
        assert_eq!(echoed, payload);
        tally.answers += 1;
        tally.tunnels += 1;
        tally.bytes += (head.len() + echoed.len()) as u64;
    }
    tally
}

/// Sends `<request> HTTP/1.1` and reads its whole response; returns the status and every
/// byte of the response as it came off the socket. The client never pipelines, so nothing
/// follows the response until the next request.
async fn exchange(s: &mut BufReader<TcpStream>, request: &str, host: &str) -> (u16, u64) {
    let head = format!("{request} HTTP/1.1\r\nHost: {host}\r\n\r\n");
    s.get_mut().write_all(head.as_bytes()).await.unwrap();
    let read = tokio::time::timeout(Duration::from_secs(20), read_response(s));
    let (status, bytes) = read.await.unwrap_or_else(|_| panic!("no answer to {request}"));
    assert!(s.buffer().is_empty(), "bytes after the response to {request}");
    (status, bytes)
}

async fn read_response<R: AsyncBufRead + Unpin>(s: &mut R) -> (u16, u64) {
    let mut line = String::new();
    let mut bytes = s.read_line(&mut line).await.unwrap() as u64;
    let status: u16 = line
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{line:?}"));
    let (mut length, mut chunked) = (0u64, false);
    loop {
        line.clear();
        bytes += s.read_line(&mut line).await.unwrap() as u64;
        let field = line.trim_end().to_ascii_lowercase();
        if field.is_empty() {
            break;
        }
        if let Some(v) = field.strip_prefix("content-length:") {
            length = v.trim().parse().unwrap();
        }
        chunked |= field == "transfer-encoding: chunked";
    }
    if !chunked {
        return (status, bytes + skip(s, length).await);
    }
    loop {
        line.clear();
        bytes += s.read_line(&mut line).await.unwrap() as u64;
        let size = line.trim_end().split(';').next().unwrap_or_default();
        let size = u64::from_str_radix(size, 16).unwrap_or_else(|_| panic!("chunk size {line:?}"));
        if size == 0 {
            // The trailer section, up to its empty line.
            loop {
                line.clear();
                bytes += s.read_line(&mut line).await.unwrap() as u64;
                if line == "\r\n" {
                    return (status, bytes);
                }
            }
        }
        bytes += skip(s, size + 2).await;
    }
}

/// Reads and counts `n` bytes.
async fn skip<R: AsyncBufRead + Unpin>(s: &mut R, n: u64) -> u64 {
    let got = tokio::io::copy(&mut s.take(n), &mut tokio::io::sink()).await.unwrap();
    assert_eq!(got, n, "the body ended early");
    got
}
