//! Logging through `tracing`: colours on a terminal, plain lines without timestamps under
//! journald (which stamps them itself), JSON lines when configured. Access lines use the
//! target `baton::access` and go to their own sink (`[log] access`: stderr or a file, text or
//! JSON lines). A file is opened (append) once by each generation at start, so after
//! logrotate renames it, the next handoff writes to a new file while the old generation
//! finishes its lines in the renamed one.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context as _;
use tracing::Subscriber;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::{FilterExt, filter_fn};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{AccessLog, AccessSink, LogFormat};
use crate::proxy::access::ACCESS_TARGET;

/// Logs to stderr in `format`, access lines to `access`. Fails if the access file cannot be
/// opened (a new generation then exits before it is ready, and the handoff rolls back).
pub fn init(format: LogFormat, access: &AccessLog) -> anyhow::Result<()> {
    let filter = || EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let ansi = !under_journald && std::io::stderr().is_terminal();
    let main = layer(format, std::io::stderr, ansi, under_journald, true)
        .with_filter(filter().and(filter_fn(|m| m.target() != ACCESS_TARGET)))
        .boxed();
    let access_layer = match &access.sink {
        AccessSink::Stderr => layer(access.format, std::io::stderr, ansi, under_journald, false),
        AccessSink::File(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("cannot open the access log {}", path.display()))?;
            layer(access.format, Arc::new(file), false, false, false)
        }
    }
    .with_filter(filter().and(filter_fn(|m| m.target() == ACCESS_TARGET)))
    .boxed();
    if let Err(e) = tracing_subscriber::registry().with(main).with(access_layer).try_init() {
        eprintln!("baton: logging already initialised: {e}");
    }
    Ok(())
}

type BoxedLayer<S> = Box<dyn Layer<S> + Send + Sync + 'static>;

fn layer<S, W>(format: LogFormat, writer: W, ansi: bool, without_time: bool, json_target: bool) -> BoxedLayer<S>
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
