//! Listening sockets and their addresses: bound here (Unix ones 0600 at bind), or made from
//! an fd a predecessor or the service manager passed; the accept loop and accepted streams.
//! Which of the two a listener gets is `adopt`'s rule. A socket kept across generations keeps
//! its kernel accept queue, so no connection waiting in it is lost.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};
use tracing::{info, warn};

/// Kernel backlog for sockets bound here (systemd's default is 4096 too).
const BACKLOG: u32 = 4096;

/// Why a listener could not be opened; each names the listener.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address could not be bound.
    #[error("listener `{name}`: cannot bind {addr}")]
    Bind {
        /// The listener's name.
        name: String,
        /// The address.
        addr: ListenAddr,
        /// The bind's error.
        #[source]
        source: io::Error,
    },
    /// A live process answers on the socket at the path.
    #[error("listener `{name}`: {path} is in use by a running process")]
    InUse {
        /// The listener's name.
        name: String,
        /// The socket's path.
        path: PathBuf,
    },
    /// Something that is not a socket is at the path.
    #[error(
        "listener `{name}`: {path} exists and is not a socket; it is left alone: remove it, or choose another path"
    )]
    NotASocket {
        /// The listener's name.
        name: String,
        /// The path.
        path: PathBuf,
    },
    /// A socket of another user is at the path.
    #[error(
        "listener `{name}`: {path} is a socket owned by uid {owner}, not by uid {uid} that this process runs as; only a stale socket of our own is replaced: remove it if it is stale, or choose another path"
    )]
    NotOurs {
        /// The listener's name.
        name: String,
        /// The socket's path.
        path: PathBuf,
        /// The socket file's owner.
        owner: u32,
        /// The uid this process runs as.
        uid: u32,
    },
    /// The port needs `CAP_NET_BIND_SERVICE`, which this process lacks.
    #[error(
        "listener `{name}`: cannot bind {addr}: ports below {start} need CAP_NET_BIND_SERVICE, which this process lacks (not in its effective capability set); grant it (systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE, then restart the service) or have a socket unit pass the socket"
    )]
    Privileged {
        /// The listener's name.
        name: String,
        /// The address.
        addr: ListenAddr,
        /// `net.ipv4.ip_unprivileged_port_start`.
        start: u16,
    },
    /// An inherited socket could not be taken (not a listening socket, or of another kind than asked).
    #[error("listener `{name}`: cannot adopt the inherited socket")]
    Adopt {
        /// The listener's name.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Where a listener accepts connections.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// An IP address and port (port 0: any free port).
    Tcp(SocketAddr),
    /// A Unix socket's path (`unix:/path`).
    Unix(PathBuf),
}

impl ListenAddr {
    /// Whether a socket bound at `actual` serves this configured address: the same address,
    /// or, for a configured port 0 (any free port), the same IP at any port.
    pub fn is_served_by(&self, actual: &ListenAddr) -> bool {
        match (self, actual) {
            (ListenAddr::Tcp(want), ListenAddr::Tcp(got)) => want == got || (want.port() == 0 && want.ip() == got.ip()),
            (ListenAddr::Unix(want), ListenAddr::Unix(got)) => want == got,
            _ => false,
        }
    }

    pub(crate) fn is_ephemeral(&self) -> bool {
        matches!(self, ListenAddr::Tcp(a) if a.port() == 0)
    }
}

/// `host:port`, or `unix:` and a path; [`std::str::FromStr`] reads it back.
impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(a) => write!(f, "{a}"),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = std::net::AddrParseError;

    fn from_str(s: &str) -> Result<ListenAddr, Self::Err> {
        match s.strip_prefix("unix:") {
            Some(path) => Ok(ListenAddr::Unix(PathBuf::from(path))),
            None => s.parse().map(ListenAddr::Tcp),
        }
    }
}

/// Where an inherited socket came from; it decides who wins when the configuration moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Passed by the service manager (systemd's socket units): it owns the address.
    Supervisor,
    /// Bound by a generation from its configuration.
    Bound,
}

