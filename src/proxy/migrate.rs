//! Moving live connections to the next generation once its canary passed (the hand-over
//! protocol is `baton_handoff::transfer`). The old generation's side: [`Migration`] is
//! requested at the verdict; each spliced tunnel then stops relaying at once (its bytes wait
//! in the kernel: sockets and pipes), and each plain client connection stops as soon as it
//! is idle between requests, and *departs* with its fds and its [`Moved`] record; one task
//! batches the departures over the channel and tells each whether it moved or stays (a
//! batch the successor did not acknowledge). What stays relays on, or is served on, and
//! drains as before. The successor's side is `Connections::adopt`.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use baton_handoff::received::{self, Family};
use baton_handoff::{Item, Transfer, batches};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::proxy::metrics;
use crate::tls::moving::Secrets;

/// How long the successor has to acknowledge a batch before the tunnels in it stay here.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);
/// Batches moved between two trims of the heap: what moved out was freed, and this
/// generation's memory and its successor's add up in the unit's cgroup until it exits, so
/// it is given back as the move goes (each trim costs about a millisecond at 10,000
/// connections).
const TRIM_EVERY: usize = 8;
/// After the first departure, how long to wait for the others that woke with it, so that
/// they share batches.
const GATHER: Duration = Duration::from_millis(2);

/// A record on the move: what kind of connection, and what the next generation needs to
/// know of it. Externally tagged (`{"connection":{...}}`): serde reads that without first
/// buffering the record, as an internal tag would (measured at 10,000 connections). Both generations run the same build (the transfer's version is agreed at
/// readiness), so the kinds are known to both.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Moved {
    Tunnel(TunnelRecord),
    Connection(ConnectionRecord),
    /// A tunnel inside a TLS connection to the proxy, and that connection's record state
    /// (its fds: the client's socket and the origin's; it never has pipes).
    TlsTunnel(TlsTunnelRecord),
    /// An idle connection on a TLS listener, and its record state.
    TlsConnection(TlsConnectionRecord),
}

impl Moved {
    /// The record's bytes. One with TLS keys is written into a buffer measured first, so
    /// that no reallocation leaves a copy of them behind in freed memory; the transfer
    /// wipes the buffer once it is sent.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        if !matches!(self, Moved::TlsTunnel(_) | Moved::TlsConnection(_)) {
            return serde_json::to_vec(self);
        }
        let mut measure = Measure(0);
        serde_json::to_writer(&mut measure, self)?;
        let mut out = Vec::with_capacity(measure.0);
        serde_json::to_writer(&mut out, self)?;
        Ok(out)
    }

    /// A record from its bytes, which are wiped then (they may carry TLS keys).
    pub fn decode(bytes: &mut [u8]) -> Result<Moved, String> {
        let moved = serde_json::from_slice(bytes).map_err(|e| format!("bad record: {e}"));
        baton_handoff::wipe(bytes);
        moved
    }

    /// The name its fds have in systemd's fd store, if it is stashed (`proxy::stash`).
    pub fn stashed(&self) -> Option<&str> {
        match self {
            Moved::Tunnel(t) | Moved::TlsTunnel(TlsTunnelRecord { tunnel: t, .. }) => t.stashed.as_deref(),
            Moved::Connection(c) | Moved::TlsConnection(TlsConnectionRecord { connection: c, .. }) => {
                c.stashed.as_deref()
            }
        }
    }

    pub fn set_stashed(&mut self, name: &str) {
        let stashed = match self {
            Moved::Tunnel(t) | Moved::TlsTunnel(TlsTunnelRecord { tunnel: t, .. }) => &mut t.stashed,
            Moved::Connection(c) | Moved::TlsConnection(TlsConnectionRecord { connection: c, .. }) => &mut c.stashed,
        };
        *stashed = Some(name.to_string());
    }

    pub fn kind(&self) -> Kind {
        match self {
            Moved::Tunnel(_) | Moved::TlsTunnel(_) => Kind::Tunnel,
            Moved::Connection(_) | Moved::TlsConnection(_) => Kind::Connection,
        }
    }
}

