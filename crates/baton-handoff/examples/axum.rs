//! An axum app that upgrades itself on SIGHUP without refusing or failing a request:
//! `axum 127.0.0.1:8080`, then `kill -HUP <pid>` (rebuild first to run a new binary).
use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use baton_handoff::Upgrader;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::signal::unix::SignalKind;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // First thing, before the runtime starts its worker threads.
    let upgrader = Upgrader::from_env()?;
    tokio::runtime::Runtime::new()?.block_on(serve(upgrader))
}

async fn serve(upgrader: Upgrader) -> Result<(), Box<dyn std::error::Error>> {
    let addr = std::env::args().nth(1).ok_or("usage: axum <ip:port>")?.parse()?;
    let listener = upgrader.listen("http", addr).await?;
    let app = Router::new().route("/", get(hello)).with_state(upgrader.clone());
    upgrader.ready()?;
    let pid = std::process::id();
    println!("serving pid={pid} on {}", listener.local_addr()?);
    upgrader.upgrade_on(SignalKind::hangup(), |e| eprintln!("upgrade failed: {e}"))?;
    // axum closes idle connections as soon as shutdown begins: a moment after the successor
    // took over, so that a request already on its way on one is answered first.
    let exit = upgrader.exit();
    let shutdown = async move {
        exit.await;
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    axum::serve(UntilExit(listener, upgrader), app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

/// The answer, with `Connection: close` once exiting, so that keep-alive clients move to the
/// successor between two requests.
async fn hello(State(upgrader): State<Upgrader>) -> impl IntoResponse {
    let close = upgrader.is_exiting().then_some([(header::CONNECTION, "close")]);
    (close, format!("hello from pid={}\n", std::process::id()))
}

/// The listener, accepting until the upgrader exits: from then on the successor accepts
/// every connection, while the ones accepted here are still served until shutdown.
struct UntilExit(TcpListener, Upgrader);

impl axum::serve::Listener for UntilExit {
    type Io = TcpStream;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (TcpStream, std::net::SocketAddr) {
        tokio::select! {
            accepted = axum::serve::Listener::accept(&mut self.0) => accepted,
            () = self.1.exit() => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.0.local_addr()
    }
}
