//! The ordered access rules through the real binary: each matcher, ordering and the
//! default; logins (407 as Squid's proxy_auth) and groups; `@FILE` lists and a broken line
//! at a reload; the SNI of tunnels (match, mismatch, a CONNECT to an address, no SNI, a
//! server that speaks first); the rules again on moved tunnels at a handoff.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use common::testkit::tls::client_hello;
use common::{BATON, Baton, curl, testkit, wait_for};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Each test ends with a clean stop of the generation that serves, within this.
const STOP: Duration = Duration::from_secs(10);

/// A baton with `files` written beside its configuration (`extra`).
async fn start_with(files: &[(&str, &str)], extra: &str) -> Baton {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        testkit::write_secret(&path, text).expect("write file");
    }
    Baton::start_in(dir, Path::new(BATON), extra, &[]).await
}

/// `curl -x` from the loopback address `from`, as `user:password` if given: the status.
/// curl runs off the runtime, where the test's origin answers.
async fn status_from(baton: &Baton, from: &str, method: &str, url: &str, login: Option<&str>) -> u16 {
    let proxy = format!("http://{}", baton.proxy);
    let mut args: Vec<String> = [
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--interface",
        from,
        "-x",
        &proxy,
        "-X",
        method,
    ]
    .map(String::from)
    .to_vec();
    if let Some(l) = login {
        args.extend(["-U".into(), l.into()]);
    }
    if method == "POST" {
        args.extend(["-d".into(), "x".into()]);
    }
    args.push(url.into());
    let (_, out, err) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        curl(&args)
    })
    .await
    .unwrap();
    String::from_utf8_lossy(&out)
        .parse()
        .unwrap_or_else(|_| panic!("curl gave no status: {err}"))
}

/// Waits until the log has `text` (access lines are written as requests end).
async fn log_has(baton: &Baton, text: &str) {
    let what = format!("`{text}` in the log");
    wait_for(Duration::from_secs(5), &what, || async {
        baton.log().contains(text).then_some(())
    })
    .await;
}

fn htpasswd() -> String {
    let alice = bcrypt::hash("right", 4).unwrap();
    let bob = bcrypt::hash("right", 4).unwrap();
    format!("alice:{alice}\nbob:{bob}\n")
}

#[tokio::test]
async fn each_matcher_ordering_and_the_default() {
    let origin = testkit::start_origin().await.unwrap();
    let port = origin.port();
    let mut baton = start_with(
        &[],
        &format!(
            "[access]\n\
             [[access.rule]]\nname = \"no-post\"\naction = \"deny\"\nmethods = [\"POST\"]\n\
             [[access.rule]]\nname = \"ci\"\naction = \"allow\"\nclients = [\"127.0.0.2/32\"]\nhosts = [\"localhost\"]\nports = [{port}]\n\
             [[access.rule]]\nname = \"by-address\"\naction = \"allow\"\nclients = [\"127.0.0.3/32\"]\nhosts = [\"127.0.0.0/8\"]\n"
        ),
    )
    .await;
    let by_name = format!("http://localhost:{port}/headers");
    let by_addr = format!("http://127.0.0.1:{port}/headers");
    assert_eq!(
        status_from(&baton, "127.0.0.2", "GET", &by_name, None).await,
        200,
        "ci: client, name and port all match"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.2", "POST", &by_name, None).await,
        403,
        "no-post comes first and wins"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.4", "GET", &by_name, None).await,
        403,
        "a client no rule names gets the default"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.2", "GET", &by_addr, None).await,
        403,
        "the address is not the name ci allows"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.3", "GET", &by_addr, None).await,
        200,
        "by-address: the CIDR matches the address"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.3", "GET", &by_name, None).await,
        403,
        "a name is not resolved to match a CIDR"
    );
    let other_port = format!("http://localhost:{}/headers", port.wrapping_add(1).max(1));
    assert_eq!(
        status_from(&baton, "127.0.0.2", "GET", &other_port, None).await,
        403,
        "ci names one port"
    );
    for rule in [
        "rule=\"ci\"",
        "rule=\"no-post\"",
        "rule=\"default\"",
        "rule=\"by-address\"",
    ] {
        log_has(&baton, rule).await;
    }
    baton.stop(STOP).await;
}

