//! A login flood must not stall name resolution (issue 31, finding 10). bcrypt
//! (`proxy::auth`) and `lookup_host` both run on tokio's blocking pool, but auth lets at most
//! one bcrypt per CPU run at once (a semaphore taken before `spawn_blocking`), so a flood
//! queues on the semaphore and never fills the pool (512 threads): measured, a request that
//! resolves `localhost` during 40 failing logins took 33-367 ms (40-70 ms quiet) while the
//! flood took 23-28 s (debug build, 2 busy cores). This guards that: if the bound goes, or
//! resolution queues behind bcrypt, the timed request waits for the flood and this fails.
//! Run with `--nocapture` for the figures.

mod common;

use std::time::{Duration, Instant};

use common::{Baton, testkit};

/// bcrypt cost 10: about 60 ms optimised, far more in a debug build: the flood outlasts the
/// timed request by a wide margin.
const COST: u32 = 10;

/// One request through the proxy with `user:password`; (status, how long it took).
fn timed_get(proxy: &str, auth: &str, url: &str) -> (String, Duration) {
    let t = Instant::now();
    let (_, out, err) = common::curl(&["-o", "/dev/null", "-w", "%{http_code}", "-x", proxy, "-U", auth, url]);
    let code = String::from_utf8_lossy(&out).into_owned();
    assert!(!code.is_empty(), "curl: {err}");
    (code, t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_does_not_stall_name_resolution() {
    let origin = testkit::start_origin().await.expect("origin");
    let dir = tempfile::tempdir().unwrap();
    let hash = bcrypt::hash("right", COST).unwrap();
    testkit::write_secret(&dir.path().join("users"), format!("alice:{hash}\n")).unwrap();
    let extra = "[access]\nhtpasswd = \"users\"\nauth_failures = 0\n";
    let baton = Baton::start_in(dir, std::path::Path::new(common::BATON), extra, &[]).await;
    let proxy = baton.proxy.to_string();
    let by_name = format!("http://localhost:{}/headers", origin.port());
    // Warm: alice's credentials are verified once, then remembered (no bcrypt again).
    let (code, first) = timed_get(&proxy, "alice:right", &by_name);
    assert_eq!(code, "200", "alice through the proxy by name");
    let (_, quiet) = timed_get(&proxy, "alice:right", &by_name);
    let (tx, refused) = std::sync::mpsc::channel();
    for i in 0..40 {
        let (proxy, url, tx) = (proxy.clone(), by_name.clone(), tx.clone());
        std::thread::spawn(move || tx.send(timed_get(&proxy, &format!("alice:wrong{i}"), &url)));
    }
    // Once the flood's first refusal is out, the other 39 bcrypt runs queue behind it.
    let wait = Duration::from_secs(120);
    let mut refusals = vec![refused.recv_timeout(wait).expect("the flood's first refusal")];
    let (code, during) = timed_get(&proxy, "alice:right", &by_name);
    assert_eq!(code, "200", "alice by name during the flood");
    while refusals.len() < 40 {
        refusals.push(refused.recv_timeout(wait).expect("every refusal"));
    }
    let last = refusals.iter().map(|(_, d)| *d).max().unwrap_or_default();
    println!(
        "first login {first:?}; by name, quiet {quiet:?}; during 40 failing logins {during:?}; the flood's last refusal after {last:?}"
    );
    assert!(
        refusals.iter().all(|(c, _)| c == "407"),
        "every wrong password is 407: {refusals:?}"
    );
    assert!(
        during < last / 2,
        "a request needing DNS ({during:?}) must not wait for the bcrypt flood ({last:?})"
    );
}
