//! `baton rollback`: an install replaces the binary in place with one that starts, serves and
//! passes its canary but answers every request wrongly; `baton upgrade` takes it in, and
//! `baton rollback` returns to the binary the serving generation's predecessor ran (held
//! open since: its file is gone), under client load that loses no request. The generation
//! rolled back to still executes the installed path at its next plain upgrade.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Baton, testkit};
use http::StatusCode;
use testkit::{Load, LoadSpec};

/// Runs `baton <args> --control <sock>` off the runtime's threads (the load runs on them).
async fn cli(baton: &Baton, args: &'static [&'static str]) -> (bool, String) {
    let control = baton.control.clone();
    tokio::task::spawn_blocking(move || common::cli_at(&control, args))
        .await
        .expect("cli")
}

/// Installs `content` at `path` the way `install` does: a new file renamed over the old one
/// (whose inode lives on in the processes that run it).
fn install(path: &Path, content: &[u8]) {
    let staged = path.with_extension("new");
    std::fs::write(&staged, content).unwrap();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// The inode of the binary process `pid` runs (its file may be deleted).
fn exe_inode(pid: u64) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/exe")).unwrap().ino()
}

/// One request on a new connection: its status.
async fn status_of_a_request(baton: &Baton, url: &str) -> StatusCode {
    let mut c = testkit::ProxyConnection::open(baton.proxy).await.unwrap();
    c.get(url).await.unwrap().0
}

/// The bad build: a wrapper that runs a real baton with a configuration refusing every
/// destination the clients ask for (403), with the same control socket and listeners, so it
/// starts, adopts the sockets, reports ready and pings through its canary window. Returns
/// the wrapper script; the real binary is `dir/real-baton`.
fn bad_build(dir: &Path) -> String {
    let real: PathBuf = dir.join("real-baton");
    std::fs::copy(common::BATON, &real).unwrap();
    let bad_config = dir.join("bad.toml");
    std::fs::write(
        &bad_config,
        common::config_text(dir, "[access]\ndeny_destinations = [\"127.0.0.0/8\"]\n"),
    )
    .unwrap();
    format!(
        "#!/bin/sh\nexec {} run --config {}\n",
        real.display(),
        bad_config.display()
    )
}

/// The next plain upgrade executes the installed path again, not the binary held open.
async fn a_plain_upgrade_runs_the_installed_path(baton: &Baton, program: &Path, url: &str) {
    install(program, &std::fs::read(common::BATON).unwrap());
    let (ok, out) = cli(baton, &["upgrade"]).await;
    assert!(ok, "{out}");
    let upgraded = baton.status().await;
    assert_eq!(upgraded["generation"], 4, "{upgraded}");
    assert_eq!(
        exe_inode(upgraded["pid"].as_u64().unwrap()),
        std::fs::metadata(program).unwrap().ino()
    );
    assert_eq!(status_of_a_request(baton, url).await, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_after_an_in_place_install_of_a_bad_but_ready_binary() {
    let origin = testkit::start_origin().await.unwrap();
    let url = format!("http://{origin}/bytes?n=100");
    let dir = tempfile::tempdir().unwrap();
    let program = dir.path().join("baton");
    std::fs::copy(common::BATON, &program).unwrap();
    let good_inode = std::fs::metadata(&program).unwrap().ino();
    let wrapper = bad_build(dir.path());
    let baton = Baton::start_in(dir, &program, "", &[]).await;
    assert_eq!(status_of_a_request(&baton, &url).await, StatusCode::OK);

    let (ok, out) = cli(&baton, &["rollback"]).await;
    assert!(
        !ok && out.contains("nothing to roll back to: this generation (1) was started directly"),
        "{out}"
    );

    let load = Load::start(
        baton.proxy,
        LoadSpec::new(url.clone())
            .body_len(100)
            .workers(2, 2)
            .tolerate(StatusCode::FORBIDDEN),
    );
    assert!(
        load.answered(1, Duration::from_secs(10)).await,
        "the load flows before the handoff"
    );
    install(&program, wrapper.as_bytes());
    let (ok, out) = cli(&baton, &["upgrade"]).await;
    assert!(
        ok && out.contains("canary passed"),
        "the bad binary passed its canary: {out}"
    );
    let bad = baton.status().await;
    assert_eq!(bad["generation"], 2, "{bad}");
    let bad_pid = bad["pid"].as_u64().unwrap();
    assert_eq!(
        exe_inode(bad_pid),
        std::fs::metadata(baton.dir.path().join("real-baton")).unwrap().ino()
    );
    assert_eq!(status_of_a_request(&baton, &url).await, StatusCode::FORBIDDEN);

    let (ok, out) = cli(&baton, &["rollback"]).await;
    assert!(ok && out.contains("canary passed"), "{out}\n{}", baton.log());
    let rolled_back = baton.status().await;
    assert_eq!(rolled_back["generation"], 3, "{rolled_back}");
    let rolled_back_pid = rolled_back["pid"].as_u64().unwrap();
    assert_eq!(
        exe_inode(rolled_back_pid),
        good_inode,
        "generation 3 runs the first binary, replaced on disk since"
    );
    for _ in 0..20 {
        assert_eq!(status_of_a_request(&baton, &url).await, StatusCode::OK);
    }
    let report = load.finish().await;
    eprintln!("upgrade to a bad binary, then rollback, under load: {report}");
    assert!(report.ok > 0 && report.tolerated > 0 && report.is_clean(), "{report}");

    a_plain_upgrade_runs_the_installed_path(&baton, &program, &url).await;
    assert!(
        baton
            .log()
            .contains("rollback: starting new generation from the previous binary"),
        "{}",
        baton.log()
    );
}
