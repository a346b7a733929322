//! Mutual TLS between sidecars: the rustls configurations both proxies
//! use, built from the sidecar's current X.509-SVID (whose key is also its
//! DPoP key) and the trust bundle.
//!
//! - The **inbound** port serves TLS 1.3 with the SVID, ALPN `h2` and
//!   `http/1.1`; a client certificate is verified against the bundle when
//!   sent, and demanded with `--inbound-mtls required`.
//! - The **outbound** proxy dials a mesh destination with TLS 1.3 and its
//!   SVID as client certificate, ALPN `h2`, and accepts the server only if
//!   its certificate chains to the bundle *and* its one URI SAN is exactly
//!   the SPIFFE ID the service map names ([`SpiffeServerVerifier`]). No DNS
//!   name is checked: SVIDs name workloads, not hosts, and the address is
//!   only where to find the workload.
//!
//! [`MeshTls::current`] hands out one [`MeshCredentials`] per (SVID,
//! bundle): a new one after every renewal or bundle change, so holders
//! (the outbound connection pool) can tell when to reconnect by pointer.

use super::identity::Svid;
use super::watch::MeshState;
use crate::identity::SpiffeId;
use crate::jose::{Jkt, SigningKey};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::{Arc, RwLock};
use tokio::sync::watch;

/// ALPN protocol ids.
const H2: &[u8] = b"h2";
const HTTP11: &[u8] = b"http/1.1";

/// Whether the inbound port demands mutual TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum InboundMtls {
    /// TLS (with or without a client certificate) and plaintext side by
    /// side, told apart by the first byte.
    #[default]
    Optional,
    /// Only TLS with a client certificate that chains to the bundle;
    /// plaintext requests are refused with an error saying so.
    Required,
}

impl std::str::FromStr for InboundMtls {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "optional" => Ok(Self::Optional),
            "required" => Ok(Self::Required),
            other => Err(format!("{other:?} is not optional or required")),
        }
    }
}

impl std::fmt::Display for InboundMtls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Optional => "optional",
            Self::Required => "required",
        })
    }
}

/// Why TLS settings could not be made from the SVID or bundle.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MtlsError {
    /// The SVID's chain or key does not load.
    #[error("the X.509-SVID does not load: {0}")]
    Svid(String),
    /// The trust bundle does not load (or is empty).
    #[error("the trust bundle does not load: {0}")]
    Bundle(String),
    /// rustls refused the settings.
    #[error("TLS settings: {0}")]
    Settings(String),
}

/// The TLS material of one SVID under one bundle.
pub struct MeshCredentials {
    svid: Arc<Svid>,
    bundle: Vec<Vec<u8>>,
    jkt: Jkt,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<CertifiedKey>,
    roots: Arc<RootCertStore>,
    provider: Arc<CryptoProvider>,
    optional: Arc<rustls::ServerConfig>,
    required: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for MeshCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCredentials")
            .field("spiffe_id", &self.svid.spiffe_id)
            .field("jkt", &self.jkt)
            .finish_non_exhaustive()
    }
}

