//! JWT-SVID issuance (`Tokens.IssueJwtSvid`, for the SPIFFE Workload
//! API's `FetchJWTSVID`): the caller may have a JWT-SVID for an audience
//! exactly when an `issue:` rule lets it have access tokens for that
//! audience (no policy section of its own). Its lifetime is capped by
//! the strictest of the rules granting its audiences, each of those
//! rules' rate limits is spent, and it is recorded (inventory and audit,
//! durably) before it leaves the broker, like an access token.

use super::Broker;
use super::issue::{IssueError, internal};
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::identity::SpiffeId;
use crate::identity::k8s::Pod;
use crate::policy::{IssueGrant, IssueRequest};
use crate::store::{IssuedToken, Write};
use crate::token::jwt_svid::{self, JwtSvid, JwtSvidClaims, MAX_AUDIENCES};
use crate::token::{Audience, ClaimValueError, Scopes, TokenClass, TokenKind};

/// Why the audiences asked for are not a list a JWT-SVID can carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AudienceListError {
    /// No audience at all.
    #[error("at least one audience is required")]
    Empty,
    /// More than [`MAX_AUDIENCES`].
    #[error("{count} audiences asked for; at most {MAX_AUDIENCES}")]
    TooMany {
        /// How many were sent.
        count: usize,
    },
    /// One is empty, too long, or holds whitespace or control characters.
    #[error("audience #{index}: {error}")]
    Invalid {
        /// Its position in the request, from 0.
        index: usize,
        /// What is wrong (names it, truncated).
        error: ClaimValueError,
    },
}

/// The audiences of a JWT-SVID request: at least one, at most
/// [`MAX_AUDIENCES`], each an [`Audience`], duplicates collapsed (the
/// first one's place kept).
///
/// # Errors
/// [`AudienceListError`] naming the first bad one.
pub fn audiences(texts: &[String]) -> Result<Vec<Audience>, AudienceListError> {
    if texts.is_empty() {
        return Err(AudienceListError::Empty);
    }
    if texts.len() > MAX_AUDIENCES {
        return Err(AudienceListError::TooMany { count: texts.len() });
    }
    let mut out: Vec<Audience> = Vec::with_capacity(texts.len());
    for (index, text) in texts.iter().enumerate() {
        let aud: Audience = text
            .parse()
            .map_err(|error| AudienceListError::Invalid { index, error })?;
        if !out.contains(&aud) {
            out.push(aud);
        }
    }
    Ok(out)
}

/// One JWT-SVID request, already parsed.
#[derive(Debug)]
pub struct JwtSvidInput<'a> {
    /// The authenticated caller (from its client certificate): the `sub`.
    pub caller: &'a SpiffeId,
    /// The audiences (see [`audiences`]).
    pub audiences: &'a [Audience],
    /// Lifetime asked for, if any (capped by policy).
    pub ttl: Option<u64>,
    /// The pod the caller's SVID was attested by, if any, for the audit
    /// record.
    pub pod: Option<&'a Pod>,
}

/// A JWT-SVID and what it says.
#[derive(Debug)]
pub struct IssuedJwtSvid {
    /// The signed JWT-SVID.
    pub svid: JwtSvid,
    /// Its claims.
    pub claims: JwtSvidClaims,
    /// The class of the rule that capped its lifetime (the inventory's).
    pub class: TokenClass,
}

impl Broker {
    /// Issues a JWT-SVID naming the caller for every audience asked for:
    /// each must be granted by an issue rule, the strictest rule's
    /// lifetime wins, each granting rule's rate limit is spent, and the
    /// JWT-SVID is durably recorded before it is returned.
    ///
    /// # Errors
    /// [`IssueError`] (`Denied` names the audience no rule grants);
    /// every refusal is also logged, counted and audited with its reason.
    pub async fn issue_jwt_svid(
        &self,
        input: &JwtSvidInput<'_>,
    ) -> Result<IssuedJwtSvid, IssueError> {
        let now = self.clock.now();
        let result = self.issue_jwt_svid_checked(input, now).await;
        match &result {
            Ok(issued) => self
                .metrics
                .jwt_svid_issuance
                .inc(&["issued", issued.class.as_str()]),
            Err(e) => {
                self.metrics.jwt_svid_issuance.inc(&[e.reason(), "none"]);
                let outcome = e.outcome();
                let event = AuditEvent::new(AuditKind::JwtSvidIssue, outcome, now)
                    .actor(input.caller)
                    .field("audience", audience_list(input.audiences))
                    .field("reason", e.reason())
                    .field("detail", e.to_string())
                    .field("via", "grpc");
                self.audit(with_pod(event, input.pod)).await;
            }
        }
        result
    }

