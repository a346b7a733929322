//! ES256 signing keys.
//!
//! The private scalar lives inside aws-lc, whose allocator wipes memory on
//! free (`OPENSSL_free` cleanses), so dropping a [`SigningKey`] erases it.
//! PKCS#8 copies we hand out, and private JWK members we read, are
//! wrapped in [`Zeroizing`].

use super::b64;
use super::jwk::{Jkt, JwkError, PublicKey};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use rustls_pki_types::PrivatePkcs8KeyDer;
use rustls_pki_types::pem::PemObject;
use serde_json::Value;
use std::fmt;
use zeroize::Zeroizing;

/// Why a private key could not be loaded or made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeyError {
    /// Not PEM, or no `PRIVATE KEY` block.
    #[error("no PKCS#8 \"PRIVATE KEY\" PEM block found")]
    NotPem,
    /// PKCS#8, but not a valid P-256 ECDSA key.
    #[error("not a valid P-256 ECDSA PKCS#8 key")]
    NotP256,
    /// PKCS#8, but not a valid Ed25519 key.
    #[error("not a valid Ed25519 PKCS#8 key")]
    NotEd25519,
    /// A private JWK that cannot be used (what is wrong is named).
    #[error("private JWK: {0}")]
    PrivateJwk(&'static str),
    /// Neither PKCS#8 PEM (P-256 or Ed25519) nor a private JWK.
    #[error("not a PKCS#8 PEM private key (P-256 or Ed25519) nor a private JWK")]
    NotAKey,
    /// The system random source failed.
    #[error("could not generate a key")]
    Generate,
    /// The public half is unusable (should not happen for a key aws-lc made).
    #[error(transparent)]
    Public(#[from] JwkError),
}

/// A P-256 private key that signs ES256 JWS.
pub struct SigningKey {
    pair: EcdsaKeyPair,
    public: PublicKey,
    jkt: Jkt,
}

impl SigningKey {
    /// Generates a fresh key from the system CSPRNG.
    ///
    /// # Errors
    /// [`KeyError::Generate`] if the random source fails.
    pub fn generate() -> Result<Self, KeyError> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| KeyError::Generate)?;
        Self::from_pair(pair)
    }

    /// Loads a key from PKCS#8 DER.
    ///
    /// # Errors
    /// [`KeyError::NotP256`] for anything but a valid P-256 key.
    pub fn from_pkcs8_der(der: &[u8]) -> Result<Self, KeyError> {
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
            .map_err(|_| KeyError::NotP256)?;
        Self::from_pair(pair)
    }

    /// Loads a key from a `-----BEGIN PRIVATE KEY-----` PEM document.
    ///
    /// # Errors
    /// [`KeyError::NotPem`] or [`KeyError::NotP256`].
    pub fn from_pkcs8_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let der = PrivatePkcs8KeyDer::from_pem_slice(pem).map_err(|_| KeyError::NotPem)?;
        Self::from_pkcs8_der(der.secret_pkcs8_der())
    }

    /// Loads a key from a private `EC` JWK (`crv: P-256`, `x`, `y`, `d`).
    /// `d` must belong to `x` and `y`.
    ///
    /// # Errors
    /// [`KeyError::PrivateJwk`] naming what is wrong, or
    /// [`KeyError::Public`] for a bad public half.
    pub fn from_jwk(value: &Value) -> Result<Self, KeyError> {
        let (d, public) = split_private_jwk(value)?;
        let public = PublicKey::from_jwk(&public)?;
        let pair = EcdsaKeyPair::from_private_key_and_public_key(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            d.as_slice(),
            &public.to_sec1(),
        )
        .map_err(|_| KeyError::PrivateJwk("d does not belong to x and y"))?;
        Self::from_pair(pair)
    }

    fn from_pair(pair: EcdsaKeyPair) -> Result<Self, KeyError> {
        let public = PublicKey::from_sec1(pair.public_key().as_ref())?;
        let jkt = public.thumbprint();
        Ok(Self { pair, public, jkt })
    }

    /// The private key as PKCS#8 v1 DER, wiped when dropped.
    ///
    /// # Errors
    /// [`KeyError::NotP256`] if aws-lc cannot serialize it.
    pub fn to_pkcs8_der(&self) -> Result<Zeroizing<Vec<u8>>, KeyError> {
        let doc = self.pair.to_pkcs8v1().map_err(|_| KeyError::NotP256)?;
        Ok(Zeroizing::new(doc.as_ref().to_vec()))
    }

    /// The private key as a PKCS#8 PEM document, wiped when dropped.
    ///
    /// # Errors
    /// As [`SigningKey::to_pkcs8_der`].
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, KeyError> {
        Ok(pkcs8_pem(&self.to_pkcs8_der()?))
    }

    /// The public half.
    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// The public key's RFC 7638 thumbprint.
    pub fn thumbprint(&self) -> Jkt {
        self.jkt
    }

    /// Signs `message` with ES256, returning the 64-byte `R ‖ S` signature.
    ///
    /// # Errors
    /// Only if aws-lc's signing fails, which it does not for a valid key.
    pub fn sign(&self, message: &[u8]) -> Result<[u8; 64], SignError> {
        // aws-lc draws its own randomness; the argument exists for ring
        // API compatibility.
        let signature = self
            .pair
            .sign(&SystemRandom::new(), message)
            .map_err(|_| SignError)?;
        let mut out = [0u8; 64];
        if signature.as_ref().len() != 64 {
            return Err(SignError);
        }
        out.copy_from_slice(signature.as_ref());
        Ok(out)
    }
}

