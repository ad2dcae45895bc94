//! A client connection from accept to close: admission (the connection limit), one task
//! per connection, and the two states it alternates between.
//!
//! - **Idle** ([`Parked`]): the bare stream, waited on until it is readable. No HTTP state,
//!   no buffer, no origin connection (its lease went back to the pool): a few hundred bytes.
//!   After `header_read` without a byte it is closed (and logged, as a slowloris would be).
//! - **Busy** ([`Stretch`]): hyper's HTTP/1.1 connection serving the requests through the
//!   [`Proxy`], read through [`Framed`] (the strict framing rules, whose faults are answered
//!   here), built when the stream is readable. Once it has been at rest for [`LINGER`] it is
//!   taken apart and the connection is idle again; it may also end (closed, or a CONNECT
//!   tunnel, which goes on as a task of its own).
//!
//! And how it winds down when the generation drains (the grace period for an idle client).
//! All connections are registered with the generation's [`Drain`]. On a TLS listener the
//! handshake comes first ([`Handshakes`]: its timeout and bound), then the same states over
//! the TLS stream.

use std::convert::Infallible;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use baton_handoff::{Drain, Incoming as Handed, Peer, Socket, Stream};
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioTimer;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::Config;
use crate::proxy::access::{AccessLine, Kind, Sent};
use crate::proxy::admission::{Admission, Refused, Slot};
use crate::proxy::framing::RequestSignal;
use crate::proxy::heap;
use crate::proxy::http1::{Apart, ClientIo, Ended, Parked, Stretch, Tracked};
use crate::proxy::http2;
use crate::proxy::metrics;
use crate::proxy::migrate::{ConnectionRecord, Kind as MoveKind, Moved, TlsConnectionRecord};
use crate::proxy::service::{Body, Client, ERROR_CONTENT_TYPE, Proxy, error_response};
use crate::proxy::stash::{self, Entry, Stored};
use crate::proxy::strict::Fault;
use crate::proxy::tunnel::stream_from_fd;
use crate::proxy::upgrade;
use crate::tls::Handshakes;
use crate::tls::handshake::Pending;
use crate::tls::moving::{Aligned, Secrets, TlsClient};

/// Connection-level settings.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    pub header_read_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_connections: usize,
    pub max_connections_per_client: Option<usize>,
    pub handshake_timeout: Duration,
    pub max_handshakes: usize,
    pub h2_max_streams: u32,
}

impl From<&Config> for ConnectionSettings {
    fn from(c: &Config) -> ConnectionSettings {
        ConnectionSettings {
            header_read_timeout: c.timeouts.header_read,
            max_header_bytes: c.limits.max_header_bytes,
            max_connections: c.limits.max_connections,
            max_connections_per_client: c.limits.max_connections_per_client,
            handshake_timeout: c.tls.handshake_timeout,
            max_handshakes: c.tls.max_handshakes,
            h2_max_streams: c.limits.h2_max_streams,
        }
    }
}

/// Everything an accept loop shares with its connections.
pub struct Connections {
    proxy: Arc<Proxy>,
    drain: Drain,
    http: http1::Builder,
    /// The connection limits; a tunnel keeps its connection's slot.
    admission: Arc<Admission>,
    header_read_timeout: Duration,
    max_header_bytes: usize,
    handshakes: Handshakes,
    /// Open connections on TLS listeners (handshaking or serving).
    tls_open: Arc<AtomicUsize>,
    h2: http2::H2Settings,
}

impl Connections {
    pub fn new(proxy: Arc<Proxy>, drain: Drain, settings: &ConnectionSettings) -> Arc<Connections> {
        let mut http = http1::Builder::new();
        // max_header_size is exact (the start line counts) and answers 431; max_buf_size bounds
        // the read buffer, which must hold a head of that size.
        http.timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_header_size(settings.max_header_bytes)
            .max_buf_size(settings.max_header_bytes)
            .keep_alive(true);
        heap::spawn_trimmer();
        Arc::new(Connections {
            proxy,
            drain,
            http,
            admission: Admission::new(settings.max_connections, settings.max_connections_per_client),
            header_read_timeout: settings.header_read_timeout,
            max_header_bytes: settings.max_header_bytes,
            handshakes: Handshakes::new(settings.handshake_timeout, settings.max_handshakes),
            tls_open: Arc::new(AtomicUsize::new(0)),
            h2: http2::H2Settings {
                max_streams: settings.h2_max_streams,
                max_header_bytes: settings.max_header_bytes,
            },
        })
    }

    pub fn proxy(&self) -> &Arc<Proxy> {
        &self.proxy
    }

    /// Connections open on TLS listeners now (counted apart in the upgrade report).
    pub fn tls_connections(&self) -> usize {
        self.tls_open.load(Ordering::Relaxed)
    }

