//! An HTTP origin on loopback: what the proxy forwards to in the tests.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

use crate::data::{pattern, pattern_byte};

type Body = BoxBody<Bytes, Infallible>;

/// An HTTP origin on `127.0.0.1:<ephemeral>`. Routes:
/// - `GET /bytes?n=N` N pattern bytes with Content-Length; `/chunked?n=N` the same, chunked;
/// - `GET /slow?ms=M&n=N` waits M ms, then N bytes;
/// - `POST|PUT /sha256` the hex SHA-256 and length of the request body (streamed);
/// - `GET /headers` the request headers as received, one per line;
/// - `GET /hang` never answers;
/// - `GET /page?n=N` an HTML page with N sub-resources (`/bytes?n=100&i=I`), whose script
///   sets the title to `done N` once every one has loaded or failed (a browser's test).
pub async fn start_origin() -> std::io::Result<SocketAddr> {
    Ok(start_counted_origin().await?.0)
}

/// [`start_origin`], and the number of connections it has open (accepted and not yet
/// closed, by either side): what the proxy holds to it.
pub async fn start_counted_origin() -> std::io::Result<(SocketAddr, Arc<AtomicUsize>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let open = Arc::new(AtomicUsize::new(0));
    let counter = open.clone();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            counter.fetch_add(1, Ordering::SeqCst);
            let counter = counter.clone();
            tokio::spawn(async move {
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(route))
                    .await;
                counter.fetch_sub(1, Ordering::SeqCst);
            });
        }
    });
    Ok((addr, open))
}

/// [`start_origin`]'s routes over TLS on `127.0.0.1:<ephemeral>`, with the certificate and
/// key of `leaf` (an expired one, or one for another name, as a test needs), ALPN
/// `http/1.1`.
pub async fn start_tls_origin(leaf: &crate::tls::Leaf) -> anyhow::Result<SocketAddr> {
    let acceptor = tls_acceptor(leaf)?;
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(stream).await else { return };
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service_fn(route))
                    .await;
            });
        }
    });
    Ok(addr)
}

fn query(req: &Request<Incoming>, key: &str) -> Option<u64> {
    req.uri()
        .query()?
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.parse().ok())
}

async fn route(req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let n = query(&req, "n").unwrap_or(1024);
    let resp = match req.uri().path() {
        "/bytes" => streamed(n, true),
        "/chunked" => streamed(n, false),
        "/slow" => {
            tokio::time::sleep(Duration::from_millis(query(&req, "ms").unwrap_or(2000))).await;
            streamed(n, true)
        }
        "/sha256" => hash_body(req.into_body()).await,
        "/headers" => headers(&req),
        "/hang" => std::future::pending().await,
        "/page" => page(n),
        _ => text(StatusCode::NOT_FOUND, "no such route".into()),
    };
    Ok(resp)
}

/// `<hex sha256> <length>` of a request body, read frame by frame.
async fn hash_body(mut body: Incoming) -> Response<Body> {
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return text(StatusCode::BAD_REQUEST, "body error".into());
        };
        if let Some(d) = frame.data_ref() {
            len += d.len() as u64;
            hasher.update(d);
        }
    }
    text(StatusCode::OK, format!("{} {len}", hex::encode(hasher.finalize())))
}

/// The request headers as received, `name: value` one per line.
fn headers(req: &Request<Incoming>) -> Response<Body> {
    let lines: String = req
        .headers()
        .iter()
        .map(|(k, v)| format!("{}: {}\n", k, v.to_str().unwrap_or("?")))
        .collect();
    text(StatusCode::OK, lines)
}

/// `n` images (pattern bytes, so each fails to decode: `onerror` counts as loaded, the
/// request went through either way) and a script that counts them.
fn page(n: u64) -> Response<Body> {
    let imgs: String = (0..n)
        .map(|i| format!("<img src=\"/bytes?n=100&i={i}\" onload=\"seen()\" onerror=\"seen()\">"))
        .collect();
    let html = format!(
        "<!doctype html><html><head><title>loading</title><script>let c=0;function seen(){{c++;if(c=={n})document.title='done '+c;}}</script></head><body>{imgs}</body></html>"
    );
    let mut r = text(StatusCode::OK, html);
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/html"));
    r
}

fn text(status: StatusCode, s: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(s)).boxed());
    *r.status_mut() = status;
    r
}

/// N pattern bytes in 64 KiB frames; with a Content-Length when `sized`, else chunked.
fn streamed(n: u64, sized: bool) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let body = if sized {
        // A known length: hyper sends Content-Length, not chunked.
        Full::new(Bytes::from(pattern(n as usize))).boxed()
    } else {
        let frames = futures_util::stream::iter((0..n.div_ceil(CHUNK)).map(move |c| {
            let data: Vec<u8> = (c * CHUNK..((c + 1) * CHUNK).min(n)).map(pattern_byte).collect();
            Ok::<_, Infallible>(Frame::data(Bytes::from(data)))
        }));
        StreamBody::new(frames).boxed()
    };
    Response::new(body)
}

/// A TLS server side with `leaf` that agrees to HTTP/1.1 only (an origin's).
pub(crate) fn tls_acceptor(leaf: &crate::tls::Leaf) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(leaf.cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
