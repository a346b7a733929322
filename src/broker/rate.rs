//! Token buckets for per-rule issuance limits. Pure: the caller passes
//! `now` in milliseconds.

use crate::policy::Rate;
use std::collections::HashMap;
use std::sync::Mutex;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: u64,
}

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
        let bucket = buckets.entry(key.clone()).or_insert(Bucket {
            tokens: capacity,
            at_ms: now_ms,
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