/// Signing failed inside the crypto library (or the random source).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("JWS signing failed")]
pub struct SignError;

/// PKCS#8 DER as a `PRIVATE KEY` PEM document, wiped when dropped.
pub(super) fn pkcs8_pem(der: &[u8]) -> Zeroizing<String> {
    let body = Zeroizing::new(base64_std(der));
    let mut pem = Zeroizing::new(String::with_capacity(body.len() + 80));
    pem.push_str("-----BEGIN PRIVATE KEY-----\n");
    for line in body.as_bytes().chunks(64) {
        // The body is base64 text, so every chunk is ASCII.
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    pem
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("jkt", &self.jkt)
            .field("private", &"<redacted>")
            .finish()
    }
}

/// Standard (padded) base64 for PEM bodies.
fn base64_std(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// A private JWK's 32-byte `d` and the JWK without it (its public half,
/// to be checked as any public key is).
///
/// # Errors
/// [`KeyError::PrivateJwk`] when it is not an object or `d` is not 32
/// bytes of canonical base64url.
pub(crate) fn split_private_jwk(value: &Value) -> Result<(Zeroizing<[u8; 32]>, Value), KeyError> {
    let map = value
        .as_object()
        .ok_or(KeyError::PrivateJwk("not a JSON object"))?;
    let d = map
        .get("d")
        .and_then(Value::as_str)
        .ok_or(KeyError::PrivateJwk("no d member"))?;
    let d = Zeroizing::new(
        b64::decode_array::<32>(d.as_bytes())
            .map_err(|_| KeyError::PrivateJwk("d is not 32 bytes of canonical base64url"))?,
    );
    let mut public = map.clone();
    public.remove("d");
    Ok((d, Value::Object(public)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pem_round_trip_keeps_the_key() {
        let key = SigningKey::generate().unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        let again = SigningKey::from_pkcs8_pem(pem.as_bytes()).unwrap();
        assert_eq!(again.thumbprint(), key.thumbprint());
    }

    #[test]
    fn debug_output_never_shows_the_private_key() {
        let key = SigningKey::generate().unwrap();
        let pem = key.to_pkcs8_pem().unwrap();
        let body: String = pem.lines().nth(1).unwrap().to_owned();
        let debug = format!("{key:?}");
        assert!(debug.contains("<redacted>"));
        assert!(!debug.contains(&body[..20]));
    }

    #[test]
    fn private_jwk_loads_the_same_key_and_a_foreign_d_is_refused() {
        let key = SigningKey::generate().unwrap();
        // The private scalar is the last 32 bytes of the SEC1 structure
        // inside PKCS#8 v1 for P-256 keys aws-lc writes; take it from there.
        let der = key.to_pkcs8_der().unwrap();
        let mut jwk: Value = serde_json::from_str(&key.public_key().to_jwk_json()).unwrap();
        let d = find_private_scalar(&der);
        jwk["d"] = Value::from(b64::encode(d));
        let again = SigningKey::from_jwk(&jwk).unwrap();
        assert_eq!(again.thumbprint(), key.thumbprint());
        jwk["d"] = Value::from(b64::encode([5u8; 32]));
        assert_eq!(
            SigningKey::from_jwk(&jwk).unwrap_err(),
            KeyError::PrivateJwk("d does not belong to x and y")
        );
        jwk.as_object_mut().unwrap().remove("d");
        assert_eq!(
            SigningKey::from_jwk(&jwk).unwrap_err(),
            KeyError::PrivateJwk("no d member")
        );
    }

    /// The 32 bytes after the `04 20` (OCTET STRING, 32) that holds the
    /// private key in an ECPrivateKey structure.
    fn find_private_scalar(der: &[u8]) -> [u8; 32] {
        let at = der
            .windows(5)
            .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
            .expect("ECPrivateKey version 1 then the key");
        der[at + 5..at + 37].try_into().unwrap()
    }

    #[test]
    fn garbage_is_not_a_key() {
        assert_eq!(
            SigningKey::from_pkcs8_pem(b"hello").unwrap_err(),
            KeyError::NotPem
        );
        assert_eq!(
            SigningKey::from_pkcs8_der(&[0x30, 0x03, 0x02, 0x01, 0x00]).unwrap_err(),
            KeyError::NotP256
        );
    }

    #[test]
    fn signatures_are_fixed_64_bytes_and_verify() {
        let key = SigningKey::generate().unwrap();
        let sig = key.sign(b"message").unwrap();
        assert!(
            key.public_key()
                .parsed()
                .verify_sig(b"message", &sig)
                .is_ok()
        );
        assert!(
            key.public_key()
                .parsed()
                .verify_sig(b"messagf", &sig)
                .is_err()
        );
    }
}
