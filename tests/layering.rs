//! docs/design.md's module maps state the layering: "a module uses only the modules listed
//! below it". This reads the maps and every `crate::` path in the code, and fails on a use
//! of a module listed above the user, naming both (so the document and the code cannot
//! drift apart silently).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The modules of one crate's map, top to bottom: (row, module path).
fn map_of(design: &str, heading: &str) -> Vec<(usize, String)> {
    let start = design
        .find(heading)
        .unwrap_or_else(|| panic!("design.md has no {heading:?}"));
    let mut rows = Vec::new();
    let mut in_table = false;
    for line in design[start..].lines().skip(1) {
        if !line.starts_with('|') {
            if in_table {
                break;
            }
            continue;
        }
        in_table = true;
        let first = line.split('|').nth(1).unwrap_or("");
        let row = rows.last().map_or(0, |(r, _): &(usize, String)| r + 1);
        for name in first.split('`').skip(1).step_by(2) {
            let name = name.trim_end_matches(".rs");
            if !name.is_empty() && name != "module" {
                rows.push((row, name.to_string()));
            }
        }
    }
    rows
}

/// The source files of `module` under `src`: its file, and the files of its directory that no
/// other row claims.
fn files_of(src: &Path, module: &str, all: &[(usize, String)]) -> Vec<PathBuf> {
    let rel = module.replace("::", "/");
    let mut files = vec![src.join(format!("{rel}.rs"))];
    let dir = src.join(&rel);
    if let Ok(entries) = std::fs::read_dir(&dir) {
        for e in entries.flatten() {
            let p = e.path();
            let stem = p.file_stem().and_then(|s| s.to_str()).unwrap_or("");
            let child = format!("{module}::{stem}");
            if p.extension().is_some_and(|x| x == "rs") && !all.iter().any(|(_, m)| *m == child) {
                files.push(p);
            }
        }
    }
    files.into_iter().filter(|f| f.exists()).collect()
}

/// Every module of the map that `text` names by a `crate::` path (the longest that is a row).
fn uses(text: &str, all: &[(usize, String)]) -> Vec<String> {
    let mut found = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let path: String = text[i + 7..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
        let hit = (1..=parts.len())
            .rev()
            .map(|n| parts[..n].join("::"))
            .find(|m| all.iter().any(|(_, r)| r == m));
        found.extend(hit);
    }
    found
}

fn violations(src: &Path, all: &[(usize, String)]) -> Vec<String> {
    let row: BTreeMap<&str, usize> = all.iter().map(|(r, m)| (m.as_str(), *r)).collect();
    let mut out = Vec::new();
    for (r, module) in all {
        for file in files_of(src, module, all) {
            let text = std::fs::read_to_string(&file).unwrap();
            // Unit tests may reach anywhere.
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            for used in uses(code, all) {
                if row[used.as_str()] < *r {
                    out.push(format!("{} ({module}) uses {used}, listed above it", file.display()));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

#[test]
fn every_module_uses_only_modules_listed_below_it() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let design = std::fs::read_to_string(root.join("docs/design.md")).unwrap();
    let mut broken = Vec::new();
    for (heading, src) in [
        ("**`baton`**", root.join("src")),
        ("**`baton-handoff`**", root.join("crates/baton-handoff/src")),
    ] {
        let all = map_of(&design, heading);
        assert!(all.len() > 8, "{heading}'s map was read: {all:?}");
        let checked: usize = all.iter().map(|(_, m)| files_of(&src, m, &all).len()).sum();
        assert!(
            checked >= all.len(),
            "{heading}: most rows have a file ({checked} files)"
        );
        broken.extend(violations(&src, &all));
    }
    assert!(broken.is_empty(), "layering broken:\n{}", broken.join("\n"));
}

/// The check sees a use upward: a positive witness on a made-up map.
#[test]
fn a_use_of_a_module_above_is_seen() {
    let all = vec![(0, "top".to_string()), (1, "low".to_string())];
    assert_eq!(
        uses("use crate::top::Thing;\nlet x = crate::low::f();", &all),
        ["top", "low"]
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("top.rs"), "use crate::low::X;").unwrap();
    std::fs::write(dir.path().join("low.rs"), "use crate::top::Y;").unwrap();
    let v = violations(dir.path(), &all);
    assert_eq!(v.len(), 1, "{v:?}");
    assert!(v[0].contains("(low) uses top"), "{v:?}");
}
