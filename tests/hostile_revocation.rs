//! Revocations outlive what they cover. A revocation's expiry (after
//! which every sidecar prunes it and new Watch subscribers never receive
//! it) comes from the tokens it covers, not from the lifetimes of the
//! policy served when it was made: narrowing the policy after tokens were
//! issued must not bring a revoked token back before its own `exp`. The
//! same holds for a retired signing key's place in the JWKS.

mod support;

use std::sync::Arc;
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, send};
use tally::broker::issue::{IssueInput, Issued};
use tally::broker::{Broker, BrokerSettings, PolicySource};
use tally::clock::{Clock, ManualClock, SystemClock};
use tally::dpop::{NormalizedUri, ProofKey};
use tally::identity::SpiffeId;
use tally::store::{Sealer, Store};
use tally::token::RevocationTarget;
use tally::token::revocation::NEVER;

/// Service tokens live an hour.
const LONG: &str = "trust_domain: example.org
classes:
  service: { default_ttl: 1h, max_ttl: 1h }
issue:
  - from: spiffe://example.org/ns/shop/sa/checkout
    to: spiffe://example.org/ns/pay/sa/payments
    scopes: [payments:charge]
    class: service
access:
  - workload: spiffe://example.org/ns/pay/sa/payments
    allow:
      - from: spiffe://example.org/ns/shop/sa/checkout
        methods: [POST]
        paths: [/v1/charges]
        scopes: [payments:charge]
";

/// The same with every class narrowed to ten seconds, applied after
/// tokens were issued.
fn narrowed() -> String {
    let ten = "{ default_ttl: 10s, max_ttl: 10s }";
    LONG.replace(
        "  service: { default_ttl: 1h, max_ttl: 1h }\n",
        &format!("  service: {ten}\n  partner: {ten}\n  admin: {ten}\n  user: {ten}\n"),
    )
}

/// What a revocation made under [`narrowed`] would have lasted had it
/// been derived from the policy served then: 10 s plus the 30 s leeway.
const NARROW_BOUND: u64 = 10 + 30;

fn admin() -> SpiffeId {
    "spiffe://example.org/admin".parse().unwrap()
}

/// A token for checkout, bound to `key`, with the policy's default life.
async fn issue(broker: &Broker, key: &ProofKey, now: u64) -> Issued {
    let proof = key
        .mint("POST", broker.issue_uri(), None, None, now)
        .unwrap();
    broker
        .issue(&IssueInput {
            caller: &CHECKOUT.parse().unwrap(),
            audience: &PAYMENTS.parse().unwrap(),
            scopes: &"payments:charge".parse().unwrap(),
            ttl: None,
            proof: &proof,
            htu: &NormalizedUri::parse(broker.issue_uri()).unwrap(),
            require_nonce: false,
            via: "test",
            pod: None,
        })
        .await
        .unwrap()
}

