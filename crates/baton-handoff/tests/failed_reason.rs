//! A successor that cannot start says why (`failed <reason>` on the readiness pipe) and exits:
//! the handoff error carries the reason beside the exit status.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use baton_handoff::{HandoffError, SuccessorSpec, spawn_successor};

#[tokio::test]
async fn the_reason_a_successor_gives_is_in_the_error() {
    let script = r#"echo "failed config.toml: line 3: no such key" >&$BATON_READY_FD; exit 3"#;
    let args = [OsString::from("-c"), OsString::from(script)];
    let spec = SuccessorSpec {
        program: Path::new("/bin/sh"),
        args: &args,
        listeners: Vec::new(),
        extra: Vec::new(),
        generation: 2,
    };
    let outcome = spawn_successor(&spec)
        .expect("spawn")
        .await_ready(Duration::from_secs(10))
        .await;
    let Err(err) = outcome else {
        panic!("the successor failed, yet it was reported ready");
    };
    let HandoffError::ChildExited { status, .. } = &err else {
        panic!("{err:?}");
    };
    assert_eq!(status, "exit status 3: config.toml: line 3: no such key");
    assert!(
        err.to_string()
            .contains("exited before it was ready: exit status 3: config.toml"),
        "{err}"
    );
}
