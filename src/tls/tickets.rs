//! TLS session tickets that survive a handoff: a ticketer of baton's own
//! ([`rustls::server::ProducesTickets`]) whose keys a generation hands to its successor before
//! the successor accepts, so a client that resumes after a handoff gets an abbreviated
//! handshake. rustls' own ticketer cannot export its keys (nginx and HAProxy lose resumption
//! at every reload unless given a key file).
//!
//! Keys rotate on wall-clock epochs of [`EPOCH_SECS`]: a ticket is sealed with its epoch's
//! key (AES-256-GCM, random nonce, the key's name in front as rustls' own ticketer does) and
//! opened with that key or the previous epoch's. The epoch secrets come from one of two
//! sources:
//!
//! - a **ratchet** (the default): the first generation draws a random secret; each epoch's
//!   secret is derived from the one before with HKDF and the older one is erased, so a
//!   process's memory never holds a key that opens a ticket older than one epoch. The state
//!   (epoch, current and previous secret) goes to the successor in a sealed memfd (see
//!   [`TicketKeys::export`]); because the ratchet is deterministic, both generations derive
//!   the same next keys at the same time.
//! - a **shared file** (`[tls] ticket_keys`): each epoch's secret is HKDF of the file's
//!   content and the epoch number, so every baton of a fleet that reads the same file seals
//!   and opens the same tickets with no coordination but their clocks (the next epoch's key
//!   is accepted too, for skew). Rotating the file and reloading changes every key.
//!
//! The ratchet is kept and handed on in both cases, so a configuration that drops the file
//! later falls back to keys a client may still hold tickets for.

use std::io::{self, Write as _};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileExt as _;
use std::path::Path;
use std::sync::{Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{FcntlArg, SealFlag, fcntl};
use nix::sys::memfd::{MFdFlags, memfd_create};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::hkdf::{self, HKDF_SHA256, KeyType, Prk, Salt};
use ring::rand::{SecureRandom, SystemRandom};
use tracing::warn;
use zeroize::Zeroizing;

/// How long one key seals new tickets, and the lifetime tickets are issued with. A key opens
/// tickets for two epochs (its own and the next), so a ticket is never older than its key.
pub const EPOCH_SECS: u64 = 6 * 3600;
/// The name under which the state travels to a successor (`BATON_EXTRA_FDS`).
pub const FD_NAME: &str = "tls-ticket-keys";
/// The shortest `ticket_keys` file: 256 bits (nginx's 48- and 80-byte files qualify).
pub const MIN_FILE_BYTES: usize = 32;

const SECRET_LEN: usize = 32;
const NAME_LEN: usize = 16;
const TAG_LEN: usize = 16;
/// Longer "tickets" are refused before any work (rustls' own ticketer does the same): the
/// session state baton seals is a few hundred bytes.
const MAX_TICKET_LEN: usize = 4096;
/// The state's encoding: magic, epoch, secret, whether a previous secret follows, it.
const MAGIC: &[u8; 4] = b"BTK1";
const ENCODED_LEN: usize = 4 + 8 + SECRET_LEN + 1 + SECRET_LEN;

type Secret = Zeroizing<[u8; SECRET_LEN]>;

#[derive(Debug, thiserror::Error)]
pub enum TicketError {
    #[error("cannot read the ticket key file {path}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the ticket key file {path} holds {len} bytes; it needs at least {MIN_FILE_BYTES} random bytes (e.g. `openssl rand 80 > FILE`)"
    )]
    TooShort { path: String, len: usize },
    #[error("no random numbers for TLS ticket keys")]
    Random,
}

/// An HKDF output length that is not a ring algorithm.
struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

fn expand(prk: &Prk, info: &[&[u8]], out: &mut [u8]) {
    // Lengths here are fixed and far below HKDF-SHA256's limit (255 × 32 bytes): cannot fail.
    let filled = prk.expand(info, Len(out.len())).and_then(|okm| okm.fill(out));
    debug_assert!(filled.is_ok());
}

fn secret_prk(secret: &[u8; SECRET_LEN]) -> Prk {
    Prk::new_less_safe(HKDF_SHA256, secret)
}

/// One epoch's key: its name (in front of every ticket it seals) and the AEAD key.
struct Key {
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
}

impl Key {
    fn derive(secret: &[u8; SECRET_LEN]) -> Key {
        let prk = secret_prk(secret);
        let mut name = [0u8; NAME_LEN];
        expand(&prk, &[b"baton ticket name"], &mut name);
        let mut raw: Secret = Zeroizing::new([0u8; SECRET_LEN]);
        expand(&prk, &[b"baton ticket aead"], &mut raw[..]);
        let unbound = UnboundKey::new(&AES_256_GCM, &raw[..]).unwrap_or_else(|_| unreachable!("32 bytes"));
        Key {
            name,
            aead: LessSafeKey::new(unbound),
        }
    }
}