impl Origin {
    /// The name in `BATON_LISTEN_ORIGINS`.
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Supervisor => "supervisor",
            Origin::Bound => "bound",
        }
    }

    /// The origin named `s` in `BATON_LISTEN_ORIGINS`, if it is one.
    pub fn parse(s: &str) -> Option<Origin> {
        match s {
            "supervisor" => Some(Origin::Supervisor),
            "bound" => Some(Origin::Bound),
            _ => None,
        }
    }
}

/// A listening socket, TCP or Unix.
#[derive(Debug)]
pub enum Socket {
    /// A TCP listener.
    Tcp(TcpListener),
    /// A Unix listener.
    Unix(UnixListener),
}

impl Socket {
    /// Wraps an fd that must be a listening stream socket (TCP or Unix), close-on-exec.
    /// Anything else (a pipe, a datagram socket, a connection) is refused, naming the fd.
    pub fn from_listening_fd(fd: OwnedFd) -> io::Result<Socket> {
        let family = crate::received::listening_socket(fd.as_fd()).map_err(io::Error::other)?;
        crate::process::set_cloexec(fd.as_raw_fd())?;
        if family == crate::received::Family::Unix {
            let l = std::os::unix::net::UnixListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(Socket::Unix(UnixListener::from_std(l)?))
        } else {
            let l = std::net::TcpListener::from(fd);
            l.set_nonblocking(true)?;
            Ok(Socket::Tcp(TcpListener::from_std(l)?))
        }
    }

    /// Accepts the next connection (TCP ones with `TCP_NODELAY`).
    pub async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Socket::Tcp(l) => {
                let (s, a) = l.accept().await?;
                // Small answers must not wait for Nagle's timer. This fails only on a
                // connection already gone, which its first read reports anyway.
                let _ = s.set_nodelay(true);
                Ok((Stream::Tcp(s), Peer::Ip(a)))
            }
            Socket::Unix(l) => {
                let (s, _) = l.accept().await?;
                Ok((Stream::Unix(s), Peer::Local))
            }
        }
    }

    /// The address the socket is bound to, as the kernel reports it.
    pub fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Socket::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Socket::Unix(l) => {
                let a = l.local_addr()?;
                Ok(ListenAddr::Unix(
                    a.as_pathname().map(Path::to_path_buf).unwrap_or_default(),
                ))
            }
        }
    }

    /// The socket's fd, to pass to a successor.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Unix(l) => l.as_fd(),
        }
    }
}

/// An accepted connection, TCP or Unix; reads and writes go to whichever it is.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A Unix connection.
    Unix(UnixStream),
}

impl Stream {
    /// Resolves once a read would not block: a byte arrived, the peer closed, or an error is
    /// pending. Nothing is read (a one-byte `MSG_PEEK`), so a server can wait here for a
    /// client's next request without a read buffer. tokio takes a freshly accepted stream
    /// for readable until a read says otherwise: the peek is that read.
    pub async fn readable(&self) -> io::Result<()> {
        std::future::poll_fn(|cx| self.poll_readable(cx)).await
    }

    /// [`Stream::readable`] as a poll: it keeps no state of its own (it registers `cx` in the
    /// stream's own reader slot, as a read would), so a task waiting in it stays small.
    pub fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let peeked = match self {
                Stream::Tcp(s) => {
                    std::task::ready!(s.poll_read_ready(cx))?;
                    s.try_io(Interest::READABLE, || peek(s.as_raw_fd()))
                }
                Stream::Unix(s) => {
                    std::task::ready!(s.poll_read_ready(cx))?;
                    s.try_io(Interest::READABLE, || peek(s.as_raw_fd()))
                }
            };
            match peeked {
                // try_io cleared the readiness: the next poll_read_ready waits for an event.
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
                Ok(()) => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl Stream {
    /// Shuts the write side down (a FIN to the peer) now; the stream stays open for reading.
    pub fn shutdown_write(&self) -> io::Result<()> {
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        nix::sys::socket::shutdown(fd, nix::sys::socket::Shutdown::Write)?;
        Ok(())
    }
}

impl Stream {
    /// Whether bytes wait unread in the socket now (a peek that does not block; the end of
    /// the stream is no byte).
    pub fn has_unread_bytes(&self) -> bool {
        let fd = match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        };
        let mut byte = [0u8; 1];
        let flags = nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT;
        nix::sys::socket::recv(fd, &mut byte, flags).is_ok_and(|n| n > 0)
    }
}

/// Looks at the next byte of a non-blocking socket without taking it.
fn peek(fd: std::os::fd::RawFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    nix::sys::socket::recv(fd, &mut byte, nix::sys::socket::MsgFlags::MSG_PEEK)?;
    Ok(())
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Unix(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    /// A TCP peer's address.
    Ip(SocketAddr),
    /// A Unix socket's peer (it has no address worth naming).
    Local,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Ip(a) => write!(f, "{a}"),
            Peer::Local => write!(f, "unix"),
        }
    }
}

