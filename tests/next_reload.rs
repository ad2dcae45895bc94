//! `baton check` against a running baton says what the next reload does with each listener
//! (adopted, moved, added, dropped, renamed), and the reload then does exactly that; a
//! listener added on a port below 1024 that the process lacks CAP_NET_BIND_SERVICE for
//! fails that handoff with a reason that says so, and nothing of the new configuration
//! applies. Both without systemd.

mod common;

use std::net::SocketAddr;

use common::Baton;

fn free_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

fn listener(name: &str, addr: &str) -> String {
    format!("[[listener]]\nname = \"{name}\"\naddress = \"{addr}\"\n")
}

/// `baton check --config <file>` (the configuration names the control socket): (exit
/// success, stdout + stderr).
fn check(baton: &Baton) -> (bool, String) {
    common::check_config(&baton.config)
}

#[tokio::test]
async fn check_forecasts_each_listener_and_the_reload_does_it() {
    let (side, side_moved, was) = (free_port(), free_port(), free_port());
    let first = [
        listener("side", &side.to_string()),
        listener("old", "127.0.0.3:0"),
        listener("was", &was.to_string()),
    ]
    .concat();
    let baton = Baton::start(&first).await;
    let old = common::listener_addr(&baton.status().await, "old");
    let next = [
        listener("side", &side_moved.to_string()),
        listener("now", &was.to_string()),
        listener("added", "127.0.0.4:0"),
    ]
    .concat();
    let text = std::fs::read_to_string(&baton.config).unwrap().replace(&first, &next);
    std::fs::write(&baton.config, text).unwrap();

    let (ok, out) = check(&baton);
    eprintln!("baton check:\n{out}");
    assert!(ok, "{out}");
    for line in [
        format!(
            "the next reload of the serving baton (pid {}, generation 1)",
            baton.pid()
        ),
        "proxy 127.0.0.1:0: adopted".to_string(),
        format!("side {side_moved}: moved from {side}: bound anew"),
        format!("now {was}: adopted (renamed from was)"),
        "added 127.0.0.4:0: added: bound".to_string(),
        format!("control unix:{}: adopted", baton.control.display()),
        format!("old {old}: dropped: closed"),
    ] {
        assert!(out.contains(&line), "missing `{line}` in:\n{out}");
    }

    let (ok, out) = baton.cli(&["upgrade"]);
    assert!(ok, "{out}");
    let st = baton.status().await;
    assert_eq!(common::listener_addr(&st, "side"), side_moved, "{st}");
    assert_eq!(common::listener_addr(&st, "now"), was, "{st}");
    assert_eq!(common::listener_addr(&st, "added").ip().to_string(), "127.0.0.4");
    let names: Vec<&str> = st["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["proxy", "side", "now", "added", "control"], "{st}");
    let (ok, out) = check(&baton);
    assert!(ok && !out.contains("moved") && !out.contains("dropped"), "{out}");
}

#[tokio::test]
async fn a_low_port_without_the_capability_fails_the_handoff_and_nothing_applies() {
    let dir = tempfile::tempdir().unwrap();
    let (side, side_moved) = (free_port(), free_port());
    let config = common::config_text(dir.path(), &listener("side", &side.to_string()));
    // Root without CAP_NET_BIND_SERVICE: out of the bounding set, so not effective after exec.
    let wrapper = ["setpriv", "--bounding-set", "-net_bind_service"];
    let baton = Baton::start_wrapped(dir, &config, &wrapper, None).await;
    let pid = baton.pid();
    assert!(!baton_handoff::process::has_capability(Some(pid), baton_handoff::process::CAP_NET_BIND_SERVICE).unwrap());
    let before = baton.status().await;
    let next = format!(
        "{}{}",
        listener("side", &side_moved.to_string()),
        listener("low", "127.0.0.1:81")
    );
    let text = std::fs::read_to_string(&baton.config)
        .unwrap()
        .replace(&listener("side", &side.to_string()), &next);
    std::fs::write(&baton.config, text).unwrap();

    let (ok, out) = check(&baton);
    eprintln!("baton check:\n{out}");
    assert!(!ok, "{out}");
    assert!(
        out.contains("low 127.0.0.1:81: added: bound")
            && out.contains(&format!(
                "binding 127.0.0.1:81 needs CAP_NET_BIND_SERVICE, which the serving baton (pid {pid}) lacks"
            ))
            && out.contains(&format!("side {side_moved}: moved from {side}")),
        "{out}"
    );

    let (ok, out) = baton.cli(&["upgrade"]);
    eprintln!("baton upgrade:\n{out}");
    assert!(!ok, "{out}");
    assert!(
        out.contains("listener `low`: cannot bind 127.0.0.1:81: ports below 1024 need CAP_NET_BIND_SERVICE, which this process lacks"),
        "{out}"
    );
    // Nothing of the new configuration applies: the same generation, the same listeners.
    let after = baton.status().await;
    assert_eq!(
        (after["pid"].as_u64(), after["generation"].as_u64()),
        (Some(u64::from(pid)), Some(1))
    );
    assert_eq!(after["listeners"], before["listeners"], "{after}");
    assert_eq!(common::listener_addr(&after, "side"), side);
    assert!(common::tcp_listening(side.port()));
}
