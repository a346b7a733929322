//! The verified-token cache: a token that verified once is not verified
//! again while it lives, so the common request costs one signature check
//! (the proof's) instead of two.
//!
//! Keyed by SHA-256 of the token string, which the request check computes
//! anyway for `ath`. Entries are dropped once the token expires (with the
//! verifier's leeway). Bounded: a full shard first drops expired entries,
//! then an arbitrary one. Revocation is the caller's job: it checks the
//! returned claims against its revocation list on every request.

use super::access::TokenClaims;
use crate::dpop::TokenHash;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

const SHARDS: usize = 16;

type Shard = Mutex<HashMap<TokenHash, Arc<TokenClaims>>>;

/// Verified tokens by hash.
#[derive(Debug)]
pub struct VerifiedTokens {
    shards: Box<[Shard]>,
    shard_capacity: usize,
    leeway: u64,
}

impl VerifiedTokens {
    /// A cache of at most `capacity` tokens, honouring `exp + leeway`.
    pub fn new(capacity: usize, leeway: u64) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
            leeway,
        }
    }

    fn shard(&self, hash: &TokenHash) -> &Shard {
        &self.shards[usize::from(hash.as_bytes()[0]) % SHARDS]
    }

    fn live(&self, claims: &TokenClaims, now: u64) -> bool {
        now < claims.exp.saturating_add(self.leeway)
    }

    /// The claims of a token verified earlier, if it has not expired.
    pub fn get(&self, hash: &TokenHash, now: u64) -> Option<Arc<TokenClaims>> {
        let mut shard = self
            .shard(hash)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let claims = shard.get(hash)?;
        if self.live(claims, now) {
            Some(Arc::clone(claims))
        } else {
            shard.remove(hash);
            None
        }
    }

    /// Remembers a verified token.
    pub fn insert(&self, hash: TokenHash, claims: Arc<TokenClaims>, now: u64) {
        let mut shard = self
            .shard(&hash)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if shard.len() >= self.shard_capacity {
            shard.retain(|_, c| self.live(c, now));
        }
        if shard.len() >= self.shard_capacity
            && let Some(victim) = shard.keys().next().copied()
        {
            shard.remove(&victim);
        }
        shard.insert(hash, claims);
    }

    /// Number of cached tokens.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
