//! The keys a WIT may be signed with, by `kid`: a JWKS of EC P-256 and
//! OKP Ed25519 keys (a SPIFFE bundle's `use: wit-svid` members, or plain
//! `use: sig` ones), or the broker's own token-signing keys.

use crate::jose::json::{self, JsonError};
use crate::jose::{Alg, JwkError, VerifyingKey};
use crate::token::Jwks;
use serde_json::Value;
use std::collections::HashMap;

/// Largest key-set document accepted, in bytes (checked before parsing).
pub const MAX_WIT_JWKS_LEN: usize = 256 * 1024;
/// Most members one document may hold, used or skipped.
pub const MAX_MEMBERS: usize = 256;
/// Longest `kid`.
const MAX_KID_LEN: usize = 128;

/// The `use` of a WIT-SVID signing key in a SPIFFE bundle.
pub const USE_WIT_SVID: &str = "wit-svid";

/// Why a WIT key set was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WitKeysError {
    /// Larger than [`MAX_WIT_JWKS_LEN`].
    #[error("WIT key set is larger than {MAX_WIT_JWKS_LEN} bytes")]
    TooLarge,
    /// Not a JSON object without duplicate members.
    #[error("WIT key set is not a JSON object: {0}")]
    Json(JsonError),
    /// No `keys` array.
    #[error("WIT key set has no \"keys\" array")]
    NoKeysArray,
    /// More than [`MAX_MEMBERS`] members.
    #[error("WIT key set has more than {MAX_MEMBERS} members")]
    TooManyMembers,
    /// A member is not an object, or its `use` is not a string.
    #[error("WIT key set member #{index} is not a JWK object with a string use")]
    Member {
        /// Position in `keys`.
        index: usize,
    },
    /// A WIT key has no usable `kid` (required: SPIFFE WIT-SVID §6.1).
    #[error("WIT key set member #{index} has no kid string (1 to {MAX_KID_LEN} bytes)")]
    Kid {
        /// Position in `keys`.
        index: usize,
    },
    /// Two WIT keys share a `kid`.
    #[error("WIT key set has two keys with kid {0:?}")]
    DuplicateKid(String),
    /// A WIT key is not a public EC P-256 or OKP Ed25519 key.
    #[error("WIT key {kid:?}: {error}")]
    Key {
        /// Its `kid`.
        kid: String,
        /// What is wrong.
        error: JwkError,
    },
    /// A WIT key's `alg` does not fit its type (ES256 for P-256, EdDSA
    /// for Ed25519).
    #[error("WIT key {kid:?}: alg {alg:?} does not fit its {key} key")]
    AlgMismatch {
        /// Its `kid`.
        kid: String,
        /// The `alg` it names.
        alg: String,
        /// Its key type.
        key: &'static str,
    },
    /// No member is a WIT key (every one is for another use).
    #[error("WIT key set holds no key with use sig or wit-svid (or no use)")]
    Empty,
}

/// WIT signing keys by `kid`. Cheap to clone per key (parsed keys are
/// shared).
#[derive(Debug, Clone, Default)]
pub struct WitKeys {
    keys: HashMap<String, VerifyingKey>,
}

