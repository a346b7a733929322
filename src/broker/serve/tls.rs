//! TLS for the broker's listeners: one server certificate, issued by the
//! broker's own CA and renewed in place (no restart), and client
//! certificates verified against the trust bundle when sent. Both the
//! gRPC and the HTTPS listener use it.

use crate::broker::Broker;
use crate::ca::{Authority, Credential};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::{Arc, RwLock};

/// Lifetime of the broker's server certificates.
pub const SERVER_CERT_TTL: u64 = 7 * 86_400;

/// The broker's current server certificate, swapped whole on renewal.
///
/// Renewal needs no task: each handshake asks [`ServerCerts::current`],
/// which issues a new certificate when less than half of the current
/// one's life is left or when the broker's intermediate changed (so the
/// chain always ends at the intermediate that signs now). Open
/// connections keep the certificate they were made with.
pub struct ServerCerts {
    broker: Arc<Broker>,
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
    current: RwLock<Issued>,
    /// When (broker clock, seconds) a handshake's renewal last failed: the
    /// next handshakes do not try again, and log again, for a minute.
    failed_at: std::sync::atomic::AtomicU64,
}

/// How long handshakes wait after a failed renewal before trying again.
const RENEW_RETRY: u64 = 60;

/// One issued certificate.
struct Issued {
    key: Arc<CertifiedKey>,
    expires_at: u64,
    /// The CA it chains to: another one means the intermediate rotated.
    under: Arc<Authority>,
}

impl std::fmt::Debug for ServerCerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCerts")
            .field("dns", &self.dns)
            .field("ips", &self.ips)
            .field("expires_at", &self.expires_at())
            .finish_non_exhaustive()
    }
}

impl ServerCerts {
    /// Issues the first certificate for these names.
    ///
    /// # Errors
    /// If the CA cannot issue or the result does not load.
    pub fn new(
        broker: Arc<Broker>,
        dns: Vec<String>,
        ips: Vec<std::net::IpAddr>,
    ) -> Result<Self, String> {
        let first = issue(&broker, &dns, &ips)?;
        Ok(Self {
            broker,
            dns,
            ips,
            current: RwLock::new(first),
            failed_at: std::sync::atomic::AtomicU64::new(0),
        })
    }

    /// When the current certificate expires.
    pub fn expires_at(&self) -> u64 {
        self.read().expires_at
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Issued> {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Issues a new certificate when less than half of the current one's
    /// life is left, or when the intermediate changed. Returns whether it
    /// renewed.
    ///
    /// # Errors
    /// If the CA cannot issue.
    pub fn renew_if_due(&self) -> Result<bool, String> {
        let now = self.broker.now();
        let due = |issued: &Issued| {
            issued.expires_at.saturating_sub(now) <= SERVER_CERT_TTL / 2
                || !Arc::ptr_eq(&issued.under, &self.broker.ca())
        };
        if !due(&self.read()) {
            return Ok(false);
        }
        let mut current = self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Another handshake may have renewed it meanwhile.
        if !due(&current) {
            return Ok(false);
        }
        *current = issue(&self.broker, &self.dns, &self.ips)?;
        tracing::info!(
            expires_at = current.expires_at,
            "renewed the broker's server certificate"
        );
        Ok(true)
    }

    /// The certificate to present now, renewed first when due.
    fn current(&self) -> Arc<CertifiedKey> {
        use std::sync::atomic::Ordering;
        let now = self.broker.now();
        let failed_at = self.failed_at.load(Ordering::Relaxed);
        if (failed_at == 0 || now.saturating_sub(failed_at) >= RENEW_RETRY)
            && let Err(e) = self.renew_if_due()
        {
            // The current one stays in use while it is valid; a flood of
            // handshakes does not make a flood of attempts or log lines.
            self.failed_at.store(now.max(1), Ordering::Relaxed);
            tracing::error!(error = %e, retry_in_s = RENEW_RETRY, "renewing the broker's server certificate failed");
        }
        Arc::clone(&self.read().key)
    }
}

impl ResolvesServerCert for ServerCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

fn issue(broker: &Broker, dns: &[String], ips: &[std::net::IpAddr]) -> Result<Issued, String> {
    let under = broker.ca();
    let credential: Credential = broker
        .server_credential(dns, ips)
        .map_err(|e| format!("issuing the server certificate: {e}"))?;
    let chain = CertificateDer::pem_slice_iter(credential.cert_chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("server certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(credential.key_pem.as_bytes())
        .map_err(|e| format!("server key: {e}"))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let certified = CertifiedKey::from_der(chain, key, &provider)
        .map_err(|e| format!("server certificate: {e}"))?;
    Ok(Issued {
        key: Arc::new(certified),
        expires_at: credential.expires_at,
        under,
    })
}

/// A rustls server configuration: the renewing certificate, client
/// certificates optional at the TLS layer but verified against the trust
/// bundle when sent, and these ALPN protocols.
///
/// # Errors
/// If the bundle does not load.
pub fn server_config(
    broker: &Broker,
    certs: Arc<ServerCerts>,
    alpn: &[&[u8]],
) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for der in broker.ca().bundle_der() {
        roots
            .add(CertificateDer::from(der))
            .map_err(|e| format!("trust bundle: {e}"))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::clone(&provider),
    )
    .allow_unauthenticated()
    .build()
    .map_err(|e| format!("client verifier: {e}"))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS versions: {e}"))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certs);
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // A resumed session would bring back a client certificate without
    // checking it again (an expired SVID could still renew itself).
    crate::sidecar::mtls::no_resumption(&mut config);
    Ok(Arc::new(config))
}
