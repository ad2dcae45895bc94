//! `baton manual --out DIR` (hidden): the manual pages and shell completions that the Debian
//! package ships (`scripts/package` runs it on the binary it packages).
//!
//! baton(1), one page per subcommand and the completions come from the clap definitions
//! (clap_mangen, clap_complete). baton.toml(5) comes from the commented example configuration
//! in docs/configuration.md's "Keys" section, compiled in with `include_str!`: that file is the
//! only copy of the documented keys, so the page cannot drift from it, and a file whose
//! section no longer has that block (or a line this parser does not understand) makes this
//! command and its unit test fail instead of producing a page with keys missing
//! (`tests/docs.rs` checks that the block names every key the configuration parser accepts).

use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::Command;
use clap_complete::Shell;

/// The configuration reference, whose "Keys" section becomes baton.toml(5).
const CONFIGURATION: &str = include_str!("../docs/configuration.md");
/// Where the reference is, in the tree and in messages.
const CONFIGURATION_PATH: &str = "docs/configuration.md";

#[derive(clap::Args)]
pub struct ManualArgs {
    /// Directory to write into: man/ (baton.1, baton-SUBCOMMAND.1, baton.toml.5) and
    /// completions/ (baton.bash, _baton, baton.fish).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(args: &ManualArgs, cmd: Command) -> anyhow::Result<ExitCode> {
    for path in write_all(cmd, &args.out)? {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

const DESCRIPTION: &str = "\
baton is an HTTP/1.1 forward proxy (absolute-form requests and CONNECT tunnels) that replaces \
its own binary, or reloads its configuration, without refusing, resetting or truncating a \
client connection.

On a trigger (baton upgrade, systemctl reload baton, SIGUSR2 or SIGHUP) the running process \
starts the binary installed at the path it was started from, hands it the listening sockets, \
waits until the new generation serves, and only then stops accepting and drains. If the new \
binary or configuration fails, the old generation serves on and the failure is reported. \
baton rollback hands off the same way to the binary the serving generation took over from, \
held open since, for a new binary that passed its canary window but turned out wrong.

Without a subcommand baton runs the proxy with its embedded default configuration: one \
listener on 127.0.0.1:8080, loopback clients only.";

/// Sections of baton(1) after the generated ones (roff).
const MAIN_EXTRA: &str = r#".SH SIGNALS
.TP
\fBSIGUSR2\fR, \fBSIGHUP\fR
Hand off to a new generation (the binary at the same path, the configuration re\-read).
Refused (logged) while a handoff runs, or by a draining generation.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, finish the requests in flight, close idle keep\-alive connections, let
tunnels run until the drain timeout, exit 0. A second one exits at once (status 1).
.SH EXIT STATUS
0 on success; 1 when the configuration is invalid, when an upgrade failed (the old
generation serves on), or when a stop was forced.
.SH ENVIRONMENT
.TP
\fBBATON_LOG\fR
Log filter, e.g. \fBinfo,baton::access=warn\fR.
.TP
\fBLISTEN_FDS\fR, \fBLISTEN_FDNAMES\fR, \fBLISTEN_PID\fR
Listening sockets passed by systemd (baton.socket) or by the previous generation.
.TP
\fBNOTIFY_SOCKET\fR
Readiness, reloading and status notifications to systemd.
.SH FILES
.TP
\fI/etc/baton/baton.toml\fR
The configuration of baton.service; see \fBbaton.toml\fR(5).
.TP
\fI/lib/systemd/system/baton.socket\fR, \fI/lib/systemd/system/baton.service\fR
The units: \fBsystemctl reload baton\fR hands off to the installed binary and succeeds
only when the new generation serves.
.SH "SEE ALSO"
\fBbaton.toml\fR(5), \fBsystemctl\fR(1), \fBsystemd.socket\fR(5),
\fI/usr/share/doc/baton/README.md\fR,
\fI/usr/share/doc/baton/docs/\fR
"#;

/// Writes every page and completion under `out`; returns the paths written.
pub fn write_all(cmd: Command, out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let man_dir = out.join("man");
    let completion_dir = out.join("completions");
    for dir in [&man_dir, &completion_dir] {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut written = Vec::new();
    let mut write = |path: PathBuf, text: Vec<u8>| -> anyhow::Result<()> {
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        written.push(path);
        Ok(())
    };
    let version = cmd.get_version().unwrap_or_default().to_string();
    let mut pages = cmd.clone().long_about(DESCRIPTION).disable_help_subcommand(true);
    pages.build();
    write(man_dir.join("baton.1"), main_page(&pages)?)?;
    for sub in pages.get_subcommands().filter(|s| !s.is_hide_set()) {
        let page = clap_mangen::Man::new(sub.clone()).source(format!("baton {version}"));
        let mut roff = Vec::new();
        page.render(&mut roff)?;
        roff.extend_from_slice(b".SH \"SEE ALSO\"\n\\fBbaton\\fR(1), \\fBbaton.toml\\fR(5)\n");
        write(man_dir.join(page.get_filename()), roff)?;
    }
    write(man_dir.join("baton.toml.5"), config_page(&version)?.into_bytes())?;
    let mut cmd = without_hidden_subcommands(&cmd);
    for (shell, name) in [
        (Shell::Bash, "baton.bash"),
        (Shell::Zsh, "_baton"),
        (Shell::Fish, "baton.fish"),
    ] {
        let mut script = Vec::new();
        clap_complete::generate(shell, &mut cmd, "baton", &mut script);
        write(completion_dir.join(name), script)?;
    }
    Ok(written)
}

/// `cmd` without its hidden subcommands, which clap_complete would offer (it skips hidden
/// arguments only). Named `baton` like the completions, with this crate's version, as `Cli`.
fn without_hidden_subcommands(cmd: &Command) -> Command {
    Command::new("baton")
        .version(env!("CARGO_PKG_VERSION"))
        .about(cmd.get_about().cloned().unwrap_or_default())
        .args(cmd.get_arguments().cloned())
        .subcommands(cmd.get_subcommands().filter(|s| !s.is_hide_set()).cloned())
}

/// baton(1): clap_mangen's sections, then signals, exit status, environment, files.
fn main_page(cmd: &Command) -> anyhow::Result<Vec<u8>> {
    let man = clap_mangen::Man::new(cmd.clone());
    let mut roff = Vec::new();
    man.render_title(&mut roff)?;
    man.render_name_section(&mut roff)?;
    man.render_synopsis_section(&mut roff)?;
    man.render_description_section(&mut roff)?;
    man.render_options_section(&mut roff)?;
    man.render_subcommands_section(&mut roff)?;
    roff.extend_from_slice(MAIN_EXTRA.as_bytes());
    man.render_version_section(&mut roff)?;
    Ok(roff)
}

/// The "Keys" section of docs/configuration.md: the prose before and after its TOML block,
/// and the block itself.
struct Example {
    intro: Vec<String>,
    block: &'static str,
    after: Vec<String>,
}

fn config_example(reference: &'static str) -> anyhow::Result<Example> {
    let Some((_, section)) = reference.split_once("\n## Keys\n") else {
        bail!("{CONFIGURATION_PATH} has no \"## Keys\" section");
    };
    let Some((intro, rest)) = section
        .split_once("```toml\n")
        .filter(|(intro, _)| !intro.contains("\n#"))
    else {
        bail!("{CONFIGURATION_PATH}'s Keys section has no ```toml block");
    };
    let Some((block, after)) = rest.split_once("\n```") else {
        bail!("{CONFIGURATION_PATH}'s example is not closed with ```");
    };
    let after = after.split("\n#").next().unwrap_or_default();
    Ok(Example {
        intro: paragraphs(intro),
        block,
        after: paragraphs(after),
    })
}

fn paragraphs(text: &str) -> Vec<String> {
    text.split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|p| !p.is_empty())
        .collect()
}

/// One table of the example (`header` is empty for the top-level keys).
#[derive(Debug)]
struct Table {
    header: String,
    note: String,
    keys: Vec<Key>,
}

#[derive(Debug)]
struct Key {
    name: String,
    value: String,
    doc: String,
    /// Commented out in the example (an alternative to the key before it).
    commented: bool,
}

/// Splits `line` at the first `#` outside a string: (code, comment without the `#`).
fn split_comment(line: &str) -> (&str, Option<&str>) {
    let mut quote = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match (quote, c) {
            (Some('"'), '\\') if !escaped => {
                escaped = true;
                continue;
            }
            (Some(q), _) if c == q && !escaped => quote = None,
            (None, '"' | '\'') => quote = Some(c),
            (None, '#') => return (&line[..i], Some(line[i + 1..].trim())),
            _ => {}
        }
        escaped = false;
    }
    (line, None)
}

fn key_value(code: &str) -> Option<(String, String)> {
    let (key, value) = code.split_once('=')?;
    let (key, value) = (key.trim(), value.trim());
    let is_key = !key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    (is_key && !value.is_empty()).then(|| (key.to_string(), value.to_string()))
}

/// `# key = value   # doc` (the line after its leading `#`): a documented alternative key.
fn commented_key(line: &str) -> Option<Key> {
    let (code, doc) = split_comment(line);
    let (name, value) = key_value(code)?;
    let doc = doc.unwrap_or_default().to_string();
    Some(Key {
        name,
        value,
        doc,
        commented: true,
    })
}

fn append(doc: &mut String, more: &str) {
    if more.is_empty() {
        return;
    }
    if !doc.is_empty() {
        doc.push(' ');
    }
    doc.push_str(more);
}

/// Reads the example's tables and keys, with the comments that document them. A comment
/// line alone continues the documentation of the key before it; `# key = value` at the start
/// of a line is a documented alternative key.
fn parse_keys(block: &str) -> anyhow::Result<Vec<Table>> {
    let mut tables = vec![Table {
        header: String::new(),
        note: String::new(),
        keys: Vec::new(),
    }];
    for (n, line) in block.lines().enumerate() {
        let (code, comment) = split_comment(line);
        let comment = comment.unwrap_or_default();
        let code = code.trim();
        let table = tables.last_mut().expect("at least the top-level table");
        if code.starts_with('[') {
            tables.push(Table {
                header: code.to_string(),
                note: comment.to_string(),
                keys: Vec::new(),
            });
        } else if let Some((name, value)) = key_value(code) {
            table.keys.push(Key {
                name,
                value,
                doc: comment.to_string(),
                commented: false,
            });
        } else if !code.is_empty() {
            bail!("{CONFIGURATION_PATH} example, line {}: cannot read {line:?}", n + 1);
        } else if let Some(key) = line.strip_prefix('#').and_then(commented_key) {
            table.keys.push(key);
        } else if let Some(key) = table.keys.last_mut() {
            append(&mut key.doc, comment);
        } else if !comment.is_empty() {
            append(&mut table.note, comment);
        }
    }
    Ok(tables)
}

/// A text line for roff: backslashes escaped, a leading control character made literal.
fn roff_line(text: &str) -> String {
    let text = text.replace('\\', "\\e");
    if text.starts_with(['.', '\'']) {
        format!("\\&{text}")
    } else {
        text
    }
}

/// Code (keys, values): ASCII hyphens kept as such.
fn roff_code(text: &str) -> String {
    roff_line(text).replace('-', "\\-")
}

/// Markdown prose: `code` spans in bold.
fn roff_prose(text: &str) -> String {
    let mut out = String::new();
    for (i, part) in text.split('`').enumerate() {
        if i % 2 == 1 {
            let _ = write!(out, "\\fB{}\\fR", roff_code(part));
        } else {
            out.push_str(&part.replace('\\', "\\e"));
        }
    }
    if out.starts_with(['.', '\'']) {
        format!("\\&{out}")
    } else {
        out
    }
}

fn config_page(version: &str) -> anyhow::Result<String> {
    let example = config_example(CONFIGURATION)?;
    let tables = parse_keys(example.block)?;
    let mut r = format!(".TH BATON.TOML 5 \"\" \"baton {version}\" \"File Formats\"\n");
    r.push_str(".SH NAME\nbaton.toml \\- configuration of the baton HTTP forward proxy\n");
    r.push_str(".SH SYNOPSIS\n\\fI/etc/baton/baton.toml\\fR\n.PP\n");
    r.push_str("\\fBbaton run \\-\\-config\\fR \\fIFILE\\fR, \\fBbaton check \\-\\-config\\fR \\fIFILE\\fR\n");
    r.push_str(".SH DESCRIPTION\n");
    for p in &example.intro {
        let _ = write!(r, "{}\n.PP\n", roff_prose(p));
    }
    r.push_str(
        "\\fBbaton check \\-\\-config\\fR \\fIFILE\\fR validates a file. A running baton reads its \
        file again at every handoff: \\fBsystemctl reload baton\\fR applies a changed file, \
        and fails (the old generation serving on) when the new file is invalid.\n",
    );
    r.push_str(".SH KEYS\n");
    for table in &tables {
        let title = if table.header.is_empty() {
            "Top level"
        } else {
            &table.header
        };
        let _ = writeln!(r, ".SS \"{}\"", title.replace('"', "\\(dq"));
        if !table.note.is_empty() {
            let _ = write!(r, "{}\n.PP\n", roff_prose(&table.note));
        }
        for key in &table.keys {
            let alternative = if key.commented {
                " (commented out in the example)"
            } else {
                ""
            };
            let _ = write!(
                r,
                ".TP\n\\fB{}\\fR = {}{alternative}\n{}\n",
                roff_code(&key.name),
                roff_code(&key.value),
                roff_prose(&key.doc)
            );
        }
    }
    r.push_str(".SH EXAMPLE\n.nf\n");
    for line in example.block.lines() {
        let _ = writeln!(r, "{}", roff_code(line));
    }
    r.push_str(".fi\n.SH NOTES\n");
    for p in &example.after {
        let _ = write!(r, "{}\n.PP\n", roff_prose(p));
    }
    r.push_str(
        ".SH FILES\n\\fI/etc/baton/baton.toml\\fR, the configuration of baton.service \
        (a conffile of the Debian package: an upgrade keeps local changes).\n",
    );
    r.push_str(".SH \"SEE ALSO\"\n\\fBbaton\\fR(1), \\fBbaton\\-check\\fR(1), \\fBsystemd.socket\\fR(5)\n");
    Ok(r)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use clap::CommandFactory;

    use super::*;

    fn subcommands() -> Vec<String> {
        let cmd = crate::Cli::command();
        let names: Vec<String> = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set())
            .map(|s| s.get_name().to_string())
            .collect();
        assert!(names.len() >= 5, "{names:?}");
        names
    }

