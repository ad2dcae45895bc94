//! TLS for tests: a throw-away certificate authority that issues leaf certificates for
//! 127.0.0.1 and `localhost` with chosen serials and validity (PEM files for baton's `tls`
//! listener setting and for curl's `--proxy-cacert`), and the client side of a TLS
//! connection to the proxy ([`ProxyTls`]), which resumes sessions like a browser would.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, SerialNumber};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// A certificate authority of one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

/// A leaf certificate and its key, PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new() -> anyhow::Result<TestCa> {
        TestCa::named("baton test CA")
    }

    /// A CA whose subject's common name is `name` (two CAs of one test told apart).
    pub fn named(name: &str) -> anyhow::Result<TestCa> {
        TestCa::build(name, None)
    }

    /// A CA named `name` that expires at `not_after` (an expiry warning's case).
    pub fn named_until(name: &str, not_after: SystemTime) -> anyhow::Result<TestCa> {
        TestCa::build(name, Some(not_after))
    }

    fn build(name: &str, not_after: Option<SystemTime>) -> anyhow::Result<TestCa> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        if let Some(not_after) = not_after {
            params.not_before = time::OffsetDateTime::from(SystemTime::now() - Duration::from_secs(3600));
            params.not_after = time::OffsetDateTime::from(not_after);
        }
        let key = KeyPair::generate()?;
        let pem = params.self_signed(&key)?.pem();
        Ok(TestCa {
            issuer: Issuer::new(params, key),
            pem,
        })
    }

    /// A leaf for 127.0.0.1 and `localhost` with serial `serial` (openssl shows it in hex),
    /// valid from an hour ago until `valid` from now.
    pub fn leaf(&self, serial: u64, valid: Duration) -> anyhow::Result<Leaf> {
        let now = SystemTime::now();
        self.leaf_between(serial, now - Duration::from_secs(3600), now + valid)
    }

    /// A leaf (see [`TestCa::leaf`]) valid from `not_before` to `not_after`: expired ones,
    /// ones not valid yet.
    pub fn leaf_between(&self, serial: u64, not_before: SystemTime, not_after: SystemTime) -> anyhow::Result<Leaf> {
        self.leaf_for(&["127.0.0.1", "localhost"], serial, not_before, not_after)
    }

    /// A leaf for `names` (a leaf for another name than the server's, say).
    pub fn leaf_for(
        &self,
        names: &[&str],
        serial: u64,
        not_before: SystemTime,
        not_after: SystemTime,
    ) -> anyhow::Result<Leaf> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, "baton test proxy");
        let bytes = serial.to_be_bytes();
        let first = bytes.iter().position(|b| *b != 0).unwrap_or(7);
        params.serial_number = Some(SerialNumber::from_slice(&bytes[first..]));
        params.not_before = time::OffsetDateTime::from(not_before);
        params.not_after = time::OffsetDateTime::from(not_after);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes a leaf (see [`TestCa::leaf`]) as `<dir>/<name>.crt` and `<dir>/<name>.key`.
    pub fn write_leaf(
        &self,
        dir: &Path,
        name: &str,
        serial: u64,
        valid: Duration,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let leaf = self.leaf(serial, valid)?;
        let (cert, key) = (dir.join(format!("{name}.crt")), dir.join(format!("{name}.key")));
        std::fs::write(&cert, leaf.cert_pem)?;
        write_secret(&key, leaf.key_pem)?;
        Ok((cert, key))
    }

    /// Writes the CA's private key (PKCS#8 PEM) to `path`, mode 0600: baton's `[inspect]
    /// ca_key, when the test CA is the inspection CA.
    pub fn write_key(&self, path: &Path) -> io::Result<()> {
        write_secret(path, self.issuer.key().serialize_pem())
    }

    /// Writes the CA certificate to `path` (for `--proxy-cacert`, `-CAfile`).
    pub fn write_ca(&self, path: &Path) -> io::Result<()> {
        std::fs::write(path, &self.pem)
    }

    /// A client that trusts this CA and reaches the proxy as `127.0.0.1`, offering ALPN
    /// `http/1.1`.
    pub fn client(&self) -> anyhow::Result<ProxyTls> {
        self.client_offering(&[b"http/1.1"])
    }

    /// [`TestCa::client`] offering these ALPN protocols (`h2` for HTTP/2 to the proxy).
    pub fn client_offering(&self, alpn: &[&[u8]]) -> anyhow::Result<ProxyTls> {
        ProxyTls::trusting(&self.pem, alpn)
    }
}

impl ProxyTls {
    /// A client that trusts the certificates in `pem` (a CA, or a self-signed proxy
    /// certificate), reaches the proxy as `127.0.0.1` and offers `alpn`.
    pub fn trusting(pem: &str, alpn: &[&[u8]]) -> anyhow::Result<ProxyTls> {
        let config = client_config(pem, alpn)?;
        Ok(ProxyTls {
            connector: TlsConnector::from(Arc::new(config)),
            name: ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        })
    }
}

/// The client side of TLS to the proxy. Clones share one session cache, so new connections
/// resume earlier sessions (across handoffs too).
#[derive(Clone)]
pub struct ProxyTls {
    connector: TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for ProxyTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyTls").field("name", &self.name).finish()
    }
}

impl ProxyTls {
    /// The TLS handshake on a connected TCP stream.
    pub async fn connect(&self, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        self.connector.connect(self.name.clone(), tcp).await
    }

    /// The TLS handshake to the server `name` (an origin inside a tunnel, say).
    pub async fn connect_as(&self, name: &str, tcp: TcpStream) -> io::Result<TlsStream<TcpStream>> {
        let name = ServerName::try_from(name.to_string()).map_err(io::Error::other)?;
        self.connector.connect(name, tcp).await
    }
}

/// A rustls client configuration trusting only the certificates in `pem`, offering `alpn`.
pub fn client_config(pem: &str, alpn: &[&[u8]]) -> anyhow::Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// Writes a secret file (a private key, an htpasswd file) as baton wants one: mode 0600
/// (baton refuses a secret that others may read, unless `secrets_readable_by_others`).
pub fn write_secret(path: &Path, contents: impl AsRef<[u8]>) -> io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_ref())
}

/// The first bytes a rustls client sends for `server_name` (a name, or an address, for which
/// no SNI is sent): a real ClientHello, for tests of what a proxy reads from a tunnel.
pub fn client_hello(server_name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let server = ServerName::try_from(server_name.to_string()).expect("a server name or address");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), server).expect("a client connection");
    let mut out = Vec::new();
    conn.write_tls(&mut out).expect("writing to a Vec");
    out
}