impl MeshCredentials {
    /// Builds the settings for `svid` trusting `bundle` (DER roots).
    ///
    /// # Errors
    /// [`MtlsError`].
    pub fn new(svid: Arc<Svid>, bundle: Vec<Vec<u8>>) -> Result<Self, MtlsError> {
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let chain = CertificateDer::pem_slice_iter(svid.chain_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MtlsError::Svid(e.to_string()))?;
        if chain.is_empty() {
            return Err(MtlsError::Svid("no certificate".into()));
        }
        let private = PrivateKeyDer::from_pem_slice(svid.key_pem.as_bytes())
            .map_err(|_| MtlsError::Svid("the key is not PEM".into()))?;
        let key = Arc::new(
            CertifiedKey::from_der(chain.clone(), private, &provider)
                .map_err(|e| MtlsError::Svid(e.to_string()))?,
        );
        let jkt = SigningKey::from_pkcs8_pem(svid.key_pem.as_bytes())
            .map_err(|e| MtlsError::Svid(e.to_string()))?
            .thumbprint();
        let mut roots = RootCertStore::empty();
        for der in &bundle {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|e| MtlsError::Bundle(e.to_string()))?;
        }
        if roots.is_empty() {
            return Err(MtlsError::Bundle("no root certificate".into()));
        }
        let roots = Arc::new(roots);
        let server = |required: bool| -> Result<Arc<rustls::ServerConfig>, MtlsError> {
            let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::clone(&roots),
                Arc::clone(&provider),
            );
            let builder = if required {
                builder
            } else {
                builder.allow_unauthenticated()
            };
            let verifier = builder
                .build()
                .map_err(|e| MtlsError::Settings(e.to_string()))?;
            let mut config = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
                .with_protocol_versions(&[&rustls::version::TLS13])
                .map_err(|e| MtlsError::Settings(e.to_string()))?
                .with_client_cert_verifier(verifier)
                .with_cert_resolver(Arc::new(Fixed(Arc::clone(&key))));
            config.alpn_protocols = vec![H2.to_vec(), HTTP11.to_vec()];
            no_resumption(&mut config);
            Ok(Arc::new(config))
        };
        Ok(Self {
            optional: server(false)?,
            required: server(true)?,
            svid,
            bundle,
            jkt,
            chain,
            key,
            roots,
            provider,
        })
    }

    /// The SVID these settings present.
    pub fn svid(&self) -> &Arc<Svid> {
        &self.svid
    }

    /// The thumbprint of the SVID's key (the DPoP key tokens are bound to).
    pub fn jkt(&self) -> &Jkt {
        &self.jkt
    }

    /// The inbound port's TLS settings.
    pub fn server_config(&self, mode: InboundMtls) -> Arc<rustls::ServerConfig> {
        match mode {
            InboundMtls::Optional => Arc::clone(&self.optional),
            InboundMtls::Required => Arc::clone(&self.required),
        }
    }

    /// Client settings for dialling the workload `server`: this SVID as
    /// client certificate, TLS 1.3, ALPN `h2`, and the server accepted
    /// only with an SVID for exactly `server`.
    ///
    /// # Errors
    /// [`MtlsError::Settings`].
    pub fn client_config(&self, server: &SpiffeId) -> Result<Arc<rustls::ClientConfig>, MtlsError> {
        let verifier = Arc::new(SpiffeServerVerifier {
            roots: Arc::clone(&self.roots),
            expected: server.clone(),
            provider: Arc::clone(&self.provider),
        });
        let private = PrivateKeyDer::from_pem_slice(self.svid.key_pem.as_bytes())
            .map_err(|_| MtlsError::Svid("the key is not PEM".into()))?;
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::clone(&self.provider))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| MtlsError::Settings(e.to_string()))?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), private)
            .map_err(|e| MtlsError::Settings(e.to_string()))?;
        config.alpn_protocols = vec![H2.to_vec()];
        // Every connection a full handshake (see `no_resumption`).
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(config))
    }

    /// The certified key presented (for tests and the admin port).
    pub fn certified_key(&self) -> &Arc<CertifiedKey> {
        &self.key
    }
}

/// No TLS session resumption, stateful or by ticket. A resumed TLS 1.3
/// session restores the client chain of the handshake it resumes without
/// a new `CertificateVerify` and without checking the chain's dates
/// again: holding the session secret would stand in for holding the SVID
/// key, even past the SVID's expiry. Every mesh connection is a full
/// handshake, so a token bound to the peer's key is proven by a signature
/// made for that connection. (The outbound pool keeps one long-lived
/// connection per destination, so this costs one handshake per
/// reconnection.)
pub fn no_resumption(config: &mut rustls::ServerConfig) {
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.ticketer = Arc::new(NeverTickets);
}

/// A ticketer that never issues tickets.
#[derive(Debug)]
struct NeverTickets;

impl rustls::server::ProducesTickets for NeverTickets {
    fn enabled(&self) -> bool {
        false
    }

    fn lifetime(&self) -> u32 {
        0
    }

    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }

    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// Always the same certificate (a config is rebuilt on renewal).
#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }
}

