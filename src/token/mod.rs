//! RFC 9068 access tokens: claim types ([`claims`]), minting and
//! verification ([`access`]), trusted key sets ([`jwks`]) and the
//! verified-token cache ([`cache`]); SPIFFE JWT-SVIDs, signed with the
//! same keys ([`jwt_svid`]).

pub mod access;
pub mod cache;
pub mod claims;
pub mod jwks;
pub mod jwt_svid;
pub mod revocation;

pub use access::{
    AT_TYP, AccessToken, MintRequest, TokenCheck, TokenClaims, TokenConfig, TokenError,
    TokenSigner, verify,
};
pub use cache::VerifiedTokens;
pub use claims::{Audience, ClaimValueError, Scope, Scopes, TokenClass, TokenKind};
pub use jwks::{Jwks, JwksError};
pub use jwt_svid::{JwtSvid, JwtSvidClaims, JwtSvidError, VerifiedJwtSvid};
pub use revocation::{Revocation, RevocationSet, RevocationTarget, TokenRef};
