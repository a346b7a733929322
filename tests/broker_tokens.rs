//! The broker's Tokens and Watch services over real mTLS gRPC: issuing
//! under the policy, proofs, rate limits, key rotation and restarts, and
//! the Watch stream.

mod support;

use std::sync::Arc;
use support::grpc::{
    CHECKOUT, PAYMENTS, POLICY, channel, issue_request, start, start_in, tokens_as, workload,
};
use tally::broker::{Broker, BrokerSettings};
use tally::clock::{Clock, SystemClock};
use tally::dpop::ProofKey;
use tally::identity::SpiffeId;
use tally::proto::v1 as pb;
use tally::store::{Sealer, Store};
use tally::token::{TokenConfig, verify};
use tonic::Code;

#[tokio::test]
async fn an_allowed_request_gets_a_bound_verifiable_recorded_token() {
    let r = start(POLICY).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    let issued = client
        .issue(issue_request(&r, &key, &["payments:charge"], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.token_type, "DPoP");
    assert_eq!(issued.scopes, vec!["payments:charge".to_owned()]);

    let config = TokenConfig::new("https://localhost:8444", PAYMENTS.parse().unwrap());
    let now = SystemClock.now();
    let claims = verify(
        &issued.access_token,
        &r.broker.jwks(),
        &config,
        now,
        &mut (),
    )
    .unwrap();
    assert_eq!(claims.sub.as_str(), CHECKOUT);
    assert_eq!(claims.jkt, key.thumbprint());
    assert_eq!(claims.exp - claims.iat, 300);
    assert_eq!(claims.jti, issued.jti);

    let live = r.broker.store().live_tokens(now, 10).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].jti, issued.jti);

    // Once retention prunes it from the inventory, the leaked-token lookup
    // still finds it, from its issuance record, and still not a forgery.
    let found = r
        .broker
        .lookup_token(&issued.access_token)
        .await
        .unwrap()
        .unwrap();
    assert!(!found.from_audit);
    let pruned = r
        .broker
        .store()
        .prune_inventory(claims.exp + 1, 100)
        .await
        .unwrap();
    assert!(pruned >= 1);
    assert!(
        r.broker
            .store()
            .live_tokens(now, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = r
        .broker
        .lookup_token(&issued.access_token)
        .await
        .unwrap()
        .unwrap();
    assert!(again.from_audit);
    assert_eq!(
        (
            again.token.jti.as_str(),
            again.token.sub.as_str(),
            again.token.exp
        ),
        (issued.jti.as_str(), CHECKOUT, claims.exp)
    );
    assert_eq!(again.token.scope.to_string(), "payments:charge");
    assert_eq!(
        again.token.jkt.unwrap().to_string(),
        key.thumbprint().to_string()
    );
    let forged = format!("{}A", issued.access_token);
    assert!(r.broker.lookup_token(&forged).await.unwrap().is_none());
    r.stop().await;
}

#[tokio::test]
async fn policy_scope_and_ttl_limits_are_enforced() {
    let r = start(POLICY).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    let err = client
        .issue(issue_request(&r, &key, &["payments:refund"], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("payments:refund"));

    let long = client
        .issue(issue_request(&r, &key, &["payments:read"], 86_400))
        .await
        .unwrap()
        .into_inner();
    let ttl = long.expires_at - SystemClock.now() as i64;
    assert!((890..=900).contains(&ttl), "ttl {ttl}");

    let mut other = pb::tokens_client::TokensClient::new(
        channel(
            &r,
            Some(workload(&r, "spiffe://example.org/ns/shop/sa/cart").await),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        other
            .issue(issue_request(&r, &key, &["payments:read"], 0))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    r.stop().await;
}

#[tokio::test]
async fn bad_or_replayed_proofs_are_refused() {
    let r = start(POLICY).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    let mut wrong_uri = issue_request(&r, &key, &["payments:read"], 0);
    wrong_uri.dpop_proof = key
        .mint(
            "POST",
            "https://localhost:8444/elsewhere",
            None,
            None,
            SystemClock.now(),
        )
        .unwrap();
    let err = client.issue(wrong_uri).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("htu"), "{}", err.message());

    let once = issue_request(&r, &key, &["payments:read"], 0);
    client.issue(once.clone()).await.unwrap();
    let err = client.issue(once).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already used"));
    r.stop().await;
}

#[tokio::test]
async fn rule_rate_limits_answer_resource_exhausted_with_retry_after() {
    let policy = POLICY.replace("rate: 50/s", "rate: 2/m");
    let r = start(&policy).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap();
    client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap();
    let err = client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let retry: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    r.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_the_ca_and_keys_so_old_tokens_still_verify() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let r = start_in(dir.path(), &key, POLICY).await;
    let bundle = r.broker.bundle_pem();
    let mut client = tokens_as(&r, CHECKOUT).await;
    let proof_key = ProofKey::generate().unwrap();
    let issued = client
        .issue(issue_request(&r, &proof_key, &["payments:read"], 0))
        .await
        .unwrap()
        .into_inner();
    r.stop().await;

    let again = start_in(dir.path(), &key, POLICY).await;
    assert_eq!(again.broker.bundle_pem(), bundle);
    let config = TokenConfig::new("https://localhost:8444", PAYMENTS.parse().unwrap());
    verify(
        &issued.access_token,
        &again.broker.jwks(),
        &config,
        SystemClock.now(),
        &mut (),
    )
    .unwrap();
    // The token is in the inventory, and nowhere on disk as a string.
    assert_eq!(
        again
            .broker
            .store()
            .live_tokens(SystemClock.now(), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // The audit log names it by jti.
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains(&format!("\"jti\":\"{}\"", issued.jti)),
        "{audit}"
    );
    let mut disk = std::fs::read(dir.path().join("tally.db")).unwrap();
    disk.extend(std::fs::read(dir.path().join("tally.db-wal")).unwrap_or_default());
    disk.extend(audit.as_bytes());
    let needle = issued.access_token.split('.').nth(2).unwrap().as_bytes();
    assert!(!disk.windows(needle.len()).any(|w| w == needle));
    again.stop().await;
}

#[tokio::test]
async fn tokens_signed_before_a_rotation_verify_after_it() {
    let r = start(POLICY).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    let before = client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap()
        .into_inner();
    let (new_kid, _) = r.broker.rotate_signing_key(0, None).await.unwrap();
    let after = client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap()
        .into_inner();
    let config = TokenConfig::new("https://localhost:8444", PAYMENTS.parse().unwrap());
    let jwks = r.broker.jwks();
    assert_eq!(jwks.len(), 2);
    let now = SystemClock.now();
    let old = verify(&before.access_token, &jwks, &config, now, &mut ()).unwrap();
    let new = verify(&after.access_token, &jwks, &config, now, &mut ()).unwrap();
    assert_ne!(old.kid, new.kid);
    assert_eq!(new.kid, new_kid);
    r.stop().await;
}

#[tokio::test]
async fn keys_rotate_on_schedule_and_no_token_is_ever_unverifiable() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let start = 1_800_000_000;
    let clock = Arc::new(tally::clock::ManualClock::new(start));
    let store = Store::open_sqlite(
        &dir.path().join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let mut settings = BrokerSettings::with_policy("example.org", POLICY).unwrap();
    settings.key_rotation = 3600;
    settings.key_publish_lead = 600;
    let broker = Broker::open(settings, store, clock.clone()).await.unwrap();
    let config = TokenConfig::new("https://localhost:8444", PAYMENTS.parse().unwrap());
    let proof_key = ProofKey::generate().unwrap();
    let caller: SpiffeId = CHECKOUT.parse().unwrap();
    let audience = PAYMENTS.parse().unwrap();
    let issue = |ttl: u64| {
        let broker = &broker;
        let proof_key = &proof_key;
        let caller = &caller;
        let audience = &audience;
        let clock = clock.clone();
        async move {
            let proof = proof_key
                .mint("POST", broker.issue_uri(), None, None, clock.now())
                .unwrap();
            let scopes: tally::token::Scopes = "payments:read".parse().unwrap();
            broker
                .issue(&tally::broker::issue::IssueInput {
                    caller,
                    audience,
                    scopes: &scopes,
                    ttl: Some(ttl),
                    proof: &proof,
                    htu: &tally::dpop::NormalizedUri::parse(broker.issue_uri()).unwrap(),
                    require_nonce: false,
                    via: "test",
                    pod: None,
                })
                .await
                .unwrap()
        }
    };
    let first_kid = broker.jwks().to_json()["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(broker.maintain().await.unwrap(), None, "not due yet");

    clock.advance(3600);
    let before = issue(900).await;
    let next_kid = broker.maintain().await.unwrap().expect("due after an hour");
    assert_eq!(broker.jwks().len(), 2, "published before it signs");
    let again = broker.maintain().await.unwrap();
    assert_eq!(again, None, "one rotation at a time");
    clock.advance(599);
    let during = issue(900).await;
    assert_eq!(
        during.claims.kid, first_kid,
        "the old key signs during the lead"
    );

    clock.advance(1);
    let after = issue(900).await;
    assert_eq!(after.claims.kid, next_kid);
    let check = |t: &tally::broker::issue::Issued, now: u64| {
        verify(t.token.expose(), &broker.jwks(), &config, now, &mut ()).unwrap();
    };
    for t in [&before, &during, &after] {
        check(t, clock.now());
    }
    // The last token the old key signed still verifies at its very end.
    clock.advance(899);
    broker.maintain().await.unwrap();
    check(&during, clock.now());
    clock.set(start + 4200);
    // The old key stays published until its last token (max_ttl 15 m +
    // leeway) is over, then the feed drops it.
    clock.advance(900);
    broker.maintain().await.unwrap();
    assert_eq!(broker.jwks().len(), 2);
    clock.advance(31);
    broker.maintain().await.unwrap();
    assert_eq!(broker.jwks().len(), 1);
    let latest = broker.store().latest_changes().await.unwrap();
    let jwks = latest.iter().find(|c| c.kind == "jwks").unwrap();
    assert!(!jwks.body.contains(&first_kid), "the feed has the new JWKS");
    // Rotations are audited.
    let audit = broker.store().audit_after(0, 50).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.kind == "keys.rotate" && a.line.contains("\"by\":\"schedule\""))
    );
}

#[tokio::test]
async fn watch_sends_the_state_then_every_change_and_resumes_where_it_left_off() {
    let r = start(POLICY).await;
    let identity = workload(&r, CHECKOUT).await;
    let mut client = pb::watch_client::WatchClient::new(channel(&r, Some(identity)).await.unwrap());
    let mut stream = client
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let keys_in = |u: &pb::Update| match &u.kind {
        Some(pb::update::Kind::Jwks(jwks)) => tally::token::Jwks::parse(jwks.json.as_bytes())
            .unwrap()
            .len(),
        other => panic!("expected a JWKS, got {other:?}"),
    };
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(keys_in(&first), 1);
    let second = stream.message().await.unwrap().unwrap();
    assert!(matches!(second.kind, Some(pb::update::Kind::Bundle(_))));
    assert!(second.sequence > first.sequence);
    // The access rules: only those protecting the subscriber.
    let policy = stream.message().await.unwrap().unwrap();
    let Some(pb::update::Kind::Policy(access)) = &policy.kind else {
        panic!("expected the access policy, got {:?}", policy.kind);
    };
    let access = tally::policy::Policy::parse(&access.yaml).unwrap();
    assert_eq!(access.access.len(), 1);
    assert_eq!(access.access[0].workload.to_string(), CHECKOUT);
    assert!(policy.sequence > second.sequence);

    // A rotation reaches the open stream as the next update.
    r.broker.rotate_signing_key(300, None).await.unwrap();
    let third = stream.message().await.unwrap().unwrap();
    assert_eq!(
        keys_in(&third),
        2,
        "the next key is published before it signs"
    );
    assert!(third.sequence > policy.sequence);
    drop(stream);

    // Reconnecting after the policy gets exactly the rotation again...
    let mut resumed = client
        .subscribe(pb::SubscribeRequest {
            after_sequence: policy.sequence,
        })
        .await
        .unwrap()
        .into_inner();
    let again = resumed.message().await.unwrap().unwrap();
    assert_eq!(again.sequence, third.sequence);
    // ...and a fresh start gets the current state: bundle, policy, then
    // the new JWKS.
    let mut fresh = client
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let a = fresh.message().await.unwrap().unwrap();
    let p = fresh.message().await.unwrap().unwrap();
    let b = fresh.message().await.unwrap().unwrap();
    assert_eq!(
        (a.sequence, p.sequence, b.sequence),
        (second.sequence, policy.sequence, third.sequence)
    );
    assert_eq!(keys_in(&b), 2);
    r.stop().await;
}
