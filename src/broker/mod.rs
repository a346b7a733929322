//! The broker: identity CA, token issuer and policy engine behind a gRPC
//! server with mTLS.
//!
//! [`Broker`] holds the state the services share; [`grpc`] maps the wire
//! to it; [`serve`] runs the gRPC server on a listener until a shutdown
//! future resolves.

pub mod config;
pub mod grpc;
pub mod keys;
pub mod rate;

use crate::ca::{Authority, CaError, Credential, Lifetimes};
use crate::clock::Clock;
use crate::dpop::proof::ProofConfig;
use crate::dpop::{NormalizedUri, ReplayCache};
use crate::identity::SpiffeId;
use crate::jose::KeyCache;
use crate::policy::Policy;
use crate::store::{Store, StoreError};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use keys::SigningKeys;
use rate::RateLimiter;
use std::sync::{Arc, RwLock};
use zeroize::Zeroizing;

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA failed.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// Signing keys failed.
    #[error(transparent)]
    Keys(#[from] keys::KeyError),
    /// Settings are inconsistent.
    #[error("{0}")]
    Config(String),
    /// The random source failed.
    #[error("random source failed")]
    Random,
}

/// What the broker needs to know that is not in the store.
#[derive(Debug, Clone)]
pub struct BrokerSettings {
    /// `spiffe://<trust domain>`.
    pub trust_domain: SpiffeId,
    /// The `iss` of tokens: the broker's HTTPS base URL.
    pub issuer: String,
    /// Lifetime of X.509-SVIDs.
    pub svid_ttl: u64,
    /// CA certificate lifetimes.
    pub ca_lifetimes: Lifetimes,
    /// SPIFFE IDs allowed to call admin RPCs.
    pub admins: Vec<SpiffeId>,
    /// The trust policy.
    pub policy: Policy,
}

impl BrokerSettings {
    /// Defaults for a trust domain: 1 h SVIDs, issuer
    /// `https://localhost:8444`, admin `spiffe://<td>/admin`.
    ///
    /// # Errors
    /// If `trust_domain` is not a valid trust domain name.
    pub fn new(trust_domain: &str, policy: Policy) -> Result<Self, BrokerError> {
        let td: SpiffeId = format!("spiffe://{trust_domain}")
            .parse()
            .map_err(|e| BrokerError::Config(format!("trust domain {trust_domain:?}: {e}")))?;
        let admin = format!("spiffe://{trust_domain}/admin")
            .parse()
            .map_err(|e| BrokerError::Config(format!("admin ID: {e}")))?;
        Ok(Self {
            trust_domain: td,
            issuer: "https://localhost:8444".into(),
            svid_ttl: 3600,
            ca_lifetimes: Lifetimes::default(),
            admins: vec![admin],
            policy,
        })
    }
}

/// The broker's shared state.
pub struct Broker {
    settings: BrokerSettings,
    clock: Arc<dyn Clock>,
    store: Store,
    ca: Authority,
    keys: RwLock<SigningKeys>,
    policy: RwLock<Arc<Policy>>,
    issue_uri: NormalizedUri,
    proof_config: ProofConfig,
    replay: ReplayCache,
    proof_keys: KeyCache,
    token_hmac: hmac::Key,
    rule_limits: RateLimiter<usize>,
    /// Flips to true when the broker shuts down: long-lived streams end.
    closing: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for Broker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("trust_domain", &self.settings.trust_domain)
            .field("issuer", &self.settings.issuer)
            .finish_non_exhaustive()
    }
}

impl Broker {
    /// Opens the broker on `store`: loads the CA (making one on first
    /// start), the signing keys (likewise) and the token-hash key.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn open(
        settings: BrokerSettings,
        store: Store,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, BrokerError> {
        let now = clock.now();
        if settings.policy.trust_domain != settings.trust_domain.trust_domain() {
            return Err(BrokerError::Config(format!(
                "the policy is for trust domain {}, the broker for {}",
                settings.policy.trust_domain,
                settings.trust_domain.trust_domain()
            )));
        }
        let ca = match store.load_ca().await? {
            Some(material) => {
                Authority::load(&settings.trust_domain, &material, settings.ca_lifetimes)?
            }
            None => {
                let (ca, material) =
                    Authority::generate(&settings.trust_domain, settings.ca_lifetimes, now)?;
                if store.save_ca(&material, false, now).await? {
                    tracing::info!(trust_domain = %settings.trust_domain, "created a new root and intermediate CA");
                    ca
                } else {
                    // Another replica saved one first: use that.
                    let material = store
                        .load_ca()
                        .await?
                        .ok_or_else(|| BrokerError::Config("CA vanished".into()))?;
                    Authority::load(&settings.trust_domain, &material, settings.ca_lifetimes)?
                }
            }
        };
        let keys = SigningKeys::load_or_create(&store, &settings.issuer, now).await?;
        let hmac_key = store
            .secret_or_create(
                "token-hmac",
                || {
                    let mut k = Zeroizing::new(vec![0u8; 32]);
                    // A failing random source leaves zeros; checked below.
                    let _ = SystemRandom::new().fill(&mut k);
                    k
                },
                now,
            )
            .await?;
        if hmac_key.iter().all(|b| *b == 0) {
            return Err(BrokerError::Random);
        }
        let issue_uri = NormalizedUri::parse(&format!(
            "{}/tally.v1.Tokens/Issue",
            settings.issuer.trim_end_matches('/')
        ))
        .map_err(|e| BrokerError::Config(format!("issuer {:?}: {e}", settings.issuer)))?;
        let proof_config = ProofConfig::default();
        let window = proof_config.max_age + proof_config.max_skew;
        Ok(Self {
            policy: RwLock::new(Arc::new(settings.policy.clone())),
            settings,
            clock,
            store,
            ca,
            keys: RwLock::new(keys),
            issue_uri,
            proof_config,
            replay: ReplayCache::new(1 << 20, window).map_err(|_| BrokerError::Random)?,
            proof_keys: KeyCache::new(16_384),
            token_hmac: hmac::Key::new(hmac::HMAC_SHA256, &hmac_key),
            rule_limits: RateLimiter::new(),
            closing: tokio::sync::watch::Sender::new(false),
        })
    }

