use super::*;
use crate::config::Config;

fn limits(extra: &str, groups: Option<&Path>) -> Result<Limits, ConfigError> {
    let text = format!("[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n{extra}");
    let c = Config::parse(&text, None).expect("config");
    Limits::new(&c.limits, groups)
}

fn peer(text: &str) -> Peer {
    Peer::Ip(text.parse().unwrap())
}

#[test]
fn a_bucket_holds_one_second_and_refills_at_the_rate() {
    let b = Bucket::new(1000);
    assert_eq!(b.take(5000), Ok(1000), "the burst is one second's worth");
    let wait = b.take(100).expect_err("empty");
    assert!(
        wait <= Duration::from_millis(21),
        "waits for a fiftieth of a second: {wait:?}"
    );
    std::thread::sleep(Duration::from_millis(50));
    let got = b.take(5000).expect("refilled");
    assert!((40..=80).contains(&got), "50 ms at 1000/s: {got}");
    b.give_back(got);
    assert!(b.take(5000).unwrap() >= got, "given back");
}

#[test]
fn requests_beyond_the_rate_get_429_naming_the_client_and_the_key() {
    let l = limits("[limits.per_client]\nrequests_per_second = 3\n", None).unwrap();
    let a = peer("10.0.0.1:5");
    for i in 0..3 {
        assert!(l.check_request(&a, None).is_ok(), "request {i} is within the burst");
    }
    let d = l.check_request(&a, None).expect_err("the fourth is over");
    assert_eq!(
        (d.status, d.rule),
        (StatusCode::TOO_MANY_REQUESTS, Rule::RequestsPerSecond)
    );
    assert!(
        d.reason.contains("client 10.0.0.1") && d.reason.contains("limits.per_client.requests_per_second = 3"),
        "{}",
        d.reason
    );
    assert!(
        d.retry_after
            .is_some_and(|w| w > Duration::ZERO && w <= Duration::from_secs(1))
    );
    assert!(
        l.check_request(&peer("10.0.0.2:5"), None).is_ok(),
        "another client has its own"
    );
}

#[test]
fn a_user_table_names_users_groups_and_everyone_else() {
    let dir = tempfile::tempdir().unwrap();
    let groups = dir.path().join("groups");
    std::fs::write(&groups, "contractors: carol dave\nslow: dave\nadmins: erin\n").unwrap();
    let l = limits(
        "[access]\nhtpasswd = \"h\"\ngroups = \"g\"\n[limits.per_user]\nrequests_per_second = { \"*\" = 50, \"@contractors\" = 5, \"@slow\" = 2, \"@admins\" = 0, carol = 7 }\n",
        Some(&groups),
    )
    .unwrap();
    let u = l.user_rps.as_ref().unwrap();
    assert_eq!(u.of("alice"), Some((50, "*")));
    assert_eq!(u.of("carol"), Some((7, "carol")), "a user's own entry wins");
    assert_eq!(u.of("dave"), Some((2, "@slow")), "of two groups, the lower");
    assert_eq!(u.of("erin"), None, "0: no limit");
    let p = peer("10.0.0.1:5");
    assert!((0..2).all(|_| l.check_request(&p, Some("dave")).is_ok()));
    let d = l.check_request(&p, Some("dave")).unwrap_err();
    assert!(
        d.reason.contains("user dave (@slow)") && d.reason.contains("limits.per_user.requests_per_second = 2"),
        "{}",
        d.reason
    );
    assert!(l.check_request(&p, None).is_ok(), "no user, no per-user limit");
    let err = limits(
        "[access]\nhtpasswd = \"h\"\ngroups = \"g\"\n[limits.per_user]\nbandwidth = { \"@nobody\" = 5 }\n",
        Some(&groups),
    )
    .err()
    .expect("an unknown group");
    let err = err.to_string();
    assert!(
        err.contains("@nobody") && err.contains("limits.per_user.bandwidth") && err.contains("line 8"),
        "{err}"
    );
}

#[test]
fn no_limit_is_no_bucket() {
    let l = limits("", None).unwrap();
    assert!(l.throttle(&peer("10.0.0.1:5"), Some("alice")).is_none());
    assert!(l.check_request(&peer("10.0.0.1:5"), None).is_ok());
    assert_eq!(l.keys(), 0);
}

#[test]
fn a_clients_transfers_share_its_bucket_and_the_emptiest_decides() {
    let dir = tempfile::tempdir().unwrap();
    let l = limits(
        "[access]\nhtpasswd = \"h\"\n[limits.per_client]\nbandwidth = 1000\n[limits.per_user]\nbandwidth = 300\n",
        Some(&dir.path().join("none")),
    )
    .unwrap();
    let a = l.throttle(&peer("10.0.0.1:5"), None).unwrap();
    let b = l.throttle(&peer("10.0.0.1:6"), None).unwrap();
    assert_eq!(a.take(600), Ok(600));
    assert_eq!(b.take(600), Ok(400), "the second connection gets what the first left");
    let other = l.throttle(&peer("10.0.0.2:6"), Some("alice")).unwrap();
    assert_eq!(other.take(600), Ok(300), "the user's bucket is the emptier");
    assert!(other.take(600).is_err());
    assert_eq!(
        l.throttle(&peer("10.0.0.2:6"), None).unwrap().take(1000),
        Ok(700),
        "the client's gave back what the user's refused"
    );
}

#[test]
fn full_buckets_nothing_holds_are_swept() {
    let keyed: Keyed<u32> = Keyed::new();
    let held = keyed.get(&0, 1_000_000);
    held.take(10).unwrap();
    for k in 1..FIRST_SWEEP as u32 {
        keyed.get(&k, 1_000_000);
    }
    assert_eq!(keyed.len(), FIRST_SWEEP, "no sweep below the threshold");
    std::thread::sleep(Duration::from_millis(5));
    keyed.get(&(FIRST_SWEEP as u32), 1_000_000);
    assert_eq!(keyed.len(), 2, "the held bucket and the new one stay");
    assert!(Arc::ptr_eq(&held, &keyed.get(&0, 1_000_000)), "still shared");
}

#[tokio::test]
async fn a_pacer_waits_on_a_timer_not_a_busy_loop() {
    let l = limits("[limits.per_client]\nbandwidth = 100000\n", None).unwrap();
    let mut pacer = Pacer::new(l.throttle(&peer("10.0.0.1:5"), None).unwrap());
    let start = Instant::now();
    let (mut moved, mut polls) = (0, 0);
    while moved < 150_000 {
        moved += std::future::poll_fn(|cx| {
            polls += 1;
            pacer.poll_take(cx, 4096)
        })
        .await;
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(900),
        "{took:?}"
    );
    // 37 takes of 4 KiB, and at most 50 timer wake-ups a second.
    assert!(polls < 120, "{polls} polls: a busy loop");
}
