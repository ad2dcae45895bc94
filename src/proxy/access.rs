//! The access log: one line per answered request, refusal, tunnel, or connection hyper
//! closed itself, all written by [`AccessLine::write`] under the target [`ACCESS_TARGET`]
//! (the daemon's logging sends that target to its own sink). The fields keep one order, and
//! a field without a value is left out.

use std::time::Instant;

use baton_handoff::Peer;
use http::{Method, StatusCode, Uri};
use tracing::{info, warn};

/// The `tracing` target of access lines.
pub const ACCESS_TARGET: &str = "baton::access";

/// What the line is about; it sets the message and the level (refusals are warnings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A request forwarded to its origin, logged when its response body ended.
    Request,
    /// A CONNECT tunnel, logged when it ended.
    Tunnel,
    /// Answered by the proxy with an error status.
    Refused,
    /// Refused by a policy rule.
    Denied,
    /// Closed without an answer (the request head did not arrive in time).
    Closed,
}

/// One access line. Build it with [`AccessLine::new`] and the setters, then write it.
#[derive(Debug, Clone)]
pub struct AccessLine<'a> {
    kind: Kind,
    client: Peer,
    method: Option<&'a Method>,
    target: Option<&'a Uri>,
    status: Option<u16>,
    rule: Option<&'static str>,
    bytes_in: Option<u64>,
    bytes_out: Option<u64>,
    /// When the request started; the line's `ms` is computed only if the line is written.
    started: Option<Instant>,
    complete: Option<bool>,
    outcome: Option<&'static str>,
    relay: Option<&'static str>,
    reason: Option<&'a str>,
}

/// How a tunnel ended (`outcome`), and how its bytes moved (`relay`: `splice` or `copy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub end: &'static str,
    pub relay: Option<&'static str>,
}

impl From<&'static str> for Outcome {
    fn from(end: &'static str) -> Outcome {
        Outcome { end, relay: None }
    }
}

impl<'a> AccessLine<'a> {
    pub fn new(kind: Kind, client: Peer) -> AccessLine<'a> {
        AccessLine {
            kind,
            client,
            method: None,
            target: None,
            status: None,
            rule: None,
            bytes_in: None,
            bytes_out: None,
            started: None,
            complete: None,
            outcome: None,
            relay: None,
            reason: None,
        }
    }

    /// The request as the client sent it, and its answer's status.
    pub fn request(mut self, method: &'a Method, target: &'a Uri, status: StatusCode) -> Self {
        (self.method, self.target, self.status) = (Some(method), Some(target), Some(status.as_u16()));
        self
    }

    pub fn status(mut self, status: StatusCode) -> Self {
        self.status = Some(status.as_u16());
        self
    }

    /// Bytes received from and sent to the client (bodies or tunnel payload), and the time
    /// since the request started.
    pub fn traffic(mut self, bytes_in: u64, bytes_out: u64, started: Instant) -> Self {
        (self.bytes_in, self.bytes_out) = (Some(bytes_in), Some(bytes_out));
        self.started = Some(started);
        self
    }

    pub fn rule(mut self, rule: &'static str) -> Self {
        self.rule = Some(rule);
        self
    }

    /// Whether the response body reached its end (else the client or the origin left).
    pub fn complete(mut self, complete: bool) -> Self {
        self.complete = Some(complete);
        self
    }

    /// How a tunnel ended (and how it relayed, when known).
    pub fn outcome(mut self, outcome: impl Into<Outcome>) -> Self {
        let Outcome { end, relay } = outcome.into();
        (self.outcome, self.relay) = (Some(end), relay);
        self
    }

    pub fn reason(mut self, reason: &'a str) -> Self {
        self.reason = Some(reason);
        self
    }

    pub fn write(&self) {
        let method = self.method.map(tracing::field::display);
        let target = self.target.map(tracing::field::display);
        macro_rules! line {
            ($level:ident, $message:literal) => {
                $level!(
                    target: "baton::access",
                    client = %self.client,
                    method,
                    target,
                    status = self.status,
                    rule = self.rule,
                    bytes_in = self.bytes_in,
                    bytes_out = self.bytes_out,
                    ms = self.started.map(|s| s.elapsed().as_millis() as u64),
                    complete = self.complete,
                    outcome = self.outcome,
                    relay = self.relay,
                    reason = self.reason,
                    $message
                )
            };
        }
        match self.kind {
            Kind::Request => line!(info, "request"),
            Kind::Tunnel => line!(info, "tunnel"),
            Kind::Refused => line!(warn, "refused"),
            Kind::Denied => line!(warn, "denied"),
            Kind::Closed => line!(info, "closed"),
        }
    }
}