/// A broker (no listeners) on a fresh store, serving [`LONG`] stored as
/// its first version, on `clock`.
async fn broker_on(dir: &std::path::Path, clock: Arc<ManualClock>) -> Broker {
    let store = Store::open_sqlite(
        &dir.join("tally.db"),
        Sealer::from_key_material(Sealer::generate_key_text().unwrap().as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let mut settings = BrokerSettings::with_policy("example.org", LONG).unwrap();
    settings.policy_yaml = Some(LONG.into());
    settings.policy_source = PolicySource::Store;
    Broker::open(settings, store, clock).await.unwrap()
}

/// `POST /v1/charges` to an inbound proxy with `token` and a fresh proof
/// made at `now`.
async fn charge(
    inbound: std::net::SocketAddr,
    key: &ProofKey,
    token: &str,
    now: u64,
) -> support::mesh::Answer {
    let url = format!("http://{inbound}/v1/charges");
    let authorization = format!("DPoP {token}");
    let mut nonce: Option<String> = None;
    loop {
        let proof = key
            .mint("POST", &url, Some(token), nonce.as_deref(), now)
            .unwrap();
        let headers = [
            ("authorization", authorization.as_str()),
            ("dpop", proof.as_str()),
        ];
        let answer = send(inbound, "POST", "/v1/charges", &headers, "").await;
        // A freshly started sidecar asks for a nonce first: sign again
        // with it, as a client does.
        match answer.header("dpop-nonce") {
            Some(n) if answer.status == 401 && nonce.is_none() => nonce = Some(n.to_owned()),
            _ => return answer,
        }
    }
}

fn refused_as_revoked(answer: &support::mesh::Answer) -> bool {
    answer.status == 401
        && answer
            .header("www-authenticate")
            .is_some_and(|c| c.contains("invalid_token") && c.contains("revoked"))
}

/// Waits until `sidecar` has received `n` revocations.
async fn revocations(sidecar: &support::mesh::Started, n: u64) {
    let mut mesh = sidecar.sidecar.parts().mesh.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        mesh.wait_for(|m| m.revocations_seen >= n),
    )
    .await
    .expect("the revocation never reached the sidecar")
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_revoked_after_the_policy_was_narrowed_stays_refused_until_its_tokens_expire() {
    // The clocks start at the real time: certificates the broker makes
    // must be valid for the TLS stacks, which read the system clock.
    let t0 = SystemClock.now();
    let clock = Arc::new(ManualClock::new(t0));
    let mesh = Mesh::start_with(LONG, clock.clone()).await;
    let broker = &mesh.broker.broker;
    let app = App::start().await;
    let payments = |clock: Arc<ManualClock>| Parts {
        inbound_to: Some(app.addr),
        clock: Some(clock),
        ..Parts::default()
    };
    let first = mesh.sidecar(PAYMENTS, payments(clock.clone())).await;
    let inbound = first.inbound.unwrap();

    // An hour-long token, accepted.
    let key = ProofKey::generate().unwrap();
    let held = issue(broker, &key, t0).await;
    assert_eq!(held.claims.exp, t0 + 3600);
    let token = held.token.expose().to_owned();
    assert_eq!(charge(inbound, &key, &token, t0).await.status, 200);

    // The policy narrows to 10 s lifetimes, then the workload is revoked.
    broker
        .apply_policy(&narrowed(), &admin(), "shorter tokens")
        .await
        .unwrap();
    let (_, entry) = broker
        .revoke(
            RevocationTarget::Subject(CHECKOUT.parse().unwrap()),
            None,
            "pod compromised",
            &admin(),
        )
        .await
        .unwrap();
    assert!(
        entry.expires_at >= held.claims.exp + 30,
        "the entry lasts as long as the token it covers: {} < {}",
        entry.expires_at,
        held.claims.exp + 30
    );
    revocations(&first, 1).await;
    assert!(refused_as_revoked(&charge(inbound, &key, &token, t0).await));

    // Past the bound the narrowed policy would give (the token itself has
    // most of its hour left). Another revocation makes the sidecar prune
    // its set at the new time.
    let later = t0 + NARROW_BOUND + 5;
    clock.set(later);
    let other = issue(broker, &ProofKey::generate().unwrap(), later).await;
    broker
        .revoke(
            RevocationTarget::Jti(other.claims.jti.clone()),
            None,
            "",
            &admin(),
        )
        .await
        .unwrap();
    revocations(&first, 2).await;
    assert_eq!(first.sidecar.parts().mesh.borrow().revocations.len(), 2);
    let answer = charge(inbound, &key, &token, later).await;
    assert!(refused_as_revoked(&answer), "{answer:?}");

    // A sidecar subscribing now gets the entry with the state...
    let second = mesh.sidecar(PAYMENTS, payments(clock.clone())).await;
    revocations(&second, 2).await;
    let answer = charge(second.inbound.unwrap(), &key, &token, later).await;
    assert!(refused_as_revoked(&answer), "{answer:?}");
    // ...and the broker's own view (introspection, lookups) agrees.
    let (_, revoked) = broker.find_token(&token).await.unwrap().unwrap();
    assert!(revoked);

    second.sidecar.stop().await.unwrap();
    first.sidecar.stop().await.unwrap();
    app.stop();
    mesh.broker.stop().await;
}

#[tokio::test]
async fn every_kind_of_entry_lasts_until_what_it_covers_has_expired() {
    let t0 = 1_800_000_000;
    let key_target = |k: &ProofKey| RevocationTarget::Jkt(k.thumbprint());
    for kind in ["subject", "jkt", "everything"] {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(t0));
        let broker = broker_on(dir.path(), clock.clone()).await;
        let key = ProofKey::generate().unwrap();
        let held = issue(&broker, &key, t0).await;
        let token = held.token.expose().to_owned();
        broker
            .apply_policy(&narrowed(), &admin(), "shorter tokens")
            .await
            .unwrap();
        // Made well after the narrowing (past the window in which tokens
        // of the old version may still be in flight), so only the
        // inventory says how long the covered token lives.
        clock.set(t0 + 600);
        let target = match kind {
            "subject" => RevocationTarget::Subject(CHECKOUT.parse().unwrap()),
            "jkt" => key_target(&key),
            _ => RevocationTarget::Everything,
        };
        let (_, entry) = broker.revoke(target, None, "", &admin()).await.unwrap();
        assert_eq!(entry.expires_at, held.claims.exp + 30, "{kind}");

        // Past the narrowed policy's bound: still in force everywhere the
        // broker reads it (the state a new subscriber gets, lookups).
        clock.set(t0 + 600 + NARROW_BOUND + 1);
        let in_state = |now| {
            let store = broker.store().clone();
            async move {
                store
                    .current_state(now)
                    .await
                    .unwrap()
                    .iter()
                    .filter(|c| c.kind == "revocation")
                    .count()
            }
        };
        assert_eq!(in_state(clock.now()).await, 1, "{kind}");
        assert!(
            broker.find_token(&token).await.unwrap().unwrap().1,
            "{kind}"
        );
        assert_eq!(broker.revocations_in_force().await.unwrap().len(), 1);

        // Once the token is past its exp and the leeway, the entry goes.
        clock.set(held.claims.exp + 30);
        assert_eq!(in_state(clock.now()).await, 0, "{kind}");
        assert!(broker.revocations_in_force().await.unwrap().is_empty());
    }
}

#[tokio::test]
async fn an_entry_covering_no_stored_token_still_outlives_a_policy_served_a_moment_ago() {
    // A token being issued as the revocation is made is not in the
    // inventory yet; it may carry the lifetime of the version served just
    // before the narrowing.
    let t0 = 1_800_000_000;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0));
    let broker = broker_on(dir.path(), clock.clone()).await;
    broker
        .apply_policy(&narrowed(), &admin(), "shorter tokens")
        .await
        .unwrap();
    clock.advance(5);
    let (_, entry) = broker
        .revoke(
            RevocationTarget::Subject(CHECKOUT.parse().unwrap()),
            None,
            "",
            &admin(),
        )
        .await
        .unwrap();
    assert_eq!(entry.expires_at, t0 + 5 + 3600 + 30);
    // Long after the narrowing only the narrowed version counts.
    clock.advance(3600);
    let now = clock.now();
    let (_, entry) = broker
        .revoke(RevocationTarget::Everything, None, "", &admin())
        .await
        .unwrap();
    assert_eq!(entry.expires_at, now + NARROW_BOUND);
}