/// The ratchet's state: what a successor needs to derive the same keys.
#[derive(Clone)]
struct Ratchet {
    epoch: u64,
    secret: Secret,
    previous: Option<Secret>,
}

impl Ratchet {
    fn fresh(epoch: u64, rng: &SystemRandom) -> Result<Ratchet, TicketError> {
        let mut secret: Secret = Zeroizing::new([0u8; SECRET_LEN]);
        rng.fill(&mut secret[..]).map_err(|_| TicketError::Random)?;
        Ok(Ratchet {
            epoch,
            secret,
            previous: None,
        })
    }

    /// Steps forward to `epoch` (never back), erasing every secret older than the previous.
    fn advance_to(&mut self, epoch: u64) {
        while self.epoch < epoch {
            let mut next: Secret = Zeroizing::new([0u8; SECRET_LEN]);
            expand(&secret_prk(&self.secret), &[b"baton ticket ratchet"], &mut next[..]);
            self.previous = Some(std::mem::replace(&mut self.secret, next));
            self.epoch += 1;
        }
    }

    fn keys(&self) -> Vec<Key> {
        let mut keys = vec![Key::derive(&self.secret)];
        keys.extend(self.previous.as_ref().map(|p| Key::derive(p)));
        keys
    }

    fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(ENCODED_LEN));
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.epoch.to_be_bytes());
        out.extend_from_slice(&self.secret[..]);
        out.push(u8::from(self.previous.is_some()));
        out.extend_from_slice(self.previous.as_ref().map_or(&[0u8; SECRET_LEN][..], |p| &p[..]));
        out
    }

    fn decode(bytes: &[u8]) -> Option<Ratchet> {
        if bytes.len() != ENCODED_LEN || &bytes[..4] != MAGIC {
            return None;
        }
        let epoch = u64::from_be_bytes(bytes[4..12].try_into().ok()?);
        let secret =
            |at: usize| -> Option<Secret> { Some(Zeroizing::new(bytes[at..at + SECRET_LEN].try_into().ok()?)) };
        let previous = match bytes[12 + SECRET_LEN] {
            0 => None,
            1 => Some(secret(13 + SECRET_LEN)?),
            _ => return None,
        };
        Some(Ratchet {
            epoch,
            secret: secret(12)?,
            previous,
        })
    }
}

/// The keys in use for one epoch: the sealing key first, then the others that open tickets.
struct Active {
    epoch: u64,
    keys: Vec<Key>,
}

/// The ticketer: one per process, shared by every TLS listener's configuration.
pub struct TicketKeys {
    ratchet: Mutex<Ratchet>,
    /// `ticket_keys`: the file's key material; when set, it decides the keys.
    shared: Option<Prk>,
    active: RwLock<Active>,
    rng: SystemRandom,
}

