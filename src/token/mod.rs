//! RFC 9068 access tokens: claim types ([`claims`]), minting and
//! verification ([`access`]), trusted key sets ([`jwks`]) and the
//! verified-token cache ([`cache`]).

pub mod access;
pub mod cache;
pub mod claims;
pub mod jwks;
pub mod revocation;

pub use access::{
    AT_TYP, AccessToken, MintRequest, TokenCheck, TokenClaims, TokenConfig, TokenError,
    TokenSigner, verify,
};
pub use cache::VerifiedTokens;
pub use claims::{Audience, ClaimValueError, Scope, Scopes, TokenClass};
pub use jwks::{Jwks, JwksError};
pub use revocation::{Revocation, RevocationSet, RevocationTarget, TokenRef};