/// The sidecar's TLS material, following its SVID and the Watch stream's
/// bundle: a new [`MeshCredentials`] the first time it is asked after
/// either changed.
pub struct MeshTls {
    svid: watch::Receiver<Arc<Svid>>,
    mesh: Option<watch::Receiver<MeshState>>,
    built: RwLock<Option<Arc<MeshCredentials>>>,
}

impl std::fmt::Debug for MeshTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshTls").finish_non_exhaustive()
    }
}

impl MeshTls {
    /// Follows `svid`, trusting the bundle `mesh` delivers (else the one
    /// that came with the SVID).
    pub fn new(
        svid: watch::Receiver<Arc<Svid>>,
        mesh: Option<watch::Receiver<MeshState>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            svid,
            mesh,
            built: RwLock::new(None),
        })
    }

    /// The SVID being followed.
    pub fn svid(&self) -> Arc<Svid> {
        Arc::clone(&self.svid.borrow())
    }

    /// A receiver of every SVID renewal.
    pub fn svid_updates(&self) -> watch::Receiver<Arc<Svid>> {
        self.svid.clone()
    }

    /// The settings for the current SVID and bundle.
    ///
    /// # Errors
    /// [`MtlsError`] if they cannot be built (then nothing is served or
    /// dialled with TLS: failing closed).
    pub fn current(&self) -> Result<Arc<MeshCredentials>, MtlsError> {
        // Asked on every outbound request: the check copies nothing.
        let svid = self.svid();
        if let Some(built) = read(&self.built).as_ref().filter(|b| self.fresh(b, &svid)) {
            return Ok(Arc::clone(built));
        }
        let mut slot = self
            .built
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(built) = slot.as_ref().filter(|b| self.fresh(b, &svid)) {
            return Ok(Arc::clone(built));
        }
        let bundle = self.bundle(&svid)?;
        let built = Arc::new(MeshCredentials::new(svid, bundle)?);
        *slot = Some(Arc::clone(&built));
        Ok(built)
    }

    /// Whether `built` is for `svid` and the bundle in force: the Watch
    /// stream's, or (while it has sent none) the one that came with the
    /// SVID, which is the same for the same SVID.
    fn fresh(&self, built: &MeshCredentials, svid: &Arc<Svid>) -> bool {
        Arc::ptr_eq(&built.svid, svid)
            && self.mesh.as_ref().is_none_or(|mesh| {
                let from_watch = &mesh.borrow().bundle_der;
                from_watch.is_empty() || *from_watch == built.bundle
            })
    }

    fn bundle(&self, svid: &Svid) -> Result<Vec<Vec<u8>>, MtlsError> {
        if let Some(mesh) = &self.mesh {
            let from_watch = mesh.borrow().bundle_der.clone();
            if !from_watch.is_empty() {
                return Ok(from_watch);
            }
        }
        CertificateDer::pem_slice_iter(svid.bundle_pem.as_bytes())
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| MtlsError::Bundle(e.to_string()))
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Accepts a server certificate only if it chains to the bundle (with
/// the server-auth usage) and its one URI SAN is exactly `expected`. The
/// name the client dialled is not consulted: an address says where to
/// look, the SVID says who answered.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let other = |why: String| {
            rustls::Error::InvalidCertificate(rustls::CertificateError::Other(rustls::OtherError(
                Arc::new(WrongServer(why)),
            )))
        };
        let found = crate::ca::spiffe_id_of(end_entity).map_err(other)?;
        if found != self.expected {
            return Err(other(format!(
                "the server is {found}, not {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// Why a server's SVID was refused after its chain verified.
#[derive(Debug)]
struct WrongServer(String);

impl std::fmt::Display for WrongServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WrongServer {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Authority, Lifetimes};
    use crate::clock::Clock as _;
    use tokio_rustls::{TlsAcceptor, TlsConnector};
    use zeroize::Zeroizing;

    /// TLS checks certificates against the real clock.
    fn now() -> u64 {
        crate::clock::SystemClock.now()
    }
    const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
    const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";

    fn ca() -> Authority {
        let td: SpiffeId = "spiffe://example.org".parse().unwrap();
        Authority::generate(&td, Lifetimes::default(), now())
            .unwrap()
            .0
    }

    fn svid(ca: &Authority, id: &str) -> Arc<Svid> {
        let id: SpiffeId = id.parse().unwrap();
        let c = ca.issue_credential(&id, &[], &[], 3600, now()).unwrap();
        Arc::new(Svid {
            spiffe_id: id,
            chain_pem: c.cert_chain_pem.clone(),
            key_pem: Zeroizing::new(c.key_pem.to_string()),
            bundle_pem: ca.bundle_pem(),
            issued_at: now(),
            expires_at: c.expires_at,
            issuer: "https://broker.example".into(),
        })
    }

    fn creds(ca: &Authority, id: &str) -> MeshCredentials {
        MeshCredentials::new(svid(ca, id), ca.bundle_der()).unwrap()
    }

    /// One handshake over an in-memory pipe; the client's result, and the
    /// server's view of the client's certificate.
    async fn handshake(
        server: Arc<rustls::ServerConfig>,
        client: Arc<rustls::ClientConfig>,
    ) -> (Result<(), String>, Option<Vec<u8>>) {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let accept = tokio::spawn(async move {
            TlsAcceptor::from(server)
                .accept(a)
                .await
                .ok()
                .and_then(|s| {
                    s.get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|c| c.first().map(|c| c.to_vec()))
                })
        });
        let name = ServerName::try_from("payments.mesh").unwrap();
        let connected = TlsConnector::from(client).connect(name, b).await;
        // The client end stays open until the server is done with it.
        let seen = if connected.is_ok() {
            accept.await.unwrap()
        } else {
            accept.abort();
            None
        };
        (connected.map(drop).map_err(|e| e.to_string()), seen)
    }

    #[tokio::test]
    async fn a_client_accepts_exactly_the_workload_it_was_told_and_shows_its_own_svid() {
        let ca = ca();
        let payments = creds(&ca, PAYMENTS);
        let checkout = creds(&ca, CHECKOUT);
        let expected: SpiffeId = PAYMENTS.parse().unwrap();
        let client = checkout.client_config(&expected).unwrap();
        let (ok, seen) = handshake(payments.server_config(InboundMtls::Required), client).await;
        ok.unwrap();
        let peer = crate::identity::PeerIdentity::of(&seen.unwrap()).unwrap();
        assert_eq!(peer.spiffe_id.as_str(), CHECKOUT);
        assert_eq!(&peer.jkt, checkout.jkt());
    }

    #[tokio::test]
    async fn another_workloads_svid_or_a_foreign_ca_at_the_address_is_refused() {
        let ca = ca();
        let checkout = creds(&ca, CHECKOUT);
        let payments: SpiffeId = PAYMENTS.parse().unwrap();
        // Same trust domain, another workload.
        let impostor = creds(&ca, "spiffe://example.org/ns/ops/sa/reporting");
        let (refused, _) = handshake(
            impostor.server_config(InboundMtls::Optional),
            checkout.client_config(&payments).unwrap(),
        )
        .await;
        let why = refused.unwrap_err();
        assert!(why.contains("reporting"), "{why}");
        // The right SPIFFE ID from another CA.
        let foreign = creds(&self::ca(), PAYMENTS);
        let (refused, _) = handshake(
            foreign.server_config(InboundMtls::Optional),
            checkout.client_config(&payments).unwrap(),
        )
        .await;
        let why = refused.unwrap_err();
        // The foreign CA has the same names: found by name, refused by signature.
        assert!(why.contains("invalid peer certificate"), "{why}");
        // Positive control: the real one.
        let real = creds(&ca, PAYMENTS);
        let (ok, _) = handshake(
            real.server_config(InboundMtls::Optional),
            checkout.client_config(&payments).unwrap(),
        )
        .await;
        ok.unwrap();
    }

    #[tokio::test]
    async fn a_required_server_refuses_a_client_without_a_certificate_an_optional_one_does_not() {
        let ca = ca();
        let payments = creds(&ca, PAYMENTS);
        let anonymous = |roots: Arc<RootCertStore>| {
            let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots,
                expected: PAYMENTS.parse().unwrap(),
                provider: Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
            }))
            .with_no_client_auth();
            c.alpn_protocols = vec![H2.to_vec()];
            Arc::new(c)
        };
        let (ok, seen) = handshake(
            payments.server_config(InboundMtls::Optional),
            anonymous(Arc::clone(&payments.roots)),
        )
        .await;
        ok.unwrap();
        assert_eq!(seen, None);
        // TLS 1.3: the client learns of the refusal on its first read; the
        // server side never completes.
        let (a, b) = tokio::io::duplex(64 * 1024);
        let server = payments.server_config(InboundMtls::Required);
        let accept = tokio::spawn(async move { TlsAcceptor::from(server).accept(a).await });
        let name = ServerName::try_from("payments.mesh").unwrap();
        let _ = TlsConnector::from(anonymous(Arc::clone(&payments.roots)))
            .connect(name, b)
            .await;
        let refused = accept.await.unwrap().map(drop).unwrap_err();
        assert!(refused.to_string().contains("certificate"), "{refused}");
    }

    #[tokio::test]
    async fn a_second_connection_is_a_full_handshake_never_a_resumed_session() {
        let ca = ca();
        let payments = creds(&ca, PAYMENTS);
        let checkout = creds(&ca, CHECKOUT);
        // A client that would resume if the server let it (rustls' default
        // in-memory session store), to show the server does not.
        let mut client = (*checkout.client_config(&PAYMENTS.parse().unwrap()).unwrap()).clone();
        client.resumption = rustls::client::Resumption::in_memory_sessions(16);
        let client = Arc::new(client);
        let server = payments.server_config(InboundMtls::Required);
        let mut kinds = Vec::new();
        for _ in 0..3 {
            let (a, b) = tokio::io::duplex(64 * 1024);
            let server = Arc::clone(&server);
            let accept = tokio::spawn(async move {
                use tokio::io::AsyncWriteExt as _;
                let mut tls = TlsAcceptor::from(server).accept(a).await.unwrap();
                // Tickets, if any, go out with the first application data.
                tls.write_all(b"x").await.unwrap();
                tls.flush().await.unwrap();
                tls
            });
            let name = ServerName::try_from("payments.mesh").unwrap();
            let mut tls = TlsConnector::from(Arc::clone(&client))
                .connect(name, b)
                .await
                .unwrap();
            let mut one = [0u8; 1];
            tokio::io::AsyncReadExt::read_exact(&mut tls, &mut one)
                .await
                .unwrap();
            kinds.push(tls.get_ref().1.handshake_kind());
            drop(accept.await.unwrap());
        }
        assert!(
            kinds
                .iter()
                .all(|k| *k == Some(rustls::HandshakeKind::Full)),
            "{kinds:?}"
        );
    }

    #[test]
    fn credentials_are_rebuilt_after_a_renewal_and_kept_otherwise() {
        let ca = ca();
        let (tx, rx) = watch::channel(svid(&ca, PAYMENTS));
        let tls = MeshTls::new(rx, None);
        let first = tls.current().unwrap();
        assert!(Arc::ptr_eq(&first, &tls.current().unwrap()));
        tx.send(svid(&ca, PAYMENTS)).unwrap();
        let second = tls.current().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_ne!(first.jkt(), second.jkt(), "a renewal brings a new key");
    }

    #[test]
    fn credentials_follow_the_watch_streams_bundle() {
        let ca = ca();
        let (_svids, rx) = watch::channel(svid(&ca, PAYMENTS));
        let (mesh, mesh_rx) = watch::channel(MeshState::default());
        let tls = MeshTls::new(rx, Some(mesh_rx));
        // No bundle from the Watch stream yet: the SVID's.
        let first = tls.current().unwrap();
        assert_eq!(first.bundle, ca.bundle_der());
        // The same roots from the stream: nothing to rebuild.
        mesh.send_modify(|m| m.bundle_der = ca.bundle_der());
        assert!(Arc::ptr_eq(&first, &tls.current().unwrap()));
        // Another root added (a root rotation): rebuilt, trusting both.
        let mut both = ca.bundle_der();
        both.extend(self::ca().bundle_der());
        mesh.send_modify(|m| m.bundle_der = both.clone());
        let second = tls.current().unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.bundle, both);
    }
}
