//! Token-signing keys: the first is made on first start; rotation publishes
//! the next key in the JWKS before it signs, and keeps a retired key
//! published until every token it signed has expired (by the inventory,
//! not by the current policy's lifetimes, which may have been narrowed
//! since), so no token is ever unverifiable during a rotation. A leaked
//! key is withdrawn instead: it leaves the JWKS at once, so nothing it
//! signed verifies any more.

use super::{Broker, BrokerError, TOKEN_LEEWAY};
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::identity::SpiffeId;
use crate::jose::SigningKey;
use crate::store::{SigningKeyRecord, Store, StoreError};
use crate::token::{Jwks, TokenSigner};

/// Why key management failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A stored key does not load, or a new one cannot be made.
    #[error("signing key: {0}")]
    Key(#[from] crate::jose::KeyError),
}

/// What a signing key does at a moment, as `tally ctl keys list` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyState {
    /// It signs new tokens now (a key whose retirement is still ahead
    /// signs until its successor starts).
    Signing,
    /// Published ahead of a rotation; it starts signing later.
    Next,
    /// Replaced: it signs nothing new, and stays published while tokens
    /// it signed may live.
    Retired,
    /// Withdrawn after a leak: never signs, never published.
    Withdrawn,
}

impl KeyState {
    /// The state of a key that signs from `sign_from`, withdrawn or not,
    /// given whether it is the one [`SigningKeys::current`] signs with at
    /// `now`.
    pub fn of(sign_from: u64, withdrawn: bool, is_current: bool, now: u64) -> Self {
        if withdrawn {
            Self::Withdrawn
        } else if is_current {
            Self::Signing
        } else if sign_from > now {
            Self::Next
        } else {
            Self::Retired
        }
    }

    /// Its lower-case name (`signing`, `next`, `retired`, `withdrawn`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signing => "signing",
            Self::Next => "next",
            Self::Retired => "retired",
            Self::Withdrawn => "withdrawn",
        }
    }
}

struct Managed {
    signer: TokenSigner,
    sign_from: u64,
    retired_at: Option<u64>,
    withdrawn: bool,
    /// For a retired key, the latest `exp` the inventory held for live
    /// tokens it signed when last asked (0: none); `None` until asked.
    signed_until: Option<u64>,
}

/// The broker's signing keys, oldest first.
pub struct SigningKeys {
    keys: Vec<Managed>,
    issuer: String,
}

impl std::fmt::Debug for SigningKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field(
                "kids",
                &self.keys.iter().map(|k| k.signer.kid()).collect::<Vec<_>>(),
            )
            .finish()
    }
}

impl SigningKeys {
    /// Loads the stored keys, making and storing a first one (signing from
    /// `now`) if there are none.
    ///
    /// # Errors
    /// [`KeyError`].
    pub async fn load_or_create(store: &Store, issuer: &str, now: u64) -> Result<Self, KeyError> {
        let mut keys = Self {
            keys: Vec::new(),
            issuer: issuer.to_owned(),
        };
        for record in store.signing_keys().await? {
            let key = SigningKey::from_pkcs8_der(&record.pkcs8)?;
            keys.keys.push(Managed {
                signer: TokenSigner::new(key, record.kid, issuer),
                sign_from: record.sign_from,
                retired_at: record.retired_at,
                withdrawn: record.withdrawn_at.is_some(),
                signed_until: None,
            });
        }
        if keys.keys.is_empty() {
            keys.add(store, now, now).await?;
        }
        Ok(keys)
    }

    async fn add(&mut self, store: &Store, now: u64, sign_from: u64) -> Result<String, KeyError> {
        let key = SigningKey::generate()?;
        // The thumbprint names the key: unique, and checkable by anyone
        // holding the JWKS.
        let kid = key.thumbprint().to_string();
        store
            .insert_signing_key(&SigningKeyRecord {
                kid: kid.clone(),
                pkcs8: key.to_pkcs8_der()?,
                created_at: now,
                sign_from,
                retired_at: None,
                withdrawn_at: None,
            })
            .await?;
        self.keys.push(Managed {
            signer: TokenSigner::new(key, kid.clone(), &self.issuer),
            sign_from,
            retired_at: None,
            withdrawn: false,
            signed_until: None,
        });
        Ok(kid)
    }

    /// Starts a rotation: a new key is published now and signs from
    /// `now + publish_lead`; the key signing until then is retired at that
    /// moment. With `publish_lead = 0` (incident response) the new key signs
    /// at once. Returns the new key's id and the ids of the keys it
    /// replaces.
    ///
    /// # Errors
    /// [`KeyError`].
    pub async fn rotate(
        &mut self,
        store: &Store,
        now: u64,
        publish_lead: u64,
    ) -> Result<(String, Vec<String>), KeyError> {
        let sign_from = now + publish_lead;
        let retiring: Vec<String> = self
            .keys
            .iter()
            .filter(|k| k.retired_at.is_none())
            .map(|k| k.signer.kid().to_owned())
            .collect();
        let kid = self.add(store, now, sign_from).await?;
        for old in &retiring {
            store.retire_signing_key(old, sign_from).await?;
            if let Some(k) = self.keys.iter_mut().find(|k| k.signer.kid() == old) {
                k.retired_at = Some(sign_from);
            }
        }
        Ok((kid, retiring))
    }

