//! Moving live connections to the successor once its canary passed: each connection is an
//! [`Item`], an opaque record (the server's own encoding) with its fds. Items travel in
//! batches over the channel, one message each, never split across messages; the successor
//! acknowledges each batch once it holds the fds. The old generation keeps its copies until
//! then: a batch that is refused, truncated or never acknowledged (the successor died) comes
//! back to it whole, and it carries on with those connections.
//!
//! A batch: `XFER`, the protocol version (u16, big-endian), the item count (u16), then per
//! item its fd count (u16) and record length (u32) and the record; the fds in item order.
//! The answers are text: `ack <items>` or `nack <reason>`; the old generation ends with
//! `done`. The version is agreed at readiness (`ready <pid> canary xfer=3`): a successor that
//! does not offer ours gets no batches, and the old generation drains as before.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::Duration;

use crate::wire::{MAX_FDS_PER_MESSAGE, Message, Wire};

/// The version of the transfer this build speaks. 2 and 3: the batch format of 1; what
/// changed is that a server's records may be of more kinds (baton: idle client connections
/// as well as tunnels in 2, TLS connections with their record state in 3), which a server
/// built for an earlier version would not know: it is sent nothing, and the old generation
/// drains as before.
pub const TRANSFER_VERSION: u16 = 3;

/// Overwrites `bytes` with zeroes: records may carry secrets (baton's TLS keys), and every
/// copy of them the transfer makes is wiped before it is freed. `black_box` keeps the
/// compiler from dropping the writes to memory about to be freed.
pub fn wipe(bytes: &mut [u8]) {
    bytes.fill(0);
    std::hint::black_box(bytes);
}
/// Record bytes per batch at most, well inside the channel's socket buffer.
pub(crate) const MAX_BATCH_BYTES: usize = 96 * 1024;
const MAGIC: &[u8; 4] = b"XFER";

/// One connection on the move: the server's record of it and its fds.
#[derive(Debug)]
pub struct Item {
    /// The server's own description of the connection, opaque to this crate.
    pub record: Vec<u8>,
    /// Its fds (a tunnel has two sockets), closed here once the successor acknowledged them.
    pub fds: Vec<OwnedFd>,
}

/// Why a batch did not move. Its items come back with it.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The successor refused the batch; the reason it gave.
    #[error("the new generation refused the batch: {0}")]
    Refused(String),
    /// No answer within the time given.
    #[error("no acknowledgement within {0:?}")]
    Timeout(Duration),
    /// The successor closed the channel.
    #[error("the new generation closed the channel")]
    Closed,
    /// An item is too big for one message.
    #[error("an item is too big to send ({fds} fds, {bytes} record bytes)")]
    TooBig {
        /// Its fds.
        fds: usize,
        /// Its record's bytes.
        bytes: usize,
    },
    /// Sending or receiving on the channel failed.
    #[error("channel i/o")]
    Io(#[from] io::Error),
}

/// The old generation's side, after the canary passed.
#[derive(Debug)]
pub struct Transfer {
    wire: Wire,
}

impl Transfer {
    pub(crate) fn new(wire: Wire) -> Transfer {
        Transfer { wire }
    }

    /// Sends one batch (see [`batches`]) and waits up to `timeout` for its acknowledgement.
    /// On success the items are dropped (our copies close: the successor holds its own);
    /// on failure they come back.
    pub async fn send_batch(
        &mut self,
        items: Vec<Item>,
        timeout: Duration,
    ) -> Result<usize, (TransferError, Vec<Item>)> {
        let (fds, bytes) = weight(&items);
        if fds > MAX_FDS_PER_MESSAGE || bytes > MAX_BATCH_BYTES {
            return Err((TransferError::TooBig { fds, bytes }, items));
        }
        match self.exchange(&items, timeout).await {
            Ok(()) => {
                let mut items = items;
                for item in &mut items {
                    wipe(&mut item.record);
                }
                Ok(items.len())
            }
            Err(e) => Err((e, items)),
        }
    }

