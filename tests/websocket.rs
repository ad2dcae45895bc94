//! WebSockets through absolute-form requests (issue 24): a client with an HTTP proxy
//! configured sends `GET http://origin/ws` with `Upgrade: websocket`; baton forwards the
//! switch under the request's rules, relays the origin's 101 and then the frames both ways,
//! as a tunnel that moves at a handoff. A refused or stripped upgrade gets an ordinary
//! answer, and its connection goes on.

mod common;

use std::time::Duration;

use baton::control::{self, Event, Request};
use common::{Baton, testkit, wait_for};
use testkit::websocket;
use tokio::io::AsyncWriteExt;

const STOP: Duration = Duration::from_secs(10);

/// `baton upgrade`; panics with the log's tail unless it succeeded.
async fn handoff(baton: &Baton) {
    let mut last = None;
    control::events(&baton.control, Request::Upgrade { wait_drain: false }, |e| {
        last = Some(e)
    })
    .await
    .expect("control socket");
    assert!(
        matches!(last, Some(Event::Done(_))),
        "upgrade failed: {last:?}\n{}",
        baton.log()
    );
}

/// The access line of the upgraded connection, once it has ended.
async fn upgrade_line(baton: &Baton, path: &str) -> String {
    wait_for(
        Duration::from_secs(5),
        "the upgraded connection's access line",
        || async {
            baton
                .log()
                .lines()
                .find(|l| l.contains(path) && l.contains("outcome="))
                .map(str::to_string)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_through_an_absolute_form_request_echoes_a_thousand_messages() {
    let origin = websocket::start_echo().await.expect("echo server");
    let mut baton = Baton::start("").await;
    let mut ws = websocket::open(baton.proxy, origin, "/chat")
        .await
        .expect("switched through baton");
    websocket::echo_messages(&mut ws, 1000, "one")
        .await
        .expect("every message echoed in order");
    websocket::close(ws).await.expect("a clean close");
    let line = upgrade_line(&baton, "/chat").await;
    assert_eq!(field(&line, "method"), "GET", "the request's line: {line}");
    assert_eq!(field(&line, "status"), "101", "with the 101: {line}");
    // 1,000 messages each way ("one message N": 13-15 bytes, plus a 6-byte client frame
    // head; the server's heads are 2 bytes).
    let up: u64 = field(&line, "bytes_in").parse().unwrap_or(0);
    let down: u64 = field(&line, "bytes_out").parse().unwrap_or(0);
    assert!(up > 19_000 && down > 15_000, "the frames counted both ways: {line}");
    baton.stop(STOP).await;
}

/// A client library with the proxy configured (Python's aiohttp, which sends absolute-form
/// requests for `ws://` URLs): 1,000 messages, and the access line says it was the GET.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aiohttp_through_baton_as_its_http_proxy_echoes_a_thousand_messages() {
    let origin = websocket::start_echo().await.expect("echo server");
    let mut baton = Baton::start("").await;
    let (proxy, url) = (format!("http://{}", baton.proxy), format!("ws://{origin}/aiohttp"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ws_client.py");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &proxy, &url, "1000"])
            .output()
    })
    .await
    .unwrap()
    .expect("python3 runs (aiohttp is installed by .ci/run)");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success() && said.contains("echoed 1000"), "aiohttp: {said}");
    let line = upgrade_line(&baton, "/aiohttp").await;
    assert_eq!(
        field(&line, "method"),
        "GET",
        "an absolute-form upgrade, not a CONNECT: {line}"
    );
    assert_eq!(field(&line, "status"), "101", "{line}");
    baton.stop(STOP).await;
}

/// An allowed upgrade the origin does not take (it answers 200): the answer is relayed as
/// usual and the connection takes the next request. The origin saw the `Upgrade`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_the_origin_declines_is_an_ordinary_answer() {
    let mut baton = Baton::start("").await;
    let seen = upgrade_then_next(&baton).await;
    assert!(seen.contains("upgrade: websocket"), "the switch was forwarded: {seen}");
    baton.stop(STOP).await;
}