/// Binds a fresh socket. A Unix socket left behind at the path by a dead process of the same
/// user is replaced; anything else there is an error and left alone: a socket a live process
/// answers on (never stolen), a socket another user owns (it could be planted: removing and
/// rebinding would hand that user's clients to us, or ours to them), anything not a socket.
pub async fn bind(name: &str, addr: &ListenAddr) -> Result<Socket, ListenError> {
    let bind_err = |source| ListenError::Bind {
        name: name.to_string(),
        addr: addr.clone(),
        source,
    };
    match addr {
        ListenAddr::Tcp(a) => {
            let sock = if a.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(bind_err)?;
            sock.set_reuseaddr(true).map_err(bind_err)?;
            sock.bind(*a)
                .map_err(|e| bind_error(name, addr, e, || needs_bind_capability(addr, None)))?;
            Ok(Socket::Tcp(sock.listen(BACKLOG).map_err(bind_err)?))
        }
        ListenAddr::Unix(p) => {
            if let Ok(meta) = std::fs::symlink_metadata(p) {
                let (name, path) = (name.to_string(), p.clone());
                if !meta.file_type().is_socket() {
                    return Err(ListenError::NotASocket { name, path });
                }
                let uid = crate::process::euid();
                if meta.uid() != uid {
                    let owner = meta.uid();
                    return Err(ListenError::NotOurs { name, path, owner, uid });
                }
                if UnixStream::connect(p).await.is_ok() {
                    return Err(ListenError::InUse {
                        name: name.to_string(),
                        path: p.clone(),
                    });
                }
                std::fs::remove_file(p).map_err(bind_err)?;
            }
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(bind_err)?;
            }
            Ok(Socket::Unix(bind_private_unix(p).map_err(bind_err)?))
        }
    }
}

/// The error of binding `addr` for listener `name`: EACCES is [`ListenError::Privileged`]
/// when the port `needs` a capability this process lacks (the usual cause, and the one the
/// message can say how to fix); any other failure as it is.
fn bind_error(name: &str, addr: &ListenAddr, e: io::Error, needs: impl FnOnce() -> bool) -> ListenError {
    match e.raw_os_error() {
        Some(libc::EACCES) if needs() => ListenError::Privileged {
            name: name.to_string(),
            addr: addr.clone(),
            start: unprivileged_port_start(),
        },
        _ => ListenError::Bind {
            name: name.to_string(),
            addr: addr.clone(),
            source: e,
        },
    }
}

/// A Unix listener at `path` whose file is created with mode 0600: no window between
/// bind(2) and a chmod in which another user could connect. Linux creates the file with the
/// mode of the socket's own inode (less the umask: `unix_bind_bsd`), which fchmod(2) on the
/// unbound socket sets; a process-wide umask would race with the other threads' files.
fn bind_private_unix(path: &Path) -> io::Result<UnixListener> {
    use nix::sys::socket::{AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket};
    let flags = SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK;
    let fd = socket(AddressFamily::Unix, SockType::Stream, flags, None)?;
    nix::sys::stat::fchmod(&fd, nix::sys::stat::Mode::from_bits_truncate(0o600))?;
    bind(fd.as_raw_fd(), &UnixAddr::new(path)?)?;
    listen(&fd, Backlog::new(BACKLOG as i32).unwrap_or(Backlog::MAXCONN))?;
    UnixListener::from_std(std::os::unix::net::UnixListener::from(fd))
}

/// The lowest port a process without `CAP_NET_BIND_SERVICE` may bind
/// (`net.ipv4.ip_unprivileged_port_start`; 1024 where it cannot be read).
pub fn unprivileged_port_start() -> u16 {
    port_start(std::fs::read_to_string(PORT_START).ok().as_deref())
}

