//! Ed25519 keys for EdDSA JWS (RFC 8037): public keys parsed from `OKP`
//! JWKs with their RFC 7638 thumbprints, and signing keys loaded from
//! PKCS#8 or a private JWK.
//!
//! tally accepts EdDSA only where a WIMSE profile asks for it (a workload's
//! proof key in a WIT, a WIT issuer's key); DPoP proofs and access tokens
//! stay ES256-only. An `x` that is a non-canonical encoding or a point of
//! small order is refused when the key is parsed: under such a key a
//! signature can be made without any private key.

use super::b64;
use super::jwk::{Jkt, JwkError, PRIVATE_MEMBERS, member};
use super::key::{KeyError, SignError, pkcs8_pem, split_private_jwk};
use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair as _, ParsedPublicKey};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use std::fmt;
use std::sync::Arc;
use zeroize::Zeroizing;

/// The `crv` of an Ed25519 JWK.
pub const CRV_ED25519: &str = "Ed25519";

/// A validated Ed25519 public key, parsed once for fast verification.
///
/// Cheap to clone: the parsed key is shared.
#[derive(Clone)]
pub struct Ed25519PublicKey {
    x: [u8; 32],
    parsed: Arc<ParsedPublicKey>,
}

impl Ed25519PublicKey {
    /// Builds a key from its 32-byte encoding.
    ///
    /// # Errors
    /// [`JwkError::WeakEd25519Key`] for a non-canonical encoding or a point
    /// of small order; [`JwkError::NotOnCurve`] if aws-lc refuses it.
    pub fn from_bytes(x: [u8; 32]) -> Result<Self, JwkError> {
        if !is_canonical(&x) || SMALL_ORDER.contains(&x) {
            return Err(JwkError::WeakEd25519Key);
        }
        let parsed = ParsedPublicKey::new(&ED25519, x).map_err(|_| JwkError::NotOnCurve)?;
        Ok(Self {
            x,
            parsed: Arc::new(parsed),
        })
    }

    /// Parses a public `OKP` JWK with `crv: Ed25519`. Members other than
    /// `kty`, `crv`, `x` and private ones are ignored (RFC 7517 §4).
    ///
    /// # Errors
    /// [`JwkError`] naming the first problem: not an object, `oct`,
    /// private members (`d`), another `kty` or `crv`, an `x` that is not 32
    /// bytes of canonical base64url, or a weak key.
    pub fn from_jwk(value: &Value) -> Result<Self, JwkError> {
        let map = value.as_object().ok_or(JwkError::NotAnObject)?;
        let kty = member(map, "kty")?;
        if kty == "oct" {
            return Err(JwkError::SymmetricKey);
        }
        if let Some(name) = PRIVATE_MEMBERS.iter().find(|m| map.contains_key(**m)) {
            return Err(JwkError::PrivateKey(name));
        }
        if kty != "OKP" {
            return Err(JwkError::UnsupportedKeyType(super::jws::truncate(kty)));
        }
        let crv = member(map, "crv")?;
        if crv != CRV_ED25519 {
            return Err(JwkError::UnsupportedCurve(super::jws::truncate(crv)));
        }
        let x = b64::decode_array::<32>(member(map, "x")?.as_bytes())
            .map_err(|_| JwkError::BadCoordinate("x"))?;
        Self::from_bytes(x)
    }

    /// The 32-byte public key.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.x
    }

    /// The parsed key, for signature verification.
    pub(crate) fn parsed(&self) -> &ParsedPublicKey {
        &self.parsed
    }

    /// The RFC 7638 members (`crv`, `kty`, `x`) in lexicographic order,
    /// which is also a valid minimal public JWK.
    pub fn to_jwk_json(&self) -> String {
        let mut out = String::with_capacity(80);
        out.push_str(r#"{"crv":"Ed25519","kty":"OKP","x":""#);
        b64::encode_into(self.x, &mut out);
        out.push_str(r#""}"#);
        out
    }

    /// The RFC 7638 SHA-256 thumbprint (RFC 8037 §2: over `crv`, `kty`
    /// and `x`).
    pub fn thumbprint(&self) -> Jkt {
        Jkt::of_members(&self.to_jwk_json())
    }
}

impl PartialEq for Ed25519PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.x == other.x
    }
}

