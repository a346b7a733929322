//! The DPoP replay cache: remembers each accepted proof (by key thumbprint
//! and `jti`) until its `iat` window closes, and refuses to see it twice.
//!
//! - **Keys** are SHA-256(salt ‖ jkt ‖ jti), with a random per-cache
//!   salt, so a client cannot aim entries at one shard or one hash bucket:
//!   one byte of it picks the shard and 64 other bits are what the shard
//!   remembers. Two different proofs can share those 64 bits only by
//!   chance (the salt is secret): then the second is refused as a replay,
//!   with probability (live keys in its shard) / 2⁶⁴ — about 3·10⁻¹⁶ with
//!   350,000 live proofs. A true replay is always refused: the same
//!   proof has the same key.
//! - **Shards**: 64 mutex-guarded shards; a check takes one lock for a
//!   couple of hash-set operations, so threads rarely contend.
//! - **Expiry** by time buckets: each shard keeps a ring of buckets of
//!   `bucket_secs`, each a hash set of the keys that expire in it; a check
//!   looks in every live bucket of its shard (about 17, each a single
//!   probe), and every call first drops the buckets that are over, whole.
//!   Nothing is removed key by key, so the sets never fill with tombstones.
//! - **Bounded**: each shard holds at most `capacity / 64` live keys (after
//!   expiry); beyond that the cache **fails closed** with
//!   [`ReplayError::Full`] rather than forgetting a live proof.
//!
//! Memory: a live entry costs 8 bytes in its bucket's hash set plus one
//! control byte, at a load factor between 7/16 and 7/8: 10–21 bytes, plus
//! two emptied sets per shard kept for reuse (`docs/BENCHMARKS.md`).

use crate::jose::Jkt;
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::Mutex;

const SHARDS: usize = 64;
/// How many buckets a window is cut into.
const BUCKETS_PER_WINDOW: u64 = 16;
/// Emptied bucket sets kept per shard for reuse.
const MAX_SPARE_SETS: usize = 2;

/// Why a proof was not recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// This proof was already seen inside its window.
    #[error("proof already used")]
    Replayed,
    /// The cache is at capacity; refusing is safer than forgetting.
    #[error("replay cache is full")]
    Full,
}

/// A proof's identity in the cache: from a salted hash of its key
/// thumbprint and `jti`, the shard it goes to and the 64 bits kept there.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ReplayKey {
    shard: u8,
    bits: u64,
}

impl ReplayKey {
    fn shard(&self) -> usize {
        usize::from(self.shard) % SHARDS
    }
}

/// What a shard's sets hold of a key. Already uniformly random and
/// unpredictable (salted), so its hash is the bits themselves.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Stored(u64);

impl Hash for Stored {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.0);
    }
}

/// Passes a pre-hashed `u64` through.
#[derive(Default)]
struct PassThrough(u64);

impl Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type KeySet = HashSet<Stored, BuildHasherDefault<PassThrough>>;

/// The keys that expire within one time bucket.
struct Bucket {
    id: u64,
    keys: KeySet,
}

#[derive(Default)]
struct Shard {
    /// Buckets by id, oldest first, without gaps.
    buckets: VecDeque<Bucket>,
    /// Live keys in all buckets.
    len: usize,
    spare: Vec<KeySet>,
}

impl Shard {
    /// Drops every bucket that ends before `now_bucket`.
    fn expire(&mut self, now_bucket: u64) {
        while self.buckets.front().is_some_and(|b| b.id < now_bucket) {
            let Some(mut bucket) = self.buckets.pop_front() else {
                break;
            };
            self.len -= bucket.keys.len();
            if self.spare.len() < MAX_SPARE_SETS {
                bucket.keys.clear();
                self.spare.push(bucket.keys);
            }
        }
    }

    fn contains(&self, key: Stored) -> bool {
        self.buckets.iter().any(|b| b.keys.contains(&key))
    }

    fn bucket_for(&mut self, id: u64) -> &mut KeySet {
        let first = match self.buckets.front() {
            Some(b) => b.id,
            None => id,
        };
        let id = id.max(first);
        let index = usize::try_from(id - first).unwrap_or(usize::MAX);
        while self.buckets.len() <= index {
            let next = first + self.buckets.len() as u64;
            let keys = self.spare.pop().unwrap_or_default();
            self.buckets.push_back(Bucket { id: next, keys });
        }
        &mut self.buckets[index].keys
    }
}