const PORT_START: &str = "/proc/sys/net/ipv4/ip_unprivileged_port_start";

/// The port in [`PORT_START`]'s `text`; 1024 (the kernel's default) when there is none.
fn port_start(text: Option<&str>) -> u16 {
    text.and_then(|s| s.trim().parse().ok()).unwrap_or(1024)
}

/// Whether binding `addr` needs `CAP_NET_BIND_SERVICE` and process `pid` (`None`: this one)
/// lacks it. A process whose capabilities cannot be read is given the benefit of the doubt.
pub fn needs_bind_capability(addr: &ListenAddr, pid: Option<u32>) -> bool {
    let has = || crate::process::has_capability(pid, crate::process::CAP_NET_BIND_SERVICE);
    lacks_capability_for(addr, unprivileged_port_start(), has)
}

/// [`needs_bind_capability`] with the first unprivileged port `start`, and `has` asking
/// whether the capability is there (only for a privileged port).
fn lacks_capability_for(addr: &ListenAddr, start: u16, has: impl FnOnce() -> io::Result<bool>) -> bool {
    let ListenAddr::Tcp(a) = addr else { return false };
    a.port() != 0 && a.port() < start && !has().unwrap_or(true)
}

/// Accepts on `socket` until `stop` is cancelled, handing each connection to `on_accept`.
/// Accept errors that are not about one connection (EMFILE, ENFILE, ENOBUFS, ENOMEM) back off
/// exponentially up to 1 s, forever, instead of spinning: the kernel queue waits meanwhile.
/// They are logged at most once a second (`AcceptErrors`). The socket is dropped, closing
/// this process's fd, when the loop ends; a successor that inherited it keeps accepting from
/// the same queue.
pub async fn accept_until(
    socket: Arc<Socket>,
    name: &str,
    stop: tokio_util::sync::CancellationToken,
    mut on_accept: impl FnMut(Stream, Peer),
) {
    let mut errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = socket.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                errors.succeeded(name);
                on_accept(stream, peer);
            }
            Err(e) => {
                let Some(wait) = errors.wait_after(name, &e, Instant::now()) else {
                    tracing::debug!(listener = %name, "accept: a connection failed before it was accepted: {e}");
                    continue;
                };
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
    tracing::debug!(listener = %name, "stopped accepting");
}

/// Errors accept(2) reports about one pending connection (already reset, or refused by a
/// firewall rule) rather than about the listener or the process: the next one is accepted at
/// once. Linux also passes pending network errors on (accept(2), "Error handling").
fn is_connection_error(e: &io::Error) -> bool {
    use io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(e.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset)
        || matches!(
            e.raw_os_error(),
            Some(
                libc::EPROTO
                    | libc::EPERM
                    | libc::ENETDOWN
                    | libc::ENETUNREACH
                    | libc::EHOSTDOWN
                    | libc::EHOSTUNREACH
                    | libc::ENONET
                    | libc::ENOPROTOOPT
                    | libc::EOPNOTSUPP
            )
        )
}

/// The first wait after an accept error, doubled after each further one up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(5);
/// The longest wait between accept attempts while they fail: the loop never gives up (unlike
/// mini-redis', which exits after 64 s), since fds come back when connections end.
const MAX_WAIT: Duration = Duration::from_secs(1);
/// At most one warning per this interval while accept fails.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// The accept loop's errors: how long to wait next (doubling with each error in a row, from
/// the shortest wait again after a success), and when the last warning was. The warnings are
/// limited across successes too: at the edge of the fd limit, accepts that fail and accepts
/// that succeed alternate quickly.
#[derive(Debug, Default)]
struct AcceptErrors {
    /// Errors since the last successful accept.
    in_a_row: u32,
    /// Errors not logged since the last warning.
    unlogged: u64,
    last_warning: Option<Instant>,
    /// A warning was logged since accept last succeeded: its recovery is logged too.
    warned: bool,
}

impl AcceptErrors {
    /// How long to wait after accept failed with `e` at `now`: not at all for an error about
    /// one connection (`None`: the next one is accepted at once), else as [`Self::failed`].
    fn wait_after(&mut self, name: &str, e: &io::Error, now: Instant) -> Option<Duration> {
        (!is_connection_error(e)).then(|| self.failed(name, e, now))
    }

