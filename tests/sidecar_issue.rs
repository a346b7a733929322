//! The sidecar's token cache filled by the real broker over mTLS gRPC:
//! one issuance for many callers, tokens bound to the sidecar's key,
//! refusals passed on, and cached tokens outliving a broker outage.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::broker::{channel_as, serve_broker, settings};
use tally::clock::{Clock, SystemClock};
use tally::dpop::ProofKey;
use tally::sidecar::cache::{CacheConfig, CacheError, TokenAsk, TokenCache};
use tally::sidecar::issuer::BrokerIssuer;
use tally::store::Sealer;
use tally::token::{TokenConfig, verify};

const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
const POLICY: &str = include_str!("fixtures/policy.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cache_gets_bound_tokens_from_the_broker_once_and_rides_out_an_outage() {
    let dir = tempfile::tempdir().unwrap();
    let key_text = Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key_text, settings(POLICY), "127.0.0.1:0").await;
    let broker = Arc::clone(&served.broker);
    let channel = channel_as(&served, CHECKOUT);
    let key = Arc::new(ProofKey::generate().unwrap());
    let issuer = BrokerIssuer::new(
        channel,
        Arc::clone(&key),
        broker.issue_uri().to_owned(),
        Arc::new(SystemClock),
    );
    let cache = TokenCache::new(issuer, CacheConfig::default());
    let payments: tally::token::Audience = PAYMENTS.parse().unwrap();
    let charge: tally::token::Scopes = "payments:charge".parse().unwrap();

    // 200 callers at once: one issuance.
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            let (cache, payments, charge) = (Arc::clone(&cache), payments.clone(), charge.clone());
            tokio::spawn(
                async move { cache.get(&TokenAsk::new(&payments, &charge)).await.unwrap() },
            )
        })
        .collect();
    let mut jtis = std::collections::HashSet::new();
    for t in tasks {
        jtis.insert(t.await.unwrap().jti);
    }
    assert_eq!(jtis.len(), 1);
    let now = SystemClock.now();
    assert_eq!(broker.store().live_tokens(now, 10).await.unwrap().len(), 1);

    // Bound to the sidecar's key, for the caller, with the scope asked for.
    let fetched = cache.get(&TokenAsk::new(&payments, &charge)).await.unwrap();
    let config = TokenConfig::new(broker.issuer(), payments.clone());
    let claims = verify(
        fetched.token.expose(),
        &broker.jwks(),
        &config,
        now,
        &mut (),
    )
    .unwrap();
    assert_eq!(claims.jkt, key.thumbprint());
    assert_eq!(claims.sub.as_str(), CHECKOUT);
    assert_eq!(fetched.scopes.to_string(), "payments:charge");
    let life = fetched.expires_in;
    assert!(
        life > Duration::from_secs(290) && life <= Duration::from_secs(300),
        "{life:?}"
    );

    // A scope the policy does not grant: refused, naming it; not an outage.
    let refund: tally::token::Scopes = "payments:refund".parse().unwrap();
    let err = cache
        .get(&TokenAsk::new(&payments, &refund))
        .await
        .unwrap_err();
    let CacheError::Refused(why) = &err else {
        panic!("{err:?}")
    };
    assert!(why.contains("payments:refund"), "{why}");
    assert_eq!(cache.unreachable_since(), None);

    // The broker goes away: the cached token is still served; a new key
    // cannot be filled and says the broker is unreachable.
    served.stop().await;
    assert_eq!(
        cache
            .get(&TokenAsk::new(&payments, &charge))
            .await
            .unwrap()
            .jti,
        fetched.jti
    );
    let read: tally::token::Scopes = "payments:read".parse().unwrap();
    let err = cache
        .get(&TokenAsk::new(&payments, &read))
        .await
        .unwrap_err();
    assert!(matches!(err, CacheError::Unreachable { .. }), "{err:?}");
    assert!(cache.unreachable_since().is_some());
}
