//! Revocation: entries committed to the change feed, lifetimes that
//! outlive every token they cover, and the inventory lookups behind them.

use super::{Broker, BrokerError, ISSUANCE_SETTLE, TOKEN_LEEWAY};
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::identity::SpiffeId;
use crate::policy::Policy;
use crate::store::StoreError;

/// Whether `set` covers an inventory record.
pub(crate) fn is_revoked(set: &crate::token::RevocationSet, t: &crate::store::IssuedToken) -> bool {
    set.covers(&crate::token::TokenRef {
        jti: &t.jti,
        sub: &t.sub,
        jkt: t.jkt.as_ref(),
        kid: &t.kid,
        iat: t.iat,
    })
}

/// The `jti` claim of a compact JWS, read with the JWS parser's limits
/// but without checking the signature.
pub(crate) fn unverified_jti(token: &str) -> Option<String> {
    let jws = crate::jose::jws::Jws::parse(token, &crate::jose::jws::Limits::default()).ok()?;
    let jti = jws.payload().get("jti")?.as_str()?;
    (!jti.is_empty() && jti.len() <= 256).then(|| jti.to_owned())
}

impl Broker {
    /// The longest lifetime any token may have under the current policy
    /// (its classes and its WIT rules), seconds.
    pub(super) fn longest_token_life(&self) -> u64 {
        self.policy().longest_token_life()
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
                Ok(p) => longest = longest.max(p.longest_token_life()),
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
}
