//! rustls server configuration: from PEM files, or a self-signed certificate made once and
//! kept in the data directory so that clients can pin it across restarts. The certificate can
//! be replaced while serving (`Reloader`, on `SIGHUP`), so a renewed one needs no restart.

use crate::secret::write_private_file;
use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use tokio_rustls::TlsAcceptor;

/// Why TLS could not be set up; each names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("certificate and key do not make a valid TLS config: {0}")]
    Config(String),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
}

/// A ready acceptor and facts about its certificate for the start-up message.
pub struct Tls {
    pub acceptor: TlsAcceptor,
    pub cert_path: PathBuf,
    /// SHA-256 of the leaf certificate's DER, as `AB:CD:…`.
    pub fingerprint: String,
    /// Swaps the certificate under the running acceptor (`SIGHUP`).
    pub reloader: Reloader,
}

/// The certificate the acceptor presents, replaceable while connections are served: the
/// handshakes after a reload get the new one, the connections already open keep theirs.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Re-reads the certificate and key files into the running acceptor.
#[derive(Clone, Debug)]
pub struct Reloader {
    current: Arc<Current>,
    cert_path: PathBuf,
    key_path: PathBuf,
}

impl Reloader {
    /// Loads both files again; on any error the certificate in use stays. Returns the new
    /// leaf's fingerprint.
    pub fn reload(&self) -> Result<String, TlsError> {
        let (key, fingerprint) = certified_key(&self.cert_path, &self.key_path)?;
        *self.current.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
        Ok(fingerprint)
    }

    /// The certificate file, for log lines.
    pub fn cert_path(&self) -> &Path {
        &self.cert_path
    }
}

/// Loads a certificate chain and private key from PEM files.
pub fn from_pem(cert_path: &Path, key_path: &Path) -> Result<Tls, TlsError> {
    let (key, fingerprint) = certified_key(cert_path, key_path)?;
    let current = Arc::new(Current(RwLock::new(Arc::new(key))));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_cert_resolver(current.clone());
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let reloader = Reloader { current, cert_path: cert_path.into(), key_path: key_path.into() };
    Ok(Tls {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        cert_path: cert_path.into(),
        fingerprint,
        reloader,
    })
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its key, checked to belong together, and the leaf's fingerprint.
fn certified_key(cert_path: &Path, key_path: &Path) -> Result<(CertifiedKey, String), TlsError> {
    let pem_err = |path: &Path| {
        let path = path.to_path_buf();
        move |e: rustls_pki_types::pem::Error| TlsError::Pem { path, message: e.to_string() }
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_path)
        .map_err(pem_err(cert_path))?
        .collect::<Result<_, _>>()
        .map_err(pem_err(cert_path))?;
    let leaf = certs.first().ok_or_else(|| TlsError::NoCertificate { path: cert_path.into() })?;
    let fingerprint = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| match encrypted(key_path) {
        true => TlsError::Pem {
            path: key_path.into(),
            message: "the key is encrypted with a passphrase, which edgechat cannot ask for: \
                      decrypt it once (`openssl pkey -in KEY -out KEY.plain`) and keep the plain \
                      key readable by edgechat only"
                .into(),
        },
        false => pem_err(key_path)(e),
    })?;
    let key = CertifiedKey::from_der(certs, key, &provider())
        .map_err(|e| TlsError::Config(e.to_string()))?;
    Ok((key, fingerprint))
}

/// Whether the PEM file at `path` holds a passphrase-protected key (PKCS#8's `ENCRYPTED
/// PRIVATE KEY`, or OpenSSL's legacy `Proc-Type: 4,ENCRYPTED`).
fn encrypted(path: &Path) -> bool {
    std::fs::read_to_string(path).is_ok_and(|pem| {
        pem.contains("ENCRYPTED PRIVATE KEY") || pem.contains("Proc-Type: 4,ENCRYPTED")
    })
}

/// Uses `dir/tls/{cert,key}.pem`, generating them on first use for localhost and loopback.
pub fn self_signed(dir: &Path) -> Result<Tls, TlsError> {
    let tls_dir = dir.join("tls");
    let (cert_path, key_path) = (tls_dir.join("cert.pem"), tls_dir.join("key.pem"));
    if !cert_path.exists() || !key_path.exists() {
        let names = vec!["localhost".to_string(), "127.0.0.1".to_string(), "::1".to_string()];
        let made = rcgen::generate_simple_self_signed(names)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        std::fs::create_dir_all(&tls_dir)
            .map_err(|source| TlsError::Write { path: tls_dir.clone(), source })?;
        let write = |path: &Path, pem: String| {
            write_private_file(path, pem.as_bytes())
                .map_err(|source| TlsError::Write { path: path.into(), source })
        };
        write(&key_path, made.key_pair.serialize_pem())?;
        write(&cert_path, made.cert.pem())?;
    }
    from_pem(&cert_path, &key_path)
}

fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let digest = Sha256::digest(cert.as_ref());
    digest.iter().map(|b| format!("{b:02X}")).collect::<Vec<_>>().join(":")
}
