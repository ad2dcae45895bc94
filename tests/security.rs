//! Hostile input against the real binary, over raw TCP (issue 5): framing and smuggling,
//! access control, destination rules, limits and timeouts. Every case asserts the status line
//! and whether the proxy closes the connection afterwards; every group ends by checking that
//! the proxy still serves a normal request and has not grown its fd count.
//!
//! Run with `--nocapture` to see one PASS/FAIL line per case.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{BATON, Baton, fd_count, testkit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long any single read waits for the proxy before the case counts as failed.
const READ_WAIT: Duration = Duration::from_secs(5);
/// How long a connection expected to close may stay open after the response.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1.1 client

struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

enum Fill {
    Data,
    Eof,
    Timeout,
    Error(String),
}

impl Conn {
    async fn open(addr: SocketAddr) -> Conn {
        let s = tokio::time::timeout(READ_WAIT, TcpStream::connect(addr))
            .await
            .expect("connect to the proxy timed out")
            .expect("connect to the proxy");
        let _ = s.set_nodelay(true);
        Conn { s, buf: Vec::new() }
    }

    /// Writes `data`; a proxy that already closed may make this fail, which is not an error
    /// of the case by itself (the answer is judged by what can be read).
    async fn send(&mut self, data: &[u8]) -> Result<(), String> {
        match tokio::time::timeout(READ_WAIT, self.s.write_all(data)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err("write timed out".into()),
        }
    }

