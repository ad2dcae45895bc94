//! The documentation against the code it describes:
//!
//! - docs/configuration.md's example (the block baton.toml(5) is generated from) names every
//!   key the configuration parser accepts, under its table, and no key the parser refuses. The
//!   parser's keys are not listed anywhere by hand: they are read from its own error for an
//!   unknown key (serde's `unknown field …, expected one of …`), table by table, so a key added
//!   to a `Raw*` struct and not to the reference fails here;
//! - every key of the embedded default configuration and of the shipped `systemd/baton.toml`
//!   is documented there;
//! - README.md still opens with the two commands a newcomer needs;
//! - every relative link of README.md, docs/*.md and systemd/README.md names a file that
//!   exists, and a heading of it when it names one.

use std::collections::BTreeSet;
use std::path::Path;

use baton::config::{Config, EMBEDDED_DEFAULT};

const REFERENCE: &str = include_str!("../docs/configuration.md");
const SHIPPED: &str = include_str!("../systemd/baton.toml");
const README: &str = include_str!("../README.md");

/// A key no table has: the parser's error for it lists the keys the table has.
const PROBE: &str = "zz_not_a_key";

/// A key as written in a file (not a user name of a `limits.per_user` table such as `"*"`).
fn is_key(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Adds `prefix.key` for every key of `table`, its tables and its arrays of tables.
fn walk_table(prefix: &str, table: &toml::Table, out: &mut BTreeSet<String>) {
    for (key, value) in table.iter().filter(|(k, _)| is_key(k)) {
        let path = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(t) => walk_table(&path, t, out),
            toml::Value::Array(items) => {
                for t in items.iter().filter_map(toml::Value::as_table) {
                    walk_table(&path, t, out);
                }
            }
            _ => {}
        }
        out.insert(path);
    }
}

/// The keys of a configuration file, as dotted paths (`limits.per_client.bandwidth`).
fn file_keys(text: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    walk_table("", &text.parse().expect("valid TOML"), &mut keys);
    keys
}

/// The example of docs/configuration.md's "Keys" section.
fn example(reference: &str) -> &str {
    let section = reference
        .split_once("\n## Keys\n")
        .expect("docs/configuration.md has a \"## Keys\" section")
        .1;
    let block = section.split_once("```toml\n").expect("a ```toml block under Keys").1;
    block.split_once("\n```").expect("the block is closed").0
}

/// What the example documents, by the convention stated at the top of docs/configuration.md:
/// each table by its header, each key by a `key = value` line under it (or a commented
/// alternative, `# key = value` from the first column), the keys of an inline table inside it.
fn documented(block: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut table = String::new();
    for (n, line) in block.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with('[') {
            let header = code.trim_start_matches('[');
            table = header[..header.find(']').expect("a closed header")].trim().to_string();
            keys.insert(table.clone());
            continue;
        }
        let parsed = match line.strip_prefix('#') {
            // A commented alternative, or a comment at the first column that is prose.
            Some(commented) => commented.parse::<toml::Table>().unwrap_or_default(),
            None => line
                .parse::<toml::Table>()
                .unwrap_or_else(|e| panic!("example line {}: {line:?}: {e}", n + 1)),
        };
        walk_table(&table, &parsed, &mut keys);
    }
    keys
}

/// The keys of the struct at `path` (each segment: a name, and whether it is an array of
/// tables), read from the parser's error for [`PROBE`] there; `None` when what is at `path`
/// is not a table of fixed keys.
fn fields_at(path: &[(String, bool)]) -> Option<Vec<String>> {
    let mut value = toml::Value::Table(toml::Table::from_iter([(PROBE.to_string(), 1.into())]));
    for (name, array) in path.iter().rev() {
        if *array {
            value = toml::Value::Array(vec![value]);
        }
        value = toml::Value::Table(toml::Table::from_iter([(name.clone(), value)]));
    }
    let text = toml::to_string(&value).expect("serialisable");
    let err = Config::parse(&text, None).err()?.to_string();
    let expected = err.split_once(&format!("unknown field `{PROBE}`, expected "))?.1;
    let expected = expected.split(" (at `").next().unwrap_or_default();
    Some(expected.split('`').skip(1).step_by(2).map(str::to_string).collect())
}

