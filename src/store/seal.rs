//! Encryption at rest for private keys and other secrets in the store:
//! AES-256-GCM, with the record's name as associated data so a sealed
//! value moved to another record does not open.
//!
//! Threat model: sealing protects secrets in database files, backups and
//! replicas from anyone who has those but not the sealing key. Keep the key
//! elsewhere (a Kubernetes Secret mounted as a file, or `TALLY_STORE_KEY`).
//! Someone who holds both, or who controls the running broker, has the
//! keys; sealing does not claim otherwise.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use std::fmt;
use zeroize::Zeroizing;

const VERSION: u8 = 1;

/// Why a value could not be sealed or opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SealError {
    /// The key is not 32 bytes (raw, or 43 characters of base64url).
    #[error("store sealing key must be 32 bytes (or 43 base64url characters)")]
    KeyLength,
    /// Wrong key, a value moved between records, or corrupted data.
    #[error("sealed value does not open with this key (wrong key, or data altered)")]
    Open,
    /// The random source failed.
    #[error("random source failed")]
    Random,
}

/// The store's sealing key.
pub struct Sealer {
    key: LessSafeKey,
}

impl Sealer {
    /// A sealer from 32 key bytes, or from their base64url text (as kept in
    /// a key file or `TALLY_STORE_KEY`; surrounding whitespace ignored).
    ///
    /// # Errors
    /// [`SealError::KeyLength`].
    pub fn from_key_material(material: &[u8]) -> Result<Self, SealError> {
        let trimmed = material.trim_ascii();
        let raw: Zeroizing<Vec<u8>> = if trimmed.len() == 32 {
            Zeroizing::new(trimmed.to_vec())
        } else {
            Zeroizing::new(crate::jose::b64::decode(trimmed).map_err(|_| SealError::KeyLength)?)
        };
        if raw.len() != 32 {
            return Err(SealError::KeyLength);
        }
        let key = UnboundKey::new(&AES_256_GCM, &raw).map_err(|_| SealError::KeyLength)?;
        Ok(Self {
            key: LessSafeKey::new(key),
        })
    }

    /// A new random key, as base64url text for a key file.
    ///
    /// # Errors
    /// [`SealError::Random`].
    pub fn generate_key_text() -> Result<Zeroizing<String>, SealError> {
        let mut raw = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(raw.as_mut())
            .map_err(|_| SealError::Random)?;
        Ok(Zeroizing::new(crate::jose::b64::encode(raw.as_ref())))
    }

    /// Seals `plaintext` for the record `name`.
    ///
    /// # Errors
    /// [`SealError::Random`].
    pub fn seal(&self, name: &str, plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| SealError::Random)?;
        let mut out = Vec::with_capacity(1 + NONCE_LEN + plaintext.len() + 16);
        out.push(VERSION);
        out.extend_from_slice(&nonce);
        let mut body = plaintext.to_vec();
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .map_err(|_| SealError::Random)?;
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a value sealed for the record `name`.
    ///
    /// # Errors
    /// [`SealError::Open`].
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Zeroizing<Vec<u8>>, SealError> {
        if sealed.len() < 1 + NONCE_LEN + 16 || sealed[0] != VERSION {
            return Err(SealError::Open);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[1..1 + NONCE_LEN]);
        let mut body = Zeroizing::new(sealed[1 + NONCE_LEN..].to_vec());
        let len = self
            .key
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_bytes()),
                &mut body,
            )
            .map_err(|_| SealError::Open)?
            .len();
        body.truncate(len);
        Ok(body)
    }
}

impl fmt::Debug for Sealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sealer(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sealer() -> Sealer {
        Sealer::from_key_material(Sealer::generate_key_text().unwrap().as_bytes()).unwrap()
    }

    #[test]
    fn sealed_values_open_for_their_own_record_only() {
        let s = sealer();
        let sealed = s.seal("ca/intermediate", b"secret key").unwrap();
        assert_eq!(
            s.open("ca/intermediate", &sealed).unwrap().as_slice(),
            b"secret key"
        );
        assert_eq!(s.open("ca/root", &sealed).unwrap_err(), SealError::Open);
        assert!(!sealed.windows(10).any(|w| w == b"secret key"));
    }

    #[test]
    fn another_key_or_altered_data_does_not_open() {
        let s = sealer();
        let sealed = s.seal("x", b"v").unwrap();
        assert_eq!(sealer().open("x", &sealed).unwrap_err(), SealError::Open);
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert_eq!(s.open("x", &altered).unwrap_err(), SealError::Open);
        assert_eq!(s.open("x", &sealed[..10]).unwrap_err(), SealError::Open);
    }

    #[test]
    fn key_material_must_be_32_bytes() {
        assert!(Sealer::from_key_material(&[1u8; 32]).is_ok());
        assert_eq!(
            Sealer::from_key_material(b"short").unwrap_err(),
            SealError::KeyLength
        );
        assert!(format!("{:?}", sealer()).contains("redacted"));
    }
}
