//! What signs a JWS: the [`JwsSigner`] trait, implemented by the ES256
//! [`SigningKey`] (a sidecar's key) and the Ed25519 [`Ed25519SigningKey`],
//! and [`AnySigningKey`], either one loaded from a file (PKCS#8 PEM or a
//! private JWK) for the command line and tests.

use super::ed25519::Ed25519SigningKey;
use super::json;
use super::jwk::Jkt;
use super::jws::Alg;
use super::key::{KeyError, SignError, SigningKey};
use super::verifying::VerifyingKey;
use serde_json::Value;

/// A private key that signs JWS with one algorithm, always 64 bytes of
/// signature (ES256 `R ‖ S`, or Ed25519).
pub trait JwsSigner {
    /// The `alg` its signatures are made with.
    fn alg(&self) -> Alg;

    /// Signs `message` (the JWS signing input).
    ///
    /// # Errors
    /// Only if the crypto library fails.
    fn sign_jws(&self, message: &[u8]) -> Result<[u8; 64], SignError>;

    /// The public half, as a verifier sees it.
    fn verifying_key(&self) -> VerifyingKey;
}

impl JwsSigner for SigningKey {
    fn alg(&self) -> Alg {
        Alg::Es256
    }

    fn sign_jws(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        self.sign(message)
    }

    fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::P256(self.public_key().clone())
    }
}

impl JwsSigner for Ed25519SigningKey {
    fn alg(&self) -> Alg {
        Alg::EdDsa
    }

    fn sign_jws(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        self.sign(message)
    }

    fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey::Ed25519(self.public_key().clone())
    }
}

/// An ES256 or an Ed25519 signing key. Redacted in `Debug` (each is).
#[derive(Debug)]
pub enum AnySigningKey {
    /// A P-256 key: signs ES256.
    Es256(SigningKey),
    /// An Ed25519 key: signs EdDSA.
    EdDsa(Ed25519SigningKey),
}

impl AnySigningKey {
    /// Loads a key file: a private JWK (JSON, `EC`/`P-256` or
    /// `OKP`/`Ed25519` with `d`) or a PKCS#8 `PRIVATE KEY` PEM document of
    /// either type.
    ///
    /// # Errors
    /// [`KeyError`]: [`KeyError::NotAKey`] for anything else, or what is
    /// wrong with the JWK or PEM key.
    pub fn load(bytes: &[u8]) -> Result<Self, KeyError> {
        let text = bytes.trim_ascii_start();
        if text.starts_with(b"{") {
            let jwk = json::parse_object(text).map_err(|_| KeyError::NotAKey)?;
            return Self::from_jwk(&Value::Object(jwk));
        }
        Self::from_pkcs8_pem(bytes)
    }

    /// Loads a PKCS#8 PEM document holding a P-256 or an Ed25519 key.
    ///
    /// # Errors
    /// [`KeyError::NotPem`], or [`KeyError::NotAKey`] for PKCS#8 of
    /// another kind of key.
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, KeyError> {
        match SigningKey::from_pkcs8_pem(pem) {
            Ok(key) => Ok(Self::Es256(key)),
            Err(KeyError::NotP256) => Ed25519SigningKey::from_pkcs8_pem(pem)
                .map(Self::EdDsa)
                .map_err(|_| KeyError::NotAKey),
            Err(e) => Err(e),
        }
    }

    /// Loads a private JWK by its `kty`.
    ///
    /// # Errors
    /// [`KeyError::PrivateJwk`] naming what is wrong.
    pub fn from_jwk(jwk: &Value) -> Result<Self, KeyError> {
        match jwk.get("kty").and_then(Value::as_str) {
            Some("EC") => SigningKey::from_jwk(jwk).map(Self::Es256),
            Some("OKP") => Ed25519SigningKey::from_jwk(jwk).map(Self::EdDsa),
            _ => Err(KeyError::PrivateJwk("kty is not EC or OKP")),
        }
    }

    /// The public key's RFC 7638 thumbprint.
    pub fn thumbprint(&self) -> Jkt {
        match self {
            Self::Es256(k) => k.thumbprint(),
            Self::EdDsa(k) => k.thumbprint(),
        }
    }
}

impl JwsSigner for AnySigningKey {
    fn alg(&self) -> Alg {
        match self {
            Self::Es256(k) => k.alg(),
            Self::EdDsa(k) => k.alg(),
        }
    }

    fn sign_jws(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        match self {
            Self::Es256(k) => k.sign_jws(message),
            Self::EdDsa(k) => k.sign_jws(message),
        }
    }

    fn verifying_key(&self) -> VerifyingKey {
        match self {
            Self::Es256(k) => k.verifying_key(),
            Self::EdDsa(k) => k.verifying_key(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_kinds_of_pem_load_and_sign_with_their_algorithm() {
        let ec = SigningKey::generate().unwrap();
        let ed = Ed25519SigningKey::generate().unwrap();
        for (pem, alg, jkt) in [
            (ec.to_pkcs8_pem().unwrap(), Alg::Es256, ec.thumbprint()),
            (ed.to_pkcs8_pem().unwrap(), Alg::EdDsa, ed.thumbprint()),
        ] {
            let key = AnySigningKey::load(pem.as_bytes()).unwrap();
            assert_eq!(key.alg(), alg);
            assert_eq!(key.thumbprint(), jkt);
            let sig = key.sign_jws(b"m").unwrap();
            key.verifying_key().verify(alg, b"m", &sig).unwrap();
        }
    }

    #[test]
    fn a_private_jwk_loads_and_anything_else_is_not_a_key() {
        let jwk = br#" {"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","d":"nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A"}"#;
        let key = AnySigningKey::load(jwk).unwrap();
        assert_eq!(key.alg(), Alg::EdDsa);
        assert_eq!(
            key.thumbprint().to_string(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
        assert_eq!(AnySigningKey::load(b"hello").unwrap_err(), KeyError::NotPem);
        assert_eq!(
            AnySigningKey::load(b"{nope").unwrap_err(),
            KeyError::NotAKey
        );
        assert_eq!(
            AnySigningKey::load(br#"{"kty":"RSA"}"#).unwrap_err(),
            KeyError::PrivateJwk("kty is not EC or OKP")
        );
    }

    #[test]
    fn debug_of_either_key_is_redacted() {
        let key = AnySigningKey::EdDsa(Ed25519SigningKey::generate().unwrap());
        let debug = format!("{key:?}");
        assert!(debug.contains("<redacted>"), "{debug}");
    }
}
