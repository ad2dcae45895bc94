//! Listening sockets: bound from configuration or adopted from fds a predecessor (or systemd)
//! passed, matched by name first and by address second. One socket is kept alive across
//! generations so the kernel's accept queue is never dropped.

use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::net::{TcpListener, TcpSocket, TcpStream, UnixListener, UnixStream};

use crate::config::ListenAddr;
use crate::handoff::Inherited;

/// Kernel backlog for sockets baton binds itself (systemd's default is 4096 too).
const BACKLOG: u32 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("listener `{name}`: cannot bind {addr}: {source}")]
    Bind {
        name: String,
        addr: ListenAddr,
        source: io::Error,
    },
    #[error("listener `{name}`: {path} is in use by a running process")]
    InUse { name: String, path: PathBuf },
}

/// A listening socket, TCP or Unix.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// An accepted connection.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// Who is on the other end of an accepted connection.
#[derive(Debug, Clone, Copy)]
pub enum Peer {
    Ip(std::net::SocketAddr),
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

impl Socket {
    pub async fn accept(&self) -> io::Result<(Stream, Peer)> {
        match self {
            Socket::Tcp(l) => {
                let (s, a) = l.accept().await?;
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
                let p = a.as_pathname().map(Path::to_path_buf).unwrap_or_default();
                Ok(ListenAddr::Unix(p))
            }
        }
    }

    pub fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(l) => l.as_fd(),
            Socket::Unix(l) => l.as_fd(),
        }
    }
}

/// Accepts on `socket` until `stop` is cancelled, handing each connection to `on_accept`.
/// Accept errors (EMFILE and friends) back off instead of spinning: the kernel queue waits.
/// The socket is dropped, closing this process's fd, when the loop ends; a successor that
/// inherited it keeps accepting from the same queue.
pub async fn accept_until(
    socket: Arc<Socket>,
    name: &str,
    stop: tokio_util::sync::CancellationToken,
    mut on_accept: impl FnMut(Stream, Peer),
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = socket.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => on_accept(stream, peer),
            Err(e) => {
                tracing::warn!(listener = %name, "accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(listener = %name, "stopped accepting");
}

/// A named listening socket of this generation.
#[derive(Debug)]
pub struct Listener {
    pub name: String,
    /// Configured address (for an ephemeral port, `bound` has the real one).
    pub bound: ListenAddr,
    pub socket: Arc<Socket>,
    pub adopted: bool,
}

/// Takes the inherited listener called `name`, or failing that one bound to `addr`.
/// Returns `None` when nothing matches; the caller then binds.
pub fn adopt(inherited: &mut Inherited, name: &str, addr: &ListenAddr) -> io::Result<Option<Socket>> {
    let by_name = inherited.position_by_name(name);
    let idx = match by_name {
        Some(i) => Some(i),
        None => inherited.position_by(|sock| {
            sock.local_addr().ok().as_ref() == Some(addr) && !matches!(addr, ListenAddr::Tcp(a) if a.port() == 0)
        }),
    };
    let Some(idx) = idx else { return Ok(None) };
    inherited.take(idx).map(Some)
}

/// Adopts or binds the listener `name` at `addr`.
pub async fn open(inherited: &mut Inherited, name: &str, addr: &ListenAddr) -> Result<Listener, ListenError> {
    let bind_err = |source| ListenError::Bind {
        name: name.to_string(),
        addr: addr.clone(),
        source,
    };
    if let Some(socket) = adopt(inherited, name, addr).map_err(bind_err)? {
        let bound = socket.local_addr().map_err(bind_err)?;
        return Ok(Listener {
            name: name.to_string(),
            bound,
            socket: Arc::new(socket),
            adopted: true,
        });
    }
    let socket = bind(name, addr).await?;
    let bound = socket.local_addr().map_err(bind_err)?;
    Ok(Listener {
        name: name.to_string(),
        bound,
        socket: Arc::new(socket),
        adopted: false,
    })
}

/// Binds a fresh socket. A Unix path left behind by a dead process is replaced; one that a
/// live process answers on is an error, never stolen.
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
            sock.bind(*a).map_err(bind_err)?;
            Ok(Socket::Tcp(sock.listen(BACKLOG).map_err(bind_err)?))
        }
        ListenAddr::Unix(p) => {
            if p.exists() {
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
            let l = UnixListener::bind(p).map_err(bind_err)?;
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
            Ok(Socket::Unix(l))
        }
    }
}
