//! Logging through `tracing`. On stderr: colours on a terminal, else plain lines, JSON lines
//! when configured. Under journald (stderr is the stream `$JOURNAL_STREAM` names), the
//! native journal protocol instead: each generation's entries carry its own `_PID` (a stream
//! would carry the pid of the generation that opened it, the first one) and the event's
//! fields, with `GENERATION=` on every entry.
//!
//! Access lines use the target `baton::access` and go to their own sink (`[log] access`):
//! with the rest (stderr, or the journal), or a file (text, JSON lines or Squid's native
//! format). Each generation opens the file (append) when it starts, and reopens it when its
//! path no longer names the open file (logrotate renamed or removed it): a thread checks once
//! a second. Each line is one `write(2)` on the file (tracing formats a whole line, then
//! writes it; nothing is buffered in between), so a reader never sees half a line and
//! nothing waits in a buffer at exit.
//!
//! The file is opened with `O_NOFOLLOW` (mode 0640 when created): a symlink planted at its
//! path (in a log directory another user can write to, say) would make baton append to
//! whatever it names. At start that is an error naming the path; at a reopen, a warning
//! naming it, and lines go on to the file already open (the rotated one) until the path
//! names a real file again.

use std::fs::File;
use std::io::IsTerminal;
use std::os::fd::AsFd;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tracing::{Event, Subscriber, info, warn};
use tracing_journald::{Priority, PriorityMappings};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{AccessFormat, AccessLog, AccessSink, LogFormat};
use crate::proxy::access::{self, ACCESS_TARGET};

/// How often a generation checks that its access file is still the one at the path.
const REOPEN_CHECK: Duration = Duration::from_secs(1);

/// Logs to stderr (or the journal) in `format`, access lines to `access`; `generation` is
/// this process's generation number (`GENERATION=` in the journal). Fails if the access file
/// cannot be opened (a new generation then exits before it is ready, and the handoff rolls
/// back).
pub fn init(format: LogFormat, access: &AccessLog, generation: u64) -> anyhow::Result<()> {
    let filter = || EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let mut out = Stderr::detect(generation);
    let main = out
        .layer(format, true)
        .with_filter(filter().and(filter_fn(|m| m.target() != ACCESS_TARGET)))
        .boxed();
    if access.format == AccessFormat::Squid {
        access::use_squid_format();
    }
    let mut access_file = None;
    let access_layer = match &access.sink {
        AccessSink::Stderr => out.access_layer(access.format),
        AccessSink::File(path) => {
            let file = Arc::new(AccessFile::open(path)?);
            access_file = Some(file.clone());
            match access_format(access.format) {
                Some(format) => fmt_layer(format, AccessWriter(file), false, false, false),
                None => squid_layer(AccessWriter(file)),
            }
        }
    }
    .with_filter(filter().and(filter_fn(|m| m.target() == ACCESS_TARGET)))
    .boxed();
    if let Err(e) = tracing_subscriber::registry().with(main).with(access_layer).try_init() {
        eprintln!("baton: logging already initialised: {e}");
        return Ok(());
    }
    if let Some(e) = out.journal_failed {
        warn!("stderr is the journal's stream, but its native socket failed ({e}): logging lines to stderr");
    }
    if let Some(file) = access_file {
        spawn_reopener(file)?;
    }
    Ok(())
}

type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

/// Where the operational log goes (and access lines that go with it).
struct Stderr {
    mode: Mode,
    generation: u64,
    /// Why the journal's socket could not be used although stderr is its stream.
    journal_failed: Option<std::io::Error>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Terminal,
    /// Plain lines: a file or pipe, or the journal's stream when its socket failed (then
    /// without timestamps, which journald adds).
    Plain {
        journal_stream: bool,
    },
    Journal,
}

impl Stderr {
    fn detect(generation: u64) -> Stderr {
        let mode = if stderr_is_journal() {
            Mode::Journal
        } else if std::io::stderr().is_terminal() {
            Mode::Terminal
        } else {
            Mode::Plain { journal_stream: false }
        };
        Stderr {
            mode,
            generation,
            journal_failed: None,
        }
    }

