//! P-256 public keys as JWKs (RFC 7517/7518) and their RFC 7638 SHA-256
//! thumbprints (`jkt`). Ed25519 keys (RFC 8037) are in
//! [`super::ed25519`]; [`super::VerifyingKey`] is either.

use super::b64;
use aws_lc_rs::digest;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ParsedPublicKey};
use serde_json::{Map, Value};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

/// Why a JWK was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwkError {
    /// The `jwk` value is not a JSON object.
    #[error("jwk is not a JSON object")]
    NotAnObject,
    /// A required member is absent.
    #[error("jwk has no {0:?} member")]
    MissingMember(&'static str),
    /// A member has the wrong JSON type.
    #[error("jwk member {0:?} is not a string")]
    NotAString(&'static str),
    /// `kty` is `oct`: a symmetric key can never verify a public proof.
    #[error("jwk is a symmetric (oct) key")]
    SymmetricKey,
    /// The key carries private material (`d` and friends).
    #[error("jwk contains private key member {0:?}")]
    PrivateKey(&'static str),
    /// `kty` other than `EC` (or, where Ed25519 keys are accepted, `OKP`).
    #[error("unsupported jwk kty {0:?}")]
    UnsupportedKeyType(String),
    /// `crv` other than `P-256` (or `Ed25519` for an `OKP` key).
    #[error("unsupported jwk crv {0:?}")]
    UnsupportedCurve(String),
    /// `x` or `y` is not canonical base64url of exactly 32 bytes.
    /// (Ed25519 public keys are also 32 bytes, in `x`.)
    #[error("jwk coordinate {0:?} is not 32 bytes of canonical base64url")]
    BadCoordinate(&'static str),
    /// The coordinates do not name a point on P-256.
    #[error("jwk point is not on the P-256 curve")]
    NotOnCurve,
    /// An Ed25519 `x` that is a non-canonical encoding or a point of
    /// small order: such a key would let anyone forge signatures that
    /// verify under it.
    #[error("jwk x is not a canonical Ed25519 public key of large order")]
    WeakEd25519Key,
    /// `alg` is present and is not `ES256`.
    #[error("jwk alg {0:?} is not ES256")]
    WrongAlg(String),
    /// `use` is present and is not `sig`.
    #[error("jwk use {0:?} is not sig")]
    WrongUse(String),
}

/// Private members of EC, OKP, RSA and oct JWKs (RFC 7518 §6, RFC 8037
/// §2).
pub(super) const PRIVATE_MEMBERS: [&str; 7] = ["d", "p", "q", "dp", "dq", "qi", "k"];

/// A validated P-256 public key, parsed once for fast verification.
///
/// Cheap to clone: the parsed key is shared.
#[derive(Clone)]
pub struct PublicKey {
    x: [u8; 32],
    y: [u8; 32],
    parsed: Arc<ParsedPublicKey>,
}

impl PublicKey {
    /// Builds a key from affine coordinates, checking the point is on P-256.
    ///
    /// # Errors
    /// [`JwkError::NotOnCurve`] when it is not.
    pub fn from_coordinates(x: [u8; 32], y: [u8; 32]) -> Result<Self, JwkError> {
        let mut sec1 = [0u8; 65];
        sec1[0] = 0x04;
        sec1[1..33].copy_from_slice(&x);
        sec1[33..].copy_from_slice(&y);
        let parsed = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, sec1)
            .map_err(|_| JwkError::NotOnCurve)?;
        Ok(Self {
            x,
            y,
            parsed: Arc::new(parsed),
        })
    }

    /// Builds a key from an uncompressed SEC1 point (`04 ‖ x ‖ y`).
    ///
    /// # Errors
    /// [`JwkError::NotOnCurve`] for any other encoding or an invalid point.
    pub fn from_sec1(bytes: &[u8]) -> Result<Self, JwkError> {
        if bytes.len() != 65 || bytes[0] != 0x04 {
            return Err(JwkError::NotOnCurve);
        }
        let mut x = [0u8; 32];
        let mut y = [0u8; 32];
        x.copy_from_slice(&bytes[1..33]);
        y.copy_from_slice(&bytes[33..]);
        Self::from_coordinates(x, y)
    }

    /// Parses a public JWK as it appears in a DPoP proof header.
    ///
    /// Members other than `kty`, `crv`, `x`, `y` and private ones are
    /// ignored, as RFC 7517 §4 asks.
    ///
    /// # Errors
    /// [`JwkError`] naming the first problem found.
    pub fn from_jwk(value: &Value) -> Result<Self, JwkError> {
        let (x, y) = coordinates(value)?;
        Self::from_coordinates(x, y)
    }

    /// As [`PublicKey::from_jwk`], but through `cache`: a key seen before
    /// (same thumbprint, hence same coordinates) is not parsed and
    /// validated again. Returns the key and its thumbprint.
    ///
    /// # Errors
    /// [`JwkError`] naming the first problem found.
    pub fn from_jwk_cached(value: &Value, cache: &KeyCache) -> Result<(Self, Jkt), JwkError> {
        let (x, y) = coordinates(value)?;
        let jkt = thumbprint_of(&x, &y);
        if let Some(key) = cache.get(&jkt) {
            return Ok((key, jkt));
        }
        let key = Self::from_coordinates(x, y)?;
        cache.insert(jkt, key.clone());
        Ok((key, jkt))
    }

    /// Parses a JWK from a key set: as [`PublicKey::from_jwk`], and `alg`
    /// and `use`, when present, must be `ES256` and `sig`.
    ///
    /// # Errors
    /// [`JwkError`] naming the first problem found.
    pub fn from_jwks_member(value: &Value) -> Result<Self, JwkError> {
        let key = Self::from_jwk(value)?;
        let map = value.as_object().ok_or(JwkError::NotAnObject)?;
        if let Some(alg) = optional_member(map, "alg")?
            && alg != "ES256"
        {
            return Err(JwkError::WrongAlg(alg.to_owned()));
        }
        if let Some(usage) = optional_member(map, "use")?
            && usage != "sig"
        {
            return Err(JwkError::WrongUse(usage.to_owned()));
        }
        Ok(key)
    }

    /// The parsed key, for signature verification.
    pub(crate) fn parsed(&self) -> &ParsedPublicKey {
        &self.parsed
    }

    /// The uncompressed SEC1 point (`04 ‖ x ‖ y`).
    pub fn to_sec1(&self) -> [u8; 65] {
        let mut sec1 = [0u8; 65];
        sec1[0] = 0x04;
        sec1[1..33].copy_from_slice(&self.x);
        sec1[33..].copy_from_slice(&self.y);
        sec1
    }

    /// The RFC 7638 JSON members in lexicographic order, which is also a
    /// valid minimal public JWK.
    pub fn to_jwk_json(&self) -> String {
        jwk_json(&self.x, &self.y)
    }

    /// The RFC 7638 SHA-256 thumbprint.
    pub fn thumbprint(&self) -> Jkt {
        thumbprint_of(&self.x, &self.y)
    }
}

fn jwk_json(x: &[u8; 32], y: &[u8; 32]) -> String {
    let mut out = String::with_capacity(128);
    out.push_str(r#"{"crv":"P-256","kty":"EC","x":""#);
    b64::encode_into(x, &mut out);
    out.push_str(r#"","y":""#);
    b64::encode_into(y, &mut out);
    out.push_str(r#""}"#);
    out
}

fn thumbprint_of(x: &[u8; 32], y: &[u8; 32]) -> Jkt {
    Jkt::of_members(&jwk_json(x, y))
}

/// Checks the members of a public P-256 JWK and returns its coordinates.
fn coordinates(value: &Value) -> Result<([u8; 32], [u8; 32]), JwkError> {
    let map = value.as_object().ok_or(JwkError::NotAnObject)?;
    let kty = member(map, "kty")?;
    if kty == "oct" {
        return Err(JwkError::SymmetricKey);
    }
    if let Some(name) = PRIVATE_MEMBERS.iter().find(|m| map.contains_key(**m)) {
        return Err(JwkError::PrivateKey(name));
    }
    if kty != "EC" {
        return Err(JwkError::UnsupportedKeyType(kty.to_owned()));
    }
    let crv = member(map, "crv")?;
    if crv != "P-256" {
        return Err(JwkError::UnsupportedCurve(crv.to_owned()));
    }
    Ok((coordinate(map, "x")?, coordinate(map, "y")?))
}

/// Parsed P-256 keys by thumbprint. DPoP keys are stable for hours and a
/// verifier sees few of them, so each is validated and parsed once.
/// Bounded: a full shard drops an arbitrary entry.
#[derive(Debug)]
pub struct KeyCache {
    shards: Box<[Mutex<HashMap<Jkt, PublicKey>>]>,
    shard_capacity: usize,
}

const KEY_CACHE_SHARDS: usize = 16;

impl KeyCache {
    /// A cache of at most `capacity` keys.
    pub fn new(capacity: usize) -> Self {
        Self {
            shards: (0..KEY_CACHE_SHARDS)
                .map(|_| Mutex::new(HashMap::new()))
                .collect(),
            shard_capacity: capacity.div_ceil(KEY_CACHE_SHARDS).max(1),
        }
    }

    fn shard(&self, jkt: &Jkt) -> std::sync::MutexGuard<'_, HashMap<Jkt, PublicKey>> {
        self.shards[usize::from(jkt.0[0]) % KEY_CACHE_SHARDS]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, jkt: &Jkt) -> Option<PublicKey> {
        self.shard(jkt).get(jkt).cloned()
    }

    fn insert(&self, jkt: Jkt, key: PublicKey) {
        let mut shard = self.shard(&jkt);
        if shard.len() >= self.shard_capacity
            && let Some(victim) = shard.keys().next().copied()
        {
            shard.remove(&victim);
        }
        shard.insert(jkt, key);
    }

    /// Number of cached keys.
    pub fn len(&self) -> usize {
        (0..KEY_CACHE_SHARDS)
            .map(|i| {
                self.shards[i]
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.x == other.x && self.y == other.y
    }
}

impl Eq for PublicKey {}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PublicKey")
            .field(&self.thumbprint())
            .finish()
    }
}

pub(super) fn member<'a>(
    map: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, JwkError> {
    optional_member(map, name)?.ok_or(JwkError::MissingMember(name))
}

pub(super) fn optional_member<'a>(
    map: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, JwkError> {
    match map.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(JwkError::NotAString(name)),
    }
}

fn coordinate(map: &Map<String, Value>, name: &'static str) -> Result<[u8; 32], JwkError> {
    let text = member(map, name)?;
    b64::decode_array::<32>(text.as_bytes()).map_err(|_| JwkError::BadCoordinate(name))
}

/// An RFC 7638 SHA-256 JWK thumbprint: what `cnf.jkt` binds a token to.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Jkt([u8; 32]);

/// A string that is not a base64url SHA-256 thumbprint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a base64url SHA-256 JWK thumbprint (43 characters)")]
pub struct JktParseError;

impl Jkt {
    /// The SHA-256 of a key's RFC 7638 member JSON (required members
    /// only, lexicographic order, no whitespace).
    pub(super) fn of_members(json: &str) -> Self {
        let hash = digest::digest(&digest::SHA256, json.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(hash.as_ref());
        Self(out)
    }

    /// The 32 digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl FromStr for Jkt {
    type Err = JktParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        b64::decode_array::<32>(s.as_bytes())
            .map(Jkt)
            .map_err(|_| JktParseError)
    }
}

impl fmt::Display for Jkt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&b64::encode(self.0))
    }
}

