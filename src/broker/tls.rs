//! TLS for the broker's listeners: one server certificate, issued by the
//! broker's own CA and renewed in place (no restart), and client
//! certificates verified against the trust bundle when sent. Both the
//! gRPC and the HTTPS listener use it.

use super::Broker;
use crate::ca::Credential;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::{Arc, RwLock};

/// Lifetime of the broker's server certificates.
pub const SERVER_CERT_TTL: u64 = 7 * 86_400;

/// The broker's current server certificate, swapped whole on renewal.
#[derive(Debug)]
pub struct ServerCerts {
    dns: Vec<String>,
    ips: Vec<std::net::IpAddr>,
    current: RwLock<(Arc<CertifiedKey>, u64)>,
}

impl ServerCerts {
    /// Issues the first certificate for these names.
    ///
    /// # Errors
    /// If the CA cannot issue or the result does not load.
    pub fn new(
        broker: &Broker,
        dns: Vec<String>,
        ips: Vec<std::net::IpAddr>,
    ) -> Result<Self, String> {
        let first = issue(broker, &dns, &ips)?;
        Ok(Self {
            dns,
            ips,
            current: RwLock::new(first),
        })
    }

    /// When the current certificate expires.
    pub fn expires_at(&self) -> u64 {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .1
    }

    /// Issues a new certificate when less than half of the current one's
    /// life is left. New handshakes use it; open connections keep theirs.
    /// Returns whether it renewed.
    ///
    /// # Errors
    /// If the CA cannot issue.
    pub fn renew_if_due(&self, broker: &Broker, now: u64) -> Result<bool, String> {
        if self.expires_at().saturating_sub(now) > SERVER_CERT_TTL / 2 {
            return Ok(false);
        }
        self.renew_now(broker)?;
        Ok(true)
    }

    /// Issues a new certificate now (after the intermediate changed).
    ///
    /// # Errors
    /// If the CA cannot issue.
    pub fn renew_now(&self, broker: &Broker) -> Result<(), String> {
        let next = issue(broker, &self.dns, &self.ips)?;
        tracing::info!(
            expires_at = next.1,
            "renewed the broker's server certificate"
        );
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = next;
        Ok(())
    }
}

impl ResolvesServerCert for ServerCerts {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self
                .current
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .0,
        ))
    }
}

fn issue(
    broker: &Broker,
    dns: &[String],
    ips: &[std::net::IpAddr],
) -> Result<(Arc<CertifiedKey>, u64), String> {
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
    Ok((Arc::new(certified), credential.expires_at))
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
    Ok(Arc::new(config))
}
