//! Host patterns, as `[upstream]` routes and `[[access.rule]]` hosts write them: `*`, a
//! name, `*.domain` or `.domain`, an address or a CIDR. One parser and one match, so a
//! pattern means the same wherever it is written. Names are never resolved to decide: a
//! CIDR matches only a destination written as an IP address.

use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;

/// A destination pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostPattern {
    /// `*`: every destination.
    Any,
    /// A host name, lowercase, without a trailing dot.
    Name(String),
    /// `*.example.com` or `.example.com`: `example.com` and every name under it (as Squid's
    /// `dstdomain .example.com`).
    Domain(String),
    /// An address or a CIDR: matches a destination written as an IP address.
    Net(IpNet),
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Any => f.write_str("*"),
            HostPattern::Name(n) => f.write_str(n),
            HostPattern::Domain(d) => write!(f, "*.{d}"),
            HostPattern::Net(n) => write!(f, "{n}"),
        }
    }
}

impl HostPattern {
    /// `*`, a host name, `*.domain` or `.domain`, an IP address or a CIDR.
    pub fn parse(p: &str) -> Result<HostPattern, String> {
        if p.trim() == "*" {
            return Ok(HostPattern::Any);
        }
        let p = p.trim().trim_end_matches('.').to_ascii_lowercase();
        if p.contains('/') {
            return p
                .parse::<IpNet>()
                .map(|n| HostPattern::Net(n.trunc()))
                .map_err(|e| format!("`{p}` is not a CIDR (e.g. 10.0.0.0/8): {e}"));
        }
        if let Ok(ip) = p.trim_start_matches('[').trim_end_matches(']').parse::<IpAddr>() {
            return Ok(HostPattern::Net(IpNet::from(ip.to_canonical())));
        }
        let (domain, name) = match p.strip_prefix("*.").or_else(|| p.strip_prefix('.')) {
            Some(d) => (true, d),
            None => (false, p.as_str()),
        };
        if !is_host_name(name) {
            return Err(format!(
                "`{p}` is not a host pattern: `*`, a name, `*.domain`, an address or a CIDR"
            ));
        }
        Ok(if domain {
            HostPattern::Domain(name.to_string())
        } else {
            HostPattern::Name(name.to_string())
        })
    }

    /// Whether `host` (without a trailing dot; `ip`: the address it is written as, if it
    /// is one, canonical) matches.
    pub fn matches(&self, host: &str, ip: Option<IpAddr>) -> bool {
        match self {
            HostPattern::Any => true,
            HostPattern::Net(net) => ip.is_some_and(|ip| net.contains(&ip)),
            HostPattern::Name(name) => ip.is_none() && host.eq_ignore_ascii_case(name),
            HostPattern::Domain(domain) => ip.is_none() && in_domain(host, domain),
        }
    }
}

/// Whether `host` is `domain` or a name under it, ignoring case.
pub fn in_domain(host: &str, domain: &str) -> bool {
    host.eq_ignore_ascii_case(domain)
        || host.len() > domain.len()
            && host.as_bytes()[host.len() - domain.len() - 1] == b'.'
            && host[host.len() - domain.len()..].eq_ignore_ascii_case(domain)
}

/// Labels of letters, digits, `-` and `_`, separated by single dots.
fn is_host_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .split('.')
            .all(|label| !label.is_empty() && label.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b)))
}

/// The address a destination host is written as (`[v6]` or v4), canonical; `None` for a name.
pub fn literal_ip(host: &str) -> Option<IpAddr> {
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
        .map(|ip| ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        assert_eq!(HostPattern::parse("*").unwrap(), HostPattern::Any);
        assert_eq!(
            HostPattern::parse("Example.ORG.").unwrap(),
            HostPattern::Name("example.org".into())
        );
        assert_eq!(
            HostPattern::parse("*.corp").unwrap(),
            HostPattern::Domain("corp".into())
        );
        assert_eq!(HostPattern::parse(".corp").unwrap(), HostPattern::Domain("corp".into()));
        assert_eq!(HostPattern::parse("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(
            HostPattern::parse("[::ffff:10.0.0.1]").unwrap().to_string(),
            "10.0.0.1/32"
        );
        assert_eq!(HostPattern::parse("[::1]").unwrap().to_string(), "::1/128");
        for bad in ["a b", "*.", "a..b", "-/-", "x*y", "", "10.0.0.0/99"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} is not a pattern");
        }
    }

    #[test]
    fn a_domain_is_itself_and_every_name_under_it_but_no_name_that_ends_like_it() {
        let d = HostPattern::parse(".corp.example").unwrap();
        assert!(d.matches("corp.example", None), "the domain itself (Squid's .domain)");
        assert!(d.matches("A.B.Corp.Example", None), "names under it, any case");
        assert!(
            !d.matches("notcorp.example", None),
            "a name that only ends with its text"
        );
        assert!(
            !d.matches("10.0.0.1", literal_ip("10.0.0.1")),
            "an address is never a name"
        );
        let n = HostPattern::parse("10.0.0.0/8").unwrap();
        assert!(n.matches("[::ffff:10.1.1.1]", literal_ip("[::ffff:10.1.1.1]")));
        assert!(!n.matches("ten.example", None), "a name is not resolved to decide");
    }
}
