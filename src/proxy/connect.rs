//! Tunnels: opening a CONNECT's to its target, or taking an upgraded connection's (an
//! absolute-form request its origin answered 101), and relaying it until it ends or moves to
//! the next generation; adopting a tunnel the previous generation handed over (checked
//! against this generation's policy, which a reload may have narrowed).

use std::net::IpAddr;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use std::os::fd::OwnedFd;

use baton_handoff::Peer;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::config::Parent;

use crate::proxy::access::Kind;
use crate::proxy::admission::{Admission, Slot};
use crate::proxy::bump::Bump;
use crate::proxy::connector::{HopStream, connect_checked};
use crate::proxy::hop_by_hop::strip_hop_by_hop;
use crate::proxy::metrics;
use crate::proxy::migrate::{self, TunnelRecord, UpgradeRecord};
use crate::proxy::parent::{self, ParentError};
use crate::proxy::policy::{Denial, Policy, Recheck};
use crate::proxy::route::next_hop;
use crate::proxy::rules::Facts;
use crate::proxy::service::{Accepted, Ask, Body, Client, Proxy, empty};
use crate::proxy::sni::{self, Peeked};
use crate::proxy::stash;
use crate::proxy::tunnel::{self, Counters, Early, Handover, Relay, Relayed, Spliced, TlsRelay, TunnelClient};
use crate::proxy::upgrade;
use crate::proxy::upstream::NextHop;
use crate::tls::moving::Secrets;

impl Proxy {
    /// Opens the tunnel and leaves it with `client` ([`Proxy::start_tunnel`] relays it once
    /// hyper has written the `200`).
    pub(super) async fn connect(&self, client: &Client, req: Request<Incoming>, mut ask: Ask) -> Response<Body> {
        let Some(authority) = req.uri().authority().filter(|a| a.port_u16().is_some()).cloned() else {
            return self.refuse(&ask, StatusCode::BAD_REQUEST, "CONNECT needs a host:port target");
        };
        // authority-form is `host:port` (RFC 9112 §3.2.3): userinfo there is a secret the
        // request should not carry, and the tunnel's record would keep it.
        if authority.as_str().contains('@') {
            return self.refuse(&ask, StatusCode::BAD_REQUEST, "userinfo in a CONNECT target");
        }
        let port = authority.port_u16().unwrap_or(443);
        let parent = next_hop(&self.settings.parents, authority.host());
        let opened = match parent {
            Some(p) => self.connect_via(p, &authority, &req, &ask).await,
            None => connect_checked(&self.policy, authority.host(), port, self.settings.upstream_connect)
                .await
                .map(|s| (HopStream::Plain(s), Bytes::new()))
                .map_err(|e| self.connect_failed(&ask, authority.as_str(), &e)),
        };
        let (origin, from_origin) = match opened {
            Ok(o) => o,
            Err(answer) => return answer,
        };
        let record = TunnelRecord {
            client: match ask.peer {
                Peer::Ip(a) => Some(a),
                Peer::Local => None,
            },
            target: authority.to_string(),
            user: ask.user.clone(),
            via_parent: parent.is_some(),
            parent: parent.map(|p| p.authority.to_string()),
            started_ms: TunnelRecord::now_ms(),
            ..TunnelRecord::default()
        };
        // The target is copied: the request's shares hyper's read buffer, which the tunnel
        // would otherwise keep alive (8 KiB) for as long as it runs.
        ask.target = Uri::try_from(authority.as_str()).unwrap_or_else(|_| Uri::from_static("/"));
        let accepted = Accepted {
            origin,
            from_origin,
            ask,
            record,
        };
        *client.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(accepted);
        Response::new(empty())
    }

