//! The sidecar's token cache: one token per thing asked for (a DPoP-bound
//! access token per audience and scope set, a JWT-SVID per audience set,
//! the one WIT),
//! refreshed ahead of expiry so callers never wait on the broker in the
//! common case. What is asked for and what comes back are the fetcher's
//! ([`Fetch::Ask`], [`Fetch::Got`]); the timing is the cache's.
//!
//! - Refresh at 80% of a token's life, jittered by ±5% of the life so a
//!   fleet started together does not refresh together. A caller that
//!   arrives after that point still gets the cached token at once; one
//!   background fetch replaces it.
//! - Single flight: however many callers find no usable token, one fetch
//!   goes to the broker and they all get its result.
//! - Never hands out a token with less than 10% of its life or 5 s left.
//! - While the broker is unreachable, cached tokens keep being served until
//!   they reach that floor; then callers get [`CacheError::Unreachable`]
//!   saying since when.
//! - Bounded: when full, expired entries go first, then the one expiring
//!   soonest.
//! - A fetcher may call a cached token outdated ([`Fetch::outdated`]: a
//!   WIT for the key before an SVID renewal): it is fetched anew before it
//!   is handed out, and serves only while the broker is unreachable.
//!
//! Time is tokio's clock, so tests run with `start_paused`.

use super::jitter::random_unit;
use crate::token::{AccessToken, Audience, Scopes};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// A token as the broker returned it.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The token.
    pub token: Arc<AccessToken>,
    /// How long it is valid from now.
    pub expires_in: Duration,
    /// The scopes it carries (the broker may narrow an empty request).
    pub scopes: Scopes,
    /// Its `jti`.
    pub jti: String,
    /// The id of the key that signed it.
    pub kid: String,
    /// When it was issued (Unix seconds, as the fetcher saw it).
    pub issued_at: u64,
    /// The DPoP key it is bound to: proofs for it are signed with this key,
    /// which lives as long as some cached token needs it (the sidecar's
    /// current key changes with its SVID).
    pub key: Arc<crate::dpop::ProofKey>,
}

impl Fetched {
    /// Whether a revocation in `set` covers this token, held by `holder`.
    pub fn revoked_by(
        &self,
        set: &crate::token::RevocationSet,
        holder: &crate::identity::SpiffeId,
    ) -> bool {
        let jkt = self.key.thumbprint();
        set.covers(&crate::token::TokenRef {
            jti: &self.jti,
            sub: holder,
            jkt: Some(&jkt),
            kid: &self.kid,
            iat: self.issued_at,
        })
    }
}

/// Why the broker gave no token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The broker could not be reached or failed (retry later).
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    /// The broker refused (policy, bad request): no retry will help.
    #[error("{0}")]
    Refused(String),
}

impl Expiring for Fetched {
    fn expires_in(&self) -> Duration {
        self.expires_in
    }
}

/// What a caller asks for an access token: one cache entry each.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TokenAsk {
    /// The audience.
    pub audience: Audience,
    /// The scopes (sorted, so equal sets are one entry).
    pub scopes: Scopes,
}

impl TokenAsk {
    /// An ask for a token for `audience` with `scopes`.
    pub fn new(audience: &Audience, scopes: &Scopes) -> Self {
        Self {
            audience: audience.clone(),
            scopes: scopes.clone(),
        }
    }
}

/// A token's remaining life as the fetcher received it.
pub trait Expiring {
    /// How long it is valid from when it arrived.
    fn expires_in(&self) -> Duration;
}

/// Gets tokens from the broker.
pub trait Fetch: Send + Sync + 'static {
    /// What a caller asks for; one cache entry per distinct value.
    type Ask: Clone + Eq + std::hash::Hash + Send + Sync + 'static;
    /// What the broker answers with.
    type Got: Expiring + Clone + Send + Sync + 'static;

    /// Asks the broker for `ask`.
    fn fetch(&self, ask: &Self::Ask) -> impl Future<Output = Result<Self::Got, FetchError>> + Send;

    /// Whether a cached `got` with life left must be replaced before it is
    /// handed out again (a WIT bound to a key the sidecar no longer uses):
    /// the cache then fetches anew, one fetch for all callers, and serves
    /// `got` only while the broker cannot be reached. None is, unless the
    /// fetcher says so.
    fn outdated(&self, got: &Self::Got) -> bool {
        let _ = got;
        false
    }
}

impl<T: Fetch> Fetch for Arc<T> {
    type Ask = T::Ask;
    type Got = T::Got;

    fn fetch(&self, ask: &Self::Ask) -> impl Future<Output = Result<Self::Got, FetchError>> + Send {
        (**self).fetch(ask)
    }

