//! Time for services. Pure checks take `now` as an argument; servers hold
//! a [`Clock`] and read it once per request, so tests can set the time.

use std::sync::atomic::{AtomicU64, Ordering};

/// A source of Unix time in seconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Seconds since the Unix epoch.
    fn now(&self) -> u64;

    /// Milliseconds since the Unix epoch (for rate limits); whole seconds
    /// unless the clock knows better.
    fn now_ms(&self) -> u64 {
        self.now().saturating_mul(1000)
    }
}

/// The system's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    }

    fn now_ms(&self) -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }
}

/// A clock that only moves when told to (tests).
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock standing at `now`.
    pub fn new(now: u64) -> Self {
        Self(AtomicU64::new(now))
    }

    /// Moves the clock to `now`.
    pub fn set(&self, now: u64) {
        self.0.store(now, Ordering::SeqCst);
    }

    /// Moves the clock forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// `secs` as a person writes a duration, in the form every duration flag
/// and policy field accepts back: `48h`, `1h30m`, `90s`, `14d` (whole
/// days from a week up), `0s`. Messages use it, never bare seconds.
pub fn human_duration(secs: u64) -> String {
    if secs == 0 {
        return "0s".to_owned();
    }
    if secs >= 7 * 86_400 && secs.is_multiple_of(86_400) {
        return format!("{}d", secs / 86_400);
    }
    let (h, m, s) = (secs / 3600, secs % 3600 / 60, secs % 60);
    let mut text = String::new();
    for (n, unit) in [(h, 'h'), (m, 'm'), (s, 's')] {
        if n > 0 {
            text.push_str(&format!("{n}{unit}"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_read_as_people_write_them_and_parse_back() {
        for (secs, text) in [
            (0, "0s"),
            (90, "1m30s"),
            (300, "5m"),
            (5400, "1h30m"),
            (86_400, "24h"),
            (172_800, "48h"),
            (3661, "1h1m1s"),
            (14 * 86_400, "14d"),
        ] {
            assert_eq!(super::human_duration(secs), text);
            assert_eq!(humantime::parse_duration(text).unwrap().as_secs(), secs);
        }
    }
}
