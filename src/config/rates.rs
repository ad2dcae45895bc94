//! `[limits.per_client]` and `[limits.per_user]`: request rates and bandwidth, as typed
//! values (`proxy::limits` keeps the buckets). Each key takes one value, or for users a
//! table (`"*"`, a user name, or `@group` of the groups file). Absent, or 0: no limit.
//! Groups are looked up when a generation starts (the groups file is read then); here
//! only that a table naming users can have them (an htpasswd file, a groups file).

use std::collections::BTreeMap;

use serde::Deserialize;
use toml::Spanned;

use super::access::UserEntry;
use super::line_of;

/// What one client (an IPv4 address, an IPv6 /64, all Unix-socket clients) may take.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientRates {
    pub requests_per_second: Option<u64>,
    /// Bytes a second, over response bodies and both directions of tunnels.
    pub bandwidth: Option<u64>,
}

/// What one user may take (each user their own budget, a group's value for each member).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserRates {
    pub requests_per_second: Option<UserTable>,
    pub bandwidth: Option<UserTable>,
}

/// The values of one `limits.per_user` key: who gets which (0: no limit for them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserTable {
    /// `limits.per_user.<name>`, for messages.
    pub key: &'static str,
    /// Where it is written.
    pub line: usize,
    pub entries: Vec<(UserEntry, u64)>,
}

/// A key's value as written: one number, or a table of them.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawValue {
    One(u64),
    Table(BTreeMap<String, u64>),
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRates {
    requests_per_second: Option<Spanned<RawValue>>,
    bandwidth: Option<Spanned<RawValue>>,
}

/// `[limits.per_client]`: one value each (a table would name users, which a client is not).
pub(super) fn per_client(raw: &RawRates, text: &str) -> Result<ClientRates, String> {
    let one = |v: &Option<Spanned<RawValue>>, key: &str| match v {
        None => Ok(None),
        Some(s) => match s.get_ref() {
            RawValue::One(n) => Ok((*n > 0).then_some(*n)),
            RawValue::Table(_) => Err(format!(
                "line {}, key `limits.per_client.{key}`: one number for every client (tables of users are for [limits.per_user])",
                line_of(text, s.span().start)
            )),
        },
    };
    Ok(ClientRates {
        requests_per_second: one(&raw.requests_per_second, "requests_per_second")?,
        bandwidth: one(&raw.bandwidth, "bandwidth")?,
    })
}

/// `[limits.per_user]`: a number is `{ "*" = number }`. `htpasswd`, `groups`: whether
/// `[access]` has the files that log users in and define groups.
pub(super) fn per_user(raw: &RawRates, text: &str, htpasswd: bool, groups: bool) -> Result<UserRates, String> {
    let table = |v: &Option<Spanned<RawValue>>, key: &'static str| -> Result<Option<UserTable>, String> {
        let Some(s) = v else { return Ok(None) };
        let line = line_of(text, s.span().start);
        let at = |m: String| format!("line {line}, key `{key}`: {m}");
        let entries = match s.get_ref() {
            RawValue::One(n) => vec![(UserEntry::Any, *n)],
            RawValue::Table(t) => t
                .iter()
                .map(|(who, n)| user(who).map(|u| (u, *n)))
                .collect::<Result<_, _>>()
                .map_err(at)?,
        };
        if entries.iter().all(|(_, n)| *n == 0) {
            return Ok(None);
        }
        if !htpasswd {
            return Err(at(
                "[access] htpasswd is not set: no user logs in, so no user could be limited".into(),
            ));
        }
        if !groups && entries.iter().any(|(u, _)| matches!(u, UserEntry::Group(_))) {
            return Err(at(
                "names a @group, but [access] groups (an htgroup file) is not set".into()
            ));
        }
        Ok(Some(UserTable { key, line, entries }))
    };
    Ok(UserRates {
        requests_per_second: table(&raw.requests_per_second, "limits.per_user.requests_per_second")?,
        bandwidth: table(&raw.bandwidth, "limits.per_user.bandwidth")?,
    })
}

/// A table's key: `*`, `@group` or a user name (as a rule's `users` entry).
fn user(who: &str) -> Result<UserEntry, String> {
    super::access::user_entry(who)
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, EMBEDDED_DEFAULT};

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(&format!("{EMBEDDED_DEFAULT}{extra}"), None).map_err(|e| e.to_string())
    }

    #[test]
    fn absent_or_zero_is_no_limit() {
        let c = parse("").unwrap();
        assert_eq!(c.limits.per_client, super::ClientRates::default());
        assert_eq!(c.limits.per_user, super::UserRates::default());
        let c = parse("[limits.per_client]\nrequests_per_second = 0\nbandwidth = 1_000\n").unwrap();
        assert_eq!(c.limits.per_client.requests_per_second, None);
        assert_eq!(c.limits.per_client.bandwidth, Some(1000));
    }

    #[test]
    fn tables_name_users_groups_and_everyone_else() {
        let c = parse(
            "[access]\nhtpasswd = \"h\"\ngroups = \"g\"\n[limits.per_user]\nrequests_per_second = { \"*\" = 50, \"@contractors\" = 5, alice = 0 }\nbandwidth = 7\n",
        )
        .unwrap();
        let rps = c.limits.per_user.requests_per_second.unwrap();
        assert_eq!(rps.line, 9);
        assert!(
            rps.entries
                .contains(&(super::UserEntry::Group("contractors".into()), 5))
        );
        assert!(rps.entries.contains(&(super::UserEntry::User("alice".into()), 0)));
        assert_eq!(
            c.limits.per_user.bandwidth.unwrap().entries,
            vec![(super::UserEntry::Any, 7)]
        );
    }

    #[test]
    fn errors_name_the_line_and_the_key() {
        let err = parse("[limits.per_client]\nbandwidth = { \"*\" = 5 }\n").unwrap_err();
        assert!(
            err.contains("line 6") && err.contains("limits.per_client.bandwidth"),
            "{err}"
        );
        let err = parse("[limits.per_user]\nrequests_per_second = 5\n").unwrap_err();
        assert!(err.contains("line 6") && err.contains("htpasswd"), "{err}");
        let err = parse("[access]\nhtpasswd = \"h\"\n[limits.per_user]\nbandwidth = { \"@ops\" = 5 }\n").unwrap_err();
        assert!(err.contains("line 8") && err.contains("groups"), "{err}");
        let err = parse("[access]\nhtpasswd = \"h\"\n[limits.per_user]\nbandwidth = { \"a b\" = 5 }\n").unwrap_err();
        assert!(err.contains("line 8") && err.contains("user name"), "{err}");
        let err = parse("[limits.per_client]\nbandwith = 5\n").unwrap_err();
        assert!(err.contains("line 6") && err.contains("bandwith"), "{err}");
        let err = parse("[limits.per_client]\nbandwidth = -5\n").unwrap_err();
        assert!(err.contains("line 6"), "{err}");
    }
}
