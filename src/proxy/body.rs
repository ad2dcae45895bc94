//! The bodies on their way through the proxy: the client's request body (counted, limited,
//! its faults blamed on the client) and the origin's response body (counted, and logged
//! when it ends).

use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Instant;

use baton_handoff::Peer;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, Uri};
use hyper::body::{Body as HttpBody, Frame, Incoming, SizeHint};

use crate::proxy::access::{AccessLine, Kind, Sent};
use crate::proxy::limits::{Pacer, Throttle};
use crate::proxy::metrics;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What was wrong with a client's request body, found while streaming it.
#[derive(Debug, thiserror::Error)]
pub enum BodyFault {
    #[error("request body larger than {0} bytes")]
    TooLarge(u64),
    #[error("invalid request body: {0}")]
    Invalid(String),
}

impl BodyFault {
    pub fn status(&self) -> StatusCode {
        match self {
            BodyFault::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            BodyFault::Invalid(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// The client's request body on its way to the origin: counted, limited, and its faults
/// recorded so the answer blames the client (413/400), not the origin (502).
pub struct Counted {
    inner: Incoming,
    stats: Arc<BodyStats>,
    limit: Option<u64>,
}

impl Counted {
    pub fn new(inner: Incoming, stats: Arc<BodyStats>, limit: Option<u64>) -> Counted {
        Counted { inner, stats, limit }
    }
}

/// What streaming the request body found: its size so far, and its fault if any.
#[derive(Default)]
pub struct BodyStats {
    bytes: AtomicU64,
    fault: std::sync::OnceLock<BodyFault>,
}

impl BodyStats {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    pub fn fault(&self) -> Option<&BodyFault> {
        self.fault.get()
    }
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let total = self.stats.bytes.fetch_add(data.len() as u64, Ordering::Relaxed) + data.len() as u64;
                    if let Some(max) = self.limit
                        && total > max
                    {
                        let _ = self.stats.fault.set(BodyFault::TooLarge(max));
                        return Poll::Ready(Some(Err(BodyFault::TooLarge(max).into())));
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                let _ = self.stats.fault.set(BodyFault::Invalid(with_causes(&e)));
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// `e` and its causes, `: `-separated (hyper's message alone does not say what was wrong,
/// e.g. which chunked framing rule the body broke).
fn with_causes(e: &hyper::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// What the access line of a forwarded request says besides the byte counts.
pub struct AccessRecord {
    pub peer: Peer,
    pub method: Method,
    pub target: Uri,
    /// The client's HTTP version (`proto=h2` on an HTTP/2 stream's line).
    pub version: http::Version,
    pub status: StatusCode,
    pub started: Instant,
    /// The client connection's byte count (for the Squid line).
    pub sent: Arc<Sent>,
    /// For the Squid line: the authenticated user, the next hop's address, the content type.
    pub user: Option<String>,
    /// The rule that allowed it.
    pub rule: Option<&'static str>,
    pub server: IpAddr,
    /// The parent proxy `server` is, if it is one.
    pub parent: Option<Arc<str>>,
    pub content_type: Option<HeaderValue>,
}

/// The response body on its way to the client; writes the access line and the request
/// metrics when it is done (or dropped, when the client went away). Under a bandwidth
/// limit its frames go out as the buckets allow, split where they must be.
pub struct AccessLogged {
    inner: Incoming,
    /// The bandwidth limit, if one applies; boxed: most bodies have none.
    pacer: Option<Box<Paced>>,
    bytes_out: u64,
    /// The body said it ended. A chunked `Incoming` never reports `is_end_stream` (its
    /// length is unknown), so its end is seen here.
    ended: bool,
    request_body: Arc<BodyStats>,
    record: Option<AccessRecord>,
}

/// A body's pacer and the part of a frame it has not let out yet.
struct Paced {
    pacer: Pacer,
    held: Bytes,
}

impl AccessLogged {
    pub fn new(
        inner: Incoming,
        request_body: Arc<BodyStats>,
        record: AccessRecord,
        throttle: Option<Throttle>,
    ) -> AccessLogged {
        AccessLogged {
            inner,
            pacer: throttle.map(|t| {
                Box::new(Paced {
                    pacer: Pacer::new(t),
                    held: Bytes::new(),
                })
            }),
            bytes_out: 0,
            ended: false,
            request_body,
            record: Some(record),
        }
    }
}
impl HttpBody for AccessLogged {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        if self.pacer.is_some() {
            return self.poll_paced(cx);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => self.bytes_out += frame.data_ref().map_or(0, |d| d.len() as u64),
            Poll::Ready(None) => self.ended = true,
            Poll::Ready(Some(Err(_))) | Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.held() == 0 && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        let held = self.held() as u64;
        if held > 0 {
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + held);
            }
            hint.set_lower(hint.lower() + held);
        }
        hint
    }
}

impl AccessLogged {
    /// Bytes read from the origin that the bandwidth limit has not let out yet.
    fn held(&self) -> usize {
        self.pacer.as_ref().map_or(0, |p| p.held.len())
    }

    /// Under a bandwidth limit: each data frame goes out in the parts the buckets allow
    /// (a timer wakes the task when they are empty); other frames as they come.
    fn poll_paced(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        loop {
            let Some(paced) = self.pacer.as_deref_mut() else {
                return Poll::Ready(None);
            };
            if !paced.held.is_empty() {
                let n = std::task::ready!(paced.pacer.poll_take(cx, paced.held.len()));
                let part = paced.held.split_to(n.min(paced.held.len()));
                self.bytes_out += part.len() as u64;
                return Poll::Ready(Some(Ok(Frame::data(part))));
            }
            match std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => paced.held = data,
                    Err(other) => return Poll::Ready(Some(Ok(other))),
                },
                None => {
                    self.ended = true;
                    return Poll::Ready(None);
                }
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
            }
        }
    }
}

impl Drop for AccessLogged {
    fn drop(&mut self) {
        if let Some(r) = self.record.take() {
            let bytes_in = self.request_body.bytes();
            metrics::request_done(&r.method, r.status, r.started, bytes_in, self.bytes_out, false);
            AccessLine::new(Kind::Request, r.peer)
                .request(r.method, r.target, r.status)
                .traffic(bytes_in, self.bytes_out, r.started)
                .complete(self.ended || self.inner.is_end_stream())
                .sent(r.sent)
                .user(r.user)
                .rule_of(r.rule)
                .proto_of(r.version)
                .server(Some(r.server))
                .parent(r.parent)
                .content_type(r.content_type)
                .write();
        }
    }
}
