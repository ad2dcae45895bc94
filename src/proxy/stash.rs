//! Live connections kept in systemd's fd store, so that a crash of the serving generation
//! (`kill -9`, an OOM kill, an abort, a watchdog kill) loses none: the restarted first
//! generation takes them back like a migration's ([`Stored`]).
//!
//! - Each stashed connection is one name in the store, `c.<process>.<n>` (base 36, short:
//!   the names of all stored fds come back in one environment string, [`NAMES_BUDGET`]), under which all
//!   its fds go in one `FDSTORE=1` message (a tunnel's client and origin sockets and the
//!   pipes it has made; an idle connection's socket), and one `FDSTOREREMOVE=1` takes them
//!   all out when it ends: one message to PID 1 each way (a pipe made later adds one).
//! - Its record (the [`Moved`] a handoff would send, and the fds' `(st_dev, st_ino)` in the
//!   record's order, since the store gives fds back in no promised order) is a slot of a
//!   memfd table, itself in the store as `stash.<process>`. Writing a slot is a `pwrite`,
//!   never a message to PID 1: an idle connection that turns busy clears its slot (what the
//!   dead process read of a request is lost with it, so a busy connection is not taken
//!   back), and writes it again when it rests.
//! - Messages go to PID 1 from one thread of their own, in order (a removal never overtakes
//!   its store), so the runtime never waits on PID 1's socket.
//! - Only the serving generation stashes ([`Stash::activate`]): a successor that fails its
//!   canary window leaves nothing behind. A handoff passes the name with the record; the
//!   successor writes it into its own table (`keep`), and the old generation frees its slot
//!   without removing the fds.
//!
//! A stashed socket is not closed by closing it here (systemd holds a copy): whoever ends it
//! shuts it down first, or removes it from the store, which closes systemd's copy.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use baton_handoff::Inherited;
use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use sd_notify::NotifyState;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::proxy::migrate::Moved;

/// The fd store names of record tables, and of stashed connections.
pub const TABLE_PREFIX: &str = "stash.";
pub const CONNECTION_PREFIX: &str = "c.";
/// One record's room in the table; 4 to a page, so a slot's `pwrite` never spans two
/// pages. A record that does not fit (a long upgrade URI, many unread bytes) is not stashed.
pub const SLOT: usize = 1024;
const HEADER: usize = 16;
const MAGIC: u32 = u32::from_le_bytes(*b"BTS1");
/// The bytes the stashed connections' names may take in `LISTEN_FDNAMES` (each fd's name and
/// a `:`). systemd passes the store back in that one environment string, and the kernel
/// refuses an `execve` with a string over 128 KiB (`MAX_ARG_STRLEN`): past it, a restart
/// after a crash would fail to start baton at all. What is left of the 128 KiB is for the
/// listeners' names, the tables and a draining generation's connections.
pub const NAMES_BUDGET: usize = 100_000;
/// Stores sent to the notifier thread and not yet through to PID 1. Each holds copies of its
/// fds: when PID 1 falls behind (it checks each new fd against every stored one), new
/// connections are not stashed rather than copies piling up against the open-files limit.
const STORES_IN_FLIGHT: usize = 1024;

/// What a slot holds: the connection's name in the store, its fds' identities in the order
/// the record lays them out, and the record (borrowed, `&Moved`, when written).
#[derive(Debug, Serialize, Deserialize)]
pub struct Record<M = Moved> {
    pub name: String,
    pub ids: Vec<[u64; 2]>,
    pub moved: M,
}

/// A slot's bytes: magic, length, FNV-1a of the body, then the body (JSON). `None`: it
/// does not fit.
pub fn encode_slot<M: Serialize>(record: &Record<M>) -> Option<Vec<u8>> {
    let body = serde_json::to_vec(record).ok()?;
    if body.len() > SLOT - HEADER {
        return None;
    }
    let mut slot = Vec::with_capacity(HEADER + body.len());
    slot.extend_from_slice(&MAGIC.to_le_bytes());
    slot.extend_from_slice(&(body.len() as u32).to_le_bytes());
    slot.extend_from_slice(&fnv(&body).to_le_bytes());
    slot.extend_from_slice(&body);
    Some(slot)
}

