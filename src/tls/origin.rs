//! TLS from baton to the origins of bumped tunnels and to `https://` parents: the roots
//! their certificates are verified against (`[inspect] origin_roots`, `[upstream] roots`:
//! the system's store, or PEM files), ALPN `http/1.1` only (what baton speaks to them).
//! There is no way to skip verification: a server that fails it is a 502 naming the reason.

use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

use crate::config::OriginRoots;
use crate::tls::certs::{self, CertError};

/// The connector for origins, verifying against `roots`.
pub fn connector(roots: &OriginRoots) -> Result<TlsConnector, CertError> {
    let store = match roots {
        OriginRoots::System => system_roots()?,
        OriginRoots::Files(files) => {
            let mut store = RootCertStore::empty();
            for path in files {
                for cert in certs::read_chain(path)? {
                    store.add(cert).map_err(|e| CertError::Invalid {
                        path: path.clone(),
                        what: format!("not a usable root certificate: {e}"),
                    })?;
                }
            }
            store
        }
    };
    let mut config = ClientConfig::builder_with_provider(certs::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| CertError::Invalid {
            path: "[inspect]".into(),
            what: e.to_string(),
        })?
        .with_root_certificates(store)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// The system's trust store; certificates in it that rustls cannot use are skipped (Debian's
/// bundle has a few), an empty result is an error.
fn system_roots() -> Result<RootCertStore, CertError> {
    let found = rustls_native_certs::load_native_certs();
    let mut store = RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = found.certs;
    let (added, _skipped) = store.add_parsable_certificates(certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "no certificates found".to_string(), ToString::to_string);
        return Err(CertError::Invalid {
            path: "the system's trust store (roots = \"system\")".into(),
            what: format!("the system's trust store is empty ({why}): install ca-certificates, or list PEM files"),
        });
    }
    Ok(store)
}
