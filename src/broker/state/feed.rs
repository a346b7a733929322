//! The change feed Watch subscribers follow, and the periodic upkeep
//! that rotates keys and publishes what changed.

use super::{Broker, BrokerError};
use crate::store::StoreError;

impl Broker {
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
        // The listeners' certificate follows by itself (see
        // `serve::tls::ServerCerts`).
        self.rotate_intermediate_if_due().await?;
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
}