    /// Accepts on `socket` until draining starts; the socket is dropped (closed in this
    /// process) when the loop ends. With `tls`, each connection's TLS handshake comes first.
    pub fn spawn_accept_loop(
        self: &Arc<Self>,
        name: String,
        socket: Arc<Socket>,
        tls: Option<TlsAcceptor>,
        stop: CancellationToken,
    ) {
        let connections = self.clone();
        tokio::spawn(async move {
            baton_handoff::accept_until(socket, &name, stop, |stream, peer| {
                connections.admit(stream, peer, tls.as_ref());
            })
            .await;
        });
    }

    fn admit(self: &Arc<Self>, stream: Stream, peer: Peer, tls: Option<&TlsAcceptor>) {
        let slot = match self.admission.admit(&peer) {
            Ok(slot) => slot,
            Err(refused) => {
                log_over_limit(peer, &refused, "answered 503 and closed");
                if tls.is_none() {
                    tokio::spawn(refuse_over_limit(stream, refused.reason));
                }
                // On a TLS listener a plain-text answer would be garbage to the client: close.
                return;
            }
        };
        let Some(acceptor) = tls.cloned() else {
            let task = self.clone().serve(Idle::new(stream), peer, slot);
            self.drain.connections().spawn(task);
            return;
        };
        let open = OpenTls::count(&self.tls_open);
        let pending = self.handshakes.begin();
        let connections = self.clone();
        self.drain.connections().spawn(async move {
            let _open = open;
            let Some(tls) = connections.handshake(pending, &acceptor, stream, peer).await else {
                return;
            };
            if tls.alpn() == Some(b"h2") {
                // The connection's own place is held until it ends; its tunnels take theirs.
                let _slot = slot;
                let c = &connections;
                http2::serve(c.proxy.clone(), c.drain.clone(), tls, peer, c.admission.clone(), c.h2).await;
            } else {
                connections.clone().serve(Idle::new(tls), peer, slot).await;
            }
        });
    }

    /// Adopts the tunnels and idle connections the previous generation sends until it is
    /// done or gone.
    pub async fn adopt(self: Arc<Self>, mut handed: Handed) {
        let mut refused = 0u64;
        loop {
            let items = match handed.next_batch().await {
                Ok(Some(items)) => items,
                Ok(None) => return,
                Err(e) => return warn!("receiving from the previous generation failed: {e}"),
            };
            for item in items {
                let mut item = item;
                let adopted = Moved::decode(&mut item.record).and_then(|moved| self.adopt_one(moved, item.fds));
                if let Err(why) = adopted {
                    refused += 1;
                    warn!("a connection from the previous generation was dropped: {why}");
                }
            }
            let adopted = &self.proxy.migration().adopted;
            let (tunnels, connections) = (adopted.get(MoveKind::Tunnel), adopted.get(MoveKind::Connection));
            info!(tunnels, connections, refused, "adopted from the previous generation");
        }
    }

    fn adopt_one(self: &Arc<Self>, moved: Moved, fds: Vec<OwnedFd>) -> Result<(), String> {
        match moved {
            Moved::Tunnel(record) => self.proxy.adopt_tunnel(record, fds, None, &self.admission),
            Moved::Connection(record) => self.adopt_connection(record, fds, None),
            Moved::TlsTunnel(r) => self.proxy.adopt_tunnel(r.tunnel, fds, Some(r.tls), &self.admission),
            Moved::TlsConnection(r) => self.adopt_connection(r.connection, fds, Some(r.tls)),
        }
    }

    /// Takes back the connections a crashed generation kept in systemd's fd store, as a
    /// migration's: checked against their records and this generation's policy, then served
    /// (and stashed on under their names).
    pub fn recover(self: &Arc<Self>, stored: Stored) {
        if stored.is_empty() {
            return;
        }
        let stash = self.proxy.stash();
        let found = stored.connections(&|name| stash::forget(stash, Some(name)));
        let mut refused = 0u64;
        for (moved, fds) in found {
            let name = moved.stashed().map(str::to_string);
            if let Err(why) = self.adopt_one(moved, fds) {
                refused += 1;
                stash::forget(stash, name.as_deref());
                warn!("a connection kept in systemd's fd store was dropped: {why}");
            }
        }
        let adopted = &self.proxy.migration().adopted;
        let (tunnels, connections) = (adopted.get(MoveKind::Tunnel), adopted.get(MoveKind::Connection));
        info!(
            tunnels,
            connections, refused, "taken back from systemd's fd store after a crash"
        );
    }

    /// One idle client connection the previous generation handed over: served here from
    /// its next request on, unless this generation's policy no longer admits the client
    /// (closed then, and the line names the rule).
    fn adopt_connection(
        self: &Arc<Self>,
        mut record: ConnectionRecord,
        mut fds: Vec<OwnedFd>,
        tls: Option<Secrets>,
    ) -> Result<(), String> {
        let (Some(fd), true) = (fds.pop(), fds.is_empty()) else {
            return Err(format!("a connection has {} fds, not 1", fds.len() + 1));
        };
        record.check_fd(&fd)?;
        let stream = stream_from_fd(fd, record.client.is_none()).map_err(|e| format!("cannot adopt its fd: {e}"))?;
        match tls {
            None => self.adopt_idle(record, stream),
            Some(secrets) => {
                let tls = TlsClient::resume(stream, secrets).map_err(|e| format!("cannot resume its TLS: {e}"))?;
                self.adopt_idle(record, tls)
            }
        }
    }