    /// Every key of the example in docs/configuration.md: the tables and keys TOML sees, plus the commented
    /// alternatives (`# key = value` at the start of a line).
    fn example_keys(block: &str) -> BTreeSet<String> {
        fn walk(table: &toml::Table, keys: &mut BTreeSet<String>) {
            for (key, value) in table {
                // `"*"` and `"@group"` in a per-user table name users, not keys.
                if key
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                {
                    keys.insert(key.clone());
                }
                match value {
                    toml::Value::Table(t) => walk(t, keys),
                    toml::Value::Array(items) => items
                        .iter()
                        .filter_map(toml::Value::as_table)
                        .for_each(|t| walk(t, keys)),
                    _ => {}
                }
            }
        }
        let mut keys = BTreeSet::new();
        walk(
            &block
                .parse::<toml::Table>()
                .expect("the example in docs/configuration.md is valid TOML"),
            &mut keys,
        );
        for line in block.lines().filter_map(|l| l.strip_prefix("# ")) {
            if let Some((key, _)) = key_value(split_comment(line).0) {
                keys.insert(key);
            }
        }
        keys
    }

    const COMPLETIONS: [&str; 3] = ["completions/baton.bash", "completions/_baton", "completions/baton.fish"];

    #[test]
    fn pages_and_completions_cover_every_subcommand_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let written = write_all(crate::Cli::command(), dir.path()).unwrap();
        let read = |p: &str| fs::read_to_string(dir.path().join(p)).unwrap_or_else(|e| panic!("{p}: {e}"));
        assert!(written.len() >= 10, "{written:?}");
        let main = read("man/baton.1");
        for name in subcommands() {
            assert!(main.contains(&format!("baton\\-{name}(1)")), "baton.1 lacks {name}");
            let page = read(&format!("man/baton-{name}.1"));
            assert!(
                page.contains(&format!(".TH baton-{name} 1 ")) && page.contains(".SH NAME"),
                "baton-{name}.1: {page}"
            );
            for completion in COMPLETIONS {
                assert!(read(completion).contains(&name), "{completion} lacks {name}");
            }
        }
        for completion in COMPLETIONS {
            let script = read(completion);
            for option in ["--config", "--control", "--json", "--wait-drain", "--tag", "--version"] {
                assert!(
                    script.contains(option.trim_start_matches('-')),
                    "{completion} lacks {option}"
                );
            }
            assert!(!script.contains("manual"), "{completion} offers the hidden subcommand");
        }
        assert!(
            !main.contains("manual") && !dir.path().join("man/baton-manual.1").exists(),
            "the hidden subcommand is documented"
        );
        for heading in ["SIGNALS", "FILES", "VERSION"] {
            assert!(main.contains(&format!(".SH {heading}")), "baton.1 lacks {heading}");
        }

