//! Workload Identity Tokens: minted by the broker for a sidecar's own key
//! (ES256, `kid`, `typ: wit+jwt`, `sub` the SPIFFE ID, `cnf.jwk` the
//! sidecar's public key with its `alg`, `iat`, `nbf`, `exp`, `jti`, no
//! `aud` and no `iss`), so a WIT satisfies both the WIMSE draft and the
//! SPIFFE WIT-SVID profile: `kid` present, `alg` ES256 (on both
//! profiles' lists), and no issuer a verifier could mistake for an
//! OpenID provider.

use crate::identity::SpiffeId;
use crate::jose::jws::{self, ALG_ES256};
use crate::jose::key::SignError;
use crate::jose::{Jkt, PublicKey};
use crate::token::TokenSigner;
use serde_json::{Value, json};
use std::fmt;
use zeroize::Zeroizing;

/// The `typ` of a WIT.
pub const WIT_TYP: &str = "wit+jwt";

/// A WIT string. Redacted in `Debug`, wiped on drop: with a proof from
/// its key it is a credential, and a captured one names its holder.
#[derive(Clone, PartialEq, Eq)]
pub struct Wit(Zeroizing<String>);

impl Wit {
    /// Wraps a WIT string (as a sidecar receives one from the broker).
    pub fn new(token: String) -> Self {
        Self(Zeroizing::new(token))
    }

    /// The token text, for the places that must send or hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Wit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Wit(<redacted, {} bytes>)", self.0.len())
    }
}

/// What a minted WIT says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitClaims {
    /// The workload it names.
    pub sub: SpiffeId,
    /// The thumbprint (RFC 7638) of its `cnf.jwk`: what revocations by
    /// key, and an access token's `cnf.jkt` sent with it, match.
    pub jkt: Jkt,
    /// Issued at (also its `nbf`).
    pub iat: u64,
    /// Expires at.
    pub exp: u64,
    /// Unique id (128 random bits in it).
    pub jti: String,
    /// The signing key's id.
    pub kid: String,
}

/// The `cnf.jwk` of a P-256 key: its RFC 7638 members and `alg: ES256`
/// (both drafts require `alg`: the proof must be made with it).
pub fn confirmation_jwk(key: &PublicKey) -> Value {
    // `to_jwk_json` writes a fixed-shape JSON object from two encoded
    // coordinates: it always parses.
    let mut jwk: serde_json::Map<String, Value> =
        serde_json::from_str(&key.to_jwk_json()).expect("a P-256 JWK is a JSON object");
    jwk.insert("alg".into(), Value::from(ALG_ES256));
    Value::Object(jwk)
}

/// Mints a WIT naming `sub` and binding `key`, signed by `signer`, valid
/// from `now` for `ttl` seconds (at least one).
///
/// # Errors
/// Only if the crypto library or the random source fails.
pub fn mint(
    signer: &TokenSigner,
    sub: &SpiffeId,
    key: &PublicKey,
    ttl: u64,
    now: u64,
) -> Result<(Wit, WitClaims), SignError> {
    let claims = WitClaims {
        sub: sub.clone(),
        jkt: key.thumbprint(),
        iat: now,
        exp: now.saturating_add(ttl.max(1)),
        jti: signer.next_jti(now)?,
        kid: signer.kid().to_owned(),
    };
    let header = jws::encode_header(&json!({
        "typ": WIT_TYP,
        "alg": ALG_ES256,
        "kid": claims.kid,
    }));
    let payload = json!({
        "sub": claims.sub.as_str(),
        "cnf": { "jwk": confirmation_jwk(key) },
        "iat": claims.iat,
        "nbf": claims.iat,
        "exp": claims.exp,
        "jti": claims.jti,
    });
    let payload = serde_json::to_vec(&payload).map_err(|_| SignError)?;
    let token = jws::sign_compact(&header, &payload, signer.key())?;
    Ok((Wit(Zeroizing::new(token)), claims))
}