    async fn exchange(&mut self, items: &[Item], timeout: Duration) -> Result<(), TransferError> {
        let raw: Vec<RawFd> = items
            .iter()
            .flat_map(|i| i.fds.iter().map(AsRawFd::as_raw_fd))
            .collect();
        let mut batch = encode(items);
        let sent = self.wire.send(&batch, &raw).await;
        wipe(&mut batch);
        sent?;
        let answer = tokio::time::timeout(timeout, self.answer())
            .await
            .map_err(|_| TransferError::Timeout(timeout))??;
        let text = String::from_utf8_lossy(&answer.bytes);
        match text.trim().split_once(' ') {
            Some(("ack", n)) if n.parse() == Ok(items.len()) => Ok(()),
            Some(("nack", why)) => Err(TransferError::Refused(why.to_string())),
            _ => Err(TransferError::Refused(format!("unexpected answer {:?}", text.trim()))),
        }
    }

    /// The successor's next answer, past any canary-window message still in the channel (a
    /// ping it sent before our `pass` reached it, its `seen`).
    async fn answer(&self) -> Result<Message, TransferError> {
        loop {
            let Some(m) = self.wire.recv().await? else {
                return Err(TransferError::Closed);
            };
            if !(m.bytes.starts_with(b"ping") || m.bytes.as_slice() == b"seen") {
                return Ok(m);
            }
        }
    }

    /// Tells the successor that nothing more comes.
    pub async fn finish(self) {
        let _ = self.wire.send(b"done", &[]).await;
    }
}

/// Splits values holding items into batches that each fit one message; an item is never
/// split. An item too big for any message gets a batch of its own, which
/// [`Transfer::send_batch`] refuses.
pub fn batches<T>(values: Vec<T>, item: impl Fn(&T) -> &Item) -> Vec<Vec<T>> {
    let mut out: Vec<Vec<T>> = Vec::new();
    let mut current = Vec::new();
    let (mut fds, mut bytes) = (0, 0);
    for value in values {
        let i = item(&value);
        let (f, b) = (i.fds.len(), i.record.len() + 6);
        let full = fds + f > MAX_FDS_PER_MESSAGE || bytes + b > MAX_BATCH_BYTES || current.len() == u16::MAX as usize;
        if full && !current.is_empty() {
            out.push(std::mem::take(&mut current));
            (fds, bytes) = (0, 0);
        }
        (fds, bytes) = (fds + f, bytes + b);
        current.push(value);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

fn weight(items: &[Item]) -> (usize, usize) {
    let fds = items.iter().map(|i| i.fds.len()).sum();
    let bytes = items.iter().map(|i| i.record.len() + 6).sum();
    (fds, bytes)
}

fn encode(items: &[Item]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + weight(items).1);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&TRANSFER_VERSION.to_be_bytes());
    out.extend_from_slice(&(items.len() as u16).to_be_bytes());
    for item in items {
        out.extend_from_slice(&(item.fds.len() as u16).to_be_bytes());
        out.extend_from_slice(&(item.record.len() as u32).to_be_bytes());
        out.extend_from_slice(&item.record);
    }
    out
}

/// Parses a batch, handing each item its fds in order. Any inconsistency refuses the whole
/// batch (its fds close here; the sender still has its copies).
fn decode(mut message: Message) -> Result<Vec<Item>, String> {
    let items = decode_items(&mut message);
    wipe(&mut message.bytes);
    items
}