    fn outdated(&self, got: &Self::Got) -> bool {
        (**self).outdated(got)
    }
}

/// A fetcher of DPoP-bound access tokens (what the local API and the
/// outbound proxy use).
pub trait FetchTokens: Fetch<Ask = TokenAsk, Got = Fetched> {}

impl<T: Fetch<Ask = TokenAsk, Got = Fetched>> FetchTokens for T {}

/// Why the cache has no token to give.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The broker is unreachable and no cached token has enough life left.
    #[error("the broker has been unreachable for {} ({reason}); no cached token has enough life left", crate::clock::human_duration(since.elapsed().as_secs()))]
    Unreachable {
        /// When fetches started failing.
        since: Instant,
        /// The last failure.
        reason: String,
    },
    /// The broker refused the request.
    #[error("the broker refused: {0}")]
    Refused(String),
}

/// Hit, miss and refresh counts.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Answered from the cache.
    pub hits: AtomicU64,
    /// Had to wait for the broker.
    pub misses: AtomicU64,
    /// Background refreshes started.
    pub refreshes: AtomicU64,
    /// Fetches that failed.
    pub fetch_errors: AtomicU64,
}

/// Cache settings.
#[derive(Debug, Clone, Copy)]
pub struct CacheConfig {
    /// Most entries kept.
    pub capacity: usize,
    /// Refresh at this fraction of a token's life.
    pub refresh_at: f64,
    /// ± this fraction of the life, at random, on the refresh point.
    pub jitter: f64,
    /// Never hand out a token with less than this fraction of its life…
    pub min_left_fraction: f64,
    /// …or less than this much time left.
    pub min_left: Duration,
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            capacity: 1024,
            refresh_at: 0.8,
            jitter: 0.05,
            min_left_fraction: 0.1,
            min_left: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone)]
struct Entry<T> {
    fetched: T,
    expires: Instant,
    refresh: Instant,
    floor: Duration,
}

impl<T> Entry<T> {
    fn usable(&self, now: Instant) -> bool {
        self.expires.saturating_duration_since(now) >= self.floor
    }
}

#[derive(Debug)]
struct Slot<T> {
    entry: Option<Entry<T>>,
    /// Held while a fetch for this key is in flight (single flight).
    fetching: Arc<tokio::sync::Mutex<()>>,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self {
            entry: None,
            fetching: Arc::default(),
        }
    }
}

/// The token cache.
#[derive(Debug)]
pub struct TokenCache<F: Fetch> {
    fetcher: F,
    config: CacheConfig,
    slots: Mutex<HashMap<F::Ask, Slot<F::Got>>>,
    down_since: Mutex<Option<(Instant, String)>>,
    stats: CacheStats,
}

impl<F: Fetch> TokenCache<F> {
    /// An empty cache over `fetcher`.
    pub fn new(fetcher: F, config: CacheConfig) -> Arc<Self> {
        Arc::new(Self {
            fetcher,
            config,
            slots: Mutex::new(HashMap::new()),
            down_since: Mutex::new(None),
            stats: CacheStats::default(),
        })
    }

    /// Counts so far.
    pub fn stats(&self) -> &CacheStats {
        &self.stats
    }

