//! A successor executed from a binary held open by fd (a rollback to a file an install has
//! replaced since), and one that says why it could not start.

use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use baton_handoff::{HandoffError, SuccessorSpec, spawn_successor};

fn spec<'a>(program: &'a Path, args: &'a [OsString]) -> SuccessorSpec<'a> {
    SuccessorSpec {
        program,
        args,
        listeners: Vec::new(),
        extra: Vec::new(),
        generation: 2,
        binary: None,
    }
}

#[tokio::test]
async fn a_binary_held_by_an_o_path_fd_runs_although_its_path_is_gone() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    // A copy of the shell, held open, then removed: only the fd still names it.
    let copy = dir.path().join("sh-copy");
    std::fs::copy("/bin/sh", &copy)?;
    let held = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_CLOEXEC)
        .open(&copy)?;
    std::fs::remove_file(&copy)?;
    // Ready, then alive until the parent closes the channel (a child that exits at once
    // could be reported as exited before its line is read).
    let script = r#"echo "ready $$" >&$BATON_READY_FD; read _ <&$BATON_CHANNEL_FD"#;
    let args = [OsString::from("-c"), OsString::from(script)];
    // The recorded program is a path that does not exist: only the fd can run.
    let program = Path::new("/nonexistent/baton");
    let mut spec = spec(program, &args);
    spec.binary = Some(held.as_fd());
    let ready = spawn_successor(&spec)?.await_ready(Duration::from_secs(10)).await?;
    assert!(ready.pid > 0);
    // Without the fd the same spec cannot run at all.
    let err = spawn_successor(&self::spec(program, &args))
        .err()
        .expect("no such file");
    assert!(matches!(err, HandoffError::NotExecutable { .. }), "{err:?}");
    Ok(())
}

#[tokio::test]
async fn a_successor_that_cannot_start_says_why() -> Result<(), Box<dyn std::error::Error>> {
    let script = r#"echo "failed listener \`x\`: cannot bind 127.0.0.1:80" >&$BATON_READY_FD; exit 1"#;
    let args = [OsString::from("-c"), OsString::from(script)];
    let err = spawn_successor(&spec(Path::new("/bin/sh"), &args))?
        .await_ready(Duration::from_secs(10))
        .await
        .expect_err("it fails");
    assert_eq!(
        err.to_string(),
        format!(
            "new generation (pid {}) exited before it was ready: listener `x`: cannot bind 127.0.0.1:80",
            match err {
                HandoffError::StartFailed { pid, .. } => pid,
                ref other => panic!("{other:?}"),
            }
        )
    );
    Ok(())
}
