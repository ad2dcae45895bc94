//! The admin listener against the real binary over raw TCP (issue 31, finding 7): a `Host`
//! that does not name it (DNS rebinding) is 421, a client outside `[admin] allow_clients` is
//! 403, a `[admin] token_file` makes every path but `/healthz` 401 without the token, and
//! `[admin] max_connections` closes connections beyond it. Each refusal has its positive
//! witness under the same conditions.

mod common;

use std::net::{IpAddr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use common::{BATON, Baton, listener_addr, testkit, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// How long any one exchange may take.
const WAIT: Duration = Duration::from_secs(10);

/// Starts baton with `[admin]` on an ephemeral loopback port plus `admin_keys`, in `dir`.
async fn start(dir: tempfile::TempDir, admin_keys: &str) -> (Baton, SocketAddr) {
    let extra = format!("[admin]\naddress = \"127.0.0.1:0\"\n{admin_keys}\n");
    let baton = Baton::start_in(dir, Path::new(BATON), &extra, &[]).await;
    let admin = listener_addr(&baton.status().await, "admin");
    (baton, admin)
}

/// A connection to `admin` from `source` (an address of 127.0.0.0/8).
async fn connect_from(source: IpAddr, admin: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(source, 0))
        .expect("bind the source address");
    tokio::time::timeout(WAIT, socket.connect(admin))
        .await
        .expect("connect timed out")
        .expect("connect to the admin listener")
}

/// One request on `s` (keep-alive); its status code, head and body.
async fn exchange(s: &mut TcpStream, path: &str, headers: &str) -> (u16, String, String) {
    let request = format!("GET {path} HTTP/1.1\r\n{headers}\r\n");
    s.write_all(request.as_bytes()).await.expect("send the request");
    let (head, body) = tokio::time::timeout(WAIT, testkit::read_response(s))
        .await
        .expect("no answer in time")
        .unwrap_or_else(|e| panic!("no answer to {path} with {headers:?}: {e}"));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {head}"));
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

/// One request on a fresh connection from 127.0.0.1 with `Host: <admin>` and `headers`.
async fn get(admin: SocketAddr, path: &str, headers: &str) -> (u16, String, String) {
    let mut s = connect_from("127.0.0.1".parse().unwrap(), admin).await;
    exchange(&mut s, path, &format!("Host: {admin}\r\n{headers}")).await
}

#[tokio::test]
async fn a_host_that_does_not_name_the_admin_listener_is_misdirected() {
    let (baton, admin) = start(tempfile::tempdir().unwrap(), "hosts = [\"admin.test\"]").await;
    let mut s = connect_from("127.0.0.1".parse().unwrap(), admin).await;
    let (status, _, body) = exchange(&mut s, "/status.json", "Host: evil.example\r\n").await;
    assert_eq!(status, 421, "a rebinding page's Host must be refused: {body}");
    assert!(body.contains("[admin] hosts"), "the reason names the key: {body}");
    let (status, _, body) = exchange(&mut s, "/metrics", "Host: evil.example:80\r\n").await;
    assert_eq!(status, 421, "with a port too: {body}");
    // Positive witnesses on the same connection: its own address, localhost, a listed name.
    for host in [
        admin.to_string(),
        "localhost".into(),
        format!("localhost:{}", admin.port()),
        "admin.test".into(),
    ] {
        let (status, _, body) = exchange(&mut s, "/metrics", &format!("Host: {host}\r\n")).await;
        assert_eq!(status, 200, "Host {host} names the admin listener: {body}");
        assert!(body.contains("baton_"), "metrics for Host {host}: {body}");
    }
    drop(baton);
}

#[tokio::test]
async fn a_token_file_guards_everything_but_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let token = "admin-token-0123456789abcdef";
    let path = dir.path().join("admin.token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (baton, admin) = start(dir, "token_file = \"admin.token\"").await;
    for path in ["/metrics", "/status", "/", "/status.json"] {
        let (status, head, body) = get(admin, path, "").await;
        assert_eq!(status, 401, "{path} without the token: {body}");
        let head = head.to_ascii_lowercase();
        assert!(
            head.contains("www-authenticate: bearer"),
            "{path}: a Bearer challenge: {head}"
        );
        assert!(body.contains("token_file"), "{path}: the reason names the key: {body}");
        let (status, _, body) = get(admin, path, "Authorization: Bearer wrong-token-0123456789abc\r\n").await;
        assert_eq!(status, 401, "{path} with a wrong token: {body}");
        let (status, _, body) = get(admin, path, &format!("Authorization: Bearer {token}\r\n")).await;
        assert_eq!(status, 200, "{path} with the token: {body}");
    }
    let (status, _, body) = get(admin, "/healthz", "").await;
    assert_eq!((status, body.as_str()), (200, "serving\n"), "/healthz needs no token");
    // A browser: the token as the Basic password (curl -u, as a browser's prompt sends it).
    let url = format!("http://{admin}/status.json");
    let (ok, out, err) = common::curl(&["-f", "-u", &format!("me:{token}"), &url]);
    assert!(ok, "Basic with the token as password: {err}");
    assert!(
        String::from_utf8_lossy(&out).contains("\"generation\""),
        "the status document"
    );
    drop(baton);
}

#[tokio::test]
async fn a_token_file_open_to_others_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.token");
    std::fs::write(&path, "admin-token-0123456789abcdef\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("baton.toml");
    let extra = "[admin]\naddress = \"127.0.0.1:0\"\ntoken_file = \"admin.token\"\n";
    std::fs::write(&config, common::config_text(dir.path(), extra)).unwrap();
    let (ok, out) = common::check_config(&config);
    assert!(!ok, "a world-readable token file must be refused: {out}");
    assert!(
        out.contains(&path.display().to_string()) && out.contains("0644"),
        "names file and mode: {out}"
    );
    assert!(!out.contains("0123456789abcdef"), "never shows the token: {out}");
    // The witness: the same file, closed to others, is accepted.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let (ok, out) = common::check_config(&config);
    assert!(ok, "mode 0640 is fine: {out}");
}

#[tokio::test]
async fn a_client_outside_allow_clients_is_refused() {
    let (baton, admin) = start(tempfile::tempdir().unwrap(), "allow_clients = [\"127.0.0.2/32\"]").await;
    let host = format!("Host: {admin}\r\n");
    let mut s = connect_from("127.0.0.1".parse().unwrap(), admin).await;
    let (status, head, body) = exchange(&mut s, "/healthz", &host).await;
    assert_eq!(status, 403, "127.0.0.1 is not in allow_clients: {body}");
    assert!(
        body.contains("[admin] allow_clients"),
        "the reason names the key: {body}"
    );
    assert!(head.to_ascii_lowercase().contains("connection: close"), "{head}");
    let mut allowed = connect_from("127.0.0.2".parse().unwrap(), admin).await;
    let (status, _, body) = exchange(&mut allowed, "/metrics", &host).await;
    assert_eq!(status, 200, "127.0.0.2 is allowed: {body}");
    drop(baton);
}

/// Whether the admin listener closes `s` without a byte of answer to a request.
async fn closed_unanswered(s: &mut TcpStream, admin: SocketAddr) -> bool {
    let request = format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\n\r\n");
    let _ = s.write_all(request.as_bytes()).await;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(WAIT, s.read(&mut byte)).await {
        Ok(Ok(0)) | Ok(Err(_)) => true,
        Ok(Ok(_)) => false,
        Err(_) => panic!("neither answered nor closed within {WAIT:?}"),
    }
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed() {
    let (baton, admin) = start(tempfile::tempdir().unwrap(), "max_connections = 2").await;
    let host = format!("Host: {admin}\r\n");
    let me: IpAddr = "127.0.0.1".parse().unwrap();
    // Two keep-alive connections, each answered: the listener holds both.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = connect_from(me, admin).await;
        assert_eq!(exchange(&mut s, "/healthz", &host).await.0, 200, "within the limit");
        held.push(s);
    }
    let mut third = connect_from(me, admin).await;
    assert!(
        closed_unanswered(&mut third, admin).await,
        "a third connection must be closed"
    );
    // The witness: once one closes, its slot serves a new connection.
    drop(held.pop());
    let served = wait_for(WAIT, "a freed admin slot", || async {
        let mut s = connect_from(me, admin).await;
        (!closed_unanswered(&mut s, admin).await).then_some(())
    })
    .await;
    assert_eq!(served, ());
    drop((held, baton));
}
