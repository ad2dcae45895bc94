//! The rules on their own: each matcher, ordering, the default, logins and groups, lists.

use super::*;
use crate::config::Config;

/// The rules of `access` (TOML under `[access]`, rules included), with `files` written into
/// a directory the configuration lives in.
fn rules(access: &str, files: &[(&str, &str)]) -> Rules {
    try_rules(access, files).unwrap()
}

fn try_rules(access: &str, files: &[(&str, &str)]) -> Result<Rules, String> {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    let text = format!("[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n[access]\n{access}");
    let config = Config::parse(&text, Some(&dir.path().join("baton.toml"))).map_err(|e| e.to_string())?;
    Rules::load(&config.access).map_err(|e| e.to_string())
}

/// The verdict for `method host:port` from `client` logged in as `login`.
fn verdict(r: &Rules, client: &str, method: &str, host: &str, port: u16, login: Login) -> Verdict {
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let f = Facts::new(Some(client.parse().unwrap()), &method, host, port);
    r.decide(&f, login)
}

const HTPASSWD: (&str, &str) = ("htpasswd", "alice:$2y$04$abcdefghijklmnopqrstuu\n");

#[test]
fn without_rules_the_shorthands_decide_and_the_default_allows() {
    let r = rules("deny_hosts = [\"*.internal\"]\nconnect_ports = [443]\n", &[]);
    let v = |c, m, h, p| verdict(&r, c, m, h, p, Login::Unknown);
    assert_eq!(
        v("127.0.0.1", "GET", "example.org", 80),
        Verdict::Allow(Rule::Default),
        "nothing refuses it"
    );
    assert_eq!(
        v("10.0.0.1", "GET", "example.org", 80),
        Verdict::Deny(Rule::AllowClients),
        "outside allow_clients"
    );
    assert_eq!(
        v("127.0.0.1", "CONNECT", "example.org", 22),
        Verdict::Deny(Rule::ConnectPorts),
        "port 22 is not a CONNECT port"
    );
    assert_eq!(
        v("127.0.0.1", "GET", "example.org", 22),
        Verdict::Allow(Rule::Default),
        "connect_ports is for CONNECT only"
    );
    assert_eq!(
        v("127.0.0.1", "GET", "DB.Internal.", 80),
        Verdict::Deny(Rule::DenyHosts),
        "case and the root dot do not hide a name"
    );
    let f = Facts::new(None, &Method::GET, "db.internal", 80);
    assert_eq!(r.reason(Rule::DenyHosts, &f), "host db.internal is denied (*.internal)");
}

#[test]
fn each_matcher_narrows_its_rule_and_the_first_match_wins() {
    let r = rules(
        "allow_clients = [\"0.0.0.0/0\"]\nconnect_ports = [443, 8443]\n\
         [[access.rule]]\nname = \"no-post\"\naction = \"deny\"\nmethods = [\"POST\"]\n\
         [[access.rule]]\nname = \"ci\"\naction = \"allow\"\nclients = [\"10.8.0.0/16\"]\n\
         hosts = [\"*.packages.example\", \"mirror.example.org\", \"192.0.2.0/24\"]\nports = [443, 80]\n\
         [[access.rule]]\nname = \"late\"\naction = \"allow\"\nhosts = [\"mirror.example.org\"]\nports = [8443]\n",
        &[],
    );
    let v = |c, m, h, p| verdict(&r, c, m, h, p, Login::Unknown);
    assert_eq!(
        v("10.8.1.2", "GET", "a.packages.example", 443),
        Verdict::Allow(Rule::Named("ci")),
        "all four match"
    );
    assert_eq!(
        v("10.8.1.2", "POST", "a.packages.example", 443),
        Verdict::Deny(Rule::Named("no-post")),
        "an earlier rule wins"
    );
    assert_eq!(
        v("10.9.1.2", "GET", "a.packages.example", 443),
        Verdict::Deny(Rule::Default),
        "client outside"
    );
    assert_eq!(
        v("10.8.1.2", "GET", "git.example.com", 443),
        Verdict::Deny(Rule::Default),
        "host outside"
    );
    assert_eq!(
        v("10.8.1.2", "GET", "mirror.example.org", 22),
        Verdict::Deny(Rule::Default),
        "port outside"
    );
    assert_eq!(
        v("10.8.1.2", "CONNECT", "192.0.2.7", 443),
        Verdict::Allow(Rule::Named("ci")),
        "an address in the CIDR"
    );
    assert_eq!(
        v("10.9.9.9", "GET", "mirror.example.org", 8443),
        Verdict::Allow(Rule::Named("late")),
        "a later rule when earlier ones miss"
    );
    // A Unix-socket client is in no `clients` CIDR.
    let f = Facts::new(None, &Method::GET, "a.packages.example", 443);
    assert_eq!(r.decide(&f, Login::Unknown), Verdict::Deny(Rule::Default));
}

