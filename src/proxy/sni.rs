//! A tunnel's first bytes, read before any is relayed (`[access] sni = "match"`): if they are
//! a TLS ClientHello, the server name it asks for (SNI), which the rules then hold to what
//! the CONNECT named, so that `CONNECT allowed.example:443` cannot carry a ClientHello for
//! another server (domain fronting at the TLS layer). rustls's `Acceptor` parses the hello;
//! the bytes themselves go on to the origin unchanged, and the tunnel splices on after them.

use std::time::Duration;

use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The most a ClientHello is waited for: one TLS record, with its header.
const MAX_HELLO: usize = 16 * 1024 + 5;

/// What the first bytes showed.
#[derive(Debug, PartialEq, Eq)]
pub enum Peeked {
    /// A ClientHello naming this server (lowercase, no trailing dot).
    Sni(String),
    /// No server name, and why: not TLS, a hello without SNI, or nothing in time.
    NoSni(&'static str),
    /// The client closed or failed before its first bytes told anything.
    Gone,
}

/// Reads from `client` into `bytes` (which may already hold what came behind the CONNECT
/// head) until they are a whole ClientHello, are plainly not one, or `wait` has passed.
/// Every byte read stays in `bytes`, for the origin.
pub async fn peek<R: AsyncRead + Unpin + ?Sized>(client: &mut R, bytes: &mut Vec<u8>, wait: Duration) -> Peeked {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        if let Some(seen) = judge(bytes) {
            return seen;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, client.read(&mut chunk)).await {
            Err(_) => return Peeked::NoSni("no TLS ClientHello within timeouts.sni"),
            Ok(Ok(0) | Err(_)) => return Peeked::Gone,
            Ok(Ok(n)) => bytes.extend_from_slice(&chunk[..n]),
        }
    }
}

/// What `bytes` show so far; `None`: a ClientHello that is not whole yet.
pub fn judge(bytes: &[u8]) -> Option<Peeked> {
    match bytes.first() {
        None => return None,
        // A TLS record of type handshake (22); anything else is another protocol.
        Some(&first) if first != 22 => return Some(Peeked::NoSni("the first bytes are not TLS")),
        Some(_) => {}
    }
    let mut acceptor = Acceptor::default();
    let mut rest = &bytes[..bytes.len().min(MAX_HELLO)];
    while !rest.is_empty() {
        match acceptor.read_tls(&mut rest) {
            Ok(0) | Err(_) => return Some(Peeked::NoSni("not a TLS ClientHello")),
            Ok(_) => {}
        }
    }
    match acceptor.accept() {
        Ok(None) if bytes.len() < MAX_HELLO => None,
        Ok(None) => Some(Peeked::NoSni("a ClientHello longer than one record")),
        Err(_) => Some(Peeked::NoSni("not a TLS ClientHello")),
        Ok(Some(accepted)) => Some(match accepted.client_hello().server_name() {
            Some(name) => Peeked::Sni(name.trim_end_matches('.').to_ascii_lowercase()),
            None => Peeked::NoSni("a ClientHello without a server name"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_testkit::tls::client_hello as hello;

    #[test]
    fn a_client_hello_names_its_server_and_needs_all_its_bytes() {
        let h = hello("Git.Example.com");
        assert_eq!(judge(&h), Some(Peeked::Sni("git.example.com".into())));
        assert_eq!(judge(&h[..h.len() - 1]), None, "a hello cut short waits for the rest");
        assert_eq!(judge(&h[..3]), None, "a record header alone waits too");
    }

    #[test]
    fn other_bytes_are_known_at_once() {
        assert_eq!(
            judge(b"SSH-2.0-OpenSSH\r\n"),
            Some(Peeked::NoSni("the first bytes are not TLS"))
        );
        assert_eq!(
            judge(b"GET / HTTP/1.1\r\n"),
            Some(Peeked::NoSni("the first bytes are not TLS"))
        );
        assert_eq!(
            judge(&[22, 3, 1, 0, 4, 99, 0, 0, 0]),
            Some(Peeked::NoSni("not a TLS ClientHello"))
        );
        assert_eq!(judge(b""), None, "nothing yet");
        let ip = hello("192.0.2.1");
        assert_eq!(
            judge(&ip),
            Some(Peeked::NoSni("a ClientHello without a server name")),
            "rustls sends no SNI for an address"
        );
    }

    #[tokio::test]
    async fn peek_keeps_every_byte_and_stops_at_its_deadline() {
        let h = hello("a.example");
        let (mut near, mut far) = tokio::io::duplex(64 * 1024);
        let (first, second) = h.split_at(10);
        let mut bytes = first.to_vec();
        tokio::io::AsyncWriteExt::write_all(&mut far, second).await.unwrap();
        let seen = peek(&mut near, &mut bytes, Duration::from_secs(5)).await;
        assert_eq!(seen, Peeked::Sni("a.example".into()));
        assert_eq!(bytes, h, "the hello goes to the origin whole");
        let mut silent = Vec::new();
        let seen = peek(&mut near, &mut silent, Duration::from_millis(50)).await;
        assert_eq!(
            seen,
            Peeked::NoSni("no TLS ClientHello within timeouts.sni"),
            "server-speaks-first"
        );
        drop(far);
        assert_eq!(
            peek(&mut near, &mut Vec::new(), Duration::from_secs(5)).await,
            Peeked::Gone
        );
    }
}
