//! Checks on fds this process received from another (a predecessor, or the service manager):
//! what kind of file each is, and who is on the other end of a connected socket. A record
//! that travels with an fd says what the sender meant; the kernel says what the fd is. The
//! kernel wins: a mismatch is a [`Refused`] naming the fd, never a panic, and a connection's
//! peer is read with `getpeername(2)`, never taken from the record (stale or forged).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};

use nix::sys::socket::{SockaddrLike, SockaddrStorage, getpeername};
use nix::sys::stat::{SFlag, fstat};

/// A received fd that is not what it should be.
#[derive(Debug, thiserror::Error)]
#[error("fd {fd}: {reason}")]
pub struct Refused {
    /// The fd that was refused.
    pub fd: RawFd,
    /// What it was, and what it should have been.
    pub reason: String,
}

/// The socket families a stream may have here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// TCP over IPv4 or IPv6.
    Ip,
    /// A Unix stream socket.
    Unix,
}

/// Checks that `fd` is a listening stream socket (TCP or Unix); returns its family.
pub fn listening_socket(fd: BorrowedFd<'_>) -> Result<Family, Refused> {
    let family = stream_socket(fd)?;
    if opt(fd, libc::SO_ACCEPTCONN)? == 0 {
        return Err(refused(fd, "a stream socket that is not listening".into()));
    }
    Ok(family)
}

/// Checks that `fd` is a connected stream socket of `family` that is not listening, and
/// returns its peer's address as the kernel knows it (`None` for a Unix socket).
pub fn connected_stream(fd: BorrowedFd<'_>, family: Family) -> Result<Option<SocketAddr>, Refused> {
    let got = stream_socket(fd)?;
    if got != family {
        return Err(refused(
            fd,
            format!("a {got:?} socket where a {family:?} one was expected"),
        ));
    }
    if opt(fd, libc::SO_ACCEPTCONN)? != 0 {
        return Err(refused(fd, "a listening socket where a connection was expected".into()));
    }
    let peer = getpeername::<SockaddrStorage>(fd.as_raw_fd())
        .map_err(|e| refused(fd, format!("no peer (getpeername: {e}): not connected")))?;
    if family == Family::Unix {
        return Ok(None);
    }
    let addr = match (peer.as_sockaddr_in(), peer.as_sockaddr_in6()) {
        (Some(v4), _) => SocketAddr::from(std::net::SocketAddrV4::from(*v4)),
        (_, Some(v6)) => SocketAddr::from(std::net::SocketAddrV6::from(*v6)),
        _ => return Err(refused(fd, format!("a peer of family {:?}", peer.family()))),
    };
    Ok(Some(addr))
}

/// Checks that `fd` is a pipe end open for writing (`write`) or for reading.
pub fn pipe_end(fd: BorrowedFd<'_>, write: bool) -> Result<(), Refused> {
    let kind = file_kind(fd)?;
    if kind != SFlag::S_IFIFO {
        return Err(refused(fd, format!("{} where a pipe was expected", kind_name(kind))));
    }
    let mode = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL)
        .map_err(|e| refused(fd, format!("F_GETFL: {e}")))?
        & libc::O_ACCMODE;
    let want = if write { libc::O_WRONLY } else { libc::O_RDONLY };
    if mode != want {
        let end = if write { "write" } else { "read" };
        return Err(refused(fd, format!("a pipe end not open for {end} only")));
    }
    Ok(())
}

/// A stream socket of a family this crate serves (TCP over IP, or Unix).
fn stream_socket(fd: BorrowedFd<'_>) -> Result<Family, Refused> {
    let kind = file_kind(fd)?;
    if kind != SFlag::S_IFSOCK {
        return Err(refused(fd, format!("{} where a socket was expected", kind_name(kind))));
    }
    let ty = opt(fd, libc::SO_TYPE)?;
    if ty != libc::SOCK_STREAM {
        let name = if ty == libc::SOCK_DGRAM {
            "datagram"
        } else {
            "non-stream"
        };
        return Err(refused(
            fd,
            format!("a {name} socket (SO_TYPE {ty}) where a stream was expected"),
        ));
    }
    match opt(fd, libc::SO_DOMAIN)? {
        libc::AF_UNIX => Ok(Family::Unix),
        libc::AF_INET | libc::AF_INET6 if opt(fd, libc::SO_PROTOCOL)? == libc::IPPROTO_TCP => Ok(Family::Ip),
        libc::AF_INET | libc::AF_INET6 => Err(refused(fd, "an IP stream socket that is not TCP".into())),
        domain => Err(refused(
            fd,
            format!("a socket of family {domain} (SO_DOMAIN), not IP or Unix"),
        )),
    }
}

fn file_kind(fd: BorrowedFd<'_>) -> Result<SFlag, Refused> {
    let st = fstat(fd).map_err(|e| refused(fd, format!("fstat: {e}")))?;
    Ok(SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()))
}

fn kind_name(kind: SFlag) -> &'static str {
    match kind {
        SFlag::S_IFIFO => "a pipe",
        SFlag::S_IFSOCK => "a socket",
        SFlag::S_IFREG => "a regular file",
        SFlag::S_IFDIR => "a directory",
        SFlag::S_IFCHR => "a character device",
        _ => "another kind of file",
    }
}

/// An integer `SOL_SOCKET` option.
fn opt(fd: BorrowedFd<'_>, name: libc::c_int) -> Result<libc::c_int, Refused> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes (one c_int) through the pointer, which
    // points at `value`, and updates `len`; `fd` is borrowed, so it is open.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(refused(
            fd,
            format!("getsockopt({name}): {}", io::Error::last_os_error()),
        ));
    }
    Ok(value)
}

