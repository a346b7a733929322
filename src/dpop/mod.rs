//! RFC 9449 DPoP: proofs ([`proof`]), the `htu` normalization they are
//! compared with ([`htu`]), the replay cache ([`replay`]) and stateless
//! server nonces ([`nonce`]).

pub mod htu;
pub mod nonce;
pub mod proof;
pub mod replay;

pub use htu::{NormalizedUri, UriError};
pub use nonce::{NonceError, Nonces};
pub use proof::{
    NonceRule, ProofCheck, ProofConfig, ProofContext, ProofError, ProofKey, TokenHash,
    VerifiedProof, verify,
};
pub use replay::{ReplayCache, ReplayError, ReplayKey};