    /// A moved idle connection, plain or TLS, served here from its next request on.
    fn adopt_idle<T: ClientIo>(self: &Arc<Self>, record: ConnectionRecord, stream: T) -> Result<(), String> {
        metrics::migrated("connection", 1);
        self.proxy.migration().count_adopted(MoveKind::Connection, T::TLS);
        let peer = record.client.map_or(Peer::Local, Peer::Ip);
        if let Some(addr) = record.client
            && let Err(d) = self.proxy.policy.check_client(addr.ip())
        {
            AccessLine::new(Kind::Denied, peer)
                .status(d.status)
                .rule(d.rule.as_str())
                .reason(format!("moved connection closed: {}", d.reason))
                .write();
            stash::forget(self.proxy.stash(), record.stashed.as_deref());
            stream.close(false, &self.drain);
            return Ok(());
        }
        let slot = match self.admission.admit(&peer) {
            Ok(slot) => slot,
            Err(refused) => {
                log_over_limit(peer, &refused, "a moved connection is closed");
                stash::forget(self.proxy.stash(), record.stashed.as_deref());
                stream.close(false, &self.drain);
                return Ok(());
            }
        };
        let idle_for = Duration::from_millis(record.idle_ms);
        let stash = self.keep_stashed(&record, &stream);
        let idle = Idle {
            parked: Some(Parked {
                stream,
                unread: record.unread.into_boxed_slice(),
            }),
            since: Instant::now().checked_sub(idle_for).unwrap_or_else(Instant::now),
            served: record.served,
            stalled: false,
            stay: false,
            stash,
            stash_from: Instant::now(),
        };
        let task = self.clone().serve(idle, peer, slot);
        if !T::TLS {
            self.drain.connections().spawn(task);
            return Ok(());
        }
        // Counted with the TLS connections, as it was where it was accepted.
        let open = OpenTls::count(&self.tls_open);
        self.drain.connections().spawn(async move {
            let _open = open;
            task.await;
        });
        Ok(())
    }

    /// An adopted connection that was stashed (by the previous generation, or by a crashed
    /// one) stays in the store under its name, with its record in this generation's table;
    /// without a stash here it leaves the store.
    fn keep_stashed<T: ClientIo>(&self, record: &ConnectionRecord, stream: &T) -> Option<Box<Entry>> {
        let name = record.stashed.as_deref()?;
        let kept = match (self.proxy.stash(), stream.stash_fd()) {
            (Some(stash), Some(fd)) => stash.keep(name, &Moved::Connection(record.clone()), &[fd]),
            _ => None,
        };
        if kept.is_none() {
            stash::forget(self.proxy.stash(), Some(name));
        }
        kept
    }

    /// The TLS handshake, within its limits; a connection cut by the drain deadline, or
    /// whose handshake fails, is closed (and the reason logged).
    async fn handshake(
        &self,
        pending: Pending,
        acceptor: &TlsAcceptor,
        stream: Stream,
        peer: Peer,
    ) -> Option<TlsClient> {
        let cut = self.drain.cut_token();
        let result = tokio::select! {
            r = self.handshakes.complete(pending, acceptor, Aligned::new(stream)) => r,
            _ = cut.cancelled() => return None,
        };
        match result {
            Ok(tls) => {
                metrics::tls_handshake("ok");
                Some(TlsClient::Live(Box::new(tls)))
            }
            Err(e) => {
                metrics::tls_handshake(e.label());
                AccessLine::new(Kind::Closed, peer).reason(e.to_string()).write();
                None
            }
        }
    }

    /// The connection's task; `slot` is its place under the connection limits, given back
    /// when the task ends (or, if it became a tunnel, when the tunnel ends). Every connection costs this future's size, idle or not, so: it is
    /// spawned as it is (not wrapped); it is an `async move` block that uses what it
    /// captures in place (an `async fn` would also keep a second copy of its arguments);
    /// and each await is a statement of its own (a temporary lives to the end of its
    /// statement: two futures in one would both take room).
    #[allow(clippy::manual_async_fn)] // see above
    fn serve<T: ClientIo>(self: Arc<Self>, mut idle: Idle<T>, peer: Peer, slot: Slot) -> impl Future<Output = ()> {
        async move {
            loop {
                let woke = self.wait(&idle, &peer).await;
                match woke {
                    Wake::Readable => {}
                    Wake::Close => return self.unstash(&mut idle),
                    Wake::Stash => {
                        self.stash_idle(&mut idle, &peer);
                        continue;
                    }
                    Wake::Move => {
                        // Boxed: once per connection at most, and every task would keep room.
                        let moved = Box::pin(self.depart(&mut idle, &peer)).await;
                        if moved {
                            return;
                        }
                        continue;
                    }
                }
                if let (Some(stash), Some(entry)) = (self.proxy.stash(), &idle.stash) {
                    stash.hide(entry);
                }
                let rested = self.busy(&mut idle, &peer, &slot).await;
                if !rested {
                    return self.unstash(&mut idle);
                }
                self.restash(&mut idle, &peer);
            }
        }
    }

