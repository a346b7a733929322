//! The sidecar's token cache on tokio's paused clock: single flight,
//! refresh ahead, the 10% / 5 s floor, broker outages, bounds. The broker
//! side is a counting fetcher here; the sidecar's end-to-end tests drive
//! the real broker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use tally::sidecar::cache::{
    CacheConfig, CacheError, Fetch, FetchError, Fetched, TokenAsk, TokenCache,
};
use tally::token::{AccessToken, Audience, Scopes};
use tokio::time::{Instant, advance};

/// Hands out numbered tokens living `life`, after `latency`; can be
/// switched to "unreachable" or "refused".
#[derive(Debug)]
struct Broker {
    calls: AtomicU64,
    down: AtomicBool,
    refuse: AtomicBool,
    life: Duration,
    latency: Duration,
    key: Arc<tally::dpop::ProofKey>,
}

impl Broker {
    fn new(life: Duration) -> Self {
        Self {
            calls: AtomicU64::new(0),
            down: AtomicBool::new(false),
            refuse: AtomicBool::new(false),
            life,
            latency: Duration::from_millis(20),
            key: Arc::new(tally::dpop::ProofKey::generate().unwrap()),
        }
    }
}

impl Fetch for Broker {
    type Ask = TokenAsk;
    type Got = Fetched;

    async fn fetch(&self, ask: &TokenAsk) -> Result<Fetched, FetchError> {
        let scopes = &ask.scopes;
        tokio::time::sleep(self.latency).await;
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.down.load(Ordering::SeqCst) {
            return Err(FetchError::Unreachable("connection refused".into()));
        }
        if self.refuse.load(Ordering::SeqCst) {
            return Err(FetchError::Refused("scope x is not granted".into()));
        }
        Ok(Fetched {
            token: Arc::new(AccessToken::new(format!("token-{n}"))),
            expires_in: self.life,
            scopes: scopes.clone(),
            jti: format!("jti-{n}"),
            kid: "k1".into(),
            issued_at: 0,
            key: Arc::clone(&self.key),
        })
    }
}

fn aud(s: &str) -> Audience {
    s.parse().unwrap()
}

fn scopes() -> Scopes {
    "payments:charge".parse().unwrap()
}

fn setup(life: u64) -> (Arc<Broker>, Arc<TokenCache<Arc<Broker>>>) {
    let broker = Arc::new(Broker::new(Duration::from_secs(life)));
    let cache = TokenCache::new(Arc::clone(&broker), CacheConfig::default());
    (broker, cache)
}

#[tokio::test(start_paused = true)]
async fn a_thousand_concurrent_callers_cause_one_broker_call() {
    let (broker, cache) = setup(300);
    let a = aud("spiffe://example.org/ns/pay/sa/payments");
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let cache = Arc::clone(&cache);
            let a = a.clone();
            tokio::spawn(async move { cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap().jti })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), "jti-1");
    }
    assert_eq!(broker.calls.load(Ordering::SeqCst), 1);
    assert_eq!(cache.stats().misses.load(Ordering::SeqCst), 1000);
    // Afterwards: hits, no more calls.
    cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap();
    assert_eq!(cache.stats().hits.load(Ordering::SeqCst), 1);
    assert_eq!(broker.calls.load(Ordering::SeqCst), 1);
}

/// Calls `cache` once a second from a fresh token on and returns the
/// second at which it started its background refresh; every call before
/// it got the first token without a broker call, and none waited.
async fn refresh_point(broker: &Broker, cache: &Arc<TokenCache<Arc<Broker>>>) -> u64 {
    let a = aud("spiffe://example.org/ns/pay/sa/payments");
    let first = cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap();
    for second in 1..300 {
        advance(Duration::from_secs(1)).await;
        let t0 = Instant::now();
        let got = cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap();
        assert_eq!(t0.elapsed(), Duration::ZERO, "no wait on the broker");
        assert_eq!(got.jti, first.jti, "at {second} s");
        if cache.stats().refreshes.load(Ordering::SeqCst) == 1 {
            return second;
        }
        assert_eq!(broker.calls.load(Ordering::SeqCst), 1, "at {second} s");
    }
    panic!("never refreshed");
}

