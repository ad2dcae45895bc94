//! The CA of TLS inspection and the leaf certificates it signs for bumped tunnels. The CA
//! certificate and key are read when a generation starts (a successor reads the same files:
//! what its predecessor's clients trust, it signs with too); the key is checked like a TLS
//! listener's (owner-only mode, unless `secrets_readable_by_others`), never logged, and its
//! bytes are zeroized when dropped. A leaf is minted per server name on first use (ECDSA
//! P-256, SAN = the name, valid a week at most and never beyond the CA), and its server
//! configuration is kept in a bounded cache, the least recently used dropped first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SerialNumber,
    SignatureAlgorithm, SigningKey,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use zeroize::Zeroize as _;

use crate::config::Inspect;
use crate::tls::certs::{self, CertError};

/// How long a minted leaf is valid at most: short, so a leaf that leaks is soon worthless.
const LEAF_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// A leaf is minted anew when less than this is left of it.
const LEAF_RENEW: Duration = Duration::from_secs(24 * 3600);
/// Clocks of clients run behind: a leaf is valid from an hour before it was minted.
const LEAF_BACKDATE: Duration = Duration::from_secs(3600);

/// The CA and the leaves it minted.
pub struct Mint {
    issuer: Issuer<'static, CaKey>,
    ca_der: CertificateDer<'static>,
    pub ca: CaFacts,
    cache: Mutex<LeafCache>,
}

impl std::fmt::Debug for Mint {
    /// The CA's subject only: never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mint")
            .field("ca", &self.ca.subject)
            .finish_non_exhaustive()
    }
}

/// What an operator sees of the CA (`baton check`, the startup line).
#[derive(Debug, Clone)]
pub struct CaFacts {
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
}

impl CaFacts {
    /// How long it is valid from `now` (zero once expired).
    pub fn left(&self, now: SystemTime) -> Duration {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        Duration::from_secs(self.not_after.saturating_sub(now).max(0) as u64)
    }
}

/// The CA's key pair, zeroized when dropped (rcgen keeps its PKCS#8 bytes).
struct CaKey(KeyPair);

impl Drop for CaKey {
    fn drop(&mut self) {
        self.0.zeroize();
    }
}

impl PublicKeyData for CaKey {
    fn der_bytes(&self) -> &[u8] {
        self.0.der_bytes()
    }

    fn algorithm(&self) -> &'static SignatureAlgorithm {
        PublicKeyData::algorithm(&self.0)
    }
}

impl SigningKey for CaKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.0.sign(msg)
    }
}

/// Reads the CA certificate of `path` and checks that it is one: basicConstraints CA:TRUE
/// (a certificate without it cannot sign leaves any client accepts).
pub fn read_ca(path: &std::path::Path) -> Result<(CertificateDer<'static>, CaFacts), CertError> {
    let invalid = |what: String| CertError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    let chain = certs::read_chain(path)?;
    let der = chain
        .into_iter()
        .next()
        .ok_or_else(|| invalid("no certificate".into()))?;
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    let is_ca = cert.basic_constraints().ok().flatten().is_some_and(|b| b.value.ca);
    if !is_ca {
        return Err(invalid(
            "not a CA certificate (no basicConstraints CA:TRUE): it cannot sign the leaves of bumped tunnels".into(),
        ));
    }
    let facts = CaFacts {
        subject: cert.subject().to_string(),
        not_before: cert.validity().not_before.timestamp(),
        not_after: cert.validity().not_after.timestamp(),
    };
    Ok((der, facts))
}

