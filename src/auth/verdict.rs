//! The admission verdict: one pure function, [`judge`], from a request
//! the token core verified ([`super::RequestVerifier`]) and what the mesh
//! says right now ([`MeshView`]: revocations, denied identities, how long
//! the Watch stream has been down, the access rules for this workload) to
//! [`Allowed`] or a typed [`Refusal`]. Every front end (the inbound proxy,
//! ext_authz, WIMSE) calls it after the token core and answers a refusal
//! with [`super::answer::refusal_answer`].
//!
//! The checks, in order: revocation, denied identity, staleness (an
//! `admin` token, or every token with `deny_when_stale`, is refused while
//! revocations may be missing), the access rules (caller, method, path,
//! scopes), then the per-caller rate limit of the allow entry that
//! admitted the request. The rate limiter is the one piece of state: it
//! is passed in (`&RateLimiter`, with `now_ms`) and charged last, only
//! for a request every other check admitted, so a refused request never
//! spends a caller's budget and the verdict stays whole: no front end can
//! forget to charge it.

use super::error::AuthError;
use super::forwarded::ForwardedError;
use super::target::TargetError;
use crate::identity::{DenialSet, SpiffeId};
use crate::jose::Jkt;
use crate::policy::{AccessDenial, AccessRequest, Policy, Pos};
use crate::rate::RateLimiter;
use crate::token::{RevocationSet, Scopes, TokenClaims, TokenClass, TokenRef};
use std::sync::Arc;

/// The scopes of a caller that presented no access token.
static NO_SCOPES: Scopes = Scopes::empty();

/// A WIMSE Workload Identity Token whose key proved possession (a
/// Workload Proof Token verified with it), as the verdict judges it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitHolder {
    /// The workload it names (`sub`, a SPIFFE ID).
    pub sub: SpiffeId,
    /// Its `jti` (empty when it has none: only a revocation by holder,
    /// key, signing key or time can cover it then).
    pub jti: String,
    /// The thumbprint of its `cnf.jwk`.
    pub jkt: Jkt,
    /// The key that signed it.
    pub kid: String,
    /// When it was issued (0 when it does not say, so every revocation by
    /// holder or key covers it).
    pub iat: u64,
    /// When it expires.
    pub exp: u64,
}

impl WitHolder {
    /// The parts a revocation can match.
    pub fn token_ref(&self) -> TokenRef<'_> {
        TokenRef {
            jti: &self.jti,
            sub: &self.sub,
            jkt: Some(&self.jkt),
            kid: &self.kid,
            iat: self.iat,
        }
    }
}

/// What the credentials of a request that passed the token core prove.
#[derive(Debug, Clone)]
pub enum Caller {
    /// A DPoP-bound access token (proven by a proof, or by the mutual-TLS
    /// handshake of the connection it came on).
    Token(Arc<TokenClaims>),
    /// A WIMSE WIT proven by a WPT, and the access token sent with them,
    /// if any (its `cnf.jkt` is the WIT's key, its hash in the WPT's
    /// `ath`): the caller is the WIT's `sub`, its scopes the token's.
    Wimse {
        /// The WIT.
        wit: Arc<WitHolder>,
        /// The access token, if one came.
        token: Option<Arc<TokenClaims>>,
    },
}

impl Caller {
    /// Who is calling: the token's or the WIT's `sub`.
    pub fn sub(&self) -> &SpiffeId {
        match self {
            Self::Token(token) => &token.sub,
            Self::Wimse { wit, .. } => &wit.sub,
        }
    }

    /// The scopes the caller holds: the access token's (none without one).
    pub fn scopes(&self) -> &Scopes {
        match self.token() {
            Some(token) => &token.scope,
            None => &NO_SCOPES,
        }
    }

    /// The access token, if one came.
    pub fn token(&self) -> Option<&Arc<TokenClaims>> {
        match self {
            Self::Token(token)
            | Self::Wimse {
                token: Some(token), ..
            } => Some(token),
            Self::Wimse { token: None, .. } => None,
        }
    }

    /// The id the app is told (`x-tally-token-id`): the access token's
    /// `jti`, else the WIT's.
    pub fn token_id(&self) -> &str {
        match self {
            Self::Token(token)
            | Self::Wimse {
                token: Some(token), ..
            } => &token.jti,
            Self::Wimse { wit, token: None } => &wit.jti,
        }
    }

