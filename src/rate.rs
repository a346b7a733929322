//! Token buckets: the broker's per-rule issuance limits and the inbound
//! sidecar's per-caller request limits. Pure: the caller passes `now` in
//! milliseconds.

use crate::policy::Rate;
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
    /// How long the bucket takes to refill from empty.
    window_ms: u64,
}

/// Most buckets kept (the sharing buckets of [`RateLimiter::take_or_share`]
/// aside); past it, buckets that have refilled (the same as a new one) are
/// dropped, so a stream of distinct keys cannot grow memory.
const MAX_BUCKETS: usize = 65_536;

/// Looking for refilled buckets walks them all: at most this often (ms)
/// while the limiter is full.
const SWEEP_EVERY_MS: u64 = 1_000;

#[derive(Debug)]
struct Buckets<K> {
    map: HashMap<K, Bucket>,
    swept_ms: u64,
}

impl<K: std::hash::Hash + Eq> Buckets<K> {
    /// Whether a new key may have a bucket of its own: below the cap, or
    /// once the refilled buckets are dropped. Only refilled ones are: any
    /// other holds a debt its key would be forgiven.
    fn room(&mut self, now_ms: u64) -> bool {
        if self.map.len() < MAX_BUCKETS {
            return true;
        }
        if now_ms.saturating_sub(self.swept_ms) >= SWEEP_EVERY_MS {
            self.swept_ms = now_ms;
            // A bucket idle for its whole window is full again.
            self.map
                .retain(|_, b| now_ms.saturating_sub(b.at_ms) < b.window_ms);
        }
        self.map.len() < MAX_BUCKETS
    }
}

/// Buckets by key (an issue rule and its caller, or a caller).
#[derive(Debug)]
pub struct RateLimiter<K> {
    buckets: Mutex<Buckets<K>>,
}

impl<K: std::hash::Hash + Eq + Clone> Default for RateLimiter<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: std::hash::Hash + Eq + Clone> RateLimiter<K> {
    /// An empty limiter.
    pub fn new() -> Self {
        Self {
            buckets: Mutex::new(Buckets {
                map: HashMap::new(),
                swept_ms: 0,
            }),
        }
    }

    /// Takes one token from `key`'s bucket for `rate` (capacity `count`,
    /// refilled at `count` per `per_secs`). Returns `Err(retry_after_secs)`
    /// when empty. A full limiter whose buckets are all refilling keeps
    /// growing; bound the keys, or use [`RateLimiter::take_or_share`].
    ///
    /// # Errors
    /// Seconds until a token is back, at least 1.
    pub fn take(&self, key: &K, rate: Rate, now_ms: u64) -> Result<(), u64> {
        self.take_or_share(key, key, rate, now_ms)
    }

    /// Like [`RateLimiter::take`], but when the limiter is full and none
    /// of its buckets has refilled, a `key` without a bucket takes from
    /// `shared`'s instead: memory stays bounded (by the cap plus the
    /// distinct `shared` keys), and no key's partly spent bucket is ever
    /// dropped, which would hand it a fresh burst.
    ///
    /// # Errors
    /// Seconds until a token is back, at least 1.
    pub fn take_or_share(&self, key: &K, shared: &K, rate: Rate, now_ms: u64) -> Result<(), u64> {
        let capacity = f64::from(rate.count);
        let per_ms = capacity / (rate.per_secs as f64 * 1000.0);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = if buckets.map.contains_key(key) || buckets.room(now_ms) {
            key
        } else {
            shared
        };
        let bucket = buckets.map.entry(key.clone()).or_insert(Bucket {
            tokens: capacity,
            at_ms: now_ms,
            window_ms: rate.per_secs.saturating_mul(1000),
        });
        let elapsed = now_ms.saturating_sub(bucket.at_ms) as f64;
        bucket.tokens = (bucket.tokens + elapsed * per_ms).min(capacity);
        bucket.at_ms = bucket.at_ms.max(now_ms);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = (1.0 - bucket.tokens) / per_ms;
            Err(((wait_ms / 1000.0).ceil() as u64).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keys_cannot_grow_it_past_the_cap() {
        let limiter = RateLimiter::new();
        let rate = Rate {
            count: 1,
            per_secs: 1,
        };
        for key in 0..MAX_BUCKETS {
            limiter.take(&key, rate, 0).unwrap();
        }
        // Every bucket is still refilling: none may be forgotten (that
        // would hand its key a fresh burst).
        limiter.take(&MAX_BUCKETS, rate, 500).unwrap();
        assert_eq!(limiter.buckets.lock().unwrap().map.len(), MAX_BUCKETS + 1);
        assert_eq!(limiter.take(&0, rate, 500), Err(1));
        // A window later they are all full again and are dropped.
        limiter.take(&(MAX_BUCKETS + 1), rate, 2_000).unwrap();
        assert!(limiter.buckets.lock().unwrap().map.len() <= 2);
    }

    #[test]
    fn a_flood_of_new_keys_shares_one_bucket_and_resets_no_one() {
        let limiter = RateLimiter::new();
        let rate = Rate {
            count: 2,
            per_secs: 60,
        };
        // Key 0 spends its budget; the limiter fills with keys that have
        // each spent a token, so none has refilled.
        limiter.take_or_share(&0, &u64::MAX, rate, 0).unwrap();
        limiter.take_or_share(&0, &u64::MAX, rate, 0).unwrap();
        for key in 1..MAX_BUCKETS as u64 {
            limiter.take_or_share(&key, &u64::MAX, rate, 0).unwrap();
        }
        // Newcomers, even after a sweep, share one bucket: two, then none.
        let newcomer = |k: u64, at| limiter.take_or_share(&(1_000_000 + k), &u64::MAX, rate, at);
        assert_eq!(newcomer(0, 5_000), Ok(()));
        assert_eq!(newcomer(1, 5_000), Ok(()));
        assert_eq!(newcomer(2, 5_000), Err(30));
        assert_eq!(limiter.buckets.lock().unwrap().map.len(), MAX_BUCKETS + 1);
        // The spent key was kept, not forgotten: still refused.
        assert_eq!(limiter.take_or_share(&0, &u64::MAX, rate, 5_000), Err(25));
        // A window later the refilled buckets go and newcomers get their own.
        assert_eq!(newcomer(3, 61_000), Ok(()));
        assert_eq!(newcomer(3, 61_000), Ok(()));
        assert_eq!(newcomer(3, 61_000), Err(30));
        assert!(limiter.buckets.lock().unwrap().map.len() < 10);
    }

    #[test]
    fn a_burst_up_to_the_count_then_refusal_then_refill() {
        let limiter = RateLimiter::new();
        let rate = Rate {
            count: 5,
            per_secs: 1,
        };
        for _ in 0..5 {
            assert_eq!(limiter.take(&0usize, rate, 1_000), Ok(()));
        }
        assert_eq!(limiter.take(&0usize, rate, 1_000), Err(1));
        // 200 ms later one token is back.
        assert_eq!(limiter.take(&0usize, rate, 1_200), Ok(()));
        assert!(limiter.take(&0usize, rate, 1_200).is_err());
        // Keys are independent.
        assert_eq!(limiter.take(&1usize, rate, 1_200), Ok(()));
    }

    #[test]
    fn slow_rates_say_how_long_to_wait() {
        let limiter = RateLimiter::new();
        let rate = Rate {
            count: 1,
            per_secs: 60,
        };
        assert_eq!(limiter.take(&"a", rate, 0), Ok(()));
        assert_eq!(limiter.take(&"a", rate, 0), Err(60));
        assert_eq!(limiter.take(&"a", rate, 30_000), Err(30));
    }
}