impl Eq for Ed25519PublicKey {}

impl fmt::Debug for Ed25519PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Ed25519PublicKey")
            .field(&self.thumbprint())
            .finish()
    }
}

/// Whether `x` encodes its y coordinate below the field prime
/// p = 2^255 − 19 (RFC 8032 §5.1.3 step 1: larger values are refused).
fn is_canonical(x: &[u8; 32]) -> bool {
    // y is the little-endian number with the sign bit (bit 255) cleared;
    // y ≥ p only when it is 2^255 − 19 … 2^255 − 1: bytes 1..31 all 0xff,
    // the top byte 0x7f (sign bit aside) and the lowest at least 0xed.
    let top_full = x[31] & 0x7f == 0x7f;
    let middle_full = x[1..31].iter().all(|&b| b == 0xff);
    !(top_full && middle_full && x[0] >= 0xed)
}

/// The encodings of the eight points of small order (the torsion
/// subgroup), plus the two non-canonical ones RFC 8032 decoding refuses
/// but lax decoders accept (x = 0 with the sign bit set). Computed from
/// the curve equation; the unit tests check a few against the group law
/// through aws-lc (a signature that verifies for any message).
const SMALL_ORDER: [[u8; 32]; 10] = [
    hex32("0100000000000000000000000000000000000000000000000000000000000000"),
    hex32("0100000000000000000000000000000000000000000000000000000000000080"),
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    hex32("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"),
    hex32("0000000000000000000000000000000000000000000000000000000000000000"),
    hex32("0000000000000000000000000000000000000000000000000000000000000080"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    hex32("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
    hex32("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa"),
];

/// 64 hex digits as 32 bytes, at compile time (a bad digit fails the
/// build).
const fn hex32(text: &str) -> [u8; 32] {
    const fn digit(c: u8) -> u8 {
        match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => panic!("not a lower-case hex digit"),
        }
    }
    let bytes = text.as_bytes();
    assert!(bytes.len() == 64, "not 64 hex digits");
    let mut out = [0u8; 32];
    let mut i = 0;
    while i < 32 {
        out[i] = digit(bytes[2 * i]) << 4 | digit(bytes[2 * i + 1]);
        i += 1;
    }
    out
}

/// An Ed25519 private key that signs EdDSA JWS. The seed lives inside
/// aws-lc, which wipes it on free.
pub struct Ed25519SigningKey {
    pair: Ed25519KeyPair,
    public: Ed25519PublicKey,
    jkt: Jkt,
}

impl Ed25519SigningKey {
    /// Generates a fresh key from the system CSPRNG.
    ///
    /// # Errors
    /// [`KeyError::Generate`] if the random source fails.
    pub fn generate() -> Result<Self, KeyError> {
        Self::from_pair(Ed25519KeyPair::generate().map_err(|_| KeyError::Generate)?)
    }

    /// Loads a key from PKCS#8 (v1 or v2) DER.
    ///
    /// # Errors
    /// [`KeyError::NotEd25519`] for anything but a valid Ed25519 key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        Self::from_pair(Ed25519KeyPair::from_pkcs8(der).map_err(|_| KeyError::NotEd25519)?)
    }

    /// Loads a key from a `-----BEGIN PRIVATE KEY-----` PEM document (as
    /// `openssl genpkey -algorithm ed25519` writes).
    ///
    /// # Errors
    /// [`KeyError::NotPem`] or [`KeyError::NotEd25519`].
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|_| KeyError::NotPem)?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    /// Loads a key from a private `OKP` JWK (`crv: Ed25519`, `x`, `d`).
    /// `d` must belong to `x`.
    ///
    /// # Errors
    /// [`KeyError::PrivateJwk`] naming what is wrong, or
    /// [`KeyError::Public`] for a bad public half.
    pub fn from_jwk(value: &Value) -> Result<Self, KeyError> {
        // The public half is checked as any public key would be.
        let (d, public) = split_private_jwk(value)?;
        let public = Ed25519PublicKey::from_jwk(&public)?;
        let pair = Ed25519KeyPair::from_seed_and_public_key(d.as_slice(), public.as_bytes())
            .map_err(|_| KeyError::PrivateJwk("d does not belong to x"))?;
        Self::from_pair(pair)
    }

    fn from_pair(pair: Ed25519KeyPair) -> Result<Self, KeyError> {
        let bytes: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| KeyError::NotEd25519)?;
        let public = Ed25519PublicKey::from_bytes(bytes)?;
        let jkt = public.thumbprint();
        Ok(Self { pair, public, jkt })
    }

    /// The private key as a PKCS#8 v1 PEM document, wiped when dropped.
    ///
    /// # Errors
    /// [`KeyError::NotEd25519`] if aws-lc cannot serialize it.
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        let doc = self.pair.to_pkcs8v1().map_err(|_| KeyError::NotEd25519)?;
        Ok(pkcs8_pem(&Zeroizing::new(doc.as_ref().to_vec())))
    }

    /// The public half.
    pub fn public_key(&self) -> &Ed25519PublicKey {
        &self.public
    }

    /// The public key's RFC 7638 thumbprint.
    pub fn thumbprint(&self) -> Jkt {
        self.jkt
    }

    /// Signs `message` with EdDSA (Ed25519), returning the 64-byte
    /// signature.
    ///
    /// # Errors
    /// Only if aws-lc's signing fails, which it does not for a valid key.
    pub fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        let signature = self.pair.try_sign(message).map_err(|_| SignError)?;
        signature.as_ref().try_into().map_err(|_| SignError)
    }
}