fn refused(fd: BorrowedFd<'_>, reason: String) -> Refused {
    Refused {
        fd: fd.as_raw_fd(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::{AsFd, FromRawFd};

    use super::*;

    #[test]
    fn a_pipe_or_a_udp_socket_is_refused_where_a_tcp_stream_is_expected() {
        let (r, w) = nix::unistd::pipe().unwrap();
        let err = connected_stream(r.as_fd(), Family::Ip).unwrap_err();
        assert_eq!(err.fd, r.as_raw_fd());
        assert!(err.to_string().contains("a pipe where a socket was expected"), "{err}");
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        udp.connect(udp.local_addr().unwrap()).unwrap();
        let err = connected_stream(udp.as_fd(), Family::Ip).unwrap_err();
        assert!(err.to_string().contains("datagram socket"), "{err}");
        assert!(
            err.to_string().starts_with(&format!("fd {}:", udp.as_raw_fd())),
            "names the fd: {err}"
        );
        assert!(
            pipe_end(w.as_fd(), true).is_ok(),
            "the witness: a pipe where a pipe is expected"
        );
        let err = pipe_end(w.as_fd(), false).unwrap_err();
        assert!(err.to_string().contains("read only"), "{err}");
    }

    #[test]
    fn a_connection_reports_its_real_peer_and_family() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let got = connected_stream(server.as_fd(), Family::Ip).unwrap();
        assert_eq!(got, Some(peer));
        assert_eq!(got, Some(client.local_addr().unwrap()));
        let err = connected_stream(server.as_fd(), Family::Unix).unwrap_err();
        assert!(err.to_string().contains("where a Unix one was expected"), "{err}");
        let err = connected_stream(listener.as_fd(), Family::Ip).unwrap_err();
        assert!(err.to_string().contains("listening socket"), "{err}");
        assert_eq!(listening_socket(listener.as_fd()).unwrap(), Family::Ip);
        let err = listening_socket(server.as_fd()).unwrap_err();
        assert!(err.to_string().contains("not listening"), "{err}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(connected_stream(a.as_fd(), Family::Unix).unwrap(), None);
    }

    #[test]
    fn an_ipv6_connection_reports_its_real_peer() {
        let listener = std::net::TcpListener::bind("[::1]:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let got = connected_stream(server.as_fd(), Family::Ip).unwrap();
        assert_eq!(got, Some(client.local_addr().unwrap()), "the kernel's IPv6 peer");
        assert_eq!(got, Some(peer));
    }

    #[test]
    fn the_refusal_names_what_the_fd_is() {
        // A pipe was expected: the reason says what came instead, so a mix-up in the
        // sender's records can be told from the message alone.
        let dir = tempfile::tempdir().unwrap();
        let file = std::fs::File::create(dir.path().join("f")).unwrap();
        let dir_fd = std::fs::File::open(dir.path()).unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        for (fd, kind) in [
            (a.as_fd(), "a socket"),
            (file.as_fd(), "a regular file"),
            (dir_fd.as_fd(), "a directory"),
            (null.as_fd(), "a character device"),
        ] {
            let err = pipe_end(fd, true).unwrap_err();
            assert!(err.reason.starts_with(&format!("{kind} where a pipe")), "{err}");
        }
        let (r, _w) = std::io::pipe().unwrap();
        assert!(pipe_end(r.as_fd(), false).is_ok(), "the witness: a pipe is a pipe");
    }

    #[test]
    fn a_failed_getsockopt_is_a_refusal_not_a_zero() {
        // On a pipe getsockopt fails (ENOTSOCK): taken as a value of 0, the error would pass
        // for an answer (SO_ACCEPTCONN 0: "not listening").
        let (r, _w) = std::io::pipe().unwrap();
        let err = opt(r.as_fd(), libc::SO_TYPE).unwrap_err();
        assert!(err.reason.starts_with("getsockopt("), "{err}");
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert_eq!(opt(a.as_fd(), libc::SO_TYPE).unwrap(), libc::SOCK_STREAM, "the witness");
    }

    #[test]
    fn an_ip_stream_socket_that_is_not_tcp_is_refused() {
        // MPTCP is an IP stream protocol other than TCP that Linux may offer; without it
        // (EPROTONOSUPPORT, or disabled) there is nothing to test here.
        // SAFETY: socket(2) with constant arguments; the fd is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_MPTCP) };
        if fd < 0 {
            eprintln!("no MPTCP here: {}", io::Error::last_os_error());
            return;
        }
        // SAFETY: `fd` was just opened and nothing else owns it.
        let mptcp = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        let err = connected_stream(mptcp.as_fd(), Family::Ip).unwrap_err();
        assert!(err.reason.contains("not TCP"), "{err}");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(listening_socket(tcp.as_fd()).unwrap(), Family::Ip, "the witness: TCP");
    }

    #[test]
    fn an_unconnected_stream_socket_has_no_peer() {
        let s = nix::sys::socket::socket(
            nix::sys::socket::AddressFamily::Inet,
            nix::sys::socket::SockType::Stream,
            nix::sys::socket::SockFlag::SOCK_CLOEXEC,
            None,
        )
        .unwrap();
        let err = connected_stream(s.as_fd(), Family::Ip).unwrap_err();
        assert!(err.to_string().contains("not connected"), "{err}");
    }
}