    /// Withdraws keys (leaked): they stop signing now and leave the JWKS.
    /// Refuses to withdraw the only key that could sign.
    ///
    /// # Errors
    /// [`KeyError`].
    pub async fn withdraw(
        &mut self,
        store: &Store,
        kids: &[String],
        now: u64,
    ) -> Result<(), KeyError> {
        for kid in kids {
            store.withdraw_signing_key(kid, now).await?;
            if let Some(k) = self.keys.iter_mut().find(|k| k.signer.kid() == kid) {
                k.withdrawn = true;
                k.retired_at = Some(k.retired_at.map_or(now, |r| r.min(now)));
            }
        }
        Ok(())
    }

    /// The key that signs at `now`: the newest whose `sign_from` has come
    /// and which is not retired by then.
    pub fn current(&self, now: u64) -> Option<&TokenSigner> {
        self.current_key(now).map(|k| &k.signer)
    }

    /// The id of the key that signs at `now` (see [`Self::current`]).
    pub fn current_kid(&self, now: u64) -> Option<&str> {
        self.current_key(now).map(|k| k.signer.kid())
    }

    /// When the newest key starts (or started) signing: later than `now`
    /// while a rotation is being published.
    pub fn newest_sign_from(&self) -> Option<u64> {
        self.keys.iter().map(|k| k.sign_from).max()
    }

    /// Since when the current key has been signing (for the key-age
    /// metric).
    pub fn current_since(&self, now: u64) -> Option<u64> {
        self.current_key(now).map(|k| k.sign_from)
    }

    fn current_key(&self, now: u64) -> Option<&Managed> {
        // A withdrawn key never signs again.
        let usable = || self.keys.iter().rev().filter(|k| !k.withdrawn);
        usable()
            .find(|k| k.sign_from <= now && k.retired_at.is_none_or(|r| r > now))
            .or_else(|| {
                // A retired key whose successor is not signing yet keeps
                // signing: there must always be one.
                usable().find(|k| k.sign_from <= now)
            })
    }

    /// The keys to publish at `now`: every key not yet retired, and every
    /// retired key that may still have signed a live token: retired less
    /// than `max_token_ttl + leeway` ago (tokens it signed last may not be
    /// in the inventory yet), not yet looked up in the inventory, or with
    /// a token the inventory says lives until past `now - leeway`. Never a
    /// withdrawn key.
    pub fn jwks(&self, now: u64, max_token_ttl: u64, leeway: u64) -> Jwks {
        let mut jwks = Jwks::default();
        for k in &self.keys {
            let live = !k.withdrawn
                && k.retired_at.is_none_or(|r| {
                    r.saturating_add(max_token_ttl).saturating_add(leeway) > now
                        || k.signed_until
                            .is_none_or(|u| u.saturating_add(leeway) > now)
                });
            if live {
                jwks.insert(k.signer.kid(), k.signer.key().public_key().clone());
            }
        }
        jwks
    }

    /// Retired keys, not withdrawn, past `max_token_ttl + leeway` since
    /// retirement, whose tokens the inventory has not been asked about:
    /// whether they stay published depends on it. Once asked, a key is not
    /// asked again (retired, it signs nothing new).
    pub fn unchecked_retired(&self, now: u64, max_token_ttl: u64, leeway: u64) -> Vec<String> {
        self.keys
            .iter()
            .filter(|k| {
                !k.withdrawn
                    && k.signed_until.is_none()
                    && k.retired_at.is_some_and(|r| {
                        r.saturating_add(max_token_ttl).saturating_add(leeway) <= now
                    })
            })
            .map(|k| k.signer.kid().to_owned())
            .collect()
    }

    /// Records the latest `exp` of the live tokens `kid` signed (0: none).
    pub fn note_signed_until(&mut self, kid: &str, until: u64) {
        if let Some(k) = self.keys.iter_mut().find(|k| k.signer.kid() == kid) {
            k.signed_until = Some(until);
        }
    }
}

impl Broker {
    /// Asks the inventory how long the tokens of retired keys live, for
    /// keys past the current policy's lifetimes (see
    /// [`SigningKeys::jwks`]).
    pub(super) async fn look_up_retired_keys(&self) -> Result<(), StoreError> {
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

    /// The id of the key that signs now, by the broker's clock.
    pub fn signing_kid(&self) -> Option<String> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .current_kid(self.clock.now())
            .map(str::to_owned)
    }

    /// The JWKS to publish now.
    pub fn jwks(&self) -> crate::token::Jwks {
        let max_ttl = self.longest_token_life();
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .jwks(self.clock.now(), max_ttl, TOKEN_LEEWAY)
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
}
