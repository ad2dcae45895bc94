//! The next hop of a destination: directly to it, or through which parent proxy
//! (`[upstream]`). Decided on the destination as the client named it: names are never
//! resolved to decide (the parent may resolve names baton cannot), so a CIDR pattern matches
//! only a destination written as an IP address.

use std::sync::Arc;

use crate::config::hosts::literal_ip;
use crate::config::{HostPattern, Parent, Parents};

/// The parent `host` (a request target's host, as `Authority::host` gives it) goes
/// through, or `None` to go directly: `bypass` first, then the first route that matches,
/// then the default parent.
pub fn next_hop<'a>(parents: &'a Parents, host: &str) -> Option<&'a Arc<Parent>> {
    if parents.all_direct() {
        return None;
    }
    let host = host.strip_suffix('.').unwrap_or(host);
    let ip = literal_ip(host);
    let matches = |patterns: &[HostPattern]| patterns.iter().any(|p| p.matches(host, ip));
    if matches(&parents.bypass) {
        return None;
    }
    match parents.routes.iter().find(|r| matches(&r.hosts)) {
        Some(route) => route.parent.as_ref(),
        None => parents.default.as_ref(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn parents(upstream: &str) -> Parents {
        let text = format!("[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n{upstream}");
        Config::parse(&text, None).unwrap().parents
    }

    fn hop(p: &Parents, host: &str) -> Option<String> {
        next_hop(p, host).map(|p| p.authority.to_string())
    }

    #[test]
    fn bypass_then_routes_then_the_default() {
        let p = parents(
            "[upstream]\nproxy = \"http://main:3128\"\nbypass = [\"localhost\", \"*.local\", \"10.0.0.0/8\", \"::1\"]\n\
             [[upstream.route]]\nhosts = [\"*.corp\"]\nproxy = \"http://corp:8080\"\n\
             [[upstream.route]]\nhosts = [\"192.168.0.0/16\", \"intranet\"]\nproxy = \"direct\"\n",
        );
        for (host, want) in [
            ("example.org", Some("main:3128")),
            ("LOCALHOST.", None),
            ("printer.local", None),
            ("local", None),
            ("notlocal", Some("main:3128")),
            ("10.1.2.3", None),
            ("[::1]", None),
            ("[::ffff:10.0.0.1]", None),
            ("11.0.0.1", Some("main:3128")),
            ("git.Corp", Some("corp:8080")),
            ("corp", Some("corp:8080")),
            ("192.168.1.1", None),
            ("intranet", None),
            ("intranet.example", Some("main:3128")),
        ] {
            assert_eq!(hop(&p, host).as_deref(), want, "{host}");
        }
    }

    #[test]
    fn without_a_default_only_routes_use_a_parent() {
        let p = parents("[[upstream.route]]\nhosts = [\"*.corp\"]\nproxy = \"http://corp:8080\"\n");
        assert_eq!(hop(&p, "a.corp").as_deref(), Some("corp:8080"));
        assert_eq!(hop(&p, "example.org"), None);
        assert!(parents("").all_direct());
        // A CIDR never matches a name: names are not resolved to decide.
        let p = parents("[upstream]\nproxy = \"http://main:1\"\nbypass = [\"127.0.0.0/8\"]\n");
        assert_eq!(hop(&p, "localhost").as_deref(), Some("main:1"));
        assert_eq!(hop(&p, "127.0.0.1"), None);
    }
}