fn decode_items(message: &mut Message) -> Result<Vec<Item>, String> {
    if message.truncated {
        return Err("truncated (fds beyond RLIMIT_NOFILE, or too many bytes)".into());
    }
    let b = &message.bytes;
    let rest = b.strip_prefix(MAGIC).ok_or("not a batch")?;
    let (version, rest) = take_u16(rest)?;
    if version != TRANSFER_VERSION {
        return Err(format!("version {version}, this build speaks {TRANSFER_VERSION}"));
    }
    let (count, mut rest) = take_u16(rest)?;
    let mut fds = std::mem::take(&mut message.fds).into_iter();
    let mut items = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let (nfds, r) = take_u16(rest)?;
        let (len, r) = take_u32(r)?;
        let record = r.get(..len as usize).ok_or("record past the end")?.to_vec();
        rest = &r[len as usize..];
        let fds: Vec<OwnedFd> = fds.by_ref().take(nfds as usize).collect();
        if fds.len() != nfds as usize {
            return Err("fewer fds than the records name".into());
        }
        items.push(Item { record, fds });
    }
    if !rest.is_empty() || fds.next().is_some() {
        return Err("bytes or fds left over".into());
    }
    Ok(items)
}

fn take_u16(b: &[u8]) -> Result<(u16, &[u8]), String> {
    let (n, rest) = b.split_first_chunk::<2>().ok_or("short batch")?;
    Ok((u16::from_be_bytes(*n), rest))
}

fn take_u32(b: &[u8]) -> Result<(u32, &[u8]), String> {
    let (n, rest) = b.split_first_chunk::<4>().ok_or("short batch")?;
    Ok((u32::from_be_bytes(*n), rest))
}

/// The successor's side, after its predecessor's verdict.
#[derive(Debug)]
pub struct Incoming {
    wire: Wire,
}

impl Incoming {
    pub(crate) fn new(wire: Wire) -> Incoming {
        Incoming { wire }
    }

    /// Tells the predecessor that this generation took its verdict in: it reports the
    /// handoff done only then (a successor that said `confirms` at readiness owes this).
    pub async fn confirm_verdict(&self) -> io::Result<()> {
        self.wire.send(b"seen", &[]).await
    }

