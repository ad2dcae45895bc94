use std::os::fd::AsFd;

use super::*;
use crate::proxy::migrate::{ConnectionRecord, TunnelRecord};

fn tunnel_record() -> Record {
    Record {
        name: "c.19a2b3c4d5e.7".into(),
        ids: vec![[1, 2], [3, 4], [5, 6], [5, 7]],
        moved: Moved::Tunnel(TunnelRecord {
            client: Some("192.0.2.1:4000".parse().unwrap()),
            target: "example.com:443".into(),
            pipes: [true, false],
            up: 10,
            down: 20,
            ..TunnelRecord::default()
        }),
    }
}

#[test]
fn a_record_survives_its_slot() {
    let record = tunnel_record();
    let bytes = encode_slot(&record).unwrap();
    assert!(bytes.len() <= SLOT, "a slot's bytes fit the slot: {}", bytes.len());
    let back = decode_slot(&bytes).unwrap().expect("a written slot holds a record");
    assert_eq!(back.name, record.name, "the name comes back");
    assert_eq!(back.ids, record.ids, "the fds' identities come back in order");
    let Moved::Tunnel(t) = back.moved else {
        panic!("the kind comes back")
    };
    assert_eq!(
        (t.target.as_str(), t.pipes, t.up, t.down),
        ("example.com:443", [true, false], 10, 20)
    );
}

#[test]
fn an_empty_or_cleared_slot_holds_nothing() {
    assert!(decode_slot(&[0u8; SLOT]).unwrap().is_none(), "a zero slot is free");
    let mut bytes = encode_slot(&tunnel_record()).unwrap();
    bytes[..HEADER].fill(0);
    assert!(
        decode_slot(&bytes).unwrap().is_none(),
        "hide() clears the header: nothing to take back"
    );
}

#[test]
fn a_torn_or_forged_slot_is_refused() {
    let bytes = encode_slot(&tunnel_record()).unwrap();
    let mut torn = bytes.clone();
    let last = torn.len() - 2;
    torn[last] ^= 0x20;
    let e = decode_slot(&torn).unwrap_err();
    assert!(e.contains("checksum"), "a flipped body byte fails the checksum: {e}");
    let mut long = bytes.clone();
    long[4..8].copy_from_slice(&(SLOT as u32).to_le_bytes());
    let e = decode_slot(&long).unwrap_err();
    assert!(
        e.contains("does not fit"),
        "a length past the slot is refused, not read past: {e}"
    );
    let e = decode_slot(&bytes[..HEADER + 3]).unwrap_err();
    assert!(e.contains("does not fit"), "a short slot is refused: {e}");
}

#[test]
fn a_record_too_big_for_its_slot_is_not_stashed() {
    let record = Record {
        name: "c.1.1".into(),
        ids: vec![[1, 2]],
        moved: Moved::Connection(ConnectionRecord {
            unread: vec![b'x'; SLOT],
            ..ConnectionRecord::default()
        }),
    };
    assert!(
        encode_slot(&record).is_none(),
        "a record over {SLOT} bytes does not fit"
    );
}

/// The whole way: a table written by one stash is read back as a crashed generation's, its
/// fds put in the record's order whatever order they come in; fds without a record, or a
/// record naming other fds, are shut and forgotten.
#[test]
fn stored_connections_come_back_in_their_records_order() {
    let stash = Stash::new(Duration::from_secs(1), 8).unwrap();
    stash.active.store(true, Ordering::Release);
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let moved = Moved::Connection(ConnectionRecord::default());
    let fds = [a.as_fd(), r.as_fd(), w.as_fd()];
    let entry = stash.keep("c.x.1", &moved, &fds).unwrap();
    let busy = stash.keep("c.x.2", &moved, &[b.as_fd()]).unwrap();
    stash.hide(&busy);
    let mut stored = Stored::default();
    stored.tables.push(("stash.x".into(), stash.table.try_clone().unwrap()));
    let copies = |f: &[BorrowedFd<'_>]| f.iter().map(|fd| fd.try_clone_to_owned().unwrap()).collect::<Vec<_>>();
    // Shuffled: the store promises no order.
    stored
        .fds
        .insert("c.x.1".into(), copies(&[w.as_fd(), a.as_fd(), r.as_fd()]));
    stored.fds.insert("c.x.2".into(), copies(&[b.as_fd()]));
    let forgotten = std::cell::RefCell::new(Vec::new());
    let found = stored.connections(&|n| forgotten.borrow_mut().push(n.to_string()));
    assert_eq!(found.len(), 1, "only the connection with a record comes back");
    let (moved, fds) = &found[0];
    assert_eq!(moved.stashed(), Some("c.x.1"), "it keeps its name in the store");
    let ids: Vec<_> = fds.iter().map(|f| identity(f.as_fd()).unwrap()).collect();
    let want: Vec<_> = [a.as_fd(), r.as_fd(), w.as_fd()]
        .iter()
        .map(|f| identity(*f).unwrap())
        .collect();
    assert_eq!(ids, want, "the fds in the record's order");
    let read_only = |f: &OwnedFd| {
        let flags = nix::fcntl::fcntl(f.as_fd(), nix::fcntl::FcntlArg::F_GETFL).unwrap();
        flags & libc::O_ACCMODE == libc::O_RDONLY
    };
    assert!(
        read_only(&fds[1]) && !read_only(&fds[2]),
        "the pipe's read end where the record has it, not its write end (they share an inode)"
    );
    let mut forgotten = forgotten.into_inner();
    forgotten.sort();
    assert_eq!(
        forgotten,
        ["c.x.2", "stash.x"],
        "the busy one and the old table leave the store"
    );
    drop(entry);
}

#[test]
fn a_pipes_two_ends_have_identities_of_their_own() {
    let (r, w) = nix::unistd::pipe().unwrap();
    let (ri, wi) = (identity(r.as_fd()).unwrap(), identity(w.as_fd()).unwrap());
    assert_eq!(ri[1], wi[1], "the witness: both ends share the pipe's inode");
    assert_ne!(ri, wi, "so the access mode tells them apart");
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let dup = a.as_fd().try_clone_to_owned().unwrap();
    assert_eq!(
        identity(a.as_fd()).unwrap(),
        identity(dup.as_fd()).unwrap(),
        "a copy of an fd (as the store keeps) has its identity"
    );
}

/// A restart after a crash gets every stored fd's name in one environment string, which the
/// kernel caps at 128 KiB: past the budget a connection is not stashed (rather than a restart
/// that cannot exec baton), and what leaves the store gives its share back.
#[test]
fn the_names_stay_within_what_a_restart_can_pass() {
    let stash = Stash::new(Duration::from_secs(1), 8).unwrap();
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let moved = Moved::Connection(ConnectionRecord::default());
    assert!(
        stash.put(&moved, &[a.as_fd()]).is_none(),
        "nothing is stashed before this generation serves"
    );
    stash.active.store(true, Ordering::Release);
    let entry = stash.put(&moved, &[a.as_fd()]).expect("a serving generation stashes");
    let cost = entry.cost();
    assert_eq!(cost, entry.name().len() + 1, "one fd: its name and a colon");
    assert!(entry.name().len() <= 16, "names are short: {}", entry.name());
    stash.names_used.store(NAMES_BUDGET - cost + 1, Ordering::Relaxed);
    assert!(
        stash.put(&moved, &[a.as_fd()]).is_none(),
        "one byte over the budget: not stashed"
    );
    stash.remove(entry);
    assert_eq!(
        stash.names_used.load(Ordering::Relaxed),
        NAMES_BUDGET - 2 * cost + 1,
        "a removed connection gives its share back"
    );
}