    /// Counts a failed accept at `now`, warns unless it did within [`LOG_INTERVAL`], and
    /// returns how long to wait before the next attempt.
    fn failed(&mut self, name: &str, e: &io::Error, now: Instant) -> Duration {
        let wait = FIRST_WAIT.saturating_mul(1 << self.in_a_row.min(16)).min(MAX_WAIT);
        self.in_a_row = self.in_a_row.saturating_add(1);
        if self.last_warning.is_some_and(|t| now.duration_since(t) < LOG_INTERVAL) {
            self.unlogged += 1;
            return wait;
        }
        let suppressed = std::mem::take(&mut self.unlogged);
        warn!(listener = %name, errors_in_a_row = self.in_a_row, suppressed, retry_ms = wait.as_millis() as u64, "accept failed: {e}; retrying (at most one such line a second)");
        self.last_warning = Some(now);
        self.warned = true;
        wait
    }

    /// A connection was accepted: the next error starts over from the shortest wait.
    fn succeeded(&mut self, name: &str) {
        self.in_a_row = 0;
        if std::mem::take(&mut self.warned) {
            info!(listener = %name, "accepting again");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn emfile() -> io::Error {
        io::Error::from_raw_os_error(libc::EMFILE)
    }

    #[test]
    fn accept_errors_back_off_exponentially_to_one_second_forever() {
        let mut errors = AcceptErrors::default();
        let t0 = Instant::now();
        let waits: Vec<Duration> = (0..100u64)
            .map(|i| errors.failed("t", &emfile(), t0 + Duration::from_secs(i)))
            .collect();
        assert_eq!(waits[0], FIRST_WAIT);
        assert_eq!(waits[1], FIRST_WAIT * 2);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), MAX_WAIT);
        errors.succeeded("t");
        assert_eq!(errors.failed("t", &emfile(), t0), FIRST_WAIT);
    }

    #[test]
    fn accept_errors_warn_at_most_once_a_second() {
        let mut errors = AcceptErrors::default();
        let t0 = Instant::now();
        for ms in 0..3000u64 {
            errors.failed("t", &emfile(), t0 + Duration::from_millis(ms));
        }
        // Warned at 0, 1000 and 2000 ms; what came between is counted, not logged.
        assert_eq!(errors.last_warning, Some(t0 + Duration::from_millis(2000)));
        assert_eq!(errors.unlogged, 999);
        assert_eq!(errors.in_a_row, 3000);
    }

    #[test]
    fn alternating_failures_and_successes_still_warn_at_most_once_a_second() {
        let mut errors = AcceptErrors::default();
        let t0 = Instant::now();
        for ms in 0..3000u64 {
            assert_eq!(
                errors.failed("t", &emfile(), t0 + Duration::from_millis(ms)),
                FIRST_WAIT
            );
            errors.succeeded("t");
        }
        assert_eq!(errors.last_warning, Some(t0 + Duration::from_millis(2000)));
        assert_eq!(errors.unlogged, 999);
    }

    #[tokio::test]
    async fn a_stale_socket_of_ours_is_replaced_anything_else_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let addr = ListenAddr::Unix(path.clone());
        let socket = bind("t", &addr).await.expect("a stale socket of ours is replaced");
        assert!(matches!(bind("t", &addr).await, Err(ListenError::InUse { .. })));
        drop(socket);
        let file = dir.path().join("file");
        std::fs::write(&file, "keep").unwrap();
        let err = bind("t", &ListenAddr::Unix(file.clone())).await.unwrap_err();
        assert!(matches!(err, ListenError::NotASocket { .. }), "{err}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
    }