    /// When the credentials stop being valid: the earliest `exp` among
    /// them (a tunnel they open lives no longer).
    pub fn expires_at(&self) -> u64 {
        match self {
            Self::Token(token) => token.exp,
            Self::Wimse { wit, token } => token.as_ref().map_or(wit.exp, |t| t.exp.min(wit.exp)),
        }
    }

    /// The token class the staleness rule goes by: the access token's; a
    /// WIT alone is a workload's identity, `service`.
    pub fn class(&self) -> TokenClass {
        self.token().map_or(TokenClass::Service, |t| t.class)
    }

    /// Whether `revocations` cover any of the credentials.
    pub fn revoked_by(&self, revocations: &RevocationSet) -> bool {
        let wit = match self {
            Self::Wimse { wit, .. } => revocations.covers(&wit.token_ref()),
            Self::Token(_) => false,
        };
        wit || self.token().is_some_and(|t| revocations.revoked(t))
    }
}

/// A request the token core passed, as the verdict judges it.
#[derive(Debug, Clone, Copy)]
pub struct VerifiedRequest<'a> {
    /// What its credentials prove: caller (`sub`), scopes, `jti`s, keys,
    /// class, `iat` and `exp`.
    pub caller: &'a Caller,
    /// The request method.
    pub method: &'a str,
    /// The normalized path (what access rules match and the app gets).
    pub path: &'a str,
}

/// What the mesh says, as of one moment, for one workload.
#[derive(Debug, Clone, Copy)]
pub struct MeshView<'a> {
    /// This workload (the destination).
    pub workload: &'a SpiffeId,
    /// The access rules protecting it, and their version (rate-limit
    /// buckets are per version, so a new policy starts them afresh).
    pub access: (u64, &'a Policy),
    /// Revocations in force.
    pub revocations: &'a RevocationSet,
    /// Identities an admin has denied.
    pub denied: &'a DenialSet,
    /// Since when (Unix seconds) the Watch stream has been down, if it is
    /// down now (`None` while up, and before it first connected).
    pub watch_down_since: Option<u64>,
    /// When that outage makes the view stale, and what is refused then.
    pub stale: StaleRule,
}

/// When a Watch outage means revocations may be missing here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StaleRule {
    /// Stale once the stream has been down longer than this (seconds).
    pub after: u64,
    /// Then refuse every token, not only `admin`-class ones (which are
    /// always refused when stale).
    pub deny_all: bool,
}

/// The rate-limit buckets of a workload's callers: per (access version,
/// caller, allow entry).
pub type CallerLimits = RateLimiter<(u64, SpiffeId, Pos)>;

/// A request every check admitted.
#[derive(Debug, Clone)]
pub struct Allowed {
    /// The credentials that admitted it (a tunnel they open lives as
    /// long).
    pub credentials: Caller,
    /// The allow entry that admitted it.
    pub rule: Pos,
}

impl Allowed {
    /// The caller (the token's or the WIT's `sub`).
    pub fn caller(&self) -> &SpiffeId {
        self.credentials.sub()
    }

    /// The access token's scopes (none without one).
    pub fn scopes(&self) -> &Scopes {
        self.credentials.scopes()
    }

    /// The access token's `jti`, else the WIT's.
    pub fn token_id(&self) -> &str {
        self.credentials.token_id()
    }

    /// When the credentials expire (Unix seconds).
    pub fn expires_at(&self) -> u64 {
        self.credentials.expires_at()
    }
}