impl WitKeys {
    /// Parses a JWKS document. Members whose `use` is absent, `sig` or
    /// `wit-svid` are WIT keys: each needs a unique `kid` and must be a
    /// public EC P-256 or OKP Ed25519 key (whose `alg`, when present, is
    /// ES256 or EdDSA to match). Members for other uses (`jwt-svid`,
    /// `x509-svid`, `enc`, …) are skipped unread.
    ///
    /// # Errors
    /// [`WitKeysError`] naming the offending member; the size cap is
    /// checked before anything is parsed.
    pub fn parse(bytes: &[u8]) -> Result<Self, WitKeysError> {
        if bytes.len() > MAX_WIT_JWKS_LEN {
            return Err(WitKeysError::TooLarge);
        }
        let doc = json::parse_object(bytes).map_err(WitKeysError::Json)?;
        let Some(Value::Array(members)) = doc.get("keys") else {
            return Err(WitKeysError::NoKeysArray);
        };
        if members.len() > MAX_MEMBERS {
            return Err(WitKeysError::TooManyMembers);
        }
        let mut set = Self::default();
        for (index, member) in members.iter().enumerate() {
            let usage = match member.get("use") {
                None => None,
                Some(Value::String(u)) => Some(u.as_str()),
                Some(_) => return Err(WitKeysError::Member { index }),
            };
            if !member.is_object() {
                return Err(WitKeysError::Member { index });
            }
            if !matches!(usage, None | Some("sig" | USE_WIT_SVID)) {
                continue;
            }
            let kid = member
                .get("kid")
                .and_then(Value::as_str)
                .filter(|k| !k.is_empty() && k.len() <= MAX_KID_LEN)
                .ok_or(WitKeysError::Kid { index })?;
            let key = VerifyingKey::from_jwk(member).map_err(|error| WitKeysError::Key {
                kid: kid.to_owned(),
                error,
            })?;
            if let Some(alg) = member.get("alg") {
                let fits = alg.as_str().and_then(Alg::from_name) == Some(key.alg());
                if !fits {
                    return Err(WitKeysError::AlgMismatch {
                        kid: kid.to_owned(),
                        alg: alg
                            .as_str()
                            .map_or_else(|| alg.to_string(), crate::jose::jws::truncate),
                        key: key.key_type(),
                    });
                }
            }
            if set.keys.insert(kid.to_owned(), key).is_some() {
                return Err(WitKeysError::DuplicateKid(kid.to_owned()));
            }
        }
        if set.is_empty() {
            return Err(WitKeysError::Empty);
        }
        Ok(set)
    }

    /// The broker's published token-signing keys (P-256, by `kid`): the
    /// keys its WITs are signed with.
    pub fn from_jwks(jwks: &Jwks) -> Self {
        Self {
            keys: jwks
                .iter()
                .map(|(kid, key)| (kid.to_owned(), VerifyingKey::P256(key.clone())))
                .collect(),
        }
    }

    /// Adds a key (replacing one with the same `kid`).
    pub fn insert(&mut self, kid: impl Into<String>, key: VerifyingKey) {
        self.keys.insert(kid.into(), key);
    }

    /// The key for `kid`.
    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::{Ed25519SigningKey, SigningKey};
    use serde_json::json;

    fn member(jwk: &str, extra: Value) -> Value {
        let mut v: Value = serde_json::from_str(jwk).unwrap();
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        v
    }

    fn parse(doc: &Value) -> Result<WitKeys, WitKeysError> {
        WitKeys::parse(doc.to_string().as_bytes())
    }

    #[test]
    fn wit_svid_and_sig_members_are_used_and_other_uses_skipped() {
        let ec = SigningKey::generate().unwrap();
        let ed = Ed25519SigningKey::generate().unwrap();
        let ec_jwk = ec.public_key().to_jwk_json();
        let ed_jwk = ed.public_key().to_jwk_json();
        let doc = json!({"keys": [
            member(&ec_jwk, json!({"kid":"a","use":"wit-svid","alg":"ES256"})),
            member(&ed_jwk, json!({"kid":"b","use":"sig"})),
            member(&ec_jwk, json!({"kid":"c"})),
            // Skipped unread, even though they would not parse as WIT keys.
            json!({"kty":"RSA","kid":"j","use":"jwt-svid"}),
            json!({"kty":"EC","use":"x509-svid","x5c":["AAAA"]}),
            json!({"kty":"oct","kid":"e","use":"enc"}),
        ]});
        let keys = parse(&doc).unwrap();
        assert_eq!(keys.len(), 3);
        assert_eq!(keys.get("a").unwrap().thumbprint(), ec.thumbprint());
        assert_eq!(keys.get("b").unwrap().alg(), Alg::EdDsa);
        assert!(keys.get("j").is_none());
    }