/// Every key the parser accepts, as dotted paths, tables included.
fn accepted() -> BTreeSet<String> {
    fn walk(path: &[(String, bool)], out: &mut BTreeSet<String>) {
        let fields = fields_at(path).unwrap_or_else(|| panic!("no fields at {path:?}"));
        for field in fields {
            let dotted: Vec<&str> = path.iter().map(|(n, _)| n.as_str()).chain([field.as_str()]).collect();
            out.insert(dotted.join("."));
            for array in [false, true] {
                let mut inner = path.to_vec();
                inner.push((field.clone(), array));
                if fields_at(&inner).is_some() {
                    walk(&inner, out);
                    break;
                }
            }
        }
    }
    let mut keys = BTreeSet::new();
    walk(&[], &mut keys);
    keys
}

#[test]
fn the_probe_reads_the_parsers_keys() {
    let keys = accepted();
    for key in [
        "listener.name",
        "listener.tls.alpn",
        "timeouts.canary",
        "limits.per_user.bandwidth",
        "access.rule.hosts",
        "upstream.route.proxy",
        "admin.token_file",
    ] {
        assert!(keys.contains(key), "{key} not found: {keys:?}");
    }
    assert!(keys.len() > 80, "{} keys: {keys:?}", keys.len());
    // A table that does not exist, and a key that is not a table, have no fields.
    assert_eq!(fields_at(&[("no_such_table".into(), false)]), None);
    assert_eq!(fields_at(&[("timeouts".into(), false), ("drain".into(), false)]), None);
}

#[test]
fn configuration_reference_documents_every_accepted_key() {
    let documented = documented(example(REFERENCE));
    let accepted = accepted();
    let missing: Vec<_> = accepted.difference(&documented).collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md's example (section \"Keys\") lacks keys the parser accepts: {missing:?}"
    );
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    assert!(
        unknown.is_empty(),
        "docs/configuration.md's example has keys the parser refuses: {unknown:?}"
    );
}

#[test]
fn configuration_reference_documents_the_default_and_shipped_keys() {
    let reference = documented(example(REFERENCE));
    for (name, text) in [
        ("the embedded default", EMBEDDED_DEFAULT),
        ("systemd/baton.toml", SHIPPED),
    ] {
        let keys = file_keys(text);
        assert!(keys.contains("listener.address"), "{name}: {keys:?}");
        let missing: Vec<_> = keys.difference(&reference).collect();
        assert!(
            missing.is_empty(),
            "docs/configuration.md lacks keys of {name}: {missing:?}"
        );
    }
    // The convention's reader sees what it must: a witness with a key left out.
    let block = "[timeouts]\ndrain = \"30s\"\n# upgrade = \"30s\"   # an alternative\n  # prose = 1\n";
    let seen = documented(block);
    assert!(
        seen.contains("timeouts.upgrade") && !seen.contains("timeouts.prose"),
        "{seen:?}"
    );
    assert!(!seen.contains("timeouts.canary"));
}

#[test]
fn readme_opens_with_the_two_commands() {
    assert!(
        README.starts_with("# baton\n\n    cargo run --release --bin baton\n    cargo test\n"),
        "README.md must open with the command that runs the proxy and the one that runs the tests"
    );
    assert!(
        README.lines().count() <= 250,
        "README.md is an introduction: at most 250 lines"
    );
}

/// GitHub's anchor for a heading: lower case, spaces to `-`, punctuation dropped.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

/// The relative link targets of a Markdown text: `](target)`.
fn links(text: &str) -> Vec<&str> {
    text.split("](")
        .skip(1)
        .filter_map(|rest| rest.split_once(')').map(|(target, _)| target))
        .filter(|t| !t.contains("://") && !t.starts_with("mailto:"))
        .collect()
}

#[test]
fn relative_links_resolve() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut pages = vec![root.join("README.md"), root.join("systemd/README.md")];
    for entry in std::fs::read_dir(root.join("docs")).unwrap() {
        pages.push(entry.unwrap().path());
    }
    let mut broken = Vec::new();
    for page in pages.iter().filter(|p| p.extension().is_some_and(|e| e == "md")) {
        let text = std::fs::read_to_string(page).unwrap();
        for link in links(&text) {
            let (file, heading) = link.split_once('#').unwrap_or((link, ""));
            let target = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            let ok = target.exists()
                && (heading.is_empty()
                    || std::fs::read_to_string(&target).is_ok_and(|t| {
                        t.lines()
                            .filter_map(|l| l.strip_prefix('#'))
                            .any(|h| anchor(h.trim_start_matches('#')) == heading)
                    }));
            if !ok {
                broken.push(format!("{}: {link}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "links that lead nowhere: {broken:#?}");
}
