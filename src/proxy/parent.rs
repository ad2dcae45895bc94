//! Talking to a parent proxy beyond forwarding requests to it (which `upstream` does):
//! opening a tunnel through its CONNECT, and what its refusals become for baton's client.
//! A parent's 407 is about baton's credentials, not the client's: it is never passed on as
//! a challenge.

use std::time::Duration;

use crate::config::Parent;
use crate::proxy::connector::{ConnectError, HopStream, connect_parent};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Http(#[from] hyper::Error),
    /// No answer to CONNECT within the response timeout.
    #[error("no answer within {0:?}")]
    Silent(Duration),
    /// A non-2xx answer to CONNECT.
    #[error("answered {0}")]
    Refused(StatusCode),
}

/// A tunnel the parent opened: the connection to it, and the bytes that followed its 2xx
/// answer (from the destination: a server that speaks first), owed to the client.
pub struct Opened {
    pub stream: HopStream,
    pub early: Bytes,
}

/// Asks `parent` for a tunnel to `target` (authority form), with the client's `Via` chain
/// (`incoming`: the client's request head) and this proxy's `via` after it, so a loop
/// through parents is seen as one, and baton's credentials for the parent. Connecting is bounded by `connect`, the parent's answer by
/// `response`. The client's bytes are not sent here: they flow only once this returned.
pub async fn open_tunnel(
    parent: &Parent,
    tls: Option<&tokio_rustls::TlsConnector>,
    target: &Uri,
    incoming: &HeaderMap,
    via: &HeaderValue,
    connect: Duration,
    response: Duration,
) -> Result<Opened, ParentError> {
    let stream = connect_parent(parent, tls, connect).await?;
    let exchange = async {
        let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
        // Ends when the upgrade takes the connection over, or when the parent refused.
        tokio::spawn(conn.with_upgrades());
        let mut req = Request::new(Empty::<Bytes>::new());
        *req.method_mut() = Method::CONNECT;
        *req.uri_mut() = target.clone();
        let headers = req.headers_mut();
        if let Some(host) = target.authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok()) {
            headers.insert(header::HOST, host);
        }
        for v in incoming.get_all(header::VIA) {
            headers.append(header::VIA, v.clone());
        }
        headers.append(header::VIA, via.clone());
        if let Some(auth) = &parent.authorization {
            headers.insert(header::PROXY_AUTHORIZATION, auth.clone());
        }
        let resp = sender.send_request(req).await?;
        if !resp.status().is_success() {
            return Err(ParentError::Refused(resp.status()));
        }
        let upgraded = hyper::upgrade::on(resp).await?;
        match upgraded.downcast::<TokioIo<HopStream>>() {
            Ok(parts) => Ok(Opened {
                stream: parts.io.into_inner(),
                early: parts.read_buf,
            }),
            // Not expected: the io type is the one handed to the handshake above.
            Err(_) => Err(ParentError::Connect(ConnectError::Io(std::io::Error::other(
                "the upgraded connection is not the stream it was opened on",
            )))),
        }
    };
    tokio::time::timeout(response, exchange)
        .await
        .map_err(|_| ParentError::Silent(response))?
}

/// What baton answers when `parent` refused with `status` (`what`: the request, for the
/// reason): a 407 is about baton's own credentials, so it becomes a 502 that says so; a
/// parent's 504 stays a 504; anything else is a 502 naming the parent and its answer.
pub fn refusal(parent: &Parent, status: StatusCode, what: &str) -> (StatusCode, String) {
    if status == StatusCode::PROXY_AUTHENTICATION_REQUIRED {
        let reason = match parent.authorization {
            Some(_) => {
                format!("{parent} refused baton's credentials (407): check its credentials file in [upstream]")
            }
            None => format!("{parent} requires authentication (407): give it a credentials file in [upstream]"),
        };
        return (StatusCode::BAD_GATEWAY, reason);
    }
    let mine = if status == StatusCode::GATEWAY_TIMEOUT {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    (mine, format!("{parent} refused {what}: {status}"))
}