    #[test]
    fn a_wit_key_needs_a_unique_kid() {
        let jwk = SigningKey::generate().unwrap().public_key().to_jwk_json();
        let no_kid = json!({"keys": [member(&jwk, json!({"use":"wit-svid"}))]});
        assert_eq!(parse(&no_kid).unwrap_err(), WitKeysError::Kid { index: 0 });
        let empty_kid = json!({"keys": [member(&jwk, json!({"kid":""}))]});
        assert_eq!(
            parse(&empty_kid).unwrap_err(),
            WitKeysError::Kid { index: 0 }
        );
        let dup =
            json!({"keys": [member(&jwk, json!({"kid":"k"})), member(&jwk, json!({"kid":"k"}))]});
        assert_eq!(
            parse(&dup).unwrap_err(),
            WitKeysError::DuplicateKid("k".into())
        );
    }

    #[test]
    fn unusable_wit_keys_are_named() {
        let rsa = json!({"keys": [{"kty":"RSA","kid":"r","use":"wit-svid","n":"AQAB","e":"AQAB"}]});
        assert_eq!(
            parse(&rsa).unwrap_err(),
            WitKeysError::Key {
                kid: "r".into(),
                error: JwkError::UnsupportedKeyType("RSA".into())
            }
        );
        let ec = SigningKey::generate().unwrap().public_key().to_jwk_json();
        let wrong_alg = json!({"keys": [member(&ec, json!({"kid":"k","alg":"EdDSA"}))]});
        assert_eq!(
            parse(&wrong_alg).unwrap_err(),
            WitKeysError::AlgMismatch {
                kid: "k".into(),
                alg: "EdDSA".into(),
                key: "EC P-256"
            }
        );
        let private = json!({"keys": [member(&ec, json!({"kid":"k","d":"AAAA"}))]});
        assert_eq!(
            parse(&private).unwrap_err(),
            WitKeysError::Key {
                kid: "k".into(),
                error: JwkError::PrivateKey("d")
            }
        );
    }

    #[test]
    fn hostile_documents_are_refused_before_or_while_parsing() {
        assert_eq!(
            WitKeys::parse(&vec![b' '; MAX_WIT_JWKS_LEN + 1]).unwrap_err(),
            WitKeysError::TooLarge
        );
        assert_eq!(
            WitKeys::parse(b"{}").unwrap_err(),
            WitKeysError::NoKeysArray
        );
        assert!(matches!(
            WitKeys::parse(br#"{"keys":[],"keys":[]}"#).unwrap_err(),
            WitKeysError::Json(JsonError::DuplicateMember(_))
        ));
        assert_eq!(
            parse(&json!({"keys": []})).unwrap_err(),
            WitKeysError::Empty
        );
        assert_eq!(
            parse(&json!({"keys": [{"kty":"EC","use":"jwt-svid"}]})).unwrap_err(),
            WitKeysError::Empty
        );
        assert_eq!(
            parse(&json!({"keys": ["k"]})).unwrap_err(),
            WitKeysError::Member { index: 0 }
        );
        let many = json!({"keys": vec![json!({"use":"enc"}); MAX_MEMBERS + 1]});
        assert_eq!(parse(&many).unwrap_err(), WitKeysError::TooManyMembers);
    }

    #[test]
    fn the_brokers_jwks_becomes_wit_keys() {
        let key = SigningKey::generate().unwrap();
        let mut jwks = Jwks::default();
        jwks.insert("k1", key.public_key().clone());
        let keys = WitKeys::from_jwks(&jwks);
        assert_eq!(keys.len(), 1);
        assert_eq!(
            keys.get("k1"),
            Some(&VerifyingKey::P256(key.public_key().clone()))
        );
    }
}
