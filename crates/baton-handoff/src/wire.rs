//! The channel's messages on the socket: one `sendmsg` per message, fds attached with
//! SCM_RIGHTS. The channel is a SOCK_SEQPACKET pair, so a message and its fds arrive whole
//! or not at all (a predecessor of an older version made a stream pair: only the short text
//! messages of the canary window ever cross that one).

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use tokio::io::unix::AsyncFd;

/// The most fds one message carries (the kernel's SCM_MAX_FD).
pub const MAX_FDS_PER_MESSAGE: usize = 253;
/// The largest message read; a bigger one is truncated, and reported so.
const MAX_MESSAGE: usize = 256 * 1024;

/// A received message.
#[derive(Debug)]
pub(crate) struct Message {
    pub bytes: Vec<u8>,
    pub fds: Vec<OwnedFd>,
    /// Bytes or fds were dropped (MSG_TRUNC, MSG_CTRUNC: fds beyond the receiver's
    /// RLIMIT_NOFILE are dropped by the kernel). The fds that did arrive are in `fds`, owned,
    /// so they close with the message.
    pub truncated: bool,
}

#[derive(Debug)]
pub(crate) struct Wire(AsyncFd<OwnedFd>);

impl Wire {
    /// Call it inside a tokio runtime: the socket is registered with its reactor.
    pub fn new(fd: OwnedFd) -> io::Result<Wire> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        // SAFETY: an OwnedFd is open, refers to one description for as long as we own it,
        // and returns the same number every time.
        Ok(Wire(unsafe { AsyncFd::register(fd) }?))
    }

    /// Sends one message with `fds` attached. Cancel-safe: the message goes whole, or not.
    pub async fn send(&self, bytes: &[u8], fds: &[RawFd]) -> io::Result<()> {
        loop {
            let mut ready = self.0.writable().await?;
            let sent = ready.try_io(|fd| {
                let iov = [IoSlice::new(bytes)];
                let rights = [ControlMessage::ScmRights(fds)];
                let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
                Ok(sendmsg::<()>(
                    fd.as_raw_fd(),
                    &iov,
                    cmsgs,
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )?)
            });
            match sent {
                Ok(Ok(n)) if n == bytes.len() => return Ok(()),
                Ok(Ok(n)) => return Err(io::Error::other(format!("channel: sent {n} of {} bytes", bytes.len()))),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    /// Receives one message; `None` when the peer closed. Cancel-safe.
    pub async fn recv(&self) -> io::Result<Option<Message>> {
        loop {
            let mut ready = self.0.readable().await?;
            match ready.try_io(|fd| receive(fd.as_raw_fd())) {
                Ok(r) => return r,
                Err(_would_block) => continue,
            }
        }
    }
}

fn receive(fd: RawFd) -> io::Result<Option<Message>> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS_PER_MESSAGE]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let got = recvmsg::<()>(fd, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in got.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            // SAFETY: the kernel just installed these fds in our table for us alone.
            fds.extend(received.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
        }
    }
    let truncated = got.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let n = got.bytes;
    if n == 0 && fds.is_empty() {
        return Ok(None);
    }
    buf.truncate(n);
    Ok(Some(Message {
        bytes: buf,
        fds,
        truncated,
    }))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;

    use nix::sys::socket::{AddressFamily, SockFlag, SockType, setsockopt, socketpair, sockopt};

    use super::*;

    fn pair() -> (Wire, Wire) {
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair");
        (Wire::new(a).expect("register"), Wire::new(b).expect("register"))
    }

    #[tokio::test]
    async fn a_message_up_to_the_limit_arrives_whole_and_a_longer_one_says_it_was_cut() {
        let (a, b) = pair();
        // The default send buffer (~208 KiB) refuses a message this long: the kernel doubles
        // what is asked, up to twice wmem_max (also ~208 KiB by default).
        setsockopt(&a.0, sockopt::SndBuf, &(MAX_MESSAGE + 4096)).expect("SO_SNDBUF");
        // The longest message sent: a full transfer batch (its records, an 8-byte header and
        // 6 bytes a record, here one record for each fd it may carry).
        let batch = crate::transfer::MAX_BATCH_BYTES + 8 + 6 * MAX_FDS_PER_MESSAGE;
        a.send(&vec![7u8; batch], &[]).await.expect("send");
        let got = b.recv().await.expect("recv").expect("a message");
        assert_eq!(got.bytes.len(), batch, "a full transfer batch must arrive whole");
        assert!(!got.truncated, "a full transfer batch must arrive whole");
        let whole = vec![7u8; MAX_MESSAGE];
        a.send(&whole, &[]).await.expect("send");
        let got = b.recv().await.expect("recv").expect("a message");
        assert_eq!(
            got.bytes.len(),
            MAX_MESSAGE,
            "a message of MAX_MESSAGE bytes fits the buffer"
        );
        assert!(!got.truncated, "nothing of it was dropped");
        a.send(&vec![7u8; MAX_MESSAGE + 1], &[]).await.expect("send");
        let got = b.recv().await.expect("recv").expect("a message");
        assert_eq!(got.bytes.len(), MAX_MESSAGE, "the buffer holds MAX_MESSAGE bytes");
        assert!(
            got.truncated,
            "the byte past the buffer was dropped, and the receiver must know"
        );
    }

    #[tokio::test]
    async fn an_fd_without_bytes_is_a_message_and_a_close_is_not() {
        let (a, b) = pair();
        let (r, _w) = std::io::pipe().expect("pipe");
        a.send(&[], &[r.as_fd().as_raw_fd()]).await.expect("send");
        let got = b
            .recv()
            .await
            .expect("recv")
            .expect("an fd alone is a message, not the end");
        assert_eq!((got.bytes.len(), got.fds.len(), got.truncated), (0, 1, false));
        drop(a);
        assert!(
            b.recv().await.expect("recv").is_none(),
            "no bytes and no fd: the peer closed"
        );
    }
}