    /// A tunnel through `parent`'s CONNECT, after the destination rules that the name shows;
    /// `Err`: the answer for the client.
    async fn connect_via(
        &self,
        parent: &Parent,
        authority: &http::uri::Authority,
        req: &Request<Incoming>,
        ask: &Ask,
    ) -> Result<(HopStream, Bytes), Response<Body>> {
        if let Err(d) = self
            .policy
            .check_name(authority.host(), authority.port_u16().unwrap_or(443))
        {
            return Err(self.deny(ask, &d));
        }
        let (connect, response) = (self.settings.upstream_connect, self.settings.upstream_response);
        let tls = self.upstream().parent_tls().cloned();
        let opened = parent::open_tunnel(
            parent,
            tls.as_ref(),
            req.uri(),
            req.headers(),
            &self.via,
            connect,
            response,
        );
        match opened.await {
            Ok(opened) => Ok((opened.stream, opened.early)),
            Err(ParentError::Connect(e)) => Err(self.connect_failed(ask, &parent.to_string(), &e)),
            Err(ParentError::Refused(status)) => {
                let (status, reason) = parent::refusal(parent, status, &format!("CONNECT {authority}"));
                Err(self.refuse(ask, status, &reason))
            }
            Err(ParentError::Silent(wait)) => {
                let reason = format!("{parent} did not answer CONNECT {authority} within {wait:?}");
                Err(self.refuse(ask, StatusCode::GATEWAY_TIMEOUT, &reason))
            }
            Err(ParentError::Http(e)) => {
                let reason = format!("{parent} failed on CONNECT {authority}: {e}");
                Err(self.refuse(ask, StatusCode::BAD_GATEWAY, &reason))
            }
        }
    }

    /// Relays the tunnel a CONNECT opened over the client's connection, once hyper has
    /// written the `200` (`unread`: the bytes the client sent behind its CONNECT head;
    /// `answer`: the bytes of the `200`, which its Squid line counts in whichever generation
    /// it ends), registered with the drain; movable at a handoff.
    pub fn start_tunnel(
        self: &Arc<Self>,
        accepted: Accepted,
        client: TunnelClient,
        unread: Vec<u8>,
        answer: u64,
        slot: Slot,
    ) {
        let Accepted {
            origin,
            from_origin,
            ask,
            mut record,
        } = accepted;
        // For the Squid line: the address the tunnel leads to (the target, or the parent).
        record.server = origin.peer_addr().ok().map(|a| a.ip());
        record.answer = answer;
        let (idle, cut, migration, stash) = (
            self.settings.tunnel_idle,
            self.drain.cut_token(),
            self.migration.clone(),
            self.stash.clone(),
        );
        let early = Early {
            to_origin: unread,
            to_client: from_origin,
        };
        // Boxed before the task captures them: every tunnel's task holds what it captures.
        let (mut ask, mut record) = (Box::new(ask), Box::new(record));
        // An upgraded connection speaks the protocol it switched to, not TLS.
        let sni = (self.policy.reads_sni() && record.upgrade.is_none())
            .then(|| (self.policy.clone(), self.settings.sni_wait));
        let throttle = self.limits.throttle(&ask.peer, ask.user.as_deref());
        // Only with `[inspect]` can a rule bump: without, tunnels keep nothing for it. An
        // upgraded connection is never bumped (it was a request, or is inside a bump).
        let bumper =
            (self.inspection.is_some() && record.upgrade.is_none()).then(|| (self.clone(), self.settings.sni_wait));
        self.drain.tunnels().spawn(async move {
            // The client connection's place under the connection limits, until the tunnel ends
            // (a WebSocket inside a bump keeps a share of it for its own tunnel).
            let slot = slot;
            let (mut client, mut early) = (client, early);
            if let Some((policy, wait)) = sni {
                match Box::pin(check_sni(&policy, &mut client, &mut early, &mut ask, &mut record, wait)).await {
                    Ok(()) => {}
                    Err(d) => return sni_refused(&ask, &d),
                }
            }
            if let Some((proxy, wait)) = bumper {
                let bumping = Box::pin(bump_of(&proxy, &mut client, &mut early, &mut ask, &mut record, wait));
                match bumping.await {
                    Ok(None) => {}
                    Ok(Some(bump)) => {
                        // Requests inside open their own TLS connections to the origin.
                        drop(origin);
                        return Box::pin(proxy.bump(client, early.to_origin, bump, &ask, slot)).await;
                    }
                    Err(d) => return sni_refused(&ask, &d),
                }
            }
            let ended = Ended::from(&*record);
            let handover = Handover {
                migration: &migration,
                record,
                stash,
            };
            let limits = Relay { idle, cut, throttle };
            let relayed = tunnel::relay(client, origin, early, limits, handover).await;
            tunnel_ended(&ask, relayed, ended);
        });
    }

