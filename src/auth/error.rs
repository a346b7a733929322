//! Why the token core refuses a request: [`AuthError`] (and the
//! malformed-request cases, [`RequestError`]). Mapped to HTTP by
//! [`mod@super::answer`]; the refusals the mesh adds after the token core
//! (revocation, denied identity, staleness, policy, rate) are
//! [`super::verdict::Refusal`]s.

use crate::dpop::ProofError;
use crate::token::TokenError;
use crate::wimse::{WitError, WptError};

/// Why the token core ([`super::RequestVerifier`]) refused a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No usable credentials: 401 with a bare `DPoP` challenge.
    #[error("no DPoP credentials")]
    NoCredentials,
    /// Malformed request: 400 `invalid_request` (401 for a missing or
    /// doubled proof, or a bound token sent as Bearer).
    #[error("{0}")]
    Request(#[from] RequestError),
    /// The access token failed a check: 401 `invalid_token`.
    #[error("access token: {0}")]
    Token(#[from] TokenError),
    /// The proof failed a check: 401 `invalid_dpop_proof`, or
    /// `use_dpop_nonce` for nonce problems.
    #[error("DPoP proof: {0}")]
    Proof(#[from] ProofError),
    /// On a mutual-TLS connection, a token whose holder (`sub`) is not the
    /// TLS peer: 401 `invalid_token`, whatever proof comes with it.
    #[error("access token: its holder is not this connection's TLS peer")]
    NotThePeer,
    /// The WIMSE Workload Identity Token failed a check: 401 with a `WPT`
    /// challenge, `invalid_wit`.
    #[error("workload identity token: {0}")]
    Wit(#[from] WitError),
    /// The WIMSE Workload Proof Token failed a check: 401 with a `WPT`
    /// challenge, `invalid_wpt`.
    #[error("workload proof token: {0}")]
    Wpt(#[from] WptError),
    /// The WPT's `jti` was seen before: 401 `invalid_wpt`.
    #[error("workload proof token: already used (replay)")]
    WptReplayed,
    /// This verifier started less than a WPT lifetime ago, and the WPT
    /// has no `iat` after that start: it may have been spent with the
    /// previous process, whose replay cache is gone. 401 `invalid_wpt`.
    #[error(
        "workload proof token: this verifier started at {started} and, until a WPT lifetime has passed, accepts only WPTs with an iat from then on"
    )]
    WptBeforeRestart {
        /// When the verifier started (Unix seconds).
        started: u64,
    },
    /// A WIT and WPT alone where nothing pins the WPT's `aud` to this
    /// server: no configured authorities, no authenticated sender, no
    /// access token (see [`super::wimse`]). 401 `invalid_wpt`.
    #[error(
        "workload proof token: its aud cannot be trusted to name this server (no --inbound-authority is configured): send an access token with it, or call over mutual TLS"
    )]
    WptAudUnpinned,
    /// The access token sent with a WIT is not the WIT holder's, or not
    /// bound to the WIT's key: 401 `invalid_token`.
    #[error("access token: not held by the WIT's subject with the WIT's key (cnf.jkt)")]
    TokenNotForWit,
    /// A WIMSE Workload Identity Token without its proof, or a proof
    /// without the token: 401 with a `WPT` challenge (a WIT is never a
    /// bearer token).
    #[error("WIMSE credentials without a {missing} header")]
    WimseIncomplete {
        /// The header that is missing.
        missing: &'static str,
    },
    /// The verifier cannot safely accept more proofs right now (the replay
    /// cache is full): 503, failing closed.
    #[error("verifier overloaded")]
    Overloaded,
}

/// A request that is malformed rather than unauthenticated: answered with
/// 400 `invalid_request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RequestError {
    /// More than one `Authorization` header.
    #[error("more than one Authorization header")]
    MultipleAuthorization,
    /// More than one `DPoP` header (RFC 9449 §4.3 check 1).
    #[error("more than one DPoP header")]
    MultipleProofs,
    /// `Authorization: Bearer` together with a `DPoP` header.
    #[error("Bearer and DPoP used together")]
    BearerWithProof,
    /// A DPoP-bound token presented as a bearer token (RFC 9449 §7.2).
    #[error("DPoP-bound access token sent with the Bearer scheme")]
    BoundTokenAsBearer,
    /// `Authorization: DPoP` without a `DPoP` proof header.
    #[error("DPoP authorization without a DPoP proof header")]
    MissingProof,
    /// A `DPoP` proof header without `Authorization: DPoP`.
    #[error("DPoP proof header without a DPoP access token")]
    MissingToken,
    /// More than one `Workload-Identity-Token` header.
    #[error("more than one Workload-Identity-Token header")]
    MultipleWits,
    /// More than one WPT (two `Workload-Proof-Token` headers, or one and
    /// `Authorization: WPT`).
    #[error("more than one Workload Proof Token")]
    MultipleWpts,
    /// A `DPoP` proof header together with WIMSE credentials.
    #[error("DPoP proof and WIMSE credentials used together")]
    DpopWithWimse,
    /// More than one `Txn-Token` header.
    #[error("more than one Txn-Token header")]
    MultipleTxnTokens,
    /// An `Authorization` scheme other than DPoP beside a
    /// `Workload-Proof-Token`.
    #[error("only Authorization: DPoP may accompany a Workload-Proof-Token")]
    UnknownSchemeWithWimse,
    /// The header value is not `scheme token68` or is not ASCII.
    #[error("malformed Authorization or DPoP header")]
    Malformed,
}