    /// A layer writing here; `operational`: not the access log (whose text lines keep their
    /// `baton::access` target, and whose JSON lines leave the event's target out).
    fn layer<S>(&mut self, format: LogFormat, operational: bool) -> BoxedLayer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        if let Some(journal) = self.journal() {
            return journal;
        }
        let ansi = self.mode == Mode::Terminal;
        let without_time = self.mode == (Mode::Plain { journal_stream: true });
        fmt_layer(format, std::io::stderr, ansi, without_time, operational)
    }

    /// The access lines' layer when they go here (in the journal, a Squid line is the
    /// entry's `MESSAGE=`).
    fn access_layer<S>(&mut self, format: AccessFormat) -> BoxedLayer<S>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        match access_format(format) {
            Some(format) => self.layer(format, false),
            None => self.journal().unwrap_or_else(|| squid_layer(std::io::stderr)),
        }
    }

    /// The journal's layer in journal mode, unless its socket fails (then plain lines).
    fn journal<S>(&mut self) -> Option<BoxedLayer<S>>
    where
        S: Subscriber + for<'a> LookupSpan<'a>,
    {
        if self.mode != Mode::Journal {
            return None;
        }
        match journal_layer(self.generation) {
            Ok(layer) => Some(layer.boxed()),
            Err(e) => {
                self.journal_failed = Some(e);
                self.mode = Mode::Plain { journal_stream: true };
                None
            }
        }
    }
}

/// The fields layout of an access format; `None`: Squid's line, which is its own layout.
fn access_format(format: AccessFormat) -> Option<LogFormat> {
    match format {
        AccessFormat::Text => Some(LogFormat::Text),
        AccessFormat::Json => Some(LogFormat::Json),
        AccessFormat::Squid => None,
    }
}

/// Squid lines: the event's message alone, no time stamp, level or target of tracing's
/// (the line starts with Squid's own time stamp).
fn squid_layer<S, W>(writer: W) -> BoxedLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .event_format(MessageOnly)
        .boxed()
}

/// Formats an event as its message (and fields, which Squid lines have none of).
struct MessageOnly;

impl<S, N> FormatEvent<S, N> for MessageOnly
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> std::fmt::Result {
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// The native journal protocol (tracing-journald). Field names unprefixed, so that the
/// fields are the event's own, upper-cased (`status` -> `STATUS=`); none of baton's field
/// names is one of journald's own (`PRIORITY`, `MESSAGE_ID`, `CODE_*`, `SYSLOG_*`, `ERRNO`...).
/// The layer adds `TARGET=` (the event's target) to every entry, so on access lines, whose
/// `target` is the request target, `TARGET=` appears twice: `baton::access` and the request.
fn journal_layer(generation: u64) -> std::io::Result<tracing_journald::Layer> {
    Ok(tracing_journald::layer()?
        .with_field_prefix(None)
        .with_syslog_identifier("baton".into())
        // syslog's meaning of the levels (the crate maps INFO to notice, DEBUG to info).
        .with_priority_mappings(PriorityMappings {
            info: Priority::Informational,
            debug: Priority::Debug,
            ..PriorityMappings::new()
        })
        .with_custom_fields([("GENERATION", generation.to_string())]))
}

/// systemd's documented test (systemd.exec(5), `$JOURNAL_STREAM`): the variable holds the
/// device and inode numbers of the journal stream the service manager connected, and stderr
/// is still that stream (not redirected by whoever started us).
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    nix::sys::stat::fstat(std::io::stderr().as_fd())
        .is_ok_and(|st| names_stream(&value.to_string_lossy(), st.st_dev, st.st_ino))
}

/// Whether `$JOURNAL_STREAM`'s `device:inode` is (`dev`, `ino`).
fn names_stream(value: &str, dev: u64, ino: u64) -> bool {
    let Some((d, i)) = value.split_once(':') else {
        return false;
    };
    d.parse() == Ok(dev) && i.parse() == Ok(ino)
}

fn fmt_layer<S, W>(format: LogFormat, writer: W, ansi: bool, without_time: bool, json_target: bool) -> BoxedLayer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(ansi)
        // Text lines keep `baton::access:` so they can be told apart (and grepped) on stderr.
        .with_target(json_target || format == LogFormat::Text);
    match (format, without_time) {
        // The access line's `target` field (the request target) must not collide with the
        // event's target in JSON: access lines leave the latter out.
        (LogFormat::Json, _) => fmt.json().flatten_event(true).with_current_span(false).boxed(),
        (LogFormat::Text, true) => fmt.without_time().boxed(),
        (LogFormat::Text, false) => fmt.boxed(),
    }
}

