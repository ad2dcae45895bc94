//! Extra named fds reach the successor at the numbers `BATON_EXTRA_FDS` names: a shell
//! successor writes through the fd it was told about, and the parent reads it.

use std::ffi::OsString;
use std::io::Read;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::Duration;

use baton_handoff::{PassedFd, SuccessorSpec, spawn_successor};

#[tokio::test]
async fn an_extra_fd_arrives_under_its_name() -> Result<(), Box<dyn std::error::Error>> {
    let (mut read_end, write_end) = std::io::pipe()?;
    // The shell finds its fd from the variable, writes the variable and a word through it,
    // then reports ready as a successor must, and lives until the channel closes (a child
    // that exits at once may be seen exiting before its ready line is read).
    let script = r#"fd=${BATON_EXTRA_FDS#probe=}; echo "$BATON_EXTRA_FDS hello" >&$fd; exec 5>&-;
        echo "ready $$" >&$BATON_READY_FD; read _ <&$BATON_CHANNEL_FD"#;
    let args = [OsString::from("-c"), OsString::from(script)];
    let spec = SuccessorSpec {
        program: Path::new("/bin/sh"),
        args: &args,
        listeners: Vec::new(),
        extra: vec![PassedFd {
            name: "probe",
            fd: write_end.as_fd(),
        }],
        generation: 2,
        binary: None,
    };
    let ready = spawn_successor(&spec)?.await_ready(Duration::from_secs(10)).await?;
    drop(spec);
    drop(write_end);
    let mut got = String::new();
    read_end.read_to_string(&mut got)?;
    // No listeners: the readiness pipe is fd 3, the channel 4, the first extra fd 5.
    assert_eq!(got.trim(), "probe=5 hello");
    assert!(ready.pid > 0);
    Ok(())
}

#[tokio::test]
async fn a_name_with_a_separator_is_refused_before_fork() {
    let (_r, w) = std::io::pipe().expect("pipe");
    let spec = SuccessorSpec {
        program: Path::new("/bin/true"),
        args: &[],
        listeners: Vec::new(),
        extra: vec![PassedFd {
            name: "a:b",
            fd: w.as_fd(),
        }],
        generation: 2,
        binary: None,
    };
    let err = spawn_successor(&spec).err().expect("a name with ':' must be refused");
    assert!(
        err.to_string()
            .contains("handoff i/o while building the successor's arguments")
            && format!("{err:?}").contains("a:b"),
        "{err:?}"
    );
}