    /// One moved tunnel: relays on here, under this generation's connection limits, unless
    /// its policy denies it now or the limits are reached (it is closed then, and the line
    /// names the rule). Its fds are checked first, and its client is the kernel's peer.
    pub(super) fn adopt_tunnel(
        &self,
        mut record: TunnelRecord,
        fds: Vec<OwnedFd>,
        tls: Option<Secrets>,
        admission: &Arc<Admission>,
    ) -> Result<(), String> {
        record.check_fds(&fds)?;
        let relay = match tls {
            None => {
                Adopted::Spliced(Spliced::from_fds(&record, fds).map_err(|e| format!("cannot adopt its fds: {e}"))?)
            }
            Some(tls) => Adopted::Tls(Box::new(
                tunnel::rebuild_tls(&record, fds, tls).map_err(|e| format!("cannot adopt a TLS tunnel: {e}"))?,
            )),
        };
        metrics::migrated("tunnel", 1);
        self.migration
            .count_adopted(migrate::Kind::Tunnel, matches!(relay, Adopted::Tls(_)));
        let ask = moved_ask(&record)?;
        let ended = Ended::from(&record);
        let admitted = self.recheck(&record, relay.origin_addr().ok()).and_then(|()| {
            admission.admit(&ask.peer).map_err(|r| Denial {
                status: StatusCode::SERVICE_UNAVAILABLE,
                reason: r.reason,
                rule: r.rule,
                retry_after: None,
            })
        });
        let slot = match admitted {
            Ok(slot) => slot,
            Err(d) => {
                ask.line(Kind::Denied, d.status)
                    .rule(d.rule.as_str())
                    .traffic(record.up, record.down, ask.started)
                    .reason(format!("moved tunnel closed: {}", d.reason))
                    .server(ended.server)
                    .parent(ended.parent)
                    .wire(ended.answer + record.down)
                    .write();
                // Closed here, it must leave systemd's store too, which holds copies.
                relay.shut();
                stash::forget(self.stash.as_deref(), record.stashed.as_deref());
                return Ok(());
            }
        };
        // Stashed by the generation before, and this one does not stash: out of the store,
        // or systemd's copies would keep the sockets open after the tunnel ends.
        if self.stash.is_none() {
            stash::forget(None, record.stashed.take().as_deref());
        }
        let counters = Counters::starting_at(record.up, record.down, record.quiet_ms);
        // This generation's buckets for its key: they start full (buckets do not move).
        let throttle = self.limits.throttle(&ask.peer, ask.user.as_deref());
        let (idle, cut, migration, stash) = (
            self.settings.tunnel_idle,
            self.drain.cut_token(),
            self.migration.clone(),
            self.stash.clone(),
        );
        let (ask, record) = (Box::new(ask), Box::new(record));
        self.drain.tunnels().spawn(async move {
            let _slot = slot;
            let handover = Handover {
                migration: &migration,
                record,
                stash,
            };
            let relayed = match relay {
                Adopted::Spliced(s) => s.throttled(throttle).run(idle, cut, counters, Some(handover)).await,
                Adopted::Tls(t) => Box::pin(t.throttled(throttle).run(idle, cut, counters, Some(handover))).await,
            };
            tunnel_ended(&ask, relayed, ended);
        });
        Ok(())
    }