#[tokio::test(start_paused = true)]
async fn tokens_are_refreshed_ahead_and_callers_never_wait_or_get_a_stale_one() {
    let (broker, cache) = setup(300);
    let a = aud("spiffe://example.org/ns/pay/sa/payments");
    // The cache picks the point: 80% of the life ± 5%, so between 225 s
    // and 255 s of a 300 s token (whole seconds: the first call at or past
    // it starts the refresh).
    let at = refresh_point(&broker, &cache).await;
    assert!((225..=256).contains(&at), "refreshed at {at} s");
    // The one background fetch lands; later callers see it, without
    // another call.
    tokio::time::sleep(Duration::from_millis(50)).await;
    for _ in 0..10 {
        assert_eq!(
            cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap().jti,
            "jti-2"
        );
    }
    assert_eq!(broker.calls.load(Ordering::SeqCst), 2);
    assert_eq!(cache.stats().refreshes.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn sidecars_started_together_do_not_refresh_together() {
    let mut points = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let (broker, cache) = setup(300);
        points.insert(refresh_point(&broker, &cache).await);
    }
    assert!(
        points.len() >= 5,
        "20 caches refreshed at only {points:?} (a ±15 s jitter spreads them)"
    );
    assert!(points.iter().all(|p| (225..=256).contains(p)), "{points:?}");
}

#[tokio::test(start_paused = true)]
async fn while_the_broker_is_down_cached_tokens_serve_until_the_floor_then_a_clear_error() {
    let (broker, cache) = setup(300);
    let a = aud("spiffe://example.org/ns/pay/sa/payments");
    cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap();
    broker.down.store(true, Ordering::SeqCst);
    // Due for refresh; the refresh fails; the token still has > 30 s.
    advance(Duration::from_secs(260)).await;
    assert_eq!(
        cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap().jti,
        "jti-1"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    let down_at = cache.unreachable_since().expect("the failure is recorded");
    assert_eq!(
        cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap().jti,
        "jti-1"
    );
    // 10% of 300 s is the floor: at 271 s the token is not handed out.
    advance(Duration::from_secs(11)).await;
    let err = cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap_err();
    let CacheError::Unreachable { since, reason } = &err else {
        panic!("{err:?}")
    };
    assert_eq!(*since, down_at, "since the first failure");
    assert!(reason.contains("connection refused"));
    assert!(err.to_string().contains("unreachable for 11s"), "{err}");
    // Back up: the next caller gets a fresh token and the outage is over.
    broker.down.store(false, Ordering::SeqCst);
    assert!(cache.get(&TokenAsk::new(&a, &scopes())).await.is_ok());
    assert_eq!(cache.unreachable_since(), None);
}

#[tokio::test(start_paused = true)]
async fn a_short_lived_token_keeps_five_seconds_in_hand() {
    // 10% of 20 s is 2 s; the 5 s floor wins.
    let (broker, cache) = setup(20);
    let a = aud("spiffe://example.org/ns/pay/sa/payments");
    cache.get(&TokenAsk::new(&a, &scopes())).await.unwrap();
    broker.down.store(true, Ordering::SeqCst);
    advance(Duration::from_millis(15_500)).await;
    assert!(matches!(
        cache.get(&TokenAsk::new(&a, &scopes())).await,
        Err(CacheError::Unreachable { .. })
    ));
}

#[tokio::test(start_paused = true)]
async fn a_refusal_is_passed_on_and_is_not_an_outage() {
    let (broker, cache) = setup(300);
    broker.refuse.store(true, Ordering::SeqCst);
    let err = cache
        .get(&TokenAsk::new(&aud("spiffe://example.org/x"), &scopes()))
        .await
        .unwrap_err();
    assert_eq!(err, CacheError::Refused("scope x is not granted".into()));
    assert_eq!(cache.unreachable_since(), None);
    assert!(cache.is_empty(), "nothing kept for a refused key");
}

#[tokio::test(start_paused = true)]
async fn the_cache_is_bounded_and_evicts_the_soonest_to_expire() {
    let broker = Arc::new(Broker::new(Duration::from_secs(300)));
    let config = CacheConfig {
        capacity: 3,
        ..CacheConfig::default()
    };
    let cache = TokenCache::new(Arc::clone(&broker), config);
    for i in 0..5 {
        cache
            .get(&TokenAsk::new(
                &aud(&format!("spiffe://example.org/svc/{i}")),
                &scopes(),
            ))
            .await
            .unwrap();
        advance(Duration::from_secs(1)).await;
    }
    assert_eq!(cache.len(), 3);
    // The oldest (soonest to expire) went: asking again calls the broker.
    let before = broker.calls.load(Ordering::SeqCst);
    cache
        .get(&TokenAsk::new(
            &aud("spiffe://example.org/svc/0"),
            &scopes(),
        ))
        .await
        .unwrap();
    assert_eq!(broker.calls.load(Ordering::SeqCst), before + 1);
    cache
        .get(&TokenAsk::new(
            &aud("spiffe://example.org/svc/4"),
            &scopes(),
        ))
        .await
        .unwrap();
    assert_eq!(
        broker.calls.load(Ordering::SeqCst),
        before + 1,
        "the newest stayed"
    );
}
