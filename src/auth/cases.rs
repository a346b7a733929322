//! Every distinct way [`refusal_answer`](super::answer::refusal_answer)
//! answers a refused request, each with an example refusal and when it
//! happens: the source of the error table in `docs/ERRORS.md`, which a
//! test renders from [`Case::ALL`]. [`case`] matches every [`Refusal`]
//! without a catch-all, so a new variant does not build until it has a
//! case, an example and a sentence here.

use super::error::{AuthError, RequestError};
use super::forwarded::ForwardedError;
use super::target::TargetError;
use super::verdict::Refusal;
use crate::dpop::ProofError;
use crate::policy::AccessDenial;
use crate::token::TokenError;

/// A row of the error table: one kind of refusal and its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Case {
    /// No `Authorization` (or a scheme that is not DPoP, with a token
    /// that is not bound).
    NoCredentials,
    /// `Authorization: DPoP` without a `DPoP` header.
    MissingProof,
    /// More than one `DPoP` header.
    MultipleProofs,
    /// A DPoP-bound token sent with `Bearer`.
    BoundTokenAsBearer,
    /// More than one `Authorization` header.
    MultipleAuthorization,
    /// `Bearer` and a `DPoP` proof together.
    BearerWithProof,
    /// A `DPoP` proof without a token.
    MissingToken,
    /// Headers that are not `scheme token68`, or not ASCII.
    Malformed,
    /// WIMSE credentials doubled, or mixed with DPoP or another scheme.
    WimseMalformed,
    /// A WIT without a WPT, or a WPT without a WIT.
    WimseIncomplete,
    /// The WIMSE Workload Identity Token failed a check.
    Wit,
    /// The WIMSE Workload Proof Token failed a check, replay included.
    Wpt,
    /// The access token sent with a WIT is not bound to its key.
    TokenNotForWit,
    /// The access token failed a check.
    Token,
    /// On mutual TLS, a token held by another workload than the peer.
    NotThePeer,
    /// The proof lacks the server nonce, or carries a stale one.
    Nonce,
    /// The proof failed any other check, replay included.
    Proof,
    /// The replay cache is full.
    Overloaded,
    /// An authority this sidecar does not serve.
    Misdirected,
    /// A request head with no usable target.
    BadTarget,
    /// A proxy in front (ext_authz) described a request that cannot be
    /// judged.
    BadCheck,
    /// A peer certificate sent along by a proxy in front does not verify.
    PeerUnverified,
    /// Plaintext on a port that demands mutual TLS.
    MtlsRequired,
    /// No keys or access rules from the broker yet.
    NotReady,
    /// A revocation covers the token.
    Revoked,
    /// A revocation covers the WIMSE Workload Identity Token.
    WitRevoked,
    /// The holder is a denied identity.
    IdentityDenied,
    /// The Watch stream has been down too long.
    Stale,
    /// The rule allows the caller but not without a scope it lacks.
    MissingScope,
    /// No rule lets this caller make this call.
    PolicyDenied,
    /// The caller spent its rate.
    RateLimited,
}

impl Case {
    /// Every case, in the table's order.
    pub const ALL: [Self; 31] = [
        Self::NoCredentials,
        Self::MissingProof,
        Self::MultipleProofs,
        Self::BoundTokenAsBearer,
        Self::MultipleAuthorization,
        Self::BearerWithProof,
        Self::MissingToken,
        Self::Malformed,
        Self::WimseMalformed,
        Self::WimseIncomplete,
        Self::Wit,
        Self::Wpt,
        Self::TokenNotForWit,
        Self::Token,
        Self::NotThePeer,
        Self::Nonce,
        Self::Proof,
        Self::Overloaded,
        Self::Misdirected,
        Self::BadTarget,
        Self::BadCheck,
        Self::PeerUnverified,
        Self::MtlsRequired,
        Self::NotReady,
        Self::Revoked,
        Self::WitRevoked,
        Self::IdentityDenied,
        Self::Stale,
        Self::MissingScope,
        Self::PolicyDenied,
        Self::RateLimited,
    ];

