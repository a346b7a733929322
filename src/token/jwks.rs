//! JWK sets: the broker's token-signing public keys, looked up by `kid`.

use crate::jose::json::{self, JsonError};
use crate::jose::{JwkError, PublicKey};
use serde_json::{Value, json};
use std::collections::HashMap;

/// Largest JWKS document accepted, in bytes.
pub const MAX_JWKS_LEN: usize = 256 * 1024;
/// Most keys one set may hold.
pub const MAX_KEYS: usize = 64;
/// Longest `kid`.
const MAX_KID_LEN: usize = 128;

/// Why a JWKS document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwksError {
    /// Larger than [`MAX_JWKS_LEN`].
    #[error("JWKS is larger than {MAX_JWKS_LEN} bytes")]
    TooLarge,
    /// Not a JSON object.
    #[error("JWKS is not a JSON object: {0}")]
    Json(JsonError),
    /// No `keys` array.
    #[error("JWKS has no \"keys\" array")]
    NoKeys,
    /// More than [`MAX_KEYS`] keys.
    #[error("JWKS has more than {MAX_KEYS} keys")]
    TooManyKeys,
    /// A key has no usable `kid`.
    #[error("JWKS key #{index} has no kid string (1 to {MAX_KID_LEN} bytes)")]
    Kid {
        /// Position in `keys`.
        index: usize,
    },
    /// Two keys share a `kid`.
    #[error("JWKS has two keys with kid {0:?}")]
    DuplicateKid(String),
    /// A key is unusable.
    #[error("JWKS key {kid:?}: {error}")]
    Key {
        /// Its `kid`.
        kid: String,
        /// What is wrong.
        error: JwkError,
    },
}

/// A set of ES256 verification keys by `kid`.
#[derive(Debug, Clone, Default)]
pub struct Jwks {
    keys: HashMap<String, PublicKey>,
}

impl Jwks {
    /// Parses a JWKS document. Every key must be a P-256 public key with a
    /// unique `kid`; `alg`/`use`, when present, must be `ES256`/`sig`.
    ///
    /// # Errors
    /// [`JwksError`] naming the offending key.
    pub fn parse(bytes: &[u8]) -> Result<Self, JwksError> {
        if bytes.len() > MAX_JWKS_LEN {
            return Err(JwksError::TooLarge);
        }
        let doc = json::parse_object(bytes).map_err(JwksError::Json)?;
        let Some(Value::Array(entries)) = doc.get("keys") else {
            return Err(JwksError::NoKeys);
        };
        if entries.len() > MAX_KEYS {
            return Err(JwksError::TooManyKeys);
        }
        let mut set = Self::default();
        for (index, entry) in entries.iter().enumerate() {
            let kid = entry
                .get("kid")
                .and_then(Value::as_str)
                .filter(|k| !k.is_empty() && k.len() <= MAX_KID_LEN)
                .ok_or(JwksError::Kid { index })?;
            let key = PublicKey::from_jwks_member(entry).map_err(|error| JwksError::Key {
                kid: kid.to_owned(),
                error,
            })?;
            if set.keys.insert(kid.to_owned(), key).is_some() {
                return Err(JwksError::DuplicateKid(kid.to_owned()));
            }
        }
        Ok(set)
    }

    /// Adds a key (replacing one with the same `kid`).
    pub fn insert(&mut self, kid: impl Into<String>, key: PublicKey) {
        self.keys.insert(kid.into(), key);
    }

    /// The key for `kid`.
    pub fn get(&self, kid: &str) -> Option<&PublicKey> {
        self.keys.get(kid)
    }

    /// Every key with its `kid`, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &PublicKey)> {
        self.keys.iter().map(|(kid, key)| (kid.as_str(), key))
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The set as a JWKS document, keys sorted by `kid`.
    pub fn to_json(&self) -> Value {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        let keys: Vec<Value> = kids
            .into_iter()
            .map(|kid| {
                let mut jwk: Value = serde_json::from_str(&self.keys[kid].to_jwk_json())
                    .unwrap_or_else(|_| unreachable!("to_jwk_json emits a JSON object"));
                jwk["kid"] = json!(kid);
                jwk["alg"] = json!("ES256");
                jwk["use"] = json!("sig");
                jwk
            })
            .collect();
        json!({ "keys": keys })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::SigningKey;

    #[test]
    fn round_trip_through_json() {
        let a = SigningKey::generate().unwrap();
        let b = SigningKey::generate().unwrap();
        let mut set = Jwks::default();
        set.insert("a", a.public_key().clone());
        set.insert("b", b.public_key().clone());
        let text = set.to_json().to_string();
        let parsed = Jwks::parse(text.as_bytes()).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed.get("a"), Some(a.public_key()));
        assert_eq!(parsed.get("b"), Some(b.public_key()));
        assert_eq!(parsed.get("c"), None);
    }

    #[test]
    fn hostile_sets_are_rejected() {
        let k = SigningKey::generate().unwrap();
        let mut jwk: Value = serde_json::from_str(&k.public_key().to_jwk_json()).unwrap();
        let no_kid = json!({"keys":[jwk.clone()]}).to_string();
        assert_eq!(
            Jwks::parse(no_kid.as_bytes()).unwrap_err(),
            JwksError::Kid { index: 0 }
        );
        jwk["kid"] = json!("k");
        let dup = json!({"keys":[jwk.clone(), jwk.clone()]}).to_string();
        assert_eq!(
            Jwks::parse(dup.as_bytes()).unwrap_err(),
            JwksError::DuplicateKid("k".into())
        );
        let oct = json!({"keys":[{"kty":"oct","kid":"h","k":"c2VjcmV0"}]}).to_string();
        assert_eq!(
            Jwks::parse(oct.as_bytes()).unwrap_err(),
            JwksError::Key {
                kid: "h".into(),
                error: JwkError::SymmetricKey
            }
        );
        assert_eq!(Jwks::parse(b"{}").unwrap_err(), JwksError::NoKeys);
        assert_eq!(
            Jwks::parse(&vec![b' '; MAX_JWKS_LEN + 1]).unwrap_err(),
            JwksError::TooLarge
        );
        let many = json!({"keys": vec![jwk; MAX_KEYS + 1]}).to_string();
        assert_eq!(
            Jwks::parse(many.as_bytes()).unwrap_err(),
            JwksError::TooManyKeys
        );
    }
}
