//! The broker: identity CA, token issuer and policy engine behind mTLS
//! gRPC and an OAuth HTTPS listener.
//!
//! [`Broker`] holds the state the front ends share; [`issue`] is token
//! issuance (both front ends call it); [`grpc`] and [`admin_rpc`] map the
//! gRPC wire to it, [`oauth`] the OAuth endpoints, [`admin_port`] the
//! metrics and health endpoints; [`tls`] is the listeners' renewing
//! certificate; [`denials`] who the caller is and the identities an admin
//! cut off; [`keys`] the signing keys, [`crate::rate`] rule rate limits,
//! [`config`] the command-line settings. [`serve`], [`serve_https`] and
//! [`serve_admin`] run on a listener until a shutdown future resolves;
//! [`run_maintenance`] does rotations and the change feed.

pub mod admin_port;
pub mod admin_rpc;
mod audit_file;
pub mod config;
pub mod denials;
pub mod governance;
pub mod grpc;
pub mod issue;
pub mod keys;
pub mod oauth;
pub mod replicas;
pub mod reports;
pub mod tls;

use crate::audit::{AuditEvent, AuditKind, AuditRecord, Outcome};
use crate::ca::{Authority, CaError, Credential, Lifetimes};
use crate::clock::Clock;
use crate::dpop::proof::ProofConfig;
use crate::dpop::{Nonces, NormalizedUri, ReplayCache};
use crate::identity::{DenialSet, SpiffeId};
use crate::jose::KeyCache;
use crate::metrics::{CounterVec, Histogram};
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
}

/// The `jti` claim of a compact JWS, read with the JWS parser's limits
/// but without checking the signature.
pub(crate) fn unverified_jti(token: &str) -> Option<String> {
    let jws = crate::jose::jws::Jws::parse(token, &crate::jose::jws::Limits::default()).ok()?;
    let jti = jws.payload().get("jti")?.as_str()?;
    (!jti.is_empty() && jti.len() <= 256).then(|| jti.to_owned())
}

/// The longest lifetime any token class may have under `policy`, seconds.
fn longest_life(policy: &Policy) -> u64 {
    policy
        .classes
        .values()
        .map(|c| c.max_ttl)
        .max()
        .unwrap_or(900)
}

/// Whether `set` covers an inventory record.
pub(crate) fn is_revoked(set: &crate::token::RevocationSet, t: &crate::store::IssuedToken) -> bool {
    set.covers(&crate::token::TokenRef {
        jti: &t.jti,
        sub: &t.sub,
        jkt: &t.jkt,
        kid: &t.kid,
        iat: t.iat,
    })
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

/// Opens the audit JSON-lines file for appending (0600, created if
/// missing).
fn open_audit_file(path: &std::path::Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
}

/// Appends audit lines to the file as they come, as many per write as
/// have queued. The store holds the authoritative copy; a failing file is
/// logged, not fatal.
async fn append_audit_lines(
    mut file: std::fs::File,
    mut lines: tokio::sync::mpsc::UnboundedReceiver<String>,
) {
    use std::io::Write as _;
    let mut buf = String::new();
    while let Some(line) = lines.recv().await {
        buf.clear();
        buf.push_str(&line);
        buf.push('\n');
        while buf.len() < 1 << 20 {
            match lines.try_recv() {
                Ok(more) => {
                    buf.push_str(&more);
                    buf.push('\n');
                }
                Err(_) => break,
            }
        }
        if let Err(e) = file.write_all(buf.as_bytes()) {
            tracing::error!(error = %e, "appending to the audit file failed");
        }
    }
}

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
    /// Kubernetes ServiceAccount token attestation: the cluster's keys and
    /// what tokens must say. `None` refuses such attestations.
    pub service_accounts: Option<(
        crate::identity::k8s::SaKeys,
        crate::identity::k8s::SaTokenConfig,
    )>,
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
    token_uri: NormalizedUri,
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
    /// The listeners' server certificate, renewed by [`Broker::maintain`].
    server_certs: std::sync::OnceLock<Arc<tls::ServerCerts>>,
    /// The listeners' counters (not ready while one cannot accept).
    listeners: crate::http::Listeners,
    /// Identities an admin cut off, as of the change feed this replica
    /// has read (see [`denials`]).
    denials: RwLock<DenialSet>,
    /// Bounds the audit records of a denied identity's refused calls.
    denied_audits: crate::rate::RateLimiter<SpiffeId>,
}

