//! JOSE building blocks: strict base64url, strict JSON, P-256 and Ed25519
//! JWKs and thumbprints, ES256 and EdDSA keys, and the compact JWS parser.
//! Pure: no I/O, no clock.

pub mod b64;
pub mod claims;
pub mod ed25519;
pub mod json;
pub mod jwk;
pub mod jws;
pub mod key;
pub mod signer;
pub mod verifying;

pub use ed25519::{Ed25519PublicKey, Ed25519SigningKey};
pub use jwk::{Jkt, JwkError, KeyCache, PublicKey};
pub use jws::{Alg, Jws, JwsError, Limits};
pub use key::{KeyError, SignError, SigningKey};
pub use signer::{AnySigningKey, JwsSigner};
pub use verifying::VerifyingKey;

/// Receives each named check of a verification as it passes, so a tool can
/// print a step-by-step report. The hot path passes `&mut ()`, which does
/// nothing and compiles away.
pub trait Observer<C> {
    /// `check` passed.
    fn passed(&mut self, check: C);
}

impl<C> Observer<C> for () {
    #[inline]
    fn passed(&mut self, _: C) {}
}

impl<C> Observer<C> for Vec<C> {
    fn passed(&mut self, check: C) {
        self.push(check);
    }
}