    /// Waits, with no HTTP state, until the idle connection's stream is readable (or has
    /// unread bytes). `false`: close it, because `header_read` passed without a byte
    /// (logged), or, draining, the grace period did, or the drain deadline cut it.
    ///
    /// Closing an idle connection at once when the generation drains races with a client
    /// sending its next request at that moment: it would see the connection close
    /// unanswered. So a client that was served gets a grace period to start one more
    /// (answered with `Connection: close`); one that has not sent its first request yet gets
    /// until `header_read` passes. A request counts from its first byte.
    ///
    /// When the generation hands over with migration, an idle plain connection moves to the
    /// successor instead (`Move`; migration is requested before draining begins, so the
    /// drain's wake-up finds it requested).
    ///
    /// One poll function rather than `select!`s: every idle connection's task is as large as
    /// this state, and it holds only the timer and one drain waiter at a time.
    async fn wait<T: ClientIo>(&self, idle: &Idle<T>, peer: &Peer) -> Wake {
        let Some(parked) = &idle.parked else {
            return Wake::Close;
        };
        if !parked.unread.is_empty() && !idle.stalled {
            return Wake::Readable;
        }
        let movable = !idle.stay;
        let _counted = metrics::IdleConnection::new();
        let deadline = idle.since + self.header_read_timeout;
        let stash_at = self.stash_due(idle).filter(|at| *at < deadline);
        let timer = tokio::time::sleep_until(stash_at.unwrap_or(deadline));
        tokio::pin!(timer);
        // Resolves at the drain deadline; on its way it wakes the task when draining begins.
        let drain = async {
            self.drain.draining().cancelled().await;
            self.drain.cut_token().cancelled().await;
        };
        tokio::pin!(drain);
        let mut grace = false;
        std::future::poll_fn(|cx| {
            if parked.stream.poll_readable(cx).is_ready() {
                return Poll::Ready(Wake::Readable);
            }
            if drain.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Wake::Close);
            }
            if movable && self.drain.is_draining() && self.proxy.migration().is_requested() {
                return Poll::Ready(Wake::Move);
            }
            if !grace && idle.served && self.drain.is_draining() {
                grace = true;
                timer.as_mut().reset(deadline.min(Instant::now() + IDLE_GRACE));
            }
            match timer.as_mut().poll(cx) {
                Poll::Ready(()) if stash_at.is_some() && !grace && Instant::now() < deadline => {
                    Poll::Ready(Wake::Stash)
                }
                Poll::Ready(()) if grace => Poll::Ready(Wake::Close),
                Poll::Ready(()) => {
                    log_idle_timeout(*peer);
                    Poll::Ready(Wake::Close)
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Hands the idle connection to the successor: `true` once it holds it. Otherwise
    /// (the batch was refused, or the successor is gone) the connection is back in `idle`,
    /// and stays here: it drains as before.
    async fn depart<T: ClientIo>(&self, idle: &mut Idle<T>, peer: &Peer) -> bool {
        let Some(parked) = idle.parked.take() else {
            return true;
        };
        idle.stay = true;
        let (stream, unread) = parked.into_parts();
        let apart = match stream.take_apart() {
            Ok(apart) => apart,
            Err((kept, why)) => return self.stays(idle, kept, unread, why, peer),
        };
        let connection = ConnectionRecord {
            client: match peer {
                Peer::Ip(a) => Some(*a),
                Peer::Local => None,
            },
            unread,
            served: idle.served,
            idle_ms: idle.since.elapsed().as_millis() as u64,
            stashed: idle.stash.as_ref().map(|e| e.name().to_string()),
        };
        let record = match apart.tls {
            Some(tls) => Moved::TlsConnection(TlsConnectionRecord { connection, tls }),
            None => Moved::Connection(connection),
        };
        let Err(mut fds) = self.proxy.migration().depart(&record, vec![apart.fd]).await else {
            // The successor keeps it in the store under its name.
            if let (Some(stash), Some(entry)) = (self.proxy.stash(), idle.stash.take()) {
                stash.release(entry);
            }
            return true;
        };
        // The successor did not take it: it goes on here, from the same state.
        let (connection, secrets) = match record {
            Moved::Connection(c) => (c, None),
            Moved::TlsConnection(r) => (r.connection, Some(r.tls)),
            _ => return true,
        };
        let Some(fd) = fds.pop() else { return true };
        let apart = Apart {
            fd,
            unix: apart.unix,
            tls: secrets,
        };
        match T::put_together(apart) {
            Ok(stream) => {
                idle.parked = Some(Parked {
                    stream,
                    unread: connection.unread.into_boxed_slice(),
                });
                false
            }
            Err(_) => true,
        }
    }

    /// When the idle connection is due to be stashed: only with a stash, for a connection
    /// that can be (a plain socket), not stashed yet, and not while draining.
    fn stash_due<T: ClientIo>(&self, idle: &Idle<T>) -> Option<Instant> {
        let stash = self.proxy.stash()?;
        let due = !T::TLS && idle.stash.is_none() && !idle.stay && !self.drain.is_draining();
        due.then(|| idle.stash_from + stash.after())
    }

    /// The record a stashed idle connection is taken back by.
    fn idle_record<T: ClientIo>(idle: &Idle<T>, peer: &Peer) -> Option<Moved> {
        let parked = idle.parked.as_ref()?;
        Some(Moved::Connection(ConnectionRecord {
            client: match peer {
                Peer::Ip(a) => Some(*a),
                Peer::Local => None,
            },
            unread: parked.unread.to_vec(),
            served: idle.served,
            idle_ms: 0,
            stashed: None,
        }))
    }

    /// Keeps the idle connection in systemd's fd store. Not possible now (this generation
    /// does not serve yet, no slot is free, its record does not fit): tried again
    /// `stash_after` later.
    fn stash_idle<T: ClientIo>(&self, idle: &mut Idle<T>, peer: &Peer) {
        idle.stash_from = Instant::now();
        let (Some(stash), Some(record)) = (self.proxy.stash(), Self::idle_record(idle, peer)) else {
            return;
        };
        let Some(fd) = idle.parked.as_ref().and_then(|p| p.stream.stash_fd()) else {
            return;
        };
        idle.stash = stash.put(&record, &[fd]);
    }

    /// The stashed connection rests again: its record is written again (its unread bytes
    /// may have changed); one that no longer fits leaves the store.
    fn restash<T: ClientIo>(&self, idle: &mut Idle<T>, peer: &Peer) {
        let (Some(stash), Some(entry)) = (self.proxy.stash(), idle.stash.take()) else {
            return;
        };
        match Self::idle_record(idle, peer) {
            Some(record) if stash.show(&entry, &record) => idle.stash = Some(entry),
            _ => stash.remove(entry),
        }
    }

    /// The connection ends (closed here, or a tunnel now, which stashes itself): out of the
    /// store. A parked stream left is shut down first: systemd's copy would keep it open.
    fn unstash<T: ClientIo>(&self, idle: &mut Idle<T>) {
        let (Some(stash), Some(entry)) = (self.proxy.stash(), idle.stash.take()) else {
            return;
        };
        if let Some(fd) = idle.parked.as_ref().and_then(|p| p.stream.stash_fd()) {
            stash::shut(fd);
        }
        stash.remove(entry);
    }

    /// A connection that could not be taken apart stays idle here (`false`), or, if it was
    /// lost on the way (`true`), ends; a TLS one is counted by why.
    fn stays<T: ClientIo>(
        &self,
        idle: &mut Idle<T>,
        kept: Option<T>,
        unread: Vec<u8>,
        why: &'static str,
        peer: &Peer,
    ) -> bool {
        if T::TLS {
            self.proxy.migration().tls_stayed(why);
        }
        let Some(stream) = kept else {
            warn!(client = %peer, "cannot take an idle connection apart to move it: {why}");
            self.unstash(idle);
            return true;
        };
        debug!(client = %peer, "an idle connection stays in this generation: {why}");
        idle.parked = Some(Parked {
            stream,
            unread: unread.into_boxed_slice(),
        });
        false
    }

    /// Serves the idle connection with hyper until it comes to rest (`true`: `idle` is
    /// the connection idle again) or ends.
    async fn busy<T: ClientIo>(&self, idle: &mut Idle<T>, peer: &Peer, slot: &Slot) -> bool {
        let Some(parked) = idle.parked.take() else {
            return false;
        };
        let _busy = heap::Busy::new();
        let signal = Arc::new(RequestSignal::default());
        let sent = Arc::new(Sent::default());
        // Dropped last: a Squid line still waiting when the stretch ends (its client gone)
        // is written then.
        let _closing = Closing(&sent);
        let client = Arc::new(Client::new(self.proxy.upstream(), sent.clone()));
        let service = self.service(*peer, signal.clone(), client.clone());
        let mut stretch = Stretch::new(
            &self.http,
            parked,
            signal.clone(),
            sent.clone(),
            self.max_header_bytes,
            service,
        );
        let may_move = !idle.stay;
        let Some(ended) = self.drive(&mut stretch, &signal, may_move).await else {
            return false;
        };
        let served = signal.started() > 0;
        match ended {
            Ended::Rest { parked, since } => {
                idle.parked = Some(parked);
                idle.since = since;
                idle.served |= served;
                idle.stalled = !served;
                true
            }
            Ended::Done(parked) => {
                self.done(parked, &client, &signal, slot);
                false
            }
            Ended::Failed(e) => {
                log_end(*peer, &sent, Err(e));
                false
            }
        }
    }

    /// Polls `stretch` until it ends; `None`: cut at the drain deadline. Once the generation
    /// drains (noticed at the next poll: a lingering stretch is polled when its linger ends),
    /// the stretch no longer lingers at rest (the idle connection then gets its grace period
    /// in [`Connections::wait`]), and a request started after that is the last: its
    /// response says `Connection: close`.
    async fn drive<T, S>(&self, stretch: &mut Stretch<T, S>, signal: &RequestSignal, may_move: bool) -> Option<Ended<T>>
    where
        T: ClientIo,
        S: hyper::service::HttpService<Incoming, ResBody = Tracked<Body>> + Unpin,
        S::Future: Unpin,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let mut last = None;
        // Moving: since when, and how many requests had started then.
        let mut moving: Option<(Instant, u64)> = None;
        let serve = std::future::poll_fn(|cx| {
            let linger = match last {
                None if self.drain.is_draining() => {
                    // Moving, the connection is not closed after its exchange: it moves
                    // once at rest. Otherwise a request started after this is the last.
                    if may_move && self.proxy.migration().is_requested() {
                        moving = Some((Instant::now(), signal.started()));
                        last = Some(u64::MAX);
                    } else {
                        last = Some(signal.started());
                    }
                    Duration::ZERO
                }
                None => LINGER,
                Some(_) => Duration::ZERO,
            };
            let polled = stretch.poll_serve(cx, linger);
            if polled.is_pending() && last.is_some_and(|n| signal.started() > n) {
                stretch.close_after_current();
                last = Some(u64::MAX);
            }
            // A client that never comes to rest (a request always behind the last) is not
            // kept to the drain deadline: past MOVE_PATIENCE and a second new request, the
            // exchange in flight is its last here, as without moving.
            if polled.is_pending()
                && moving.is_some_and(|(t, n)| signal.started() > n + 1 && t.elapsed() >= MOVE_PATIENCE)
            {
                stretch.close_after_current();
                moving = None;
            }
            polled
        });
        let cut = self.drain.cut_token();
        tokio::select! {
            biased;
            ended = serve => Some(ended),
            () = cut.cancelled() => None,
        }
    }

    /// hyper ended the connection without shutting the stream down: a CONNECT answered with
    /// a 2xx hands it to its tunnel (with a share of the connection's slot); anything else is
    /// closed (FIN first, as hyper would, then a lingering close on a task the drain waits for).
    fn done<T: ClientIo>(&self, parked: Parked<T>, client: &Client, signal: &RequestSignal, slot: &Slot) {
        let (stream, unread) = parked.into_parts();
        if let Some(tunnel) = client.take_tunnel() {
            if signal.flushed() {
                // hyper has written the `200`: the bytes since the last line are its.
                let answer = client.sent.take();
                self.proxy
                    .start_tunnel(tunnel, stream.into_tunnel(), unread, answer, slot.clone());
                return;
            }
            let reason = "tunnel not started: the answer to CONNECT was not written";
            tunnel.ask.line(Kind::Closed, StatusCode::OK).reason(reason).write();
        }
        stream.close(!unread.is_empty(), &self.drain);
    }

    /// The service hyper calls for each request of a stretch: the [`Proxy`], with the
    /// framing's faults answered first and every response body tracked (its end is part of
    /// the connection coming to rest).
    fn service(
        &self,
        peer: Peer,
        signal: Arc<RequestSignal>,
        client: Arc<Client>,
    ) -> impl hyper::service::Service<
        Request<Incoming>,
        Response = Response<Tracked<Body>>,
        Error = Infallible,
        Future = Answer,
    > + Unpin
    + Send
    + 'static {
        let proxy = self.proxy.clone();
        service_fn(move |req: Request<Incoming>| -> Answer {
            let index = signal.start();
            if let Some(fault) = signal.fault(index) {
                let resp = refuse_fault(peer, &client.sent, &req, fault).map(|b| Tracked::new(b, signal.clone()));
                return Box::pin(std::future::ready(Ok(resp)));
            }
            // The framing waits for a CONNECT's answer (a 2xx makes the rest a tunnel), and for
            // an upgrade's without content (a 101 does).
            let connect = req.method() == Method::CONNECT;
            let awaited = signal.awaits_answer(index);
            let mut req = req;
            if awaited && !connect {
                req.extensions_mut().insert(upgrade::SwitchAwaited);
            }
            let (proxy, client, signal) = (proxy.clone(), client.clone(), signal.clone());
            // The service's future is made inside the box, not moved into it: it is large.
            Box::pin(async move {
                let Ok(resp) = proxy.serve(peer, client, req).await;
                if connect {
                    signal.answered_connect(resp.status().is_success());
                } else if awaited {
                    signal.answered_connect(resp.status() == StatusCode::SWITCHING_PROTOCOLS);
                }
                Ok(resp.map(|b| Tracked::new(b, signal)))
            })
        })
    }
}

/// The future of one request, boxed: hyper's `poll_without_shutdown` (which gives the stream
/// back) wants it `Unpin`.
type Answer = Pin<Box<dyn Future<Output = Result<Response<Tracked<Body>>, Infallible>> + Send>>;

/// Why an idle connection's wait ended.
enum Wake {
    /// The client sent bytes (or closed): serve it.
    Readable,
    /// Close it (the wait says why, in the log, when it matters).
    Close,
    /// Move it to the successor.
    Move,
    /// Keep it in systemd's fd store (it has lived `stash_after`).
    Stash,
}

/// An idle connection between two busy stretches.
struct Idle<T> {
    /// `None` only while a stretch serves it.
    parked: Option<Parked<T>>,
    /// When it went idle (accepted, or its stretch came to rest).
    since: Instant,
    /// Whether it has served a request (for the drain's grace period).
    served: bool,
    /// Its last stretch came to rest without a request: wait for the stream even if bytes
    /// are unread (they did not make a request).
    stalled: bool,
    /// A move was tried and failed: it stays in this generation.
    stay: bool,
    /// Its place in systemd's fd store (`proxy::stash`), once it is kept there; boxed, one
    /// word in every connection's task.
    stash: Option<Box<Entry>>,
    /// Since when it counts for the stash: it is stashed once idle `stash_after` past this
    /// (accepted, or the last try, made while this generation did not serve yet).
    stash_from: Instant,
}

impl<T: ClientIo> Idle<T> {
    /// A connection just accepted (or just through its TLS handshake).
    fn new(stream: T) -> Idle<T> {
        Idle {
            parked: Some(Parked::new(stream)),
            since: Instant::now(),
            served: false,
            stalled: false,
            stay: false,
            stash: None,
            stash_from: Instant::now(),
        }
    }
}

/// Closes a stretch's [`Sent`] when dropped.
struct Closing<'a>(&'a Sent);