    /// This generation's rules, applied to a tunnel another generation opened.
    fn recheck(&self, record: &TunnelRecord, origin: Option<std::net::SocketAddr>) -> Result<(), Denial> {
        // Through a parent, the origin socket leads to the parent: only the name is checked.
        let origin = if record.via_parent { None } else { origin };
        let peeked = record.sni_checked.then(|| match &record.sni {
            Some(name) => Peeked::Sni(name.clone()),
            None => Peeked::NoSni("it sent no TLS ClientHello with a server name"),
        });
        self.policy.recheck_tunnel(&Recheck {
            method: if record.upgrade.is_some() {
                &Method::GET
            } else {
                &Method::CONNECT
            },
            client: record.client.map(|a| a.ip()),
            user: record.user.as_deref(),
            target: &record.target,
            sni: peeked.as_ref(),
            origin,
        })
    }
}

/// The request a moved tunnel answers, for its access line: an upgraded connection's is its
/// `GET` and absolute URI, a tunnel's its CONNECT; its start as the record says.
fn moved_ask(record: &TunnelRecord) -> Result<Ask, String> {
    let age = Duration::from_millis(TunnelRecord::now_ms().saturating_sub(record.started_ms));
    // An upgraded connection's line is its request's: `GET` and the absolute URI.
    let (method, target) = match &record.upgrade {
        Some(u) => (Method::GET, &u.uri),
        None => (Method::CONNECT, &record.target),
    };
    Ok(Ask {
        peer: record.client.map_or(Peer::Local, Peer::Ip),
        target: target
            .parse::<Uri>()
            .map_err(|e| format!("bad target {target:?}: {e}"))?,
        method,
        started: Instant::now().checked_sub(age).unwrap_or_else(Instant::now),
        // Not a connection of this generation's: the line's bytes come from the record.
        sent: Arc::default(),
        user: record.user.clone(),
        rule: None,
        // Only HTTP/1.1 tunnels move.
        version: http::Version::HTTP_11,
    })
}

/// A moved tunnel, as it relays on here.
enum Adopted {
    Spliced(Spliced),
    Tls(Box<TlsRelay>),
}

impl Adopted {
    fn origin_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        match self {
            Adopted::Spliced(s) => s.origin_addr(),
            Adopted::Tls(t) => t.origin_addr(),
        }
    }

    /// Shut down before it is dropped, since systemd's store may hold copies of a plain
    /// tunnel's sockets; a TLS tunnel is never stashed, and closes as it is dropped.
    fn shut(&self) {
        if let Adopted::Spliced(s) = self {
            s.shut();
        }
    }
}

/// Reads the tunnel's first bytes for their server name and holds it to `policy`; every
/// byte read goes on to the origin (`early`). The name is kept in the record, for a
/// handoff's recheck.
async fn check_sni(
    policy: &Policy,
    client: &mut TunnelClient,
    early: &mut Early,
    ask: &mut Ask,
    record: &mut TunnelRecord,
    wait: Duration,
) -> Result<(), Denial> {
    let peeked = sni::peek(client.reader(), &mut early.to_origin, wait).await;
    let (host, port) = record.target.rsplit_once(':').unwrap_or((&record.target, ""));
    let port = port.parse().unwrap_or(0);
    let mut f = Facts::new(record.client.map(|a| a.ip()), &Method::CONNECT, host, port);
    f.sni_to_come = f.ip.is_some();
    if let Some(rule) = policy.check_sni(&f, &peeked, record.user.as_deref())? {
        ask.rule = Some(rule);
    }
    record.sni_checked = true;
    if let Peeked::Sni(name) = peeked {
        record.sni = Some(name);
    }
    Ok(())
}

