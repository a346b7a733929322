//! Broker replicas sharing a PostgreSQL store. Each listens for change-feed
//! commits (LISTEN `tally_changes`); on a notification, and every few
//! seconds in case one was missed while the listening connection was
//! down, it reads the feed past what it has seen:
//!
//! - its Watch subscribers are woken, so a revocation made on any replica
//!   reaches every sidecar;
//! - a JWKS, bundle or policy that another replica published is loaded
//!   here too (the new signing keys, the rotated intermediate, the applied
//!   policy version), so every replica signs, issues and decides alike;
//! - an identity another replica denied or allowed is denied or allowed
//!   here too, before this replica's Watch subscribers are woken (so the
//!   denied workload's own stream ends).
//!
//! With the embedded SQLite store there is one broker and nothing to do.

use super::Broker;
use crate::store::Change;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// How often the feed is read even without a notification.
const CATCH_UP: Duration = Duration::from_secs(5);

/// Follows the other replicas until the broker closes.
pub(crate) async fn follow(broker: Weak<Broker>) {
    let Some(b) = broker.upgrade() else {
        return;
    };
    let mut listener = match b.store.listen_changes().await {
        Ok(Some(listener)) => listener,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for other replicas' changes; they reach this replica's subscribers only at the periodic catch-up");
            return follow_by_polling(broker).await;
        }
    };
    let mut closing = b.closing.subscribe();
    let mut seen = *b.changes.borrow();
    drop(b);
    let mut tick = tokio::time::interval(CATCH_UP);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            note = listener.recv() => {
                if let Err(e) = note {
                    // The listener reconnects on the next recv; the tick
                    // catches up on what was missed meanwhile.
                    tracing::warn!(error = %e, "listening for other replicas' changes failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            _ = tick.tick() => {}
            changed = closing.changed() => {
                if changed.is_err() || *closing.borrow() {
                    return;
                }
            }
        }
        let Some(b) = broker.upgrade() else {
            return;
        };
        seen = b.catch_up(seen).await;
    }
}

async fn follow_by_polling(broker: Weak<Broker>) {
    let mut tick = tokio::time::interval(CATCH_UP);
    let mut seen = match broker.upgrade() {
        Some(b) => *b.changes.borrow(),
        None => return,
    };
    loop {
        tick.tick().await;
        let Some(b) = broker.upgrade() else {
            return;
        };
        if *b.closing.borrow() {
            return;
        }
        seen = b.catch_up(seen).await;
    }
}

impl Broker {
    /// Reads the feed after `seen`, takes in what other replicas published,
    /// wakes this replica's Watch subscribers; returns the last sequence
    /// read.
    async fn catch_up(self: &Arc<Self>, mut seen: u64) -> u64 {
        // Only the newest change of each kind matters (it supersedes the
        // others), and comparing only it with what this replica published
        // last keeps an older change of ours from looking foreign.
        let mut newest: std::collections::BTreeMap<String, Change> = Default::default();
        loop {
            let changes = match self.store.changes_after(seen, 1000).await {
                Ok(changes) => changes,
                Err(e) => {
                    tracing::warn!(error = %e, "reading the change feed failed");
                    break;
                }
            };
            let Some(last) = changes.last().map(|c| c.seq) else {
                break;
            };
            for change in changes {
                // Every denial counts, not only the newest: each names its
                // own identity.
                if change.kind == "denial" {
                    self.take_in_denial(&change);
                }
                newest.insert(change.kind.clone(), change);
            }
            seen = last;
        }
        for change in newest.values() {
            if let Err(e) = self.take_in(change).await {
                tracing::error!(kind = change.kind, seq = change.seq, error = %e, "could not take in another replica's change");
            }
        }
        self.feed_advanced(seen);
        seen
    }

    /// Loads what a change another replica made means for this one.
    async fn take_in(&self, change: &Change) -> Result<(), super::BrokerError> {
        let kind: &'static str = match change.kind.as_str() {
            "jwks" => "jwks",
            "bundle" => "bundle",
            "policy" => "policy",
            // Revocations are read from the store by each Watch stream;
            // denials were taken in as they were read.
            _ => return Ok(()),
        };
        let mut published = self.published.lock().await;
        if published.get(kind) == Some(&change.body) {
            return Ok(()); // ours, or already taken in
        }
        let now = self.clock.now();
        match kind {
            "jwks" => {
                let keys =
                    super::SigningKeys::load_or_create(&self.store, &self.settings.issuer, now)
                        .await?;
                *self
                    .keys
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
            }
            "bundle" => {
                let material = self
                    .store
                    .load_ca()
                    .await?
                    .ok_or_else(|| super::BrokerError::Config("the CA vanished".into()))?;
                let ca = crate::ca::Authority::load(
                    &self.settings.trust_domain,
                    &material,
                    self.settings.ca_lifetimes,
                )?;
                *self
                    .ca
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(ca);
            }
            _ => {
                if self.settings.policy_source == super::PolicySource::Store
                    && let Some(v) = self.store.policy_version(None).await?
                {
                    let policy = crate::policy::Policy::parse(&v.yaml).map_err(|e| {
                        super::BrokerError::Config(format!(
                            "stored policy version {}: {e}",
                            v.version
                        ))
                    })?;
                    *self
                        .policy
                        .write()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(policy);
                }
            }
        }
        tracing::info!(
            kind,
            seq = change.seq,
            "took in a change made by another replica"
        );
        published.insert(kind, change.body.clone());
        Ok(())
    }
}