impl Drop for Closing<'_> {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// One open TLS connection in [`Connections::tls_connections`], while it lives.
struct OpenTls(Arc<AtomicUsize>);

impl OpenTls {
    fn count(open: &Arc<AtomicUsize>) -> OpenTls {
        open.fetch_add(1, Ordering::Relaxed);
        OpenTls(open.clone())
    }
}

impl Drop for OpenTls {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How long a busy connection stays at rest (every request answered, nothing to read)
/// before hyper's connection is taken apart. Under keep-alive load the next request comes
/// well within it (hyper's state and the origin connection are reused, as they were before
/// idle connections were parked); a client quiet for longer costs a rebuild when it sends
/// again (docs/benchmarks.md measures both).
pub const LINGER: Duration = Duration::from_millis(LINGER_MS);
const LINGER_MS: u64 = 5;

fn log_idle_timeout(peer: Peer) {
    let reason = "request head not received within header_read";
    AccessLine::new(Kind::Closed, peer).reason(reason).write();
}

/// The answer to a request whose head broke a rule of [`crate::proxy::strict`]: the status
/// and the reason, and the connection closes after it (its framing may not be what hyper
/// made of it).
fn refuse_fault(peer: Peer, sent: &Arc<Sent>, req: &Request<Incoming>, fault: Fault) -> Response<Body> {
    let started = std::time::Instant::now();
    let bytes_out = fault.reason.len() as u64 + 1;
    AccessLine::new(Kind::Refused, peer)
        .request(req.method().clone(), req.uri().clone(), fault.status)
        .traffic(0, bytes_out, started)
        .reason(fault.reason)
        .sent(sent.clone())
        .content_type(Some(HeaderValue::from_static(ERROR_CONTENT_TYPE)))
        .write();
    metrics::request_done(req.method(), fault.status, started, 0, bytes_out, false);
    let mut resp = error_response(fault.status, fault.reason);
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// How long a busy connection may go without coming to rest once it is to move (it moves at
/// rest) before its exchange in flight is its last in this generation.
const MOVE_PATIENCE: Duration = Duration::from_secs(1);

/// How long a draining generation keeps an idle keep-alive connection open for the client's
/// next request (answered with `Connection: close`) before closing it.
const IDLE_GRACE: Duration = Duration::from_secs(1);

/// hyper answers unparsable input itself (400, or 431 for an oversized head) and closes; the
/// reason goes to the access log here. Other endings (resets, a vanished peer) are routine.
fn log_end(peer: Peer, sent: &Arc<Sent>, result: Result<(), hyper::Error>) {
    let Err(e) = result else { return };
    let status = match () {
        () if e.is_parse_too_large() => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        () if e.is_parse() => StatusCode::BAD_REQUEST,
        () if e.is_timeout() => {
            let reason = "request head not received within header_read";
            AccessLine::new(Kind::Closed, peer)
                .reason(reason)
                .sent(sent.clone())
                .write();
            return;
        }
        () => {
            debug!(client = %peer, "connection ended: {e}");
            return;
        }
    };
    AccessLine::new(Kind::Refused, peer)
        .status(status)
        .reason(e.to_string())
        .sent(sent.clone())
        .write();
}

fn log_over_limit(peer: Peer, refused: &Refused, what: &str) {
    warn!(client = %peer, rule = refused.rule.as_str(), "{}: {what}", refused.reason);
    AccessLine::new(Kind::Denied, peer)
        .status(StatusCode::SERVICE_UNAVAILABLE)
        .rule(refused.rule.as_str())
        .reason(refused.reason.clone())
        .write();
}

async fn refuse_over_limit(mut stream: Stream, reason: String) {
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{reason}\n",
        reason.len() + 1
    );
    let write = async {
        stream.write_all(resp.as_bytes()).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), write).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::ProxySettings;
    use crate::proxy::policy::Policy;