    /// The trust bundle, PEM.
    pub fn bundle_pem(&self) -> String {
        self.ca.bundle_pem()
    }

    /// The DPoP `htu` a client must use for `Tokens.Issue`.
    pub fn issue_uri(&self) -> &str {
        self.issue_uri.as_str()
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The JWKS to publish now.
    pub fn jwks(&self) -> crate::token::Jwks {
        let max_ttl = self
            .policy()
            .classes
            .values()
            .map(|c| c.max_ttl)
            .max()
            .unwrap_or(900);
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .jwks(self.clock.now(), max_ttl, 30)
    }

    /// The current policy.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(
            &self
                .policy
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces the policy (hot reload). A policy for another trust domain
    /// is refused.
    ///
    /// # Errors
    /// [`BrokerError::Config`].
    pub fn set_policy(&self, policy: Policy) -> Result<(), BrokerError> {
        if policy.trust_domain != self.settings.trust_domain.trust_domain() {
            return Err(BrokerError::Config(
                "policy is for another trust domain".into(),
            ));
        }
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
        Ok(())
    }

    /// A certificate and key for the broker's own TLS servers, naming
    /// `spiffe://<td>/tally/broker` and the given DNS names and IPs.
    ///
    /// # Errors
    /// [`BrokerError::Ca`].
    pub fn server_credential(
        &self,
        dns: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<Credential, BrokerError> {
        let id: SpiffeId = format!("{}/tally/broker", self.settings.trust_domain)
            .parse()
            .map_err(|e| BrokerError::Config(format!("broker ID: {e}")))?;
        Ok(self
            .ca
            .issue_credential(&id, dns, ips, 7 * 86_400, self.clock.now())?)
    }

    /// A credential for `id` (admin tooling, `tally ctl svid mint`).
    ///
    /// # Errors
    /// [`BrokerError::Ca`].
    pub fn mint_credential(&self, id: &SpiffeId, ttl: u64) -> Result<Credential, BrokerError> {
        Ok(self
            .ca
            .issue_credential(id, &[], &[], ttl, self.clock.now())?)
    }

    /// Makes a join token for `id`, valid for `ttl` seconds.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn create_join_token(
        &self,
        id: &SpiffeId,
        ttl: u64,
    ) -> Result<crate::identity::JoinToken, BrokerError> {
        if id.trust_domain() != self.settings.trust_domain.trust_domain() {
            return Err(BrokerError::Config(format!(
                "{id} is not in trust domain {}",
                self.settings.trust_domain
            )));
        }
        let token = crate::identity::JoinToken::generate().map_err(|_| BrokerError::Random)?;
        let now = self.clock.now();
        self.store
            .create_join_token(&token.hash(), id, now + ttl, now)
            .await?;
        Ok(token)
    }

    /// Ends long-lived streams (Watch) so a graceful shutdown completes.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Resolves once [`Broker::close`] has been called.
    pub async fn closed(&self) {
        let mut rx = self.closing.subscribe();
        // An error means the sender is gone, which also means closed.
        let _ = rx.wait_for(|closing| *closing).await;
    }

    /// Rotates the token-signing key (see [`SigningKeys::rotate`]).
    ///
    /// # Errors
    /// [`BrokerError::Keys`].
    pub async fn rotate_signing_key(&self, publish_lead: u64) -> Result<String, BrokerError> {
        let now = self.clock.now();
        // The store write happens outside the lock; the in-memory set is
        // swapped in afterwards.
        let mut keys = SigningKeys::load_or_create(&self.store, &self.settings.issuer, now).await?;
        let kid = keys.rotate(&self.store, now, publish_lead).await?;
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        Ok(kid)
    }
}

/// Runs the gRPC server (Identity, Tokens, Watch) with TLS on `listener`
/// until `shutdown` resolves: then Watch streams end, and in-flight calls
/// finish before this returns.
///
/// # Errors
/// If TLS cannot be set up or the server fails.
pub async fn serve(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    credential: &Credential,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            &credential.cert_chain_pem,
            credential.key_pem.as_bytes(),
        ))
        .client_ca_root(Certificate::from_pem(broker.bundle_pem()))
        // Attest has no certificate yet; every other RPC demands one.
        .client_auth_optional(true);
    Server::builder()
        .tls_config(tls)?
        .add_service(grpc::identity_server(Arc::clone(&broker)))
        .add_service(grpc::tokens_server(Arc::clone(&broker)))
        .add_service(grpc::watch_server(Arc::clone(&broker)))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move {
                shutdown.await;
                broker.close();
            },
        )
        .await
}
