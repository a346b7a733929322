//! WIMSE Workload Identity Token issuance (`Tokens.IssueWit`): the caller
//! may hold a WIT when a `wit:` rule of the trust policy names it. The
//! WIT binds the public key of the client certificate the caller called
//! with (the TLS handshake proved possession of it, so the request
//! carries no key), lives as long as the rule allows and never past that
//! certificate's `notAfter`, is signed with the current token-signing key
//! (the one JWT-SVIDs and access tokens are signed with; a key set of its
//! own is not built), and is recorded (inventory and audit, durably)
//! before it leaves the broker, like a JWT-SVID.

use super::Broker;
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::identity::k8s::Pod;
use crate::identity::{PeerError, SpiffeId};
use crate::policy::WitDenial;
use crate::store::{IssuedToken, Write};
use crate::token::{Scopes, TokenClass, TokenKind};
use crate::wimse::wit::{self, Wit, WitClaims};

/// One WIT request, from an authenticated caller.
#[derive(Debug)]
pub struct WitInput<'a> {
    /// The authenticated caller (from its client certificate): the `sub`.
    pub caller: &'a SpiffeId,
    /// The leaf of the caller's client certificate (DER, verified by the
    /// TLS layer): its key is the one bound, its `notAfter` caps the life.
    pub certificate: &'a [u8],
    /// Lifetime asked for, if any (capped by the rule and the
    /// certificate).
    pub ttl: Option<u64>,
    /// Which front end took the request (`grpc`), for audit.
    pub via: &'static str,
    /// The pod the caller's SVID was attested by, if any, for the audit
    /// record.
    pub pod: Option<&'a Pod>,
}

/// A WIT and what it says.
#[derive(Debug)]
pub struct IssuedWit {
    /// The signed WIT.
    pub wit: Wit,
    /// Its claims.
    pub claims: WitClaims,
}

/// Why no WIT was issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WitError {
    /// The client certificate's key is not a P-256 key: a WIT binds an
    /// ES256 key.
    #[error(
        "the client certificate's key is not a P-256 key; a WIT binds the caller's key for ES256 proofs"
    )]
    KeyNotP256,
    /// The client certificate could not be read.
    #[error("client certificate: {0}")]
    Certificate(PeerError),
    /// The client certificate has expired (the connection outlived it):
    /// a WIT never outlives the key's certificate.
    #[error(
        "the client certificate expired at {not_after} (now {now}) and a WIT cannot outlive it: renew, then call again with the new certificate"
    )]
    CertificateExpired {
        /// Its `notAfter`, Unix seconds.
        not_after: u64,
        /// The broker's time, Unix seconds.
        now: u64,
    },
    /// The trust policy does not let the caller hold a WIT.
    #[error("{0}")]
    Denied(#[from] WitDenial),
    /// A fault inside the broker (logged where it happened).
    #[error("internal error")]
    Internal,
}

impl WitError {
    /// How the audit record of this refusal reads: an error of ours, or a
    /// "no".
    pub fn outcome(&self) -> Outcome {
        if matches!(self, Self::Internal) {
            Outcome::Error
        } else {
            Outcome::Denied
        }
    }

    /// The short label used in metrics and audit records.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::KeyNotP256 => "key_not_p256",
            Self::Certificate(_) => "bad_certificate",
            Self::CertificateExpired { .. } => "certificate_expired",
            Self::Denied(WitDenial::NoRule { .. }) => "no_rule",
            Self::Internal => "internal",
        }
    }
}

fn internal(context: &str, error: impl std::fmt::Display) -> WitError {
    tracing::error!(%error, "{context}");
    WitError::Internal
}

/// The lifetime of a WIT granted `granted` seconds for a key whose
/// certificate expires at `not_after`: never past it.
///
/// # Errors
/// [`WitError::CertificateExpired`] when the certificate has no second
/// left at `now`.
fn lifetime(granted: u64, not_after: u64, now: u64) -> Result<u64, WitError> {
    match not_after.saturating_sub(now) {
        0 => Err(WitError::CertificateExpired { not_after, now }),
        left => Ok(granted.min(left).max(1)),
    }
}