    /// A connection's task is as large as its largest state, the busy one included, and it
    /// is most of what an idle connection costs (the rest is its socket's registration): it
    /// must stay small. (488 bytes when this was written; the idle target is 2 KiB all told.)
    /// Connections on the default configuration, and a connected pair: the client's end,
    /// the accepted end and the client's address.
    async fn setup() -> (
        Arc<Connections>,
        tokio::net::TcpStream,
        tokio::net::TcpStream,
        std::net::SocketAddr,
    ) {
        let config = Config::load(None).unwrap();
        let drain = Drain::new();
        let policy = Arc::new(Policy::new(config.access.clone()).unwrap());
        let limits = Arc::default();
        let proxy = Arc::new(Proxy::new(
            ProxySettings::from(&config),
            policy,
            limits,
            drain.clone(),
            None,
            None,
        ));
        let connections = Connections::new(proxy, drain, &ConnectionSettings::from(&config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (stream, addr) = listener.accept().await.unwrap();
        (connections, client, stream, addr)
    }

    #[tokio::test]
    async fn a_connection_task_is_small() {
        let (connections, client, stream, addr) = setup().await;
        let idle = Idle::new(Stream::Tcp(stream));
        let slot = connections.admission.admit(&Peer::Ip(addr)).unwrap();
        let task = connections.clone().serve(idle, Peer::Ip(addr), slot);
        let size = std::mem::size_of_val(&task);
        assert!(size <= 640, "the connection task's future is {size} bytes");
        drop((task, client));
    }

    /// Reads one answer's head and its `Content-Length` body.
    async fn answer(s: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(s.read(&mut byte).await.unwrap(), 1, "closed: {head:?}");
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .map_or(0, |v| {
                let n = crate::proxy::strict::content_length(v.trim().as_bytes()).unwrap();
                usize::try_from(n).unwrap()
            });
        let mut body = vec![0u8; len];
        s.read_exact(&mut body).await.unwrap();
        head
    }

    /// A connection handed over with a request already read (the record's unread bytes: a
    /// pipelined request that sat in the old generation's buffer) is served from those
    /// bytes first, then from its socket, on the same connection.
    #[tokio::test]
    async fn an_adopted_connection_serves_its_unread_request_first() {
        let (connections, mut client, server, addr) = setup().await;
        let fd: OwnedFd = server.into_std().unwrap().into();
        // Answered by the proxy itself (port 1 is refused or denied): no origin needed.
        let request = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n";
        let record = ConnectionRecord {
            client: Some(addr),
            unread: request.to_vec(),
            served: true,
            idle_ms: 0,
            stashed: None,
        };
        connections.adopt_connection(record, vec![fd], None).unwrap();
        let within = Duration::from_secs(5);
        let first = tokio::time::timeout(within, answer(&mut client))
            .await
            .expect("an answer");
        assert!(first.starts_with("http/1.1 "), "{first}");
        assert!(!first.contains("connection: close"), "{first}");
        tokio::io::AsyncWriteExt::write_all(&mut client, request).await.unwrap();
        let second = tokio::time::timeout(within, answer(&mut client))
            .await
            .expect("an answer");
        assert!(second.starts_with("http/1.1 "), "{second}");
    }

    /// The policy judges a moved connection by its socket's peer, not by its record: a
    /// record claiming an address outside `allow_clients` (loopback) does not get a loopback
    /// client closed, and a pipe in place of the socket is refused, naming its fd.
    #[tokio::test]
    async fn a_moved_connection_is_judged_by_its_real_peer_not_its_record() {
        let (connections, mut client, server, _) = setup().await;
        let fd: OwnedFd = server.into_std().unwrap().into();
        let request = b"GET http://127.0.0.1:1/ HTTP/1.1\r\nHost: 127.0.0.1:1\r\n\r\n";
        let record = ConnectionRecord {
            client: Some("192.0.2.7:4242".parse().unwrap()),
            unread: request.to_vec(),
            served: true,
            idle_ms: 0,
            stashed: None,
        };
        connections.adopt_connection(record.clone(), vec![fd], None).unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), answer(&mut client))
            .await
            .expect("an answer: the kernel's peer is loopback, which the policy admits");
        assert!(answer.starts_with("http/1.1 "), "{answer}");
        let (r, _w) = nix::unistd::pipe().unwrap();
        let raw = std::os::fd::AsRawFd::as_raw_fd(&r);
        let err = connections.adopt_connection(record, vec![r], None).unwrap_err();
        assert!(
            err.contains(&format!("fd {raw}: a pipe where a socket was expected")),
            "{err}"
        );
    }
}
