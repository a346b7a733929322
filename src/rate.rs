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

/// Most buckets kept; past it, buckets that have refilled (the same as a
/// new one) are dropped, so a stream of distinct keys cannot grow memory.
const MAX_BUCKETS: usize = 65_536;

/// Buckets by key (an issue rule's index, or a caller).
#[derive(Debug, Default)]
pub struct RateLimiter<K> {
    buckets: Mutex<HashMap<K, Bucket>>,
}

impl<K: std::hash::Hash + Eq + Clone> RateLimiter<K> {
    /// An empty limiter.
    pub fn new() -> Self {
        Self {
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes one token from `key`'s bucket for `rate` (capacity `count`,
    /// refilled at `count` per `per_secs`). Returns `Err(retry_after_secs)`
    /// when empty.
    ///
    /// # Errors
    /// Seconds until a token is back, at least 1.
    pub fn take(&self, key: &K, rate: Rate, now_ms: u64) -> Result<(), u64> {
        let capacity = f64::from(rate.count);
        let per_ms = capacity / (rate.per_secs as f64 * 1000.0);
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            // A bucket idle for its whole window is full again.
            buckets.retain(|_, b| now_ms.saturating_sub(b.at_ms) < b.window_ms);
        }
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
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
        assert_eq!(limiter.buckets.lock().unwrap().len(), MAX_BUCKETS + 1);
        assert_eq!(limiter.take(&0, rate, 500), Err(1));
        // A window later they are all full again and are dropped.
        limiter.take(&(MAX_BUCKETS + 1), rate, 2_000).unwrap();
        assert!(limiter.buckets.lock().unwrap().len() <= 2);
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
