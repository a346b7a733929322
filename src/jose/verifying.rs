//! A public key that verifies JWS: P-256 for ES256, or Ed25519 for EdDSA.
//! Parsed from a public JWK (`EC`/`P-256` or `OKP`/`Ed25519`), with its
//! RFC 7638 thumbprint. Used where a WIMSE token may carry either: a WIT's
//! `cnf.jwk`, a WIT issuer's key set.

use super::ed25519::Ed25519PublicKey;
use super::jwk::{Jkt, JwkError, PublicKey};
use super::jws::{Alg, JwsError};
use serde_json::Value;

/// How a P-256 key is named in errors.
pub(super) const KEY_P256: &str = "EC P-256";
/// How an Ed25519 key is named in errors.
pub(super) const KEY_ED25519: &str = "OKP Ed25519";

/// A validated verification key of either type. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VerifyingKey {
    /// An EC P-256 key: verifies ES256.
    P256(PublicKey),
    /// An OKP Ed25519 key: verifies EdDSA.
    Ed25519(Ed25519PublicKey),
}

impl VerifyingKey {
    /// Parses a public JWK: `kty: EC` with `crv: P-256`, or `kty: OKP`
    /// with `crv: Ed25519`. Private members, `oct` keys, other key types
    /// and other curves are refused; unknown members are ignored.
    ///
    /// # Errors
    /// [`JwkError`] naming the first problem found.
    pub fn from_jwk(value: &Value) -> Result<Self, JwkError> {
        match value.get("kty").and_then(Value::as_str) {
            Some("OKP") => Ed25519PublicKey::from_jwk(value).map(Self::Ed25519),
            // EC, and every error (no kty, oct, RSA, …) as P-256 names it.
            _ => PublicKey::from_jwk(value).map(Self::P256),
        }
    }

    /// The one algorithm this key verifies.
    pub fn alg(&self) -> Alg {
        match self {
            Self::P256(_) => Alg::Es256,
            Self::Ed25519(_) => Alg::EdDsa,
        }
    }

    /// The key's type, as errors and reports name it (`EC P-256`,
    /// `OKP Ed25519`).
    pub fn key_type(&self) -> &'static str {
        match self {
            Self::P256(_) => KEY_P256,
            Self::Ed25519(_) => KEY_ED25519,
        }
    }

    /// The RFC 7638 SHA-256 thumbprint.
    pub fn thumbprint(&self) -> Jkt {
        match self {
            Self::P256(k) => k.thumbprint(),
            Self::Ed25519(k) => k.thumbprint(),
        }
    }

    /// The RFC 7638 members in lexicographic order: a minimal public JWK.
    pub fn to_jwk_json(&self) -> String {
        match self {
            Self::P256(k) => k.to_jwk_json(),
            Self::Ed25519(k) => k.to_jwk_json(),
        }
    }

    /// Verifies `signature` over `message` made with `alg`: ES256 as a
    /// 64-byte `R ‖ S` under a P-256 key, EdDSA as 64 bytes under an
    /// Ed25519 key.
    ///
    /// # Errors
    /// [`JwsError::AlgKeyMismatch`] when `alg` does not fit the key,
    /// [`JwsError::SignatureLength`] for a signature that is not 64 bytes,
    /// [`JwsError::BadSignature`] when it does not verify.
    pub fn verify(&self, alg: Alg, message: &[u8], signature: &[u8]) -> Result<(), JwsError> {
        if alg != self.alg() {
            return Err(JwsError::AlgKeyMismatch {
                alg: alg.as_str(),
                key: self.key_type(),
            });
        }
        if signature.len() != 64 {
            return Err(JwsError::SignatureLength {
                len: signature.len(),
            });
        }
        let parsed = match self {
            Self::P256(k) => k.parsed(),
            Self::Ed25519(k) => k.parsed(),
        };
        parsed
            .verify_sig(message, signature)
            .map_err(|_| JwsError::BadSignature)
    }
}

impl From<PublicKey> for VerifyingKey {
    fn from(key: PublicKey) -> Self {
        Self::P256(key)
    }
}

impl From<Ed25519PublicKey> for VerifyingKey {
    fn from(key: Ed25519PublicKey) -> Self {
        Self::Ed25519(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::SigningKey;
    use crate::jose::ed25519::Ed25519SigningKey;
    use serde_json::json;

    fn jwk(json: &str) -> Value {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn either_key_type_parses_and_keeps_its_thumbprint() {
        let ec = SigningKey::generate().unwrap();
        let key = VerifyingKey::from_jwk(&jwk(&ec.public_key().to_jwk_json())).unwrap();
        assert_eq!(key.alg(), Alg::Es256);
        assert_eq!(key.thumbprint(), ec.thumbprint());
        let ed = Ed25519SigningKey::generate().unwrap();
        let key = VerifyingKey::from_jwk(&jwk(&ed.public_key().to_jwk_json())).unwrap();
        assert_eq!(key.alg(), Alg::EdDsa);
        assert_eq!(key.thumbprint(), ed.thumbprint());
        assert_eq!(key.to_jwk_json(), ed.public_key().to_jwk_json());
    }

    #[test]
    fn private_symmetric_and_foreign_keys_are_refused() {
        let mut ed = jwk(&Ed25519SigningKey::generate()
            .unwrap()
            .public_key()
            .to_jwk_json());
        ed["d"] = json!("AAAA");
        assert_eq!(VerifyingKey::from_jwk(&ed), Err(JwkError::PrivateKey("d")));
        let oct = json!({"kty":"oct","k":"c2VjcmV0"});
        assert_eq!(VerifyingKey::from_jwk(&oct), Err(JwkError::SymmetricKey));
        let rsa = json!({"kty":"RSA","n":"AQAB","e":"AQAB"});
        assert_eq!(
            VerifyingKey::from_jwk(&rsa),
            Err(JwkError::UnsupportedKeyType("RSA".into()))
        );
        let x448 = json!({"kty":"OKP","crv":"X448","x":"AAAA"});
        assert_eq!(
            VerifyingKey::from_jwk(&x448),
            Err(JwkError::UnsupportedCurve("X448".into()))
        );
        assert_eq!(
            VerifyingKey::from_jwk(&json!({})),
            Err(JwkError::MissingMember("kty"))
        );
    }

    #[test]
    fn each_key_verifies_its_own_algorithm_only() {
        let ec = SigningKey::generate().unwrap();
        let ed = Ed25519SigningKey::generate().unwrap();
        let ec_key = VerifyingKey::from(ec.public_key().clone());
        let ed_key = VerifyingKey::from(ed.public_key().clone());
        let ec_sig = ec.sign(b"m").unwrap();
        let ed_sig = ed.sign(b"m").unwrap();
        ec_key.verify(Alg::Es256, b"m", &ec_sig).unwrap();
        ed_key.verify(Alg::EdDsa, b"m", &ed_sig).unwrap();
        assert_eq!(
            ec_key.verify(Alg::EdDsa, b"m", &ed_sig),
            Err(JwsError::AlgKeyMismatch {
                alg: "EdDSA",
                key: KEY_P256
            })
        );
        assert_eq!(
            ed_key.verify(Alg::Es256, b"m", &ec_sig),
            Err(JwsError::AlgKeyMismatch {
                alg: "ES256",
                key: KEY_ED25519
            })
        );
        assert_eq!(
            ed_key.verify(Alg::EdDsa, b"n", &ed_sig),
            Err(JwsError::BadSignature)
        );
        assert_eq!(
            ed_key.verify(Alg::EdDsa, b"m", &ed_sig[..63]),
            Err(JwsError::SignatureLength { len: 63 })
        );
    }
}