impl Mint {
    /// Reads and checks `[inspect]`'s CA: a CA certificate, and a PKCS#8 key that matches it.
    pub fn load(inspect: &Inspect) -> Result<Mint, CertError> {
        let (ca_der, ca) = read_ca(&inspect.ca_cert)?;
        let invalid = |what: String| CertError::Invalid {
            path: inspect.ca_key.clone(),
            what,
        };
        let mut key = certs::read_key(&inspect.ca_key, inspect.ca_key_readable_by_others)?;
        let pair = KeyPair::try_from(&key);
        key.zeroize();
        let pair = pair.map_err(|_| {
            invalid("not a PKCS#8 ECDSA, Ed25519 or RSA key (convert it: openssl pkcs8 -topk8 -nocrypt)".into())
        })?;
        let key = CaKey(pair);
        let (_, cert) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| invalid(e.to_string()))?;
        if cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(CertError::Mismatch {
                cert: inspect.ca_cert.clone(),
                key: inspect.ca_key.clone(),
            });
        }
        let issuer = Issuer::from_ca_cert_der(&ca_der, key).map_err(|e| CertError::Invalid {
            path: inspect.ca_cert.clone(),
            what: format!("unusable as an issuer: {e}"),
        })?;
        Ok(Mint {
            issuer,
            ca_der,
            ca,
            cache: Mutex::new(LeafCache::new(inspect.leaf_cache)),
        })
    }

    /// The server side of a bumped tunnel to `name`: a leaf for it (from the cache, or minted
    /// now), ALPN `http/1.1` only. `minted`: whether it was minted now.
    pub fn server_config(&self, name: &str) -> Result<(Arc<ServerConfig>, bool), String> {
        let now = SystemTime::now();
        if let Some(config) = lock(&self.cache).get(name, now + LEAF_RENEW) {
            return Ok((config, false));
        }
        let (leaf, expires) = self.mint(name, now)?;
        let mut config = ServerConfig::builder_with_provider(certs::provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(SingleCertAndKey::from(leaf)));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        lock(&self.cache).put(name, config.clone(), expires);
        Ok((config, true))
    }

    /// A new leaf for `name`, with the CA behind it in the chain, and when it expires.
    fn mint(&self, name: &str, now: SystemTime) -> Result<(Arc<CertifiedKey>, SystemTime), String> {
        let ca_start = UNIX_EPOCH + Duration::from_secs(self.ca.not_before.max(0) as u64);
        let ca_end = UNIX_EPOCH + Duration::from_secs(self.ca.not_after.max(0) as u64);
        let not_before = (now - LEAF_BACKDATE).max(ca_start);
        let not_after = (now + LEAF_LIFETIME).min(ca_end);
        if not_after <= now {
            return Err("the inspection CA has expired: no leaf it signs is valid".into());
        }
        let mut params = CertificateParams::new(vec![name.to_string()]).map_err(|e| format!("{name}: {e}"))?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial()?);
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(|e| e.to_string())?;
        let cert = params.signed_by(&key, &self.issuer).map_err(|e| e.to_string())?;
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = certs::provider()
            .key_provider
            .load_private_key(der)
            .map_err(|e| e.to_string())?;
        let chain = vec![cert.der().clone(), self.ca_der.clone()];
        Ok((Arc::new(CertifiedKey::new(chain, signing)), not_after))
    }
}

/// 16 random bytes, positive (RFC 5280 §4.1.2.2: at most 20 octets, non-negative).
fn random_serial() -> Result<SerialNumber, String> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| "no randomness".to_string())?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Server configurations by name, at most `max`; each remembers when it was last used.
struct LeafCache {
    max: usize,
    by_name: HashMap<String, Cached>,
    clock: u64,
}

struct Cached {
    config: Arc<ServerConfig>,
    expires: SystemTime,
    used: u64,
}

impl LeafCache {
    fn new(max: usize) -> LeafCache {
        LeafCache {
            max: max.max(1),
            by_name: HashMap::new(),
            clock: 0,
        }
    }

    /// The configuration for `name` whose leaf is still valid at `until`.
    fn get(&mut self, name: &str, until: SystemTime) -> Option<Arc<ServerConfig>> {
        self.clock += 1;
        let entry = self.by_name.get_mut(name)?;
        if entry.expires <= until {
            self.by_name.remove(name);
            return None;
        }
        entry.used = self.clock;
        Some(entry.config.clone())
    }

    /// Keeps `config`, dropping the least recently used entry when full (a scan: minting the
    /// leaf that comes in costs far more than looking through the cache).
    fn put(&mut self, name: &str, config: Arc<ServerConfig>, expires: SystemTime) {
        self.clock += 1;
        if self.by_name.len() >= self.max
            && !self.by_name.contains_key(name)
            && let Some(oldest) = self.by_name.iter().min_by_key(|(_, c)| c.used).map(|(n, _)| n.clone())
        {
            self.by_name.remove(&oldest);
        }
        let used = self.clock;
        self.by_name.insert(name.to_string(), Cached { config, expires, used });
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_name.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Arc<ServerConfig> {
        Arc::new(
            ServerConfig::builder_with_provider(certs::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_cert_resolver(Arc::new(rustls::server::ResolvesServerCertUsingSni::new())),
        )
    }

    #[test]
    fn the_cache_is_bounded_and_drops_the_least_recently_used() {
        let now = SystemTime::now();
        let later = now + Duration::from_secs(3600);
        let mut cache = LeafCache::new(2);
        cache.put("a", config(), later);
        cache.put("b", config(), later);
        assert!(cache.get("a", now).is_some(), "a is cached");
        cache.put("c", config(), later);
        assert_eq!(cache.len(), 2, "bounded at 2");
        assert!(cache.get("b", now).is_none(), "b was the least recently used");
        assert!(cache.get("a", now).is_some() && cache.get("c", now).is_some());
        assert!(
            cache.get("a", later).is_none(),
            "a leaf that expires by then is minted anew"
        );
    }
}