/// Sends a WebSocket handshake to the origin's `/headers` (which answers 200 whatever the
/// request asks) and a second request behind it on the same connection: asserts that both
/// are answered, and returns the request fields the origin saw (lowercase).
async fn upgrade_then_next(baton: &Baton) -> String {
    let http = testkit::start_origin().await.expect("origin");
    let mut s = testkit::connect_tcp(baton.proxy).await.unwrap();
    let head = format!(
        "GET http://{http}/headers HTTP/1.1\r\nHost: {http}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\
         GET http://{http}/bytes?n=5 HTTP/1.1\r\nHost: {http}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let (first, seen) = testkit::read_response(&mut s).await.expect("first answer");
    assert!(first.starts_with("HTTP/1.1 200"), "an ordinary answer: {first}");
    let (second, body) = testkit::read_response(&mut s).await.expect("second answer");
    assert!(
        second.starts_with("HTTP/1.1 200") && body.len() == 5,
        "the next request on the connection, answered: {second}"
    );
    String::from_utf8_lossy(&seen).to_ascii_lowercase()
}

/// A rule that denies the origin's port: 403 from baton, and the origin never sees a
/// connection. The witness: the same upgrade to an allowed port switches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_upgrade_gets_403_and_reaches_no_origin() {
    let allowed = websocket::start_echo().await.expect("echo server");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let denied = listener.local_addr().unwrap();
    let config = format!(
        "[access]\n[[access.rule]]\nname = \"no-{p}\"\naction = \"deny\"\nports = [{p}]\n\n\
         [[access.rule]]\nname = \"rest\"\naction = \"allow\"\n",
        p = denied.port()
    );
    let mut baton = Baton::start(&config).await;
    let err = websocket::open(baton.proxy, denied, "/ws").await.expect_err("refused");
    assert!(err.to_string().contains("403"), "baton's refusal: {err}");
    // The rules decide before any connect: had baton connected, the connection would wait
    // in the listener's queue before the 403 was written.
    let accepted = listener.accept();
    assert!(
        accepted
            .as_ref()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the denied origin got a connection: {accepted:?}"
    );
    let mut ws = websocket::open(baton.proxy, allowed, "/ws")
        .await
        .expect("the allowed one switches");
    websocket::echo_messages(&mut ws, 3, "witness").await.expect("echo");
    websocket::close(ws).await.expect("close");
    baton.stop(STOP).await;
}

/// `upgrade_protocols = []`: `Upgrade` is stripped (the origin sees a plain GET) and its
/// ordinary answer is relayed; the connection takes the next request. The witness: the
/// default configuration switches (the first test), and the origin sees the handshake's
/// other fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_not_allowed_is_stripped_and_the_connection_goes_on() {
    let mut baton = Baton::start("[access]\nupgrade_protocols = []\n").await;
    let seen = upgrade_then_next(&baton).await;
    assert!(seen.contains("sec-websocket-key"), "the origin got the request: {seen}");
    assert!(
        !seen.contains("upgrade"),
        "without Upgrade, nor Connection naming it: {seen}"
    );
    baton.stop(STOP).await;
}

/// 10 WebSocket sessions exchange messages across 5 handoffs: each moves with its tunnel,
/// and every message comes back in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_move_at_a_handoff_with_every_message_in_order() {
    let origin = websocket::start_echo().await.expect("echo server");
    let mut baton = Baton::start("[timeouts]\ndrain = \"10s\"\n").await;
    let mut sockets = Vec::new();
    for _ in 0..10 {
        sockets.push(websocket::open(baton.proxy, origin, "/moving").await.expect("switched"));
    }
    for round in 0..5 {
        handoff(&baton).await;
        for (i, ws) in sockets.iter_mut().enumerate() {
            websocket::echo_messages(ws, 20, &format!("round {round} socket {i}"))
                .await
                .expect("echoed in order after the handoff");
        }
    }
    let status = baton.status().await;
    assert_eq!(
        status["adopted_tunnels"], 10,
        "the last generation adopted all 10: {status}"
    );
    for ws in sockets {
        websocket::close(ws).await.expect("a clean close after 5 handoffs");
    }
    let line = upgrade_line(&baton, "/moving").await;
    assert_eq!(
        field(&line, "status"),
        "101",
        "one line at the real end, with the 101: {line}"
    );
    baton.stop(STOP).await;
}

/// The value of `key=` in an access line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    let at = format!(" {key}=");
    line.split(&at)
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or("")
}