    /// Since when the broker has been unreachable, if it is.
    pub fn unreachable_since(&self) -> Option<Instant> {
        self.lock_down().as_ref().map(|(at, _)| *at)
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, HashMap<F::Ask, Slot<F::Got>>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_down(&self) -> std::sync::MutexGuard<'_, Option<(Instant, String)>> {
        self.down_since
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A token for `ask`: from the cache when it has one with enough life
    /// left (starting a background refresh when due), else from the
    /// broker, one fetch for all concurrent callers.
    ///
    /// # Errors
    /// [`CacheError`].
    pub async fn get(self: &Arc<Self>, ask: &F::Ask) -> Result<F::Got, CacheError> {
        let key = ask;
        let now = Instant::now();
        let (cached, lock) = {
            let mut slots = self.lock_slots();
            let slot = slots.entry(key.clone()).or_default();
            (slot.entry.clone(), Arc::clone(&slot.fetching))
        };
        if let Some(entry) = cached.filter(|e| self.serves(e, now)) {
            self.stats.hits.fetch_add(1, Ordering::Relaxed);
            if now >= entry.refresh {
                self.refresh_in_background(key.clone(), lock);
            }
            return Ok(entry.fetched);
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let _flight = lock.lock().await;
        // Whoever held the lock may have just fetched it.
        let now = Instant::now();
        if let Some(entry) = self.cached(key).filter(|e| self.serves(e, now)) {
            return Ok(entry.fetched);
        }
        self.fetch_and_store(key).await
    }

    /// Whether `entry` may be handed out at `now` without asking the
    /// broker: enough life left, and not outdated (see [`Fetch::outdated`];
    /// an outdated one still serves while the broker is unreachable).
    fn serves(&self, entry: &Entry<F::Got>, now: Instant) -> bool {
        entry.usable(now) && !self.fetcher.outdated(&entry.fetched)
    }

    fn cached(&self, key: &F::Ask) -> Option<Entry<F::Got>> {
        self.lock_slots().get(key).and_then(|s| s.entry.clone())
    }

    fn refresh_in_background(self: &Arc<Self>, key: F::Ask, lock: Arc<tokio::sync::Mutex<()>>) {
        // Already in flight: nothing to do.
        let Ok(flight) = lock.try_lock_owned() else {
            return;
        };
        self.stats.refreshes.fetch_add(1, Ordering::Relaxed);
        let cache = Arc::clone(self);
        tokio::spawn(async move {
            let _flight = flight;
            // A failure is recorded (unreachable_since); the cached token
            // keeps serving until its floor, and the next caller retries.
            let _ = cache.fetch_and_store(&key).await;
        });
    }

    async fn fetch_and_store(&self, key: &F::Ask) -> Result<F::Got, CacheError> {
        match self.fetcher.fetch(key).await {
            Ok(fetched) => {
                *self.lock_down() = None;
                let entry = self.entry_for(fetched.clone());
                self.store(key, entry);
                Ok(fetched)
            }
            Err(FetchError::Refused(why)) => {
                self.forget_empty(key);
                Err(CacheError::Refused(why))
            }
            Err(FetchError::Unreachable(why)) => {
                self.stats.fetch_errors.fetch_add(1, Ordering::Relaxed);
                let since = {
                    let mut down = self.lock_down();
                    let since = down.as_ref().map_or_else(Instant::now, |(at, _)| *at);
                    *down = Some((since, why.clone()));
                    since
                };
                // A token that is due for refresh but still above its floor
                // is better than none.
                let now = Instant::now();
                let usable = self.cached(key).filter(|e| e.usable(now));
                if usable.is_none() {
                    self.forget_empty(key);
                }
                usable
                    .map(|e| e.fetched)
                    .ok_or(CacheError::Unreachable { since, reason: why })
            }
        }
    }

    fn entry_for(&self, fetched: F::Got) -> Entry<F::Got> {
        let now = Instant::now();
        let life = fetched.expires_in();
        let jitter = (random_unit() * 2.0 - 1.0) * self.config.jitter;
        let refresh_after = life.mul_f64((self.config.refresh_at + jitter).clamp(0.0, 1.0));
        let floor = life
            .mul_f64(self.config.min_left_fraction)
            .max(self.config.min_left);
        Entry {
            expires: now + life,
            refresh: now + refresh_after,
            floor,
            fetched,
        }
    }

    fn store(&self, key: &F::Ask, entry: Entry<F::Got>) {
        let mut slots = self.lock_slots();
        let new = slots.get(key).is_none_or(|s| s.entry.is_none());
        let filled = slots.values().filter(|s| s.entry.is_some()).count();
        if new && filled >= self.config.capacity {
            let now = Instant::now();
            // Unusable entries go first, then the one expiring soonest.
            let victim = slots
                .iter()
                .filter(|(k, s)| *k != key && s.entry.is_some())
                .min_by_key(|(_, s)| s.entry.as_ref().map(|e| (e.usable(now), e.expires)))
                .map(|(k, _)| k.clone());
            if let Some(victim) = victim {
                slots.remove(&victim);
            }
        }
        slots.entry(key.clone()).or_default().entry = Some(entry);
    }

    /// Drops the slot for `key` if it holds no token (after a failed
    /// fetch), so refused or failed keys do not pile up.
    fn forget_empty(&self, key: &F::Ask) {
        let mut slots = self.lock_slots();
        if slots.get(key).is_some_and(|s| s.entry.is_none()) {
            slots.remove(key);
        }
    }

    /// Drops every cached token `revoked` says is revoked (after a
    /// revocation arrives); the next caller gets a new one. Returns how
    /// many were dropped.
    pub fn forget_where(&self, revoked: impl Fn(&F::Got) -> bool) -> usize {
        let mut slots = self.lock_slots();
        let before = slots.len();
        slots.retain(|_, s| !s.entry.as_ref().is_some_and(|e| revoked(&e.fetched)));
        before - slots.len()
    }

    /// How many entries are cached.
    pub fn len(&self) -> usize {
        self.lock_slots()
            .values()
            .filter(|s| s.entry.is_some())
            .count()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
