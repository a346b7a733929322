//! The sidecar following the broker's Watch stream over mTLS: the state
//! at once, live changes, and a broker restart survived by resuming after
//! the last sequence number.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::broker::{channel_as, serve_broker, settings};
use support::partition::Partition;
use tally::clock::SystemClock;
use tally::sidecar::watch::{MeshState, follow};
use tally::store::Sealer;

async fn until(
    rx: &mut tokio::sync::watch::Receiver<MeshState>,
    what: &str,
    f: impl Fn(&MeshState) -> bool,
) -> MeshState {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_follows_changes_and_resumes_after_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let policy = "trust_domain: example.org\n";
    let served = serve_broker(dir.path(), &key, settings(policy), "127.0.0.1:0").await;
    // The sidecar reaches the broker through a forwarder with a fixed
    // address, so the restarted broker need not take back its old port
    // (another test may have it by then).
    let front = Partition::start(served.addr).await;
    let channel = support::broker::channel_via(
        &served,
        "spiffe://example.org/ns/shop/sa/checkout",
        front.addr,
    );
    let (state, mut rx) = tokio::sync::watch::channel(MeshState::default());
    let follower = tokio::spawn(follow(
        move || channel.clone(),
        Arc::new(SystemClock),
        state,
    ));

    let first = until(&mut rx, "the initial state", MeshState::ready).await;
    assert_eq!(first.jwks.as_ref().unwrap().len(), 1);
    assert!(first.connected);

    // A rotation arrives live, with a higher sequence number.
    served.broker.rotate_signing_key(300, None).await.unwrap();
    let rotated = until(&mut rx, "the rotation", |s| {
        s.jwks.as_ref().is_some_and(|j| j.len() == 2)
    })
    .await;
    assert!(rotated.sequence > first.sequence);

    // The broker goes away: the follower notices, keeps what it knows.
    served.stop().await;
    let down = until(&mut rx, "the disconnect", |s| !s.connected).await;
    assert_eq!(down.sequence, rotated.sequence);
    assert!(down.ready(), "verification keeps working on the last state");

    // Back on the same store, with a change made before anyone reconnects:
    // the follower resumes after its last sequence and gets just that.
    front.cut();
    let again = serve_broker(dir.path(), &key, settings(policy), "127.0.0.1:0").await;
    again.broker.rotate_signing_key(300, None).await.unwrap();
    front.retarget(again.addr);
    front.heal();
    let resumed = until(&mut rx, "the change made while away", |s| {
        s.connected && s.jwks.as_ref().is_some_and(|j| j.len() == 3)
    })
    .await;
    assert!(resumed.sequence > rotated.sequence);

    drop(rx);
    again.stop().await;
    follower.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_receives_only_its_own_access_rules_and_their_changes() {
    const POLICY: &str = include_str!("fixtures/policy.yaml");
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings(POLICY), "127.0.0.1:0").await;
    let payments = "spiffe://example.org/ns/pay/sa/payments";
    let channel = channel_as(&served, payments);
    let (state, mut rx) = tokio::sync::watch::channel(MeshState::default());
    let follower = tokio::spawn(follow(
        move || channel.clone(),
        Arc::new(SystemClock),
        state,
    ));

    let first = until(&mut rx, "the access rules", |s| s.access.is_some()).await;
    let (version, access) = first.access.clone().unwrap();
    assert!(access.issue.is_empty(), "issue rules stay at the broker");
    assert_eq!(access.access.len(), 1, "only the rule protecting payments");
    assert_eq!(access.access[0].workload.to_string(), payments);

    // An applied policy version reaches the sidecar without a restart.
    let tightened = POLICY.replace("methods: [POST]", "methods: [PUT]");
    let admin = "spiffe://example.org/admin".parse().unwrap();
    let change = served
        .broker
        .apply_policy(&tightened, &admin, "POST only was too wide")
        .await
        .unwrap();
    // The policy the broker started with is stored version 1 (every
    // policy served is a stored version): the change is one line.
    let started_with = served.broker.store().policy_version(Some(1)).await.unwrap();
    assert_eq!(started_with.map(|v| v.yaml).as_deref(), Some(POLICY));
    assert_eq!(change.version, 2);
    assert_eq!((change.diff.added, change.diff.removed), (1, 1));
    let next = until(&mut rx, "the changed rules", |s| {
        s.access.as_ref().is_some_and(|(v, _)| *v > version)
    })
    .await;
    let (_, access) = next.access.unwrap();
    assert_eq!(access.access[0].allow[0].methods, ["PUT"]);

    drop(rx);
    served.stop().await;
    follower.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_cut_off_from_the_broker_catches_up_on_the_revocations_it_missed() {
    use tally::token::RevocationTarget;
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let served = serve_broker(
        dir.path(),
        &key,
        settings("trust_domain: example.org\n"),
        "127.0.0.1:0",
    )
    .await;
    let partition = Partition::start(served.addr).await;
    let channel = support::broker::channel_via(
        &served,
        "spiffe://example.org/ns/pay/sa/payments",
        partition.addr,
    );
    let (state, mut rx) = tokio::sync::watch::channel(MeshState::default());
    let follower = tokio::spawn(follow(
        move || channel.clone(),
        Arc::new(SystemClock),
        state,
    ));
    until(&mut rx, "the initial state", |s| s.ready() && s.connected).await;

    partition.cut();
    until(&mut rx, "the partition", |s| !s.connected).await;
    // Revocations committed while this sidecar cannot hear them.
    let admin = "spiffe://example.org/admin".parse().unwrap();
    let thief: tally::identity::SpiffeId =
        "spiffe://example.org/ns/shop/sa/checkout".parse().unwrap();
    for target in [
        RevocationTarget::Subject(thief.clone()),
        RevocationTarget::Kid("leaked-kid".into()),
    ] {
        served
            .broker
            .revoke(target, None, "", &admin)
            .await
            .unwrap();
    }
    assert_eq!(rx.borrow().revocations_seen, 0);

    partition.heal();
    let caught_up = until(&mut rx, "the missed revocations", |s| {
        s.connected && s.revocations.len() == 2
    })
    .await;
    let jkt = tally::dpop::ProofKey::generate().unwrap().thumbprint();
    let now = tally::clock::Clock::now(&SystemClock);
    let covered = |sub: &tally::identity::SpiffeId, kid: &str| {
        caught_up.revocations.covers(&tally::token::TokenRef {
            jti: "j",
            sub,
            jkt: Some(&jkt),
            kid,
            iat: now - 5,
        })
    };
    assert!(covered(&thief, "k1"), "the workload's tokens");
    assert!(covered(
        &"spiffe://example.org/ns/x/sa/y".parse().unwrap(),
        "leaked-kid"
    ));
    assert!(!covered(
        &"spiffe://example.org/ns/x/sa/y".parse().unwrap(),
        "k1"
    ));

    drop(rx);
    served.stop().await;
    follower.await.unwrap();
}
