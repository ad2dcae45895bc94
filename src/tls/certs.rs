//! A TLS listener's certificate chain and private key: read from their PEM files (at every
//! generation's start, so a handoff reloads them), checked (the key matches the certificate,
//! the validity period), and made into rustls' server configuration. Errors name the file.

use std::io::Read as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::ServerConfig;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::ProducesTickets;
use rustls::sign::{CertifiedKey, SingleCertAndKey};

use crate::config::{TlsFiles, check_secret_mode};

/// Under this much validity left, `baton check` and the startup line warn.
pub const EXPIRY_WARNING: Duration = Duration::from_secs(14 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("the private key in {key} does not match the certificate in {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// A loaded certificate chain with its key, and what an operator wants to see of it.
#[derive(Debug)]
pub struct Certificate {
    pub key: Arc<CertifiedKey>,
    /// The leaf's serial number, hex with colons (as `openssl x509 -serial` prints it, in
    /// lower case).
    pub serial: String,
    pub subject: String,
    pub not_before: i64,
    pub not_after: i64,
}

/// Where a certificate stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    NotYetValid,
    Valid { left: Duration },
    Expired { ago: Duration },
}

/// rustls' *ring* provider: the one crypto backend baton builds with.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads and checks `files`: a PEM chain (leaf first) and a PEM private key (PKCS#8, PKCS#1
/// or SEC1) that matches the leaf.
pub fn load(files: &TlsFiles) -> Result<Certificate, CertError> {
    let chain = read_chain(&files.cert)?;
    let key = read_key(&files.key, files.key_readable_by_others)?;
    let invalid = |path: &Path, what: String| CertError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    let (serial, subject, not_before, not_after) = describe(&chain[0]).map_err(|e| invalid(&files.cert, e))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| invalid(&files.key, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            return Err(CertError::Mismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            });
        }
        Err(e) => return Err(invalid(&files.cert, e.to_string())),
    }
    Ok(Certificate {
        key: Arc::new(certified),
        serial,
        subject,
        not_before,
        not_after,
    })
}

fn read(path: &Path) -> Result<zeroize::Zeroizing<Vec<u8>>, CertError> {
    std::fs::read(path)
        .map(zeroize::Zeroizing::new)
        .map_err(|source| CertError::Read {
            path: path.to_path_buf(),
            source,
        })
}

pub(crate) fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let pem = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| CertError::Invalid {
            path: path.to_path_buf(),
            what: format!("not PEM: {e}"),
        })?;
    if chain.is_empty() {
        return Err(CertError::Invalid {
            path: path.to_path_buf(),
            what: "no certificate in it (a PEM `BEGIN CERTIFICATE` block)".into(),
        });
    }
    Ok(chain)
}

/// `readable_by_others`: `secrets_readable_by_others` (else a key others may read is
/// refused, as ssh refuses one).
pub(crate) fn read_key(path: &Path, readable_by_others: bool) -> Result<PrivateKeyDer<'static>, CertError> {
    let read_error = |source| CertError::Read {
        path: path.to_path_buf(),
        source,
    };
    // The mode of the file read, not of whatever the path names a moment later.
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let mode = file.metadata().map_err(read_error)?.permissions().mode();
    check_secret_mode(path, mode, readable_by_others).map_err(|what| CertError::Invalid {
        path: path.to_path_buf(),
        what,
    })?;
    let mut pem = zeroize::Zeroizing::new(Vec::new());
    file.read_to_end(&mut pem).map_err(read_error)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|e| CertError::Invalid {
        path: path.to_path_buf(),
        what: match e {
            rustls::pki_types::pem::Error::NoItemsFound => {
                "no private key in it (a PEM `BEGIN PRIVATE KEY`, `RSA PRIVATE KEY` or `EC PRIVATE KEY` block)".into()
            }
            e => format!("not PEM: {e}"),
        },
    })
}

/// The leaf's serial, subject and validity (unix seconds).
fn describe(leaf: &CertificateDer<'_>) -> Result<(String, String, i64, i64), String> {
    let (_, cert) = x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let validity = cert.validity();
    Ok((
        cert.raw_serial_as_string(),
        cert.subject().to_string(),
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    ))
}

impl Certificate {
    pub fn validity_at(&self, now: SystemTime) -> Validity {
        let now = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64);
        if now < self.not_before {
            Validity::NotYetValid
        } else if now > self.not_after {
            Validity::Expired {
                ago: Duration::from_secs((now - self.not_after) as u64),
            }
        } else {
            Validity::Valid {
                left: Duration::from_secs((self.not_after - now) as u64),
            }
        }
    }

    /// The moment it expires, as RFC 3339 (UTC).
    pub fn not_after_text(&self) -> String {
        humantime_serde::re::humantime::format_rfc3339_seconds(
            UNIX_EPOCH + Duration::from_secs(self.not_after.max(0) as u64),
        )
        .to_string()
    }
}

/// The server side of a TLS listener: rustls' safe defaults (TLS 1.3 and 1.2, AEAD suites
/// with forward secrecy only), ALPN `alpn` in that order of preference (a client that
/// offers none of them is refused; one that offers no ALPN at all speaks HTTP/1.1), no
/// client certificates, no 0-RTT, and session tickets from `tickets`.
pub fn server_config(
    cert: &Certificate,
    alpn: &[crate::config::Alpn],
    tickets: Arc<dyn ProducesTickets>,
) -> Result<Arc<ServerConfig>, rustls::Error> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SingleCertAndKey::from(cert.key.clone())));
    config.alpn_protocols = alpn.iter().map(|a| a.id().to_vec()).collect();
    config.ticketer = tickets;
    // A connection at rest gives its TLS 1.3 keys to the next generation at a handoff
    // (`tls::moving`); they leave this process only through the transfer's channel.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}