        let config = read("man/baton.toml.5");
        let example = config_example(CONFIGURATION).unwrap();
        let keys = example_keys(example.block);
        assert!(
            keys.len() > 30 && keys.contains("path") && keys.contains("allow_clients"),
            "{keys:?}"
        );
        for key in &keys {
            assert!(
                config.contains(&format!("\\fB{}\\fR = ", roff_code(key)))
                    || config.contains(&format!(".SS \"[{key}]\""))
                    || config.contains(&format!(".SS \"[[{key}]]\""))
                    // A nested table: `[[upstream.route]]`, `[limits.per_client]`.
                    || config.contains(&format!(".{key}]]\""))
                    || config.contains(&format!(".{key}]\"")),
                "baton.toml.5 lacks key {key}"
            );
        }
        let parsed: BTreeSet<String> = parse_keys(example.block)
            .unwrap()
            .iter()
            .flat_map(|t| t.keys.iter().map(|k| k.name.clone()))
            .collect();
        assert!(
            parsed.is_subset(&keys),
            "parsed keys that are not in the example: {:?}",
            parsed.difference(&keys).collect::<Vec<_>>()
        );
    }

    #[test]
    fn comments_document_keys_and_continue_on_the_next_line() {
        let tables = parse_keys(
            "a = \"x # not a comment\"   # first\n              # second\n\n[[t]]   # one or more\nb = [1, 2]\n# c = 'y'   # instead of b\n",
        )
        .unwrap();
        assert_eq!(tables.len(), 2);
        let a = &tables[0].keys[0];
        assert_eq!(
            (a.name.as_str(), a.value.as_str(), a.doc.as_str()),
            ("a", "\"x # not a comment\"", "first second")
        );
        assert_eq!(
            (tables[1].header.as_str(), tables[1].note.as_str()),
            ("[[t]]", "one or more")
        );
        let c = &tables[1].keys[1];
        assert!(c.commented && c.name == "c" && c.doc == "instead of b", "{c:?}");
        assert!(parse_keys("what is this\n").is_err());
        assert!(config_example("# x\n## Keys\nno block\n## Next\n").is_err());
    }

    #[test]
    fn roff_escapes_control_characters_and_code() {
        assert_eq!(roff_code(".x-y\\z"), "\\&.x\\-y\\ez");
        assert_eq!(roff_prose("use `--config` here"), "use \\fB\\-\\-config\\fR here");
    }
}
