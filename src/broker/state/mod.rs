//! The broker's state and its operations: the CA, signing keys, policy,
//! revocations and denials, the change feed, the audit log, all on one
//! [`Store`]. Nothing here serves a protocol: the front ends in
//! [`super::serve`] call these operations, and [`super::run`] starts the
//! background tasks.
//!
//! [`issue`] is token issuance (both front ends call it); [`jwt_svid`]
//! JWT-SVID issuance, on the same rules and budgets; [`wit`] WIMSE
//! Workload Identity Token issuance, under the `wit:` rules; [`denials`]
//! who the caller is and the identities an admin cut off; [`deployment`]
//! the trust domain and issuer every start must agree with; [`keys`] the
//! signing keys; [`credentials`] the CA and what it hands out;
//! [`revoke`] revocation; [`feed`] the change feed and the periodic
//! upkeep; [`governance`] policy versions, usage and audit; [`replicas`]
//! following the other replicas' changes; [`health`] metrics and
//! readiness.

mod audit_file;
pub mod credentials;
pub mod denials;
pub mod deployment;
pub mod feed;
pub mod governance;
pub mod health;
pub mod issue;
pub mod jwt_svid;
pub mod keys;
pub mod replicas;
pub mod revoke;
pub mod wit;

pub use health::BrokerMetrics;

use crate::audit::{AuditEvent, AuditRecord};
use crate::ca::{Authority, CaError, Lifetimes};
use crate::clock::Clock;
use crate::dpop::proof::ProofConfig;
use crate::dpop::{Nonces, NormalizedUri, ReplayCache};
use crate::identity::{DenialSet, SpiffeId};
use crate::jose::KeyCache;
use crate::policy::Policy;
use crate::store::{Store, StoreError, Write};
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use keys::SigningKeys;
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
    /// A revocation that cannot be made as asked.
    #[error("{0}")]
    Revoke(String),
    /// The settings name another deployment than the store's (trust
    /// domain, issuer): the operator must choose.
    #[error(transparent)]
    Deployment(#[from] deployment::DeploymentError),
}

/// The path of the broker's own SPIFFE ID (its listeners' certificate).
const BROKER_PATH: &str = "/tally/broker";

/// The clock leeway verifiers allow on `exp` (seconds), added to a
/// revocation's expiry so it outlives every token it covers.
const TOKEN_LEEWAY: u64 = 30;

/// How long (seconds) a token being issued may take to show in the
/// inventory, and a replica to take in a policy version another one
/// stored: a revocation also covers tokens signed under any policy served
/// this recently, which its inventory query may not see yet.
const ISSUANCE_SETTLE: u64 = 60;

/// 32 random bytes for a new deployment secret. A failing random source
/// leaves zeros, which [`Broker::open`] refuses.
fn random_secret() -> Zeroizing<Vec<u8>> {
    let mut k = Zeroizing::new(vec![0u8; 32]);
    let _ = SystemRandom::new().fill(&mut k);
    k
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
    /// The trust policy given at start (from a file, or a deny-all one).
    pub policy: Policy,
    /// Its text, when it came from a file (stored as a version).
    pub policy_yaml: Option<String>,
    /// Which policy wins: the file's or the store's.
    pub policy_source: PolicySource,
    /// JSON-lines file that receives a copy of every audit record.
    pub audit_file: Option<std::path::PathBuf>,
    /// A root CA to use instead of generating one on first start.
    pub ca_root: Option<crate::ca::SuppliedRoot>,
    /// Kubernetes ServiceAccount token attestation: the cluster's keys,
    /// what tokens must say, TokenReview. `None` refuses such attestations.
    pub service_accounts: Option<std::sync::Arc<crate::broker::cluster::ServiceAccounts>>,
    /// Rotate the token-signing key when the current one has signed this
    /// long (seconds; default 24 h).
    pub key_rotation: u64,
    /// Publish a new key this long before it signs (seconds; default 10
    /// min), so verifiers polling the JWKS have it in time.
    pub key_publish_lead: u64,
    /// Expired inventory rows are deleted this long after they expire
    /// (seconds; default 90 days).
    pub inventory_retention: u64,
    /// Whether `POST /oauth2/token` demands a server-issued DPoP nonce
    /// (RFC 9449 §8), which bounds how long a pre-made proof is usable.
    pub token_endpoint_nonce: bool,
    /// Timeouts and connection cap of each listener (gRPC, HTTPS, admin).
    pub limits: crate::http::Limits,
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
            policy_yaml: None,
            policy_source: PolicySource::Store,
            audit_file: None,
            service_accounts: None,
            ca_root: None,
            key_rotation: 86_400,
            key_publish_lead: 600,
            inventory_retention: 90 * 86_400,
            token_endpoint_nonce: true,
            limits: crate::http::Limits::default(),
        })
    }

    /// The same with the policy `yaml` (stored as a version when the
    /// broker opens: see [`PolicySource`]).
    ///
    /// # Errors
    /// If `trust_domain` is not valid or `yaml` does not parse (every
    /// error, with positions).
    pub fn with_policy(trust_domain: &str, yaml: &str) -> Result<Self, BrokerError> {
        let policy = Policy::parse(yaml).map_err(|e| BrokerError::Config(e.to_string()))?;
        let mut settings = Self::new(trust_domain, policy)?;
        settings.policy_yaml = Some(yaml.to_owned());
        Ok(settings)
    }
}

