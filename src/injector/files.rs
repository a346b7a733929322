//! The injector's files that change under it: the serving certificate
//! and key (cert-manager rewrites them in a Secret volume, by swapping a
//! symlink) and the broker's trust bundle. Each is looked at (one `stat`
//! per file) when it is needed, on each TLS handshake or each review, and
//! read again only when its inode, size or time changed. A new version
//! that does not load keeps the old one in use and is logged once.

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What tells one version of a file from the next (the target of a
/// symlink: `metadata` follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    len: u64,
    modified: Option<std::time::SystemTime>,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        dev: m.dev(),
        ino: m.ino(),
        len: m.len(),
        modified: m.modified().ok(),
    })
}

/// Why a certificate, key or bundle did not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// Reading failed.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        error: String,
    },
    /// The contents are not what they must be.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong (never the key's bytes).
        problem: String,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, FileError> {
    let meta = std::fs::metadata(path).map_err(|e| FileError::Read {
        path: path.display().to_string(),
        error: e.to_string(),
    })?;
    if meta.len() > 1024 * 1024 {
        return Err(invalid(path, "larger than 1 MiB"));
    }
    std::fs::read(path).map_err(|e| FileError::Read {
        path: path.display().to_string(),
        error: e.to_string(),
    })
}

fn invalid(path: &Path, problem: impl Into<String>) -> FileError {
    FileError::Invalid {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

/// Loads a certificate chain and its key; the key must match the leaf.
///
/// # Errors
/// [`FileError`] naming the file (never showing the key).
pub fn load_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, FileError> {
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(cert, format!("not PEM certificates: {e}")))?;
    if chain.is_empty() {
        return Err(invalid(cert, "holds no certificate"));
    }
    let key_bytes = zeroize::Zeroizing::new(read(key)?);
    // The error is about the file's shape; its text never holds key bytes.
    let private = PrivateKeyDer::from_pem_slice(&key_bytes)
        .map_err(|e| invalid(key, format!("not a PEM private key: {e}")))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain, private, &provider)
        .map(Arc::new)
        .map_err(|e| invalid(key, format!("does not go with {}: {e}", cert.display())))
}

/// Checks a trust bundle's text: PEM, at least one certificate, each an
/// X.509 certificate.
///
/// # Errors
/// A message naming what is wrong.
pub fn check_bundle(pem: &str) -> Result<(), String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("not PEM certificates: {e}"))?;
    if certs.is_empty() {
        return Err("holds no certificate".into());
    }
    for (i, der) in certs.iter().enumerate() {
        x509_parser::parse_x509_certificate(der)
            .map_err(|e| format!("certificate {} is not X.509: {e}", i + 1))?;
    }
    Ok(())
}

/// Reads and checks a trust bundle file.
///
/// # Errors
/// [`FileError`].
pub fn load_bundle(path: &Path) -> Result<String, FileError> {
    let text = String::from_utf8(read(path)?).map_err(|_| invalid(path, "not UTF-8"))?;
    check_bundle(&text).map_err(|p| invalid(path, p))?;
    Ok(text)
}

/// A file's loaded value, re-loaded when the file changes.
struct Watched<T> {
    stamps: Vec<Option<Stamp>>,
    value: T,
}

/// The serving certificate: a [`ResolvesServerCert`] that looks at the
/// files on each handshake. Open connections keep the certificate they
/// were made with.
pub struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Watched<Arc<CertifiedKey>>>,
}

impl std::fmt::Debug for ReloadingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingCert")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl ReloadingCert {
    /// Loads the pair once.
    ///
    /// # Errors
    /// [`FileError`]: without a first pair there is nothing to serve.
    pub fn new(cert: PathBuf, key: PathBuf) -> Result<Self, FileError> {
        let stamps = vec![stamp(&cert), stamp(&key)];
        let value = load_pair(&cert, &key)?;
        Ok(Self {
            cert,
            key,
            current: Mutex::new(Watched { stamps, value }),
        })
    }

    /// The pair to present now: reloaded first when either file changed.
    pub fn current(&self) -> Arc<CertifiedKey> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamps = vec![stamp(&self.cert), stamp(&self.key)];
        if stamps != current.stamps {
            // Seen either way: a broken pair is reported once, and tried
            // again when a file changes again (the key written after the
            // certificate, say).
            current.stamps = stamps;
            match load_pair(&self.cert, &self.key) {
                Ok(pair) => {
                    current.value = pair;
                    tracing::info!(cert = %self.cert.display(), "loaded a new serving certificate");
                }
                Err(e) => {
                    tracing::error!(error = %e, "the new serving certificate does not load; keeping the one in use");
                }
            }
        }
        Arc::clone(&current.value)
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The trust bundle file, re-read when it changes.
pub struct ReloadingBundle {
    path: PathBuf,
    current: Mutex<Watched<Arc<str>>>,
}

impl std::fmt::Debug for ReloadingBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadingBundle")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl ReloadingBundle {
    /// Loads the bundle once.
    ///
    /// # Errors
    /// [`FileError`].
    pub fn new(path: PathBuf) -> Result<Self, FileError> {
        let stamps = vec![stamp(&path)];
        let value = Arc::from(load_bundle(&path)?);
        Ok(Self {
            path,
            current: Mutex::new(Watched { stamps, value }),
        })
    }

    /// The bundle now, and whether it changed since the last call.
    pub fn current(&self) -> (Arc<str>, bool) {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamps = vec![stamp(&self.path)];
        if stamps == current.stamps {
            return (Arc::clone(&current.value), false);
        }
        current.stamps = stamps;
        match load_bundle(&self.path) {
            Ok(text) => {
                current.value = Arc::from(text);
                tracing::info!(path = %self.path.display(), "loaded a new trust bundle for injected sidecars");
                (Arc::clone(&current.value), true)
            }
            Err(e) => {
                tracing::error!(error = %e, "the new trust bundle does not load; injecting the one in use");
                (Arc::clone(&current.value), false)
            }
        }
    }
}

/// A TLS server configuration for the webhook: TLS 1.2 and 1.3 (the API
/// server is the client), HTTP/1.1 and HTTP/2, the reloading certificate.
///
/// # Errors
/// If rustls refuses the protocol versions (it does not for these).
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