#[tokio::test]
async fn logins_are_asked_by_the_rules_that_name_users_and_groups() {
    let origin = testkit::start_origin().await.unwrap();
    let mut baton = start_with(
        &[("htpasswd", &htpasswd()), ("groups", "contractors: bob\n")],
        "[access]\nhtpasswd = \"htpasswd\"\ngroups = \"groups\"\n\
         [[access.rule]]\nname = \"public\"\naction = \"allow\"\nhosts = [\"public.invalid\"]\n\
         [[access.rule]]\nname = \"alice\"\naction = \"allow\"\nusers = [\"alice\"]\n\
         [[access.rule]]\nname = \"contractors\"\naction = \"allow\"\nusers = [\"@contractors\"]\nhosts = [\"localhost\"]\n",
    )
    .await;
    let (by_name, by_addr) = (
        format!("http://localhost:{}/headers", origin.port()),
        format!("http://{origin}/headers"),
    );
    assert_eq!(
        status_from(&baton, "127.0.0.1", "GET", &by_addr, None).await,
        407,
        "the alice rule would match but for the login"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.1", "GET", &by_addr, Some("alice:wrong")).await,
        407,
        "a wrong password is no login"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.1", "GET", &by_addr, Some("alice:right")).await,
        200,
        "alice may go anywhere"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.1", "GET", &by_name, Some("bob:right")).await,
        200,
        "bob passes over alice's rule to his group's"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.1", "GET", &by_addr, Some("bob:right")).await,
        403,
        "the group's rule names localhost only"
    );
    log_has(&baton, "user=\"bob\"").await;
    log_has(&baton, "rule=\"contractors\"").await;
    // The 407 carries the challenge, as any proxy_auth answer does.
    let proxy = format!("http://{}", baton.proxy);
    let args = ["-s", "-D", "-", "-o", "/dev/null", "-x", &proxy, &by_addr].map(String::from);
    let (_, head, _) = tokio::task::spawn_blocking(move || curl(&args.each_ref().map(String::as_str)))
        .await
        .unwrap();
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.contains("proxy-authenticate: basic realm="), "{head}");
    assert!(
        !baton.log().contains("public.invalid"),
        "no request was made to the public rule's host"
    );
    baton.stop(STOP).await;
}

#[tokio::test]
async fn a_list_file_and_a_broken_line_at_a_reload() {
    let origin = testkit::start_origin().await.unwrap();
    let mut baton = start_with(
        &[("lists/allow.txt", "# what CI may reach\nlocalhost\n")],
        "[access]\n[[access.rule]]\nname = \"ci\"\naction = \"allow\"\nhosts = [\"@lists/allow.txt\"]\n",
    )
    .await;
    let url = format!("http://localhost:{}/headers", origin.port());
    assert_eq!(
        status_from(&baton, "127.0.0.1", "GET", &url, None).await,
        200,
        "localhost is on the list"
    );
    let list = baton.dir.path().join("lists/allow.txt");
    std::fs::write(&list, "localhost\nmirror.example.org\nnot a name\n").unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(!ok, "a broken list fails the handoff: {out}");
    assert!(
        out.contains("allow.txt") && out.contains("line 3"),
        "the failure names the file and line: {out}"
    );
    assert_eq!(
        status_from(&baton, "127.0.0.1", "GET", &url, None).await,
        200,
        "the old generation serves on, with its list"
    );
    std::fs::write(&list, "mirror.example.org\n").unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "a good list is applied by a reload: {out}");
    assert_eq!(
        status_from(&baton, "127.0.0.1", "GET", &url, None).await,
        403,
        "localhost is no longer on the list"
    );
    baton.stop(STOP).await;
}

/// `CONNECT target` (as `login`, if given): the stream after a 200.
async fn tunnel(proxy: SocketAddr, target: &str, login: Option<&str>) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    let auth = login.map_or(String::new(), |l| {
        let b = base64::engine::general_purpose::STANDARD.encode(l);
        format!("Proxy-Authorization: Basic {b}\r\n")
    });
    let head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n");
    s.write_all(head.as_bytes()).await.unwrap();
    let answer = testkit::client::read_head(&mut s).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "CONNECT {target}: {answer}");
    s
}

/// What comes back through the tunnel within 5 s: `Some(bytes)` (`want` of them), or `None`
/// if the proxy closed it first.
async fn echoed(s: &mut TcpStream, want: usize) -> Option<Vec<u8>> {
    let mut got = vec![0; want];
    match tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut got)).await {
        Ok(Ok(_)) => Some(got),
        Ok(Err(_)) => None,
        Err(_) => panic!("the tunnel neither answered nor closed within 5 s"),
    }
}

