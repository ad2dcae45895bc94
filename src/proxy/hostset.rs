//! A set of host patterns that stays small and fast at a million entries: a rule's `hosts`,
//! written inline or as `@FILE` lists (read here, each error naming the file and line). Names
//! live in one arena string, indexed by a hash table of `u32`s (about 35 bytes a name in all,
//! where a `HashSet<String>` costs over 80), and a lookup probes once per label of the host.
//! Addresses and CIDRs are few and matched in a list. The hash is foldhash with a seed of
//! this process's own: hosts come from clients, and a seed they cannot know keeps them from
//! aiming at one bucket.

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::path::Path;

use foldhash::fast::RandomState;
use hashbrown::HashTable;
use ipnet::IpNet;

use crate::config::{ConfigError, HostPattern};

/// The bit of a table entry that marks a domain (the name and every name under it).
const DOMAIN: u32 = 1 << 31;

#[derive(Default)]
pub struct HostSet {
    any: bool,
    names: Names,
    nets: Vec<IpNet>,
}

/// What matched a host: for `baton check --explain`.
#[derive(Debug, PartialEq, Eq)]
pub enum Found<'a> {
    Any,
    Net(IpNet),
    Name(&'a str),
    Domain(&'a str),
}

impl std::fmt::Display for Found<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Found::Any => f.write_str("*"),
            Found::Net(n) => write!(f, "{n}"),
            Found::Name(n) => f.write_str(n),
            Found::Domain(d) => write!(f, "*.{d}"),
        }
    }
}

impl HostSet {
    pub fn add(&mut self, pattern: &HostPattern) {
        match pattern {
            HostPattern::Any => self.any = true,
            HostPattern::Net(n) => self.nets.push(*n),
            HostPattern::Name(n) => self.names.insert(n, false),
            HostPattern::Domain(d) => self.names.insert(d, true),
        }
    }

    /// A list file: one pattern a line; blank lines and `#` comments are skipped.
    pub fn load(path: &Path) -> Result<HostSet, ConfigError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: file.clone(),
            source,
        })?;
        let lines = text.bytes().filter(|&b| b == b'\n').count() + 1;
        let mut set = HostSet {
            names: Names::with_capacity(lines, text.len()),
            ..HostSet::default()
        };
        for (n, line) in text.lines().enumerate() {
            let entry = line.split('#').next().unwrap_or("").trim();
            if entry.is_empty() || set.add_plain(entry) {
                continue;
            }
            let pattern = HostPattern::parse(entry).map_err(|m| ConfigError::Invalid {
                path: file.clone(),
                message: format!("line {}: {m}", n + 1),
            })?;
            set.add(&pattern);
        }
        set.names.shrink();
        Ok(set)
    }

    /// Adds `entry` if it is a lowercase name or domain as lists mostly hold them (no copy
    /// made to parse it); `false`: anything else, for [`HostPattern::parse`] to read or refuse.
    fn add_plain(&mut self, entry: &str) -> bool {
        let (domain, name) = match entry.strip_prefix("*.").or_else(|| entry.strip_prefix('.')) {
            Some(d) => (true, d),
            None => (false, entry),
        };
        let label_ok = |label: &str| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_".contains(&b))
        };
        // An address is a CIDR entry, not a name, though 192.0.2.1 passes the labels.
        let numeric = name
            .rsplit('.')
            .next()
            .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()));
        let plain = name.len() <= 253 && !numeric && name.split('.').all(label_ok);
        if plain {
            self.names.insert(name, domain);
        }
        plain
    }

    /// Patterns in the set (a name written both as itself and as a domain counts once).
    pub fn len(&self) -> usize {
        usize::from(self.any) + self.names.ends.len() + self.nets.len()
    }

    /// Whether a name could match (a server name, say, not known yet).
    pub fn has_names(&self) -> bool {
        self.any || !self.names.ends.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// What in the set matches `host` (lowercase, no trailing dot; `ip`: the address it is
    /// written as, canonical).
    pub fn find(&self, host: &str, ip: Option<IpAddr>) -> Option<Found<'_>> {
        if self.any {
            return Some(Found::Any);
        }
        match ip {
            Some(ip) => self.nets.iter().find(|n| n.contains(&ip)).map(|n| Found::Net(*n)),
            None => self.names.find(host),
        }
    }
}

/// Names and domains, each once, in one string.
struct Names {
    text: String,
    /// Where each name ends in `text` (it starts where the previous one ends).
    ends: Vec<u32>,
    /// Index into `ends`, with `DOMAIN` set for a domain.
    table: HashTable<u32>,
    hasher: RandomState,
    /// Bit n: some name (`names`) or domain (`domains`) has n + 1 labels (the last bit: 64
    /// or more). A lookup probes only the suffixes of a host that have a length some entry
    /// has: most lists hold names of three to five labels, so most probes are skipped.
    name_depths: u64,
    domain_depths: u64,
}

impl Default for Names {
    fn default() -> Names {
        Names::with_capacity(0, 0)
    }
}

/// Entry `e`'s name.
fn name_in<'t>(text: &'t str, ends: &[u32], e: u32) -> &'t str {
    let i = (e & !DOMAIN) as usize;
    let start = if i == 0 { 0 } else { ends[i - 1] as usize };
    &text[start..ends[i] as usize]
}

