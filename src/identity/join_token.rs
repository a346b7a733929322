//! One-time join tokens: how a VM or a test workload first proves which
//! SPIFFE ID it may have. The token is a secret shown once; the broker
//! stores only its SHA-256.

use crate::jose::b64;
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use std::fmt;
use zeroize::Zeroizing;

const PREFIX: &str = "tally-jt-";
/// Longest string accepted as a join token.
pub const MAX_LEN: usize = 128;

/// A join token. Redacted in `Debug`, wiped on drop.
pub struct JoinToken(Zeroizing<String>);

/// The stored form of a join token: SHA-256 of the string.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct JoinTokenHash(pub [u8; 32]);

impl JoinToken {
    /// A new token with 256 random bits.
    ///
    /// # Errors
    /// If the system random source fails.
    pub fn generate() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        SystemRandom::new().fill(bytes.as_mut())?;
        Ok(Self(Zeroizing::new(format!(
            "{PREFIX}{}",
            b64::encode(bytes.as_ref())
        ))))
    }

    /// Wraps a token presented by a client, refusing anything too long to
    /// be one (the hash is taken either way; this only bounds work).
    pub fn presented(text: &str) -> Option<Self> {
        (!text.is_empty() && text.len() <= MAX_LEN).then(|| Self(Zeroizing::new(text.to_owned())))
    }

    /// The token text, to show once to the admin who made it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// What the store keeps.
    pub fn hash(&self) -> JoinTokenHash {
        let d = digest::digest(&digest::SHA256, self.0.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        JoinTokenHash(out)
    }
}

impl fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JoinToken(<redacted>)")
    }
}

impl fmt::Debug for JoinTokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JoinTokenHash({})", b64::encode(&self.0[..8]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_unique_prefixed_and_hash_stably() {
        let a = JoinToken::generate().unwrap();
        let b = JoinToken::generate().unwrap();
        assert!(a.expose().starts_with(PREFIX));
        assert_ne!(a.expose(), b.expose());
        assert_eq!(JoinToken::presented(a.expose()).unwrap().hash(), a.hash());
        assert_ne!(a.hash(), b.hash());
    }

    #[test]
    fn debug_never_shows_the_token() {
        let a = JoinToken::generate().unwrap();
        assert!(!format!("{a:?}").contains(&a.expose()[PREFIX.len()..]));
    }

    #[test]
    fn oversized_input_is_not_a_token() {
        assert!(JoinToken::presented(&"a".repeat(200)).is_none());
        assert!(JoinToken::presented("").is_none());
    }
}
