//! Logging through `tracing`: colours on a terminal, plain lines without timestamps under
//! journald (which stamps them itself), JSON lines when configured. Access lines use the
//! target `baton::access`.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let under_journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let result = match (format, under_journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).try_init(),
        (LogFormat::Text, true) => builder.with_ansi(false).without_time().try_init(),
        (LogFormat::Text, false) => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
    };
    if let Err(e) = result {
        eprintln!("baton: logging already initialised: {e}");
    }
}
