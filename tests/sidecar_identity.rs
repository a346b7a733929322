//! The sidecar's identity against the real broker over TLS: attestation
//! with a join token, renewal before expiry with a new key, refusals and
//! an unreachable broker told apart.

use std::sync::Arc;
use std::time::Duration;
use tally::broker::{Broker, BrokerSettings};
use tally::clock::{Clock, SystemClock};
use tally::policy::Policy;
use tally::sidecar::identity::{Attestation, IdentityClient, IdentityError, keep_renewed};
use tally::store::{Sealer, Store};
use zeroize::Zeroizing;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_attests_once_and_renews_before_its_svid_expires() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(
        &dir.path().join("tally.db"),
        Sealer::from_key_material(Sealer::generate_key_text().unwrap().as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let mut settings = BrokerSettings::new(
        "example.org",
        Policy::parse("trust_domain: example.org\n").unwrap(),
    )
    .unwrap();
    // Short SVIDs so renewal (at 40–60% of the life) happens in the test.
    settings.svid_ttl = 4;
    let broker = Arc::new(
        Broker::open(settings, store, Arc::new(SystemClock))
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let certs = broker
        .server_certs(&["localhost".into()], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let b = Arc::clone(&broker);
    let server = tokio::spawn(async move {
        tally::broker::serve(b, listener, certs, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    let client = IdentityClient::new(
        format!("https://localhost:{}", addr.port()),
        broker.bundle_pem(),
    );
    let id = "spiffe://example.org/vm/build-1";
    let token = broker
        .create_join_token(&id.parse().unwrap(), 600, None)
        .await
        .unwrap();
    let how = Attestation::JoinToken(Zeroizing::new(token.expose().to_owned()));
    let first = client.attest(&how, SystemClock.now()).await.unwrap();
    assert_eq!(first.spiffe_id.as_str(), id);
    assert!(first.expires_at <= SystemClock.now() + 4);
    assert_eq!(first.bundle_pem, broker.bundle_pem());

    // The same join token again: refused, not "unreachable".
    let again = client.attest(&how, SystemClock.now()).await.unwrap_err();
    assert!(matches!(again, IdentityError::Refused(_)), "{again:?}");

    // Kept renewed: a new SVID (new key) for the same ID before expiry.
    let (updates, mut rx) = tokio::sync::watch::channel(Arc::new(first.clone()));
    let renewer = tokio::spawn(keep_renewed(client.clone(), Arc::new(SystemClock), updates));
    tokio::time::timeout(Duration::from_secs(4), rx.changed())
        .await
        .expect("renewed before the 4 s SVID expired")
        .unwrap();
    let second = Arc::clone(&rx.borrow());
    assert_eq!(second.spiffe_id, first.spiffe_id);
    assert_ne!(second.chain_pem, first.chain_pem);
    assert_ne!(*second.key_pem, *first.key_pem, "a new key each time");
    assert!(second.expires_at >= first.expires_at);
    drop(rx);
    renewer.await.unwrap();

    // No broker there: unreachable, not refused.
    let _ = stop.send(());
    server.await.unwrap();
    let err = client.renew(&second, SystemClock.now()).await.unwrap_err();
    assert!(matches!(err, IdentityError::Unreachable(_)), "{err:?}");
}