    async fn fill(&mut self, deadline: Instant) -> Fill {
        let mut chunk = [0u8; 16 * 1024];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, self.s.read(&mut chunk)).await {
            Ok(Ok(0)) => Fill::Eof,
            Ok(Ok(n)) => {
                self.buf.extend_from_slice(&chunk[..n]);
                Fill::Data
            }
            Ok(Err(e)) => Fill::Error(e.to_string()),
            Err(_) => Fill::Timeout,
        }
    }

    /// Reads until `n` bytes are buffered.
    async fn need(&mut self, n: usize, deadline: Instant) -> Result<(), String> {
        while self.buf.len() < n {
            match self.fill(deadline).await {
                Fill::Data => {}
                Fill::Eof => return Err("connection closed in the middle of the response body".into()),
                Fill::Timeout => return Err("timed out in the middle of the response body".into()),
                Fill::Error(e) => return Err(format!("read: {e}")),
            }
        }
        Ok(())
    }

    async fn line(&mut self, deadline: Instant) -> Result<String, String> {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line: Vec<u8> = self.buf.drain(..i + 2).collect();
                return Ok(String::from_utf8_lossy(&line[..i]).into_owned());
            }
            self.need(self.buf.len() + 1, deadline).await?;
        }
    }

    /// Reads one response (skipping 1xx). `Err` describes a close/timeout before or during it.
    async fn response(&mut self, head_only: bool) -> Result<Resp, String> {
        let deadline = Instant::now() + READ_WAIT;
        loop {
            let mut resp = self.head(deadline).await?;
            let code = resp.code();
            if (100..200).contains(&code) {
                continue;
            }
            if head_only || code == 204 || code == 304 {
                return Ok(resp);
            }
            if resp
                .header("transfer-encoding")
                .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
            {
                resp.body = self.chunked_body(deadline).await?;
            } else if let Some(len) = resp.header("content-length") {
                let len: usize = len.parse().map_err(|_| format!("bad content-length {len:?}"))?;
                self.need(len, deadline).await?;
                resp.body = self.buf.drain(..len).collect();
            } else {
                resp.body = self.body_to_close(deadline).await?;
                resp.eof = true;
            }
            return Ok(resp);
        }
    }

    /// Reads a response head: the status line and the header fields, without a body yet.
    async fn head(&mut self, deadline: Instant) -> Result<Resp, String> {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.buf.len() > 64 * 1024 {
                return Err("response head over 64 KiB".into());
            }
            match self.fill(deadline).await {
                Fill::Data => {}
                Fill::Eof if self.buf.is_empty() => return Err(CLOSED_NO_RESPONSE.into()),
                Fill::Eof => {
                    return Err(format!(
                        "closed in the middle of a response head: {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ));
                }
                Fill::Timeout => return Err(format!("no response within {READ_WAIT:?}")),
                Fill::Error(e) if self.buf.is_empty() => return Err(format!("{CLOSED_NO_RESPONSE} ({e})")),
                Fill::Error(e) => return Err(format!("read: {e}")),
            }
        };
        let head: Vec<u8> = self.buf.drain(..end).collect();
        let head = String::from_utf8_lossy(&head).into_owned();
        let mut lines = head.split("\r\n");
        let status = lines.next().unwrap_or("").to_string();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        Ok(Resp {
            status,
            headers,
            body: Vec::new(),
            eof: false,
        })
    }

    /// Reads a chunked body to its last chunk and trailers; returns the data.
    async fn chunked_body(&mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        let mut body = Vec::new();
        loop {
            let size_line = self.line(deadline).await?;
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| format!("bad chunk size from the proxy: {size_line:?}"))?;
            if size == 0 {
                while !self.line(deadline).await?.is_empty() {}
                return Ok(body);
            }
            self.need(size + 2, deadline).await?;
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
        }
    }

    /// Reads a body delimited by the close of the connection.
    async fn body_to_close(&mut self, deadline: Instant) -> Result<Vec<u8>, String> {
        loop {
            match self.fill(deadline).await {
                Fill::Data => {}
                Fill::Eof | Fill::Error(_) => return Ok(std::mem::take(&mut self.buf)),
                Fill::Timeout => return Err("close-delimited body did not end".into()),
            }
        }
    }

    /// After a response: does the proxy close the connection within `CLOSE_WAIT`?
    async fn closes(&mut self) -> State {
        if !self.buf.is_empty() {
            return State::Other(format!(
                "unexpected bytes after the response: {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        match self.fill(Instant::now() + CLOSE_WAIT).await {
            Fill::Eof | Fill::Error(_) => State::Closed,
            Fill::Data => State::Other(format!(
                "unexpected bytes after the response: {:?}",
                String::from_utf8_lossy(&self.buf)
            )),
            Fill::Timeout => State::Open,
        }
    }

    /// After a response: is the connection still usable (a second request is answered 200)?
    async fn usable(&mut self, followup: &[u8]) -> State {
        if !self.buf.is_empty() {
            return State::Other(format!(
                "unexpected bytes after the response: {:?}",
                String::from_utf8_lossy(&self.buf)
            ));
        }
        let _ = self.send(followup).await;
        match self.response(false).await {
            Ok(r) if r.code() == 200 => State::Open,
            Ok(r) => State::Other(format!("follow-up request answered {:?}", r.status)),
            Err(e) if e.starts_with(CLOSED_NO_RESPONSE) => State::Closed,
            Err(e) => State::Other(format!("follow-up request: {e}")),
        }
    }
}

const CLOSED_NO_RESPONSE: &str = "closed without a response";

#[derive(Debug)]
struct Resp {
    status: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// The body was delimited by the close of the connection.
    eof: bool,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn code(&self) -> u16 {
        self.status.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

#[derive(Debug, PartialEq)]
enum State {
    Closed,
    Open,
    Other(String),
}

/// What the status line must be.
#[derive(Clone, Copy)]
enum Expect {
    /// `HTTP/1.1 <one of these>`.
    Status(&'static [u16]),
}

/// What must happen to the connection after the response.
#[derive(Clone, Copy, PartialEq)]
enum After {
    /// The proxy closes it within `CLOSE_WAIT`.
    Closes,
    /// A second (valid) request on it is answered 200.
    KeepsOpen,
}

// ---------------------------------------------------------------------------------------------
// The suite: one per proxy configuration

type Check = fn(&Resp) -> Result<(), String>;

fn no_check(_: &Resp) -> Result<(), String> {
    Ok(())
}

struct Suite {
    group: &'static str,
    proxy: SocketAddr,
    /// A valid request whose answer is 200, used to test that a connection is still usable.
    followup: Vec<u8>,
    passed: Vec<String>,
    failed: Vec<String>,
}

impl Suite {
    fn new(group: &'static str, proxy: SocketAddr, followup: String) -> Suite {
        Suite {
            group,
            proxy,
            followup: followup.into_bytes(),
            passed: Vec::new(),
            failed: Vec::new(),
        }
    }

    fn record(&mut self, name: &str, result: Result<(), String>) {
        match result {
            Ok(()) => {
                eprintln!("[{}] PASS {name}", self.group);
                self.passed.push(name.to_string());
            }
            Err(e) => {
                eprintln!("[{}] FAIL {name}: {e}", self.group);
                self.failed.push(format!("{name}: {e}"));
            }
        }
    }

    /// Sends `request` on a new connection, reads the answer, judges status and connection.
    async fn case(&mut self, name: &str, request: &[u8], expect: Expect, after: After, check: Check) {
        let result = self.run(request, expect, after, check).await;
        self.record(name, result);
    }

    async fn run(&self, request: &[u8], expect: Expect, after: After, check: Check) -> Result<(), String> {
        let mut c = Conn::open(self.proxy).await;
        let _ = c.send(request).await;
        judge(&mut c, expect, after, check, &self.followup).await
    }

    /// Panics with every failed case, after the proxy was checked to be healthy.
    fn finish(self) {
        eprintln!(
            "[{}] {} passed, {} failed",
            self.group,
            self.passed.len(),
            self.failed.len()
        );
        assert!(
            self.failed.is_empty(),
            "[{}] {} case(s) failed:\n{}",
            self.group,
            self.failed.len(),
            self.failed.join("\n")
        );
    }
}

async fn judge(c: &mut Conn, expect: Expect, after: After, check: Check, followup: &[u8]) -> Result<(), String> {
    let resp = c.response(false).await;
    let state = match &resp {
        Ok(r) if r.eof => State::Closed,
        Ok(_) => match after {
            After::Closes => c.closes().await,
            After::KeepsOpen => c.usable(followup).await,
        },
        Err(e) if e.starts_with(CLOSED_NO_RESPONSE) => State::Closed,
        Err(e) => State::Other(e.clone()),
    };
    let shown = match &resp {
        Ok(r) => format!("{:?} (body {:?})", r.status, truncate(&r.text(), 200)),
        Err(e) => e.clone(),
    };
    match (expect, &resp) {
        (Expect::Status(codes), Ok(r)) if r.status.starts_with("HTTP/1.1 ") && codes.contains(&r.code()) => {}
        (Expect::Status(codes), _) => return Err(format!("expected status {codes:?}, got {shown}")),
    }
    if let Ok(r) = &resp {
        check(r).map_err(|e| format!("{e}; response {shown}"))?;
    }
    match (after, state) {
        (After::Closes, State::Closed) | (After::KeepsOpen, State::Open) => Ok(()),
        (After::Closes, State::Open) => Err(format!(
            "{shown}, but the connection was still open {CLOSE_WAIT:?} later"
        )),
        (After::KeepsOpen, State::Closed) => Err(format!(
            "{shown}, but the proxy closed the connection (expected keep-alive)"
        )),
        (_, State::Other(e)) => Err(format!("{shown}; then {e}")),
    }
}

fn truncate(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

fn get(url: &str) -> String {
    let host = url.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap_or("");
    format!("GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n")
}

// ---------------------------------------------------------------------------------------------
// Health at the end of a group

/// The proxy answers `request` with 200, and within a short settling time its fd count is
/// back to `baseline` (taken after a warm-up request, so pooled upstream connections count).
async fn assert_healthy(suite: &mut Suite, pid: u32, baseline: usize, request: Option<&str>) {
    if let Some(req) = request {
        let mut c = Conn::open(suite.proxy).await;
        let _ = c.send(req.as_bytes()).await;
        let result = match c.response(false).await {
            Ok(r) if r.code() == 200 => Ok(()),
            Ok(r) => Err(format!("normal request answered {:?}", r.status)),
            Err(e) => Err(format!("normal request: {e}")),
        };
        suite.record("health: still serves a normal request", result);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = fd_count(pid);
    while now > baseline && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        now = fd_count(pid);
    }
    let result = if now <= baseline {
        Ok(())
    } else {
        Err(format!("fd count grew from {baseline} to {now}"))
    };
    suite.record("health: fd count not grown", result);
}

/// Warm-up request (to create pooled upstream connections), then the fd baseline.
async fn baseline(proxy: SocketAddr, pid: u32, request: Option<&str>) -> usize {
    if let Some(req) = request {
        let mut c = Conn::open(proxy).await;
        c.send(req.as_bytes()).await.unwrap();
        let r = c.response(false).await.expect("warm-up request");
        assert_eq!(r.code(), 200, "warm-up request: {r:?}");
    }
    settled_fd_count(pid).await
}

/// The fd count once the warm-up's sockets have settled: the same in two reads 50 ms apart
/// (bounded: 5 s), rather than whatever a fixed pause leaves on a slow machine.
async fn settled_fd_count(pid: u32) -> usize {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut last = fd_count(pid);
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = fd_count(pid);
        if now == last {
            return now;
        }
        assert!(
            Instant::now() < deadline,
            "the fd count did not settle in 5 s ({last}, then {now})"
        );
        last = now;
    }
}

/// A minimal origin on `ip` (e.g. 127.0.0.2) answering every request `200 ok` and closing.
async fn start_plain_origin(ip: &str) -> SocketAddr {
    let listener = TcpListener::bind((ip, 0)).await.expect("bind plain origin");
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut b = [0u8; 4096];
                let deadline = Instant::now() + READ_WAIT;
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(left, s.read(&mut b)).await {
                        Ok(Ok(n)) if n > 0 => head.extend_from_slice(&b[..n]),
                        _ => return,
                    }
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                    .await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// `extra` with pooled idle origin connections released after 1 s: they are not leaks, but
/// the fd check at the end of each group compares against a baseline taken after one request,
/// and a second client connection may have added a second pooled origin connection.
fn short_pool(extra: &str) -> String {
    const IDLE: &str = "upstream_idle = \"1s\"\n";
    if extra.contains("[timeouts]\n") {
        extra.replacen("[timeouts]\n", &format!("[timeouts]\n{IDLE}"), 1)
    } else {
        format!("{extra}\n[timeouts]\n{IDLE}")
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ---------------------------------------------------------------------------------------------
// Framing and smuggling (RFC 9112), Max-Forwards, request-target forms

fn body_is_hello_sha(r: &Resp) -> Result<(), String> {
    let want = format!("{} 5", testkit::sha256_hex(b"hello"));
    if r.text() == want {
        Ok(())
    } else {
        Err(format!(
            "origin did not receive exactly the chunked body \"hello\" (want {want:?})"
        ))
    }
}

fn max_forwards_2(r: &Resp) -> Result<(), String> {
    if r.text().to_ascii_lowercase().contains("max-forwards: 2") {
        Ok(())
    } else {
        Err("origin did not see Max-Forwards: 2".into())
    }
}

fn max_forwards_0(r: &Resp) -> Result<(), String> {
    if r.text().to_ascii_lowercase().contains("max-forwards: 0") {
        Ok(())
    } else {
        Err("origin did not see Max-Forwards: 0".into())
    }
}

fn trace_echo(r: &Resp) -> Result<(), String> {
    let ct = r.header("content-type").unwrap_or("");
    if !ct.to_ascii_lowercase().starts_with("message/http") {
        return Err(format!("content-type {ct:?}, want message/http"));
    }
    let body = r.text();
    let lower = body.to_ascii_lowercase();
    if !body.starts_with("TRACE ") || !lower.contains("x-trace-me: 1") {
        return Err("body does not echo the request".into());
    }
    if lower.contains("proxy-authorization") || lower.contains("cookie") || lower.contains("hunter2") {
        return Err("echo contains Proxy-Authorization or Cookie".into());
    }
    Ok(())
}

fn host_from_uri(r: &Resp) -> Result<(), String> {
    let seen = r.text().to_ascii_lowercase();
    if seen.contains("evil.example") {
        return Err("the client's mismatched Host reached the origin".into());
    }
    if !seen.contains("host: 127.0.0.1:") {
        return Err("origin did not see Host from the URI".into());
    }
    Ok(())
}

/// The origin saw exactly one Host field, the URI's.
fn one_host_from_uri(r: &Resp) -> Result<(), String> {
    host_from_uri(r)?;
    let hosts = r.text().to_ascii_lowercase().matches("host: ").count();
    if hosts != 1 {
        return Err(format!("origin saw {hosts} Host fields"));
    }
    Ok(())
}

fn says_invalid_port(r: &Resp) -> Result<(), String> {
    if r.text().contains("invalid port") {
        Ok(())
    } else {
        Err("the reason does not name the port".into())
    }
}

fn five_bytes(r: &Resp) -> Result<(), String> {
    if r.body.len() == 5 {
        Ok(())
    } else {
        Err(format!("body of {} bytes, want 5", r.body.len()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn framing_and_smuggling() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start(&short_pool("")).await;
    let normal = get(&format!("http://{origin}/bytes?n=3"));
    let base = baseline(baton.proxy, baton.pid(), Some(&normal)).await;
    let mut s = Suite::new("framing", baton.proxy, normal.clone());
    let o = origin;
    let closed = free_port();

    cl_and_te(&mut s, o).await;
    invalid_content_lengths(&mut s, o).await;
    invalid_transfer_codings(&mut s, o).await;
    invalid_chunked_bodies(&mut s, o).await;
    header_syntax(&mut s, o).await;
    request_targets_and_hosts(&mut s, o).await;
    max_forwards(&mut s, o, closed).await;
    connect_targets(&mut s, baton.proxy, closed).await;

    assert_healthy(&mut s, baton.pid(), base, Some(&normal)).await;
    s.finish();
}

/// Content-Length together with Transfer-Encoding: 400, then close (RFC 9112 §6.1 allows
/// the rejection; nginx and Squid do the same), whichever comes first, and nothing behind it
/// is served.
async fn cl_and_te(s: &mut Suite, o: SocketAddr) {
    use After::Closes;
    use Expect::Status;

    s.case(
        "CL+TE: Content-Length then Transfer-Encoding, 400 then close",
        format!(
            "POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
        Status(&[400]),
        Closes,
        no_check,
    )
    .await;
    s.case(
        "CL+TE: Transfer-Encoding then a larger Content-Length, smuggled request not served",
        format!(
            "POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\nContent-Length: 50\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET http://{o}/bytes?n=7 HTTP/1.1\r\nHost: {o}\r\n\r\n"
        )
        .as_bytes(),
        Status(&[400]),
        Closes,
        no_check,
    )
    .await;
    s.case(
        "TE chunked alone: served, Connection: close",
        format!(
            "POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        )
        .as_bytes(),
        Status(&[200]),
        Closes,
        body_is_hello_sha,
    )
    .await;
}

/// Duplicate and invalid Content-Length values: 400, then close.
async fn invalid_content_lengths(s: &mut Suite, o: SocketAddr) {
    use After::Closes;
    use Expect::Status;

    // Content-Length: duplicates and invalid values.
    let post_cl = |cl: &str| format!("POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\n{cl}\r\n\r\nhello!");
    for (name, cl) in [
        (
            "duplicate Content-Length 5 and 6",
            "Content-Length: 5\r\nContent-Length: 6",
        ),
        ("Content-Length: abc", "Content-Length: abc"),
        ("Content-Length: -1", "Content-Length: -1"),
        ("Content-Length: 1,2", "Content-Length: 1,2"),
        ("Content-Length: +5", "Content-Length: +5"),
        (
            "Content-Length: 99999999999999999999999 (overflow)",
            "Content-Length: 99999999999999999999999",
        ),
        ("Content-Length with space before colon", "Content-Length : 5"),
    ] {
        s.case(name, post_cl(cl).as_bytes(), Status(&[400]), Closes, no_check)
            .await;
    }
}

/// Transfer codings other than a final chunked: 400, then close.
async fn invalid_transfer_codings(s: &mut Suite, o: SocketAddr) {
    use After::Closes;
    use Expect::Status;

    // Transfer codings other than a final chunked.
    let post_te =
        |te: &str| format!("POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\n{te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
    for (name, te) in [
        ("Transfer-Encoding: gzip", "Transfer-Encoding: gzip"),
        ("Transfer-Encoding: chunked, gzip", "Transfer-Encoding: chunked, gzip"),
        (
            "Transfer-Encoding in two fields: chunked then gzip",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip",
        ),
        ("Transfer-Encoding: xchunked", "Transfer-Encoding: xchunked"),
    ] {
        s.case(name, post_te(te).as_bytes(), Status(&[400]), Closes, no_check)
            .await;
    }
}

/// Invalid chunked bodies: 400, then close.
async fn invalid_chunked_bodies(s: &mut Suite, o: SocketAddr) {
    use After::Closes;
    use Expect::Status;

    let post_body = |body: &str| {
        format!("POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n{body}")
    };
    for (name, body) in [
        ("chunk size zz", "zz\r\nhello\r\n0\r\n\r\n"),
        ("chunk size overflow", "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("chunk data without CRLF", "5\r\nhelloXX0\r\n\r\n"),
        ("negative chunk size", "-5\r\nhello\r\n0\r\n\r\n"),
    ] {
        s.case(name, post_body(body).as_bytes(), Status(&[400]), Closes, no_check)
            .await;
    }
}

/// Header and request-line syntax: obs-fold, control bytes, spaces (400, close); bare LF
/// line endings are accepted.
async fn header_syntax(s: &mut Suite, o: SocketAddr) {
    use After::{Closes, KeepsOpen};
    use Expect::Status;

    // Header syntax.
    let get_with = |line: &str| format!("GET http://{o}/bytes?n=5 HTTP/1.1\r\nHost: {o}\r\n{line}\r\n\r\n");
    for (name, line) in [
        ("obs-fold (space continuation)", "X-Folded: a\r\n b"),
        ("obs-fold (tab continuation)", "X-Folded: a\r\n\tb"),
        ("NUL in a header value", "X-Nul: a\0b"),
        ("control byte 0x01 in a header value", "X-Ctl: a\x01b"),
        ("DEL 0x7f in a header value", "X-Del: a\x7fb"),
        ("lone CR in a header value", "X-Cr: a\rb"),
        ("space in a header name", "X Bad: 1"),
    ] {
        s.case(name, get_with(line).as_bytes(), Status(&[400]), Closes, no_check)
            .await;
    }
    s.case(
        "space inside the request target",
        format!("GET http://{o}/a b HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes(),
        Status(&[400]),
        Closes,
        no_check,
    )
    .await;
    s.case(
        "bare LF line endings accepted",
        format!("GET http://{o}/bytes?n=5 HTTP/1.1\nHost: {o}\nX-A: 1\n\n").as_bytes(),
        Status(&[200]),
        KeepsOpen,
        five_bytes,
    )
    .await;
}

/// The request target decides the origin and its Host; origin-form and a port out of range
/// are refused (400) without closing.
async fn request_targets_and_hosts(s: &mut Suite, o: SocketAddr) {
    use After::KeepsOpen;
    use Expect::Status;

    s.case(
        "absolute-form with a mismatched Host: origin sees Host from the URI",
        format!("GET http://{o}/headers HTTP/1.1\r\nHost: evil.example\r\n\r\n").as_bytes(),
        Status(&[200]),
        KeepsOpen,
        host_from_uri,
    )
    .await;
    s.case(
        "Host equal to the URI's authority: origin sees it once",
        format!("GET http://{o}/headers HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes(),
        Status(&[200]),
        KeepsOpen,
        one_host_from_uri,
    )
    .await;
    s.case(
        "origin-form request",
        b"GET /index.html HTTP/1.1\r\nHost: example\r\n\r\n",
        Status(&[400]),
        KeepsOpen,
        no_check,
    )
    .await;
    s.case(
        "port out of range in the target: 400, not a request to port 80",
        b"GET http://127.0.0.1:99999/ HTTP/1.1\r\nHost: 127.0.0.1:99999\r\n\r\n",
        Status(&[400]),
        KeepsOpen,
        says_invalid_port,
    )
    .await;
}

/// Max-Forwards (RFC 9110 §7.6.2): at 0 the proxy answers OPTIONS and TRACE itself, above
/// it forwards the value less one.
async fn max_forwards(s: &mut Suite, o: SocketAddr, closed: u16) {
    use After::KeepsOpen;
    use Expect::Status;

    // Max-Forwards (RFC 9110 §7.6.2); `closed` has no listener, so a forwarded request would be 502.
    s.case(
        "OPTIONS Max-Forwards: 0 answered by the proxy",
        format!("OPTIONS http://127.0.0.1:{closed}/ HTTP/1.1\r\nHost: 127.0.0.1:{closed}\r\nMax-Forwards: 0\r\n\r\n")
            .as_bytes(),
        Status(&[200]),
        KeepsOpen,
        no_check,
    )
    .await;
    s.case(
        "TRACE Max-Forwards: 0 echoed by the proxy without credentials/cookies",
        format!(
            "TRACE http://127.0.0.1:{closed}/ HTTP/1.1\r\nHost: 127.0.0.1:{closed}\r\nMax-Forwards: 0\r\nX-Trace-Me: 1\r\nProxy-Authorization: Basic dXNlcjpodW50ZXIy\r\nCookie: session=hunter2\r\n\r\n"
        )
        .as_bytes(),
        Status(&[200]),
        KeepsOpen,
        trace_echo,
    )
    .await;
    s.case(
        "OPTIONS Max-Forwards: 3 forwarded as 2",
        format!("OPTIONS http://{o}/headers HTTP/1.1\r\nHost: {o}\r\nMax-Forwards: 3\r\n\r\n").as_bytes(),
        Status(&[200]),
        KeepsOpen,
        max_forwards_2,
    )
    .await;
    s.case(
        "TRACE Max-Forwards: 1 forwarded as 0",
        format!("TRACE http://{o}/headers HTTP/1.1\r\nHost: {o}\r\nMax-Forwards: 1\r\n\r\n").as_bytes(),
        Status(&[200]),
        KeepsOpen,
        max_forwards_0,
    )
    .await;
}

/// CONNECT targets without a port or to a port not allowed, and a GET to the proxy itself.
async fn connect_targets(s: &mut Suite, proxy: SocketAddr, closed: u16) {
    use After::KeepsOpen;
    use Expect::Status;

    // CONNECT request-target.
    s.case(
        "CONNECT without a port",
        b"CONNECT example.com HTTP/1.1\r\nHost: example.com\r\n\r\n",
        Status(&[400]),
        KeepsOpen,
        no_check,
    )
    .await;
    s.case(
        "CONNECT to a port not in connect_ports (default 443 only)",
        format!("CONNECT 127.0.0.1:{closed} HTTP/1.1\r\nHost: 127.0.0.1:{closed}\r\n\r\n").as_bytes(),
        Status(&[403]),
        KeepsOpen,
        no_check,
    )
    .await;
    s.case(
        "CONNECT to port 22",
        b"CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n\r\n",
        Status(&[403]),
        KeepsOpen,
        no_check,
    )
    .await;
    s.case(
        "GET to the proxy itself (loop)",
        get(&format!("http://{}/", proxy)).as_bytes(),
        Status(&[403]),
        KeepsOpen,
        no_check,
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// RFC 9112's MUSTs and the strict choices (issue 14): Host, Transfer-Encoding, field values,
// chunked framing, the header limit. Every refusal closes the connection.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rfc9112_rules() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let extra = format!("[access]\nconnect_ports = [443, {}]\n", echo.port());
    let baton = Baton::start(&short_pool(&extra)).await;
    let normal = get(&format!("http://{origin}/bytes?n=3"));
    let base = baseline(baton.proxy, baton.pid(), Some(&normal)).await;
    let mut s = Suite::new("rfc9112", baton.proxy, normal.clone());

    host_rules(&mut s, origin, echo).await;
    transfer_coding_rules(&mut s, origin).await;
    field_value_rules(&mut s, origin).await;
    chunk_line_rules(&mut s, origin).await;
    chunk_framing_accepted(&mut s, origin).await;
    header_limit_boundary(&mut s, origin, 65536).await;

    assert_healthy(&mut s, baton.pid(), base, Some(&normal)).await;
    s.finish();
}

/// RFC 9112 §3.2: a missing, repeated or malformed Host gets 400 (validity checks only: the
/// target still decides the origin).
async fn host_rules(s: &mut Suite, o: SocketAddr, echo: SocketAddr) {
    use After::Closes;
    use Expect::Status;

    let get_with = |fields: &str| format!("GET http://{o}/bytes?n=5 HTTP/1.1\r\n{fields}\r\n");
    for (name, fields) in [
        ("Host: HTTP/1.1 absolute-form request without Host", String::new()),
        ("Host: two equal Host lines", format!("Host: {o}\r\nHost: {o}\r\n")),
        (
            "Host: two different Host lines",
            format!("Host: {o}\r\nHost: evil.example\r\n"),
        ),
        ("Host: a comma list", format!("Host: {o}, {o}\r\n")),
        ("Host: userinfo", format!("Host: user@{o}\r\n")),
        ("Host: a path", format!("Host: {o}/x\r\n")),
        ("Host: an empty value", "Host:\r\n".to_string()),
    ] {
        s.case(name, get_with(&fields).as_bytes(), Status(&[400]), Closes, no_check)
            .await;
    }
    for (name, fields) in [
        ("Host: CONNECT without Host", String::new()),
        (
            "Host: CONNECT with two Host lines",
            format!("Host: {echo}\r\nHost: {echo}\r\n"),
        ),
    ] {
        let req = format!("CONNECT {echo} HTTP/1.1\r\n{fields}\r\n");
        s.case(name, req.as_bytes(), Status(&[400]), Closes, no_check).await;
    }
    // HTTP/1.0 needs no Host (hyper answers it in HTTP/1.0, then closes).
    let mut c = Conn::open(s.proxy).await;
    let _ = c
        .send(format!("GET http://{o}/bytes?n=5 HTTP/1.0\r\n\r\n").as_bytes())
        .await;
    let r = match c.response(false).await {
        Ok(r) if r.code() == 200 && r.body.len() == 5 => Ok(()),
        Ok(r) => Err(format!("got {:?} with {} bytes", r.status, r.body.len())),
        Err(e) => Err(e),
    };
    s.record("Host: HTTP/1.0 without Host is served", r);
}

/// RFC 9112 §6.1/§7: exactly one final chunked; another coding is 501, chunked twice 400.
async fn transfer_coding_rules(s: &mut Suite, o: SocketAddr) {
    use After::Closes;
    use Expect::Status;

    let post_te = |te: &str, version: &str| {
        format!("POST http://{o}/sha256 HTTP/{version}\r\nHost: {o}\r\n{te}\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    };
    let cases: [(&str, &str, &'static [u16]); 5] = [
        (
            "TE: identity, chunked is not implemented",
            "Transfer-Encoding: identity, chunked",
            &[501],
        ),
        (
            "TE: gzip, chunked is not implemented",
            "Transfer-Encoding: gzip, chunked",
            &[501],
        ),
        (
            "TE: chunked twice in one line",
            "Transfer-Encoding: chunked, chunked",
            &[400],
        ),
        (
            "TE: two lines both naming chunked",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked",
            &[400],
        ),
        ("TE: chunked with a parameter", "Transfer-Encoding: chunked;q=1", &[400]),
    ];
    for (name, te, status) in cases {
        s.case(name, post_te(te, "1.1").as_bytes(), Status(status), Closes, no_check)
            .await;
    }
    s.case(
        "TE: in an HTTP/1.0 request",
        post_te("Transfer-Encoding: chunked", "1.0").as_bytes(),
        Status(&[400]),
        Closes,
        no_check,
    )
    .await;
}

/// Field values without control bytes but HTAB (RFC 9110 §5.5, the strict choice); a target
/// of visible ASCII; a method of at most 32 bytes (501 beyond).
async fn field_value_rules(s: &mut Suite, o: SocketAddr) {
    use After::Closes;
    use Expect::Status;

    let get_with = |line: &str| format!("GET http://{o}/bytes?n=5 HTTP/1.1\r\nHost: {o}\r\n{line}\r\n\r\n");
    for (name, line) in [
        ("field value: VT (0x0b)", "X-Ctl: a\x0bb"),
        ("field value: FF (0x0c)", "X-Ctl: a\x0cb"),
        ("field value: ESC (0x1b)", "X-Ctl: a\x1bb"),
    ] {
        s.case(name, get_with(line).as_bytes(), Status(&[400]), Closes, no_check)
            .await;
    }
    let mut non_ascii = format!("GET http://{o}/caf").into_bytes();
    non_ascii.extend_from_slice(b"\xc3\xa9 HTTP/1.1\r\nHost: ");
    non_ascii.extend_from_slice(format!("{o}\r\n\r\n").as_bytes());
    s.case(
        "request target: a non-ASCII byte",
        &non_ascii,
        Status(&[400]),
        Closes,
        no_check,
    )
    .await;
    let method = "X".repeat(33);
    s.case(
        "method: longer than 32 bytes is not implemented",
        format!("{method} http://{o}/bytes?n=5 HTTP/1.1\r\nHost: {o}\r\n\r\n").as_bytes(),
        Status(&[501]),
        Closes,
        no_check,
    )
    .await;
}

fn post_chunked(o: SocketAddr, body: &str) -> String {
    format!("POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n{body}")
}

/// RFC 9112 §7.1: chunk-size lines, the CRLF after chunk data, and trailer fields (by the
/// header rules); hyper's own decoder is lenient about most of these.
async fn chunk_line_rules(s: &mut Suite, o: SocketAddr) {
    use After::Closes;
    use Expect::Status;

    for (name, body) in [
        ("chunk: bare CR after the size", "5\rhello\r\n0\r\n\r\n"),
        ("chunk: bare ; before CRLF", "5;\r\nhello\r\n0\r\n\r\n"),
        ("chunk: whitespace before CRLF", "5 \r\nhello\r\n0\r\n\r\n"),
        ("chunk: whitespace after an extension", "5;a=b \r\nhello\r\n0\r\n\r\n"),
        ("chunk: control byte in an extension", "5;a\x01b\r\nhello\r\n0\r\n\r\n"),
        ("chunk: extension without a name", "5;=b\r\nhello\r\n0\r\n\r\n"),
        ("chunk: unterminated quoted extension", "5;a=\"b\r\nhello\r\n0\r\n\r\n"),
        ("chunk: empty size", "\r\nhello\r\n0\r\n\r\n"),
        ("chunk: bare CR after the data", "5\r\nhello\rX0\r\n\r\n"),
        (
            "trailer: control byte in a field value",
            "5\r\nhello\r\n0\r\nX-T: a\x0bb\r\n\r\n",
        ),
        ("trailer: obs-fold", "5\r\nhello\r\n0\r\nX-T: a\r\n b\r\n\r\n"),
        ("trailer: space before the colon", "5\r\nhello\r\n0\r\nX-T : a\r\n\r\n"),
    ] {
        s.case(name, post_chunked(o, body).as_bytes(), Status(&[400]), Closes, no_check)
            .await;
    }
}

/// What the strict chunk rules still accept: bare LF line ends (RFC 9112 §2.2), extensions by
/// the grammar, trailer fields. The origin gets the body re-serialised.
async fn chunk_framing_accepted(s: &mut Suite, o: SocketAddr) {
    use After::Closes;
    use Expect::Status;

    for (name, body) in [
        ("chunk: bare LF line ends accepted", "5\nhello\n0\n\n"),
        (
            "chunk: extensions by the grammar accepted",
            "2 ; a = b ; c=\"d \\\" e\"\r\nhe\r\n3;x\r\nllo\r\n0\r\n\r\n",
        ),
        ("chunk: trailer fields accepted", "5\r\nhello\r\n0\r\nX-T: 1\r\n\r\n"),
    ] {
        s.case(
            name,
            post_chunked(o, body).as_bytes(),
            Status(&[200]),
            Closes,
            body_is_hello_sha,
        )
        .await;
    }
}

/// A request head of `n` bytes exactly, start line and final empty line included.
fn head_of(o: SocketAddr, n: usize) -> String {
    let head = |pad: &str| format!("GET http://{o}/bytes?n=5 HTTP/1.1\r\nHost: {o}\r\nX-Pad: {pad}\r\n\r\n");
    let pad = "p".repeat(n - head("").len());
    head(&pad)
}

/// `max_header_bytes` is exact and counts the start line: a head of that size is served, one
/// byte more is 431.
async fn header_limit_boundary(s: &mut Suite, o: SocketAddr, max: usize) {
    use After::{Closes, KeepsOpen};
    use Expect::Status;

    let at = head_of(o, max);
    s.case(
        &format!("header limit: a head of exactly {max} bytes is served"),
        at.as_bytes(),
        Status(&[200]),
        KeepsOpen,
        five_bytes,
    )
    .await;
    for over in [1, 10, 4000] {
        s.case(
            &format!("header limit: a head of {max} + {over} bytes gets 431"),
            head_of(o, max + over).as_bytes(),
            Status(&[431]),
            Closes,
            no_check,
        )
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Proxy authentication

/// Base64 (standard alphabet, padded), enough for Basic credentials.
fn b64(input: &str) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in input.as_bytes().chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn basic(user: &str, pass: &str) -> String {
    b64(&format!("{user}:{pass}"))
}

fn challenges(r: &Resp) -> Result<(), String> {
    match r.header("proxy-authenticate") {
        Some("Basic realm=\"baton\"") => Ok(()),
        other => Err(format!("Proxy-Authenticate: {other:?}, want Basic realm=\"baton\"")),
    }
}

fn no_proxy_authorization(r: &Resp) -> Result<(), String> {
    let seen = r.text().to_ascii_lowercase();
    if seen.contains("proxy-authorization") {
        Err("Proxy-Authorization reached the origin".into())
    } else if !seen.contains("via:") {
        Err("not the origin's /headers answer".into())
    } else {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_authentication() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let baton = start_with_htpasswd(echo).await;
    let o = origin;
    let good = format!("Proxy-Authorization: Basic {}\r\n", basic("alice", "secret"));
    let normal = format!("GET http://{o}/bytes?n=3 HTTP/1.1\r\nHost: {o}\r\n{good}\r\n");
    let base = baseline(baton.proxy, baton.pid(), Some(&normal)).await;
    let mut s = Suite::new("auth", baton.proxy, normal.clone());

    missing_or_wrong_credentials(&mut s, o).await;
    correct_credentials(&mut s, o, &good).await;
    connect_with_credentials(&mut s, echo, &good).await;

    assert_healthy(&mut s, baton.pid(), base, Some(&normal)).await;
    s.finish();
}

/// baton with an htpasswd file (alice with a `$2y$` hash, bob with `$2b$` and a password with
/// a colon and a space), realm "baton", CONNECT allowed to `echo`.
async fn start_with_htpasswd(echo: SocketAddr) -> Baton {
    let dir = tempfile::tempdir().unwrap();
    let alice = bcrypt::hash("secret", 4).unwrap().replacen("$2b$", "$2y$", 1);
    let bob = bcrypt::hash("pa:ss word", 4).unwrap();
    let htpasswd = dir.path().join("htpasswd");
    testkit::write_secret(&htpasswd, format!("alice:{alice}\nbob:{bob}\n")).unwrap();
    let extra = format!(
        "[access]\nhtpasswd = \"{}\"\nrealm = \"baton\"\nconnect_ports = [443, {}]\n",
        htpasswd.display(),
        echo.port()
    );
    Baton::start_in(dir, Path::new(BATON), &short_pool(&extra), &[]).await
}

/// A GET of the origin's `/headers` with `auth` (header lines, each ending in CRLF).
fn get_auth(o: SocketAddr, auth: &str) -> String {
    format!("GET http://{o}/headers HTTP/1.1\r\nHost: {o}\r\n{auth}\r\n")
}

/// A CONNECT to `echo` with `auth`.
fn connect_with(echo: SocketAddr, auth: &str) -> String {
    format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n{auth}\r\n")
}

/// Credentials that must not let a request through, each with its case name.
fn wrong_credentials() -> [(&'static str, String); 7] {
    [
        (
            "wrong password",
            format!("Proxy-Authorization: Basic {}\r\n", basic("alice", "Secret")),
        ),
        (
            "unknown user",
            format!("Proxy-Authorization: Basic {}\r\n", basic("mallory", "secret")),
        ),
        (
            "empty password",
            format!("Proxy-Authorization: Basic {}\r\n", basic("alice", "")),
        ),
        (
            "invalid base64",
            "Proxy-Authorization: Basic !!!notbase64\r\n".to_string(),
        ),
        (
            "no colon in credentials",
            format!("Proxy-Authorization: Basic {}\r\n", b64("alicesecret")),
        ),
        ("Bearer scheme", "Proxy-Authorization: Bearer secret\r\n".to_string()),
        (
            "Authorization instead of Proxy-Authorization",
            format!("Authorization: Basic {}\r\n", basic("alice", "secret")),
        ),
    ]
}

/// No credentials, or wrong ones: 407 with the challenge, connection kept.
async fn missing_or_wrong_credentials(s: &mut Suite, o: SocketAddr) {
    use After::KeepsOpen;
    use Expect::Status;

    s.case(
        "missing credentials: 407 with Proxy-Authenticate",
        get_auth(o, "").as_bytes(),
        Status(&[407]),
        KeepsOpen,
        challenges,
    )
    .await;
    for (name, auth) in &wrong_credentials() {
        s.case(
            name,
            get_auth(o, auth).as_bytes(),
            Status(&[407]),
            KeepsOpen,
            challenges,
        )
        .await;
    }
}

/// Correct credentials (`good` for alice): served, and Proxy-Authorization not forwarded.
async fn correct_credentials(s: &mut Suite, o: SocketAddr, good: &str) {
    use After::KeepsOpen;
    use Expect::Status;

    s.case(
        "correct credentials ($2y$ hash): 200, Proxy-Authorization not forwarded",
        get_auth(o, good).as_bytes(),
        Status(&[200]),
        KeepsOpen,
        no_proxy_authorization,
    )
    .await;
    s.case(
        "correct credentials ($2b$ hash, password with colon and space)",
        get_auth(
            o,
            &format!("Proxy-Authorization: Basic {}\r\n", basic("bob", "pa:ss word")),
        )
        .as_bytes(),
        Status(&[200]),
        KeepsOpen,
        no_proxy_authorization,
    )
    .await;
    s.case(
        "auth scheme is case-insensitive (\"basic\")",
        get_auth(
            o,
            &format!("Proxy-Authorization: basic {}\r\n", basic("alice", "secret")),
        )
        .as_bytes(),
        Status(&[200]),
        KeepsOpen,
        no_proxy_authorization,
    )
    .await;
}

/// CONNECT: 407 before the tunnel opens, a working tunnel with `good` credentials.
async fn connect_with_credentials(s: &mut Suite, echo: SocketAddr, good: &str) {
    use After::KeepsOpen;
    use Expect::Status;

    s.case(
        "CONNECT without credentials: 407",
        connect_with(echo, "").as_bytes(),
        Status(&[407]),
        KeepsOpen,
        challenges,
    )
    .await;
    s.case(
        "CONNECT with a wrong password: 407",
        connect_with(echo, &wrong_credentials()[0].1).as_bytes(),
        Status(&[407]),
        KeepsOpen,
        challenges,
    )
    .await;
    let result = async {
        let mut c = Conn::open(s.proxy).await;
        c.send(connect_with(echo, good).as_bytes()).await?;
        let r = c.response(true).await?;
        if r.code() != 200 {
            return Err(format!("got {:?}", r.status));
        }
        c.send(b"tunnel-ping").await?;
        c.need(11, Instant::now() + READ_WAIT).await?;
        if &c.buf[..] != b"tunnel-ping" {
            return Err(format!("echo returned {:?}", String::from_utf8_lossy(&c.buf)));
        }
        Ok(())
    }
    .await;
    s.record("CONNECT with correct credentials: tunnel works", result);
}

// ---------------------------------------------------------------------------------------------
// Destination rules: denied addresses (also through names), host names, allow lists, loops

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn destination_rules() {
    use After::KeepsOpen;
    use Expect::Status;

    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let other = start_plain_origin("127.0.0.2").await;
    let extra = format!(
        "[access]\nconnect_ports = [443, {e}]\ndeny_destinations = [\"127.0.0.1/32\", \"::1/128\"]\ndeny_hosts = [\"blocked.example\", \"*.evil.example\"]\n",
        e = echo.port()
    );
    let baton = Baton::start(&short_pool(&extra)).await;
    let normal = get(&format!("http://{other}/"));
    let base = baseline(baton.proxy, baton.pid(), Some(&normal)).await;
    let mut s = Suite::new("destinations", baton.proxy, normal.clone());

    for (name, req) in denied_targets(origin.port(), echo.port()) {
        s.case(name, req.as_bytes(), Status(&[403]), KeepsOpen, no_check).await;
    }
    // Numeric spellings of 127.0.0.1: resolved, then denied (403), or refused as malformed (400).
    for (name, req) in numeric_spellings_of_loopback(origin.port()) {
        s.case(name, req.as_bytes(), Status(&[403, 400]), KeepsOpen, no_check)
            .await;
    }

    assert_healthy(&mut s, baton.pid(), base, Some(&normal)).await;
    s.finish();
}

fn connect_to(target: &str) -> String {
    format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")
}

/// Requests to what `deny_destinations` and `deny_hosts` refuse: the origin (port
/// `op`) and echo (port `ep`) on 127.0.0.1 through every spelling, and denied host names.
fn denied_targets(op: u16, ep: u16) -> Vec<(&'static str, String)> {
    vec![
        (
            "CONNECT to a denied address through a name (localhost)",
            connect_to(&format!("localhost:{ep}")),
        ),
        ("CONNECT to a denied address", connect_to(&format!("127.0.0.1:{ep}"))),
        (
            "CONNECT to a denied address as IPv4-mapped IPv6",
            connect_to(&format!("[::ffff:127.0.0.1]:{ep}")),
        ),
        ("CONNECT to a denied IPv6 address", connect_to(&format!("[::1]:{ep}"))),
        (
            "GET to a denied address through a name (localhost)",
            get(&format!("http://localhost:{op}/bytes?n=5")),
        ),
        (
            "GET to a denied address",
            get(&format!("http://127.0.0.1:{op}/bytes?n=5")),
        ),
        (
            "GET to a denied address as IPv4-mapped IPv6",
            get(&format!("http://[::ffff:127.0.0.1]:{op}/bytes?n=5")),
        ),
        ("GET to a denied host name", get("http://blocked.example/")),
        (
            "GET to a denied host name with a trailing dot",
            get("http://blocked.example./"),
        ),
        (
            "GET to a denied host suffix (*.evil.example)",
            get("http://www.evil.example/"),
        ),
        (
            "GET to a denied host suffix in upper case",
            get("http://WWW.EVIL.EXAMPLE/"),
        ),
        ("CONNECT to a denied host name", connect_to("blocked.example:443")),
    ]
}

/// 127.0.0.1:`op` in numeric spellings other than dotted quad.
fn numeric_spellings_of_loopback(op: u16) -> Vec<(&'static str, String)> {
    vec![
        (
            "GET to a denied address spelled as a decimal integer",
            get(&format!("http://2130706433:{op}/bytes?n=5")),
        ),
        (
            "GET to a denied address spelled 127.1",
            get(&format!("http://127.1:{op}/bytes?n=5")),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allow_destinations_only() {
    use After::KeepsOpen;
    use Expect::Status;

    let origin = testkit::start_origin().await.unwrap();
    let other = start_plain_origin("127.0.0.2").await;
    let baton = Baton::start(&short_pool("[access]\nallow_destinations = [\"127.0.0.2/32\"]\n")).await;
    let normal = get(&format!("http://{other}/"));
    let base = baseline(baton.proxy, baton.pid(), Some(&normal)).await;
    let mut s = Suite::new("allow-destinations", baton.proxy, normal.clone());

    s.case(
        "GET to an address outside allow_destinations",
        get(&format!("http://{origin}/bytes?n=5")).as_bytes(),
        Status(&[403]),
        KeepsOpen,
        no_check,
    )
    .await;
    s.case(
        "CONNECT (port 443) to an address outside allow_destinations",
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
        Status(&[403]),
        KeepsOpen,
        no_check,
    )
    .await;
    s.case(
        "GET to an allowed address",
        normal.as_bytes(),
        Status(&[200]),
        KeepsOpen,
        no_check,
    )
    .await;

    assert_healthy(&mut s, baton.pid(), base, Some(&normal)).await;
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proxy_refuses_to_loop_into_itself() {
    use After::KeepsOpen;
    use Expect::Status;

    let origin = testkit::start_origin().await.unwrap();
    let second = free_port();
    let extra = format!(
        "[[listener]]\nname = \"second\"\naddress = \"127.0.0.1:{second}\"\n\n[access]\nconnect_ports = [443, {second}]\n"
    );
    let baton = Baton::start(&short_pool(&extra)).await;
    let normal = get(&format!("http://{origin}/bytes?n=3"));
    let base = baseline(baton.proxy, baton.pid(), Some(&normal)).await;
    let mut s = Suite::new("loop", baton.proxy, normal.clone());
    let p = baton.proxy.port();

    let connect = |t: &str| format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\n\r\n");
    for (name, req) in [
        (
            "CONNECT to the proxy's own listen address",
            connect(&format!("127.0.0.1:{second}")),
        ),
        (
            "CONNECT to the proxy through a name",
            connect(&format!("localhost:{second}")),
        ),
        (
            "GET to the proxy's own listen address",
            get(&format!("http://127.0.0.1:{p}/")),
        ),
        (
            "GET to the proxy's other listener through a name",
            get(&format!("http://localhost:{second}/")),
        ),
    ] {
        s.case(name, req.as_bytes(), Status(&[403]), KeepsOpen, no_check).await;
    }

    assert_healthy(&mut s, baton.pid(), base, Some(&normal)).await;
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_not_in_allow_clients() {
    use After::Closes;
    use Expect::Status;

    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start(&short_pool("[access]\nallow_clients = [\"10.0.0.0/8\"]\n")).await;
    let base = baseline(baton.proxy, baton.pid(), None).await;
    let mut s = Suite::new("clients", baton.proxy, String::new());

    s.case(
        "GET from a client outside allow_clients",
        get(&format!("http://{origin}/bytes?n=5")).as_bytes(),
        Status(&[403]),
        Closes,
        no_check,
    )
    .await;
    s.case(
        "CONNECT from a client outside allow_clients",
        b"CONNECT 127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\n\r\n",
        Status(&[403]),
        Closes,
        no_check,
    )
    .await;

    assert_healthy(&mut s, baton.pid(), base, None).await;
    s.finish();
}

// ---------------------------------------------------------------------------------------------
// Limits and timeouts

/// Sends `head`, then nothing (or `drip` bytes one at a time every 200 ms); the proxy must
/// close the connection (with or without a 408) within `within`.
async fn slow_client(proxy: SocketAddr, head: &[u8], drip: &[u8], within: Duration) -> Result<(), String> {
    let start = Instant::now();
    let mut c = Conn::open(proxy).await;
    c.send(head).await?;
    let deadline = start + within;
    let mut drip = drip.iter();
    loop {
        let next = (Instant::now() + Duration::from_millis(200)).min(deadline);
        match c.fill(next).await {
            Fill::Eof | Fill::Error(_) => break,
            Fill::Data => {
                // A 408 (or another error status) is fine; a 2xx is not. Keep reading to the close.
                let text = String::from_utf8_lossy(&c.buf).into_owned();
                if text.starts_with("HTTP/1.1 2") {
                    return Err(format!("slow head answered {text:?}"));
                }
            }
            Fill::Timeout => {
                if Instant::now() >= deadline {
                    return Err(format!("connection still open after {within:?}"));
                }
                if let Some(b) = drip.next() {
                    // The proxy may have closed its side already: judged by the next read.
                    let _ = c.send(std::slice::from_ref(b)).await;
                }
            }
        }
    }
    let text = String::from_utf8_lossy(&c.buf).into_owned();
    if !(text.is_empty() || text.starts_with("HTTP/1.1 4")) {
        return Err(format!("unexpected answer {text:?}"));
    }
    eprintln!(
        "    closed after {:?} ({:?})",
        start.elapsed(),
        text.lines().next().unwrap_or("no response")
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_and_timeouts() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start(&short_pool(
        "[timeouts]\nheader_read = \"1s\"\n\n[limits]\nmax_header_bytes = 16384\nmax_uri_bytes = 1024\nmax_body_bytes = 100\n",
    ))
    .await;
    let o = origin;
    let normal = get(&format!("http://{o}/bytes?n=3"));
    let base = baseline(baton.proxy, baton.pid(), Some(&normal)).await;
    let mut s = Suite::new("limits", baton.proxy, normal.clone());

    header_and_uri_limits(&mut s, o).await;
    header_limit_boundary(&mut s, o, 16384).await;
    body_limits(&mut s, o).await;
    slow_clients(&mut s, baton.proxy, o).await;
    let r = idle_keep_alive_is_closed(baton.proxy, &normal).await;
    s.record("idle keep-alive connection closed within 3 s (header_read 1s)", r);

    assert_healthy(&mut s, baton.pid(), base, Some(&normal)).await;
    s.finish();
}

/// Header section and URI over their limits: 431 and 414, then close; a URI just under its
/// limit is forwarded.
async fn header_and_uri_limits(s: &mut Suite, o: SocketAddr) {
    use After::{Closes, KeepsOpen};
    use Expect::Status;

    let big = "a".repeat(20_000);
    s.case(
        "header over max_header_bytes: 431",
        format!("GET http://{o}/bytes?n=5 HTTP/1.1\r\nHost: {o}\r\nX-Big: {big}\r\n\r\n").as_bytes(),
        Status(&[431]),
        Closes,
        no_check,
    )
    .await;
    let many: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    s.case(
        "200 header fields: 431",
        format!("GET http://{o}/bytes?n=5 HTTP/1.1\r\nHost: {o}\r\n{many}\r\n").as_bytes(),
        Status(&[431]),
        Closes,
        no_check,
    )
    .await;
    let long_path = "p".repeat(2000);
    s.case(
        "URI over max_uri_bytes: 414",
        get(&format!("http://{o}/{long_path}")).as_bytes(),
        Status(&[414]),
        Closes,
        no_check,
    )
    .await;
    s.case(
        "URI just under max_uri_bytes: forwarded",
        get(&format!("http://{o}/bytes?n=5&pad={}", "x".repeat(900))).as_bytes(),
        Status(&[200]),
        KeepsOpen,
        five_bytes,
    )
    .await;
}

/// Bodies over `max_body_bytes` (by Content-Length or chunked): 413, then close; one at the
/// limit is forwarded.
async fn body_limits(s: &mut Suite, o: SocketAddr) {
    use After::{Closes, KeepsOpen};
    use Expect::Status;

    s.case(
        "Content-Length over max_body_bytes: 413 (body not read)",
        format!(
            "POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\nContent-Length: 1000000\r\n\r\n{}",
            "b".repeat(100)
        )
        .as_bytes(),
        Status(&[413]),
        Closes,
        no_check,
    )
    .await;
    s.case(
        "Content-Length at max_body_bytes: forwarded",
        format!(
            "POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\nContent-Length: 100\r\n\r\n{}",
            "b".repeat(100)
        )
        .as_bytes(),
        Status(&[200]),
        KeepsOpen,
        |r| {
            if r.text().ends_with(" 100") {
                Ok(())
            } else {
                Err("origin did not get 100 bytes".into())
            }
        },
    )
    .await;
    let chunk = format!("3c\r\n{}\r\n", "c".repeat(60));
    s.case(
        "chunked body over max_body_bytes: 413",
        format!(
            "POST http://{o}/sha256 HTTP/1.1\r\nHost: {o}\r\nTransfer-Encoding: chunked\r\n\r\n{chunk}{chunk}{chunk}0\r\n\r\n"
        )
        .as_bytes(),
        Status(&[413]),
        Closes,
        no_check,
    )
    .await;
}

/// Slowloris and silent connections are closed within 3 s (`header_read` is 1 s).
async fn slow_clients(s: &mut Suite, proxy: SocketAddr, o: SocketAddr) {
    let partial = format!("GET http://{o}/bytes?n=5 HTTP/1.1\r\nHost: {o}\r\n");
    let r = slow_client(proxy, partial.as_bytes(), b"", Duration::from_secs(3)).await;
    s.record(
        "slowloris: partial head then silence, closed within 3 s (header_read 1s)",
        r,
    );
    let r = slow_client(
        proxy,
        format!("GET http://{o}/bytes?n=5 HTTP/1.1\r\n").as_bytes(),
        b"X-Drip: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        Duration::from_secs(3),
    )
    .await;
    s.record("slowloris: head dripped a byte per 200 ms, closed within 3 s", r);
    let r = slow_client(proxy, b"", b"", Duration::from_secs(3)).await;
    s.record("connection opened and silent: closed within 3 s", r);
}

/// An idle keep-alive connection, after one `normal` request, is closed within 3 s.
async fn idle_keep_alive_is_closed(proxy: SocketAddr, normal: &str) -> Result<(), String> {
    let mut c = Conn::open(proxy).await;
    c.send(normal.as_bytes()).await?;
    let r = c.response(false).await?;
    if r.code() != 200 {
        return Err(format!("got {:?}", r.status));
    }
    let start = Instant::now();
    match c.fill(Instant::now() + Duration::from_secs(3)).await {
        Fill::Eof | Fill::Error(_) => {
            eprintln!("    idle keep-alive closed after {:?}", start.elapsed());
            Ok(())
        }
        Fill::Data => Err(format!("unexpected bytes {:?}", String::from_utf8_lossy(&c.buf))),
        Fill::Timeout => Err("idle keep-alive connection still open after 3 s".into()),
    }
}

/// Polls (every 100 ms, for at most `within`) until a new connection gets `request` answered 200.
async fn served_within(proxy: SocketAddr, request: &str, within: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        let mut c = Conn::open(proxy).await;
        let _ = c.send(request.as_bytes()).await;
        match c.response(false).await {
            Ok(r) if r.code() == 200 => {
                eprintln!("    served after {:?}", start.elapsed());
                return Ok(());
            }
            Ok(r) if start.elapsed() >= within => return Err(format!("still answered {:?}", r.status)),
            Err(e) if start.elapsed() >= within => return Err(format!("still refused: {e}")),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_flood_over_max_connections() {
    let origin = testkit::start_origin().await.unwrap();
    let baton = Baton::start(&short_pool("[limits]\nmax_connections = 5\n")).await;
    let normal = get(&format!("http://{origin}/bytes?n=3"));
    let base = baseline(baton.proxy, baton.pid(), Some(&normal)).await;
    let mut s = Suite::new("flood", baton.proxy, normal.clone());

    // Five connections, each made to do a request, held open idle.
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut c = Conn::open(baton.proxy).await;
        c.send(normal.as_bytes()).await.unwrap();
        let r = c.response(false).await.expect("request on a held connection");
        assert_eq!(r.code(), 200, "held connection: {r:?}");
        held.push(c);
    }
    for i in 6..=8 {
        let start = Instant::now();
        let r = async {
            let mut c = Conn::open(baton.proxy).await;
            let _ = c.send(normal.as_bytes()).await;
            let shown = match c.response(false).await {
                Ok(r) if r.code() == 503 => r.status,
                Ok(r) => return Err(format!("got {:?}", r.status)),
                Err(e) if e.starts_with(CLOSED_NO_RESPONSE) => "closed without a response".into(),
                Err(e) => return Err(e),
            };
            match c.closes().await {
                State::Closed => {}
                other => return Err(format!("{shown}, then {other:?}")),
            }
            if start.elapsed() > Duration::from_secs(3) {
                return Err(format!("{shown}, but only after {:?}", start.elapsed()));
            }
            Ok(())
        }
        .await;
        s.record(
            &format!("connection {i} over max_connections = 5: 503 or prompt close"),
            r,
        );
    }
    // A slot freed: a new connection is served again (the proxy notices the close
    // asynchronously, hence a bounded poll).
    drop(held.pop());
    let r = served_within(baton.proxy, &normal, Duration::from_secs(5)).await;
    s.record("after one held connection closes, a new one is served", r);
    drop(held);
    let r = served_within(baton.proxy, &normal, Duration::from_secs(5)).await;
    s.record("after all held connections close, served again", r);

    assert_healthy(&mut s, baton.pid(), base, Some(&normal)).await;
    s.finish();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tunnel_idle_timeout() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let baton = Baton::start(&short_pool(&format!(
        "[timeouts]\ntunnel_idle = \"1s\"\n\n[access]\nconnect_ports = [443, {}]\n",
        echo.port()
    )))
    .await;
    let normal = get(&format!("http://{origin}/bytes?n=3"));
    let base = baseline(baton.proxy, baton.pid(), Some(&normal)).await;
    let mut s = Suite::new("tunnel", baton.proxy, normal.clone());

    let r = async {
        let mut c = Conn::open(baton.proxy).await;
        c.send(format!("CONNECT {echo} HTTP/1.1\r\nHost: {echo}\r\n\r\n").as_bytes())
            .await?;
        let r = c.response(true).await?;
        if r.code() != 200 {
            return Err(format!("CONNECT answered {:?}", r.status));
        }
        // Active for 2.5 s (longer than tunnel_idle): must stay open.
        let start = Instant::now();
        while start.elapsed() < Duration::from_millis(2500) {
            c.send(b"ping").await?;
            c.need(4, Instant::now() + READ_WAIT).await?;
            c.buf.clear();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Then idle: closed within about tunnel_idle.
        let idle = Instant::now();
        match c.fill(Instant::now() + Duration::from_secs(3)).await {
            Fill::Eof | Fill::Error(_) => {
                eprintln!("    idle tunnel closed after {:?}", idle.elapsed());
                Ok(())
            }
            Fill::Data => Err("unexpected bytes on an idle tunnel".into()),
            Fill::Timeout => Err("idle tunnel still open after 3 s (tunnel_idle 1s)".into()),
        }
    }
    .await;
    s.record(
        "tunnel active beyond tunnel_idle stays open, idle tunnel closed within 3 s",
        r,
    );

    assert_healthy(&mut s, baton.pid(), base, Some(&normal)).await;
    s.finish();
}