/// Whether the tunnel is to be bumped, and as what: its rule says `bump` and its ClientHello
/// named a server (read now if `sni = "ignore"` skipped it, and held to the rules as
/// `"match"` would). `Ok(None)`: relay it as it is (`no_sni = "allow"` for a hello
/// without a name).
async fn bump_of(
    proxy: &Proxy,
    client: &mut TunnelClient,
    early: &mut Early,
    ask: &mut Ask,
    record: &mut TunnelRecord,
    wait: Duration,
) -> Result<Option<Bump>, Denial> {
    let policy = &proxy.policy;
    if !policy.bumps(ask.rule) {
        return Ok(None);
    }
    if !record.sni_checked {
        check_sni(policy, client, early, ask, record, wait).await?;
        // An address CONNECT was decided anew on its server name.
        if !policy.bumps(ask.rule) {
            return Ok(None);
        }
    }
    let port = record
        .target
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or(443);
    Ok(record.sni.clone().map(|sni| Bump { sni, port }))
}

/// A tunnel its first bytes refused: the client and the origin are closed (the `200` is
/// out: no answer can tell the client why), and the line names the rule.
fn sni_refused(ask: &Ask, d: &Denial) {
    metrics::request_done(&Method::CONNECT, d.status, ask.started, 0, 0, true);
    ask.line(Kind::Denied, d.status)
        .rule(d.rule.as_str())
        .traffic(0, 0, ask.started)
        .reason(format!("tunnel closed: {}", d.reason))
        .write();
}

/// What a tunnel's Squid line says besides its totals, kept from its record.
#[derive(Debug, Clone)]
struct Ended {
    server: Option<IpAddr>,
    /// The parent it went through; `-` when an older generation's record did not say which.
    parent: Option<Arc<str>>,
    /// The bytes of the `200` (or `101`) answer the client was sent.
    answer: u64,
    /// `200` for a CONNECT's tunnel, `101` for an upgraded connection.
    status: StatusCode,
}

impl From<&TunnelRecord> for Ended {
    fn from(r: &TunnelRecord) -> Ended {
        Ended {
            server: r.server,
            parent: match &r.parent {
                Some(name) => Some(name.as_str().into()),
                None => r.via_parent.then(|| "-".into()),
            },
            answer: r.answer,
            status: if r.upgrade.is_some() {
                StatusCode::SWITCHING_PROTOCOLS
            } else {
                StatusCode::OK
            },
        }
    }
}

/// The tunnel's access line and metrics, once it really ended (not when it moved on).
fn tunnel_ended(ask: &Ask, relayed: Relayed, ended: Ended) {
    let Relayed { outcome, up, down } = relayed;
    if outcome.end == "moved" {
        return;
    }
    metrics::request_done(&ask.method, ended.status, ask.started, up, down, true);
    ask.line(Kind::Tunnel, ended.status)
        .traffic(up, down, ask.started)
        .outcome(outcome)
        .server(ended.server)
        .parent(ended.parent)
        .wire(ended.answer + down)
        .write();
}

impl Proxy {
    /// The next hop answered 101. Asked for (`offered`) and to an offered protocol, the
    /// origin connection is taken out of hyper and left with `client` as the tunnel's, and
    /// the 101 goes to the client; otherwise the answer is a 502 and the origin connection
    /// is closed (what it speaks now is unknown).
    pub(super) async fn switched(
        &self,
        client: &Client,
        hop: NextHop<'_>,
        mut resp: Response<Incoming>,
        offered: Option<&HeaderValue>,
        mut ask: Ask,
    ) -> Response<Body> {
        let chosen = match upgrade::chosen(resp.headers(), offered) {
            Ok(c) => c,
            Err(why) => {
                client.lease.discard();
                return self.refuse(&ask, StatusCode::BAD_GATEWAY, &format!("{hop} {why}"));
            }
        };
        let on = hyper::upgrade::on(&mut resp);
        let taken = tokio::time::timeout(self.settings.upstream_response, on).await;
        client.lease.discard();
        let parts = match taken {
            Ok(Ok(up)) => hop_stream(up),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("the connection was not handed over in time".into()),
        };
        let (origin, from_origin) = match parts {
            Ok(p) => p,
            Err(why) => {
                let reason = format!("{hop} switched protocols, but {why}");
                return self.refuse(&ask, StatusCode::BAD_GATEWAY, &reason);
            }
        };
        let record = self.upgrade_record(&ask, hop, chosen.to_str().unwrap_or_default());
        // Copied: the request's target shares hyper's read buffer (see `connect`).
        ask.target = Uri::try_from(ask.target.to_string()).unwrap_or_else(|_| Uri::from_static("/"));
        let answer = self.switching_head(resp.headers(), chosen);
        let accepted = Accepted {
            origin,
            from_origin,
            ask,
            record,
        };
        *client.tunnel.lock().unwrap_or_else(PoisonError::into_inner) = Some(accepted);
        answer
    }