#[tokio::test]
async fn a_leaked_signing_key_stays_revoked_forever() {
    // A token forged with a leaked key carries whatever exp its forger
    // wrote: no expiry derived from what the broker issued is safe.
    let t0 = 1_800_000_000;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0));
    let broker = broker_on(dir.path(), clock.clone()).await;
    let (_, withdrawn) = broker
        .replace_leaked_signing_key(&admin(), "key in a core dump")
        .await
        .unwrap();
    assert_eq!(withdrawn.len(), 1);
    clock.advance(10 * 365 * 86_400);
    let state = broker.store().current_state(clock.now()).await.unwrap();
    let kid_entries: Vec<_> = state
        .iter()
        .filter(|c| c.kind == "revocation")
        .map(|c| tally::token::Revocation::from_json(&c.body).unwrap())
        .collect();
    assert_eq!(kid_entries.len(), 1);
    assert_eq!(
        kid_entries[0].target,
        RevocationTarget::Kid(withdrawn[0].clone())
    );
    assert_eq!(kid_entries[0].expires_at, NEVER);
}

#[tokio::test]
async fn a_retired_key_stays_published_while_a_token_it_signed_lives() {
    let t0 = 1_800_000_000;
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(t0));
    let broker = broker_on(dir.path(), clock.clone()).await;
    let config =
        tally::token::TokenConfig::new("https://localhost:8444", PAYMENTS.parse().unwrap());
    let held = issue(&broker, &ProofKey::generate().unwrap(), t0).await;
    let (_, retired) = {
        let (kid, _) = broker.rotate_signing_key(0, None).await.unwrap();
        (kid, held.claims.kid.clone())
    };
    broker
        .apply_policy(&narrowed(), &admin(), "shorter tokens")
        .await
        .unwrap();

    // Past what the narrowed policy would keep it for.
    clock.set(t0 + NARROW_BOUND + 60);
    broker.maintain().await.unwrap();
    let jwks = broker.jwks();
    assert!(
        jwks.get(&retired).is_some(),
        "the retired key left the JWKS"
    );
    tally::token::verify(held.token.expose(), &jwks, &config, clock.now(), &mut ()).unwrap();

    // Once its last token has expired, it goes.
    clock.set(held.claims.exp + 30);
    broker.maintain().await.unwrap();
    assert!(broker.jwks().get(&retired).is_none());
    assert_eq!(broker.jwks().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_subscriber_hears_every_revocation_before_it_can_verify() {
    // A revocation newer than the keys, bundle and rules: in feed order it
    // would arrive after them, and a sidecar is ready (verifies) as soon
    // as it holds those.
    let mesh = Mesh::start().await;
    let broker = &mesh.broker.broker;
    let key = ProofKey::generate().unwrap();
    let held = issue(broker, &key, SystemClock.now()).await;
    broker
        .revoke(
            RevocationTarget::Jti(held.claims.jti.clone()),
            None,
            "test",
            &admin(),
        )
        .await
        .unwrap();
    let channel = support::broker::channel_as(&mesh.broker, PAYMENTS);
    let mut watch = tally::proto::v1::watch_client::WatchClient::new(channel);
    let mut stream = watch
        .subscribe(tally::proto::v1::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    use tally::proto::v1::update::Kind;
    let (mut seen_ready_kind, mut order) = (false, Vec::new());
    let mut ready = [false; 3];
    while ready != [true; 3] {
        let update = tokio::time::timeout(std::time::Duration::from_secs(5), stream.message())
            .await
            .expect("the initial state arrives")
            .unwrap()
            .unwrap();
        match update.kind.unwrap() {
            Kind::Revocation(_) | Kind::Denial(_) => {
                assert!(
                    !seen_ready_kind,
                    "a revocation came after the keys or rules: {order:?}"
                );
                order.push("revocation");
            }
            Kind::Jwks(_) => (ready[0], seen_ready_kind) = (true, true),
            Kind::Bundle(_) => (ready[1], seen_ready_kind) = (true, true),
            Kind::Policy(_) => (ready[2], seen_ready_kind) = (true, true),
        }
    }
    assert_eq!(order, ["revocation"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_workload_gets_no_token_from_inside_the_revoked_second() {
    // A revocation covers tokens issued at or before its second: one
    // issued later in that same second is covered too. Every clock stands
    // still, so both sides of the second are reached on purpose.
    let t0 = SystemClock.now();
    let clock = Arc::new(ManualClock::new(t0));
    let mesh = Mesh::start_with(LONG, clock.clone()).await;
    let app = App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                clock: Some(clock.clone()),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                socket: true,
                services: vec![(inbound.to_string(), PAYMENTS.to_owned())],
                clock: Some(clock.clone()),
                ..Parts::default()
            },
        )
        .await;
    let socket = checkout.socket.as_deref().unwrap();
    support::mesh::prime_nonce(socket, inbound, "payments:charge").await;
    let url = format!("http://{inbound}/v1/charges");
    let ask = || serde_json::json!({"method": "POST", "url": url, "scope": "payments:charge"});
    let charge = |(status, headers): (u16, serde_json::Value)| async move {
        assert_eq!(status, 200, "{headers}");
        let authorization = headers["authorization"].as_str().unwrap().to_owned();
        let dpop = headers["dpop"].as_str().unwrap();
        let headers = [("authorization", authorization.as_str()), ("dpop", dpop)];
        let answer = send(inbound, "POST", "/v1/charges", &headers, "").await;
        (authorization, answer)
    };
    let (before, answer) =
        charge(support::mesh::local(socket, "POST", "/v1/authorize", Some(ask())).await).await;
    assert_eq!(answer.status, 200, "{answer:?}");

    let (_, entry) = mesh
        .broker
        .broker
        .revoke(
            RevocationTarget::Subject(CHECKOUT.parse().unwrap()),
            None,
            "pod compromised",
            &admin(),
        )
        .await
        .unwrap();
    assert_eq!(entry.issued_before, t0);
    revocations(&checkout, 1).await;
    revocations(&payments, 1).await;

    // Still inside the revoked second: the cached token is covered, and so
    // is any the broker would sign now.
    let (status, refusal) =
        support::mesh::local(socket, "POST", "/v1/authorize", Some(ask())).await;
    assert_eq!(status, 403, "{refusal}");
    assert_eq!(refusal["error"], "access_denied");
    assert!(
        refusal["error_description"]
            .as_str()
            .unwrap()
            .contains("revoked"),
        "{refusal}"
    );

    // One second later: a new token, issued after the revocation, passes.
    clock.advance(1);
    let (after, answer) =
        charge(support::mesh::local(socket, "POST", "/v1/authorize", Some(ask())).await).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_ne!(after, before);
    let broker = &mesh.broker.broker;
    let config = tally::token::TokenConfig::new(broker.issuer(), PAYMENTS.parse().unwrap());
    let token = after.trim_start_matches("DPoP ");
    let claims =
        tally::token::verify(token, &broker.jwks(), &config, clock.now(), &mut ()).unwrap();
    assert!(claims.iat > entry.issued_before, "iat {}", claims.iat);

    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    app.stop();
    mesh.broker.stop().await;
}