const SNI_RULES: &str = "[[access.rule]]\nname = \"tls-to-localhost\"\naction = \"allow\"\nhosts = [\"localhost\"]\n";

#[tokio::test]
async fn a_tunnels_server_name_is_held_to_the_rules() {
    let echo = testkit::start_echo().await.unwrap();
    let port = echo.port();
    let access = format!("[access]\nconnect_ports = [{port}]\nno_sni = \"deny\"\n{SNI_RULES}");
    let mut baton = start_with(&[], &access).await;
    let by_name = format!("localhost:{port}");
    for (target, sni, passes, why) in [
        (by_name.as_str(), "localhost", true, "the SNI is the CONNECT's name"),
        (
            by_name.as_str(),
            "blocked.example",
            false,
            "domain fronting: the SNI names another server",
        ),
        (
            &echo.to_string(),
            "localhost",
            true,
            "a CONNECT to an address is judged on its SNI",
        ),
        (&echo.to_string(), "blocked.example", false, "an SNI no rule allows"),
    ] {
        let mut s = tunnel(baton.proxy, target, None).await;
        let hello = client_hello(sni);
        s.write_all(&hello).await.unwrap();
        let back = echoed(&mut s, hello.len()).await;
        assert_eq!(back.as_ref() == Some(&hello), passes, "{target} with SNI {sni}: {why}");
    }
    log_has(&baton, "rule=\"sni_mismatch\"").await;
    let mut plain = tunnel(baton.proxy, &by_name, None).await;
    plain.write_all(b"hello, not TLS\n").await.unwrap();
    assert_eq!(echoed(&mut plain, 15).await, None, "no SNI and no_sni = \"deny\"");
    log_has(&baton, "rule=\"no_sni\"").await;
    // The same bytes pass where no_sni allows them: the refusal was no_sni's.
    let mut open = start_with(&[], &access.replace("no_sni = \"deny\"", "no_sni = \"allow\"")).await;
    let mut plain = tunnel(open.proxy, &by_name, None).await;
    plain.write_all(b"hello, not TLS\n").await.unwrap();
    assert_eq!(echoed(&mut plain, 15).await.as_deref(), Some(&b"hello, not TLS\n"[..]));
    drop(plain);
    baton.stop(STOP).await;
    open.stop(STOP).await;
}

/// An origin that speaks first (SMTP's greeting).
async fn greeter() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let _ = s.write_all(b"220 ready\r\n").await;
                // Then it waits for the client, and closes when the client has.
                let _ = tokio::io::copy(&mut s, &mut tokio::io::sink()).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_server_that_speaks_first_waits_for_timeouts_sni_then_no_sni_decides() {
    let origin = greeter().await;
    let access = |no_sni: &str| {
        format!(
            "[access]\nconnect_ports = [{}]\nno_sni = \"{no_sni}\"\n[timeouts]\nsni = \"300ms\"\n",
            origin.port()
        )
    };
    let mut allow = start_with(&[], &access("allow")).await;
    let started = Instant::now();
    let mut s = tunnel(allow.proxy, &origin.to_string(), None).await;
    assert_eq!(
        echoed(&mut s, 11).await.as_deref(),
        Some(&b"220 ready\r\n"[..]),
        "relayed once no_sni allowed it"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "the greeting waited for timeouts.sni: {:?}",
        started.elapsed()
    );
    drop(s);
    let mut deny = start_with(&[], &access("deny")).await;
    let mut s = tunnel(deny.proxy, &origin.to_string(), None).await;
    assert_eq!(
        echoed(&mut s, 11).await,
        None,
        "nothing came within timeouts.sni and no_sni denies"
    );
    log_has(&deny, "no TLS ClientHello within timeouts.sni").await;
    drop(s);
    allow.stop(STOP).await;
    deny.stop(STOP).await;
}