/// The replay cache. Share it between threads behind an `Arc`.
pub struct ReplayCache {
    shards: Box<[Mutex<Shard>]>,
    shard_capacity: usize,
    bucket_secs: u64,
    horizon: u64,
    salt: [u8; 16],
}

/// A snapshot of the cache's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayStats {
    /// Live entries.
    pub entries: usize,
    /// Bytes held by the hash sets and bucket lists (allocated capacity).
    pub heap_bytes: usize,
}

impl ReplayCache {
    /// A cache for at most `capacity` live proofs, each remembered for up
    /// to `window_secs` (the proof config's `max_age + max_skew`).
    ///
    /// # Errors
    /// If the system random source fails (for the salt).
    pub fn new(capacity: usize, window_secs: u64) -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut salt = [0u8; 16];
        SystemRandom::new().fill(&mut salt)?;
        let window_secs = window_secs.max(1);
        Ok(Self {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
            shard_capacity: capacity.div_ceil(SHARDS).max(1),
            bucket_secs: window_secs.div_ceil(BUCKETS_PER_WINDOW).max(1),
            horizon: window_secs,
            salt,
        })
    }

    /// The cache key of a proof.
    pub fn key(&self, jkt: &Jkt, jti: &str) -> ReplayKey {
        let mut ctx = digest::Context::new(&digest::SHA256);
        ctx.update(&self.salt);
        ctx.update(jkt.as_bytes());
        ctx.update(jti.as_bytes());
        let hash = ctx.finish();
        let mut bits = [0u8; 8];
        bits.copy_from_slice(&hash.as_ref()[..8]);
        ReplayKey {
            shard: hash.as_ref()[8],
            bits: u64::from_le_bytes(bits),
        }
    }

    /// Records `key` as seen until `expires_at` (Unix seconds), unless it
    /// is already live.
    ///
    /// `expires_at` is clamped to `now + window`, which bounds the number
    /// of buckets whatever the caller passes.
    ///
    /// # Errors
    /// [`ReplayError::Replayed`] if the key is live;
    /// [`ReplayError::Full`] if its shard is at capacity.
    pub fn check_and_insert(
        &self,
        key: ReplayKey,
        expires_at: u64,
        now: u64,
    ) -> Result<(), ReplayError> {
        let expires_at = expires_at.min(now.saturating_add(self.horizon));
        let mut shard = self.shards[key.shard()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shard.expire(now / self.bucket_secs);
        let stored = Stored(key.bits);
        if shard.contains(stored) {
            return Err(ReplayError::Replayed);
        }
        if expires_at < now {
            // Already outside its window: nothing to remember.
            return Ok(());
        }
        if shard.len >= self.shard_capacity {
            return Err(ReplayError::Full);
        }
        shard
            .bucket_for(expires_at / self.bucket_secs)
            .insert(stored);
        shard.len += 1;
        Ok(())
    }

    /// Whether `key` is live at `now` (seen, and not yet expired), without
    /// recording it: for a check that must refuse a replay early but
    /// records only once every other check has passed.
    pub fn contains(&self, key: ReplayKey, now: u64) -> bool {
        let mut shard = self.shards[key.shard()]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        shard.expire(now / self.bucket_secs);
        shard.contains(Stored(key.bits))
    }

    /// Entry count and heap use.
    pub fn stats(&self) -> ReplayStats {
        let mut stats = ReplayStats {
            entries: 0,
            heap_bytes: 0,
        };
        let key = std::mem::size_of::<Stored>();
        for shard in &*self.shards {
            let shard = shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            stats.entries += shard.len;
            // hashbrown: one slot plus one control byte per bucket; buckets
            // are the next power of two above capacity * 8 / 7.
            let set_bytes = |set: &KeySet| {
                if set.capacity() == 0 {
                    0
                } else {
                    (set.capacity() * 8 / 7).next_power_of_two() * (key + 1)
                }
            };
            stats.heap_bytes += shard
                .buckets
                .iter()
                .map(|b| set_bytes(&b.keys))
                .chain(shard.spare.iter().map(set_bytes))
                .sum::<usize>();
        }
        stats
    }
}