/// What the broker counts (rendered by [`Broker::render_metrics`]).
#[derive(Debug)]
pub struct BrokerMetrics {
    /// Token requests by result (`issued` or the refusal reason) and class.
    pub issuance: CounterVec,
    /// Time to answer a token request.
    pub issue_latency: Histogram,
    /// Attestations and renewals by method and result.
    pub attestations: CounterVec,
    /// Policy reloads by result.
    pub policy_reloads: CounterVec,
    /// Calls refused because the caller's identity is denied, by call.
    pub denied_calls: CounterVec,
}

impl BrokerMetrics {
    fn new() -> Self {
        Self {
            issuance: CounterVec::new(
                "tally_broker_issuance_total",
                "Token requests by result (issued or the refusal reason) and token class.",
                &["result", "class"],
            ),
            issue_latency: Histogram::new(
                "tally_broker_issuance_duration_seconds",
                "Time to answer a token request, including the durable inventory write.",
            ),
            attestations: CounterVec::new(
                "tally_broker_attestations_total",
                "X.509-SVID requests by method (join_token, k8s_sa, renew, admin_mint) and result.",
                &["method", "result"],
            ),
            policy_reloads: CounterVec::new(
                "tally_broker_policy_reloads_total",
                "Trust policy reloads by result (ok, error).",
                &["result"],
            ),
            denied_calls: CounterVec::new(
                "tally_broker_denied_identity_calls_total",
                "Calls refused because an admin denied the caller's identity, by call.",
                &["call"],
            ),
        }
    }
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
        if let Some(path) = &settings.audit_file {
            // The copy is not a gate: a file that cannot be caught up is
            // logged, as a failing append is.
            if let Err(e) = audit_file::catch_up(path, &store).await {
                tracing::error!(error = %e, file = %path.display(), "catching the audit file up with the store failed");
            }
            let file = open_audit_file(path)
                .map_err(|e| BrokerError::Config(format!("audit file {}: {e}", path.display())))?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            tokio::spawn(append_audit_lines(file, rx));
            // The store hands over each line as it commits, in chain order.
            store.tap_audit(tx);
        }
        let policy = Self::resolve_policy(&settings, &store, now).await?;
        let ca = Self::open_ca(&settings, &store, now).await?;
        let keys = SigningKeys::load_or_create(&store, &settings.issuer, now).await?;
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
        let token_uri = NormalizedUri::parse(&format!(
            "{}{}",
            settings.issuer.trim_end_matches('/'),
            oauth::TOKEN_PATH
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
            token_uri,
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
            server_certs: std::sync::OnceLock::new(),
            listeners: crate::http::Listeners::default(),
            published: tokio::sync::Mutex::new(published),
            denials: RwLock::new(denials),
            denied_audits: crate::rate::RateLimiter::new(),
        };
        // The feed starts with the state this broker opened with.
        broker.publish_state().await?;
        Ok(broker)
    }

    /// Wakes Watch streams for change `seq`; never moves backwards (another
    /// replica's later change may have been seen first).
    pub(crate) fn feed_advanced(&self, seq: u64) {
        self.changes.send_if_modified(|v| {
            let newer = seq > *v;
            if newer {
                *v = seq;
            }
            newer
        });
    }