/// The access-log file and the path it was opened at.
struct AccessFile {
    path: PathBuf,
    open: RwLock<Opened>,
}

#[derive(Clone)]
struct Opened {
    file: Arc<File>,
    /// Device and inode: the path still names this file while they match.
    id: (u64, u64),
}

impl AccessFile {
    fn open(path: &Path) -> anyhow::Result<AccessFile> {
        let open = Opened::at(path).with_context(|| format!("cannot open the access log {}", path.display()))?;
        Ok(AccessFile {
            path: path.to_path_buf(),
            open: RwLock::new(open),
        })
    }

    fn current(&self) -> Opened {
        self.open.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Reopens the path when it no longer names the open file; `Ok(true)` if it did.
    fn reopen_if_moved(&self) -> std::io::Result<bool> {
        // lstat: a symlink at the path is another file, which `Opened::at` then refuses.
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if (m.dev(), m.ino()) == self.current().id => return Ok(false),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let opened = Opened::at(&self.path)?;
        *self.open.write().unwrap_or_else(PoisonError::into_inner) = opened;
        Ok(true)
    }
}

impl Opened {
    fn at(path: &Path) -> std::io::Result<Opened> {
        // O_CLOEXEC is the standard library's default; it is named to say it matters (the
        // successor gets only the fds it is meant to).
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o640)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) => std::io::Error::other(format!(
                    "{} is a symbolic link, which the access log does not follow",
                    path.display()
                )),
                _ => e,
            })?;
        let m = file.metadata()?;
        Ok(Opened {
            file: Arc::new(file),
            id: (m.dev(), m.ino()),
        })
    }
}

/// Hands each access line the file open now (lines written while it is swapped finish in
/// the file they started in: O_APPEND writes of whole lines).
#[derive(Clone)]
struct AccessWriter(Arc<AccessFile>);

impl<'a> MakeWriter<'a> for AccessWriter {
    type Writer = Arc<File>;

    fn make_writer(&'a self) -> Arc<File> {
        self.0.current().file
    }
}

/// Checks the access file's path once a second for the life of the process; logs each reopen
/// and each new reason it could not reopen (meanwhile lines go to the file still open).
fn spawn_reopener(file: Arc<AccessFile>) -> anyhow::Result<()> {
    let mut last_error = None;
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || {
            loop {
                std::thread::sleep(REOPEN_CHECK);
                match file.reopen_if_moved() {
                    Ok(reopened) => {
                        if reopened {
                            info!(path = %file.path.display(), "access log reopened: the path named another file or none");
                        }
                        last_error = None;
                    }
                    Err(e) => {
                        let e = e.to_string();
                        if last_error.as_ref() != Some(&e) {
                            warn!(path = %file.path.display(), "cannot reopen the access log, writing on to the open file: {e}");
                            last_error = Some(e);
                        }
                    }
                }
            }
        })
        .context("cannot start the access log's reopening thread")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_is_device_and_inode() {
        assert!(names_stream("8:1234", 8, 1234));
        assert!(!names_stream("8:1234", 8, 1235));
        assert!(!names_stream("9:1234", 8, 1234));
        assert!(!names_stream("8", 8, 1234));
        assert!(!names_stream("", 8, 1234));
        assert!(!names_stream("8:1234:5", 8, 1234));
    }

    #[test]
    fn access_file_reopens_when_renamed_or_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let file = AccessFile::open(&path).unwrap();
        assert!(!file.reopen_if_moved().unwrap(), "same file: no reopen");
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        assert!(file.reopen_if_moved().unwrap(), "renamed: reopened");
        assert!(path.exists());
        assert!(!file.reopen_if_moved().unwrap());
        std::fs::remove_file(&path).unwrap();
        assert!(file.reopen_if_moved().unwrap(), "removed: reopened");
        assert!(path.exists());
    }

    #[test]
    fn access_file_refuses_a_symlink_at_start_and_at_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("access.log");
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, "untouched").unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = AccessFile::open(&path).err().expect("a symlink is refused");
        assert!(format!("{err:#}").contains("symbolic link"), "{err:#}");
        std::fs::remove_file(&path).unwrap();
        let file = AccessFile::open(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        std::fs::rename(&path, dir.path().join("access.log.1")).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = file.reopen_if_moved().expect_err("a symlink is refused at reopen");
        assert!(err.to_string().contains("symbolic link"), "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "untouched");
    }
}
