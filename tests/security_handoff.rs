//! The handoff boundary against the real binary (issue 31, finding 10): `BATON_*` handoff
//! variables count only when `LISTEN_PID` names the process, and an inherited fd that is
//! not a listening stream socket is refused with a reason naming it, not adopted.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use std::io::{BufRead, Read};

use common::{BATON, Baton, KillOnDrop, config_text, wait_for};

/// Starts baton through `sh -c '<env> exec baton run ...'`, so `$$` is baton's own pid.
async fn start_with_env(env: &str) -> Baton {
    let dir = tempfile::tempdir().unwrap();
    let text = config_text(dir.path(), "");
    let script = format!("{env} exec \"$0\" \"$@\"");
    Baton::start_wrapped(dir, &text, &["sh", "-c", &script], None).await
}

#[tokio::test]
async fn handoff_variables_for_another_pid_are_ignored() {
    // pid 1 is never baton: the variables were meant for another process.
    let baton = start_with_env("LISTEN_PID=1 BATON_GENERATION=7").await;
    let generation = baton.status().await["generation"].as_u64();
    assert_eq!(generation, Some(1), "BATON_GENERATION for another pid must be ignored");
    drop(baton);
    // The witness: the same variable with LISTEN_PID naming baton itself counts.
    let baton = start_with_env("LISTEN_PID=$$ BATON_GENERATION=7").await;
    let generation = baton.status().await["generation"].as_u64();
    assert_eq!(generation, Some(7), "BATON_GENERATION for this pid is read");
}

/// Starts baton with fd 3 set up by `python` code (which leaves the fd in `fd` and prints
/// a line for the test) and `LISTEN_FDS=1`, `LISTEN_FDNAMES=proxy`, `LISTEN_PID` = baton's
/// pid. Its stdout is piped (the python line, then nothing), its stderr too.
fn start_with_fd3(setup: &str, dir: &std::path::Path) -> KillOnDrop {
    let config = dir.join("baton.toml");
    std::fs::write(&config, config_text(dir, "")).unwrap();
    let script = format!(
        "import os, socket, sys\n{setup}\nos.dup2(fd, 3)\nos.set_inheritable(3, True)\n\
         os.environ.update(LISTEN_FDS='1', LISTEN_FDNAMES='proxy', LISTEN_PID=str(os.getpid()))\n\
         sys.stdout.flush()\nos.execv(sys.argv[1], sys.argv[1:])\n"
    );
    let child = Command::new("python3")
        .args(["-c", &script, BATON, "run", "--config"])
        .arg(&config)
        .env("BATON_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 must be installed");
    KillOnDrop(child)
}

#[tokio::test]
async fn an_inherited_fd_that_is_not_a_listening_socket_is_refused_naming_it() {
    for (setup, what) in [
        (
            "fd = os.open('/dev/null', os.O_RDONLY)",
            "a character device where a socket was expected",
        ),
        (
            "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 0)); fd = s.fileno()",
            "a datagram socket",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut child = start_with_fd3(setup, dir.path());
        let exited = wait_for(Duration::from_secs(20), "baton to refuse fd 3", || {
            let status = child.0.try_wait().expect("wait");
            async move { status }
        })
        .await;
        let mut log = String::new();
        child.0.stderr.take().unwrap().read_to_string(&mut log).unwrap();
        assert_eq!(
            exited.code(),
            Some(1),
            "baton must refuse to start, not panic or serve: {log}"
        );
        assert!(
            log.contains("fd 3:") && log.contains(what),
            "the reason names fd 3 ({what}): {log}"
        );
        assert!(!log.contains("panicked"), "{log}");
    }
    // The witness: a listening TCP socket at fd 3 is adopted and serves.
    let dir = tempfile::tempdir().unwrap();
    let setup =
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(16); fd = s.fileno(); print(s.getsockname()[1])";
    let mut child = start_with_fd3(setup, dir.path());
    let mut port = String::new();
    std::io::BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut port)
        .unwrap();
    let addr = format!("127.0.0.1:{}", port.trim());
    let url = "http://127.0.0.1:1/";
    let (ok, _, err) = common::curl(&["-o", "/dev/null", "-w", "%{http_code}", "-x", &addr, url]);
    assert!(ok, "baton answers on the adopted socket {addr}: {err}");
}