    /// When it happens, for the reference.
    pub fn when(self) -> &'static str {
        match self {
            Self::NoCredentials => {
                "No `Authorization` header, or a scheme other than DPoP with a token that is not DPoP-bound."
            }
            Self::MissingProof => "`Authorization: DPoP …` without a `DPoP` proof header.",
            Self::MultipleProofs => "More than one `DPoP` header (RFC 9449 §4.3).",
            Self::BoundTokenAsBearer => {
                "A DPoP-bound token (it has `cnf.jkt`) sent as `Authorization: Bearer` (RFC 9449 §7.2)."
            }
            Self::MultipleAuthorization => "More than one `Authorization` header.",
            Self::BearerWithProof => "`Authorization: Bearer` together with a `DPoP` header.",
            Self::MissingToken => "A `DPoP` proof header without `Authorization: DPoP`.",
            Self::Malformed => {
                "An `Authorization` or `DPoP` value that is not `scheme token68`, or not ASCII."
            }
            Self::WimseMalformed => {
                "Two `Workload-Identity-Token` or `Txn-Token` headers, two WPTs (two `Workload-Proof-Token` headers, or one and `Authorization: WPT`), a `DPoP` header beside WIMSE credentials, a scheme other than DPoP beside a `Workload-Proof-Token`, or a WIT or WPT value that is not one compact JWT."
            }
            Self::WimseIncomplete => {
                "A `Workload-Identity-Token` without a WPT, or a WPT without a WIT: a WIT is never a bearer token."
            }
            Self::Wit => {
                "The `Workload-Identity-Token` failed a check: not a JWS, `typ` not `wit+jwt`, `alg` not ES256 or EdDSA, unknown `kid`, bad signature, `sub` not a SPIFFE ID, expired or not yet valid, `cnf.jwk` missing, private or without a fitting `alg`: 401 with a `WPT` challenge."
            }
            Self::Wpt => {
                "The Workload Proof Token failed a check: `typ` not `wpt+jwt`, `alg` not the WIT's `cnf.jwk.alg`, signature not by the WIT's key, `aud` not this request's URL, expired or too long-lived, `jti` short or already seen (replay), `wth`, `ath`, `tth` or `oth` not matching what came, (just after a restart) no `iat` after the start, or a WIT alone where nothing pins `aud` to this server (no `--inbound-authority`, no mTLS peer, no access token): 401 with a `WPT` challenge."
            }
            Self::TokenNotForWit => {
                "The access token sent with a WIT is held by another workload, or bound (`cnf.jkt`) to another key than the WIT's."
            }
            Self::Token => {
                "The access token failed a check: not a JWS, `typ` not `at+jwt`, unknown `kid`, bad signature, wrong `iss` or `aud`, expired or not yet valid, a claim missing or malformed."
            }
            Self::NotThePeer => {
                "On a mutual-TLS connection, the token's holder (`sub`) is not the SPIFFE ID of the peer's X.509-SVID, whatever proof comes with it: a sidecar cannot relay another workload's token."
            }
            Self::Nonce => {
                "The sidecar demands server nonces (`--inbound-nonces`, and for a while after a restart) and the proof has none or a stale one: retry with the `DPoP-Nonce` value."
            }
            Self::Proof => {
                "The DPoP proof failed a check: `typ`, `jwk`, signature, `htm`, `htu`, `iat` window, `ath`, its key not the token's `cnf.jkt`, or its `jti` already seen (replay)."
            }
            Self::Overloaded => {
                "The replay cache is full: the verifier fails closed rather than forget a `jti`."
            }
            Self::Misdirected => {
                "The request addresses an authority not in `--inbound-authority` (checked before any token work)."
            }
            Self::BadTarget => {
                "The request head has no usable target: several `Host` headers, none, one that is not text, one that disagrees with the URI, or a bad authority, URL or path."
            }
            Self::BadCheck => {
                "Envoy's ext_authz check describes no HTTP request or method, a scheme other than http or https, a header two different ways, or a path not in normal form (the app would route a path other than the one judged; set Envoy's `normalize_path: true`)."
            }
            Self::PeerUnverified => {
                "Envoy's ext_authz check carries a peer certificate that does not chain to the sidecar's trust bundle, is not valid now, or does not name the peer (`source.principal`) the check claims."
            }
            Self::MtlsRequired => {
                "The inbound port demands mutual TLS (`--inbound-mtls required`) and the request came in plaintext, or over TLS without a mesh SVID (checked before any token work)."
            }
            Self::NotReady => {
                "The sidecar has not received the broker's keys and access rules yet."
            }
            Self::Revoked => {
                "A revocation covers the token (by `jti`, holder, key, signing key or issue time)."
            }
            Self::WitRevoked => {
                "A revocation covers the WIMSE Workload Identity Token (by `jti`, holder, key, signing key or issue time): 401 with a `WPT` challenge."
            }
            Self::IdentityDenied => {
                "The token's holder has been denied with `tally ctl identities deny`, whatever the token says."
            }
            Self::Stale => {
                "The Watch stream has been down longer than `--watch-staleness`: for admin-class tokens, and for every token with `--deny-when-stale`."
            }
            Self::MissingScope => {
                "An access rule allows the caller, method and path, but the token lacks a scope it requires."
            }
            Self::PolicyDenied => {
                "No access rule for this workload, or none allowing this caller, method or path."
            }
            Self::RateLimited => "The caller spent the rate of its allow entry.",
        }
    }

    /// A refusal of this case.
    pub fn example(self) -> Refusal {
        let caller = || {
            "spiffe://example.org/ns/shop/sa/checkout"
                .parse()
                .unwrap_or_else(|_| unreachable!("a valid SPIFFE ID"))
        };
        match self {
            Self::NoCredentials => AuthError::NoCredentials.into(),
            Self::MissingProof => AuthError::Request(RequestError::MissingProof).into(),
            Self::MultipleProofs => AuthError::Request(RequestError::MultipleProofs).into(),
            Self::BoundTokenAsBearer => AuthError::Request(RequestError::BoundTokenAsBearer).into(),
            Self::MultipleAuthorization => {
                AuthError::Request(RequestError::MultipleAuthorization).into()
            }
            Self::BearerWithProof => AuthError::Request(RequestError::BearerWithProof).into(),
            Self::MissingToken => AuthError::Request(RequestError::MissingToken).into(),
            Self::Malformed => AuthError::Request(RequestError::Malformed).into(),
            Self::WimseMalformed => AuthError::Request(RequestError::DpopWithWimse).into(),
            Self::WimseIncomplete => AuthError::WimseIncomplete {
                missing: "Workload-Proof-Token",
            }
            .into(),
            Self::Wit => AuthError::Wit(crate::wimse::WitError::KidMissing).into(),
            Self::Wpt => AuthError::WptReplayed.into(),
            Self::TokenNotForWit => AuthError::TokenNotForWit.into(),
            Self::Token => AuthError::Token(TokenError::KidMissing).into(),
            Self::NotThePeer => AuthError::NotThePeer.into(),
            Self::Nonce => AuthError::Proof(ProofError::NonceMissing).into(),
            Self::Proof => AuthError::Proof(ProofError::Replayed).into(),
            Self::Overloaded => AuthError::Overloaded.into(),
            Self::Misdirected => TargetError::Misdirected("pay.svc:9090".into()).into(),
            Self::BadTarget => TargetError::TwoHosts.into(),
            Self::BadCheck => ForwardedError::NoHttpRequest.into(),
            Self::PeerUnverified => {
                ForwardedError::PeerUnverified("it does not chain to the trust bundle".into())
                    .into()
            }
            Self::MtlsRequired => Refusal::MtlsRequired,
            Self::NotReady => Refusal::NotReady,
            Self::Revoked => Refusal::Revoked {
                jti: "0190a1b2c3d4".into(),
            },
            Self::WitRevoked => Refusal::WitRevoked {
                jti: "0190a1b2c3d5".into(),
            },
            Self::IdentityDenied => Refusal::IdentityDenied { caller: caller() },
            Self::Stale => Refusal::Stale {
                down_for: 40,
                after: 30,
            },
            Self::MissingScope => Refusal::AccessDenied(AccessDenial::MissingScope(
                "payments:charge"
                    .parse()
                    .unwrap_or_else(|_| unreachable!("a valid scope")),
            )),
            Self::PolicyDenied => {
                Refusal::AccessDenied(AccessDenial::CallerNotAllowed(caller().as_str().to_owned()))
            }
            Self::RateLimited => Refusal::RateLimited { retry_after: 3 },
        }
    }
}