/// Counts the bytes written to it.
struct Measure(usize);

impl std::io::Write for Measure {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A tunnel inside a TLS connection: the tunnel's record, and the client connection's TLS
/// record state (keys zeroized when dropped).
#[derive(Debug, Serialize, Deserialize)]
pub struct TlsTunnelRecord {
    pub tunnel: TunnelRecord,
    pub tls: Secrets,
}

/// An idle TLS client connection: the connection's record, and its TLS record state.
#[derive(Debug, Serialize, Deserialize)]
pub struct TlsConnectionRecord {
    pub connection: ConnectionRecord,
    pub tls: Secrets,
}

/// A client connection idle between requests: one fd, the client socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectionRecord {
    /// The client's address; `None` for a Unix-socket client.
    pub client: Option<SocketAddr>,
    /// Bytes read from the client that no request has used yet (usually none: a request
    /// that arrives during the move waits in the socket, which moves).
    pub unread: Vec<u8>,
    /// Whether it has served a request (for the drain's grace period).
    pub served: bool,
    /// How long it had been idle (its `header_read` deadline goes on from there).
    pub idle_ms: u64,
    /// Its name in systemd's fd store, when it is stashed there: the next generation keeps
    /// it under that name (`proxy::stash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stashed: Option<String>,
}

impl ConnectionRecord {
    /// Checks that `fd` is what the record says (a connected TCP socket, or Unix for a
    /// Unix client) and takes the client's address from the kernel: the record's may be
    /// stale or forged, and the policy is checked against it.
    pub fn check_fd(&mut self, fd: &OwnedFd) -> Result<(), String> {
        self.client = client_of(fd, self.client.is_none())?;
        Ok(())
    }
}

/// The kernel's peer of a received client socket, which must be of the family the record
/// says (`unix`); `None` for a Unix client.
fn client_of(fd: &OwnedFd, unix: bool) -> Result<Option<SocketAddr>, String> {
    let family = if unix { Family::Unix } else { Family::Ip };
    received::connected_stream(fd.as_fd(), family).map_err(|e| format!("refused: {e}"))
}

/// What the next generation needs to know of a tunnel besides its fds: who, where, how
/// much so far, and how the fds are laid out.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TunnelRecord {
    /// The client's address; `None` for a Unix-socket client.
    pub client: Option<SocketAddr>,
    /// The CONNECT target as the client sent it (`host:port`).
    pub target: String,
    /// The authenticated user, if the proxy asked for one.
    pub user: Option<String>,
    /// Opened through a parent proxy: the origin socket leads to the parent.
    #[serde(default)]
    pub via_parent: bool,
    /// Which parent (`host:port` as configured), for the access line; absent from an older
    /// generation's record.
    #[serde(default)]
    pub parent: Option<String>,
    /// When the CONNECT request arrived (milliseconds since the Unix epoch).
    pub started_ms: u64,
    /// Bytes so far, client→origin and origin→client (across generations).
    pub up: u64,
    pub down: u64,
    /// How long no byte had moved when it left (a stashed one: when it was last written),
    /// so that its idle timer goes on rather than starting again.
    #[serde(default)]
    pub quiet_ms: u64,
    pub client_unix: bool,
    /// For the Squid access line, in whichever generation the tunnel ends: the address it
    /// leads to (the target, or the parent), and the bytes of the `200` answer the client was
    /// sent. Absent from an older generation's record.
    #[serde(default)]
    pub server: Option<IpAddr>,
    #[serde(default)]
    pub answer: u64,
    /// Which pipes travel (up, down): each is two fds after the client's and the origin's.
    pub pipes: [bool; 2],
    /// Whether the tunnel's first bytes were read for a server name (`[access] sni`), and
    /// the name they gave: a generation that did not look leaves both unset, and its
    /// tunnels are not held to what it never saw.
    #[serde(default)]
    pub sni_checked: bool,
    #[serde(default)]
    pub sni: Option<String>,
    /// Set when the tunnel is an upgraded connection (an absolute-form request answered
    /// 101), not a CONNECT's: its access line, its rules and its SNI check differ.
    #[serde(default)]
    pub upgrade: Option<UpgradeRecord>,
    /// Its name in systemd's fd store, when it is stashed there (`proxy::stash`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stashed: Option<String>,
}