/// Why a request was refused: every refusal a front end gives, from the
/// request head to the rate limit. `Display` is the description a caller
/// gets; it never holds a token or key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// The request head names no target this server may judge: 400, or
    /// 421 for an authority it does not serve.
    #[error(transparent)]
    Target(#[from] TargetError),
    /// A proxy in front described the request in a way that cannot be
    /// judged (ext_authz): 400, or 403 for an unverified peer
    /// certificate.
    #[error(transparent)]
    Forwarded(#[from] ForwardedError),
    /// Plaintext (or TLS without a mesh SVID) on an inbound port that
    /// demands mutual TLS (`--inbound-mtls required`): 403
    /// `mtls_required`, before any token work.
    #[error("this port accepts only mutual TLS with a mesh workload's X.509-SVID")]
    MtlsRequired,
    /// No keys or access rules from the broker yet: 503, retry in 1 s.
    #[error("the sidecar has not received the broker's keys and access rules yet")]
    NotReady,
    /// The token core refused it (credentials, token, proof, replay).
    #[error(transparent)]
    Unverified(#[from] AuthError),
    /// A revocation covers the token: 401 `invalid_token`.
    #[error("access token was revoked")]
    Revoked {
        /// The token's `jti`.
        jti: String,
    },
    /// A revocation covers the WIMSE Workload Identity Token: 401 with a
    /// `WPT` challenge.
    #[error("workload identity token was revoked")]
    WitRevoked {
        /// The WIT's `jti`.
        jti: String,
    },
    /// The token's holder is an identity the broker's admins have denied:
    /// 401 `invalid_token`, whatever the token says.
    #[error("the token's holder is a denied identity")]
    IdentityDenied {
        /// The holder (`sub`).
        caller: SpiffeId,
    },
    /// The Watch stream has been down too long to know whether the token
    /// is revoked: 503, retry in 5 s.
    #[error(
        "this sidecar has not heard from the broker for too long to know whether the token is revoked"
    )]
    Stale {
        /// Seconds the stream has been down.
        down_for: u64,
        /// The bound it passed.
        after: u64,
    },
    /// The access rules refuse it: 403 (`insufficient_scope` when only a
    /// scope is missing).
    #[error("{}{}", denied_by_policy(.0), .0)]
    AccessDenied(AccessDenial),
    /// The caller spent its rate for the allow entry: 429.
    #[error("rate limit exceeded")]
    RateLimited {
        /// Seconds until a retry may succeed.
        retry_after: u64,
    },
}

/// How an access denial's text begins: a missing scope speaks for itself
/// (as RFC 6750 `insufficient_scope`), anything else is the policy's.
fn denied_by_policy(denial: &AccessDenial) -> &'static str {
    match denial {
        AccessDenial::MissingScope(_) => "",
        AccessDenial::NoRuleForWorkload(_)
        | AccessDenial::CallerNotAllowed(_)
        | AccessDenial::MethodNotAllowed(_)
        | AccessDenial::PathNotAllowed(_) => "denied by policy: ",
    }
}

impl Refusal {
    /// The metrics label and audit reason: a fixed set, so a client
    /// cannot create series.
    pub fn reason(&self) -> &'static str {
        use crate::dpop::ProofError;
        match self {
            Self::Target(TargetError::Misdirected(_)) => "misdirected",
            Self::Target(
                TargetError::TwoHosts
                | TargetError::NoHost
                | TargetError::HostNotText
                | TargetError::HostMismatch
                | TargetError::Authority(_)
                | TargetError::Url(_)
                | TargetError::Path(_),
            ) => "bad_request",
            Self::Forwarded(ForwardedError::PeerUnverified(_)) => "peer_unverified",
            Self::Forwarded(
                ForwardedError::NoHttpRequest
                | ForwardedError::NoMethod
                | ForwardedError::Scheme
                | ForwardedError::Disagrees(_)
                | ForwardedError::NotNormalized,
            ) => "bad_request",
            Self::MtlsRequired => "mtls_required",
            Self::NotReady => "not_ready",
            Self::Unverified(AuthError::NoCredentials) => "no_credentials",
            Self::Unverified(AuthError::NotThePeer) => "not_the_peer",
            Self::Unverified(AuthError::Request(_)) => "bad_request",
            Self::Unverified(AuthError::WimseIncomplete { .. }) => "wimse_incomplete",
            Self::Unverified(AuthError::Wit(e)) => e.reason(),
            Self::Unverified(AuthError::Wpt(e)) => e.reason(),
            Self::Unverified(AuthError::WptReplayed) => "replayed_wpt",
            Self::Unverified(AuthError::WptBeforeRestart { .. }) => "wpt_before_restart",
            Self::Unverified(AuthError::WptAudUnpinned) => "wpt_aud_unpinned",
            Self::Unverified(AuthError::TokenNotForWit) => "invalid_token",
            Self::Unverified(AuthError::Token(_)) => "invalid_token",
            Self::Unverified(AuthError::Proof(e)) if e.wants_nonce() => "use_dpop_nonce",
            Self::Unverified(AuthError::Proof(ProofError::Replayed)) => "replayed_proof",
            Self::Unverified(AuthError::Proof(_)) => "invalid_dpop_proof",
            Self::Unverified(AuthError::Overloaded) => "overloaded",
            Self::Revoked { .. } | Self::WitRevoked { .. } => "revoked",
            Self::IdentityDenied { .. } => "identity_denied",
            Self::Stale { .. } => "revocations_stale",
            Self::AccessDenied(AccessDenial::MissingScope(_)) => "insufficient_scope",
            Self::AccessDenied(
                AccessDenial::NoRuleForWorkload(_)
                | AccessDenial::CallerNotAllowed(_)
                | AccessDenial::MethodNotAllowed(_)
                | AccessDenial::PathNotAllowed(_),
            ) => "policy_denied",
            Self::RateLimited { .. } => "rate_limited",
        }
    }

    /// Whether the refusal is the caller's failure, for the audit log: a
    /// nonce challenge is the protocol working, and not-ready is this
    /// sidecar's state.
    pub fn is_callers_failure(&self) -> bool {
        match self {
            Self::NotReady => false,
            Self::Unverified(AuthError::Proof(e)) => !e.wants_nonce(),
            Self::Target(_)
            | Self::Forwarded(_)
            | Self::MtlsRequired
            | Self::Unverified(
                AuthError::NoCredentials
                | AuthError::WimseIncomplete { .. }
                | AuthError::Wit(_)
                | AuthError::Wpt(_)
                | AuthError::WptReplayed
                | AuthError::WptBeforeRestart { .. }
                | AuthError::WptAudUnpinned
                | AuthError::TokenNotForWit
                | AuthError::Request(_)
                | AuthError::Token(_)
                | AuthError::NotThePeer
                | AuthError::Overloaded,
            )
            | Self::Revoked { .. }
            | Self::WitRevoked { .. }
            | Self::IdentityDenied { .. }
            | Self::Stale { .. }
            | Self::AccessDenied(_)
            | Self::RateLimited { .. } => true,
        }
    }
}