    /// The next batch, acknowledged: from here its connections are ours. `None` once the
    /// predecessor said `done` or went away. A batch that cannot be taken whole is refused
    /// (the predecessor keeps it) and the next one is awaited.
    pub async fn next_batch(&mut self) -> io::Result<Option<Vec<Item>>> {
        loop {
            let Some(message) = self.wire.recv().await? else {
                return Ok(None);
            };
            if message.bytes.as_slice() == b"done" {
                return Ok(None);
            }
            match decode(message) {
                Ok(items) => {
                    self.wire.send(format!("ack {}", items.len()).as_bytes(), &[]).await?;
                    return Ok(Some(items));
                }
                Err(why) => self.wire.send(format!("nack {why}").as_bytes(), &[]).await?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize, record: &[u8]) -> Item {
        let fds = (0..n)
            .map(|_| std::fs::File::open("/dev/null").map(OwnedFd::from))
            .collect::<io::Result<Vec<_>>>()
            .expect("open /dev/null");
        Item {
            record: record.to_vec(),
            fds,
        }
    }

    fn pair() -> (Transfer, Incoming) {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair");
        let wire = |fd| Wire::new(fd).expect("register");
        (Transfer::new(wire(a)), Incoming::new(wire(b)))
    }

    #[tokio::test]
    async fn a_moved_pipe_carries_its_bytes_to_the_other_side() {
        use std::io::{Read, Write};
        let (mut transfer, mut incoming) = pair();
        let (r, mut w) = std::io::pipe().expect("pipe");
        w.write_all(b"in flight").expect("write");
        let item = Item {
            record: b"pipe".to_vec(),
            fds: vec![OwnedFd::from(r)],
        };
        let receiving = tokio::spawn(async move { incoming.next_batch().await });
        let sent = transfer.send_batch(vec![item], Duration::from_secs(5)).await;
        assert_eq!(sent.map_err(|(e, _)| e.to_string()), Ok(1));
        let mut got = receiving.await.expect("join").expect("recv").expect("a batch");
        assert_eq!(got[0].record, b"pipe");
        drop(w);
        let mut text = String::new();
        std::fs::File::from(got.remove(0).fds.remove(0))
            .read_to_string(&mut text)
            .expect("read");
        assert_eq!(text, "in flight");
    }

    #[tokio::test]
    async fn a_successor_that_dies_before_its_ack_gives_the_batch_back() {
        let (mut transfer, incoming) = pair();
        let dying = tokio::spawn(async move {
            // Read the batch (the fds arrive), then go away without answering.
            let got = incoming.wire.recv().await;
            drop(incoming);
            got.map(|m| m.map(|m| m.fds.len()))
        });
        let items = vec![item(6, b"tunnel"), item(6, b"tunnel")];
        let (err, back) = transfer
            .send_batch(items, Duration::from_secs(5))
            .await
            .expect_err("no ack must fail the batch");
        assert!(matches!(err, TransferError::Closed), "{err:?}");
        assert_eq!(
            back.iter().map(|i| i.fds.len()).sum::<usize>(),
            12,
            "every fd is still ours"
        );
        assert_eq!(dying.await.expect("join").expect("recv"), Some(12));
    }

    #[tokio::test]
    async fn a_late_ping_before_the_ack_is_not_taken_for_the_answer() {
        let (mut transfer, mut incoming) = pair();
        incoming.wire.send(b"ping 3\n", &[]).await.expect("ping");
        let receiving = tokio::spawn(async move { incoming.next_batch().await.map(|b| b.map(|b| b.len())) });
        let sent = transfer.send_batch(vec![item(2, b"x")], Duration::from_secs(5)).await;
        assert_eq!(sent.map_err(|(e, _)| e.to_string()), Ok(1));
        assert_eq!(receiving.await.expect("join").expect("recv"), Some(1));
    }

    #[tokio::test]
    async fn a_successor_that_does_not_answer_times_out_and_the_batch_comes_back() {
        let (mut transfer, _silent) = pair();
        let (err, back) = transfer
            .send_batch(vec![item(1, b"x")], Duration::from_millis(100))
            .await
            .expect_err("silence must fail the batch");
        assert!(matches!(err, TransferError::Timeout(_)), "{err:?}");
        assert_eq!(back.len(), 1);
    }

    #[test]
    fn batches_never_split_an_item_and_respect_the_fd_limit() {
        let items: Vec<Item> = (0..100).map(|_| item(6, b"tunnel")).collect();
        let b = batches(items, |i| i);
        assert_eq!(b.iter().map(Vec::len).collect::<Vec<_>>(), vec![42, 42, 16]);
        assert!(
            b.iter()
                .all(|batch| batch.iter().map(|i| i.fds.len()).sum::<usize>() <= MAX_FDS_PER_MESSAGE)
        );
    }

    #[test]
    fn a_batch_decodes_to_what_was_encoded() {
        let items = vec![item(2, b"one"), item(0, b""), item(3, b"three")];
        let bytes = encode(&items);
        let fds = items.into_iter().flat_map(|i| i.fds).collect();
        let back = decode(Message {
            bytes,
            fds,
            truncated: false,
        })
        .expect("decodes");
        let shape: Vec<(usize, &[u8])> = back.iter().map(|i| (i.fds.len(), i.record.as_slice())).collect();
        assert_eq!(shape, vec![(2, &b"one"[..]), (0, &b""[..]), (3, &b"three"[..])]);
    }

    #[test]
    fn a_truncated_or_foreign_batch_is_refused() {
        let items = vec![item(2, b"one")];
        let bytes = encode(&items);
        let fds: Vec<OwnedFd> = items.into_iter().flat_map(|i| i.fds).collect();
        let short = Message {
            bytes: bytes.clone(),
            fds: Vec::new(),
            truncated: true,
        };
        assert!(decode(short).unwrap_err().contains("truncated"));
        let mut other = bytes;
        other[5] = 9;
        let foreign = Message {
            bytes: other,
            fds,
            truncated: false,
        };
        assert!(decode(foreign).unwrap_err().contains("version"));
    }
    /// Items of `fds` fds each with a record of `bytes` bytes, as `batches` sees them.
    fn shapes(values: &[(usize, usize)]) -> Vec<Vec<usize>> {
        let items: Vec<(usize, Item)> = values
            .iter()
            .enumerate()
            .map(|(n, &(fds, bytes))| (n, item(fds, &vec![b'r'; bytes])))
            .collect();
        batches(items, |(_, i)| i)
            .into_iter()
            .map(|b| b.into_iter().map(|(n, _)| n).collect())
            .collect()
    }

    #[test]
    fn a_batch_holds_exactly_the_fd_limit_and_no_more() {
        let limit = MAX_FDS_PER_MESSAGE;
        assert_eq!(
            shapes(&[(limit - 3, 1), (3, 1)]),
            vec![vec![0, 1]],
            "exactly the limit: one batch"
        );
        assert_eq!(
            shapes(&[(limit - 3, 1), (4, 1)]),
            vec![vec![0], vec![1]],
            "one fd more: two"
        );
    }

    #[test]
    fn a_batch_holds_exactly_the_byte_limit_and_no_more() {
        // Each record weighs its length and 6 bytes of header (fd count, length).
        let half = MAX_BATCH_BYTES / 2 - 6;
        assert_eq!(MAX_BATCH_BYTES, 96 * 1024, "well inside the ~208 KiB socket buffer");
        assert_eq!(
            shapes(&[(0, half), (0, half)]),
            vec![vec![0, 1]],
            "exactly the limit: one batch"
        );
        assert_eq!(
            shapes(&[(0, half), (0, half + 1)]),
            vec![vec![0], vec![1]],
            "one byte more: two"
        );
        assert_eq!(
            shapes(&[(0, half), (0, half - 10), (0, 11)]),
            vec![vec![0, 1], vec![2]],
            "the third item's weight counts on top of the first two"
        );
    }

    /// A successor that answers the first batch with `answer`, and says how many fds came.
    fn answering(incoming: Incoming, answer: &'static str) -> tokio::task::JoinHandle<usize> {
        tokio::spawn(async move {
            let got = incoming.wire.recv().await.expect("recv").expect("a batch");
            incoming.wire.send(answer.as_bytes(), &[]).await.expect("answer");
            got.fds.len()
        })
    }

    #[tokio::test]
    async fn a_batch_at_the_limits_is_sent_and_one_past_them_comes_back_too_big() {
        let (mut transfer, mut incoming) = pair();
        let fd_limit = vec![item(MAX_FDS_PER_MESSAGE - 1, b"a"), item(1, b"b")];
        let receiving = tokio::spawn(async move {
            let first = incoming.next_batch().await.expect("recv").expect("a batch").len();
            let second = incoming.next_batch().await.expect("recv").expect("a batch").len();
            (first, second)
        });
        let sent = transfer.send_batch(fd_limit, Duration::from_secs(5)).await;
        assert_eq!(sent.map_err(|(e, _)| e.to_string()), Ok(2), "exactly the fd limit goes");
        let byte_limit = vec![item(0, &vec![b'r'; MAX_BATCH_BYTES - 6])];
        let sent = transfer.send_batch(byte_limit, Duration::from_secs(5)).await;
        assert_eq!(
            sent.map_err(|(e, _)| e.to_string()),
            Ok(1),
            "exactly the byte limit goes"
        );
        assert_eq!(receiving.await.expect("join"), (2, 1));

        let too_many_fds = vec![item(MAX_FDS_PER_MESSAGE, b"a"), item(1, b"b")];
        let (err, back) = transfer
            .send_batch(too_many_fds, Duration::from_secs(5))
            .await
            .unwrap_err();
        let want = (MAX_FDS_PER_MESSAGE + 1, 14);
        assert!(
            matches!(err, TransferError::TooBig { fds, bytes } if (fds, bytes) == want),
            "{err:?}"
        );
        assert_eq!(back.len(), 2, "the items come back");
        let too_long = vec![item(0, &vec![b'r'; MAX_BATCH_BYTES - 5])];
        let (err, _) = transfer.send_batch(too_long, Duration::from_secs(5)).await.unwrap_err();
        let want = (0, MAX_BATCH_BYTES + 1);
        assert!(
            matches!(err, TransferError::TooBig { fds, bytes } if (fds, bytes) == want),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn only_an_ack_of_every_item_moves_the_batch() {
        let (mut transfer, incoming) = pair();
        let successor = answering(incoming, "ack 2");
        let sent = transfer
            .send_batch(vec![item(1, b"a"), item(1, b"b")], Duration::from_secs(5))
            .await;
        assert_eq!(sent.map_err(|(e, _)| e.to_string()), Ok(2), "ack 2 for 2 items");
        assert_eq!(successor.await.expect("join"), 2);

        let (mut transfer, incoming) = pair();
        let successor = answering(incoming, "ack 1");
        let (err, back) = transfer
            .send_batch(vec![item(1, b"a"), item(1, b"b")], Duration::from_secs(5))
            .await
            .expect_err("an ack of fewer items than sent");
        assert!(
            matches!(&err, TransferError::Refused(why) if why.contains("unexpected answer")),
            "{err:?}"
        );
        assert_eq!(back.len(), 2, "the batch comes back whole");
        successor.await.expect("join");
    }

    #[tokio::test]
    async fn a_nack_comes_back_with_its_reason() {
        let (mut transfer, incoming) = pair();
        let successor = answering(incoming, "nack no room");
        let (err, back) = transfer
            .send_batch(vec![item(1, b"a")], Duration::from_secs(5))
            .await
            .expect_err("refused");
        assert!(
            matches!(&err, TransferError::Refused(why) if why == "no room"),
            "{err:?}"
        );
        assert_eq!(back.len(), 1);
        successor.await.expect("join");
    }

    #[tokio::test]
    async fn finish_says_done_and_confirm_says_seen_on_the_wire() {
        use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
        let (a, b) =
            socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC).expect("socketpair");
        // A second handle keeps our end open after `finish`, so only the message can say done.
        let ours = a.try_clone().expect("dup");
        let (transfer, incoming) = (
            Transfer::new(Wire::new(a).unwrap()),
            Incoming::new(Wire::new(b).unwrap()),
        );
        incoming.confirm_verdict().await.expect("confirm");
        let seen = tokio::time::timeout(Duration::from_secs(5), transfer.wire.recv())
            .await
            .expect("confirm_verdict must send seen")
            .expect("recv")
            .expect("a message");
        assert_eq!(
            seen.bytes, b"seen",
            "the predecessor waits for this before it calls it done"
        );
        transfer.finish().await;
        let done = tokio::time::timeout(Duration::from_secs(5), incoming.wire.recv())
            .await
            .expect("finish must send done, not leave the successor waiting")
            .expect("recv")
            .expect("a message, not the close");
        assert_eq!(done.bytes, b"done");
        drop(ours);
    }

    #[test]
    fn bytes_or_fds_left_over_refuse_the_batch() {
        let encoded = || {
            let items = vec![item(1, b"one")];
            let bytes = encode(&items);
            (bytes, items.into_iter().flat_map(|i| i.fds).collect::<Vec<_>>())
        };
        let (bytes, fds) = encoded();
        let exact = Message {
            bytes,
            fds,
            truncated: false,
        };
        assert_eq!(decode(exact).expect("exact").len(), 1);
        let (mut bytes, fds) = encoded();
        bytes.push(0);
        let extra_byte = Message {
            bytes,
            fds,
            truncated: false,
        };
        assert!(
            decode(extra_byte).unwrap_err().contains("left over"),
            "a byte past the records"
        );
        let (bytes, mut fds) = encoded();
        fds.push(item(1, b"").fds.remove(0));
        let extra_fd = Message {
            bytes,
            fds,
            truncated: false,
        };
        assert!(
            decode(extra_fd).unwrap_err().contains("left over"),
            "an fd past the records"
        );
    }
}
