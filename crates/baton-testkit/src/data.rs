//! The deterministic bodies the origin serves and uploads are built from, and their hash.

use sha2::{Digest, Sha256};

/// The byte at offset `i` of every generated body: cheap, deterministic, not all-equal.
pub fn pattern_byte(i: u64) -> u8 {
    ((i.wrapping_mul(31) + 7) % 251) as u8
}

/// The first `n` bytes of the pattern: what `GET /bytes?n=N` and `/chunked?n=N` answer.
pub fn pattern(n: usize) -> Vec<u8> {
    (0..n as u64).map(pattern_byte).collect()
}

/// The lowercase hex SHA-256 of `data`, as `POST /sha256` reports it.
pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}
