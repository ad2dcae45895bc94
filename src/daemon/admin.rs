//! The optional admin listener (`[admin] address`): `/metrics` (Prometheus text format via
//! `prometheus-client`), `/healthz` (200 serving, 503 draining) and `/status` (the JSON of
//! `baton status --json`). It is handed over like the other listeners (name `admin`). A
//! generation that hands off stops serving it at once, so a scrape always reaches the serving
//! generation, which also reports the draining ones; a generation stopping without a successor
//! keeps answering (`/healthz` 503) until it exits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use baton_handoff::{Drain, Socket, Stream};
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
use tracing::debug;

use crate::config::ADMIN_LISTENER;
use crate::control::answer_line;
use crate::daemon::control_server::Command;
use crate::daemon::exporter;
use crate::daemon::state_dir::StateDir;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminContext {
    pub drain: Drain,
    pub commands: mpsc::Sender<Command>,
    pub state: StateDir,
    pub generation: u64,
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
        baton_handoff::accept_until(socket, ADMIN_LISTENER, stop, |stream, _| {
            tokio::spawn(admin.clone().serve(stream, serving.clone()));
        })
        .await;
    });
}

impl Admin {
    async fn serve(self: Arc<Self>, io: Stream, stop: CancellationToken) {
        let admin = self.clone();
        let svc = service_fn(move |req| admin.clone().route(req));
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

    async fn route(self: Arc<Self>, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
        if req.method() != Method::GET && req.method() != Method::HEAD {
            return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "only GET and HEAD\n".into()));
        }
        Ok(match req.uri().path() {
            "/metrics" => {
                let mut out = String::new();
                match prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry) {
                    Ok(()) => {
                        let mut r = text(StatusCode::OK, out);
                        r.headers_mut().insert(
                            header::CONTENT_TYPE,
                            header::HeaderValue::from_static(
                                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                            ),
                        );
                        r
                    }
                    Err(e) => text(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("cannot encode metrics: {e}\n"),
                    ),
                }
            }
            "/healthz" => {
                if self.ctx.drain.is_draining() {
                    text(StatusCode::SERVICE_UNAVAILABLE, "draining\n".into())
                } else {
                    text(StatusCode::OK, "serving\n".into())
                }
            }
            "/status" => self.status().await,
            _ => text(
                StatusCode::NOT_FOUND,
                "not found: try /metrics, /healthz, /status\n".into(),
            ),
        })
    }

    async fn status(&self) -> Response<Full<Bytes>> {
        let (tx, rx) = oneshot::channel();
        if self.ctx.commands.send(Command::Status(tx)).await.is_err() {
            return text(StatusCode::SERVICE_UNAVAILABLE, "exiting\n".into());
        }
        match tokio::time::timeout(Duration::from_secs(5), rx).await {
            // The same line as `baton status --json`, protocol version included.
            Ok(Ok(st)) => {
                let mut r = text(StatusCode::OK, answer_line(&st));
                r.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("application/json"),
                );
                r
            }
            _ => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "no answer from the generation\n".into(),
            ),
        }
    }
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