/// Judges a verified request against what the mesh says at `now_ms`
/// (Unix milliseconds), charging the caller's rate limit (in `limits`)
/// only when every other check admits it.
///
/// # Errors
/// The first [`Refusal`] that applies, in the order of the module doc.
pub fn judge(
    request: &VerifiedRequest<'_>,
    mesh: &MeshView<'_>,
    limits: &CallerLimits,
    now_ms: u64,
) -> Result<Allowed, Refusal> {
    let caller = request.caller;
    if let Caller::Wimse { wit, .. } = caller
        && mesh.revocations.covers(&wit.token_ref())
    {
        return Err(Refusal::WitRevoked {
            jti: wit.jti.clone(),
        });
    }
    if let Some(token) = caller.token()
        && mesh.revocations.revoked(token)
    {
        return Err(Refusal::Revoked {
            jti: token.jti.clone(),
        });
    }
    let sub = caller.sub();
    if mesh.denied.is_denied(sub) {
        return Err(Refusal::IdentityDenied {
            caller: sub.clone(),
        });
    }
    let now = now_ms / 1000;
    if let Some(since) = mesh.watch_down_since {
        let down_for = now.saturating_sub(since);
        let stale = down_for > mesh.stale.after;
        if stale && (mesh.stale.deny_all || caller.class() == TokenClass::Admin) {
            return Err(Refusal::Stale {
                down_for,
                after: mesh.stale.after,
            });
        }
    }
    let (version, policy) = mesh.access;
    let grant = policy
        .decide_access(&AccessRequest {
            workload: mesh.workload,
            caller: sub,
            method: request.method,
            path: request.path,
            scopes: caller.scopes(),
        })
        .map_err(Refusal::AccessDenied)?;
    if let Some(rate) = grant.rate {
        let key = (version, sub.clone(), grant.pos);
        limits
            .take(&key, rate, now_ms)
            .map_err(|retry_after| Refusal::RateLimited { retry_after })?;
    }
    Ok(Allowed {
        credentials: caller.clone(),
        rule: grant.pos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::Denial;
    use crate::jose::Jkt;
    use crate::token::{Revocation, RevocationTarget};

    const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
    const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
    const REPORTING: &str = "spiffe://example.org/ns/ops/sa/reporting";
    /// Unix seconds the tokens were issued at.
    const IAT: u64 = 1_700_000_000;
    const NOW_MS: u64 = (IAT + 10) * 1000;

    const POLICY: &str = "trust_domain: example.org
access:
  - workload: spiffe://example.org/ns/pay/sa/payments
    allow:
      - from: spiffe://example.org/ns/shop/sa/checkout
        methods: [POST]
        paths: [/v1/charges]
        scopes: [payments:charge]
      - from: spiffe://example.org/ns/*/sa/reporting
        methods: [GET]
        paths: [/v1/**]
        scopes: [payments:read]
        rate: 2/s
";

    fn id(text: &str) -> SpiffeId {
        text.parse().unwrap()
    }

    fn jkt(n: u8) -> Jkt {
        crate::jose::b64::encode([n; 32]).parse().unwrap()
    }

    fn token(sub: &str, scope: &str, class: TokenClass) -> Arc<TokenClaims> {
        Arc::new(TokenClaims {
            iss: "https://broker.example".into(),
            sub: id(sub),
            aud: vec![PAYMENTS.parse().unwrap()],
            scope: scope.parse().unwrap(),
            iat: IAT,
            nbf: None,
            exp: IAT + 300,
            jti: format!("jti-{sub}"),
            jkt: jkt(1),
            class,
            kid: "k1".into(),
        })
    }

    fn checkout() -> Arc<TokenClaims> {
        token(CHECKOUT, "payments:charge", TokenClass::Service)
    }

    /// The mesh state a case judges against.
    struct Mesh {
        workload: SpiffeId,
        policy: Policy,
        revocations: RevocationSet,
        denied: DenialSet,
        watch_down_since: Option<u64>,
        stale: StaleRule,
    }

    impl Mesh {
        fn new() -> Self {
            Self {
                workload: id(PAYMENTS),
                policy: Policy::parse(POLICY).unwrap(),
                revocations: RevocationSet::default(),
                denied: DenialSet::default(),
                watch_down_since: None,
                stale: StaleRule {
                    after: 30,
                    deny_all: false,
                },
            }
        }

        fn revoke(mut self, target: RevocationTarget, issued_before: u64) -> Self {
            let revocation = Revocation {
                target,
                issued_before,
                expires_at: IAT + 3_600,
                reason: "test".into(),
            };
            self.revocations.insert(revocation, IAT);
            self
        }

        fn judge(
            &self,
            token: &Arc<TokenClaims>,
            method: &str,
            path: &str,
            limits: &CallerLimits,
            now_ms: u64,
        ) -> Result<Allowed, Refusal> {
            let view = MeshView {
                workload: &self.workload,
                access: (7, &self.policy),
                revocations: &self.revocations,
                denied: &self.denied,
                watch_down_since: self.watch_down_since,
                stale: self.stale,
            };
            let request = VerifiedRequest {
                caller: &Caller::Token(Arc::clone(token)),
                method,
                path,
            };
            judge(&request, &view, limits, now_ms)
        }

        fn judge_caller(
            &self,
            caller: &Caller,
            method: &str,
            path: &str,
        ) -> Result<Allowed, Refusal> {
            let view = MeshView {
                workload: &self.workload,
                access: (7, &self.policy),
                revocations: &self.revocations,
                denied: &self.denied,
                watch_down_since: self.watch_down_since,
                stale: self.stale,
            };
            let request = VerifiedRequest {
                caller,
                method,
                path,
            };
            judge(&request, &view, &CallerLimits::new(), NOW_MS)
        }

        fn charge(&self, token: &Arc<TokenClaims>) -> Result<Allowed, Refusal> {
            self.judge(token, "POST", "/v1/charges", &CallerLimits::new(), NOW_MS)
        }
    }

    #[test]
    fn an_allowed_request_names_its_caller_scopes_token_and_rule() {
        let allowed = Mesh::new().charge(&checkout()).unwrap();
        assert_eq!(allowed.caller().as_str(), CHECKOUT);
        assert_eq!(allowed.scopes().to_string(), "payments:charge");
        assert_eq!(allowed.token_id(), format!("jti-{CHECKOUT}"));
        assert_eq!(allowed.expires_at(), IAT + 300);
        assert_eq!(allowed.rule.line, 5);
    }

    fn wit(sub: &str) -> Arc<WitHolder> {
        Arc::new(WitHolder {
            sub: id(sub),
            jti: format!("wit-{sub}"),
            jkt: jkt(1),
            kid: "k1".into(),
            iat: IAT,
            exp: IAT + 3_600,
        })
    }

    /// The test policy, plus an entry that asks for no scope.
    fn mesh_with_unscoped_rule() -> Mesh {
        let policy = format!(
            "{POLICY}      - from: spiffe://example.org/ns/shop/sa/checkout\n        methods: [GET]\n        paths: [/v1/status]\n"
        );
        Mesh {
            policy: Policy::parse(&policy).unwrap(),
            ..Mesh::new()
        }
    }

    #[test]
    fn a_wit_alone_names_its_caller_and_passes_only_rules_that_ask_for_no_scope() {
        let mesh = mesh_with_unscoped_rule();
        let caller = Caller::Wimse {
            wit: wit(CHECKOUT),
            token: None,
        };
        let allowed = mesh.judge_caller(&caller, "GET", "/v1/status").unwrap();
        assert_eq!(allowed.caller().as_str(), CHECKOUT);
        assert!(allowed.scopes().is_empty());
        assert_eq!(allowed.token_id(), format!("wit-{CHECKOUT}"));
        assert_eq!(allowed.expires_at(), IAT + 3_600);
        assert_eq!(
            mesh.judge_caller(&caller, "POST", "/v1/charges")
                .unwrap_err(),
            Refusal::AccessDenied(AccessDenial::MissingScope(
                "payments:charge".parse().unwrap()
            ))
        );
    }

    #[test]
    fn a_wit_with_an_access_token_has_the_tokens_scopes_and_the_earliest_expiry() {
        let mesh = Mesh::new();
        let caller = Caller::Wimse {
            wit: wit(CHECKOUT),
            token: Some(checkout()),
        };
        let allowed = mesh.judge_caller(&caller, "POST", "/v1/charges").unwrap();
        assert_eq!(allowed.scopes().to_string(), "payments:charge");
        assert_eq!(allowed.token_id(), format!("jti-{CHECKOUT}"));
        assert_eq!(allowed.expires_at(), IAT + 300);
    }

    #[test]
    fn revocations_cover_a_wit_by_jti_holder_and_key_and_its_token_too() {
        let caller = Caller::Wimse {
            wit: wit(CHECKOUT),
            token: Some(checkout()),
        };
        let wit_jti = format!("wit-{CHECKOUT}");
        for target in [
            RevocationTarget::Jti(wit_jti.clone()),
            RevocationTarget::Subject(id(CHECKOUT)),
            RevocationTarget::Jkt(jkt(1)),
        ] {
            let mesh = Mesh::new().revoke(target.clone(), IAT);
            assert_eq!(
                mesh.judge_caller(&caller, "POST", "/v1/charges")
                    .unwrap_err(),
                Refusal::WitRevoked {
                    jti: wit_jti.clone()
                },
                "{target:?}"
            );
            assert!(caller.revoked_by(&mesh.revocations));
        }
        // Revoking only the access token refuses the request as well.
        let mesh = Mesh::new().revoke(RevocationTarget::Jti(format!("jti-{CHECKOUT}")), IAT);
        assert_eq!(
            mesh.judge_caller(&caller, "POST", "/v1/charges")
                .unwrap_err(),
            Refusal::Revoked {
                jti: format!("jti-{CHECKOUT}")
            }
        );
        // A WIT issued after a holder revocation is not covered by it.
        let mesh = Mesh::new().revoke(RevocationTarget::Subject(id(CHECKOUT)), IAT - 1);
        assert!(mesh.judge_caller(&caller, "POST", "/v1/charges").is_ok());
    }

    #[test]
    fn a_denied_identity_is_refused_whatever_wit_it_holds() {
        let mut mesh = mesh_with_unscoped_rule();
        mesh.denied.apply(
            1,
            Denial {
                spiffe_id: id(CHECKOUT),
                denied: true,
                reason: "pod compromised".into(),
                actor: "spiffe://example.org/admin".into(),
                at: IAT,
            },
        );
        let caller = Caller::Wimse {
            wit: wit(CHECKOUT),
            token: None,
        };
        assert!(matches!(
            mesh.judge_caller(&caller, "GET", "/v1/status"),
            Err(Refusal::IdentityDenied { .. })
        ));
    }

    #[test]
    fn each_access_denial_is_carried_typed() {
        let mesh = Mesh::new();
        let limits = CallerLimits::new();
        let cases = [
            (
                checkout(),
                "GET",
                "/v1/charges",
                AccessDenial::MethodNotAllowed("GET".into()),
            ),
            (
                checkout(),
                "POST",
                "/v1/refunds",
                AccessDenial::PathNotAllowed("/v1/refunds".into()),
            ),
            (
                token(CHECKOUT, "payments:read", TokenClass::Service),
                "POST",
                "/v1/charges",
                AccessDenial::MissingScope("payments:charge".parse().unwrap()),
            ),
            (
                token(
                    "spiffe://example.org/ns/x/sa/stranger",
                    "a:b",
                    TokenClass::Service,
                ),
                "POST",
                "/v1/charges",
                AccessDenial::CallerNotAllowed("spiffe://example.org/ns/x/sa/stranger".into()),
            ),
        ];
        for (token, method, path, denial) in cases {
            let refusal = mesh
                .judge(&token, method, path, &limits, NOW_MS)
                .unwrap_err();
            assert_eq!(refusal, Refusal::AccessDenied(denial.clone()), "{path}");
        }
        let elsewhere = Mesh {
            workload: id("spiffe://example.org/ns/x/sa/unprotected"),
            ..Mesh::new()
        };
        assert!(matches!(
            elsewhere.charge(&checkout()),
            Err(Refusal::AccessDenied(AccessDenial::NoRuleForWorkload(_)))
        ));
    }

    #[test]
    fn revocation_by_jti_covers_the_token_whenever_it_was_issued() {
        let mesh = Mesh::new().revoke(RevocationTarget::Jti(format!("jti-{CHECKOUT}")), 0);
        assert_eq!(
            mesh.charge(&checkout()).unwrap_err(),
            Refusal::Revoked {
                jti: format!("jti-{CHECKOUT}")
            }
        );
    }

    #[test]
    fn revocation_by_holder_key_or_time_covers_tokens_issued_in_its_second_not_after() {
        for target in [
            RevocationTarget::Subject(id(CHECKOUT)),
            RevocationTarget::Jkt(jkt(1)),
            RevocationTarget::Everything,
        ] {
            // Issued in the revocation's second: covered.
            let mesh = Mesh::new().revoke(target.clone(), IAT);
            assert!(
                matches!(mesh.charge(&checkout()), Err(Refusal::Revoked { .. })),
                "{target:?}"
            );
            // Issued the second after: a new token, allowed.
            let mesh = Mesh::new().revoke(target.clone(), IAT - 1);
            assert!(mesh.charge(&checkout()).is_ok(), "{target:?}");
        }
        // Another key's revocation leaves this token alone.
        let mesh = Mesh::new().revoke(RevocationTarget::Jkt(jkt(2)), IAT);
        assert!(mesh.charge(&checkout()).is_ok());
    }

    #[test]
    fn a_denied_identity_is_refused_until_allowed_again() {
        let entry = |denied| Denial {
            spiffe_id: id(CHECKOUT),
            denied,
            reason: "pod compromised".into(),
            actor: "spiffe://example.org/admin".into(),
            at: IAT,
        };
        let mut mesh = Mesh::new();
        mesh.denied.apply(1, entry(true));
        assert_eq!(
            mesh.charge(&checkout()).unwrap_err(),
            Refusal::IdentityDenied {
                caller: id(CHECKOUT)
            }
        );
        mesh.denied.apply(2, entry(false));
        assert!(mesh.charge(&checkout()).is_ok());
    }

    #[test]
    fn when_stale_admin_tokens_are_refused_and_with_deny_when_stale_every_token() {
        let admin = token(CHECKOUT, "payments:charge", TokenClass::Admin);
        let now = NOW_MS / 1000;
        // Down for exactly the bound: not stale yet.
        let mesh = Mesh {
            watch_down_since: Some(now - 30),
            ..Mesh::new()
        };
        assert!(mesh.charge(&admin).is_ok());
        // One second past it: admin refused, service still judged.
        let mesh = Mesh {
            watch_down_since: Some(now - 31),
            ..Mesh::new()
        };
        assert_eq!(
            mesh.charge(&admin).unwrap_err(),
            Refusal::Stale {
                down_for: 31,
                after: 30
            }
        );
        assert!(mesh.charge(&checkout()).is_ok());
        // deny_when_stale: every token refused.
        let mesh = Mesh {
            stale: StaleRule {
                after: 30,
                deny_all: true,
            },
            ..mesh
        };
        assert!(matches!(
            mesh.charge(&checkout()),
            Err(Refusal::Stale { .. })
        ));
        // Up again (or never connected): nothing is stale.
        let mesh = Mesh {
            watch_down_since: None,
            ..mesh
        };
        assert!(mesh.charge(&admin).is_ok());
    }

    #[test]
    fn revocation_is_judged_before_staleness_and_staleness_before_policy() {
        let mut mesh = Mesh::new().revoke(RevocationTarget::Subject(id(CHECKOUT)), IAT);
        mesh.watch_down_since = Some(0);
        mesh.stale.deny_all = true;
        assert!(matches!(
            mesh.judge(&checkout(), "GET", "/nowhere", &CallerLimits::new(), NOW_MS),
            Err(Refusal::Revoked { .. })
        ));
        let mesh = Mesh {
            revocations: RevocationSet::default(),
            ..mesh
        };
        assert!(matches!(
            mesh.judge(&checkout(), "GET", "/nowhere", &CallerLimits::new(), NOW_MS),
            Err(Refusal::Stale { .. })
        ));
    }

    #[test]
    fn a_rate_limited_caller_is_refused_then_allowed_after_refill() {
        let mesh = Mesh::new();
        let limits = CallerLimits::new();
        let reporting = token(REPORTING, "payments:read", TokenClass::Service);
        let read = |at_ms| mesh.judge(&reporting, "GET", "/v1/balance", &limits, at_ms);
        assert!(read(NOW_MS).is_ok());
        assert!(read(NOW_MS).is_ok());
        assert_eq!(
            read(NOW_MS).unwrap_err(),
            Refusal::RateLimited { retry_after: 1 }
        );
        // 2/s: one token back after 500 ms.
        assert!(read(NOW_MS + 500).is_ok());
        assert!(read(NOW_MS + 500).is_err());
        // A refused request spends nothing: a path the rule does not
        // allow leaves the bucket as it was.
        let limits = CallerLimits::new();
        for _ in 0..5 {
            let refused = mesh.judge(&reporting, "POST", "/v1/balance", &limits, NOW_MS);
            assert!(matches!(refused, Err(Refusal::AccessDenied(_))));
        }
        let read = |at_ms| mesh.judge(&reporting, "GET", "/v1/balance", &limits, at_ms);
        assert!(read(NOW_MS).is_ok() && read(NOW_MS).is_ok());
    }

    #[test]
    fn every_refusal_has_its_label_and_only_the_callers_failures_are_audited() {
        use crate::dpop::ProofError;
        let proof = |e| Refusal::from(AuthError::Proof(e));
        let denied = |d| Refusal::AccessDenied(d);
        let malformed = AuthError::Request(super::super::RequestError::Malformed);
        let kid = AuthError::Token(crate::token::TokenError::KidMissing);
        let stale = Refusal::Stale {
            down_for: 40,
            after: 30,
        };
        let audited = [
            (
                Refusal::Target(TargetError::Misdirected("x".into())),
                "misdirected",
            ),
            (Refusal::Target(TargetError::TwoHosts), "bad_request"),
            (AuthError::NoCredentials.into(), "no_credentials"),
            (malformed.into(), "bad_request"),
            (kid.into(), "invalid_token"),
            (proof(ProofError::Replayed), "replayed_proof"),
            (proof(ProofError::AthMismatch), "invalid_dpop_proof"),
            (AuthError::Overloaded.into(), "overloaded"),
            (Refusal::Revoked { jti: "j".into() }, "revoked"),
            (
                Refusal::IdentityDenied {
                    caller: id(CHECKOUT),
                },
                "identity_denied",
            ),
            (stale, "revocations_stale"),
            (
                denied(AccessDenial::MissingScope("a:b".parse().unwrap())),
                "insufficient_scope",
            ),
            (
                denied(AccessDenial::PathNotAllowed("/x".into())),
                "policy_denied",
            ),
            (Refusal::RateLimited { retry_after: 2 }, "rate_limited"),
        ];
        for (refusal, reason) in audited {
            assert_eq!(refusal.reason(), reason, "{refusal:?}");
            assert!(refusal.is_callers_failure(), "{refusal:?}");
        }
        // The protocol working, and this sidecar's own state.
        for (refusal, reason) in [
            (proof(ProofError::NonceMissing), "use_dpop_nonce"),
            (Refusal::NotReady, "not_ready"),
        ] {
            assert_eq!(refusal.reason(), reason);
            assert!(!refusal.is_callers_failure(), "{refusal:?}");
        }
    }

    #[test]
    fn descriptions_say_what_callers_were_always_told() {
        let scope = Refusal::AccessDenied(AccessDenial::MissingScope("a:b".parse().unwrap()));
        assert_eq!(scope.to_string(), "token lacks the required scope a:b");
        let path = Refusal::AccessDenied(AccessDenial::PathNotAllowed("/x".into()));
        assert_eq!(
            path.to_string(),
            "denied by policy: path /x is not allowed for this caller"
        );
        let core = Refusal::from(AuthError::NoCredentials);
        assert_eq!(core.to_string(), "no DPoP credentials");
    }
}