/// What an upgraded connection's record adds: the protocol it switched to, and the request's
/// absolute URI (its access line, and its rules at a handoff, are the request's).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeRecord {
    pub protocol: String,
    pub uri: String,
}

impl TunnelRecord {
    /// Checks `fds` against the record's layout (the client's socket, the origin's TCP
    /// socket, each pipe's read then write end) and takes the client's address from the
    /// kernel, as [`ConnectionRecord::check_fd`] does.
    pub fn check_fds(&mut self, fds: &[OwnedFd]) -> Result<(), String> {
        let want = 2 + 2 * self.pipes.iter().filter(|p| **p).count();
        let [client, origin, pipes @ ..] = fds else {
            return Err(format!("a tunnel has {} fds, its record says {want}", fds.len()));
        };
        if fds.len() != want {
            return Err(format!("a tunnel has {} fds, its record says {want}", fds.len()));
        }
        let refused = |e: received::Refused| format!("refused: {e}");
        received::connected_stream(origin.as_fd(), Family::Ip).map_err(refused)?;
        for pair in pipes.chunks(2) {
            received::pipe_end(pair[0].as_fd(), false).map_err(refused)?;
            received::pipe_end(pair[1].as_fd(), true).map_err(refused)?;
        }
        self.client = client_of(client, self.client_unix)?;
        Ok(())
    }

    /// Milliseconds since the Unix epoch, now.
    pub fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }
}

/// A tunnel on its way out, and where to say how it went: `Ok` it moved, `Err` its fds
/// come back and it stays.
struct Departure {
    item: Item,
    kind: Kind,
    back: oneshot::Sender<Result<(), Vec<OwnedFd>>>,
}

/// The kinds of connection that move, for the counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Tunnel = 0,
    Connection = 1,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::Tunnel => "tunnel",
            Kind::Connection => "connection",
        }
    }
}

/// Counts by [`Kind`].
#[derive(Debug, Default)]
pub struct ByKind([AtomicU64; 2]);

impl ByKind {
    fn add(&self, kind: Kind, n: u64) {
        self.0[kind as usize].fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self, kind: Kind) -> u64 {
        self.0[kind as usize].load(Ordering::Relaxed)
    }

    pub fn total(&self) -> u64 {
        self.get(Kind::Tunnel) + self.get(Kind::Connection)
    }
}

/// One generation's side of moving its tunnels and idle connections out.
pub struct Migration {
    requested: CancellationToken,
    tx: mpsc::UnboundedSender<Departure>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<Departure>>>,
    pub moved: ByKind,
    pub stayed: ByKind,
    /// Adopted from the previous generation.
    pub adopted: ByKind,
    /// Of `moved`: TLS connections and tunnels (with their record state).
    pub tls_moved: AtomicU64,
    /// Of `adopted`: TLS connections and tunnels.
    pub adopted_tls: AtomicU64,
    /// TLS connections and tunnels that stayed here (they drain), by why.
    tls_stayed: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Migration {
    fn default() -> Migration {
        let (tx, rx) = mpsc::unbounded_channel();
        Migration {
            requested: CancellationToken::new(),
            tx,
            rx: Mutex::new(Some(rx)),
            moved: ByKind::default(),
            stayed: ByKind::default(),
            adopted: ByKind::default(),
            tls_moved: AtomicU64::new(0),
            adopted_tls: AtomicU64::new(0),
            tls_stayed: Mutex::default(),
        }
    }
}

impl Migration {
    /// Resolves once connections are to move.
    pub async fn requested(&self) {
        self.requested.cancelled().await;
    }

