//! The sidecar's identity against the real broker over TLS: attestation
//! with a join token, renewal before expiry with a new key, refusals and
//! an unreachable broker told apart.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::broker::{serve_broker, serve_broker_on, settings};
use tally::clock::{Clock, SystemClock};
use tally::sidecar::identity::{Attestation, IdentityClient, IdentityError, keep_renewed};
use tally::store::Sealer;
use zeroize::Zeroizing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_attests_once_and_renews_before_its_svid_expires() {
    let dir = tempfile::tempdir().unwrap();
    let mut svids = settings("trust_domain: example.org\n");
    svids.svid_ttl = 600;
    let key = Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, svids, "127.0.0.1:0").await;
    let broker = Arc::clone(&served.broker);
    let client = IdentityClient::new(served.url(), broker.bundle_pem());
    let id = "spiffe://example.org/vm/build-1";
    let token = broker
        .create_join_token(&id.parse().unwrap(), 600, None)
        .await
        .unwrap();
    let how = Attestation::JoinToken(Zeroizing::new(token.expose().to_owned()));
    let first = client.attest(&how, SystemClock.now()).await.unwrap();
    assert_eq!(first.spiffe_id.as_str(), id);
    assert_eq!(first.expires_at - first.issued_at, 600);
    assert_eq!(first.bundle_pem, broker.bundle_pem());
    // The broker says where Tokens.Issue proofs must point.
    assert_eq!(first.issue_htu(), broker.issue_uri());

    // The same join token again: refused, not "unreachable".
    let again = client.attest(&how, SystemClock.now()).await.unwrap_err();
    assert!(matches!(again, IdentityError::Refused(_)), "{again:?}");

    // Kept renewed, on a clock the test sets (renewal is due at 40–60% of
    // the life; `renew_at` is unit-tested). Early in the life: nothing.
    let renewer = |clock: tally::clock::ManualClock| {
        let (updates, rx) = tokio::sync::watch::channel(Arc::new(first.clone()));
        let task = tokio::spawn(keep_renewed(client.clone(), Arc::new(clock), updates, None));
        (rx, task)
    };
    let (mut rx, early) = renewer(tally::clock::ManualClock::new(first.issued_at + 60));
    // It sleeps at least 180 s before the window; half a second of
    // silence is a margin of 360 times the other way.
    let quiet = tokio::time::timeout(Duration::from_millis(500), rx.changed()).await;
    assert!(quiet.is_err(), "renewed at 10% of the life");
    drop(rx);
    early.await.unwrap();
    // Past the window, before expiry: a new SVID (new key) for the same ID
    // at once. The bound is for one renewal round trip on loopback.
    let (mut rx, late) = renewer(tally::clock::ManualClock::new(first.issued_at + 361));
    tokio::time::timeout(Duration::from_secs(20), rx.changed())
        .await
        .expect("renewed once due")
        .unwrap();
    let second = Arc::clone(&rx.borrow());
    assert_eq!(second.spiffe_id, first.spiffe_id);
    assert_ne!(second.chain_pem, first.chain_pem);
    assert_ne!(*second.key_pem, *first.key_pem, "a new key each time");
    assert!(second.expires_at >= first.expires_at);
    drop(rx);
    late.await.unwrap();

    // No broker there: unreachable, not refused.
    served.stop().await;
    let err = client.renew(&second, SystemClock.now()).await.unwrap_err();
    assert!(matches!(err, IdentityError::Unreachable(_)), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_contact_waits_for_a_broker_that_is_not_up_yet() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let policy = "trust_domain: example.org\n";
    // The broker's CA and a join token exist; then the broker goes down.
    let served = serve_broker(dir.path(), &key, settings(policy), "127.0.0.1:0").await;
    let bundle = served.broker.bundle_pem();
    let id = "spiffe://example.org/vm/late-1";
    let token = served
        .broker
        .create_join_token(&id.parse().unwrap(), 600, None)
        .await
        .unwrap();
    served.stop().await;
    // A port where, at first, whoever connects is hung up on.
    let blocker = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("https://localhost:{}", blocker.local_addr().unwrap().port());

    // The sidecar starts first and keeps trying...
    let how = Attestation::JoinToken(Zeroizing::new(token.expose().to_owned()));
    let client = IdentityClient::new(url, bundle);
    let attesting =
        tokio::spawn(async move { tally::sidecar::run::attest(&client, &how, &SystemClock).await });
    // ...its first attempt fails (we hang up), then it gets its SVID from
    // the broker started afterwards on the same address.
    let (conn, _) = blocker.accept().await.unwrap();
    drop(conn);
    let again = serve_broker_on(dir.path(), &key, settings(policy), blocker).await;
    let svid = tokio::time::timeout(Duration::from_secs(10), attesting)
        .await
        .expect("attested once the broker was up")
        .unwrap()
        .unwrap();
    assert_eq!(svid.spiffe_id.as_str(), id);
    again.stop().await;
}
