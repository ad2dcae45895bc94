//! The optional admin listener (`[admin] address`): `/metrics` (Prometheus text format via
//! `prometheus-client`), `/healthz` (200 serving, 503 draining), `/status` (the JSON of
//! `baton status --json`), and the status page for people, `/` (`daemon::status_page`) with
//! the `/status.json` its script polls. It is handed over like the other listeners (name `admin`). A
//! generation that hands off stops serving it at once, so a scrape always reaches the serving
//! generation, which also reports the draining ones; a generation stopping without a successor
//! keeps answering (`/healthz` 503) until it exits. Every request first passes
//! `daemon::admin_guard` (clients, `Host`, token); connections beyond `[admin]
//! max_connections` are closed at accept.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use baton_handoff::{Drain, Peer, Socket, Stream};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::config::ADMIN_LISTENER;
use crate::control::{Status, answer_line};
use crate::daemon::admin_guard::{AdminGuard, CHALLENGES};
use crate::daemon::control_server::Command;
use crate::daemon::exporter;
use crate::daemon::state_dir::StateDir;
use crate::daemon::status_page;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminContext {
    pub drain: Drain,
    pub commands: mpsc::Sender<Command>,
    pub state: StateDir,
    pub generation: u64,
    /// `[admin]`'s access rules and connection slots.
    pub guard: Arc<AdminGuard>,
}

struct Admin {
    ctx: AdminContext,
    registry: Registry,
}

/// Serves the admin listener until `stop` is cancelled (a handoff's drain begins).
pub fn spawn(socket: Arc<Socket>, ctx: AdminContext, stop: CancellationToken) {
    let registry = exporter::registry(ctx.drain.clone(), ctx.state.clone(), ctx.generation);
    let admin = Arc::new(Admin { ctx, registry });
    tokio::spawn(async move {
        let serving = stop.clone();
        baton_handoff::accept_until(socket, ADMIN_LISTENER, stop, |stream, peer| {
            let Some(slot) = admin.ctx.guard.slot() else {
                // Beyond the limit the cheapest answer is none: the fd is closed at once.
                return warn!(client = %peer, "admin listener: [admin] max_connections reached, connection closed");
            };
            let Some(from) = Connection::of(&stream, peer) else {
                return;
            };
            let admin = admin.clone();
            let serving = serving.clone();
            tokio::spawn(async move {
                admin.serve(stream, from, serving).await;
                drop(slot);
            });
        })
        .await;
    });
}

/// Who a connection is from and where it was accepted, for the guard.
#[derive(Clone, Copy)]
struct Connection {
    client: IpAddr,
    local: SocketAddr,
}

impl Connection {
    /// `None` for a stream that is not TCP (the admin listener binds TCP only) or is gone.
    fn of(stream: &Stream, peer: Peer) -> Option<Connection> {
        let (Stream::Tcp(s), Peer::Ip(client)) = (stream, peer) else {
            return None;
        };
        let local = s.local_addr().ok()?;
        Some(Connection {
            client: client.ip(),
            local,
        })
    }
}

impl Admin {
    async fn serve(self: Arc<Self>, io: Stream, from: Connection, stop: CancellationToken) {
        let admin = self.clone();
        let svc = service_fn(move |req| admin.clone().guarded(req, from));
        let mut http = http1::Builder::new();
        http.timer(TokioTimer::new())
            .header_read_timeout(Duration::from_secs(10));
        let conn = http.serve_connection(TokioIo::new(io), svc);
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            _ = stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.as_mut().await
            }
        };
        if let Err(e) = result {
            debug!("admin connection ended: {e}");
        }
    }

    /// The guard's refusal, or the route's answer.
    async fn guarded(
        self: Arc<Self>,
        req: Request<Incoming>,
        from: Connection,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let checked = self
            .ctx
            .guard
            .check(from.client, from.local, req.uri().path(), req.headers());
        let Err(refused) = checked else {
            return self.route(req).await;
        };
        debug!(client = %from.client, status = refused.status.as_u16(), "admin request refused: {}", refused.reason.trim_end());
        let mut r = text(refused.status, refused.reason);
        if refused.status == StatusCode::UNAUTHORIZED {
            for c in CHALLENGES {
                r.headers_mut()
                    .append(header::WWW_AUTHENTICATE, header::HeaderValue::from_static(c));
            }
        } else if refused.status == StatusCode::FORBIDDEN {
            r.headers_mut()
                .insert(header::CONNECTION, header::HeaderValue::from_static("close"));
        }
        Ok(r)
    }

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into()));
        }
        Ok(match req.uri().path() {
            "/metrics" => self.metrics(),
            "/healthz" => {
                if self.ctx.drain.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
                } else {
                    text(StatusCode::OK, "serving\n".into())
                }
            }
            // The same line as `baton status --json`, protocol version included.
            "/status" => match self.status().await {
                Ok(st) => json(answer_line(&st)),
                Err(answer) => answer,
            },
            "/" => page(),
            "/status.json" => match self.status().await {
                Ok(st) => json(status_page::document(
                    &st,
                    &self.ctx.state,
                    std::time::SystemTime::now(),
                )),
                Err(answer) => answer,
            },
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /, /metrics, /healthz, /status, /status.json\n".into(),
            ),
        })
    }

    fn metrics(&self) -> Response<Full<Bytes>> {
        let mut out = String::new();
        match prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
            Ok(()) => with_type(
                text(StatusCode::OK, out),
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
            ),
            Err(e) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode metrics: {e}\n"),
            ),
        }
    }

    /// The controller's status, or the answer that says why there is none.
    async fn status(&self) -> Result<Status, Response<Full<Bytes>>> {
        let (tx, rx) = oneshot::channel();
        if self.ctx.commands.send(Command::Status(tx)).await.is_err() {
            return Err(text(StatusCode::SERVICE_UNAVAILABLE, "exiting\n".into()));
        }
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            Ok(Ok(st)) => Ok(st),
            _ => Err(text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no answer from the generation\n".into(),
            )),
        }
    }
}

/// The status page: never cached (it is tiny, and must match the JSON of this version).
fn page() -> Response<Full<Bytes>> {
    let mut r = with_type(
        text(StatusCode::OK, status_page::HTML.into()),
        "text/html; charset=utf-8",
    );
    let headers = r.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(status_page::CONTENT_SECURITY_POLICY),
    );
    headers.insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    r
}

fn json(body: String) -> Response<Full<Bytes>> {
    let mut r = with_type(text(StatusCode::OK, body), "application/json");
    r.headers_mut()
        .insert(header::CACHE_CONTROL, header::HeaderValue::from_static("no-store"));
    r
}

fn with_type(mut r: Response<Full<Bytes>>, content_type: &'static str) -> Response<Full<Bytes>> {
    r.headers_mut()
        .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}
