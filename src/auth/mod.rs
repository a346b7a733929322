//! A whole DPoP-bound request check ([`request`]), reading the credentials
//! from headers ([`credentials`]), what a request addresses and which paths
//! may be judged ([`target`], [`path`]), and the one mapping from a refusal
//! to its HTTP answer ([`answer`]).

pub mod answer;
pub mod credentials;
pub mod path;
pub mod request;
pub mod target;

pub use answer::{HttpAnswer, answer};
pub use credentials::{Credentials, RequestError};
pub use request::{Request, RequestVerifier, Verified, VerifierConfig};

use crate::dpop::ProofError;
use crate::token::TokenError;

/// Why a request was refused: every refusal a verifier can give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// No usable credentials: 401 with a bare `DPoP` challenge.
    #[error("no DPoP credentials")]
    NoCredentials,
    /// Malformed request: 400 `invalid_request`.
    #[error("{0}")]
    Request(#[from] RequestError),
    /// The access token failed a check: 401 `invalid_token`.
    #[error("access token: {0}")]
    Token(#[from] TokenError),
    /// The access token was revoked: 401 `invalid_token`.
    #[error("access token was revoked")]
    Revoked,
    /// The token's holder (`sub`) is an identity the broker's admins have
    /// denied: 401 `invalid_token`, whatever the token says.
    #[error("the token's holder is a denied identity")]
    IdentityDenied,
    /// The proof failed a check: 401 `invalid_dpop_proof`, or
    /// `use_dpop_nonce` for nonce problems.
    #[error("DPoP proof: {0}")]
    Proof(#[from] ProofError),
    /// The token lacks a scope the resource requires: 403.
    #[error("token lacks the required scope {scope}")]
    InsufficientScope {
        /// The missing scope.
        scope: String,
    },
    /// Policy denies this caller: 403.
    #[error("denied by policy: {0}")]
    Forbidden(String),
    /// Too many requests from this caller: 429.
    #[error("rate limit exceeded")]
    RateLimited {
        /// Seconds until a retry may succeed.
        retry_after: u64,
    },
    /// The verifier cannot safely accept more proofs right now (the replay
    /// cache is full): 503, failing closed.
    #[error("verifier overloaded")]
    Overloaded,
}