/// Where the trust policy comes from. Exactly one source is
/// authoritative, so a file and stored versions never silently fight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// The policy file (named here), reloaded when it changes; each new
    /// text is stored as a version. `policy apply` and `rollback` are
    /// refused. With `overrides_applied` unset, a broker whose store holds
    /// a newer version applied with `tally ctl policy apply` that differs
    /// from the file refuses to start rather than discard it.
    File {
        /// The file, for messages and as the version's author.
        name: String,
        /// The operator said the file wins over applied versions.
        overrides_applied: bool,
    },
    /// The newest stored version, changed only by `tally ctl policy
    /// apply` and `rollback`. A policy given at start seeds an empty store
    /// and must match the stored one otherwise.
    Store,
}

/// The broker's shared state.
pub struct Broker {
    settings: BrokerSettings,
    clock: Arc<dyn Clock>,
    store: Store,
    /// Swapped whole when the intermediate rotates.
    ca: RwLock<Arc<Authority>>,
    keys: RwLock<SigningKeys>,
    policy: RwLock<Arc<Policy>>,
    issue_uri: NormalizedUri,
    proof_config: ProofConfig,
    replay: ReplayCache,
    proof_keys: KeyCache,
    token_hmac: hmac::Key,
    nonces: Nonces,
    rule_limits: issue::RuleBuckets,
    /// Flips to true when the broker shuts down: long-lived streams end.
    closing: tokio::sync::watch::Sender<bool>,
    metrics: BrokerMetrics,
    /// The newest change-feed sequence number; Watch streams wait on it.
    changes: tokio::sync::watch::Sender<u64>,
    /// What was last published per kind, so only real changes are fed.
    published: tokio::sync::Mutex<std::collections::HashMap<&'static str, String>>,
    /// The listeners' counters (not ready while one cannot accept).
    listeners: crate::http::Listeners,
    /// Identities an admin cut off, as of the change feed this replica
    /// has read (see [`denials`]).
    denials: RwLock<DenialSet>,
    /// Bounds the audit records of a denied identity's refused calls.
    denied_audits: crate::rate::RateLimiter<SpiffeId>,
    /// The pod each SVID (by serial) was attested by, as far as asked
    /// (see [`Broker::caller_pod`]).
    svid_pods:
        std::sync::Mutex<std::collections::HashMap<String, Option<crate::identity::k8s::Pod>>>,
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
        // Before anything is written under these settings.
        Self::check_deployment(&settings, &store).await?;
        if settings.policy.trust_domain != settings.trust_domain.trust_domain() {
            return Err(BrokerError::Config(format!(
                "the policy is for trust domain {}, the broker for {}",
                settings.policy.trust_domain,
                settings.trust_domain.trust_domain()
            )));
        }
        if let Some(path) = &settings.audit_file {
            // The copy is not a gate: a file that cannot be caught up is
            // logged, as a failing append is.
            if let Err(e) = audit_file::catch_up(path, &store).await {
                tracing::error!(error = %e, file = %path.display(), "catching the audit file up with the store failed");
            }
            let file = audit_file::open_audit_file(path)
                .map_err(|e| BrokerError::Config(format!("audit file {}: {e}", path.display())))?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(audit_file::append_audit_lines(file, rx));
            // The store hands over each line as it commits, in chain order.
            store.tap_audit(tx);
        }
        let policy = Self::resolve_policy(&settings, &store, now).await?;
        let ca = Self::open_ca(&settings, &store, now).await?;
        let keys = SigningKeys::load_or_create(&store, &settings.issuer, now).await?;
        Self::record_deployment(&settings, &store, now).await?;
        let hmac_key = store
            .secret_or_create("token-hmac", random_secret, now)
            .await?;
        let nonce_key = store
            .secret_or_create("dpop-nonce", random_secret, now)
            .await?;
        // A failing random source leaves zeros.
        if hmac_key.iter().all(|b| *b == 0) || nonce_key.iter().all(|b| *b == 0) {
            return Err(BrokerError::Random);
        }
        let issue_uri = NormalizedUri::parse(&format!(
            "{}/tally.v1.Tokens/Issue",
            settings.issuer.trim_end_matches('/')
        ))
        .map_err(|e| BrokerError::Config(format!("issuer {:?}: {e}", settings.issuer)))?;
        let proof_config = ProofConfig::default();
        let window = proof_config.max_age + proof_config.max_skew;
        let mut denials = DenialSet::default();
        for change in store.current_state(now).await? {
            if change.kind == "denial" {
                denials::take_in(&mut denials, &change);
            }
        }
        if !denials.is_empty() {
            tracing::info!(denied = denials.len(), "identity denials in force");
        }
        let latest = store.latest_changes().await?;
        let last_seq = latest.iter().map(|c| c.seq).max().unwrap_or(0);
        let published = latest
            .into_iter()
            .filter_map(|c| {
                let kind = match c.kind.as_str() {
                    "jwks" => "jwks",
                    "bundle" => "bundle",
                    "policy" => "policy",
                    _ => return None,
                };
                Some((kind, c.body))
            })
            .collect();
        let broker = Self {
            policy: RwLock::new(Arc::new(policy)),
            settings,
            clock,
            store,
            ca: RwLock::new(Arc::new(ca)),
            keys: RwLock::new(keys),
            issue_uri,
            proof_config,
            replay: ReplayCache::new(1 << 20, window).map_err(|_| BrokerError::Random)?,
            proof_keys: KeyCache::new(16_384),
            token_hmac: hmac::Key::new(hmac::HMAC_SHA256, &hmac_key),
            // Shared by replicas (same store), valid 30–60 s.
            nonces: Nonces::new(&nonce_key, 30),
            rule_limits: issue::RuleBuckets::new(),
            closing: tokio::sync::watch::Sender::new(false),
            metrics: BrokerMetrics::new(),
            changes: tokio::sync::watch::Sender::new(last_seq),
            listeners: crate::http::Listeners::default(),
            published: tokio::sync::Mutex::new(published),
            denials: RwLock::new(denials),
            svid_pods: std::sync::Mutex::default(),
            denied_audits: crate::rate::RateLimiter::new(),
        };
        // The feed starts with the state this broker opened with.
        broker.publish_state().await?;
        Ok(broker)
    }

    /// Durably records `event` (and `write`, in the same transaction); the
    /// store then hands its line to the audit file.
    ///
    /// # Errors
    /// [`StoreError`]: nothing was recorded.
    pub async fn record(
        &self,
        write: Option<Write>,
        event: AuditEvent,
    ) -> Result<AuditRecord, StoreError> {
        self.store.record(write, event).await
    }

    /// Records an event that accompanies a refusal: a store failure is
    /// logged (the refusal stands either way).
    pub async fn audit(&self, event: AuditEvent) {
        if let Err(e) = self.record(None, event).await {
            tracing::error!(error = %e, "recording an audit event failed");
        }
    }

    /// The trust bundle, PEM.
    pub fn bundle_pem(&self) -> String {
        self.ca().bundle_pem()
    }

    /// The token issuer URL (`iss`).
    pub fn issuer(&self) -> &str {
        &self.settings.issuer
    }

    /// The DPoP `htu` a client must use for `Tokens.Issue`.
    pub fn issue_uri(&self) -> &str {
        self.issue_uri.as_str()
    }

    /// The DPoP `htu` of `Tokens.Issue`, normalized.
    pub fn issue_htu(&self) -> &NormalizedUri {
        &self.issue_uri
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The settings it was opened with.
    pub fn settings(&self) -> &BrokerSettings {
        &self.settings
    }

    /// The clock it reads.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Now, Unix seconds, by its clock.
    pub fn now(&self) -> u64 {
        self.clock.now()
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

    /// Replaces the policy (hot reload) and feeds its access rules to
    /// Watch subscribers. A policy for another trust domain is refused.
    ///
    /// # Errors
    /// [`BrokerError::Config`], or the store failing to record the change.
    pub async fn set_policy(&self, policy: Policy) -> Result<(), BrokerError> {
        if policy.trust_domain != self.settings.trust_domain.trust_domain() {
            return Err(BrokerError::Config(
                "policy is for another trust domain".into(),
            ));
        }
        *self
            .policy
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
        self.publish_state().await?;
        Ok(())
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

    /// How a broker listener called `name` serves: the configured limits,
    /// counted for `/readyz` and `/metrics`.
    pub(crate) fn listen(&self, name: &'static str) -> crate::http::Listen {
        let listen = crate::http::Listen::new(name).limits(self.settings.limits);
        self.listeners.add(listen.stats());
        listen
    }

    /// Whether `id` may call admin RPCs.
    pub fn is_admin(&self, id: &SpiffeId) -> bool {
        self.settings.admins.contains(id)
    }
}