impl std::fmt::Debug for TicketKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        let source = if self.shared.is_some() { "file" } else { "ratchet" };
        f.debug_struct("TicketKeys").field("source", &source).finish()
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl TicketKeys {
    /// The ticketer of a starting generation: the predecessor's ratchet from `inherited` (a
    /// sealed memfd, see [`TicketKeys::export`]) or a fresh one, and the shared key file if
    /// configured. A file that cannot be used is an error (the generation does not start); an
    /// inherited state that cannot be read is only logged: resumption starts over, service
    /// does not stop for it.
    pub fn start(inherited: Option<OwnedFd>, file: Option<&Path>) -> Result<TicketKeys, TicketError> {
        let rng = SystemRandom::new();
        let now = unix_now() / EPOCH_SECS;
        let ratchet = match inherited.map(|fd| import(&fd)) {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                warn!(
                    "cannot use the TLS ticket keys the previous generation passed ({e}): new keys, so tickets it issued are not resumed"
                );
                Ratchet::fresh(now, &rng)?
            }
            None => Ratchet::fresh(now, &rng)?,
        };
        let shared = file.map(read_shared).transpose()?;
        Ok(TicketKeys::with(ratchet, shared, now, rng))
    }

    fn with(mut ratchet: Ratchet, shared: Option<Prk>, epoch: u64, rng: SystemRandom) -> TicketKeys {
        ratchet.advance_to(epoch);
        let keys = keys_for(&ratchet, shared.as_ref(), epoch);
        TicketKeys {
            ratchet: Mutex::new(ratchet),
            shared,
            active: RwLock::new(Active { epoch, keys }),
            rng,
        }
    }

    /// Whether the keys come from a `ticket_keys` file.
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// The ratchet's state, advanced to now, in a sealed memfd (no one can change it after:
    /// `F_SEAL_WRITE`, `F_SEAL_SHRINK`, `F_SEAL_GROW`, `F_SEAL_SEAL`) for the successor.
    pub fn export(&self) -> io::Result<OwnedFd> {
        let encoded = {
            let mut ratchet = self
                .ratchet
                .lock()
                .map_err(|_| io::Error::other("ticket key lock poisoned"))?;
            ratchet.advance_to(unix_now() / EPOCH_SECS);
            ratchet.encode()
        };
        let fd = memfd_create(FD_NAME, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&encoded)?;
        let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL;
        fcntl(file.as_fd(), FcntlArg::F_ADD_SEALS(seals))?;
        Ok(OwnedFd::from(file))
    }

    /// Calls `f` with the keys of the epoch of `now` (unix seconds), moving to it first.
    fn with_keys<T>(&self, now: u64, f: impl FnOnce(&[Key]) -> T) -> Option<T> {
        let epoch = now / EPOCH_SECS;
        {
            let active = self.active.read().ok()?;
            if active.epoch == epoch {
                return Some(f(&active.keys));
            }
        }
        let mut active = self.active.write().ok()?;
        if active.epoch != epoch {
            let mut ratchet = self.ratchet.lock().ok()?;
            ratchet.advance_to(epoch);
            *active = Active {
                epoch,
                keys: keys_for(&ratchet, self.shared.as_ref(), epoch),
            };
        }
        Some(f(&active.keys))
    }

    fn seal_at(&self, now: u64, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        self.with_keys(now, |keys| {
            let key = keys.first()?;
            let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + TAG_LEN);
            out.extend_from_slice(&key.name);
            out.extend_from_slice(&nonce);
            out.extend_from_slice(plain);
            let tag = key
                .aead
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(key.name),
                    &mut out[NAME_LEN + NONCE_LEN..],
                )
                .ok()?;
            out.extend_from_slice(tag.as_ref());
            Some(out)
        })?
    }

    fn open_at(&self, now: u64, ticket: &[u8]) -> Option<Vec<u8>> {
        if ticket.len() > MAX_TICKET_LEN || ticket.len() < NAME_LEN + NONCE_LEN + TAG_LEN {
            return None;
        }
        let (name, rest) = ticket.split_at(NAME_LEN);
        let (nonce, sealed) = rest.split_at(NONCE_LEN);
        self.with_keys(now, |keys| {
            // The name says which key sealed it; it is not secret (every ticket shows it).
            let key = keys.iter().find(|k| k.name[..] == *name)?;
            let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
            let mut out = sealed.to_vec();
            let len = key
                .aead
                .open_in_place(nonce, Aad::from(&key.name), &mut out)
                .ok()?
                .len();
            out.truncate(len);
            Some(out)
        })?
    }
}

impl rustls::server::ProducesTickets for TicketKeys {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        EPOCH_SECS as u32
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.seal_at(unix_now(), plain)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.open_at(unix_now(), cipher)
    }
}

/// The keys of `epoch`: from the shared file (this epoch's, then the previous and the next,
/// for clocks of a fleet a little apart), else from the ratchet (current, previous).
fn keys_for(ratchet: &Ratchet, shared: Option<&Prk>, epoch: u64) -> Vec<Key> {
    let Some(prk) = shared else {
        return ratchet.keys();
    };
    [Some(epoch), epoch.checked_sub(1), epoch.checked_add(1)]
        .into_iter()
        .flatten()
        .map(|e| {
            let mut secret: Secret = Zeroizing::new([0u8; SECRET_LEN]);
            expand(prk, &[b"baton ticket epoch", &e.to_be_bytes()], &mut secret[..]);
            Key::derive(&secret)
        })
        .collect()
}

/// A `ticket_keys` file's content, extracted into a pseudo-random key.
fn read_shared(path: &Path) -> Result<Prk, TicketError> {
    let name = || path.display().to_string();
    let bytes = Zeroizing::new(std::fs::read(path).map_err(|source| TicketError::Read { path: name(), source })?);
    if bytes.len() < MIN_FILE_BYTES {
        return Err(TicketError::TooShort {
            path: name(),
            len: bytes.len(),
        });
    }
    Ok(Salt::new(hkdf::HKDF_SHA256, b"baton ticket keys v1").extract(&bytes))
}