    #[tokio::test]
    async fn a_unix_listener_is_created_private_without_a_chmod() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let _socket = bind_private_unix(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "created 0600 at bind, with no chmod after it");
        let plain = dir.path().join("plain.sock");
        let _l = std::os::unix::net::UnixListener::bind(&plain).unwrap();
        let plain_mode = std::fs::metadata(&plain).unwrap().permissions().mode() & 0o777;
        // Under the usual umasks (022, 002, 077) a plain bind(2) makes 0755, 0775 or 0700.
        assert_ne!(plain_mode, 0o600, "the witness: a plain bind differs ({plain_mode:o})");
    }

    #[test]
    fn per_connection_errors_do_not_back_off() {
        assert!(is_connection_error(&io::Error::from(io::ErrorKind::ConnectionAborted)));
        assert!(is_connection_error(&io::Error::from_raw_os_error(libc::EPROTO)));
        assert!(!is_connection_error(&emfile()));
        assert!(!is_connection_error(&io::Error::from_raw_os_error(libc::ENFILE)));
    }
    fn tcp(s: &str) -> ListenAddr {
        ListenAddr::Tcp(s.parse().unwrap())
    }

    #[test]
    fn a_configured_address_is_served_by_itself_or_any_port_for_port_0() {
        let unix = |p: &str| ListenAddr::Unix(p.into());
        assert!(unix("/run/a.sock").is_served_by(&unix("/run/a.sock")), "the same path");
        assert!(!unix("/run/a.sock").is_served_by(&unix("/run/b.sock")), "another path");
        assert!(tcp("127.0.0.1:80").is_served_by(&tcp("127.0.0.1:80")));
        assert!(!tcp("127.0.0.1:80").is_served_by(&tcp("127.0.0.1:81")), "another port");
        assert!(
            tcp("127.0.0.1:0").is_served_by(&tcp("127.0.0.1:40000")),
            "port 0: any port"
        );
        assert!(
            !tcp("127.0.0.1:0").is_served_by(&tcp("127.0.0.2:40000")),
            "but the same IP"
        );
        assert!(!tcp("127.0.0.1:80").is_served_by(&unix("/run/a.sock")), "another kind");
        assert!(tcp("[::1]:0").is_ephemeral(), "port 0 is any free port");
        assert!(!tcp("[::1]:80").is_ephemeral() && !unix("/run/a.sock").is_ephemeral());
    }

    #[test]
    fn addresses_and_origins_read_back_what_they_write() {
        for text in ["127.0.0.1:8080", "[::1]:0", "unix:/run/baton/a b.sock"] {
            let addr: ListenAddr = text.parse().expect("parse");
            assert_eq!(addr.to_string(), text);
        }
        assert_eq!(
            ListenAddr::Unix("/x".into()).to_string(),
            "unix:/x",
            "the prefix tells it from host:port"
        );
        for (origin, text) in [(Origin::Supervisor, "supervisor"), (Origin::Bound, "bound")] {
            assert_eq!(origin.as_str(), text);
            assert_eq!(Origin::parse(text), Some(origin));
        }
        assert_eq!(Origin::parse("systemd"), None);
    }

    #[test]
    fn the_first_unprivileged_port_is_the_kernels_or_1024() {
        assert_eq!(port_start(Some("80\n")), 80);
        assert_eq!(port_start(Some("no")), 1024);
        assert_eq!(port_start(None), 1024);
        let kernel = std::fs::read_to_string(PORT_START).ok();
        assert_eq!(
            unprivileged_port_start(),
            port_start(kernel.as_deref()),
            "read from {PORT_START}"
        );
    }

    #[test]
    fn only_a_privileged_port_without_the_capability_needs_it() {
        let (lacks, has) = (|| Ok(false), || Ok(true));
        assert!(
            lacks_capability_for(&tcp("0.0.0.0:80"), 1024, lacks),
            "below the start, no capability"
        );
        assert!(
            lacks_capability_for(&tcp("0.0.0.0:1023"), 1024, lacks),
            "the last privileged port"
        );
        assert!(
            !lacks_capability_for(&tcp("0.0.0.0:1024"), 1024, lacks),
            "the first unprivileged one"
        );
        assert!(
            !lacks_capability_for(&tcp("0.0.0.0:0"), 1024, lacks),
            "any free port is unprivileged"
        );
        assert!(
            !lacks_capability_for(&tcp("0.0.0.0:80"), 1024, has),
            "the capability is there"
        );
        let unreadable = || Err(io::Error::other("no /proc"));
        assert!(
            !lacks_capability_for(&tcp("0.0.0.0:80"), 1024, unreadable),
            "benefit of the doubt"
        );
        let unix = ListenAddr::Unix("/run/a.sock".into());
        assert!(!lacks_capability_for(&unix, 1024, lacks), "a path has no port");
    }
    /// A bound TCP listener and a client connected to it, with the server's side of the
    /// connection as a [`Stream`].
    async fn tcp_pair() -> (Stream, tokio::net::TcpStream, Peer) {
        let socket = bind("t", &tcp("127.0.0.1:0")).await.expect("bind");
        let ListenAddr::Tcp(at) = socket.local_addr().expect("addr") else {
            unreachable!()
        };
        let client = tokio::net::TcpStream::connect(at).await.expect("connect");
        let (stream, peer) = socket.accept().await.expect("accept");
        (stream, client, peer)
    }

    /// Polls `f` once: whether it is ready now, without waiting.
    async fn ready_now<F: std::future::Future>(f: F) -> bool {
        let mut f = std::pin::pin!(f);
        std::future::poll_fn(|cx| Poll::Ready(f.as_mut().poll(cx).is_ready())).await
    }

    const BOUND: Duration = Duration::from_secs(5);

    #[tokio::test]
    async fn readable_waits_for_a_byte_and_takes_none() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, mut client, peer) = tcp_pair().await;
        assert_eq!(
            peer.to_string(),
            client.local_addr().unwrap().to_string(),
            "the client's address"
        );
        assert_eq!(Peer::Local.to_string(), "unix");
        // Fresh: tokio takes it for readable until the peek says otherwise.
        assert!(
            !ready_now(stream.readable()).await,
            "nothing arrived: readable must wait"
        );
        assert!(
            !ready_now(std::future::poll_fn(|cx| stream.poll_readable(cx))).await,
            "the poll too"
        );
        assert!(!stream.has_unread_bytes(), "no byte yet");
        client.write_all(b"hi").await.expect("write");
        tokio::time::timeout(BOUND, stream.readable())
            .await
            .expect("a byte came")
            .expect("readable");
        assert!(stream.has_unread_bytes(), "the byte waits");
        assert!(stream.has_unread_bytes(), "and still waits: a peek takes nothing");
        let mut got = [0u8; 2];
        tokio::time::timeout(BOUND, stream.read_exact(&mut got))
            .await
            .expect("read")
            .expect("read");
        assert_eq!(&got, b"hi", "both bytes, none taken by readable or has_unread_bytes");
        drop(client);
        tokio::time::timeout(BOUND, stream.readable())
            .await
            .expect("EOF is readable")
            .expect("readable");
        assert!(!stream.has_unread_bytes(), "the end of the stream is no byte");
    }

    #[tokio::test]
    async fn a_stream_writes_all_it_says_and_shuts_down_its_write_side() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, mut client, _) = tcp_pair().await;
        stream.write_all(b"hello").await.expect("write");
        assert!(
            stream.is_write_vectored(),
            "a socket writes several buffers in one call"
        );
        let bufs = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
        assert_eq!(stream.write_vectored(&bufs).await.expect("writev"), 4, "both buffers");
        stream.flush().await.expect("flush");
        stream.shutdown_write().expect("FIN");
        let mut got = Vec::new();
        tokio::time::timeout(BOUND, client.read_to_end(&mut got))
            .await
            .expect("EOF after the FIN")
            .expect("read");
        assert_eq!(got, b"helloabcd");
        // Still open for reading.
        client.write_all(b"x").await.expect("write");
        let mut byte = [0u8; 1];
        tokio::time::timeout(BOUND, stream.read_exact(&mut byte))
            .await
            .expect("read")
            .expect("read");
        assert_eq!(&byte, b"x");

        let (mut stream, mut client, _) = tcp_pair().await;
        stream.shutdown().await.expect("shutdown");
        let mut got = Vec::new();
        tokio::time::timeout(BOUND, client.read_to_end(&mut got))
            .await
            .expect("EOF after shutdown")
            .expect("read");
        assert!(got.is_empty());
    }

    #[tokio::test]
    async fn a_reset_connection_is_readable_with_its_error() {
        let (stream, client, _) = tcp_pair().await;
        // SO_LINGER 0: closing sends a reset instead of a FIN.
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        nix::sys::socket::setsockopt(&client, nix::sys::socket::sockopt::Linger, &linger).expect("linger");
        drop(client);
        let got = tokio::time::timeout(BOUND, stream.readable())
            .await
            .expect("the reset is an event");
        assert_eq!(got.expect_err("a reset").kind(), io::ErrorKind::ConnectionReset);
    }

    #[tokio::test]
    async fn a_unix_socket_path_gets_its_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/baton/s.sock");
        let socket = bind("t", &ListenAddr::Unix(path.clone()))
            .await
            .expect("bind in new directories");
        assert_eq!(socket.local_addr().unwrap(), ListenAddr::Unix(path));
    }

    #[tokio::test]
    async fn accept_until_hands_over_each_connection_and_stops_when_told() {
        let socket = Arc::new(bind("t", &tcp("127.0.0.1:0")).await.expect("bind"));
        let ListenAddr::Tcp(at) = socket.local_addr().expect("addr") else {
            unreachable!()
        };
        let stop = tokio_util::sync::CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let accepting = tokio::spawn(accept_until(socket, "t", stop.clone(), move |_, peer| {
            let _ = tx.send(peer.to_string());
        }));
        let client = tokio::net::TcpStream::connect(at).await.expect("connect");
        let peer = tokio::time::timeout(BOUND, rx.recv())
            .await
            .expect("accepted")
            .expect("a peer");
        assert_eq!(peer, client.local_addr().unwrap().to_string());
        stop.cancel();
        tokio::time::timeout(BOUND, accepting)
            .await
            .expect("stopped")
            .expect("join");
    }

    #[test]
    fn a_privileged_port_needs_the_capability_of_the_process_asked_about() {
        use std::os::unix::process::CommandExt;
        let privileged = tcp("127.0.0.1:80");
        assert!(
            !needs_bind_capability(&tcp("127.0.0.1:8080"), None),
            "an unprivileged port"
        );
        if unprivileged_port_start() <= 80 {
            eprintln!("every port is unprivileged here: nothing more to check");
            return;
        }
        let cap = crate::process::CAP_NET_BIND_SERVICE;
        if !crate::process::has_capability(None, cap).unwrap() {
            assert!(needs_bind_capability(&privileged, None), "this process lacks it");
            return;
        }
        assert!(!needs_bind_capability(&privileged, None), "this process has it");
        // A process without it: as root, a child that runs as nobody.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .uid(65534)
            .spawn()
            .expect("spawn");
        let lacks = needs_bind_capability(&privileged, Some(child.id()));
        child.kill().expect("kill");
        child.wait().expect("reap");
        assert!(lacks, "nobody lacks CAP_NET_BIND_SERVICE");
    }
    #[test]
    fn only_errors_about_the_process_back_off() {
        let mut errors = AcceptErrors::default();
        let now = Instant::now();
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(
            errors.wait_after("t", &reset, now),
            None,
            "one connection: the next at once"
        );
        assert_eq!(errors.in_a_row, 0, "and it counts for nothing");
        assert_eq!(
            errors.wait_after("t", &emfile(), now),
            Some(FIRST_WAIT),
            "out of fds: wait"
        );
        assert_eq!(
            errors.wait_after("t", &emfile(), now),
            Some(FIRST_WAIT * 2),
            "and longer"
        );
    }

    #[test]
    fn eacces_is_privileged_only_when_the_port_needs_a_capability_we_lack() {
        let addr = tcp("0.0.0.0:80");
        let eacces = || io::Error::from_raw_os_error(libc::EACCES);
        let e = bind_error("web", &addr, eacces(), || true);
        assert!(
            matches!(&e, ListenError::Privileged { name, .. } if name == "web"),
            "{e}"
        );
        let e = bind_error("web", &addr, eacces(), || false);
        assert!(
            matches!(&e, ListenError::Bind { source, .. } if source.raw_os_error() == Some(libc::EACCES)),
            "{e}"
        );
        let in_use = io::Error::from_raw_os_error(libc::EADDRINUSE);
        let e = bind_error("web", &addr, in_use, || true);
        assert!(
            matches!(&e, ListenError::Bind { source, .. } if source.raw_os_error() == Some(libc::EADDRINUSE)),
            "{e}"
        );
    }
}
