//! Hostile input against the real binary (issue 31, part B): responses whose framing
//! disagrees with itself (RFC 9112 §6.3), `Connection` values that are not token lists, the
//! failed-login budget under parallel attempts, and secrets in the logs.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Baton, testkit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// How long any exchange may take before the case counts as failed.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------------
// A raw origin and a raw client

/// What the raw origin writes for a path, byte for byte, and whether it closes afterwards.
type Answers = HashMap<&'static str, (&'static [u8], bool)>;

/// An origin on 127.0.0.1 that answers each request (keep-alive, one after another on a
/// connection) with the exact bytes `answers` holds for its path. Returns its address and the
/// number of connections it accepted.
async fn raw_origin(answers: Answers) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind raw origin");
    let addr = listener.local_addr().expect("origin address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let answers = Arc::new(answers);
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(serve_raw(s, answers.clone()));
        }
    });
    (addr, accepted)
}

async fn serve_raw(mut s: TcpStream, answers: Arc<Answers>) {
    let mut buf = Vec::new();
    loop {
        let Some(end) = read_until_head_end(&mut s, &mut buf).await else {
            return;
        };
        let head: Vec<u8> = buf.drain(..end).collect();
        let line = String::from_utf8_lossy(&head);
        let path = line.split(' ').nth(1).unwrap_or("/");
        let Some((bytes, close)) = answers.get(path) else {
            let _ = s
                .write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                .await;
            continue;
        };
        if s.write_all(bytes).await.is_err() || *close {
            let _ = s.shutdown().await;
            return;
        }
    }
}

/// Reads into `buf` until it holds a head's end (requests here carry no body); `None` at
/// EOF or after [`WAIT`].
async fn read_until_head_end(s: &mut TcpStream, buf: &mut Vec<u8>) -> Option<usize> {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(i + 4);
        }
        let mut chunk = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// Sends `request` to the proxy on a new connection and reads everything it answers until it
/// closes (the requests say `Connection: close`): the exact bytes the client got.
async fn exchange(proxy: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy).await.expect("connect to the proxy");
    s.write_all(request).await.expect("send the request");
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut all))
        .await
        .unwrap_or_else(|_| panic!("the proxy neither finished nor closed within {WAIT:?}: {all:?}"))
        .expect("read the answer");
    all
}

/// A response as the client received it: status, header fields (lowercase names, in order)
/// and the body as framed by those fields (chunked decoded), or why its framing is broken.
#[derive(Debug)]
struct Received {
    status: u16,
    fields: Vec<(String, String)>,
    body: Result<Vec<u8>, String>,
}

impl Received {
    fn field(&self, name: &str) -> Vec<&str> {
        self.fields
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// `all`: a whole answer to a request that was not HEAD (`head_request`: it was).
    fn parse(all: &[u8], head_request: bool) -> Received {
        let end = all
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(all)));
        let head = String::from_utf8_lossy(&all[..end]);
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status = status_line.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        let fields: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        let mut r = Received {
            status,
            fields,
            body: Ok(Vec::new()),
        };
        let rest = &all[end + 4..];
        if head_request || status == 204 || status == 304 {
            r.body = if rest.is_empty() {
                Ok(Vec::new())
            } else {
                Err(format!("{} bytes after a bodiless answer", rest.len()))
            };
            return r;
        }
        let te = r.field("transfer-encoding").join(", ");
        let cl = r.field("content-length");
        r.body = if te.to_ascii_lowercase().ends_with("chunked") {
            if !cl.is_empty() {
                Err(format!("both transfer-encoding {te:?} and content-length {cl:?}"))
            } else {
                dechunk(rest)
            }
        } else if let [len] = cl[..] {
            let len: usize = len.parse().unwrap_or(usize::MAX);
            if rest.len() == len {
                Ok(rest.to_vec())
            } else {
                Err(format!("content-length {len} with {} bytes", rest.len()))
            }
        } else if cl.len() > 1 {
            Err(format!("several content-length fields {cl:?}"))
        } else {
            Ok(rest.to_vec())
        };
        r
    }
}