/// The bit of a name with `labels` labels in a depth mask.
fn depth_bit(labels: usize) -> u64 {
    1 << (labels.clamp(1, 64) - 1)
}

impl Names {
    fn with_capacity(names: usize, bytes: usize) -> Names {
        Names {
            text: String::with_capacity(bytes),
            ends: Vec::with_capacity(names),
            table: HashTable::with_capacity(names),
            hasher: RandomState::default(),
            name_depths: 0,
            domain_depths: 0,
        }
    }

    fn name(&self, entry: u32) -> &str {
        name_in(&self.text, &self.ends, entry)
    }

    fn get(&self, name: &str) -> Option<u32> {
        let hash = self.hasher.hash_one(name);
        self.table.find(hash, |&e| self.name(e) == name).copied()
    }

    /// Adds `name`; written twice, a name is a domain if either said so.
    fn insert(&mut self, name: &str, domain: bool) {
        let bit = depth_bit(name.split('.').count());
        if domain {
            self.domain_depths |= bit;
        } else {
            self.name_depths |= bit;
        }
        let hash = self.hasher.hash_one(name);
        let flag = if domain { DOMAIN } else { 0 };
        let (text, ends, hasher) = (&self.text, &self.ends, &self.hasher);
        if let Some(e) = self.table.find_mut(hash, |&e| name_in(text, ends, e) == name) {
            *e |= flag;
            return;
        }
        let index = u32::try_from(self.ends.len()).expect("fewer than 2^31 names");
        self.text.push_str(name);
        self.ends
            .push(u32::try_from(self.text.len()).expect("a list under 4 GiB"));
        let (text, ends) = (&self.text, &self.ends);
        self.table
            .insert_unique(hash, index | flag, |&e| hasher.hash_one(name_in(text, ends, e)));
    }

    /// `host` itself, else the nearest domain above it.
    fn find(&self, host: &str) -> Option<Found<'_>> {
        let mut labels = host.bytes().filter(|&b| b == b'.').count() + 1;
        if (self.name_depths | self.domain_depths) & depth_bit(labels) != 0
            && let Some(e) = self.get(host)
        {
            let name = self.name(e);
            return Some(if e & DOMAIN != 0 {
                Found::Domain(name)
            } else {
                Found::Name(name)
            });
        }
        let mut rest = host;
        while let Some((_, parent)) = rest.split_once('.') {
            labels -= 1;
            if self.domain_depths & depth_bit(labels) != 0
                && let Some(e) = self.get(parent).filter(|e| e & DOMAIN != 0)
            {
                return Some(Found::Domain(self.name(e)));
            }
            rest = parent;
        }
        None
    }

    fn shrink(&mut self) {
        self.text.shrink_to_fit();
        self.ends.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(patterns: &[&str]) -> HostSet {
        let mut s = HostSet::default();
        for p in patterns {
            s.add(&HostPattern::parse(p).unwrap());
        }
        s
    }

    #[test]
    fn names_domains_and_addresses() {
        let s = set(&[
            "mirror.example.org",
            "*.packages.example",
            "192.0.2.0/24",
            "git.example.com",
        ]);
        assert_eq!(
            s.find("mirror.example.org", None),
            Some(Found::Name("mirror.example.org"))
        );
        assert_eq!(s.find("example.org", None), None, "a name is not a domain");
        assert_eq!(s.find("a.mirror.example.org", None), None, "nor are names under it");
        assert_eq!(
            s.find("x.y.packages.example", None),
            Some(Found::Domain("packages.example"))
        );
        assert_eq!(
            s.find("packages.example", None),
            Some(Found::Domain("packages.example"))
        );
        assert_eq!(s.find("xpackages.example", None), None, "only whole labels");
        let ip = "192.0.2.9".parse().unwrap();
        assert_eq!(
            s.find("192.0.2.9", Some(ip)),
            Some(Found::Net("192.0.2.0/24".parse().unwrap()))
        );
        let other = "198.51.100.1".parse().unwrap();
        assert_eq!(s.find("198.51.100.1", Some(other)), None, "an address outside the CIDR");
        assert_eq!(s.len(), 4);
    }

    #[test]
    fn a_name_written_as_both_is_a_domain() {
        let s = set(&["corp.example", ".corp.example"]);
        assert_eq!(s.find("a.corp.example", None), Some(Found::Domain("corp.example")));
        assert_eq!(s.len(), 1, "two patterns, one name kept once");
        assert!(set(&["*"]).find("anything", None).is_some());
    }

    #[test]
    fn a_list_file_names_its_bad_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("list.txt");
        std::fs::write(&path, "# CI mirrors\nmirror.example.org\n\n.packages.example # all\n").unwrap();
        let s = HostSet::load(&path).unwrap();
        assert!(
            s.find("a.packages.example", None).is_some(),
            "the comment after the entry is cut"
        );
        assert!(s.find("mirror.example.org", None).is_some());
        std::fs::write(&path, "ok.example\nbad name\n").unwrap();
        let err = HostSet::load(&path)
            .err()
            .expect("a bad line fails the list")
            .to_string();
        assert!(
            err.contains("list.txt") && err.contains("line 2"),
            "names file and line: {err}"
        );
    }
}
