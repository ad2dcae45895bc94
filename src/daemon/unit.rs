//! The systemd unit baton runs under, held to the configuration: `baton check` and every
//! first generation's start warn when the unit contradicts it. The properties come from
//! `systemctl show` (D-Bus underneath; a unit without the bus, or a sandbox that cannot
//! reach it, says so once and is not checked).

use std::process::Command;
use std::time::Duration;

use crate::config::Config;

/// What baton needs of its unit.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct UnitSettings {
    pub fd_store_max: u64,
    /// `None`: no stop timeout (`infinity`).
    pub timeout_stop: Option<Duration>,
    /// The `argv[]` of each `ExecReload=` command.
    pub exec_reload: Vec<String>,
}

/// The unit this process runs in, from its cgroup (`…/baton.service`), if any.
pub fn own_unit() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    let last = path.rsplit('/').next()?;
    last.ends_with(".service").then(|| last.to_string())
}

/// The unit's properties, read with `systemctl show`.
pub fn read(unit: &str) -> Result<UnitSettings, String> {
    let out = Command::new("systemctl")
        .args([
            "show",
            unit,
            "-p",
            "LoadState,FileDescriptorStoreMax,TimeoutStopUSec,ExecReload",
        ])
        .output()
        .map_err(|e| format!("cannot run systemctl: {e}"))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        return Err(format!("systemctl show {unit}: {}", why.trim()));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    if text.lines().any(|l| l == "LoadState=not-found") {
        return Err(format!("no unit {unit} is loaded"));
    }
    parse(&text)
}

/// `systemctl show`'s `Key=Value` lines.
pub fn parse(text: &str) -> Result<UnitSettings, String> {
    let mut settings = UnitSettings::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match key {
            "FileDescriptorStoreMax" => {
                settings.fd_store_max = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("{key}={value}: not a number"))?;
            }
            "TimeoutStopUSec" => settings.timeout_stop = stop_timeout(value)?,
            "ExecReload" => settings.exec_reload.extend(argv(value)),
            _ => {}
        }
    }
    Ok(settings)
}

/// `45s`, `1min 30s`, `infinity`.
fn stop_timeout(value: &str) -> Result<Option<Duration>, String> {
    let value = value.trim();
    if value == "infinity" || value.is_empty() {
        return Ok(None);
    }
    humantime::parse_duration(value)
        .map(Some)
        .map_err(|e| format!("TimeoutStopUSec={value}: {e}"))
}

/// The `argv[]=…;` parts of an `ExecReload=` value (`{ path=… ; argv[]=… ; … }` each).
fn argv(value: &str) -> Vec<String> {
    value
        .split("argv[]=")
        .skip(1)
        .map(|rest| rest.split(" ;").next().unwrap_or_default().trim().to_string())
        .collect()
}

/// How many fds the fd store needs for `config`: up to 6 per connection (a tunnel's two
/// sockets and two pipes), and 16 for listeners and record tables.
pub fn fd_store_needed(config: &Config) -> u64 {
    if config.timeouts.stash_after.is_zero() {
        return 16;
    }
    6 * config.limits.max_connections as u64 + 16
}

/// What in `unit` contradicts `config`, one sentence each.
pub fn contradictions(unit: &UnitSettings, config: &Config) -> Vec<String> {
    let mut found = Vec::new();
    let needed = fd_store_needed(config);
    if unit.fd_store_max < needed {
        found.push(format!(
            "FileDescriptorStoreMax={} is below {needed} (6 x max_connections {} + 16): a crash loses the connections (and listeners) the store cannot hold",
            unit.fd_store_max, config.limits.max_connections
        ));
    }
    let drain = config.timeouts.drain;
    if let Some(stop) = unit.timeout_stop.filter(|stop| *stop < drain) {
        found.push(format!(
            "TimeoutStopSec={stop:?} is shorter than [timeouts] drain ({drain:?}): systemd kills what is still draining at a stop"
        ));
    }
    let upgrades = |argv: &String| {
        let mut words = argv.split_whitespace();
        words.next().is_some_and(|bin| bin.ends_with("baton")) && words.any(|w| w == "upgrade")
    };
    if !unit.exec_reload.iter().any(upgrades) {
        found.push(format!(
            "ExecReload= is not `baton upgrade` ({}): `systemctl reload` would not hand off",
            if unit.exec_reload.is_empty() {
                "none".to_string()
            } else {
                unit.exec_reload.join("; ")
            }
        ));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHOWN: &str = "LoadState=loaded\nFileDescriptorStoreMax=16\nTimeoutStopUSec=1min 30s\n\
        ExecReload={ path=/usr/local/bin/baton ; argv[]=/usr/local/bin/baton upgrade --control /run/baton/control.sock ; ignore_errors=no ; start_time=[n/a] ; stop_time=[n/a] ; pid=0 ; code=(null) ; status=0/0 }\n";

    #[test]
    fn systemctl_shows_are_read() {
        let unit = parse(SHOWN).unwrap();
        assert_eq!(unit.fd_store_max, 16, "the store's size");
        assert_eq!(unit.timeout_stop, Some(Duration::from_secs(90)), "`1min 30s` is 90 s");
        assert_eq!(
            unit.exec_reload,
            ["/usr/local/bin/baton upgrade --control /run/baton/control.sock"],
            "argv[] without the other fields"
        );
        let none = parse("TimeoutStopUSec=infinity\nExecReload=\n").unwrap();
        assert_eq!(
            (none.timeout_stop, none.exec_reload.len()),
            (None, 0),
            "no timeout, no reload command"
        );
        assert!(
            parse("FileDescriptorStoreMax=lots").is_err(),
            "a value that is not a number is an error"
        );
    }

    #[test]
    fn a_unit_that_contradicts_the_configuration_is_named() {
        let text = "[[listener]]\nname = \"p\"\naddress = \"127.0.0.1:1\"\n[timeouts]\ndrain = \"120s\"\n";
        let config = Config::parse(text, None).unwrap();
        let found = contradictions(&parse(SHOWN).unwrap(), &config);
        assert_eq!(found.len(), 2, "the store and the stop timeout: {found:?}");
        assert!(
            found[0].contains("FileDescriptorStoreMax=16 is below 60016"),
            "{}",
            found[0]
        );
        assert!(found[1].contains("shorter than [timeouts] drain"), "{}", found[1]);
        let other =
            parse("FileDescriptorStoreMax=65536\nExecReload={ path=/bin/kill ; argv[]=/bin/kill -HUP $MAINPID ; }")
                .unwrap();
        let found = contradictions(&other, &config);
        assert_eq!(found.len(), 1, "only the reload: {found:?}");
        assert!(found[0].contains("ExecReload= is not `baton upgrade`"), "{}", found[0]);
        let good =
            parse("FileDescriptorStoreMax=65536\nTimeoutStopUSec=3min\nExecReload={ argv[]=/usr/bin/baton upgrade ; }")
                .unwrap();
        assert!(
            contradictions(&good, &config).is_empty(),
            "a unit that fits says nothing"
        );
    }
}
