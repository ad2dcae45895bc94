//! The status page for people (`GET /` on the admin listener), like HAProxy's stats page: one
//! self-contained HTML document (`status_page.html`: inline style and script, no external
//! asset, which its Content-Security-Policy enforces) whose script polls `GET /status.json`
//! every second and redraws the generations, the last handoffs and the traffic history.
//! This module owns the page and the JSON document it reads.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::control::Status;
use crate::daemon::state_dir::{HandoffRecord, StateDir};
use crate::daemon::traffic;

/// The page, as served.
pub const HTML: &str = include_str!("status_page.html");

/// Nothing but the page itself and `/status.json` on the same origin.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'unsafe-inline'; \
     script-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// `/status.json`.
#[derive(Debug, Serialize)]
pub struct Document<'a> {
    /// The answering generation's clock, so the page measures ages against it.
    pub now_unix_ms: u64,
    /// What `baton status --json` says: the serving generation and the draining ones.
    pub status: &'a Status,
    pub handoffs: Handoffs,
    pub traffic: Traffic,
}

/// From the ledger.
#[derive(Debug, Serialize)]
pub struct Handoffs {
    /// Handoffs by result since the first generation started.
    pub totals: BTreeMap<String, u64>,
    /// The last ones, oldest first.
    pub recent: Vec<HandoffRecord>,
}

/// Per-second counts over the last [`traffic::SECONDS`], oldest first: one entry per second
/// from `start_unix` on, in columns.
#[derive(Debug, Serialize)]
pub struct Traffic {
    pub start_unix: u64,
    pub interval_s: u64,
    pub requests: Vec<u64>,
    pub client_errors: Vec<u64>,
    pub server_errors: Vec<u64>,
}

/// The JSON document for `status`, read from the state directory at `now`.
pub fn document(status: &Status, state: &StateDir, now: SystemTime) -> String {
    let ledger = state.ledger();
    let buckets = traffic::history(state, now);
    let doc = Document {
        now_unix_ms: now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        status,
        handoffs: Handoffs {
            totals: ledger.handoffs,
            recent: ledger.recent,
        },
        traffic: Traffic {
            start_unix: buckets.first().map_or(0, |b| b.t),
            interval_s: 1,
            requests: buckets.iter().map(|b| b.requests).collect(),
            client_errors: buckets.iter().map(|b| b.client_errors).collect(),
            server_errors: buckets.iter().map(|b| b.server_errors).collect(),
        },
    };
    // Plain data (strings, numbers, maps with string keys): serializing cannot fail.
    serde_json::to_string(&doc).unwrap_or_else(|e| format!("{{\"error\":{:?}}}", e.to_string()))
}