/// The case `refusal` falls in.
pub fn case(refusal: &Refusal) -> Case {
    match refusal {
        Refusal::Unverified(error) => match error {
            AuthError::NoCredentials => Case::NoCredentials,
            AuthError::Request(r) => match r {
                RequestError::MissingProof => Case::MissingProof,
                RequestError::MultipleProofs => Case::MultipleProofs,
                RequestError::BoundTokenAsBearer => Case::BoundTokenAsBearer,
                RequestError::MultipleAuthorization => Case::MultipleAuthorization,
                RequestError::BearerWithProof => Case::BearerWithProof,
                RequestError::MissingToken => Case::MissingToken,
                RequestError::Malformed => Case::Malformed,
                RequestError::MultipleWits
                | RequestError::MultipleWpts
                | RequestError::DpopWithWimse
                | RequestError::UnknownSchemeWithWimse
                | RequestError::MultipleTxnTokens => Case::WimseMalformed,
            },
            AuthError::WimseIncomplete { .. } => Case::WimseIncomplete,
            AuthError::Wit(_) => Case::Wit,
            AuthError::Wpt(_)
            | AuthError::WptReplayed
            | AuthError::WptBeforeRestart { .. }
            | AuthError::WptAudUnpinned => Case::Wpt,
            AuthError::TokenNotForWit => Case::TokenNotForWit,
            AuthError::Token(_) => Case::Token,
            AuthError::NotThePeer => Case::NotThePeer,
            AuthError::Proof(p) if p.wants_nonce() => Case::Nonce,
            AuthError::Proof(_) => Case::Proof,
            AuthError::Overloaded => Case::Overloaded,
        },
        Refusal::Target(TargetError::Misdirected(_)) => Case::Misdirected,
        Refusal::Target(
            TargetError::TwoHosts
            | TargetError::NoHost
            | TargetError::HostNotText
            | TargetError::HostMismatch
            | TargetError::Authority(_)
            | TargetError::Url(_)
            | TargetError::Path(_),
        ) => Case::BadTarget,
        Refusal::Forwarded(ForwardedError::PeerUnverified(_)) => Case::PeerUnverified,
        Refusal::Forwarded(
            ForwardedError::NoHttpRequest
            | ForwardedError::NoMethod
            | ForwardedError::Scheme
            | ForwardedError::Disagrees(_)
            | ForwardedError::NotNormalized,
        ) => Case::BadCheck,
        Refusal::MtlsRequired => Case::MtlsRequired,
        Refusal::NotReady => Case::NotReady,
        Refusal::Revoked { .. } => Case::Revoked,
        Refusal::WitRevoked { .. } => Case::WitRevoked,
        Refusal::IdentityDenied { .. } => Case::IdentityDenied,
        Refusal::Stale { .. } => Case::Stale,
        Refusal::AccessDenied(AccessDenial::MissingScope(_)) => Case::MissingScope,
        Refusal::AccessDenied(
            AccessDenial::NoRuleForWorkload(_)
            | AccessDenial::CallerNotAllowed(_)
            | AccessDenial::MethodNotAllowed(_)
            | AccessDenial::PathNotAllowed(_),
        ) => Case::PolicyDenied,
        Refusal::RateLimited { .. } => Case::RateLimited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_case_is_listed_once_and_its_example_falls_in_it() {
        for (i, c) in Case::ALL.iter().enumerate() {
            assert_eq!(case(&c.example()), *c);
            assert!(!Case::ALL[..i].contains(c), "{c:?} twice");
        }
    }
}