#[test]
fn a_rule_naming_users_asks_for_a_login_and_passes_over_other_users() {
    let groups = ("groups", "contractors: carol\n");
    let r = rules(
        "htpasswd = \"htpasswd\"\ngroups = \"groups\"\n\
         [[access.rule]]\nname = \"alice\"\naction = \"allow\"\nusers = [\"alice\"]\n\
         [[access.rule]]\nname = \"corp\"\naction = \"allow\"\nusers = [\"@contractors\"]\nhosts = [\".corp.example\"]\n\
         [[access.rule]]\nname = \"open\"\naction = \"allow\"\nhosts = [\"public.example\"]\n",
        &[HTPASSWD, groups],
    );
    let v = |h, login| verdict(&r, "127.0.0.1", "GET", h, 80, login);
    assert_eq!(
        v("x.example", Login::Unknown),
        Verdict::NeedLogin,
        "the first rule asks who it is"
    );
    assert_eq!(
        v("x.example", Login::Missing),
        Verdict::Login(Rule::Named("alice")),
        "407, as Squid's proxy_auth"
    );
    assert_eq!(
        v("x.example", Login::User("alice")),
        Verdict::Allow(Rule::Named("alice"))
    );
    assert_eq!(
        v("a.corp.example", Login::User("carol")),
        Verdict::Allow(Rule::Named("corp")),
        "carol passes over alice's rule"
    );
    assert_eq!(
        v("x.example", Login::User("carol")),
        Verdict::Deny(Rule::Default),
        "carol outside corp"
    );
    assert_eq!(
        v("public.example", Login::User("carol")),
        Verdict::Allow(Rule::Named("open")),
        "a rule without users"
    );
    // Without a login the first rule already answers 407, even for what a later rule allows.
    assert_eq!(
        v("public.example", Login::Missing),
        Verdict::Login(Rule::Named("alice"))
    );
    assert!(r.may_need_login());
}

#[test]
fn htpasswd_without_rules_means_every_user_logs_in() {
    let r = rules("htpasswd = \"htpasswd\"\n", &[HTPASSWD]);
    let v = |login| verdict(&r, "127.0.0.1", "GET", "example.org", 80, login);
    assert_eq!(v(Login::Missing), Verdict::Login(Rule::Htpasswd));
    assert_eq!(v(Login::User("anyone")), Verdict::Allow(Rule::Htpasswd));
    let open = rules("", &[]);
    assert!(!open.may_need_login(), "no htpasswd: nobody is asked");
}

#[test]
fn a_default_allow_makes_a_blocklist() {
    let list = ("block.txt", "# ads\nads.example\n.tracker.example\n203.0.113.0/24\n");
    let r = rules(
        "default = \"allow\"\n[[access.rule]]\nname = \"blocklist\"\naction = \"deny\"\nhosts = [\"@block.txt\"]\n",
        &[list],
    );
    let v = |h| verdict(&r, "127.0.0.1", "GET", h, 80, Login::Unknown);
    assert_eq!(v("ads.example"), Verdict::Deny(Rule::Named("blocklist")));
    assert_eq!(v("a.b.tracker.example"), Verdict::Deny(Rule::Named("blocklist")));
    assert_eq!(v("203.0.113.9"), Verdict::Deny(Rule::Named("blocklist")));
    assert_eq!(
        v("news.example"),
        Verdict::Allow(Rule::Default),
        "what the list does not name"
    );
}

#[test]
fn bad_rules_and_files_name_their_line() {
    let cases = [
        (
            "[[access.rule]]\naction = \"allow\"\nusers = [\"alice\"]\n",
            "htpasswd is not set",
        ),
        ("[[access.rule]]\naction = \"allow\"\nhosts = []\n", "`hosts` is empty"),
        ("[[access.rule]]\naction = \"allow\"\nmethods = [\"get\"]\n", "capitals"),
        ("[[access.rule]]\nname = \"loop\"\naction = \"allow\"\n", "built-in"),
        (
            "[[access.rule]]\nname = \"a\"\naction = \"allow\"\n[[access.rule]]\nname = \"a\"\naction = \"deny\"\n",
            "second rule",
        ),
        (
            "[[access.rule]]\naction = \"allow\"\nhosts = [\"ok.example\", \"bad name\"]\n",
            "line",
        ),
        ("[[access.rule]]\naction = \"maybe\"\n", "line"),
    ];
    for (text, want) in cases {
        let err = try_rules(text, &[]).err().unwrap_or_else(|| panic!("accepted: {text}"));
        assert!(err.contains(want) && err.contains("line"), "{text:?}: {err}");
    }
    let err = try_rules(
        "[[access.rule]]\naction = \"deny\"\nhosts = [\"@list\"]\n",
        &[("list", "a.example\n-bad-/\n")],
    )
    .err()
    .expect("refused");
    assert!(
        err.contains("list") && err.contains("line 2"),
        "the list file and its line: {err}"
    );
    let groups = ("groups", "ops: alice\n");
    let err = try_rules(
        "htpasswd = \"htpasswd\"\ngroups = \"groups\"\n[[access.rule]]\naction = \"allow\"\nusers = [\"@devs\"]\n",
        &[HTPASSWD, groups],
    )
    .err()
    .expect("refused");
    assert!(err.contains("@devs"), "a group the file lacks: {err}");
    // Positive witness: the same rule with a group the file has.
    assert!(
        try_rules(
            "htpasswd = \"htpasswd\"\ngroups = \"groups\"\n[[access.rule]]\naction = \"allow\"\nusers = [\"@ops\"]\n",
            &[HTPASSWD, groups]
        )
        .is_ok()
    );
}