impl fmt::Debug for Jkt {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Jkt({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The example key of RFC 9449 §4.2 (Figure 3) and its thumbprint
    /// (§6.1, Figure 7).
    const RFC9449_X: &str = "l8tFrhx-34tV3hRICRDY9zCkDlpBhF42UQUfWVAWBFs";
    const RFC9449_Y: &str = "9VE4jf_Ok_o64zbTTlcuNJajHmt6v9TDVrU0CdvGRDA";
    const RFC9449_JKT: &str = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";

    fn rfc_jwk() -> Value {
        json!({"kty":"EC","x":RFC9449_X,"y":RFC9449_Y,"crv":"P-256"})
    }

    #[test]
    fn rfc9449_example_key_has_the_rfc_thumbprint() {
        let key = PublicKey::from_jwk(&rfc_jwk()).unwrap();
        assert_eq!(key.thumbprint().to_string(), RFC9449_JKT);
        assert_eq!(RFC9449_JKT.parse::<Jkt>().unwrap(), key.thumbprint());
    }

    #[test]
    fn thumbprint_ignores_extra_members() {
        let mut jwk = rfc_jwk();
        jwk["kid"] = json!("k1");
        jwk["use"] = json!("sig");
        let key = PublicKey::from_jwk(&jwk).unwrap();
        assert_eq!(key.thumbprint().to_string(), RFC9449_JKT);
    }

    #[test]
    fn private_jwk_is_rejected() {
        let mut jwk = rfc_jwk();
        jwk["d"] = json!("AAAA");
        assert_eq!(PublicKey::from_jwk(&jwk), Err(JwkError::PrivateKey("d")));
    }

    #[test]
    fn symmetric_jwk_is_rejected() {
        let jwk = json!({"kty":"oct","k":"c2VjcmV0"});
        assert_eq!(PublicKey::from_jwk(&jwk), Err(JwkError::SymmetricKey));
    }

    #[test]
    fn other_key_types_and_curves_are_rejected() {
        let rsa = json!({"kty":"RSA","n":"AQAB","e":"AQAB"});
        assert_eq!(
            PublicKey::from_jwk(&rsa),
            Err(JwkError::UnsupportedKeyType("RSA".into()))
        );
        let mut p384 = rfc_jwk();
        p384["crv"] = json!("P-384");
        assert_eq!(
            PublicKey::from_jwk(&p384),
            Err(JwkError::UnsupportedCurve("P-384".into()))
        );
    }

    #[test]
    fn short_coordinate_is_rejected() {
        let mut jwk = rfc_jwk();
        // 31 bytes: a leading zero byte dropped, as some encoders wrongly do.
        jwk["x"] = json!(b64::encode([1u8; 31]));
        assert_eq!(PublicKey::from_jwk(&jwk), Err(JwkError::BadCoordinate("x")));
    }

    #[test]
    fn off_curve_point_is_rejected() {
        let mut jwk = rfc_jwk();
        jwk["y"] = json!(b64::encode([1u8; 32]));
        assert_eq!(PublicKey::from_jwk(&jwk), Err(JwkError::NotOnCurve));
    }

    #[test]
    fn missing_and_mistyped_members_are_named() {
        let jwk = json!({"kty":"EC","crv":"P-256","x":RFC9449_X});
        assert_eq!(PublicKey::from_jwk(&jwk), Err(JwkError::MissingMember("y")));
        let jwk = json!({"kty":"EC","crv":"P-256","x":RFC9449_X,"y":5});
        assert_eq!(PublicKey::from_jwk(&jwk), Err(JwkError::NotAString("y")));
        assert_eq!(PublicKey::from_jwk(&json!("k")), Err(JwkError::NotAnObject));
    }

    #[test]
    fn key_set_members_must_be_for_es256_signatures() {
        let mut jwk = rfc_jwk();
        jwk["alg"] = json!("ES256");
        jwk["use"] = json!("sig");
        assert!(PublicKey::from_jwks_member(&jwk).is_ok());
        jwk["alg"] = json!("HS256");
        assert_eq!(
            PublicKey::from_jwks_member(&jwk),
            Err(JwkError::WrongAlg("HS256".into()))
        );
        jwk["alg"] = json!("ES256");
        jwk["use"] = json!("enc");
        assert_eq!(
            PublicKey::from_jwks_member(&jwk),
            Err(JwkError::WrongUse("enc".into()))
        );
    }

    #[test]
    fn cached_parse_returns_the_same_key_and_validates_new_ones() {
        let cache = KeyCache::new(4);
        let (a, jkt) = PublicKey::from_jwk_cached(&rfc_jwk(), &cache).unwrap();
        assert_eq!(jkt.to_string(), RFC9449_JKT);
        assert_eq!(cache.len(), 1);
        let (b, _) = PublicKey::from_jwk_cached(&rfc_jwk(), &cache).unwrap();
        assert_eq!(a, b);
        assert_eq!(cache.len(), 1);
        let mut off_curve = rfc_jwk();
        off_curve["y"] = json!(b64::encode([1u8; 32]));
        assert_eq!(
            PublicKey::from_jwk_cached(&off_curve, &cache).unwrap_err(),
            JwkError::NotOnCurve
        );
        let mut private = rfc_jwk();
        private["d"] = json!("AAAA");
        assert_eq!(
            PublicKey::from_jwk_cached(&private, &cache).unwrap_err(),
            JwkError::PrivateKey("d")
        );
    }

    #[test]
    fn key_cache_stays_bounded() {
        let cache = KeyCache::new(16);
        for _ in 0..200 {
            let key = crate::jose::SigningKey::generate().unwrap();
            let jwk: Value = serde_json::from_str(&key.public_key().to_jwk_json()).unwrap();
            PublicKey::from_jwk_cached(&jwk, &cache).unwrap();
        }
        assert!(cache.len() <= 16);
    }

    #[test]
    fn jkt_parsing_is_strict() {
        assert!("abc".parse::<Jkt>().is_err());
        assert!(format!("{RFC9449_JKT}=").parse::<Jkt>().is_err());
    }
}
