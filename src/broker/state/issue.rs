//! Token issuance, shared by `Tokens.Issue` (gRPC) and `POST /oauth2/token`
//! (HTTPS): proof, replay, policy, rate limit, sign, record. Each front end
//! turns the request into an [`IssueInput`] and maps an [`IssueError`] to
//! its own wire format.

use super::Broker;
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::dpop::NormalizedUri;
use crate::dpop::ReplayError;
use crate::dpop::proof::{self, NonceRule, ProofContext, ProofError};
use crate::identity::SpiffeId;
use crate::policy::IssueDenial;
use crate::store::{IssuedToken, Write};
use crate::token::{AccessToken, Audience, MintRequest, Scopes, TokenClaims, TokenKind};
use aws_lc_rs::hmac;

/// One issuance request, already parsed.
#[derive(Debug)]
pub struct IssueInput<'a> {
    /// The authenticated caller (from its client certificate).
    pub caller: &'a SpiffeId,
    /// Audience asked for.
    pub audience: &'a Audience,
    /// Scopes asked for; empty means "everything the rule grants".
    pub scopes: &'a Scopes,
    /// Lifetime asked for, if any (capped by policy).
    pub ttl: Option<u64>,
    /// The DPoP proof (compact JWS).
    pub proof: &'a str,
    /// The `htu` the proof must name.
    pub htu: &'a NormalizedUri,
    /// Whether the proof must carry a nonce this broker issued.
    pub require_nonce: bool,
    /// Which front end took the request (`grpc`, `oauth`), for audit.
    pub via: &'static str,
    /// The pod the caller's SVID was attested by, if any (see
    /// [`Broker::caller_pod`]), for the audit record.
    pub pod: Option<&'a crate::identity::k8s::Pod>,
}

/// A token and what it says.
#[derive(Debug)]
pub struct Issued {
    /// The signed token.
    pub token: AccessToken,
    /// Its claims.
    pub claims: TokenClaims,
}

/// Why no token was issued.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IssueError {
    /// The DPoP proof is not acceptable (including a missing or stale
    /// nonce, and a replayed proof).
    #[error("invalid DPoP proof: {0}")]
    Proof(#[from] ProofError),
    /// The replay cache is full: too many live proofs.
    #[error("too many proofs in flight; retry shortly")]
    Busy,
    /// The trust policy does not allow it.
    #[error("{0}")]
    Denied(#[from] IssueDenial),
    /// The matching rule's rate limit is reached.
    #[error("rate limit of the issue rule at line {line} reached; retry in {}", crate::clock::human_duration(*.retry_after))]
    RateLimited {
        /// Line of the rule in the policy file.
        line: usize,
        /// Seconds until a token is available.
        retry_after: u64,
    },
    /// A fault inside the broker (logged where it happened).
    #[error("internal error")]
    Internal,
}

impl IssueError {
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
            Self::Proof(e) if e.wants_nonce() => "dpop_nonce",
            Self::Proof(ProofError::Replayed) => "dpop_replayed",
            Self::Proof(_) => "dpop_invalid",
            Self::Busy => "busy",
            Self::Denied(IssueDenial::NoRule { .. }) => "no_rule",
            Self::Denied(_) => "scope_not_granted",
            Self::RateLimited { .. } => "rate_limited",
            Self::Internal => "internal",
        }
    }
}

pub(super) fn internal(context: &str, error: impl std::fmt::Display) -> IssueError {
    tracing::error!(%error, "{context}");
    IssueError::Internal
}

/// An issue rule as its rate-limit buckets know it: by what it says, not
/// where it stands, so a policy reload keeps the buckets of the rules it
/// leaves as they were (wherever they moved) and starts those it changed
/// afresh.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RuleKey(u64);

impl RuleKey {
    fn of(rule: &crate::policy::IssueRule) -> Self {
        use std::hash::{Hash as _, Hasher as _};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rule.from.to_string().hash(&mut h);
        rule.to.to_string().hash(&mut h);
        rule.scopes.hash(&mut h);
        rule.class.hash(&mut h);
        rule.rate.map(|r| (r.count, r.per_secs)).hash(&mut h);
        rule.max_ttl.hash(&mut h);
        Self(h.finish())
    }
}

/// Rate-limit buckets: per rule and caller, and per rule for callers
/// past the limiter's cap (`None`), who then share one.
pub(crate) type RuleBuckets = crate::rate::RateLimiter<(RuleKey, Option<SpiffeId>)>;

impl Broker {
    /// Issues a DPoP-bound token: checks the proof (then records its `jti`
    /// against replay), the trust policy and the rule's rate limit, signs,
    /// and durably records the token in the inventory before returning it.
    ///
    /// # Errors
    /// [`IssueError`]; every refusal is also logged, counted and audited
    /// with its reason.
    pub async fn issue(&self, input: &IssueInput<'_>) -> Result<Issued, IssueError> {
        let started = std::time::Instant::now();
        let now = self.clock.now();
        let result = self.issue_checked(input, now).await;
        self.metrics.issue_latency.observe(started.elapsed());
        match &result {
            Ok(issued) => self
                .metrics
                .issuance
                .inc(&["issued", issued.claims.class.as_str()]),
            Err(e) => {
                self.metrics.issuance.inc(&[e.reason(), "none"]);
                let outcome = e.outcome();
                let event = AuditEvent::new(AuditKind::TokenIssue, outcome, now)
                    .actor(input.caller)
                    .field("audience", input.audience.as_str())
                    .field("scope", input.scopes.to_string())
                    .field("reason", e.reason())
                    .field("detail", e.to_string())
                    .field("via", input.via);
                self.audit(event).await;
            }
        }
        result
    }

