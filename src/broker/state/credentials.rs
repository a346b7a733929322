//! The broker's CA and the credentials it hands out: the intermediate
//! and its rotation, the listeners' and admins' certificates, join
//! tokens.

use super::{BROKER_PATH, Broker, BrokerError, BrokerSettings};
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::ca::{Authority, CaError, Credential};
use crate::identity::SpiffeId;
use crate::store::Store;
use std::sync::Arc;

impl Broker {
    /// Loads the CA from the store, or makes one on first start (under the
    /// supplied root, if any). A supplied root must match a stored one.
    pub(super) async fn open_ca(
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
}