impl Broker {
    /// Issues a WIT naming the caller and binding its client
    /// certificate's key: a `wit:` rule must name the caller, the
    /// lifetime is the one asked for (or the rule's) capped by the rule
    /// and the certificate's `notAfter`, and the WIT is durably recorded
    /// before it is returned.
    ///
    /// # Errors
    /// [`WitError`]; every refusal is also logged, counted and audited
    /// with its reason.
    pub async fn issue_wit(&self, input: &WitInput<'_>) -> Result<IssuedWit, WitError> {
        let now = self.clock.now();
        let result = self.issue_wit_checked(input, now).await;
        match &result {
            Ok(_) => self.metrics.wit_issuance.inc(&["issued"]),
            Err(e) => {
                self.metrics.wit_issuance.inc(&[e.reason()]);
                let event = AuditEvent::new(AuditKind::WitIssue, e.outcome(), now)
                    .actor(input.caller)
                    .field("reason", e.reason())
                    .field("detail", e.to_string())
                    .field("via", input.via);
                self.audit(with_pod(event, input.pod)).await;
            }
        }
        result
    }

    async fn issue_wit_checked(
        &self,
        input: &WitInput<'_>,
        now: u64,
    ) -> Result<IssuedWit, WitError> {
        let (key, not_after) =
            crate::identity::key_and_expiry(input.certificate).map_err(|e| match e {
                PeerError::NotP256 => WitError::KeyNotP256,
                other => WitError::Certificate(other),
            })?;
        let grant = self
            .policy()
            .decide_wit(input.caller, input.ttl)
            .inspect_err(|denial| {
                tracing::info!(caller = %input.caller, reason = %denial, "WIT denied");
            })?;
        let ttl = lifetime(grant.ttl, not_after, now)?;

        let (wit, claims) = {
            let keys = self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let signer = keys
                .current(now)
                .ok_or_else(|| internal("issuing a WIT", "no signing key is active"))?;
            wit::mint(signer, input.caller, &key, ttl, now)
                .map_err(|e| internal("signing a WIT", e))?
        };
        let token_hmac = self.token_hmac(wit.expose());
        let event = AuditEvent::new(AuditKind::WitIssue, Outcome::Ok, now)
            .actor(input.caller)
            .field("jti", claims.jti.as_str())
            .field("token_hmac", crate::audit::hex(&token_hmac))
            .field("exp", claims.exp)
            .field("kid", claims.kid.as_str())
            .field("jkt", claims.jkt.to_string())
            .field("via", input.via);
        // Inventory and audit record are durable before the WIT leaves the
        // broker: it can be found, and revoked, at once.
        self.record(
            Some(Write::Issued(IssuedToken {
                jti: claims.jti.clone(),
                kind: TokenKind::Wit,
                sub: input.caller.clone(),
                aud: Vec::new(),
                scope: Scopes::default(),
                class: TokenClass::Service,
                jkt: Some(claims.jkt),
                iat: claims.iat,
                exp: claims.exp,
                kid: claims.kid.clone(),
                token_hmac,
            })),
            with_pod(event, input.pod),
        )
        .await
        .map_err(|e| internal("recording an issued WIT", e))?;
        tracing::info!(caller = %input.caller, jti = %claims.jti, rule = grant.pos.line, "WIT issued");
        Ok(IssuedWit { wit, claims })
    }
}

fn with_pod(event: AuditEvent, pod: Option<&Pod>) -> AuditEvent {
    match pod {
        Some(pod) => event
            .field("pod", pod.name.as_str())
            .field("pod_uid", pod.uid.as_str()),
        None => event,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wit_never_outlives_its_keys_certificate() {
        let now = 1_800_000_000;
        assert_eq!(lifetime(3600, now + 7200, now).unwrap(), 3600);
        assert_eq!(lifetime(3600, now + 600, now).unwrap(), 600);
        assert_eq!(lifetime(3600, now + 1, now).unwrap(), 1);
        for not_after in [now, now - 1] {
            assert!(matches!(
                lifetime(3600, not_after, now),
                Err(WitError::CertificateExpired { .. })
            ));
        }
    }

    #[test]
    fn refusals_have_their_own_reasons() {
        let denied = WitError::Denied(WitDenial::NoRule {
            from: "spiffe://td/a".into(),
        });
        assert_eq!(
            (denied.reason(), denied.outcome()),
            ("no_rule", Outcome::Denied)
        );
        assert_eq!(WitError::KeyNotP256.reason(), "key_not_p256");
        assert_eq!(WitError::Internal.outcome(), Outcome::Error);
        let expired = WitError::CertificateExpired {
            not_after: 1,
            now: 2,
        };
        assert!(expired.to_string().contains("renew"), "{expired}");
    }
}
