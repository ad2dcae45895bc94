//! Closing a connection with requests unread (RFC 9112 §9.6), against the real binary on
//! loopback. A server that closes a socket with bytes unread in it sends a reset, and a
//! reset discards what the server's kernel had not sent yet: the answer that said
//! `Connection: close` arrives cut. baton closes the way nginx's `lingering_close` does: the
//! write side first, then what the client still sends is read and discarded for a bounded
//! time.

mod common;

use std::time::{Duration, Instant};

use common::{Baton, testkit};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Each answer's body: larger than a loopback socket's buffers hold at first, so that much
/// of the last answer is still in baton's kernel when it closes.
const BODY: usize = 1 << 20;

/// How the slow client reads: a chunk, then a pause (about 12 MB/s).
const CHUNK: usize = 64 * 1024;
const PAUSE: Duration = Duration::from_millis(5);

/// Everything the client reads until the connection ends, and how it ended (`Ok` for a FIN,
/// the error for a reset).
async fn read_slowly(s: &mut tokio::net::tcp::OwnedReadHalf, within: Duration) -> (Vec<u8>, Result<(), String>) {
    let deadline = Instant::now() + within;
    let mut all = Vec::new();
    let mut chunk = vec![0u8; CHUNK];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Ok(Ok(0)) => return (all, Ok(())),
            Ok(Ok(n)) => all.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return (all, Err(format!("read: {e}"))),
            Err(_) => return (all, Err(format!("still open after {within:?}"))),
        }
        tokio::time::sleep(PAUSE).await;
    }
}

/// The answers in `bytes`, in order: (head, whole body?) each.
fn answers(mut bytes: &[u8]) -> Vec<(String, bool)> {
    let mut out = Vec::new();
    while let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end + 4]).to_ascii_lowercase();
        let len = testkit::content_length(&head).unwrap_or(0);
        let whole = bytes.len() >= end + 4 + len;
        out.push((head, whole));
        bytes = &bytes[(end + 4 + len).min(bytes.len())..];
    }
    out
}

/// A client pipelines 32 requests for 1 MiB each, then a 1 MiB POST, and reads slowly. A
/// handoff (the successor takes no connections: `migrate = false`) makes the answer in
/// flight the last, with `Connection: close`, while the rest of the pipeline is unread. Every
/// answer baton sent arrives whole, the last one says `Connection: close`, and the connection
/// ends with a FIN, not a reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_answer_arrives_whole_behind_a_pipeline_left_unread() {
    let origin = testkit::start_origin().await.expect("origin");
    let baton = Baton::start("").await;
    baton.set_top_level("migrate = false");
    let (mut rd, mut wr) = TcpStream::connect(baton.proxy).await.expect("connect").into_split();
    let get = format!("GET http://{origin}/bytes?n={BODY} HTTP/1.1\r\nHost: {origin}\r\n\r\n");
    let post = format!("POST http://{origin}/sha256 HTTP/1.1\r\nHost: {origin}\r\nContent-Length: {BODY}\r\n\r\n");
    let mut pipeline = get.repeat(32).into_bytes();
    pipeline.extend_from_slice(post.as_bytes());
    pipeline.resize(pipeline.len() + BODY, b'x');
    // The write may stop part way (baton reads no request after the last): not an error.
    let writer = tokio::spawn(async move {
        let wrote = wr.write_all(&pipeline).await;
        (wr, wrote)
    });
    let mut first = vec![0u8; 1];
    rd.read_exact(&mut first).await.expect("the first answer starts");
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "the handoff that makes the answer in flight the last: {out}");
    let (bytes, end) = read_slowly(&mut rd, Duration::from_secs(30)).await;
    let mut all = first;
    all.extend_from_slice(&bytes);
    let got = answers(&all);
    let last = got.last().expect("at least one answer");
    let summary = format!("{} answers, {} bytes, ended {end:?}", got.len(), all.len());
    assert!(got.len() < 33, "the pipeline was cut short by the handoff: {summary}");
    assert!(
        got.iter()
            .all(|(head, whole)| head.starts_with("http/1.1 200") && *whole),
        "every answer sent arrives whole (a reset would cut the last): {summary}"
    );
    assert!(
        last.0.contains("connection: close"),
        "the last answer says so: {summary}\n{}",
        last.0
    );
    assert_eq!(end, Ok(()), "the connection ends with a FIN, not a reset: {summary}");
    drop(writer.await.expect("writer"));
    eprintln!("{summary}");
}
