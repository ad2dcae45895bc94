//! `[inspect]`: TLS inspection of the tunnels a `bump` rule names (`proxy::bump`). The CA
//! that signs the leaves baton mints (its key a secret file, as a TLS listener's), the roots
//! origins are verified against, and how many minted leaves are kept. Here they are only
//! paths and numbers; `tls::mint` and `tls::origin` read the files when a generation starts.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::resolve;

/// `[inspect]` validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inspect {
    /// The CA certificate (PEM) whose key signs the minted leaves.
    pub ca_cert: PathBuf,
    /// Its private key (PEM, PKCS#8): held to [`super::check_secret_mode`].
    pub ca_key: PathBuf,
    /// `secrets_readable_by_others`: a key others may read is used, with a warning.
    pub ca_key_readable_by_others: bool,
    pub origin_roots: OriginRoots,
    /// Minted leaves kept (least recently used dropped first).
    pub leaf_cache: usize,
}

/// What origins' certificates are verified against. There is no way to skip the check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum OriginRoots {
    /// The system's trust store (rustls-native-certs: `/etc/ssl/certs` on Debian).
    #[default]
    System,
    /// PEM files of trusted CA certificates.
    Files(Vec<PathBuf>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInspect {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    #[serde(default)]
    origin_roots: Option<RawRoots>,
    #[serde(default = "default_leaf_cache")]
    leaf_cache: usize,
}

/// Roots as written: `"system"` or a list of PEM files (`[upstream] roots` too).
#[derive(Deserialize, Clone)]
#[serde(untagged)]
pub(super) enum RawRoots {
    Word(String),
    Files(Vec<PathBuf>),
}

/// Enough for the sites a site's users visit in a day; a leaf is about 1 KiB with its key.
fn default_leaf_cache() -> usize {
    1000
}

/// Roots from `raw` (absent: the system's store), files resolved against `base`; errors
/// name `key`.
pub(super) fn roots(raw: Option<RawRoots>, base: Option<&Path>, key: &str) -> Result<OriginRoots, String> {
    match raw {
        None => Ok(OriginRoots::System),
        Some(RawRoots::Word(w)) if w == "system" => Ok(OriginRoots::System),
        Some(RawRoots::Word(w)) => Err(format!("{key} = {w:?}: give \"system\" or a list of PEM files")),
        Some(RawRoots::Files(files)) if files.is_empty() => Err(format!(
            "{key} is an empty list, which no server would pass: give \"system\" or PEM files"
        )),
        Some(RawRoots::Files(files)) => Ok(OriginRoots::Files(
            files.into_iter().map(|p| resolve(base, p)).collect(),
        )),
    }
}

/// `[inspect]` with its paths resolved against `base`; errors name the key.
pub(super) fn inspect(raw: RawInspect, base: Option<&Path>, secrets_readable: bool) -> Result<Inspect, String> {
    let origin_roots = roots(raw.origin_roots, base, "[inspect] origin_roots")?;
    if raw.leaf_cache == 0 {
        return Err("[inspect] leaf_cache = 0: at least 1 (every bumped connection would mint anew)".into());
    }
    Ok(Inspect {
        ca_cert: resolve(base, raw.ca_cert),
        ca_key: resolve(base, raw.ca_key),
        ca_key_readable_by_others: secrets_readable,
        origin_roots,
        leaf_cache: raw.leaf_cache,
    })
}