/// Alice's and Bob's tunnels, and one to an address judged on its SNI, move at a handoff
/// whose rules drop Bob and the SNI: Alice's relays on, the other two are closed.
#[tokio::test]
async fn moved_tunnels_are_held_to_the_new_generations_rules() {
    let echo = testkit::start_echo().await.unwrap();
    let port = echo.port();
    let rules = |users: &str, hosts: &str| {
        format!(
            "[access]\nhtpasswd = \"htpasswd\"\nconnect_ports = [{port}]\nno_sni = \"allow\"\n\
             [[access.rule]]\nname = \"people\"\naction = \"allow\"\nusers = [{users}]\n{hosts}"
        )
    };
    let mut baton = start_with(&[("htpasswd", &htpasswd())], &rules("\"alice\", \"bob\"", "")).await;
    let target = format!("localhost:{port}");
    let mut alice = tunnel(baton.proxy, &target, Some("alice:right")).await;
    let mut bob = tunnel(baton.proxy, &target, Some("bob:right")).await;
    let mut by_sni = tunnel(baton.proxy, &echo.to_string(), Some("alice:right")).await;
    let hello = client_hello("sni.localhost");
    by_sni.write_all(&hello).await.unwrap();
    assert_eq!(
        echoed(&mut by_sni, hello.len()).await.as_ref(),
        Some(&hello),
        "any server name: people names no hosts"
    );
    for (s, who) in [(&mut alice, "alice"), (&mut bob, "bob")] {
        s.write_all(b"ping\n").await.unwrap();
        assert_eq!(
            echoed(s, 5).await.as_deref(),
            Some(&b"ping\n"[..]),
            "{who} before the handoff"
        );
    }
    // Now people names alice alone, and hosts that cover both targets but not the SNI.
    let narrowed = rules("\"alice\"", "hosts = [\"localhost\", \"127.0.0.1\"]\n");
    std::fs::write(&baton.config, common::config_text(baton.dir.path(), &narrowed)).unwrap();
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "{out}");
    alice.write_all(b"still\n").await.unwrap();
    assert_eq!(
        echoed(&mut alice, 6).await.as_deref(),
        Some(&b"still\n"[..]),
        "alice is still in the rule: her tunnel moved on"
    );
    let _ = bob.write_all(b"gone?\n").await;
    assert_eq!(
        echoed(&mut bob, 6).await,
        None,
        "bob left the rule: his tunnel is closed"
    );
    let _ = by_sni.write_all(b"gone?\n").await;
    assert_eq!(
        echoed(&mut by_sni, 6).await,
        None,
        "its address is allowed, its server name no longer"
    );
    log_has(&baton, "moved tunnel closed").await;
    let log = baton.log();
    assert!(
        log.contains("user=\"bob\"") && log.contains("moved tunnel closed: no rule allows CONNECT to sni.localhost"),
        "each closed tunnel's line says why: {log}"
    );
    drop((alice, bob, by_sni));
    // The clean stop of the generation serving after the handoff.
    baton.stop(STOP).await;
}

/// `baton check --explain` through the binary: the deciding rule, why each earlier one
/// missed, and the SNI's part.
#[test]
fn check_explains_which_rule_decides_and_why() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ci.txt"), "git.example.com\n.packages.example\n").unwrap();
    let config = dir.path().join("baton.toml");
    let text = common::config_text(
        dir.path(),
        "[access]\nallow_clients = [\"10.0.0.0/8\"]\n\
         [[access.rule]]\nname = \"ci\"\naction = \"allow\"\nclients = [\"10.8.0.0/16\"]\nhosts = [\"@ci.txt\"]\nports = [443]\n",
    );
    std::fs::write(&config, text).unwrap();
    let explain = |args: &[&str]| {
        let out = std::process::Command::new(BATON)
            .args(["check", "--config", config.to_str().unwrap(), "--explain"])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let allowed = explain(&["CONNECT git.example.com:443", "--client", "10.8.1.2"]);
    assert!(
        allowed.contains("no match: port 443 is among [443]"),
        "connect_ports passed it: {allowed}"
    );
    assert!(allowed.trim_end().ends_with("decides: allow"), "ci decides: {allowed}");
    let denied = explain(&["GET http://git.example.com/", "--client", "10.9.1.2"]);
    assert!(
        denied.contains("no match: port 80 is not among [443]"),
        "why ci missed: {denied}"
    );
    assert!(denied.trim_end().ends_with("default decides: deny"), "{denied}");
    let fronted = explain(&[
        "CONNECT git.example.com:443",
        "--client",
        "10.8.1.2",
        "--sni",
        "evil.example",
    ]);
    assert!(fronted.contains("sni_mismatch decides: deny"), "{fronted}");
    let by_address = explain(&[
        "CONNECT 192.0.2.1:443",
        "--client",
        "10.8.1.2",
        "--sni",
        "a.packages.example",
    ]);
    assert!(
        by_address.contains("waits for the ClientHello's server name"),
        "{by_address}"
    );
    assert!(
        by_address.trim_end().ends_with("decides: allow"),
        "decided on the name: {by_address}"
    );
}