/// A slot read back: `Ok(None)` for an empty (or cleared) one; an error for one that is
/// torn or forged (its checksum, length or JSON is wrong).
pub fn decode_slot(slot: &[u8]) -> Result<Option<Record>, String> {
    let word = |at: usize| {
        slot.get(at..at + 4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap_or_default()))
    };
    if word(0) != Some(MAGIC) {
        return Ok(None);
    }
    let len = word(4).ok_or("a short slot")? as usize;
    let body = slot
        .get(HEADER..HEADER + len)
        .filter(|_| len <= SLOT - HEADER)
        .ok_or_else(|| format!("a record of {len} bytes does not fit its slot"))?;
    let sum = slot
        .get(8..16)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()));
    if sum != Some(fnv(body)) {
        return Err("a record whose checksum does not match (torn or forged)".into());
    }
    serde_json::from_slice(body)
        .map(Some)
        .map_err(|e| format!("a bad record: {e}"))
}

fn base36(mut n: u128) -> String {
    let mut digits = Vec::new();
    loop {
        digits.push(b"0123456789abcdefghijklmnopqrstuvwxyz"[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    digits.reverse();
    String::from_utf8(digits).unwrap_or_default()
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An fd's identity: the same open socket or pipe end has it in every process. A pipe's two
/// ends share one inode, so the end's access mode (read only, write only; a socket's is read
/// and write) goes in the first word's top two bits, which no device number uses: without it
/// a tunnel's pipe ends could come back swapped and the tunnel be refused.
pub fn identity(fd: BorrowedFd<'_>) -> io::Result<[u64; 2]> {
    let st = nix::sys::stat::fstat(fd)?;
    let flags = fcntl(fd, FcntlArg::F_GETFL)?;
    let mode = (flags & libc::O_ACCMODE) as u64;
    Ok([st.st_dev as u64 | (mode << 62), st.st_ino as u64])
}

/// A message for PID 1, sent in order by the notifier thread.
enum Message {
    Store(Box<str>, Vec<OwnedFd>),
    Remove(Box<str>),
    /// Answered once every message before it went out.
    Flush(mpsc::SyncSender<()>),
}

/// One stashed connection's place: its slot, its name, its fds' identities.
#[derive(Debug)]
pub struct Entry {
    slot: u32,
    name: Box<str>,
    ids: Vec<[u64; 2]>,
}

impl Entry {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// What it takes of [`NAMES_BUDGET`]: its name and a `:` for each fd.
    fn cost(&self) -> usize {
        (self.name.len() + 1) * self.ids.len()
    }
}

/// This generation's stash.
pub struct Stash {
    after: Duration,
    table: File,
    table_name: String,
    /// `c.<process>.`: the names of connections this generation stashed.
    prefix: String,
    next: AtomicU64,
    free: Mutex<Vec<u32>>,
    /// Bytes of `LISTEN_FDNAMES` this generation's stashed connections take.
    names_used: AtomicUsize,
    active: AtomicBool,
    to_pid1: Mutex<mpsc::Sender<Message>>,
    /// Stores not yet through to PID 1 (shared with the notifier thread).
    in_flight: Arc<AtomicUsize>,
}

impl Stash {
    /// Under systemd (`NOTIFY_SOCKET`) with `stash_after` above zero and an fd store (systemd
    /// ≥ 254 says its size in `FDSTORE`; 252 does not, and `unit::check` warns on a unit
    /// without one): a stash with a slot per connection `max_connections` allows.
    pub fn from_env(after: Duration, max_connections: usize) -> Option<Stash> {
        std::env::var_os("NOTIFY_SOCKET")?;
        if after.is_zero() || std::env::var("FDSTORE").is_ok_and(|v| v.trim() == "0") {
            return None;
        }
        Stash::new(after, max_connections)
            .inspect_err(|e| warn!("connections are not kept in systemd's fd store: {e}"))
            .ok()
    }

    /// A stash with `slots` slots (sparse: a page is used once a slot in it is written).
    pub fn new(after: Duration, slots: usize) -> io::Result<Stash> {
        let fd = memfd_create("baton-stash", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
        let table = File::from(fd);
        table.set_len((slots * SLOT) as u64)?;
        // Fixed in size: a reader in another process never finds it shorter than it was.
        let seals = SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(table.as_fd(), FcntlArg::F_ADD_SEALS(seals))?;
        let started = std::time::SystemTime::now()
            .duration_since(std::time::SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        // Short (every fd's name counts against NAMES_BUDGET) and unique among the
        // generations whose names share the store: the pid, and the start time's low bits
        // in case a later generation reuses the pid.
        let pid = u128::from(std::process::id());
        let process = format!("{}{}", base36(pid), base36(started % 1296));
        let (tx, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let sent = in_flight.clone();
        std::thread::Builder::new()
            .name("fd-store".into())
            .spawn(move || notifier(&rx, &sent))?;
        Ok(Stash {
            after,
            table,
            table_name: format!("{TABLE_PREFIX}{process}"),
            prefix: format!("{CONNECTION_PREFIX}{process}."),
            next: AtomicU64::new(0),
            free: Mutex::new((0..slots as u32).rev().collect()),
            names_used: AtomicUsize::new(0),
            active: AtomicBool::new(false),
            to_pid1: Mutex::new(tx),
            in_flight,
        })
    }

    /// How long a connection lives before it is stashed.
    pub fn after(&self) -> Duration {
        self.after
    }

    /// This generation serves: its table goes into the store, and it stashes from now on.
    pub fn activate(&self) {
        if self.active.swap(true, Ordering::AcqRel) {
            return;
        }
        match self.table.as_fd().try_clone_to_owned() {
            Ok(fd) => self.send(Message::Store(self.table_name.as_str().into(), vec![fd])),
            Err(e) => warn!("cannot pass the stash's table to systemd: {e}"),
        }
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// This generation exits with nothing stashed: its table leaves the store. It waits (up
    /// to a second) until the notifier thread has sent that, and all before it: the process
    /// exits next, and a removal still queued would leave the table in the store until the
    /// next crash.
    pub fn retire(&self) {
        if !self.is_active() {
            return;
        }
        self.send(Message::Remove(self.table_name.as_str().into()));
        let (done, flushed) = mpsc::sync_channel(1);
        self.send(Message::Flush(done));
        if flushed.recv_timeout(Duration::from_secs(1)).is_err() {
            warn!("the stash's last messages to systemd did not go out within a second");
        }
    }

    /// Stashes a connection under a new name: its record, then its fds. `None` while this
    /// generation does not serve, without a free slot, or when the record does not fit.
    pub fn put(&self, moved: &Moved, fds: &[BorrowedFd<'_>]) -> Option<Box<Entry>> {
        if !self.is_active() {
            return None;
        }
        let n = u128::from(self.next.fetch_add(1, Ordering::Relaxed));
        let name = format!("{}{}", self.prefix, base36(n));
        if self.names_used.load(Ordering::Relaxed) + (name.len() + 1) * fds.len() > NAMES_BUDGET {
            debug!("the fd store's names are at their budget: a connection is not stashed");
            return None;
        }
        if self.in_flight.load(Ordering::Relaxed) >= STORES_IN_FLIGHT {
            debug!("PID 1 is behind with the fd store: a connection is not stashed now");
            return None;
        }
        let entry = self.keep(&name, moved, fds)?;
        match fds.iter().map(|fd| fd.try_clone_to_owned()).collect() {
            Ok(copies) => self.send(Message::Store(name.into(), copies)),
            Err(e) => {
                warn!("cannot stash a connection: {e}");
                self.release(entry);
                return None;
            }
        }
        Some(entry)
    }

    /// A connection already in the store under `name` (moved here by a handoff, or taken
    /// back after a crash): only its record is written, into this generation's table.
    pub fn keep(&self, name: &str, moved: &Moved, fds: &[BorrowedFd<'_>]) -> Option<Box<Entry>> {
        let ids = fds
            .iter()
            .map(|fd| identity(*fd))
            .collect::<io::Result<Vec<_>>>()
            .ok()?;
        let slot = self.free.lock().ok()?.pop()?;
        let entry = Box::new(Entry {
            slot,
            name: name.into(),
            ids,
        });
        self.names_used.fetch_add(entry.cost(), Ordering::Relaxed);
        if !self.show(&entry, moved) {
            debug!(
                name,
                "a connection's record does not fit its slot: not kept in the fd store"
            );
            self.release(entry);
            return None;
        }
        Some(entry)
    }

    /// A stashed tunnel made a pipe: its fds (`new`) join the connection's name, and the
    /// record (which now lists the pipe, `all` its fds in the record's order) is written
    /// again.
    pub fn grow(&self, entry: &mut Entry, moved: &Moved, all: &[BorrowedFd<'_>], new: &[BorrowedFd<'_>]) {
        let ids: io::Result<Vec<_>> = all.iter().map(|fd| identity(*fd)).collect();
        let copies: io::Result<Vec<_>> = new.iter().map(|fd| fd.try_clone_to_owned()).collect();
        let (Ok(ids), Ok(copies)) = (ids, copies) else {
            return warn!(name = %entry.name, "cannot stash a tunnel's new pipe");
        };
        self.send(Message::Store(entry.name.clone(), copies));
        self.names_used.fetch_sub(entry.cost(), Ordering::Relaxed);
        entry.ids = ids;
        self.names_used.fetch_add(entry.cost(), Ordering::Relaxed);
        self.show(entry, moved);
    }

    /// The connection turned busy: its record is cleared (a crash now must not take back a
    /// stream read halfway). Its fds stay in the store.
    pub fn hide(&self, entry: &Entry) {
        let _ = self.table.write_at(&[0; HEADER], u64::from(entry.slot) * SLOT as u64);
    }

    /// Writes the connection's record (again); `false` if it does not fit.
    pub fn show(&self, entry: &Entry, moved: &Moved) -> bool {
        let record = Record {
            name: entry.name.to_string(),
            ids: entry.ids.clone(),
            moved,
        };
        let Some(bytes) = encode_slot(&record) else {
            return false;
        };
        self.table.write_at(&bytes, u64::from(entry.slot) * SLOT as u64).is_ok()
    }

    /// The connection ended: out of the store (systemd closes its copies) and the table.
    pub fn remove(&self, entry: Box<Entry>) {
        self.send(Message::Remove(entry.name.clone()));
        self.release(entry);
    }

    /// The connection moved to the next generation, which keeps its name: only the slot here
    /// is freed.
    pub fn release(&self, entry: Box<Entry>) {
        self.hide(&entry);
        self.names_used.fetch_sub(entry.cost(), Ordering::Relaxed);
        if let Ok(mut free) = self.free.lock() {
            free.push(entry.slot);
        }
    }

    /// Takes a name out of the store (a stored connection not taken back).
    pub fn forget(&self, name: &str) {
        self.send(Message::Remove(name.into()));
    }

    fn send(&self, message: Message) {
        if matches!(message, Message::Store(..)) {
            self.in_flight.fetch_add(1, Ordering::Relaxed);
        }
        if let Ok(tx) = self.to_pid1.lock() {
            let _ = tx.send(message);
        }
    }
}

/// The notifier thread: each message to PID 1 in order. A send that fails is logged; the
/// connection lives on, only unstashed (or, for a removal, closed when systemd notices its
/// POLLHUP).
fn notifier(rx: &mpsc::Receiver<Message>, in_flight: &AtomicUsize) {
    while let Ok(message) = rx.recv() {
        let sent = match &message {
            Message::Store(name, fds) => {
                let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
                sd_notify::notify_with_fds(&[NotifyState::FdStore, NotifyState::FdName(name)], &borrowed)
            }
            Message::Remove(name) => sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]),
            Message::Flush(done) => {
                let _ = done.send(());
                continue;
            }
        };
        if let Err(e) = sent {
            debug!("a message to systemd's fd store failed: {e}");
        }
        if matches!(message, Message::Store(..)) {
            in_flight.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Takes `name` (if any) out of the store: through `stash`'s thread, or at once without one
/// (a generation configured not to stash, adopting a connection that was).
pub fn forget(stash: Option<&Stash>, name: Option<&str>) {
    let Some(name) = name else { return };
    match stash {
        Some(stash) => stash.forget(name),
        None => {
            let _ = sd_notify::notify(&[NotifyState::FdStoreRemove, NotifyState::FdName(name)]);
        }
    }
}

/// Shuts a socket down both ways, so that its peer sees the end although systemd's store
/// may still hold a copy (a pipe or anything else: nothing happens).
pub fn shut(fd: BorrowedFd<'_>) {
    let _ = nix::sys::socket::shutdown(fd.as_raw_fd(), nix::sys::socket::Shutdown::Both);
}

/// What a first generation found of a crashed one in the fd store: its tables and the fds of
/// its stashed connections, by name.
#[derive(Default)]
pub struct Stored {
    tables: Vec<(String, File)>,
    fds: HashMap<String, Vec<OwnedFd>>,
}

impl Stored {
    /// Takes the stash's fds out of what systemd passed (the listeners stay).
    pub fn take(inherited: &mut Inherited) -> Stored {
        let mut stored = Stored::default();
        let names: Vec<(usize, String)> = inherited.names().iter().cloned().enumerate().collect();
        for (idx, name) in names {
            let is_table = name.starts_with(TABLE_PREFIX);
            if !is_table && !name.starts_with(CONNECTION_PREFIX) {
                continue;
            }
            let Some(fd) = inherited.take_fd(idx) else { continue };
            if is_table {
                stored.tables.push((name, File::from(fd)));
            } else {
                stored.fds.entry(name).or_default().push(fd);
            }
        }
        stored
    }

    pub fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.fds.is_empty()
    }

    /// Each stored connection whose record is whole and names exactly its fds, with its fds
    /// in the record's order and its name in the record. The rest are shut down and taken
    /// out of the store (`forget`), and so are the old tables.
    pub fn connections(self, forget: &dyn Fn(&str)) -> Vec<(Moved, Vec<OwnedFd>)> {
        let Stored { tables, mut fds } = self;
        let mut records: HashMap<String, Record> = HashMap::new();
        let mut torn = 0usize;
        for (_, table) in &tables {
            read_table(table, &mut |r| match r {
                Ok(record) => {
                    records.insert(record.name.clone(), record);
                }
                Err(_) => torn += 1,
            });
        }
        let mut found = Vec::new();
        let mut unmatched = 0usize;
        for (name, group) in fds.drain() {
            let matched = match records.remove(&name) {
                Some(record) => in_order(record, group),
                None => Err(group),
            };
            match matched {
                Ok((mut moved, ordered)) => {
                    moved.set_stashed(&name);
                    found.push((moved, ordered));
                }
                Err(group) => {
                    group.iter().for_each(|fd| shut(fd.as_fd()));
                    forget(&name);
                    unmatched += 1;
                }
            }
        }
        for (name, _) in &tables {
            forget(name);
        }
        info!(
            found = found.len(),
            unmatched, torn, "connections found in systemd's fd store after a crash"
        );
        found
    }
}

/// Calls `each` with every record in `table` (torn ones as errors).
fn read_table(table: &File, each: &mut dyn FnMut(Result<Record, String>)) {
    let len = table.metadata().map_or(0, |m| m.len());
    let mut buf = vec![0u8; 64 * SLOT];
    let mut at = 0u64;
    while at < len {
        let Ok(n) = table.read_at(&mut buf, at) else { return };
        if n == 0 {
            return;
        }
        for slot in buf[..n].chunks(SLOT) {
            match decode_slot(slot) {
                Ok(Some(r)) => each(Ok(r)),
                Ok(None) => {}
                Err(e) => each(Err(e)),
            }
        }
        at += n as u64;
    }
}

/// `group` in the order of `record.ids`; the fds back if they are not exactly those.
fn in_order(record: Record, mut group: Vec<OwnedFd>) -> Result<(Moved, Vec<OwnedFd>), Vec<OwnedFd>> {
    if group.len() != record.ids.len() {
        return Err(group);
    }
    let mut ordered = Vec::with_capacity(group.len());
    for id in &record.ids {
        match group
            .iter()
            .position(|fd| identity(fd.as_fd()).ok().as_ref() == Some(id))
        {
            Some(i) => ordered.push(group.swap_remove(i)),
            None => {
                group.extend(ordered);
                return Err(group);
            }
        }
    }
    Ok((record.moved, ordered))
}

#[cfg(test)]
mod tests;