    /// Whether connections are to move (then a draining connection does not close at the
    /// end of its exchange: it moves once idle).
    pub fn is_requested(&self) -> bool {
        self.requested.is_cancelled()
    }

    /// (moved, stayed) so far, all kinds.
    pub fn counts(&self) -> (u64, u64) {
        (self.moved.total(), self.stayed.total())
    }

    /// A TLS connection or tunnel that stays here, and why (`tls::moving::Refusal`'s label,
    /// or `busy`: a tunnel whose buffers did not empty in time): counted for the drain
    /// report and the metrics.
    pub fn tls_stayed(&self, reason: &'static str) {
        metrics::tls_not_moved(reason);
        if let Ok(mut stayed) = self.tls_stayed.lock() {
            *stayed.entry(reason).or_default() += 1;
        }
    }

    /// The TLS connections and tunnels that stayed, by why.
    pub fn tls_stayed_by_reason(&self) -> BTreeMap<String, u64> {
        self.tls_stayed
            .lock()
            .map(|s| s.iter().map(|(k, v)| (k.to_string(), *v)).collect())
            .unwrap_or_default()
    }

    /// One more adopted from the previous generation (`tls`: with its TLS record state).
    pub fn count_adopted(&self, kind: Kind, tls: bool) {
        self.adopted.add(kind, 1);
        if tls {
            self.adopted_tls.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Called by a connection that stopped (a tunnel that stopped relaying, an idle client
    /// connection): `Ok` once the successor holds it (our copies are closed by then), else
    /// its fds back.
    pub async fn depart(&self, moved: &Moved, fds: Vec<OwnedFd>) -> Result<(), Vec<OwnedFd>> {
        let (back, answer) = oneshot::channel();
        let kind = moved.kind();
        let tls = matches!(moved, Moved::TlsTunnel(_) | Moved::TlsConnection(_));
        // Plain fields, so this cannot fail; were it to, the connection stays here.
        let record = match moved.encode() {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot write a moving connection's record: it stays");
                return Err(fds);
            }
        };
        let item = Item { record, fds };
        if let Err(unsent) = self.tx.send(Departure { item, kind, back }) {
            return Err(unsent.0.item.fds);
        }
        // The sender answers every departure; if it were gone, so would be the fds.
        let answered = answer.await.unwrap_or_else(|_| Err(Vec::new()));
        if tls && answered.is_ok() {
            self.tls_moved.fetch_add(1, Ordering::Relaxed);
        }
        answered
    }

    /// Starts moving tunnels over `transfer` (once: a second call does nothing).
    pub fn start(self: &Arc<Self>, transfer: Transfer) {
        let Some(rx) = self.rx.lock().ok().and_then(|mut rx| rx.take()) else {
            return;
        };
        tokio::spawn(self.clone().send_departures(transfer, rx));
        self.requested.cancel();
    }

    /// Batches the departures as they come and answers each. After a batch fails, the
    /// successor is not trusted with more: every later departure stays.
    async fn send_departures(self: Arc<Self>, mut transfer: Transfer, mut rx: mpsc::UnboundedReceiver<Departure>) {
        let mut broken: Option<String> = None;
        let mut sent = 0usize;
        while let Some(first) = rx.recv().await {
            tokio::time::sleep(GATHER).await;
            let mut all = vec![first];
            while let Ok(d) = rx.try_recv() {
                all.push(d);
            }
            for batch in batches(all, |d: &Departure| &d.item) {
                let mut kinds = Vec::with_capacity(batch.len());
                let (items, backs): (Vec<Item>, Vec<_>) = batch
                    .into_iter()
                    .map(|d| {
                        kinds.push(d.kind);
                        (d.item, d.back)
                    })
                    .unzip();
                if broken.is_some() {
                    self.stay(&kinds, items, backs);
                    continue;
                }
                match transfer.send_batch(items, ACK_TIMEOUT).await {
                    Ok(_) => {
                        for (kind, back) in kinds.into_iter().zip(backs) {
                            self.moved.add(kind, 1);
                            let _ = back.send(Ok(()));
                        }
                        sent += 1;
                        if sent.is_multiple_of(TRIM_EVERY) {
                            crate::proxy::heap::trim();
                        }
                    }
                    Err((e, items)) => {
                        warn!("tunnels and connections stay in this generation (they drain): {e}");
                        broken = Some(e.to_string());
                        self.stay(&kinds, items, backs);
                    }
                }
            }
            // What moved out was freed: given back now, so that the two generations' memory
            // (which adds up in the unit's cgroup until this one exits) peaks lower.
            crate::proxy::heap::trim();
            let (tunnels, connections) = (self.moved.get(Kind::Tunnel), self.moved.get(Kind::Connection));
            let stayed = self.stayed.total();
            info!(tunnels, connections, stayed, "handed to the new generation");
        }
    }

    fn stay(&self, kinds: &[Kind], items: Vec<Item>, backs: Vec<oneshot::Sender<Result<(), Vec<OwnedFd>>>>) {
        for ((kind, mut item), back) in kinds.iter().zip(items).zip(backs) {
            self.stayed.add(*kind, 1);
            baton_handoff::wipe(&mut item.record);
            let _ = back.send(Err(item.fds));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    /// A connected loopback pair: (the server's end as an fd, the client's address).
    fn accepted() -> (OwnedFd, SocketAddr, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        (server.into(), peer, client)
    }

    #[test]
    fn a_forged_client_address_is_replaced_by_the_kernels() {
        let (fd, real, _client) = accepted();
        let forged: SocketAddr = "192.0.2.7:4242".parse().unwrap();
        let mut record = ConnectionRecord {
            client: Some(forged),
            ..ConnectionRecord::default()
        };
        record.check_fd(&fd).unwrap();
        assert_eq!(record.client, Some(real), "getpeername's address, not the record's");
        let mut unix = ConnectionRecord::default();
        let err = unix.check_fd(&fd).unwrap_err();
        assert!(
            err.contains("where a Unix one was expected"),
            "a record saying Unix: {err}"
        );
    }

    #[test]
    fn a_tunnel_whose_fds_do_not_match_its_record_is_refused() {
        let (client, real, _c) = accepted();
        let (origin, _, _o) = accepted();
        let forged: SocketAddr = "192.0.2.7:4242".parse().unwrap();
        let (r, w) = nix::unistd::pipe().unwrap();
        let mut record = TunnelRecord {
            client: Some(forged),
            pipes: [true, false],
            ..TunnelRecord::default()
        };
        // Pipe ends swapped: the write end where the read end belongs.
        let swapped = [
            client.try_clone().unwrap(),
            origin.try_clone().unwrap(),
            w.try_clone().unwrap(),
            r.try_clone().unwrap(),
        ];
        let err = record.check_fds(&swapped).unwrap_err();
        assert!(
            err.contains(&format!("fd {}:", swapped[2].as_raw_fd())),
            "names the fd: {err}"
        );
        // A pipe where the origin socket belongs.
        let wrong = [
            client.try_clone().unwrap(),
            r.try_clone().unwrap(),
            r.try_clone().unwrap(),
            w.try_clone().unwrap(),
        ];
        let err = record.check_fds(&wrong).unwrap_err();
        assert!(err.contains("a pipe where a socket was expected"), "{err}");
        let err = record.check_fds(&swapped[..2]).unwrap_err();
        assert!(err.contains("2 fds, its record says 4"), "{err}");
        // The witness: the right layout passes, with the kernel's client address.
        record.check_fds(&[client, origin, r, w]).unwrap();
        assert_eq!(record.client, Some(real));
    }
}