#[test]
fn explain_says_why_each_rule_missed_and_which_decided() {
    let r = rules(
        "allow_clients = [\"0.0.0.0/0\"]\n[[access.rule]]\nname = \"ci\"\naction = \"allow\"\nclients = [\"10.8.0.0/16\"]\n\
         [[access.rule]]\nname = \"git\"\naction = \"allow\"\nhosts = [\"git.example.com\"]\n",
        &[],
    );
    let f = Facts::new(
        Some("10.9.1.2".parse().unwrap()),
        &Method::CONNECT,
        "git.example.com",
        443,
    );
    let text = r.explain(&f, Login::Unknown).join("\n");
    assert!(
        text.contains("no match: client 10.9.1.2 is not in [10.8.0.0/16]"),
        "{text}"
    );
    assert!(
        text.contains("git (allow)") && text.ends_with("decides: allow"),
        "{text}"
    );
    let listing = r.listing().join("\n");
    assert!(
        listing.starts_with("1. allow_clients (deny)") && listing.ends_with("default: deny"),
        "{listing}"
    );
}

/// A CONNECT to an address waits for its SNI when a rule's names may match it; whoever its
/// credentials name is found out first, since no 407 can follow the `200`.
#[test]
fn an_address_waits_for_its_server_name_with_its_login_known() {
    let r = rules(
        "htpasswd = \"htpasswd\"\nconnect_ports = [443]\n\
         [[access.rule]]\nname = \"names\"\naction = \"allow\"\nhosts = [\"git.example.com\"]\n\
         [[access.rule]]\nname = \"alice\"\naction = \"allow\"\nusers = [\"alice\"]\nhosts = [\"192.0.2.0/24\"]\n",
        &[HTPASSWD],
    );
    let mut f = Facts::new(
        Some("127.0.0.1".parse().unwrap()),
        &Method::CONNECT,
        "198.51.100.7",
        443,
    );
    assert_eq!(
        r.decide(&f, Login::Unknown),
        Verdict::Deny(Rule::Default),
        "no SNI to come: the address alone"
    );
    f.sni_to_come = true;
    assert_eq!(
        r.decide(&f, Login::Unknown),
        Verdict::NeedLogin,
        "a later rule names users: log in first"
    );
    assert_eq!(
        r.decide(&f, Login::User("alice")),
        Verdict::Pending(Rule::Named("names")),
        "then the SNI decides"
    );
    assert_eq!(
        r.decide(&f, Login::Missing),
        Verdict::Pending(Rule::Named("names")),
        "without a login, too"
    );
    let only_names = rules(
        "[[access.rule]]\nname = \"names\"\naction = \"allow\"\nhosts = [\"git.example.com\"]\n",
        &[],
    );
    assert_eq!(
        only_names.decide(&f, Login::Unknown),
        Verdict::Pending(Rule::Named("names")),
        "no rule needs a login: no asking"
    );
    f.sni_to_come = false;
    f.host = "192.0.2.7".into();
    f.ip = Some("192.0.2.7".parse().unwrap());
    assert_eq!(
        r.decide(&f, Login::User("alice")),
        Verdict::Allow(Rule::Named("alice")),
        "an address a CIDR names decides at once"
    );
}

/// The masks answer as `IpNet::contains` does, family included.
#[test]
fn client_masks_agree_with_ipnet() {
    let nets: Vec<IpNet> = [
        "10.8.0.0/16",
        "0.0.0.0/0",
        "2001:db8::/32",
        "::/0",
        "192.0.2.7/32",
        "::1/128",
    ]
    .iter()
    .map(|n| n.parse().unwrap())
    .collect();
    let ips = [
        "10.8.1.2",
        "10.9.0.1",
        "192.0.2.7",
        "192.0.2.8",
        "2001:db8::1",
        "2001:db9::1",
        "::1",
        "::2",
    ];
    for net in &nets {
        let masks = Nets::new(std::slice::from_ref(net));
        for ip in ips {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(masks.contains(client_bits(ip)), net.contains(&ip), "{ip} in {net}");
        }
    }
    // The witness that the families are kept apart: ::/0 is no IPv4 client's.
    assert!(!Nets::new(&["::/0".parse().unwrap()]).contains(client_bits("10.0.0.1".parse().unwrap())));
}
