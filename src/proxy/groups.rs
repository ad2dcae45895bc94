//! Groups of users for `@name` in a rule's `users`: an Apache htgroup file (`name: user
//! user …`, one group a line, `#` comments), read when a generation starts; an error names
//! the file and line.

use std::collections::{HashMap, HashSet};
use std::path::Path;

use crate::config::ConfigError;

#[derive(Debug, Default)]
pub struct Groups {
    members: HashMap<String, HashSet<String>>,
}

impl Groups {
    pub fn load(path: &Path) -> Result<Groups, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        Groups::parse(&text).map_err(|message| ConfigError::Invalid { path: file, message })
    }

    fn parse(text: &str) -> Result<Groups, String> {
        let mut members: HashMap<String, HashSet<String>> = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let Some((name, users)) = line.split_once(':') else {
                return Err(format!("line {}: want `group: user user …`", n + 1));
            };
            let name = name.trim();
            if name.is_empty() || name.contains(char::is_whitespace) {
                return Err(format!("line {}: `{name}` is not a group name", n + 1));
            }
            // A group written on several lines is their union, as Apache reads it.
            members
                .entry(name.to_string())
                .or_default()
                .extend(users.split_whitespace().map(str::to_string));
        }
        Ok(Groups { members })
    }

    /// The members of `group`; `None` if the file has no such group.
    pub fn members(&self, group: &str) -> Option<&HashSet<String>> {
        self.members.get(group)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn htgroup_lines_and_their_errors() {
        let g = Groups::parse("# teams\nops: alice bob\ncontractors:carol\nops: dave\nempty:\n").unwrap();
        let ops = g.members("ops").expect("ops is defined");
        assert!(
            ["alice", "bob", "dave"].iter().all(|u| ops.contains(*u)),
            "lines add up: {ops:?}"
        );
        assert!(
            g.members("contractors").unwrap().contains("carol"),
            "no space after the colon"
        );
        assert!(
            g.members("empty").unwrap().is_empty(),
            "a group with no members is a group"
        );
        assert!(g.members("nobody").is_none());
        let err = Groups::parse("ops: alice\nno colon here\n").unwrap_err();
        assert!(err.contains("line 2"), "names the line: {err}");
    }
}