    /// Feeds the JWKS, the trust bundle and the policy's access rules to
    /// Watch subscribers, each if it differs from what was last fed.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn publish_state(&self) -> Result<(), StoreError> {
        self.look_up_retired_keys().await?;
        let jwks = self.jwks().to_json().to_string();
        let bundle = serde_json::Value::from(
            self.ca()
                .bundle_der()
                .iter()
                .map(crate::jose::b64::encode)
                .collect::<Vec<_>>(),
        )
        .to_string();
        let access = self.policy().access_document(None);
        let mut published = self.published.lock().await;
        for (kind, body) in [("jwks", jwks), ("bundle", bundle), ("policy", access)] {
            if published.get(kind) == Some(&body) {
                continue;
            }
            let at_ms = self.clock.now().saturating_mul(1000);
            let seq = self.store.append_change(kind, &body, at_ms).await?;
            tracing::info!(kind, seq, "published a change to Watch subscribers");
            published.insert(kind, body);
            self.feed_advanced(seq);
        }
        Ok(())
    }

    /// A receiver that sees the newest change-feed sequence number.
    pub fn watch_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Periodic upkeep: rotates the signing key when it is due (the new key
    /// published `key_publish_lead` before it signs), and feeds JWKS changes
    /// (a new key, or a retired key whose tokens have all expired) to Watch.
    /// Returns the new key id if it rotated.
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn maintain(&self) -> Result<Option<String>, BrokerError> {
        let now = self.clock.now();
        let due = {
            let keys = self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let newest = keys.newest_sign_from().unwrap_or(0);
            // Not while a rotation is being published.
            newest <= now && now.saturating_sub(newest) >= self.settings.key_rotation
        };
        if self.rotate_intermediate_if_due().await?
            && let Some(certs) = self.server_certs.get()
        {
            // Chain the listeners' certificate to the new intermediate.
            certs.renew_now(self).map_err(BrokerError::Config)?;
        }
        if let Some(certs) = self.server_certs.get() {
            certs.renew_if_due(self, now).map_err(BrokerError::Config)?;
        }
        // Expired inventory past retention, a bounded batch per run.
        let before = now.saturating_sub(self.settings.inventory_retention);
        match self.store.prune_inventory(before, 10_000).await {
            Ok(0) => {}
            Ok(gone) => tracing::info!(gone, before, "pruned expired inventory rows"),
            Err(e) => {
                tracing::warn!(error = %e, "pruning the inventory failed; retrying at the next run")
            }
        }
        let rotated = if due {
            let (kid, _) = self
                .rotate_signing_key(self.settings.key_publish_lead, None)
                .await?;
            Some(kid)
        } else {
            None
        };
        self.publish_state().await?;
        Ok(rotated)
    }

    /// Loads the CA from the store, or makes one on first start (under the
    /// supplied root, if any). A supplied root must match a stored one.
    async fn open_ca(
        settings: &BrokerSettings,
        store: &Store,
        now: u64,
    ) -> Result<Authority, BrokerError> {
        let td = &settings.trust_domain;
        if let Some(material) = store.load_ca().await? {
            if let Some(root) = &settings.ca_root
                && crate::ca::pem_body(&root.cert_pem)
                    != crate::ca::pem_body(&material.root_cert_pem)
            {
                return Err(BrokerError::Config(
                    "--ca-cert is not the root this store's CA was made under; use the original root or a new data directory".into(),
                ));
            }
            return Ok(Authority::load(td, &material, settings.ca_lifetimes)?);
        }
        let (ca, material) = match &settings.ca_root {
            Some(root) => Authority::from_root(
                td,
                &root.cert_pem,
                &root.key_pem,
                settings.ca_lifetimes,
                now,
            )?,
            None => Authority::generate(td, settings.ca_lifetimes, now)?,
        };
        if store.save_ca(&material, false, now).await? {
            tracing::info!(trust_domain = %td, supplied_root = settings.ca_root.is_some(), "created the CA");
            return Ok(ca);
        }
        // Another replica saved one first: use that.
        let material = store
            .load_ca()
            .await?
            .ok_or_else(|| BrokerError::Config("CA vanished".into()))?;
        Ok(Authority::load(td, &material, settings.ca_lifetimes)?)
    }

    /// The CA as it is now.
    pub(crate) fn ca(&self) -> Arc<Authority> {
        Arc::clone(
            &self
                .ca
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Replaces the intermediate when less than a third of its life is
    /// left. Returns whether it did.
    ///
    /// # Errors
    /// [`BrokerError`]; a root key the broker does not hold is logged once
    /// per check, not an error (the operator rotates elsewhere).
    pub async fn rotate_intermediate_if_due(&self) -> Result<bool, BrokerError> {
        let now = self.clock.now();
        let ca = self.ca();
        let lifetime = self.settings.ca_lifetimes.intermediate_secs;
        if ca.intermediate_expires_at().saturating_sub(now) > lifetime / 3 {
            return Ok(false);
        }
        self.replace_intermediate(None).await
    }

    /// Replaces the intermediate now (an admin asked: `actor`), and chains
    /// the broker's own server certificate to the new one. SVIDs issued
    /// under the old intermediate carry it in their chains and still
    /// verify against the unchanged root bundle until they expire, so no
    /// workload is cut off. Returns the new intermediate's expiry.
    ///
    /// # Errors
    /// [`BrokerError::Config`] when the broker does not hold the root key
    /// (a supplied root without its key); [`BrokerError`] otherwise.
    pub async fn rotate_intermediate_now(&self, actor: &SpiffeId) -> Result<u64, BrokerError> {
        let ca_before = self.ca().intermediate_expires_at();
        if !self.replace_intermediate(Some(actor)).await? {
            return Err(BrokerError::Config(
                "the broker does not hold the root CA key, so it cannot sign a new intermediate; rotate where the root key is".into(),
            ));
        }
        if let Some(certs) = self.server_certs.get() {
            certs.renew_now(self).map_err(BrokerError::Config)?;
        }
        let after = self.ca().intermediate_expires_at();
        tracing::info!(before = ca_before, after, admin = %actor, "intermediate CA rotated by an admin");
        Ok(after)
    }

    async fn replace_intermediate(&self, actor: Option<&SpiffeId>) -> Result<bool, BrokerError> {
        let now = self.clock.now();
        let ca = self.ca();
        let Some(material) = self.store.load_ca().await? else {
            return Ok(false);
        };
        let (next, material) = match Authority::rotate_intermediate(
            &self.settings.trust_domain,
            &material,
            self.settings.ca_lifetimes,
            now,
        ) {
            Ok(pair) => pair,
            Err(CaError::Material(why)) => {
                tracing::warn!(%why, expires_at = ca.intermediate_expires_at(), "the intermediate CA is due for rotation");
                return Ok(false);
            }
            Err(e) => return Err(e.into()),
        };
        self.store.save_ca(&material, true, now).await?;
        let expires_at = next.intermediate_expires_at();
        *self
            .ca
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(next);
        let mut event = AuditEvent::new(AuditKind::CaRotate, Outcome::Ok, now)
            .field("intermediate_expires_at", expires_at)
            .field("by", if actor.is_some() { "admin" } else { "schedule" });
        if let Some(actor) = actor {
            event = event.actor(actor);
        }
        self.audit(event).await;
        tracing::info!(expires_at, "rotated the intermediate CA");
        Ok(true)
    }

    /// What the broker counts.
    pub fn metrics(&self) -> &BrokerMetrics {
        &self.metrics
    }

    /// Every metric in Prometheus text format.
    pub async fn render_metrics(&self) -> String {
        let now = self.clock.now();
        let mut out = String::new();
        self.metrics.issuance.render(&mut out);
        self.metrics.issue_latency.render(&mut out);
        self.metrics.attestations.render(&mut out);
        self.metrics.policy_reloads.render(&mut out);
        self.listeners.render(&mut out);
        self.metrics.denied_calls.render(&mut out);
        match self.store.live_svids(now).await {
            Ok(n) => {
                #[expect(clippy::cast_precision_loss, reason = "a count far below 2^52")]
                let n = n as f64;
                crate::metrics::render_gauge(
                    &mut out,
                    "tally_broker_svids_live",
                    "X.509-SVIDs issued and not yet expired.",
                    &[],
                    &[(vec![], n)],
                );
            }
            Err(e) => tracing::warn!(error = %e, "counting live SVIDs for /metrics failed"),
        }
        match self.store.live_token_counts(now).await {
            Ok((total, principals, most)) => {
                #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
                let gauges = [
                    (
                        "tally_broker_live_tokens",
                        "Tokens issued and not yet expired.",
                        total as f64,
                    ),
                    (
                        "tally_broker_live_token_holders",
                        "Workloads holding at least one live token.",
                        principals as f64,
                    ),
                    (
                        "tally_broker_live_tokens_max_per_holder",
                        "Live tokens of the workload holding the most (a hoarding or looping client stands out without a label per workload).",
                        most as f64,
                    ),
                ];
                for (name, help, value) in gauges {
                    crate::metrics::render_gauge(&mut out, name, help, &[], &[(vec![], value)]);
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting live tokens for /metrics failed"),
        }
        let since = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .current_since(now);
        if let Some(since) = since {
            #[expect(clippy::cast_precision_loss, reason = "seconds, far below 2^52")]
            let age = now.saturating_sub(since) as f64;
            crate::metrics::render_gauge(
                &mut out,
                "tally_broker_signing_key_age_seconds",
                "How long the current token-signing key has been signing.",
                &[],
                &[(vec![], age)],
            );
        }
        out
    }

    /// Whether the broker can issue now; the reason when it cannot.
    ///
    /// # Errors
    /// What is missing, in words.
    pub async fn readiness(&self) -> Result<(), String> {
        if *self.closing.borrow() {
            return Err("shutting down".into());
        }
        let failing = self.listeners.failing();
        if !failing.is_empty() {
            return Err(failing.join("; "));
        }
        let now = self.clock.now();
        if self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .current(now)
            .is_none()
        {
            return Err("no signing key is active".into());
        }
        self.store
            .schema_version()
            .await
            .map(|_| ())
            .map_err(|e| format!("store unreachable: {e}"))
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

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The longest lifetime any token class may have under the current
    /// policy, seconds.
    fn longest_token_life(&self) -> u64 {
        longest_life(&self.policy())
    }

    /// The longest lifetime a token issued in the last
    /// [`ISSUANCE_SETTLE`] seconds can have: under the policy served now,
    /// or under any stored version in force meanwhile (another replica may
    /// still be serving one it has not replaced yet).
    async fn recent_longest_life(&self, now: u64) -> Result<u64, StoreError> {
        let mut longest = self.longest_token_life();
        for v in self
            .store
            .policy_versions_since(now.saturating_sub(ISSUANCE_SETTLE))
            .await?
        {
            match Policy::parse(&v.yaml) {
                Ok(p) => longest = longest.max(longest_life(&p)),
                // Never served by this build, so it issued nothing here;
                // another build may have served it: say so.
                Err(e) => {
                    tracing::warn!(version = v.version, error = %e, "a stored policy version does not parse; its lifetimes are not counted")
                }
            }
        }
        Ok(longest)
    }

    /// How long an entry revoking what `target` names up to
    /// `issued_before` must last: until the latest `exp` among the live
    /// tokens it covers that the inventory holds (every token is there
    /// before it leaves the broker, whatever policy it was issued under),
    /// and at least `issued_before` plus the longest lifetime of a policy
    /// served lately, for tokens being issued meanwhile.
    async fn covered_until(
        &self,
        target: &crate::token::RevocationTarget,
        issued_before: u64,
        now: u64,
    ) -> Result<u64, StoreError> {
        use crate::token::RevocationTarget;
        let (sub, jkt) = match target {
            RevocationTarget::Subject(s) => (Some(s.to_string()), None),
            RevocationTarget::Jkt(k) => (None, Some(k.to_string())),
            _ => (None, None),
        };
        let inventory = self
            .store
            .latest_live_exp(now, issued_before, sub.as_deref(), jkt.as_deref())
            .await?;
        let floor = issued_before.saturating_add(self.recent_longest_life(now).await?);
        Ok(inventory.map_or(floor, |exp| exp.max(floor)))
    }

    /// Asks the inventory how long the tokens of retired keys live, for
    /// keys past the current policy's lifetimes (see
    /// [`SigningKeys::jwks`]).
    async fn look_up_retired_keys(&self) -> Result<(), StoreError> {
        let now = self.clock.now();
        let unchecked = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .unchecked_retired(now, self.longest_token_life(), TOKEN_LEEWAY);
        if unchecked.is_empty() {
            return Ok(());
        }
        let live: std::collections::HashMap<String, u64> =
            self.store.live_exp_by_kid(now).await?.into_iter().collect();
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for kid in unchecked {
            keys.note_signed_until(&kid, live.get(&kid).copied().unwrap_or(0));
        }
        Ok(())
    }

    /// The JWKS to publish now.
    pub fn jwks(&self) -> crate::token::Jwks {
        let max_ttl = self.longest_token_life();
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .jwks(self.clock.now(), max_ttl, TOKEN_LEEWAY)
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

    /// Revokes tokens, durably: the entry is committed to the change feed
    /// (and so reaches every Watch subscriber) before this returns, then
    /// audited with `actor`. `issued_before` (default now) bounds the
    /// workload, DPoP key and everything targets. The entry expires, plus
    /// the verifiers' leeway, when no token it covers can be live: a jti
    /// at its token's own `exp`; the others at the latest `exp` the
    /// inventory holds for what they cover (see `covered_until`), never
    /// from the current policy alone, which may have been narrowed since
    /// those tokens were issued. A signing-key entry never expires: a
    /// token forged with the key carries any `exp` the forger chose.
    ///
    /// # Errors
    /// [`BrokerError::Revoke`] for an unknown jti or a time in the future;
    /// [`BrokerError::Store`].
    pub async fn revoke(
        &self,
        target: crate::token::RevocationTarget,
        issued_before: Option<u64>,
        reason: &str,
        actor: &SpiffeId,
    ) -> Result<(u64, crate::token::Revocation), BrokerError> {
        use crate::token::{Revocation, RevocationTarget};
        let now = self.clock.now();
        let issued_before = issued_before.unwrap_or(now);
        if issued_before > now {
            return Err(BrokerError::Revoke(format!(
                "issued_before {issued_before} is in the future (now {now})"
            )));
        }
        let expires_at = match &target {
            RevocationTarget::Jti(jti) => {
                self.store.token_exp(jti).await?.ok_or_else(|| {
                    BrokerError::Revoke(format!("no token with jti {jti:?} in the inventory"))
                })? + TOKEN_LEEWAY
            }
            RevocationTarget::Kid(_) => crate::token::revocation::NEVER,
            RevocationTarget::Subject(_)
            | RevocationTarget::Jkt(_)
            | RevocationTarget::Everything => {
                self.covered_until(&target, issued_before, now).await? + TOKEN_LEEWAY
            }
        };
        let reason: String = crate::auth::answer::safe_description(reason)
            .chars()
            .take(crate::token::revocation::MAX_REASON)
            .collect();
        let revocation = Revocation {
            target,
            issued_before,
            expires_at,
            reason,
        };
        let at_ms = self.clock.now().saturating_mul(1000);
        let seq = self
            .store
            .append_change("revocation", &revocation.to_json(), at_ms)
            .await?;
        self.feed_advanced(seq);
        let (target_kind, value) = revocation.target.kind_and_value();
        let mut event = AuditEvent::new(AuditKind::Revoke, Outcome::Ok, now).actor(actor);
        if let RevocationTarget::Jti(jti) = &revocation.target {
            // Under `jti` too, so the token's lookup finds its revocation.
            event = event.field("jti", jti.as_str());
        }
        self.audit(
            event
                .field("target", target_kind)
                .field("value", value)
                .field("issued_before", issued_before)
                .field("expires_at", expires_at)
                .field("reason", revocation.reason.as_str())
                .field("sequence", seq),
        )
        .await;
        tracing::info!(sequence = seq, target = target_kind, "revoked");
        Ok((seq, revocation))
    }

    /// A token this broker issued, found from the token string alone: by
    /// its `jti` in the inventory, confirmed by the keyed hash of the whole
    /// string (so a forged token naming a real `jti` finds nothing); with
    /// whether a revocation in force covers it.
    ///
    /// # Errors
    /// [`BrokerError::Store`].
    pub async fn find_token(
        &self,
        token: &str,
    ) -> Result<Option<(crate::store::IssuedToken, bool)>, BrokerError> {
        let Some(jti) = unverified_jti(token) else {
            return Ok(None);
        };
        let Some(found) = self
            .store
            .token_by_jti(&jti, &self.token_hmac(token))
            .await?
        else {
            return Ok(None);
        };
        let set = self.revocations_in_force().await?;
        let revoked = is_revoked(&set, &found);
        Ok(Some((found, revoked)))
    }

    /// Every revocation that can still match a live token.
    ///
    /// # Errors
    /// [`BrokerError::Store`].
    pub async fn revocations_in_force(&self) -> Result<crate::token::RevocationSet, BrokerError> {
        let now = self.clock.now();
        let mut set = crate::token::RevocationSet::default();
        for change in self.store.current_state(now).await? {
            if change.kind == "revocation"
                && let Ok(r) = crate::token::Revocation::from_json(&change.body)
            {
                set.insert(r, now);
            }
        }
        Ok(set)
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
        let id: SpiffeId = format!("{}{BROKER_PATH}", self.settings.trust_domain)
            .parse()
            .map_err(|e| BrokerError::Config(format!("broker ID: {e}")))?;
        Ok(self
            .ca()
            .issue_credential(&id, dns, ips, 7 * 86_400, self.clock.now())?)
    }

    /// The server certificate for the broker's listeners, naming
    /// `spiffe://<td>/tally/broker` and these DNS names and IPs; made on
    /// the first call (later calls return the same one) and renewed by
    /// [`Broker::maintain`] before it expires.
    ///
    /// # Errors
    /// [`BrokerError::Config`] if the CA cannot issue it.
    pub fn server_certs(
        &self,
        dns: &[String],
        ips: &[std::net::IpAddr],
    ) -> Result<Arc<tls::ServerCerts>, BrokerError> {
        if let Some(certs) = self.server_certs.get() {
            return Ok(Arc::clone(certs));
        }
        let certs = Arc::new(
            tls::ServerCerts::new(self, dns.to_vec(), ips.to_vec()).map_err(BrokerError::Config)?,
        );
        Ok(Arc::clone(self.server_certs.get_or_init(|| certs)))
    }

    /// A credential for `id` (admin tooling, `tally ctl svid mint`).
    ///
    /// # Errors
    /// [`BrokerError::Ca`].
    pub fn mint_credential(&self, id: &SpiffeId, ttl: u64) -> Result<Credential, BrokerError> {
        Ok(self
            .ca()
            .issue_credential(id, &[], &[], ttl, self.clock.now())?)
    }

    /// Makes a join token for `id`, valid for `ttl` seconds, and audits
    /// it (with `actor`, the admin who asked, if any).
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn create_join_token(
        &self,
        id: &SpiffeId,
        ttl: u64,
        actor: Option<&SpiffeId>,
    ) -> Result<crate::identity::JoinToken, BrokerError> {
        if id.trust_domain() != self.settings.trust_domain.trust_domain() {
            return Err(BrokerError::Config(format!(
                "{id} is not in trust domain {}",
                self.settings.trust_domain
            )));
        }
        let token = crate::identity::JoinToken::generate().map_err(|_| BrokerError::Random)?;
        let now = self.clock.now();
        let hash = token.hash();
        self.store
            .create_join_token(&hash, id, now + ttl, now)
            .await?;
        let mut event = AuditEvent::new(AuditKind::JoinTokenCreate, Outcome::Ok, now)
            .field("spiffe_id", id.as_str())
            .field("expires_at", now + ttl)
            .field("join_token_sha256", crate::audit::hex(&hash.0));
        if let Some(actor) = actor {
            event = event.actor(actor);
        }
        self.record(None, event).await?;
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

    /// Rotates the token-signing key (see [`SigningKeys::rotate`]): the
    /// new key signs from `now + publish_lead`. Audited, with `actor` if an
    /// admin asked. Returns the new key id and when it starts signing.
    ///
    /// # Errors
    /// [`BrokerError::Keys`].
    pub async fn rotate_signing_key(
        &self,
        publish_lead: u64,
        actor: Option<&SpiffeId>,
    ) -> Result<(String, u64), BrokerError> {
        let now = self.clock.now();
        // The store write happens outside the lock; the in-memory set is
        // swapped in afterwards.
        let mut keys = SigningKeys::load_or_create(&self.store, &self.settings.issuer, now).await?;
        let (kid, _) = keys.rotate(&self.store, now, publish_lead).await?;
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        let mut event = AuditEvent::new(AuditKind::KeyRotate, Outcome::Ok, now)
            .field("kid", kid.as_str())
            .field("signs_from", now + publish_lead);
        if let Some(actor) = actor {
            event = event.actor(actor);
        }
        self.audit(event.field("by", if actor.is_some() { "admin" } else { "schedule" }))
            .await;
        tracing::info!(%kid, signs_from = now + publish_lead, "token-signing key rotated");
        // Subscribers learn the new key at once.
        self.publish_state().await?;
        Ok((kid, now + publish_lead))
    }

    /// The leaked-signing-key runbook in one step: a new key signs from
    /// now, the keys it replaces are withdrawn (they leave the JWKS, so
    /// nothing they signed verifies any more) and every token they signed
    /// is revoked by `kid` whatever its `iat` (a leaked key can write any),
    /// for verifiers holding the old JWKS. Returns the new key id and the
    /// withdrawn ones.
    ///
    /// # Errors
    /// [`BrokerError::Keys`], [`BrokerError::Store`].
    pub async fn replace_leaked_signing_key(
        &self,
        actor: &SpiffeId,
        reason: &str,
    ) -> Result<(String, Vec<String>), BrokerError> {
        let now = self.clock.now();
        let mut keys = SigningKeys::load_or_create(&self.store, &self.settings.issuer, now).await?;
        let (kid, old) = keys.rotate(&self.store, now, 0).await?;
        keys.withdraw(&self.store, &old, now).await?;
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        self.audit(
            AuditEvent::new(AuditKind::KeyRotate, Outcome::Ok, now)
                .actor(actor)
                .field("kid", kid.as_str())
                .field("signs_from", now)
                .field("by", "admin")
                .field("withdrawn", old.clone()),
        )
        .await;
        tracing::warn!(%kid, withdrawn = ?old, "token-signing key replaced after a leak");
        // The new JWKS first (Watch delivers in order): verifiers know the
        // new key before holders drop the old key's tokens and fetch new
        // ones.
        self.publish_state().await?;
        for leaked in &old {
            self.revoke(
                crate::token::RevocationTarget::Kid(leaked.clone()),
                None,
                reason,
                actor,
            )
            .await?;
        }
        Ok((kid, old))
    }

    /// How a broker listener called `name` serves: the configured limits,
    /// counted for `/readyz` and `/metrics`.
    fn listen(&self, name: &'static str) -> crate::http::Listen {
        let listen = crate::http::Listen::new(name).limits(self.settings.limits);
        self.listeners.add(listen.stats());
        listen
    }

    /// Whether `id` may call admin RPCs.
    pub fn is_admin(&self, id: &SpiffeId) -> bool {
        self.settings.admins.contains(id)
    }
}

/// Runs the gRPC server (Identity, Tokens, Watch, Admin, Reports) with
/// TLS on `listener` until `shutdown` resolves: then Watch streams end,
/// and in-flight calls finish before this returns. Connections are served
/// by the same loop as every other listener ([`crate::http::serve`]:
/// timeouts, connection cap, back-pressure), with the renewing
/// certificate; handlers find the client's certificates in the request's
/// [`crate::http::Peer`].
///
/// # Errors
/// If TLS cannot be set up.
pub async fn serve(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    certs: Arc<tls::ServerCerts>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    use tower_service::Service as _;
    let config = tls::server_config(&broker, certs, &[b"h2"]).map_err(std::io::Error::other)?;
    let routes = tonic::service::Routes::builder()
        .add_service(grpc::identity_server(Arc::clone(&broker)))
        .add_service(grpc::tokens_server(Arc::clone(&broker)))
        .add_service(grpc::watch_server(Arc::clone(&broker)))
        .add_service(admin_rpc::admin_server(Arc::clone(&broker)))
        .add_service(reports::reports_server(Arc::clone(&broker)))
        .clone()
        .routes()
        .prepare();
    let listen = broker.listen("grpc").tls(config).http2_only();
    // With a store shared by replicas, follow what the others commit.
    let following = tokio::spawn(replicas::follow(Arc::downgrade(&broker)));
    let closing = Arc::clone(&broker);
    let result = crate::http::serve(
        listener,
        listen,
        move |mut req, peer| {
            let mut routes = routes.clone();
            req.extensions_mut().insert(peer);
            async move {
                match routes.call(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        },
        async move {
            shutdown.await;
            // Ends the Watch streams, so their connections can close.
            closing.close();
        },
    )
    .await;
    following.abort();
    result
}

/// Runs the HTTPS listener (OAuth token endpoint, JWKS, metadata) on
/// `listener` until `shutdown` resolves, then lets requests in flight
/// finish.
///
/// # Errors
/// If TLS cannot be set up or accepting fails.
pub async fn serve_https(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    certs: Arc<tls::ServerCerts>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let tls =
        tls::server_config(&broker, certs, &[b"h2", b"http/1.1"]).map_err(std::io::Error::other)?;
    crate::http::serve(
        listener,
        broker.listen("https").tls(tls),
        move |req, peer| oauth::handle(Arc::clone(&broker), req, peer),
        shutdown,
    )
    .await
}

/// Runs the admin port (`/metrics`, `/healthz`, `/readyz`, plain HTTP) on
/// `listener` until `shutdown` resolves.
///
/// # Errors
/// If accepting fails.
pub async fn serve_admin(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    crate::http::serve(
        listener,
        broker.listen("admin"),
        move |req, peer| admin_port::handle(Arc::clone(&broker), req, peer),
        shutdown,
    )
    .await
}

/// Runs [`Broker::maintain`] every `every` until the broker closes.
pub async fn run_maintenance(broker: Arc<Broker>, every: std::time::Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = broker.closed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = broker.maintain().await {
            tracing::error!(error = %e, "broker upkeep (key rotation, change feed) failed; retrying");
        }
    }
}