impl std::fmt::Debug for ReplayCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayCache")
            .field("shard_capacity", &self.shard_capacity)
            .field("bucket_secs", &self.bucket_secs)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn jkt(n: u8) -> Jkt {
        crate::jose::b64::encode([n; 32]).parse().unwrap()
    }

    #[test]
    fn second_sighting_inside_the_window_is_a_replay() {
        let cache = ReplayCache::new(1000, 120).unwrap();
        let key = cache.key(&jkt(1), "abc");
        assert_eq!(cache.check_and_insert(key, 1060, 1000), Ok(()));
        assert_eq!(
            cache.check_and_insert(key, 1060, 1030),
            Err(ReplayError::Replayed)
        );
    }

    #[test]
    fn same_jti_under_another_key_is_a_different_proof() {
        let cache = ReplayCache::new(1000, 120).unwrap();
        let a = cache.key(&jkt(1), "abc");
        let b = cache.key(&jkt(2), "abc");
        assert_eq!(cache.check_and_insert(a, 1060, 1000), Ok(()));
        assert_eq!(cache.check_and_insert(b, 1060, 1000), Ok(()));
    }

    #[test]
    fn entries_are_forgotten_after_they_expire() {
        let cache = ReplayCache::new(1000, 120).unwrap();
        let key = cache.key(&jkt(1), "abc");
        cache.check_and_insert(key, 1060, 1000).unwrap();
        assert_eq!(cache.stats().entries, 1);
        // Well past expiry plus a bucket: gone, and memory reclaimed.
        let other = cache.key(&jkt(1), "other");
        assert_eq!(cache.check_and_insert(other, 1300, 1200), Ok(()));
        // `other` may live in another shard; touch key's own shard.
        assert_eq!(cache.check_and_insert(key, 1300, 1200), Ok(()));
        assert_eq!(cache.stats().entries, 2);
    }

    #[test]
    fn full_cache_fails_closed() {
        // 64 shards × 1 entry each.
        let cache = ReplayCache::new(64, 120).unwrap();
        let mut full = 0;
        for i in 0..10_000 {
            let key = cache.key(&jkt(1), &i.to_string());
            match cache.check_and_insert(key, 1060, 1000) {
                Ok(()) => {}
                Err(ReplayError::Full) => full += 1,
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        assert_eq!(cache.stats().entries, 64);
        assert_eq!(full, 10_000 - 64);
        // Once the window passes, room returns.
        let key = cache.key(&jkt(9), "late");
        assert_eq!(cache.check_and_insert(key, 1300, 1250), Ok(()));
    }

    #[test]
    fn far_future_expiry_is_clamped_to_the_window() {
        let cache = ReplayCache::new(1000, 120).unwrap();
        let key = cache.key(&jkt(1), "abc");
        cache.check_and_insert(key, u64::MAX, 1000).unwrap();
        let probe = cache.key(&jkt(1), "abc");
        assert_eq!(
            cache.check_and_insert(probe, 1100, 1100),
            Err(ReplayError::Replayed)
        );
        assert_eq!(cache.check_and_insert(probe, 1400, 1400), Ok(()));
    }

    #[test]
    fn a_live_entry_costs_at_most_21_bytes() {
        // 8 bytes and a control byte per slot, at least 7/16 of the slots
        // used: 9 × 16 / 7 ≈ 20.6 bytes.
        let cache = ReplayCache::new(1_000_000, 35).unwrap();
        for i in 0..200_000u32 {
            let key = cache.key(&jkt(4), &i.to_string());
            cache
                .check_and_insert(key, 1000 + u64::from(i % 35), 1000)
                .unwrap();
        }
        let stats = cache.stats();
        assert_eq!(stats.entries, 200_000);
        assert!(
            stats.heap_bytes <= stats.entries * 21,
            "{} bytes per entry",
            stats.heap_bytes / stats.entries
        );
    }

    #[test]
    fn concurrent_inserts_of_one_proof_succeed_exactly_once() {
        let cache = Arc::new(ReplayCache::new(100_000, 120).unwrap());
        let key = cache.key(&jkt(3), "race");
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let cache = Arc::clone(&cache);
                    s.spawn(move || usize::from(cache.check_and_insert(key, 1060, 1000).is_ok()))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(wins, 1);
    }
}
