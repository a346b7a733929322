//! Judging a request, apart from any server: what it addresses
//! ([`target`], [`path`]), its credentials ([`credentials`]), the token
//! core's whole DPoP-bound check ([`request`], refusing with an
//! [`error::AuthError`]), the admission verdict on what passed it
//! ([`verdict`]: revocations, denied identities, staleness, access rules,
//! rate limits), and the one mapping from a refusal to its HTTP answer
//! ([`mod@answer`]). Every front end (inbound proxy, ext_authz, WIMSE) runs
//! these in that order.

pub mod answer;
pub mod bound;
pub mod cases;
pub mod credentials;
pub mod error;
pub mod forwarded;
pub mod path;
pub mod request;
pub mod target;
pub mod verdict;
pub mod wimse;

pub use answer::{HttpAnswer, answer, refusal_answer};
pub use bound::{ConnectionTokens, Possession, VerifiedOnConnection};
pub use credentials::Credentials;
pub use error::{AuthError, RequestError};
pub use forwarded::ForwardedError;
pub use request::{ParsedRequest, Request, RequestVerifier, Verified, VerifierConfig};
pub use verdict::{Allowed, MeshView, Refusal, VerifiedRequest, judge};
