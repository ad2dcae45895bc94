//! The one adopt-or-bind rule for every listener (proxy, control, admin), through the real
//! binary: an inherited socket is adopted when its name and address match; a socket baton
//! bound whose configured address changed is bound anew and the old one closed; a socket
//! the service manager passed wins over the configuration, with a warning naming both.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::{Baton, wait_for};

/// Kills the generation the pid file names when the test ends, pass or fail.
struct PidFileGuard(std::path::PathBuf);

impl Drop for PidFileGuard {
    fn drop(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The proxy answers on `addr` (a 502 for an origin nobody listens on is an answer).
async fn answers(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = "GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\nConnection: close\r\n\r\n";
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    let read = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut head)).await;
    matches!(read, Ok(Ok(_))) && head.starts_with(b"HTTP/1.1 502")
}

fn listener<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["listeners"]
        .as_array()
        .and_then(|ls| ls.iter().find(|l| l["name"] == name))
        .unwrap_or_else(|| panic!("no listener {name} in {status}"))
}

fn rewrite_config(config: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(config).expect("config");
    assert!(text.contains(from), "{from} in {text}");
    std::fs::write(config, text.replace(from, to)).expect("write config");
}

async fn upgrade(baton: &Baton) -> u32 {
    let old = baton.status().await["pid"].as_u64().expect("pid") as u32;
    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "upgrade: {out}\n{}", baton.log());
    wait_for(Duration::from_secs(40), "the old generation to exit", || async {
        (!common::alive(old)).then_some(())
    })
    .await;
    old
}

#[tokio::test]
async fn a_listener_kept_in_place_is_adopted_and_a_moved_one_is_bound_anew() {
    let mut baton = Baton::start("").await;
    let first = baton.proxy;
    upgrade(&baton).await;
    let st = baton.status().await;
    assert_eq!(listener(&st, "proxy")["adopted"], true, "{st}");
    assert_eq!(
        listener(&st, "proxy")["address"],
        first.to_string(),
        "same socket, same port: {st}"
    );

    let moved: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    rewrite_config(&baton.config, "127.0.0.1:0", &moved.to_string());
    upgrade(&baton).await;
    let st = baton.status().await;
    assert_eq!(listener(&st, "proxy")["address"], moved.to_string(), "{st}");
    assert_eq!(listener(&st, "proxy")["adopted"], false, "{st}");
    assert!(answers(moved).await, "the new address serves:\n{}", baton.log());
    assert!(!common::tcp_listening(first.port()), "the old address is closed");
    assert!(baton.log().contains("listener moved"), "{}", baton.log());
    baton.proxy = moved;
}

#[tokio::test]
async fn control_and_admin_listeners_follow_the_configuration() {
    let baton = Baton::start("[admin]\naddress = \"127.0.0.1:0\"\n").await;
    let admin_port = free_port();
    let old_control = baton.control.clone();
    let new_control = baton.dir.path().join("control2.sock");
    let text = std::fs::read_to_string(&baton.config).unwrap();
    let text = text
        .replace(
            &format!("{}\"", old_control.display()),
            &format!("{}\"", new_control.display()),
        )
        .replace(
            "[admin]\naddress = \"127.0.0.1:0\"",
            &format!("[admin]\naddress = \"127.0.0.1:{admin_port}\""),
        );
    std::fs::write(&baton.config, text).unwrap();
    upgrade(&baton).await;
    assert!(
        common::status(&old_control).await.is_none(),
        "the old control socket no longer answers"
    );
    let st = common::status(&new_control)
        .await
        .expect("the new control socket answers");
    assert_eq!(
        listener(&st, "control")["address"],
        format!("unix:{}", new_control.display()),
        "{st}"
    );
    assert_eq!(
        listener(&st, "admin")["address"],
        format!("127.0.0.1:{admin_port}"),
        "{st}"
    );
    assert_eq!(listener(&st, "proxy")["adopted"], true, "{st}");
    // The baton guard stops generations through the pid file, which the config still names.
}

#[tokio::test]
async fn a_socket_passed_by_the_service_manager_wins_over_the_configuration() {
    let dir = tempfile::tempdir().unwrap();
    // The configured port stays bound (not listening) by the test, so no other test's
    // ephemeral listener can take it; a baton that tried to bind it would fail to start.
    let reserved = tokio::net::TcpSocket::new_v4().unwrap();
    reserved.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let (passed, configured) = (free_port(), reserved.local_addr().unwrap().port());
    let config = dir.path().join("baton.toml");
    let text = common::config_text(dir.path(), "").replace("127.0.0.1:0", &format!("127.0.0.1:{configured}"));
    std::fs::write(&config, text).unwrap();
    let log = std::fs::File::create(dir.path().join("baton.log")).unwrap();
    let child = std::process::Command::new("systemd-socket-activate")
        .args([
            "-l",
            &format!("127.0.0.1:{passed}"),
            "--fdname=proxy",
            common::BATON,
            "run",
            "--config",
        ])
        .arg(&config)
        .env("BATON_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("systemd-socket-activate (from systemd) must be installed");
    let _guard = common::KillOnDrop(child);
    let _generations = PidFileGuard(dir.path().join("baton.pid"));
    wait_for(Duration::from_secs(10), "systemd-socket-activate to listen", || async {
        common::tcp_listening(passed).then_some(())
    })
    .await;
    // The first connection starts baton, which serves it from the passed socket.
    let passed_addr: SocketAddr = format!("127.0.0.1:{passed}").parse().unwrap();
    assert!(answers(passed_addr).await, "served on the passed socket");
    let control = dir.path().join("control.sock");
    for round in 0..2 {
        let st = common::status(&control).await.expect("status");
        assert_eq!(
            listener(&st, "proxy")["address"],
            passed_addr.to_string(),
            "round {round}: {st}"
        );
        assert!(
            !common::tcp_listening(configured),
            "the configured address is not bound"
        );
        let log = std::fs::read_to_string(dir.path().join("baton.log")).unwrap();
        let warning = log.lines().find(|l| l.contains("service manager passed this listener"));
        let warning = warning.unwrap_or_else(|| panic!("a warning:\n{log}"));
        assert!(
            warning.contains(&passed.to_string()) && warning.contains(&configured.to_string()),
            "{warning}"
        );
        let out = std::process::Command::new(common::BATON)
            .args(["upgrade", "--control"])
            .arg(&control)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(answers(passed_addr).await, "still served after two handoffs");
}