/// The data of a complete chunked body (no trailers expected).
fn dechunk(mut rest: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("chunk size line cut short")?;
        let size = std::str::from_utf8(&rest[..eol]).map_err(|e| e.to_string())?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("chunk size {size:?}: {e}"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return if rest == b"\r\n" {
                Ok(body)
            } else {
                Err(format!("after the last chunk: {rest:?}"))
            };
        }
        if rest.len() < size + 2 {
            return Err("chunk cut short".into());
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

fn get(origin: SocketAddr, path: &str, method: &str) -> Vec<u8> {
    format!("{method} http://{origin}{path} HTTP/1.1\r\nHost: {origin}\r\nConnection: close\r\n\r\n").into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Finding 8: response framing (RFC 9112 §6.3)

/// What the client must receive for one origin answer.
enum Want {
    /// This status, this body, and a head whose framing matches it; `te`: the
    /// Transfer-Encoding the client must see (None: none).
    Relayed {
        status: u16,
        body: &'static [u8],
        te: Option<&'static str>,
    },
    /// The proxy's 502, naming `why`.
    BadGateway(&'static str),
}

/// One origin answer: the request (path and method), the exact bytes the origin writes,
/// whether it closes after them, and what the client must receive.
struct Case {
    path: &'static str,
    method: &'static str,
    answer: &'static [u8],
    close: bool,
    want: Want,
}

const fn ok(body: &'static [u8], te: Option<&'static str>) -> Want {
    Want::Relayed { status: 200, body, te }
}

const fn case(path: &'static str, method: &'static str, answer: &'static [u8], close: bool, want: Want) -> Case {
    Case {
        path,
        method,
        answer,
        close,
        want,
    }
}

static FRAMING_CASES: &[Case] = &[
    // §6.3 (3): Transfer-Encoding and Content-Length: refused, the connection closed.
    case(
        "/te-chunked-cl",
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 100\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
        Want::BadGateway("both Transfer-Encoding: chunked and Content-Length"),
    ),
    case(
        "/cl-te-chunked",
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
        Want::BadGateway("both Transfer-Encoding: chunked and Content-Length"),
    ),
    // §6.3 (4): a coding other than chunked last: read until close, the coding kept.
    case(
        "/te-gzip-cl",
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello",
        true,
        ok(b"hello", Some("gzip, chunked")),
    ),
    case(
        "/te-gzip",
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        true,
        ok(b"hello", Some("gzip, chunked")),
    ),
    case(
        "/te-chunked-not-last",
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\nhello",
        true,
        Want::BadGateway("Transfer-Encoding with chunked not last"),
    ),
    case(
        "/te-chunked",
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
        ok(b"hello", Some("chunked")),
    ),
    case(
        "/te-gzip-chunked",
        "GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        false,
        ok(b"hello", Some("gzip, chunked")),
    ),
    // §6.3 (5): Content-Length lists: equal values accepted, differing or invalid refused.
    case(
        "/cl-twice",
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        false,
        ok(b"hello", None),
    ),
    case(
        "/cl-list",
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\n\r\nhello",
        false,
        ok(b"hello", None),
    ),
    case(
        "/cl-differ",
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        false,
        Want::BadGateway("failed"),
    ),
    case(
        "/cl-invalid",
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello",
        false,
        Want::BadGateway("failed"),
    ),
    // §6.3 (6): Content-Length.
    case(
        "/cl",
        "GET",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
        false,
        ok(b"hello", None),
    ),
    // §6.3 (8): neither: until the origin closes.
    case(
        "/close",
        "GET",
        b"HTTP/1.1 200 OK\r\n\r\nhello",
        true,
        ok(b"hello", Some("chunked")),
    ),
    // §6.3 (1): HEAD, 204 and 304 have no content whatever their fields say.
    case(
        "/head",
        "HEAD",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n",
        false,
        ok(b"", None),
    ),
    case(
        "/not-modified",
        "GET",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 100\r\n\r\n",
        false,
        Want::Relayed {
            status: 304,
            body: b"",
            te: None,
        },
    ),
    case(
        "/no-content",
        "GET",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        false,
        Want::Relayed {
            status: 204,
            body: b"",
            te: None,
        },
    ),
    // Transfer-Encoding in HTTP/1.0 is invalid.
    case(
        "/te-http10",
        "GET",
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        true,
        Want::BadGateway("failed"),
    ),
    // A Connection value that is not a token list cannot be stripped: refused.
    case(
        "/connection-cafe",
        "GET",
        b"HTTP/1.1 200 OK\r\nConnection: X-Secret, caf\xe9\r\nX-Secret: 1\r\nContent-Length: 5\r\n\r\nhello",
        false,
        Want::BadGateway("Connection field is not a comma-separated list of tokens"),
    ),
];

fn framing_answers() -> Answers {
    FRAMING_CASES.iter().map(|c| (c.path, (c.answer, c.close))).collect()
}

/// Checks one case's answer; `Err` says how it differs.
fn judge(got: &Received, want: &Want) -> Result<(), String> {
    match want {
        Want::BadGateway(why) => {
            let body = got.body.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
            if got.status != 502 || !body.contains(why) {
                return Err(format!("want 502 naming {why:?}, got {got:?}"));
            }
        }
        Want::Relayed { status, body, te } => {
            if got.status != *status || got.body.as_deref() != Ok(*body) {
                return Err(format!("want {status} with {body:?}, got {got:?}"));
            }
            let got_te = got.field("transfer-encoding").join(", ");
            if got_te != te.unwrap_or("") {
                return Err(format!("want transfer-encoding {te:?}, got {got_te:?}"));
            }
        }
    }
    Ok(())
}

/// Every framing of a response that RFC 9112 §6.3 lists, written byte for byte by a raw
/// origin, reaches the client with a head that frames its body truly, or as a 502 that names
/// why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_framing_follows_rfc_9112_section_6_3() {
    let (origin, _) = raw_origin(framing_answers()).await;
    let baton = Baton::start("").await;
    let mut failures = Vec::new();
    for Case { path, method, want, .. } in FRAMING_CASES {
        let all = exchange(baton.proxy, &get(origin, path, method)).await;
        let got = Received::parse(&all, *method == "HEAD");
        match judge(&got, want) {
            Ok(()) => println!("PASS {path}"),
            Err(e) => {
                println!("FAIL {path}: {e}");
                failures.push(format!("{path}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "cases failed:\n{}\n{}",
        failures.join("\n"),
        baton.log()
    );
}

/// A refused answer's origin connection is closed, not kept: the next request opens a new
/// one. The positive witness: after a good answer the connection is reused. All on one
/// keep-alive client connection, whose lease holds the origin connection between requests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_answer_closes_its_origin_connection() {
    let answers = framing_answers();
    let (origin, accepted) = raw_origin(answers).await;
    let baton = Baton::start("").await;
    let mut client = TcpStream::connect(baton.proxy).await.expect("connect to the proxy");
    let mut ask = async |path: &str| {
        let req = format!("GET http://{origin}{path} HTTP/1.1\r\nHost: {origin}\r\n\r\n");
        client.write_all(req.as_bytes()).await.expect("send");
        let (head, _) = tokio::time::timeout(WAIT, testkit::client::read_response(&mut client))
            .await
            .expect("an answer in time")
            .expect("an answer");
        head
    };
    for _ in 0..2 {
        let head = ask("/cl").await;
        assert!(head.starts_with("HTTP/1.1 200"), "a good answer: {head}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "two good answers in a row come over one kept origin connection"
    );
    let head = ask("/te-chunked-cl").await;
    assert!(head.starts_with("HTTP/1.1 502"), "TE + CL is refused: {head}");
    let head = ask("/cl").await;
    assert!(head.starts_with("HTTP/1.1 200"), "the next request is served: {head}");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the connection of the refused answer was closed, so the next request opened another"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 9: Connection values that are not token lists

/// `Connection: X-Secret, café` (one non-ASCII byte) used to read as empty, and X-Secret
/// reached the origin. Now the request is refused with a reason; the same request with an
/// ASCII list strips X-Secret (and without Connection, the origin shows it: the witness that
/// the origin would see it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_value_that_is_not_a_token_list_is_refused() {
    let origin = testkit::start_origin().await.expect("origin");
    let baton = Baton::start("").await;
    let request = |connection: &[u8]| {
        let mut r = format!("GET http://{origin}/headers HTTP/1.1\r\nHost: {origin}\r\n").into_bytes();
        r.extend_from_slice(connection);
        r.extend_from_slice(b"X-Secret: 1\r\nConnection: close\r\n\r\n");
        r
    };
    let plain = Received::parse(&exchange(baton.proxy, &request(b"")).await, false);
    let seen = String::from_utf8_lossy(plain.body.as_deref().unwrap_or_default()).to_ascii_lowercase();
    assert!(
        plain.status == 200 && seen.contains("x-secret"),
        "witness: without Connection the origin sees X-Secret: {plain:?}"
    );
    let named = Received::parse(
        &exchange(baton.proxy, &request(b"Connection: X-Secret\r\n")).await,
        false,
    );
    let seen = String::from_utf8_lossy(named.body.as_deref().unwrap_or_default()).to_ascii_lowercase();
    assert!(
        named.status == 200 && !seen.contains("x-secret"),
        "a field Connection names is hop-by-hop: {named:?}"
    );
    let cafe = Received::parse(
        &exchange(baton.proxy, &request(b"Connection: X-Secret, caf\xe9\r\n")).await,
        false,
    );
    let body = String::from_utf8_lossy(cafe.body.as_deref().unwrap_or_default()).into_owned();
    assert_eq!(
        cafe.status, 400,
        "a Connection that is not a token list is refused: {cafe:?}"
    );
    assert!(
        body.contains("Connection field is not a comma-separated list of tokens"),
        "the 400 says why: {body:?}"
    );
}

/// A chunked request body goes on whatever the method (hyper would send a GET, HEAD or
/// CONNECT of unknown length with no body), and the chunk grammar is applied to it: the
/// origin's `/sha256` counts what arrived. The http-garden cases that were relayed before
/// (`0_2e`, an empty chunk size, a bare CR in the size line, data not followed by CRLF) get
/// 400 naming the fault; the witness is the same GET with a well-formed body, and with
/// `Content-Length`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_bodies_go_on_for_every_method_under_the_chunk_grammar() {
    let origin = testkit::start_origin().await.expect("origin");
    let baton = Baton::start("").await;
    let expected = format!("{} 11", testkit::sha256_hex(b"hello world"));
    let request = |method: &str, framing: &str, body: &str| {
        let head = format!("{method} http://{origin}/sha256 HTTP/1.1\r\nHost: {origin}\r\n{framing}\r\n");
        format!("{head}{body}").into_bytes()
    };
    let chunked = "Transfer-Encoding: chunked\r\n";
    for method in ["GET", "DELETE", "OPTIONS", "POST", "PUT"] {
        let r = request(method, chunked, "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n");
        let got = Received::parse(&exchange(baton.proxy, &r).await, false);
        let body = String::from_utf8_lossy(got.body.as_deref().unwrap_or_default()).into_owned();
        assert_eq!(
            (got.status, body),
            (200, expected.clone()),
            "{method}: the origin got the 11 chunked bytes"
        );
    }
    let sized = request("GET", "Content-Length: 11\r\nConnection: close\r\n", "hello world");
    let got = Received::parse(&exchange(baton.proxy, &sized).await, false);
    assert_eq!(
        got.body.as_deref().ok(),
        Some(expected.as_bytes()),
        "witness: a sized GET body: {got:?}"
    );
    for (body, fault) in [
        ("0_2e\r\n\r\n", "invalid chunk size"),
        ("\r\nhello\r\n0\r\n\r\n", "missing chunk size"),
        ("5\r\r\nhello\r\n0\r\n\r\n", "CR without LF in chunked framing"),
        ("5\r\nhelloXX0\r\n\r\n", "chunk data not followed by CRLF"),
    ] {
        let got = Received::parse(&exchange(baton.proxy, &request("GET", chunked, body)).await, false);
        let text = String::from_utf8_lossy(got.body.as_deref().unwrap_or_default()).into_owned();
        assert!(
            got.status == 400 && text.contains(fault),
            "{body:?} is refused for {fault}: {got:?}"
        );
    }
}

/// A method longer than 32 bytes gets 501 naming the limit even when it is long enough to
/// push the head past `max_header_bytes` (which hyper alone answers 431). The witness: a
/// head that long for another reason still gets 431.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_of_100000_bytes_gets_501() {
    let baton = Baton::start("").await;
    let long = [vec![b'M'; 100_000], b" http://a/ HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()].concat();
    let got = Received::parse(&exchange(baton.proxy, &long).await, false);
    let text = String::from_utf8_lossy(got.body.as_deref().unwrap_or_default()).into_owned();
    assert!(
        got.status == 501 && text.contains("method longer than 32 bytes"),
        "{got:?}"
    );
    let field = format!(
        "GET http://a/ HTTP/1.1\r\nHost: a\r\nX: {}\r\n\r\n",
        "y".repeat(100_000)
    );
    let got = Received::parse(&exchange(baton.proxy, field.as_bytes()).await, false);
    assert_eq!(
        got.status, 431,
        "witness: a head over the limit for its fields: {got:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Finding 5: the failed-login budget

/// The value of `name` (a metric without labels) on the admin listener's `/metrics`.
async fn metric(admin: SocketAddr, name: &str) -> f64 {
    let mut s = TcpStream::connect(admin).await.expect("connect to admin");
    // The admin listener answers only a Host that names it.
    let ask = format!("GET /metrics HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    s.write_all(ask.as_bytes()).await.expect("ask for /metrics");
    let mut text = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut text))
        .await
        .expect("/metrics in time")
        .expect("read /metrics");
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics:\n{text}"))
}

/// A baton whose htpasswd has `alice` (cost 5, `htpasswd -B`'s default) with password
/// `right`, the default budget (10 failures a minute), an admin listener, and `extra`.
async fn baton_with_users(extra: &str) -> (Baton, SocketAddr) {
    let (dir, users) = common::dir_with_users();
    let extra = format!(
        "[access]\nhtpasswd = \"{}\"\n\n[admin]\naddress = \"127.0.0.1:0\"\n\n{extra}",
        users.display()
    );
    let baton = Baton::start_in(dir, std::path::Path::new(common::BATON), &extra, &[]).await;
    let admin = common::listener_addr(&baton.status().await, "admin");
    (baton, admin)
}

/// A request to `origin` with `authorization` as its Proxy-Authorization value.
fn with_auth(origin: SocketAddr, authorization: &str) -> Vec<u8> {
    format!(
        "GET http://{origin}/bytes?n=10 HTTP/1.1\r\nHost: {origin}\r\nProxy-Authorization: {authorization}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes()
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine as _;
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    format!("Basic {token}")
}

/// The status of the answer to `request` over any stream.
async fn status_over<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, request: &[u8]) -> u16 {
    s.write_all(request).await.expect("send");
    let mut all = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut all))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    let head = String::from_utf8_lossy(&all);
    head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
}

/// Counts the statuses of 40 wrong logins sent at once, each on its own connection that
/// `connect` opens: (407s, 429s).
async fn forty_at_once<S, F, Fut>(connect: F, request: Vec<u8>) -> (usize, usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = S>,
{
    let mut streams = Vec::new();
    for _ in 0..40 {
        streams.push(connect().await);
    }
    // Every connection is open before the first request is written: they race for real.
    let tries: Vec<_> = streams
        .into_iter()
        .map(|s| {
            let request = request.clone();
            tokio::spawn(async move { status_over(s, &request).await })
        })
        .collect();
    let (mut denied, mut limited) = (0, 0);
    for t in tries {
        match t.await.expect("a try") {
            407 => denied += 1,
            429 => limited += 1,
            other => panic!("a wrong login answered {other}"),
        }
    }
    (denied, limited)
}

/// 40 wrong logins sent in parallel from one client: the budget (10) is reserved before
/// bcrypt runs, so exactly 10 run bcrypt (407) and 30 are refused before it (429). A right
/// password from another address is still served (the budget is the client's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_wrong_logins_cannot_overrun_the_budget() {
    let origin = testkit::start_origin().await.expect("origin");
    let (baton, admin) = baton_with_users("").await;
    let before = metric(admin, "baton_auth_checks_total").await;
    let wrong = with_auth(origin, &basic("alice", "wrong"));
    let (denied, limited) = forty_at_once(|| async { TcpStream::connect(baton.proxy).await.unwrap() }, wrong).await;
    let checks = metric(admin, "baton_auth_checks_total").await - before;
    println!("40 parallel wrong logins: {denied} × 407, {limited} × 429, {checks} bcrypt runs");
    assert_eq!(
        (denied, limited),
        (10, 30),
        "the budget of 10 holds under parallel attempts"
    );
    assert_eq!(checks, 10.0, "bcrypt ran once per 407, never for a 429");
    let right = with_auth(origin, &basic("alice", "right"));
    let from_other = tokio::net::TcpSocket::new_v4().expect("socket");
    from_other.bind("127.0.0.2:0".parse().unwrap()).expect("bind 127.0.0.2");
    let s = from_other.connect(baton.proxy).await.expect("connect from 127.0.0.2");
    assert_eq!(status_over(s, &right).await, 200, "another client's budget is its own");
}

/// Credentials are remembered by what they decode to: spellings of one header that differ
/// in case and whitespace do not run bcrypt again. The witness: the first login ran it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spellings_of_one_credential_run_bcrypt_once() {
    let origin = testkit::start_origin().await.expect("origin");
    let (baton, admin) = baton_with_users("").await;
    let start = metric(admin, "baton_auth_checks_total").await;
    let good = basic("alice", "right");
    let token = good.strip_prefix("Basic ").expect("token");
    let connect = || TcpStream::connect(baton.proxy);
    assert_eq!(
        status_over(connect().await.unwrap(), &with_auth(origin, &good)).await,
        200
    );
    let first = metric(admin, "baton_auth_checks_total").await - start;
    assert_eq!(first, 1.0, "witness: the first login ran bcrypt once");
    for spelling in [
        format!("basic {token}"),
        format!("BASIC  {token}"),
        format!("Basic \t{token} "),
    ] {
        let status = status_over(connect().await.unwrap(), &with_auth(origin, &spelling)).await;
        assert_eq!(status, 200, "{spelling:?} is the same credential");
    }
    let after = metric(admin, "baton_auth_checks_total").await - start;
    assert_eq!(after, 1.0, "no spelling of a remembered credential ran bcrypt again");
}

/// Clients of a Unix-socket listener have a budget too (one, shared): 40 wrong logins at once
/// over the socket get 10 × 407 and 30 × 429, and bcrypt runs 10 times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unix_socket_clients_have_a_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("local.sock");
    let listener = format!("[[listener]]\nname = \"local\"\npath = \"{}\"\n", socket.display());
    let (baton, admin) = baton_with_users(&listener).await;
    let before = metric(admin, "baton_auth_checks_total").await;
    let wrong = with_auth("127.0.0.1:9".parse().unwrap(), &basic("alice", "wrong"));
    let connect = || async {
        tokio::net::UnixStream::connect(&socket)
            .await
            .expect("connect to the socket")
    };
    let (denied, limited) = forty_at_once(connect, wrong).await;
    let checks = metric(admin, "baton_auth_checks_total").await - before;
    println!("40 parallel wrong logins over a Unix socket: {denied} × 407, {limited} × 429, {checks} bcrypt runs");
    assert_eq!((denied, limited), (10, 30), "Unix-socket clients share a budget of 10");
    assert_eq!(checks, 10.0, "bcrypt ran once per 407");
    drop(baton);
}

// ---------------------------------------------------------------------------------------------
// Finding 6: the access log's file, secret files, secrets in the logs

/// Runs `baton run` on `config` (written to `<dir>/baton.toml`) and expects it to fail
/// before serving: returns its stderr. Panics if it is still running after [`WAIT`].
fn run_expecting_failure(dir: &std::path::Path, config: &str) -> String {
    let path = dir.join("baton.toml");
    std::fs::write(&path, config).expect("write config");
    let mut child = std::process::Command::new(common::BATON)
        .args(["run", "--config"])
        .arg(&path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn baton");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("baton started although it should have refused {config}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    assert!(!out.status.success(), "baton must exit non-zero");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A symlink planted at the access log's path makes start fail with a message naming the
/// path; the file the symlink names is unchanged. The witness: with the symlink gone, the
/// same configuration starts and writes its log there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_at_the_access_log_path_stops_the_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let target = dir.path().join("precious");
    std::fs::write(&target, "precious\n").expect("write target");
    std::os::unix::fs::symlink(&target, &log).expect("plant symlink");
    let extra = format!("[log]\naccess = \"{}\"\n", log.display());
    let err = run_expecting_failure(dir.path(), &common::config_text(dir.path(), &extra));
    assert!(
        err.contains(&log.display().to_string()) && err.contains("symbolic link"),
        "the error names the path and why: {err}"
    );
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "precious\n",
        "the symlink's target is unchanged"
    );
    std::fs::remove_file(&log).expect("remove symlink");
    let baton = Baton::start_in(dir, std::path::Path::new(common::BATON), &extra, &[]).await;
    assert!(
        log.is_file(),
        "witness: without the symlink baton starts and opens its log"
    );
    drop(baton);
}

/// After a rotation (the log renamed), a symlink planted at the path is not followed: baton
/// warns, naming the path, and writes on to the rotated file; the symlink's target is
/// unchanged. The witness: the rotated file gets the next request's line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_symlink_planted_after_rotation_is_not_followed() {
    let origin = testkit::start_origin().await.expect("origin");
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let rotated = dir.path().join("access.log.1");
    let target = dir.path().join("precious");
    std::fs::write(&target, "precious\n").expect("write target");
    let extra = format!("[log]\naccess = \"{}\"\n", log.display());
    let baton = Baton::start_in(dir, std::path::Path::new(common::BATON), &extra, &[]).await;
    let first = exchange(baton.proxy, &get(origin, "/bytes?n=1", "GET")).await;
    assert!(first.starts_with(b"HTTP/1.1 200"), "a first request");
    std::fs::rename(&log, &rotated).expect("rotate");
    std::os::unix::fs::symlink(&target, &log).expect("plant symlink");
    let warned = common::wait_for(WAIT, "the reopen's warning", || {
        let text = baton.log();
        async move {
            text.lines()
                .find(|l| l.contains("cannot reopen the access log"))
                .map(str::to_string)
        }
    })
    .await;
    assert!(
        warned.contains(&log.display().to_string()) && warned.contains("symbolic link"),
        "the warning names the path and why: {warned}"
    );
    let second = exchange(baton.proxy, &get(origin, "/bytes?n=2", "GET")).await;
    assert!(second.starts_with(b"HTTP/1.1 200"), "a second request");
    common::wait_for(WAIT, "the second line in the rotated file", || {
        let text = std::fs::read_to_string(&rotated).unwrap_or_default();
        async move { text.contains("/bytes?n=2").then_some(()) }
    })
    .await;
    assert_eq!(
        std::fs::read_to_string(&target).unwrap(),
        "precious\n",
        "the symlink's target is unchanged"
    );
}

/// A secret file others may read stops the start, naming the file, its mode and the key
/// that allows it; the key lets it start (with a warning), and mode 0600 starts without one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_htpasswd_others_may_read_stops_the_start() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let htpasswd = dir.path().join("htpasswd");
    std::fs::write(&htpasswd, format!("alice:{}\n", bcrypt::hash("right", 4).unwrap())).expect("write");
    std::fs::set_permissions(&htpasswd, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let extra = format!("[access]\nhtpasswd = \"{}\"\n", htpasswd.display());
    let config = common::config_text(dir.path(), &extra);
    let err = run_expecting_failure(dir.path(), &config);
    let path = htpasswd.display().to_string();
    for part in [path.as_str(), "mode 0644", "secrets_readable_by_others"] {
        assert!(err.contains(part), "the error names {part:?}: {err}");
    }
    let allowed = format!("secrets_readable_by_others = true\n{config}");
    let baton = Baton::start_wrapped(dir, &allowed, &[], None).await;
    assert!(
        baton.log().contains("mode 0644 lets others read"),
        "the key allows it, with a warning: {}",
        baton.log()
    );
}

/// A TLS key others may read fails `baton check` (and a start) naming the file; 0640 (a
/// group such as ssl-cert) passes.
#[test]
fn a_tls_key_others_may_read_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = testkit::TestCa::new().expect("ca");
    let (cert, key) = ca
        .write_leaf(dir.path(), "proxy", 7, Duration::from_secs(86400))
        .expect("leaf");
    let tls = format!(
        "[[listener]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let config = dir.path().join("baton.toml");
    std::fs::write(&config, common::config_text(dir.path(), &tls)).expect("config");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (ok, out) = common::check_config(&config);
    assert!(
        !ok && out.contains(&key.display().to_string()) && out.contains("mode 0644"),
        "{out}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let (ok, out) = common::check_config(&config);
    assert!(ok, "group read is allowed: {out}");
}

/// The secrets a request carries: userinfo in its target, `Proxy-Authorization` (good and
/// wrong) and `Authorization`.
const SECRETS: [&str; 4] = ["secret-ui-41", "pw-Zq9x", "pw-wrong-88", "tok-Authz-77"];

/// Sends one request with each kind of secret (answered 200), one with wrong credentials
/// (407) and a CONNECT with userinfo (400).
async fn send_secrets(proxy: SocketAddr, origin: SocketAddr) {
    let target = format!("http://user:secret-ui-41@{origin}/bytes?n=3");
    let with = |credentials: &str| {
        format!(
            "GET {target} HTTP/1.1\r\nHost: {origin}\r\nProxy-Authorization: {credentials}\r\nAuthorization: Bearer tok-Authz-77\r\nConnection: close\r\n\r\n"
        )
    };
    let ok = exchange(proxy, with(&basic("alice", "pw-Zq9x")).as_bytes()).await;
    assert!(ok.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&ok));
    let denied = exchange(proxy, with(&basic("alice", "pw-wrong-88")).as_bytes()).await;
    assert!(
        denied.starts_with(b"HTTP/1.1 407"),
        "{}",
        String::from_utf8_lossy(&denied)
    );
    let connect = format!(
        "CONNECT user:secret-ui-41@127.0.0.1:443 HTTP/1.1\r\nHost: 127.0.0.1:443\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        basic("alice", "pw-Zq9x")
    );
    let refused = exchange(proxy, connect.as_bytes()).await;
    assert!(
        refused.starts_with(b"HTTP/1.1 400"),
        "{}",
        String::from_utf8_lossy(&refused)
    );
}

/// Neither userinfo nor credentials reach any log at BATON_LOG=trace, in every access-log
/// format (to a file, and with the operational log on stderr), while the request itself is
/// logged (the witness: the line with the target's host, port and path is there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_the_logs() {
    use base64::Engine as _;
    let origin = testkit::start_origin().await.expect("origin");
    let encoded: Vec<String> = ["alice:pw-Zq9x", "alice:pw-wrong-88"]
        .iter()
        .map(|c| base64::engine::general_purpose::STANDARD.encode(c))
        .collect();
    for (format, to_file) in [("text", true), ("json", true), ("squid", true), ("text", false)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let htpasswd = dir.path().join("htpasswd");
        testkit::write_secret(&htpasswd, format!("alice:{}\n", bcrypt::hash("pw-Zq9x", 4).unwrap())).expect("htpasswd");
        let access = dir.path().join("access.log");
        let sink = if to_file {
            access.display().to_string()
        } else {
            "stderr".into()
        };
        let extra = format!(
            "[access]\nhtpasswd = \"{}\"\n\n[log]\naccess = \"{sink}\"\naccess_format = \"{format}\"\n",
            htpasswd.display()
        );
        let config = common::config_text(dir.path(), &extra);
        let baton = Baton::start_wrapped(dir, &config, &["env", "BATON_LOG=trace"], None).await;
        send_secrets(baton.proxy, origin).await;
        let witness = format!("{origin}/bytes?n=3");
        let logs = common::wait_for(WAIT, "the request's access line", || {
            let logs = format!(
                "{}\n{}",
                std::fs::read_to_string(&access).unwrap_or_default(),
                baton.log()
            );
            let seen = logs.contains(&witness) && logs.contains("CONNECT");
            async move { seen.then_some(logs) }
        })
        .await;
        for secret in SECRETS.iter().copied().chain(encoded.iter().map(String::as_str)) {
            assert!(
                !logs.contains(secret),
                "{format} (file: {to_file}): {secret:?} is in the logs:\n{logs}"
            );
        }
        println!(
            "{format} (file: {to_file}): {} log bytes, the request logged, no secret",
            logs.len()
        );
        if std::env::var_os("SHOW_LOGS").is_some() {
            println!("{logs}");
        }
    }
}