/// Reads a predecessor's state; the memfd must be sealed against writes and resizing.
fn import(fd: &OwnedFd) -> io::Result<Ratchet> {
    let seals = SealFlag::from_bits_truncate(fcntl(fd.as_fd(), FcntlArg::F_GET_SEALS)?);
    let needed = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
    if !seals.contains(needed) {
        return Err(io::Error::other("the memfd is not sealed"));
    }
    let file = std::fs::File::from(fd.try_clone()?);
    let mut buf = Zeroizing::new(vec![0u8; ENCODED_LEN + 1]);
    // At offset 0: the file position is shared with the predecessor's descriptor.
    let n = file.read_at(&mut buf, 0)?;
    Ratchet::decode(&buf[..n]).ok_or_else(|| io::Error::other("not a ticket key state of this version"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn ratchet_keys(at: u64) -> TicketKeys {
        let rng = SystemRandom::new();
        let ratchet = Ratchet::fresh(at / EPOCH_SECS, &rng).unwrap();
        TicketKeys::with(ratchet, None, at / EPOCH_SECS, rng)
    }

    #[test]
    fn a_ticket_opens_for_its_epoch_and_the_next_only() {
        let keys = ratchet_keys(T0);
        let ticket = keys.seal_at(T0, b"session").unwrap();
        assert_eq!(keys.open_at(T0, &ticket).as_deref(), Some(&b"session"[..]));
        assert_eq!(keys.open_at(T0 + EPOCH_SECS, &ticket).as_deref(), Some(&b"session"[..]));
        let newer = keys.seal_at(T0 + EPOCH_SECS, b"later").unwrap();
        assert_ne!(
            newer[..NAME_LEN],
            ticket[..NAME_LEN],
            "a new epoch seals with a new key"
        );
        assert_eq!(
            keys.open_at(T0 + 2 * EPOCH_SECS, &ticket),
            None,
            "erased after two epochs"
        );
        assert_eq!(
            keys.open_at(T0 + 2 * EPOCH_SECS, &newer).as_deref(),
            Some(&b"later"[..])
        );
    }

    #[test]
    fn tampered_or_foreign_tickets_do_not_open() {
        let keys = ratchet_keys(T0);
        let mut ticket = keys.seal_at(T0, b"session").unwrap();
        let last = ticket.len() - 1;
        ticket[last] ^= 1;
        assert_eq!(keys.open_at(T0, &ticket), None);
        let other = ratchet_keys(T0);
        let foreign = other.seal_at(T0, b"session").unwrap();
        assert_eq!(keys.open_at(T0, &foreign), None);
        assert_eq!(keys.open_at(T0, &[0u8; 10]), None);
        assert_eq!(keys.open_at(T0, &vec![0u8; MAX_TICKET_LEN + 1]), None);
    }

    #[test]
    fn a_successor_with_the_exported_state_opens_and_rotates_alike() {
        let old = TicketKeys::start(None, None).unwrap();
        let now = unix_now();
        let ticket = old.seal_at(now, b"session").unwrap();
        let fd = old.export().unwrap();
        // The seals hold: the state cannot be rewritten after export.
        assert!(nix::unistd::write(&fd, b"x").is_err());
        let new = TicketKeys::start(Some(fd), None).unwrap();
        assert_eq!(new.open_at(now, &ticket).as_deref(), Some(&b"session"[..]));
        // Both derive the same next epoch's key.
        let later = now + EPOCH_SECS;
        let from_old = old.seal_at(later, b"x").unwrap();
        assert_eq!(new.open_at(later, &from_old).as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn an_unsealed_or_garbled_state_is_refused() {
        let fd = memfd_create("t", MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING).unwrap();
        nix::unistd::write(&fd, &[0u8; ENCODED_LEN]).unwrap();
        assert!(import(&fd).is_err(), "not sealed");
        let seals = SealFlag::F_SEAL_WRITE | SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW;
        fcntl(fd.as_fd(), FcntlArg::F_ADD_SEALS(seals)).unwrap();
        assert!(import(&fd).is_err(), "no magic");
        // Still a working ticketer: fresh keys.
        let keys = TicketKeys::start(Some(fd), None).unwrap();
        let t = keys.seal_at(T0, b"s").unwrap();
        assert!(keys.open_at(T0, &t).is_some());
    }

    #[test]
    fn a_shared_file_gives_a_fleet_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ticket.key");
        std::fs::write(&path, [7u8; 48]).unwrap();
        let a = TicketKeys::start(None, Some(&path)).unwrap();
        let b = TicketKeys::start(None, Some(&path)).unwrap();
        assert!(a.is_shared());
        let now = unix_now();
        let ticket = a.seal_at(now, b"session").unwrap();
        assert_eq!(b.open_at(now, &ticket).as_deref(), Some(&b"session"[..]));
        // A member whose clock is one epoch behind still opens it.
        let behind = b.seal_at(now - EPOCH_SECS, b"skew").unwrap();
        assert_eq!(a.open_at(now, &behind).as_deref(), Some(&b"skew"[..]));
        std::fs::write(&path, [7u8; 16]).unwrap();
        let err = TicketKeys::start(None, Some(&path)).unwrap_err().to_string();
        assert!(err.contains("ticket.key") && err.contains("16 bytes"), "{err}");
        let err = TicketKeys::start(None, Some(&dir.path().join("missing")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing"), "{err}");
    }
}