    fn upgrade_record(&self, ask: &Ask, hop: NextHop<'_>, protocol: &str) -> TunnelRecord {
        let authority = ask.target.authority().map(|a| a.as_str()).unwrap_or_default();
        // A WebSocket inside a bump has an `https://` target.
        let default_port = if ask.target.scheme() == Some(&http::uri::Scheme::HTTPS) {
            443
        } else {
            80
        };
        let port = ask.target.port_u16().unwrap_or(default_port);
        let host = ask.target.host().unwrap_or_default();
        TunnelRecord {
            client: match ask.peer {
                baton_handoff::Peer::Ip(a) => Some(a),
                baton_handoff::Peer::Local => None,
            },
            // `host:port`, as a CONNECT's, for the recheck at a handoff.
            target: if authority.contains(':') {
                authority.to_string()
            } else {
                format!("{host}:{port}")
            },
            user: ask.user.clone(),
            via_parent: matches!(hop, NextHop::Parent(_)),
            parent: hop.parent().map(|p| p.authority.to_string()),
            started_ms: TunnelRecord::now_ms(),
            upgrade: Some(UpgradeRecord {
                protocol: protocol.to_ascii_lowercase(),
                uri: ask.target.to_string(),
            }),
            ..TunnelRecord::default()
        }
    }

    /// The client's 101: the origin's end-to-end fields, the chosen protocol, and `Via`.
    fn switching_head(&self, origin: &HeaderMap, chosen: HeaderValue) -> Response<Body> {
        let mut headers = origin.clone();
        // A `Connection` that is not a token list was refused by `chosen` already.
        let _ = strip_hop_by_hop(&mut headers);
        upgrade::restore(&mut headers, chosen);
        headers.append(header::VIA, self.via.clone());
        let mut resp = Response::new(empty());
        *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        *resp.headers_mut() = headers;
        resp
    }
}

/// The stream under an origin connection hyper gave up after a 101, with what hyper had read
/// past the 101: a pooled origin connection is a bare socket, a parent's may be TLS, and a
/// bumped request's origin connection is TLS (a WebSocket inside a bump).
fn hop_stream(up: hyper::upgrade::Upgraded) -> Result<(HopStream, Bytes), String> {
    type OriginTls = tokio_rustls::client::TlsStream<TcpStream>;
    let up = match up.downcast::<TokioIo<TcpStream>>() {
        Ok(p) => return Ok((HopStream::Plain(p.io.into_inner()), p.read_buf)),
        Err(up) => up,
    };
    let up = match up.downcast::<TokioIo<HopStream>>() {
        Ok(p) => return Ok((p.io.into_inner(), p.read_buf)),
        Err(up) => up,
    };
    match up.downcast::<TokioIo<OriginTls>>() {
        Ok(p) => Ok((HopStream::Tls(Box::new(p.io.into_inner())), p.read_buf)),
        Err(_) => Err("not a stream baton can relay (an origin reached through a parent's tunnel)".into()),
    }
}