impl fmt::Debug for Ed25519SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ed25519SigningKey")
            .field("jkt", &self.jkt)
            .field("private", &"<redacted>")
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// RFC 8037 Appendix A.1–A.4: the example key, its thumbprint and the
    /// signature of the example JWS.
    const RFC8037_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";
    const RFC8037_D: &str = "nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A";
    const RFC8037_JKT: &str = "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k";
    const RFC8037_INPUT: &str = "eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc";
    const RFC8037_SIG: &str =
        "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg";

    fn public_jwk() -> Value {
        json!({"kty":"OKP","crv":"Ed25519","x":RFC8037_X})
    }

    #[test]
    fn rfc8037_key_has_the_rfc_thumbprint() {
        let key = Ed25519PublicKey::from_jwk(&public_jwk()).unwrap();
        assert_eq!(key.thumbprint().to_string(), RFC8037_JKT);
    }

    #[test]
    fn rfc8037_signature_verifies_and_a_changed_message_does_not() {
        let key = Ed25519PublicKey::from_jwk(&public_jwk()).unwrap();
        let sig = b64::decode(RFC8037_SIG.as_bytes()).unwrap();
        assert!(
            key.parsed()
                .verify_sig(RFC8037_INPUT.as_bytes(), &sig)
                .is_ok()
        );
        assert!(key.parsed().verify_sig(b"other", &sig).is_err());
    }

    #[test]
    fn rfc8037_private_jwk_signs_the_rfc_signature() {
        // Ed25519 is deterministic: the same key and message give the
        // same signature.
        let mut jwk = public_jwk();
        jwk["d"] = json!(RFC8037_D);
        let key = Ed25519SigningKey::from_jwk(&jwk).unwrap();
        assert_eq!(key.thumbprint().to_string(), RFC8037_JKT);
        let sig = key.sign(RFC8037_INPUT.as_bytes()).unwrap();
        assert_eq!(b64::encode(sig), RFC8037_SIG);
    }

    #[test]
    fn private_jwk_with_another_keys_d_is_refused() {
        let other = Ed25519SigningKey::generate().unwrap();
        let pem = other.to_pkcs8_pem().unwrap();
        let again = Ed25519SigningKey::from_pkcs8_pem(pem.as_bytes()).unwrap();
        assert_eq!(again.thumbprint(), other.thumbprint());
        let mut jwk = public_jwk();
        jwk["d"] = json!(b64::encode([7u8; 32]));
        assert_eq!(
            Ed25519SigningKey::from_jwk(&jwk).unwrap_err(),
            KeyError::PrivateJwk("d does not belong to x")
        );
        let jwk = public_jwk();
        assert_eq!(
            Ed25519SigningKey::from_jwk(&jwk).unwrap_err(),
            KeyError::PrivateJwk("no d member")
        );
    }

    #[test]
    fn public_jwk_with_d_is_refused() {
        let mut jwk = public_jwk();
        jwk["d"] = json!(RFC8037_D);
        assert_eq!(
            Ed25519PublicKey::from_jwk(&jwk),
            Err(JwkError::PrivateKey("d"))
        );
    }

    #[test]
    fn other_curves_types_and_lengths_are_refused() {
        let mut x25519 = public_jwk();
        x25519["crv"] = json!("X25519");
        assert_eq!(
            Ed25519PublicKey::from_jwk(&x25519),
            Err(JwkError::UnsupportedCurve("X25519".into()))
        );
        let mut ed448 = public_jwk();
        ed448["crv"] = json!("Ed448");
        assert_eq!(
            Ed25519PublicKey::from_jwk(&ed448),
            Err(JwkError::UnsupportedCurve("Ed448".into()))
        );
        let oct = json!({"kty":"oct","k":"c2VjcmV0"});
        assert_eq!(
            Ed25519PublicKey::from_jwk(&oct),
            Err(JwkError::SymmetricKey)
        );
        let ec = json!({"kty":"EC","crv":"P-256","x":RFC8037_X,"y":RFC8037_X});
        assert_eq!(
            Ed25519PublicKey::from_jwk(&ec),
            Err(JwkError::UnsupportedKeyType("EC".into()))
        );
        let mut short = public_jwk();
        short["x"] = json!(b64::encode([9u8; 31]));
        assert_eq!(
            Ed25519PublicKey::from_jwk(&short),
            Err(JwkError::BadCoordinate("x"))
        );
        let mut padded = public_jwk();
        padded["x"] = json!(format!("{RFC8037_X}="));
        assert_eq!(
            Ed25519PublicKey::from_jwk(&padded),
            Err(JwkError::BadCoordinate("x"))
        );
    }

    #[test]
    fn small_order_and_non_canonical_keys_are_refused() {
        for x in SMALL_ORDER {
            assert_eq!(
                Ed25519PublicKey::from_bytes(x),
                Err(JwkError::WeakEd25519Key),
                "{}",
                b64::encode(x)
            );
        }
        // y = p (≡ 0) and y = 2^255 − 1: encodings of no canonical value.
        let mut p = [0xffu8; 32];
        p[0] = 0xed;
        p[31] = 0x7f;
        assert_eq!(
            Ed25519PublicKey::from_bytes(p),
            Err(JwkError::WeakEd25519Key)
        );
        assert_eq!(
            Ed25519PublicKey::from_bytes([0xff; 32]),
            Err(JwkError::WeakEd25519Key)
        );
        // One below p is canonical (whether or not it is on the curve).
        let mut below = p;
        below[0] = 0xec;
        assert!(is_canonical(&below));
    }

    #[test]
    fn the_identity_key_would_verify_a_forgery_which_is_why_it_is_refused() {
        // Under the identity point A, [S]B = R + [k]A holds for R = [S]B
        // whatever the message: (R, S) = (B, 1) "signs" everything. aws-lc
        // does not check the key's order, so the parse must.
        let identity = SMALL_ORDER[0];
        let base_point = hex32("5866666666666666666666666666666666666666666666666666666666666666");
        let mut forged = [0u8; 64];
        forged[..32].copy_from_slice(&base_point);
        forged[32] = 1;
        let raw = ParsedPublicKey::new(&ED25519, identity).unwrap();
        assert!(raw.verify_sig(b"any message at all", &forged).is_ok());
        assert!(raw.verify_sig(b"and another", &forged).is_ok());
        assert_eq!(
            Ed25519PublicKey::from_bytes(identity),
            Err(JwkError::WeakEd25519Key)
        );
    }

    #[test]
    fn debug_output_never_shows_the_private_key() {
        let key = Ed25519SigningKey::generate().unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        let body: String = pem.lines().nth(1).unwrap().to_owned();
        let debug = format!("{key:?}");
        assert!(debug.contains("<redacted>"));
        assert!(!debug.contains(&body[..20]));
    }

    #[test]
    fn a_p256_pem_is_not_an_ed25519_key() {
        let p256 = super::super::SigningKey::generate().unwrap();
        let pem = p256.to_pkcs8_pem().unwrap();
        assert_eq!(
            Ed25519SigningKey::from_pkcs8_pem(pem.as_bytes()).unwrap_err(),
            KeyError::NotEd25519
        );
    }
}