    async fn issue_checked(&self, input: &IssueInput<'_>, now: u64) -> Result<Issued, IssueError> {
        let ctx = ProofContext {
            method: "POST",
            uri: input.htu,
            token_hash: None,
            expected_jkt: None,
            nonce: if input.require_nonce {
                NonceRule::Issued(&self.nonces)
            } else {
                NonceRule::NotRequired
            },
            keys: Some(&self.proof_keys),
        };
        let proof = proof::verify(input.proof, &ctx, &self.proof_config, now, &mut ())?;
        let key = self.replay.key(&proof.jkt, &proof.jti);
        match self
            .replay
            .check_and_insert(key, proof.iat + self.proof_config.max_age, now)
        {
            Ok(()) => {}
            Err(ReplayError::Replayed) => return Err(ProofError::Replayed.into()),
            Err(ReplayError::Full) => return Err(IssueError::Busy),
        }

        let policy = self.policy();
        let grant = policy
            .decide_issue(&crate::policy::IssueRequest {
                from: input.caller,
                audience: input.audience,
                scopes: input.scopes,
                ttl: input.ttl,
            })
            .inspect_err(|denial| {
                tracing::info!(caller = %input.caller, audience = %input.audience, reason = %denial, "issuance denied");
            })?;
        self.take_rule_budget(&policy, &grant, input.caller)?;

        let (token, claims) = {
            let keys = self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let signer = keys
                .current(now)
                .ok_or_else(|| internal("issuing a token", "no signing key is active"))?;
            signer
                .mint(
                    &MintRequest {
                        subject: input.caller,
                        audience: input.audience,
                        scope: &grant.scopes,
                        class: grant.class,
                        ttl: grant.ttl,
                        jkt: proof.jkt,
                    },
                    now,
                )
                .map_err(|e| internal("signing a token", e))?
        };
        let token_hmac = self.token_hmac(token.expose());
        let event = AuditEvent::new(AuditKind::TokenIssue, Outcome::Ok, now)
            .actor(input.caller)
            .field("audience", input.audience.as_str())
            .field("scope", claims.scope.to_string())
            .field("class", claims.class.as_str())
            .field("jti", claims.jti.as_str())
            .field("token_hmac", crate::audit::hex(&token_hmac))
            .field("jkt", claims.jkt.to_string())
            .field("exp", claims.exp)
            .field("kid", claims.kid.as_str())
            .field("via", input.via);
        let event = match input.pod {
            Some(pod) => event
                .field("pod", pod.name.as_str())
                .field("pod_uid", pod.uid.as_str()),
            None => event,
        };
        // Inventory and audit record are durable before the token leaves
        // the broker.
        self.record(
            Some(Write::Issued(IssuedToken {
                jti: claims.jti.clone(),
                kind: TokenKind::Access,
                sub: input.caller.clone(),
                aud: vec![input.audience.clone()],
                scope: claims.scope.clone(),
                class: claims.class,
                jkt: Some(claims.jkt),
                iat: claims.iat,
                exp: claims.exp,
                kid: claims.kid.clone(),
                token_hmac,
            })),
            event,
        )
        .await
        .map_err(|e| internal("recording an issued token", e))?;
        tracing::info!(caller = %input.caller, audience = %input.audience, jti = %claims.jti, class = %claims.class, "token issued");
        Ok(Issued { token, claims })
    }

    /// Takes one issuance from the caller's budget under the rule that
    /// granted it, if the rule has a rate limit. Shared by access tokens
    /// and JWT-SVIDs: a rule's budget is one, whatever it is spent on.
    ///
    /// # Errors
    /// [`IssueError::RateLimited`] with the seconds until one is free.
    pub(super) fn take_rule_budget(
        &self,
        policy: &crate::policy::Policy,
        grant: &crate::policy::IssueGrant,
        caller: &SpiffeId,
    ) -> Result<(), IssueError> {
        let Some(rate) = grant.rate else {
            return Ok(());
        };
        // Each caller has its own budget under a rule, so one caller
        // (with a wildcard `from:`) cannot spend everyone's.
        let rule = RuleKey::of(&policy.issue[grant.rule]);
        self.rule_limits
            .take_or_share(
                &(rule, Some(caller.clone())),
                &(rule, None),
                rate,
                self.clock.now_ms(),
            )
            .map_err(|retry_after| IssueError::RateLimited {
                line: grant.pos.line,
                retry_after,
            })
    }

    /// HMAC-SHA256 of a token under the deployment's token-hash key: how
    /// the inventory and audit refer to a token without holding it.
    pub fn token_hmac(&self, token: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(hmac::sign(&self.token_hmac, token.as_bytes()).as_ref());
        out
    }

    /// A fresh DPoP nonce (for `use_dpop_nonce` answers).
    pub fn dpop_nonce(&self) -> String {
        self.nonces.issue(self.clock.now())
    }
}