    async fn issue_jwt_svid_checked(
        &self,
        input: &JwtSvidInput<'_>,
        now: u64,
    ) -> Result<IssuedJwtSvid, IssueError> {
        let policy = self.policy();
        let no_scopes = Scopes::default();
        let grants = input
            .audiences
            .iter()
            .map(|audience| {
                policy.decide_issue(&IssueRequest {
                    from: input.caller,
                    audience,
                    scopes: &no_scopes,
                    ttl: input.ttl,
                })
            })
            .collect::<Result<Vec<IssueGrant>, _>>()
            .inspect_err(|denial| {
                tracing::info!(caller = %input.caller, reason = %denial, "JWT-SVID denied");
            })?;
        // Every grant's lifetime is the one asked for (or its class
        // default) capped by its class and rule: the shortest bounds all.
        let strictest = grants
            .iter()
            .min_by_key(|g| g.ttl)
            .ok_or_else(|| internal("issuing a JWT-SVID", "no audience reached the policy"))?;
        let (ttl, class) = (strictest.ttl, strictest.class);
        // Each rule's budget once, however many of the audiences it grants.
        let mut spent = Vec::with_capacity(grants.len());
        for grant in &grants {
            if !spent.contains(&grant.rule) {
                self.take_rule_budget(&policy, grant, input.caller)?;
                spent.push(grant.rule);
            }
        }

        let (svid, claims) = {
            let keys = self
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let signer = keys
                .current(now)
                .ok_or_else(|| internal("issuing a JWT-SVID", "no signing key is active"))?;
            jwt_svid::mint(signer, input.caller, input.audiences, ttl, now)
                .map_err(|e| internal("signing a JWT-SVID", e))?
        };
        let token_hmac = self.token_hmac(svid.expose());
        let event = AuditEvent::new(AuditKind::JwtSvidIssue, Outcome::Ok, now)
            .actor(input.caller)
            .field("audience", audience_list(&claims.aud))
            .field("class", class.as_str())
            .field("jti", claims.jti.as_str())
            .field("token_hmac", crate::audit::hex(&token_hmac))
            .field("exp", claims.exp)
            .field("kid", claims.kid.as_str())
            .field("via", "grpc");
        // Inventory and audit record are durable before the JWT-SVID
        // leaves the broker: it can be found, and revoked, at once.
        self.record(
            Some(Write::Issued(IssuedToken {
                jti: claims.jti.clone(),
                kind: TokenKind::JwtSvid,
                sub: input.caller.clone(),
                aud: claims.aud.clone(),
                scope: Scopes::default(),
                class,
                jkt: None,
                iat: claims.iat,
                exp: claims.exp,
                kid: claims.kid.clone(),
                token_hmac,
            })),
            with_pod(event, input.pod),
        )
        .await
        .map_err(|e| internal("recording an issued JWT-SVID", e))?;
        tracing::info!(caller = %input.caller, jti = %claims.jti, class = %class, "JWT-SVID issued");
        Ok(IssuedJwtSvid {
            svid,
            claims,
            class,
        })
    }
}

fn audience_list(aud: &[Audience]) -> serde_json::Value {
    aud.iter()
        .map(|a| serde_json::Value::from(a.as_str()))
        .collect()
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

    fn texts(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn audiences_are_deduplicated_in_order() {
        let got = audiences(&texts(&["https://b", "spiffe://td/a", "https://b"])).unwrap();
        let got: Vec<&str> = got.iter().map(Audience::as_str).collect();
        assert_eq!(got, ["https://b", "spiffe://td/a"]);
    }

    #[test]
    fn empty_too_many_and_malformed_audience_lists_are_refused() {
        assert_eq!(audiences(&[]), Err(AudienceListError::Empty));
        let many: Vec<String> = (0..17).map(|i| format!("https://a{i}")).collect();
        assert_eq!(
            audiences(&many),
            Err(AudienceListError::TooMany { count: 17 })
        );
        let err = audiences(&texts(&["https://ok", "bad one"])).unwrap_err();
        assert!(matches!(err, AudienceListError::Invalid { index: 1, .. }));
        assert!(err.to_string().contains("bad one"), "{err}");
        let long = "a".repeat(600);
        assert!(matches!(
            audiences(&[long]),
            Err(AudienceListError::Invalid { index: 0, .. })
        ));
    }
}
