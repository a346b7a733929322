//! Stateless server nonces (RFC 9449 §8–9).
//!
//! A nonce is `slot ‖ HMAC-SHA256(key, label ‖ slot)[..16]`, base64url. The
//! slot is `now / slot_secs`; a nonce is accepted for its own slot and the
//! one after, so every nonce lives between one and two slots. No state is
//! kept, so any replica holding the key accepts any other's nonces.

use crate::jose::b64;
use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use std::fmt;

const LABEL: &[u8] = b"tally dpop nonce v1";
const MAC_LEN: usize = 16;
const NONCE_LEN: usize = 8 + MAC_LEN;

/// Why a nonce was not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NonceError {
    /// Not a nonce we could have issued (wrong shape or MAC).
    #[error("nonce was not issued by this server")]
    Unknown,
    /// Issued by us, but for a slot that is over.
    #[error("nonce has expired")]
    Stale,
    /// Not the exact nonce required.
    #[error("nonce is not the one required")]
    Mismatch,
}

/// Issues and checks stateless nonces.
pub struct Nonces {
    key: hmac::Key,
    slot_secs: u64,
}

impl Nonces {
    /// Nonces keyed by `secret` (at least 32 bytes, shared by replicas),
    /// valid for one to two slots of `slot_secs` seconds.
    pub fn new(secret: &[u8], slot_secs: u64) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
            slot_secs: slot_secs.max(1),
        }
    }

    /// Nonces under a fresh random key (for a single process).
    ///
    /// # Errors
    /// If the system random source fails.
    pub fn random(slot_secs: u64) -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut secret = zeroize::Zeroizing::new([0u8; 32]);
        SystemRandom::new().fill(secret.as_mut())?;
        Ok(Self::new(secret.as_ref(), slot_secs))
    }

    /// A nonce for `now`.
    pub fn issue(&self, now: u64) -> String {
        let slot = now / self.slot_secs;
        let mut bytes = [0u8; NONCE_LEN];
        bytes[..8].copy_from_slice(&slot.to_be_bytes());
        bytes[8..].copy_from_slice(&self.mac(slot)[..MAC_LEN]);
        b64::encode(bytes)
    }

    /// Accepts a nonce issued for the current or the previous slot.
    ///
    /// # Errors
    /// [`NonceError::Unknown`] or [`NonceError::Stale`].
    pub fn check(&self, nonce: &str, now: u64) -> Result<(), NonceError> {
        let bytes =
            b64::decode_array::<NONCE_LEN>(nonce.as_bytes()).map_err(|_| NonceError::Unknown)?;
        let mut slot_bytes = [0u8; 8];
        slot_bytes.copy_from_slice(&bytes[..8]);
        let slot = u64::from_be_bytes(slot_bytes);
        // hmac::verify needs the full tag; compare the truncated one in
        // constant time instead.
        let expected = self.mac(slot);
        if !constant_time_eq(&expected[..MAC_LEN], &bytes[8..]) {
            return Err(NonceError::Unknown);
        }
        let current = now / self.slot_secs;
        if slot == current || slot.checked_add(1) == Some(current) {
            Ok(())
        } else {
            Err(NonceError::Stale)
        }
    }

    fn mac(&self, slot: u64) -> [u8; 32] {
        let mut ctx = hmac::Context::with_key(&self.key);
        ctx.update(LABEL);
        ctx.update(&slot.to_be_bytes());
        let tag = ctx.sign();
        let mut out = [0u8; 32];
        out.copy_from_slice(tag.as_ref());
        out
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl fmt::Debug for Nonces {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Nonces")
            .field("key", &"<redacted>")
            .field("slot_secs", &self.slot_secs)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonce_is_accepted_in_its_slot_and_the_next() {
        let nonces = Nonces::new(&[7u8; 32], 60);
        let nonce = nonces.issue(1_000_020);
        assert_eq!(nonces.check(&nonce, 1_000_020), Ok(()));
        assert_eq!(nonces.check(&nonce, 1_000_079), Ok(()));
        assert_eq!(nonces.check(&nonce, 1_000_140), Err(NonceError::Stale));
    }

    #[test]
    fn nonce_from_the_future_is_stale() {
        let nonces = Nonces::new(&[7u8; 32], 60);
        let nonce = nonces.issue(2_000_000);
        assert_eq!(nonces.check(&nonce, 1_000_000), Err(NonceError::Stale));
    }

    #[test]
    fn nonce_from_another_key_or_forged_is_unknown() {
        let ours = Nonces::new(&[7u8; 32], 60);
        let theirs = Nonces::new(&[8u8; 32], 60);
        assert_eq!(
            ours.check(&theirs.issue(100), 100),
            Err(NonceError::Unknown)
        );
        assert_eq!(ours.check("abc", 100), Err(NonceError::Unknown));
        let mut forged = b64::decode(ours.issue(100).as_bytes()).unwrap();
        forged[7] ^= 1; // move to another slot, keep the MAC
        assert_eq!(
            ours.check(&b64::encode(forged), 100),
            Err(NonceError::Unknown)
        );
    }

    #[test]
    fn debug_hides_the_key() {
        let nonces = Nonces::new(&[7u8; 32], 60);
        assert!(format!("{nonces:?}").contains("<redacted>"));
    }
}
