//! The optional admin listener (`[admin] address`): `/metrics` (Prometheus text format via
//! `prometheus-client`), `/healthz` (200 serving, 503 draining) and `/status` (the JSON of
//! `baton status --json`). It is handed over like the other listeners (name `admin`). A
//! generation that hands off stops serving it at once, so a scrape always reaches the serving
//! generation, which also reports the draining ones; a generation stopping without a successor
//! keeps answering (`/healthz` 503) until it exits.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use crate::control::Command;
use crate::drain::Drain;
use crate::listeners::{Socket, Stream};
use crate::state::{HANDOFF_RESULTS, StateDir};

/// The name the admin listener carries across handoffs.
pub const ADMIN_LISTENER: &str = "admin";

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
    let mut registry = Registry::with_prefix("baton");
    crate::metrics::get().register(&mut registry);
    registry.register_collector(Box::new(Live { ctx: ctx.clone() }));
    let admin = Arc::new(Admin { ctx, registry });
    tokio::spawn(async move {
        let serving = stop.clone();
        crate::listeners::accept_until(socket, ADMIN_LISTENER, stop, |stream, _| match stream {
            Stream::Tcp(s) => {
                tokio::spawn(admin.clone().serve(s, serving.clone()));
            }
            Stream::Unix(s) => {
                tokio::spawn(admin.clone().serve(s, serving.clone()));
            }
        })
        .await;
    });
}

impl Admin {
    async fn serve<S>(self: Arc<Self>, io: S, stop: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
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
            Ok(Ok(st)) => match serde_json::to_string(&st) {
                Ok(s) => {
                    let mut r = text(StatusCode::OK, s + "\n");
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("application/json"),
                    );
                    r
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            },
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

/// Values read at scrape time: this generation's gauges, the draining generations (from the
/// state directory) and the ledger shared by all generations.
#[derive(Clone)]
struct Live {
    ctx: AdminContext,
}

impl std::fmt::Debug for Live {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Live")
            .field("generation", &self.ctx.generation)
            .finish()
    }
}

fn gauge(encoder: &mut DescriptorEncoder, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    let e = encoder.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(e)
}

impl Collector for Live {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ctx = &self.ctx;
        gauge(
            &mut encoder,
            "generation",
            "Generation number of the process answering this scrape",
            ctx.generation as i64,
        )?;
        gauge(
            &mut encoder,
            "draining",
            "1 when the answering generation is draining (stopping), else 0",
            i64::from(ctx.drain.is_draining()),
        )?;
        gauge(
            &mut encoder,
            "client_connections",
            "Open client connections of this generation",
            ctx.drain.active_connections() as i64,
        )?;
        gauge(
            &mut encoder,
            "tunnels",
            "Open CONNECT tunnels of this generation",
            ctx.drain.active_tunnels() as i64,
        )?;

        let draining = ctx.state.draining();
        gauge(
            &mut encoder,
            "draining_generations",
            "Older generations still draining",
            draining.len() as i64,
        )?;
        for (name, help, tunnels) in [
            (
                "draining_connections",
                "Client connections an older, draining generation still serves",
                false,
            ),
            (
                "draining_tunnels",
                "CONNECT tunnels an older, draining generation still relays",
                true,
            ),
        ] {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for d in &draining {
                let labels = [("pid", d.pid.to_string()), ("generation", d.generation.to_string())];
                let v = if tunnels { d.tunnels } else { d.connections };
                ConstGauge::new(v as i64).encode(family.encode_family(&labels)?)?;
            }
        }

        let ledger = ctx.state.ledger();
        let mut family = encoder.encode_descriptor(
            "handoffs",
            "Handoffs by result (ok, child_exit, timeout, spawn_error, refused), across generations",
            None,
            MetricType::Counter,
        )?;
        for result in HANDOFF_RESULTS {
            let v = ledger.handoffs.get(result).copied().unwrap_or(0);
            ConstCounter::new(v).encode(family.encode_family(&[("result", result)])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "handoff_phase_seconds",
            "Handoff phase durations: spawn_to_ready (new generation) and drain (old generation)",
            None,
            MetricType::Histogram,
        )?;
        for (phase, h) in [("spawn_to_ready", &ledger.spawn_to_ready), ("drain", &ledger.drain)] {
            family
                .encode_family(&[("phase", phase)])?
                .encode_histogram::<NoLabelSet>(h.sum, h.count, &h.pairs(), None)?;
        }
        let mut family = encoder.encode_descriptor(
            "drained_connections",
            "Connections and tunnels handed to handoff drains, by outcome (finished or cut at the drain timeout)",
            None,
            MetricType::Counter,
        )?;
        for (outcome, v) in [("finished", ledger.drain_finished), ("cut", ledger.drain_cut)] {
            ConstCounter::new(v).encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        Ok(())
    }
}
