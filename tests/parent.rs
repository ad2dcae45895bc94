//! Parent proxies (`[upstream]`) through the real binary: a real Squid as the parent (with
//! and without Basic authentication), a second baton as the parent, a scripted parent that
//! records what it receives, a parent that is down and one that never answers; bypass and
//! routes; handoffs of the child and of a baton parent under load.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::testkit::{Load, LoadSpec};
use common::{Baton, curl, testkit, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const MIB: usize = 1024 * 1024;

/// A Squid on 127.0.0.1 with its own configuration, logs and pid file in a temporary
/// directory, memory only (no cache_dir, nothing cached), killed when dropped. Run as root it
/// drops to `nobody`, which then owns the directory.
struct Squid {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Squid {
    /// `user`/`password`: require Basic authentication (basic_ncsa_auth, an htpasswd file
    /// made here with `openssl passwd -apr1`).
    async fn start(auth: Option<(&str, &str)>) -> Squid {
        // The port is found free and then given to Squid, which cannot take port 0: another
        // process may take it in between, so a start that cannot bind is retried.
        for _ in 0..5 {
            if let Some(s) = Squid::try_start(auth).await {
                return s;
            }
        }
        panic!("squid did not start in 5 attempts");
    }

    async fn try_start(auth: Option<(&str, &str)>) -> Option<Squid> {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let d = dir.path();
        let mut conf = format!(
            "http_port 127.0.0.1:{port}\nvisible_hostname squid-parent\npid_filename {d}/squid.pid\n\
             cache_log {d}/cache.log\nlogformat ports %>a:%>p %rm %ru %>Hs\naccess_log stdio:{d}/access.log ports\n\
             cache deny all\ncache_mem 8 MB\ncoredump_dir {d}\npinger_enable off\nnetdb_filename none\n\
             shutdown_lifetime 0 seconds\nacl lo src 127.0.0.0/8\n",
            d = d.display()
        );
        let nobody = nix::unistd::geteuid().is_root().then(|| {
            conf.push_str("cache_effective_user nobody\n");
            nix::unistd::User::from_name("nobody")
                .ok()
                .flatten()
                .expect("user nobody")
        });
        match auth {
            Some((user, password)) => {
                std::fs::write(d.join("htpasswd"), format!("{user}:{}\n", apr1(password))).unwrap();
                conf.push_str(&format!(
                    "auth_param basic program /usr/lib/squid/basic_ncsa_auth {}/htpasswd\n\
                     auth_param basic children 2\nauth_param basic realm parent\n\
                     acl authed proxy_auth REQUIRED\nhttp_access allow lo authed\n",
                    d.display()
                ));
            }
            None => conf.push_str("http_access allow lo\n"),
        }
        conf.push_str("http_access deny all\n");
        std::fs::write(d.join("squid.conf"), conf).unwrap();
        if let Some(u) = &nobody {
            // Squid writes its logs and pid file as `nobody`, in this directory.
            for entry in std::fs::read_dir(d).unwrap() {
                nix::unistd::chown(&entry.unwrap().path(), Some(u.uid), Some(u.gid)).unwrap();
            }
            nix::unistd::chown(d, Some(u.uid), Some(u.gid)).unwrap();
        }
        let child = Command::new("/usr/sbin/squid")
            .args(["-N", "-f"])
            .arg(d.join("squid.conf"))
            .arg("-n")
            .arg(format!("batontest{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("stderr")).unwrap())
            .spawn()
            .expect("/usr/sbin/squid must be installed");
        let mut squid = Squid {
            child,
            dir,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        };
        for _ in 0..1000 {
            if TcpStream::connect(squid.addr).await.is_ok() {
                return Some(squid);
            }
            if squid.child.try_wait().ok().flatten().is_some() {
                let log = squid.log();
                assert!(log.contains("Address already in use"), "squid exited:\n{log}");
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("squid did not listen within 20 s:\n{}", squid.log());
    }

    fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.path().join(f)).unwrap_or_default();
        format!("{}{}", read("cache.log"), read("stderr"))
    }

    /// The access log's lines: `client_ip:client_port method url status`.
    fn access_lines(&self) -> Vec<String> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines().map(str::to_string).collect()
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Squid {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An htpasswd hash for Squid's basic_ncsa_auth.
fn apr1(password: &str) -> String {
    let out = Command::new("openssl")
        .args(["passwd", "-apr1", password])
        .output()
        .expect("openssl must be installed");
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A `user:password` credentials file in its own directory (kept alive by the caller).
fn credentials(user: &str, password: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("parent.credentials");
    std::fs::write(&path, format!("{user}:{password}\n")).unwrap();
    (dir, path)
}

/// This host's default `Via` token for a baton on `port`.
fn token(port: u16) -> String {
    baton::proxy::policy::default_via_token(Some(port))
}

/// `[upstream] proxy = parent` (plus `more` lines in the section), and CONNECT allowed to `ports`.
fn upstream(parent: &str, more: &str, ports: &[u16]) -> String {
    format!(
        "{}\n[upstream]\nproxy = \"{parent}\"\n{more}\n",
        common::connect_ports(ports)
    )
}

/// GET `url` through `proxy` with curl: (status, head, body); interim 1xx heads skipped.
fn get(proxy: SocketAddr, url: &str, extra: &[&str]) -> (u16, String, Vec<u8>) {
    let proxy = format!("http://{proxy}");
    let mut args = vec!["-i", "-x", proxy.as_str()];
    args.extend_from_slice(extra);
    args.push(url);
    let (ok, out, err) = curl(&args);
    assert!(ok, "curl {url}: {err}");
    let mut rest = &out[..];
    loop {
        let split = rest.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head") + 4;
        let head = String::from_utf8_lossy(&rest[..split]).to_ascii_lowercase();
        let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
        if !(100..200).contains(&status) {
            return (status, head, rest[split..].to_vec());
        }
        rest = &rest[split..];
    }
}

/// The `Via` entries an origin's `/headers` answer shows, in order, joined as one list.
fn via_chain(headers: &[u8]) -> String {
    let text = String::from_utf8_lossy(headers).to_ascii_lowercase();
    let entries: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("via: ")).collect();
    entries.join(", ")
}

/// GETs and POSTs (sized and chunked) bodies of a few MiB through `proxy` to the origin,
/// each checked by SHA-256.
fn bodies_arrive_intact(proxy: SocketAddr, origin: SocketAddr, scratch: &Path) {
    for n in [1, 64 * 1024 + 7, 3 * MIB] {
        let (status, _, body) = get(proxy, &format!("http://{origin}/bytes?n={n}"), &[]);
        assert_eq!(status, 200);
        assert_eq!(
            testkit::sha256_hex(&body),
            testkit::sha256_hex(&testkit::pattern(n)),
            "GET {n}"
        );
        let (status, _, body) = get(proxy, &format!("http://{origin}/chunked?n={n}"), &[]);
        assert_eq!(status, 200);
        assert_eq!(body, testkit::pattern(n), "chunked GET {n}");
    }
    let upload = testkit::pattern(4 * MIB + 3);
    let file = scratch.join("upload.bin");
    std::fs::write(&file, &upload).unwrap();
    let expected = format!("{} {}", testkit::sha256_hex(&upload), upload.len());
    let data = format!("@{}", file.display());
    for extra in [&[][..], &["-H", "Transfer-Encoding: chunked"][..]] {
        let mut args = vec!["-X", "POST", "--data-binary", data.as_str()];
        args.extend_from_slice(extra);
        let (status, _, body) = get(proxy, &format!("http://{origin}/sha256"), &args);
        assert_eq!(status, 200, "POST {extra:?}");
        assert_eq!(
            String::from_utf8_lossy(&body),
            expected,
            "POST {extra:?} arrived altered"
        );
    }
}

/// Opens a CONNECT tunnel to `target` through `proxy`, sending `early` right behind the
/// head; returns the stream and the response head.
async fn connect(proxy: SocketAddr, target: &str, early: &[u8]) -> (TcpStream, String) {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let mut msg = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").into_bytes();
    msg.extend_from_slice(early);
    s.write_all(&msg).await.unwrap();
    let head = tokio::time::timeout(Duration::from_secs(30), testkit::read_head(&mut s))
        .await
        .expect("CONNECT answered in time")
        .unwrap();
    (s, head)
}

/// The body of a refusal after its `head` (Content-Length bytes).
async fn body_after(s: &mut TcpStream, head: &str) -> String {
    let len = testkit::content_length(head).unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body).await.unwrap();
    String::from_utf8_lossy(&body).into_owned()
}

/// `n` bytes through a CONNECT tunnel to the echo server and back, compared whole. The
/// client does not half-close before it has read everything back: Squid ends a tunnel when
/// either side closes its half.
async fn echo_through(proxy: SocketAddr, echo: SocketAddr, n: usize) {
    let (s, head) = connect(proxy, &echo.to_string(), b"").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (mut r, mut w) = s.into_split();
    let data = testkit::pattern(n);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w
    });
    let mut back = vec![0; n];
    tokio::time::timeout(Duration::from_secs(30), r.read_exact(&mut back))
        .await
        .expect("echo within 30 s")
        .unwrap();
    let _w = writer.await.unwrap();
    assert!(back == data, "tunnel bytes altered");
}

/// A port nothing listens on.
fn dead_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn squid_parent_carries_bodies_tunnels_and_pools_connections() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let squid = Squid::start(None).await;
    let child = Baton::start(&upstream(&squid.url(), "", &[echo.port()])).await;

    bodies_arrive_intact(child.proxy, origin, child.dir.path());
    echo_through(child.proxy, echo, 2 * MIB).await;

    // The Via chain at the origin: baton's entry, then Squid's.
    let (status, _, body) = get(child.proxy, &format!("http://{origin}/headers"), &[]);
    assert_eq!(status, 200);
    let chain = via_chain(&body);
    let via = format!("1.1 {}, 1.1 squid-parent (squid/", token(child.proxy.port()));
    assert!(chain.starts_with(&via), "{via} in {chain}");

    // Keep-alive and the pool: 20 requests on one client connection, then 5 client
    // connections one after another: Squid sees one connection from baton throughout.
    let before = squid.access_lines().len();
    let mut conn = testkit::ProxyConnection::open(child.proxy).await.unwrap();
    for i in 0..20 {
        let (status, body) = conn.get(&format!("http://{origin}/bytes?n={i}")).await.unwrap();
        assert_eq!((status.as_u16(), body.len()), (200, i));
    }
    drop(conn);
    for _ in 0..5 {
        wait_for(Duration::from_secs(5), "the client connection to close", || async {
            (child.status().await["active_connections"] == 0).then_some(())
        })
        .await;
        let mut conn = testkit::ProxyConnection::open(child.proxy).await.unwrap();
        let (status, _) = conn.get(&format!("http://{origin}/bytes?n=10")).await.unwrap();
        assert_eq!(status, 200);
    }
    let lines = wait_for(Duration::from_secs(5), "squid's access log", || async {
        let lines = squid.access_lines();
        (lines.len() >= before + 25).then_some(lines)
    })
    .await;
    let ports: Vec<&str> = lines[before..].iter().filter_map(|l| l.split(' ').next()).collect();
    let mut distinct = ports.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        1,
        "baton opened more than one connection to Squid: {ports:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn squid_parent_authentication() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let squid = Squid::start(Some(("baton", "parent-pw"))).await;
    let (_good_dir, good) = credentials("baton", "parent-pw");
    let (_bad_dir, bad) = credentials("baton", "wrong-pw");
    let creds = |p: &Path| format!("credentials = \"{}\"", p.display());
    let with_good = Baton::start(&upstream(&squid.url(), &creds(&good), &[echo.port()])).await;
    let with_bad = Baton::start(&upstream(&squid.url(), &creds(&bad), &[echo.port()])).await;
    let without = Baton::start(&upstream(&squid.url(), "", &[echo.port()])).await;

    let url = format!("http://{origin}/bytes?n=100000");
    let (status, _, body) = get(with_good.proxy, &url, &[]);
    assert_eq!((status, body.len()), (200, 100000));
    echo_through(with_good.proxy, echo, 100_000).await;

    let parent = format!("parent proxy {}", squid.addr);
    for (baton, why) in [
        (&with_bad, "refused baton's credentials (407)"),
        (&without, "requires authentication (407)"),
    ] {
        // The client's own credentials are not what the parent asked for: no challenge.
        let (status, head, body) = get(baton.proxy, &url, &["-H", "Proxy-Authorization: Basic Y2xpZW50OnB3"]);
        let body = String::from_utf8_lossy(&body);
        assert_eq!(status, 502, "{head}{body}");
        assert!(body.contains(&parent) && body.contains(why), "{body}");
        assert!(!head.contains("proxy-authenticate"), "{head}");
        let (mut s, head) = connect(baton.proxy, &echo.to_string(), b"").await;
        assert!(head.starts_with("HTTP/1.1 502"), "{head}");
        let body = body_after(&mut s, &head).await;
        assert!(body.contains(&parent) && body.contains(why), "{body}");
    }
    // Never logged: neither the password nor its Basic encoding.
    for baton in [&with_good, &with_bad] {
        let log = baton.log();
        for secret in ["parent-pw", "wrong-pw", "YmF0b246"] {
            assert!(!log.contains(secret), "{secret} in the log:\n{log}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn baton_parent_via_chain_pooling_and_auth() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    // The parent baton requires Basic authentication of its clients: here, the child.
    let pdir = tempfile::tempdir().unwrap();
    let htpasswd = pdir.path().join("htpasswd");
    testkit::write_secret(&htpasswd, format!("child:{}\n", bcrypt::hash("child-pw", 4).unwrap())).unwrap();
    let parent_extra = format!(
        "[access]\nconnect_ports = [{}]\nhtpasswd = \"{}\"\n",
        echo.port(),
        htpasswd.display()
    );
    let parent = Baton::start(&parent_extra).await;
    let (_cdir, creds) = credentials("child", "child-pw");
    let more = format!("credentials = \"{}\"", creds.display());
    let child = Baton::start(&upstream(&format!("http://{}", parent.proxy), &more, &[echo.port()])).await;

    bodies_arrive_intact(child.proxy, origin, child.dir.path());
    echo_through(child.proxy, echo, 2 * MIB).await;

    // Two batons on one host: different tokens, so no loop is seen, and the chain is in order.
    let (status, _, body) = get(child.proxy, &format!("http://{origin}/headers"), &[]);
    assert_eq!(status, 200);
    let via = format!("1.1 {}, 1.1 {}", token(child.proxy.port()), token(parent.proxy.port()));
    assert_eq!(via_chain(&body), via);

    // Pooling: many requests on one client connection and on a few new ones; the parent's
    // access lines show them all coming from one connection of the child's.
    let mut conn = testkit::ProxyConnection::open(child.proxy).await.unwrap();
    for i in 0..20 {
        let (status, _) = conn.get(&format!("http://{origin}/bytes?n={i}&pool")).await.unwrap();
        assert_eq!(status, 200);
    }
    drop(conn);
    for _ in 0..3 {
        wait_for(Duration::from_secs(5), "the client connection to close", || async {
            (child.status().await["active_connections"] == 0).then_some(())
        })
        .await;
        let mut conn = testkit::ProxyConnection::open(child.proxy).await.unwrap();
        assert_eq!(
            conn.get(&format!("http://{origin}/bytes?n=5&pool")).await.unwrap().0,
            200
        );
    }
    let clients = wait_for(Duration::from_secs(5), "the parent's access lines", || async {
        let log = parent.log();
        let clients: Vec<String> = log
            .lines()
            .filter(|l| l.contains("&pool"))
            .filter_map(|l| l.split("client=").nth(1)?.split_whitespace().next().map(str::to_string))
            .collect();
        (clients.len() >= 23).then_some(clients)
    })
    .await;
    let mut distinct = clients.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        1,
        "the child opened more than one connection: {clients:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scripted_parent_sees_absolute_form_and_only_batons_credentials() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut heads) = tokio::sync::mpsc::unbounded_channel::<(String, usize)>();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move { scripted_parent(&mut s, tx).await });
        }
    });
    let (_cdir, creds) = credentials("me", "pw");
    let child = Baton::start(&upstream(
        &format!("http://{addr}"),
        &format!("credentials = \"{}\"", creds.display()),
        &[443],
    ))
    .await;
    let ours = "proxy-authorization: basic bwu6chc=";
    let client_creds = ["-H", "Proxy-Authorization: Basic Y2xpZW50OnB3"];

    let (status, _, body) = get(child.proxy, "http://u:p@Example.test/a/b?c=d", &client_creds);
    assert_eq!((status, body.as_slice()), (200, &b"ok"[..]));
    let (head, _) = heads.recv().await.unwrap();
    let head = head.to_ascii_lowercase();
    assert!(
        head.starts_with("get http://example.test/a/b?c=d http/1.1\r\n"),
        "{head}"
    );
    assert!(head.contains(ours) && !head.contains("y2xpzw50"), "{head}");
    assert!(
        head.contains(&format!("via: 1.1 {}", token(child.proxy.port()))),
        "{head}"
    );
    assert!(head.contains("host: example.test\r\n"), "{head}");

    // CONNECT: the bytes the client sends right behind its head reach the parent only after
    // the parent's 200; what the parent sends behind its 200 reaches the client first.
    let (mut s, head) = connect(child.proxy, "example.test:443", b"hello").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let (phead, early) = heads.recv().await.unwrap();
    let phead = phead.to_ascii_lowercase();
    assert!(phead.starts_with("connect example.test:443 http/1.1\r\n"), "{phead}");
    assert!(phead.contains(ours) && phead.contains("via: 1.1 "), "{phead}");
    assert_eq!(early, 0, "client bytes reached the parent before its 200");
    let mut got = [0u8; 11];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&got, b"BANNERhello");
}

/// One connection of the scripted parent: for each request head, reports it (and for a
/// CONNECT, how many bytes arrived in the 300 ms before it answers); answers a GET with
/// `ok`, a CONNECT with a 200 followed by `BANNER`, then echoes.
async fn scripted_parent(s: &mut TcpStream, tx: tokio::sync::mpsc::UnboundedSender<(String, usize)>) {
    while let Ok(head) = testkit::read_head(s).await {
        if !head.starts_with("CONNECT") {
            let _ = tx.send((head, 0));
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
            continue;
        }
        let mut buf = [0u8; 64];
        let early = match tokio::time::timeout(Duration::from_millis(300), s.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            _ => 0,
        };
        let _ = tx.send((head, early));
        let _ = s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\nBANNER").await;
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
        return;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bypass_routes_and_parents_that_are_down_or_silent() {
    let origin = testkit::start_origin().await.unwrap();
    let router = Baton::start("").await;
    // A parent that accepts and never answers.
    let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut kept = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            kept.push(s);
        }
    });
    let dead = dead_port();
    let more = format!(
        "bypass = [\"127.0.0.0/8\"]\n\
         [[upstream.route]]\nhosts = [\"localhost\"]\nproxy = \"http://{}\"\n\
         [[upstream.route]]\nhosts = [\"*.silent.test\"]\nproxy = \"http://{silent_addr}\"\n\
         [timeouts]\nupstream_response = \"1s\"\n",
        router.proxy
    );
    let access = "[access]\ndeny_hosts = [\"*.denied.test\"]\ndeny_destinations = [\"10.0.0.0/8\"]\n";
    let child = Baton::start(&format!(
        "{access}[upstream]\nproxy = \"http://127.0.0.1:{dead}\"\n{more}"
    ))
    .await;
    let child_via = format!("1.1 {}", token(child.proxy.port()));

    // Bypassed: directly to the origin, one Via entry.
    let (status, _, body) = get(child.proxy, &format!("http://{origin}/headers"), &[]);
    assert_eq!((status, via_chain(&body)), (200, child_via.clone()));
    // A route: through the other baton, two Via entries.
    let url = format!("http://localhost:{}/headers", origin.port());
    let (status, _, body) = get(child.proxy, &url, &[]);
    let both = format!("{child_via}, 1.1 {}", token(router.proxy.port()));
    assert_eq!((status, via_chain(&body)), (200, both));

    // The destination rules, on what the name shows, before any parent is asked.
    for (url, why) in [
        (
            "http://www.denied.test/",
            "host www.denied.test is denied (*.denied.test)",
        ),
        ("http://10.1.2.3/", "destination 10.1.2.3 is denied (10.0.0.0/8)"),
    ] {
        let (status, _, body) = get(child.proxy, url, &[]);
        assert_eq!((status, String::from_utf8_lossy(&body).trim()), (403, why));
    }
    let (_s, head) = connect(child.proxy, "www.denied.test:443", b"").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");

    // The default parent is down: 502 naming it; baton never resolved the name itself.
    let down = format!("cannot connect to parent proxy 127.0.0.1:{dead}");
    let (status, _, body) = get(child.proxy, "http://nothing.invalid/", &[]);
    assert_eq!(status, 502);
    assert!(
        String::from_utf8_lossy(&body).contains(&down),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (mut s, head) = connect(child.proxy, "nothing.invalid:443", b"").await;
    assert!(head.starts_with("HTTP/1.1 502"), "{head}");
    assert!(body_after(&mut s, &head).await.contains(&down));

    // A silent parent: 504 naming it, for a request and for a CONNECT.
    let (status, _, body) = get(child.proxy, "http://a.silent.test/", &[]);
    let body = String::from_utf8_lossy(&body);
    assert_eq!(status, 504, "{body}");
    assert!(
        body.contains(&format!("parent proxy {silent_addr} did not answer within 1s")),
        "{body}"
    );
    let (mut s, head) = connect(child.proxy, "a.silent.test:443", b"").await;
    assert!(head.starts_with("HTTP/1.1 504"), "{head}");
    let body = body_after(&mut s, &head).await;
    assert!(
        body.contains(&format!("parent proxy {silent_addr} did not answer CONNECT")),
        "{body}"
    );
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_batons_each_the_others_parent_see_the_loop() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    // A's port is chosen first so that B can name it as its parent.
    let a_port = dead_port();
    let b = Baton::start(&upstream(&format!("http://127.0.0.1:{a_port}"), "", &[echo.port()])).await;
    let dir = tempfile::tempdir().unwrap();
    let config = common::config_text(
        dir.path(),
        &upstream(&format!("http://{}", b.proxy), "", &[echo.port()]),
    )
    .replace("127.0.0.1:0", &format!("127.0.0.1:{a_port}"));
    let a = Baton::start_wrapped(dir, &config, &[], None).await;
    assert_eq!(a.proxy.port(), a_port);

    let loop_reason = format!("request already passed this proxy (Via {})", token(a_port));
    let (status, _, body) = get(a.proxy, &format!("http://{origin}/bytes?n=10"), &[]);
    assert_eq!(status, 403);
    assert!(String::from_utf8_lossy(&body).contains(&loop_reason));
    // A CONNECT carries the Via chain to the parent too: A refuses it when it comes back
    // through B, B answers 502 for that, and so does A.
    let (mut s, head) = connect(a.proxy, &echo.to_string(), b"").await;
    assert!(head.starts_with("HTTP/1.1 502"), "a loop of CONNECTs must end: {head}");
    let body = body_after(&mut s, &head).await;
    let want = format!("parent proxy {} refused CONNECT {echo}: 502 Bad Gateway", b.proxy);
    assert!(body.contains(&want), "{body}");
    assert!(b.log().contains(&format!(
        "parent proxy 127.0.0.1:{a_port} refused CONNECT {echo}: 403 Forbidden"
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn handoffs_while_requests_go_through_the_parent() {
    let origin = testkit::start_origin().await.unwrap();
    let squid = Squid::start(None).await;
    let child = Baton::start(&upstream(&squid.url(), "", &[])).await;
    let parent = Baton::start("").await;
    let via_baton = Baton::start(&upstream(&format!("http://{}", parent.proxy), "", &[])).await;
    let spec = |proxy| {
        let url = format!("http://{origin}/bytes?n=4096");
        Load::start(proxy, LoadSpec::new(url).body_len(4096).workers(2, 2))
    };
    // The child hands off while its requests go through Squid; a baton parent hands off
    // while a child's requests go through it.
    let through_squid = spec(child.proxy);
    let through_baton = spec(via_baton.proxy);
    for round in 0..5 {
        let (a, b) = (through_squid.ok(), through_baton.ok());
        let (ok, out) = child.cli(&["upgrade"]);
        assert!(ok, "child handoff {round}: {out}");
        let (ok, out) = parent.cli(&["upgrade"]);
        assert!(ok, "parent handoff {round}: {out}");
        wait_for(Duration::from_secs(10), "requests after the handoffs", || async {
            (through_squid.ok() > a + 20 && through_baton.ok() > b + 20).then_some(())
        })
        .await;
    }
    let (squid_report, baton_report) = (through_squid.finish().await, through_baton.finish().await);
    assert!(squid_report.is_clean(), "through Squid: {squid_report}");
    assert!(baton_report.is_clean(), "through a baton parent: {baton_report}");
    assert!(
        squid_report.ok > 100 && baton_report.ok > 100,
        "{squid_report} / {baton_report}"
    );
    println!("through Squid: {squid_report}\nthrough a baton parent: {baton_report}");
}

/// The child's access lines name the parent a request or tunnel went through, in the text
/// and JSON formats (`parent=`, as Squid's line does with `FIRSTUP_PARENT`). The witness:
/// the parent's own lines, for the same requests gone direct, name none.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn access_lines_name_the_parent() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let parent = Baton::start(&common::connect_ports(&[echo.port()])).await;
    let name = format!("127.0.0.1:{}", parent.proxy.port());
    for (format, expect) in [
        ("text", format!("parent=\"{name}\"")),
        ("json", format!("\"parent\":\"{name}\"")),
    ] {
        let config = upstream(&format!("http://{}", parent.proxy), "", &[echo.port()]);
        let child = Baton::start(&format!("{config}\n[log]\nformat = \"{format}\"\n")).await;
        let (status, _, _) = get(child.proxy, &format!("http://{origin}/bytes?n=5&named-{format}"), &[]);
        assert_eq!(status, 200);
        echo_through(child.proxy, echo, 1000).await;
        let lines = wait_for(
            Duration::from_secs(5),
            "the child's request and tunnel lines",
            || async {
                let log = child.log();
                let request = log
                    .lines()
                    .find(|l| l.contains(&format!("named-{format}")))?
                    .to_string();
                let tunnel = log
                    .lines()
                    .find(|l| l.contains("tunnel") && l.contains("127.0.0.1"))?
                    .to_string();
                Some((request, tunnel))
            },
        )
        .await;
        assert!(
            lines.0.contains(&expect),
            "{format}: the request's line names the parent: {}",
            lines.0
        );
        assert!(
            lines.1.contains(&expect),
            "{format}: the tunnel's line names the parent: {}",
            lines.1
        );
    }
    let direct = wait_for(Duration::from_secs(5), "the parent's own request line", || async {
        parent
            .log()
            .lines()
            .find(|l| l.contains("named-text"))
            .map(str::to_string)
    })
    .await;
    assert!(
        !direct.contains("parent="),
        "a request gone direct names no parent: {direct}"
    );
}

/// A baton parent with a TLS listener (and its plain one), its certificate signed by `ca`.
async fn tls_parent(ca: &testkit::TestCa, extra: &str) -> (Baton, SocketAddr) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (cert, key) = ca
        .write_leaf(dir.path(), "parent", 1, Duration::from_secs(86_400))
        .expect("leaf");
    let listener = format!(
        "[[listener]]\nname = \"secure\"\naddress = \"127.0.0.1:0\"\ntls = {{ cert = \"{}\", key = \"{}\" }}\n",
        cert.display(),
        key.display()
    );
    let baton = Baton::start_in(dir, Path::new(common::BATON), &format!("{listener}\n{extra}"), &[]).await;
    let secure = common::listener_addr(&baton.status().await, "secure");
    (baton, secure)
}

/// An `https://` parent: baton speaks TLS to it (its TLS listener speaks nothing else),
/// verifying its certificate against `[upstream] roots`. Bodies both ways and a tunnel
/// through its CONNECT go through; the access line names it. The witness for the verification: a child trusting another CA gets 502
/// naming the failure, for a request and for a CONNECT, and nothing reaches the parent.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_https_parent_is_verified_and_carries_requests_and_tunnels() {
    let origin = testkit::start_origin().await.unwrap();
    let echo = testkit::start_echo().await.unwrap();
    let ca = testkit::TestCa::new().expect("CA");
    let (parent, secure) = tls_parent(&ca, &common::connect_ports(&[echo.port()])).await;
    let ca_pem = parent.dir.path().join("ca.pem");
    ca.write_ca(&ca_pem).expect("CA file");
    let trusting = format!("roots = [\"{}\"]", ca_pem.display());
    let child = Baton::start(&upstream(&format!("https://{secure}"), &trusting, &[echo.port()])).await;
    bodies_arrive_intact(child.proxy, origin, child.dir.path());
    echo_through(child.proxy, echo, 2 * MIB).await;
    let named = format!("parent=\"{secure}\"");
    let line = wait_for(Duration::from_secs(5), "the child's line naming the parent", || async {
        child
            .log()
            .lines()
            .find(|l| l.contains("/bytes?n=1 "))
            .map(str::to_string)
    })
    .await;
    assert!(line.contains(&named), "the request went through {secure}: {line}");

    let other = testkit::TestCa::named("another CA").expect("CA");
    let other_pem = child.dir.path().join("other-ca.pem");
    other.write_ca(&other_pem).expect("CA file");
    let untrusting = format!("roots = [\"{}\"]", other_pem.display());
    let doubter = Baton::start(&upstream(&format!("https://{secure}"), &untrusting, &[echo.port()])).await;
    let (status, _, body) = get(doubter.proxy, &format!("http://{origin}/bytes?n=5&doubted"), &[]);
    let body = String::from_utf8_lossy(&body);
    assert!(
        status == 502 && body.contains("TLS handshake failed") && body.contains("certificate"),
        "an https parent whose certificate does not verify is refused, naming why: {status} {body}"
    );
    let (_, head) = connect(doubter.proxy, &echo.to_string(), b"").await;
    assert!(head.starts_with("HTTP/1.1 502"), "a CONNECT through it too: {head}");
    assert!(!parent.log().contains("doubted"), "nothing reached the parent");
}
