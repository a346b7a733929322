//! The PostgreSQL store on a real PostgreSQL (a throwaway cluster, or
//! `TALLY_TEST_POSTGRES`): what the SQLite store guarantees, with two
//! store handles writing at once as two broker replicas would; then two
//! brokers on one database, where a revocation, a key rotation, a policy
//! change and an identity denial made on one reach the other.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::postgres::Postgres;
use tally::audit::{AuditEvent, AuditKind, ChainVerifier, Outcome};
use tally::identity::JoinToken;
use tally::store::{
    AuditFilter, IssuedToken, JoinTokenRefusal, Sealer, SigningKeyRecord, Store, SvidRecord,
    TokenFilter, Write,
};

const NOW: u64 = 1_800_000_000;

fn issued(i: u64, sub: &str) -> IssuedToken {
    IssuedToken {
        jti: format!("{NOW:09x}{i:06x}jti"),
        kind: tally::token::TokenKind::Access,
        sub: sub.parse().unwrap(),
        aud: vec!["spiffe://example.org/ns/pay/sa/payments".parse().unwrap()],
        scope: "payments:read".parse().unwrap(),
        class: "service".parse().unwrap(),
        jkt: Some(
            "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
                .parse()
                .unwrap(),
        ),
        iat: NOW,
        exp: NOW + 300 + i,
        kid: "k1".into(),
        token_hmac: [u8::try_from(i % 256).unwrap(); 32],
    }
}

async fn open(url: &str, key: &str) -> Store {
    Store::open_postgres(url, Sealer::from_key_material(key.as_bytes()).unwrap())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_connection_commits_synchronously_whatever_the_database_default() {
    use sqlx::Connection as _;
    let pg = Postgres::start();
    let url = pg.database().await;
    // A database whose default would acknowledge a commit before its WAL
    // is flushed (a setting made "for speed"), and a URL asking the same.
    let name = url.split('?').next().unwrap().rsplit('/').next().unwrap();
    let mut admin = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "ALTER DATABASE {name} SET synchronous_commit = off"
    )))
    .execute(&mut admin)
    .await
    .unwrap();
    admin.close().await.unwrap();
    let joiner = if url.contains('?') { '&' } else { '?' };
    let asking_off = format!("{url}{joiner}options=-c%20synchronous_commit%3Doff");
    for url in [&url, &asking_off] {
        let mut plain = sqlx::PgConnection::connect(url).await.unwrap();
        let default: String = sqlx::query_scalar("SHOW synchronous_commit")
            .fetch_one(&mut plain)
            .await
            .unwrap();
        assert_eq!(default, "off", "the control: a plain connection is async");
        plain.close().await.unwrap();

        let store = open(url, &Sealer::generate_key_text().unwrap()).await;
        let settings = store.durability().await.unwrap();
        assert_eq!(settings[0], ("synchronous_commit", "on".to_owned()));
        // The throwaway cluster runs with fsync off for speed, and the
        // store reports the server's setting as it is (the broker logs it
        // as an error at start).
        let expected_fsync = if std::env::var("TALLY_TEST_POSTGRES").is_ok() {
            settings[1].1.clone()
        } else {
            "off".to_owned()
        };
        assert_eq!(settings[1], ("fsync", expected_fsync));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rows_from_before_pods_still_read_and_new_ones_keep_their_pod() {
    let pg = Postgres::start();
    let url = pg.database().await;
    let key = Sealer::generate_key_text().unwrap();
    drop(open(&url, &key).await);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for sql in support::cluster::BEFORE_PODS {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    support::cluster::pods_survive_the_migration(&open(&url, &key).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_rows_from_before_kinds_read_as_access_tokens_and_jwt_svids_and_wits_sit_beside_them()
{
    let pg = Postgres::start();
    let url = pg.database().await;
    let key = Sealer::generate_key_text().unwrap();
    drop(open(&url, &key).await);
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    for sql in support::inventory::before_kinds(true) {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    support::inventory::old_tokens_read_as_access_tokens(&open(&url, &key).await).await;

    let fresh = pg.database().await;
    let store = open(&fresh, &key).await;
    support::inventory::jwt_svids_sit_beside_access_tokens(&store).await;
    support::inventory::wits_sit_beside_other_tokens(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_what_the_sqlite_store_keeps_with_two_writers() {
    let pg = Postgres::start();
    let url = pg.database().await;
    let key = Sealer::generate_key_text().unwrap();
    // Two handles on one database: two replicas.
    let (a, b) = tokio::join!(open(&url, &key), open(&url, &key));
    assert_eq!(a.schema_version().await.unwrap(), 11);
    assert_eq!(open(&url, &key).await.schema_version().await.unwrap(), 11);

    // Secrets: whoever creates first, both read the same.
    let (x, y) = tokio::join!(
        a.secret_or_create("token-hmac", || vec![1u8; 32].into(), NOW),
        b.secret_or_create("token-hmac", || vec![2u8; 32].into(), NOW)
    );
    assert_eq!(x.unwrap(), y.unwrap());

    // Signing keys: sealed, retired, withdrawn.
    let signing = tally::jose::SigningKey::generate().unwrap();
    let pkcs8 = signing.to_pkcs8_der().unwrap();
    a.insert_signing_key(&SigningKeyRecord {
        kid: "k1".into(),
        pkcs8: pkcs8.clone(),
        created_at: NOW,
        sign_from: NOW,
        retired_at: None,
        withdrawn_at: None,
    })
    .await
    .unwrap();
    b.retire_signing_key("k1", NOW + 50).await.unwrap();
    a.withdraw_signing_key("k1", NOW + 10).await.unwrap();
    let keys = b.signing_keys().await.unwrap();
    assert_eq!(keys[0].pkcs8, pkcs8);
    assert_eq!(
        (keys[0].retired_at, keys[0].withdrawn_at),
        (Some(NOW + 10), Some(NOW + 10))
    );

    // The CA: first writer wins unless replacing.
    let (_, material) = tally::ca::Authority::generate(
        &"spiffe://example.org".parse().unwrap(),
        tally::ca::Lifetimes::default(),
        NOW,
    )
    .unwrap();
    assert!(a.save_ca(&material, false, NOW).await.unwrap());
    assert!(!b.save_ca(&material, false, NOW).await.unwrap());
    let loaded = b.load_ca().await.unwrap().unwrap();
    assert_eq!(loaded.intermediate_cert_pem, material.intermediate_cert_pem);
    assert_eq!(*loaded.intermediate_key_pem, *material.intermediate_key_pem);

    // Join tokens: of eight concurrent uses on two replicas, one wins.
    let token = JoinToken::generate().unwrap();
    let id = "spiffe://example.org/ns/vm/sa/batch".parse().unwrap();
    a.create_join_token(&token.hash(), &id, NOW + 600, NOW)
        .await
        .unwrap();
    let mut uses = tokio::task::JoinSet::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        let hash = token.hash();
        uses.spawn(async move { store.consume_join_token(&hash, NOW + 1).await.unwrap() });
    }
    let mut won = 0;
    while let Some(outcome) = uses.join_next().await {
        match outcome.unwrap() {
            Ok(got) => {
                won += 1;
                assert_eq!(got, id);
            }
            Err(refusal) => assert_eq!(refusal, JoinTokenRefusal::AlreadyUsed),
        }
    }
    assert_eq!(won, 1);
    let unknown = JoinToken::generate().unwrap();
    assert_eq!(
        a.consume_join_token(&unknown.hash(), NOW).await.unwrap(),
        Err(JoinTokenRefusal::Unknown)
    );
    // Reading whom a token names does not use it.
    assert_eq!(
        b.join_token_identity(&token.hash(), NOW + 2).await.unwrap(),
        Err(JoinTokenRefusal::AlreadyUsed)
    );
    assert_eq!(
        b.join_token_identity(&unknown.hash(), NOW).await.unwrap(),
        Err(JoinTokenRefusal::Unknown)
    );
    let fresh = JoinToken::generate().unwrap();
    a.create_join_token(&fresh.hash(), &id, NOW + 600, NOW)
        .await
        .unwrap();
    assert_eq!(
        b.join_token_identity(&fresh.hash(), NOW).await.unwrap(),
        Ok(id.clone())
    );
    assert_eq!(
        b.join_token_identity(&fresh.hash(), NOW + 600)
            .await
            .unwrap(),
        Err(JoinTokenRefusal::Expired)
    );
    assert_eq!(
        a.consume_join_token(&fresh.hash(), NOW).await.unwrap(),
        Ok(id.clone())
    );

    // 200 records from two replicas at once: one gapless chain.
    let mut writes = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        writes.spawn(async move {
            let sub = format!("spiffe://example.org/ns/n{}/sa/app", i % 4);
            let write = if i % 10 == 0 {
                Write::Svid(SvidRecord {
                    serial: format!("{i:x}"),
                    spiffe_id: sub.parse().unwrap(),
                    method: "join_token",
                    issued_at: NOW,
                    expires_at: NOW + 3600,
                    pod: None,
                })
            } else {
                Write::Issued(issued(i, &sub))
            };
            let event = AuditEvent::new(AuditKind::TokenIssue, Outcome::Ok, NOW)
                .actor("spiffe://example.org/ns/n0/sa/app")
                .field("jti", format!("{NOW:09x}{i:06x}jti"));
            store.record(Some(write), event).await.unwrap()
        });
    }
    let mut seqs = Vec::new();
    while let Some(done) = writes.join_next().await {
        seqs.push(done.unwrap().seq);
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=200).collect::<Vec<_>>(), "no gaps, no repeats");
    let head = a.audit_head().await.unwrap();
    assert_eq!((head.chain_from, head.seq), (1, 200));
    let mut verifier = ChainVerifier::new(1);
    for record in b.audit_after(0, 1000).await.unwrap() {
        verifier.push_record(&record).unwrap();
    }
    verifier.finish(head.seq, &head.hash).unwrap();
    // Archive the first 100 and remove them: the rest verifies from the
    // anchor; a wrong hash removes nothing.
    let hundredth = b.audit_after(99, 1).await.unwrap().remove(0);
    let anchor = tally::audit::ChainHash::of(&hundredth.line);
    assert!(matches!(
        a.truncate_audit(100, &tally::audit::ChainHash::GENESIS)
            .await,
        Err(tally::store::StoreError::Refused(_))
    ));
    assert_eq!(b.truncate_audit(100, &anchor).await.unwrap(), 100);
    let head = a.audit_head().await.unwrap();
    assert_eq!((head.chain_from, head.anchor), (101, anchor));
    let mut verifier = ChainVerifier::anchored(101, anchor);
    for record in a.audit_after(0, 1000).await.unwrap() {
        verifier.push_record(&record).unwrap();
    }
    verifier.finish(head.seq, &head.hash).unwrap();
    assert_eq!(verifier.checked(), 100);

    // Inventory queries.
    assert_eq!(a.count_issued().await.unwrap(), 180);
    assert_eq!(a.live_svids(NOW).await.unwrap(), 20);
    let t = issued(7, "spiffe://example.org/ns/n3/sa/app");
    assert_eq!(
        b.token_by_jti(&t.jti, &t.token_hmac).await.unwrap(),
        Some(t.clone())
    );
    assert_eq!(b.token_by_jti(&t.jti, &[0; 32]).await.unwrap(), None);
    assert_eq!(a.token_exp(&t.jti).await.unwrap(), Some(t.exp));
    let mut filter = TokenFilter {
        now: NOW,
        sub: Some("spiffe://example.org/ns/n1/sa/app".into()),
        ..TokenFilter::default()
    };
    let mut pages = Vec::new();
    loop {
        let page = a.find_live_tokens(&filter, 7).await.unwrap();
        let Some(last) = page.last() else { break };
        filter.after = Some((last.exp, last.jti.clone()));
        pages.extend(page);
    }
    assert_eq!(
        pages.len(),
        50,
        "n1: every odd i with i % 4 == 1 (SVIDs are at i % 10 == 0)"
    );
    assert!(
        pages
            .windows(2)
            .all(|w| (w[0].exp, &w[0].jti) < (w[1].exp, &w[1].jti))
    );
    filter.after = None;
    filter.expires_by = Some(NOW + 320);
    assert!(a.find_live_tokens(&filter, 100).await.unwrap().len() < 10);
    assert_eq!(a.live_token_counts(NOW).await.unwrap(), (180, 4, 50));
    // How long revocations and retired keys must last: the latest exp of
    // what they cover (n1: odd i with i % 4 == 1, the last 197).
    let n1 = "spiffe://example.org/ns/n1/sa/app";
    assert_eq!(
        b.latest_live_exp(NOW, NOW, Some(n1), None).await.unwrap(),
        Some(NOW + 300 + 197)
    );
    let jkt = t.jkt.unwrap().to_string();
    assert_eq!(
        b.latest_live_exp(NOW, NOW, None, Some(&jkt)).await.unwrap(),
        Some(NOW + 300 + 199)
    );
    assert_eq!(
        b.latest_live_exp(NOW, NOW - 1, None, None).await.unwrap(),
        None,
        "issued after"
    );
    assert_eq!(
        b.latest_live_exp(NOW + 500, NOW, None, None).await.unwrap(),
        None,
        "expired"
    );
    assert_eq!(
        a.live_exp_by_kid(NOW).await.unwrap(),
        vec![("k1".to_owned(), NOW + 300 + 199)]
    );
    let usage = a.token_usage(NOW - 10).await.unwrap();
    assert_eq!(usage.iter().map(|u| u.count).sum::<u64>(), 180);
    let ids = a.identities(NOW).await.unwrap();
    assert_eq!(ids.len(), 4);
    assert_eq!(ids.iter().map(|i| i.tokens).sum::<u64>(), 180);
    assert!(ids.iter().all(|i| i.tokens == i.live_tokens));
    assert!(ids.iter().any(|i| i.svids > 0 && i.method == "join_token"));

    // Audit queries (over the 100 records kept).
    let q = |filter: AuditFilter| {
        let a = a.clone();
        async move { a.audit_query(&filter, 1000).await.unwrap().len() }
    };
    let kept = a.audit_after(149, 1).await.unwrap().remove(0);
    let kept: serde_json::Value = serde_json::from_str(&kept.line).unwrap();
    assert_eq!(
        q(AuditFilter {
            jti: Some(kept["jti"].as_str().unwrap().to_owned()),
            ..AuditFilter::default()
        })
        .await,
        1
    );
    assert_eq!(
        q(AuditFilter {
            kind: Some("token".into()),
            sub: Some("spiffe://example.org/ns/n0/sa/app".into()),
            ..AuditFilter::default()
        })
        .await,
        100
    );
    assert_eq!(
        q(AuditFilter {
            kind: Some("token_issue".into()),
            ..AuditFilter::default()
        })
        .await,
        0
    );

    // The change feed: appends from both replicas get contiguous numbers,
    // and each commit is announced on tally_changes.
    let mut listener = a.listen_changes().await.unwrap().unwrap();
    let mut appends = tokio::task::JoinSet::new();
    for i in 0..20u64 {
        let store = if i % 2 == 0 { a.clone() } else { b.clone() };
        appends.spawn(async move {
            let body = tally::token::Revocation {
                target: tally::token::RevocationTarget::Jti(format!("j{i}")),
                issued_before: NOW,
                expires_at: if i == 0 { NOW - 1 } else { NOW + 60 },
                reason: String::new(),
            }
            .to_json();
            store
                .append_change("revocation", &body, NOW * 1000)
                .await
                .unwrap()
        });
    }
    while appends.join_next().await.is_some() {}
    let feed = b.changes_after(0, 100).await.unwrap();
    assert_eq!(
        feed.iter().map(|c| c.seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    let mut announced = std::collections::BTreeSet::new();
    while announced.len() < 20 {
        let note = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a NOTIFY for every commit")
            .unwrap();
        announced.insert(note.payload().parse::<u64>().unwrap());
    }
    a.append_change("jwks", "{\"keys\":[]}", NOW * 1000)
        .await
        .unwrap();
    let state = b.current_state(NOW).await.unwrap();
    assert_eq!(
        state.iter().filter(|c| c.kind == "revocation").count(),
        19,
        "the expired entry is not in the state"
    );
    assert_eq!(state.last().unwrap().kind, "jwks");
    assert_eq!(b.latest_changes().await.unwrap().len(), 2);

    // Policy versions.
    let v1 = a
        .insert_policy_version("seed", "seed", "", "trust_domain: example.org\n", NOW)
        .await
        .unwrap();
    let v2 = b
        .insert_policy_version("spiffe://example.org/admin", "apply", "c", "x: 1\n", NOW)
        .await
        .unwrap();
    assert_eq!((v1, v2), (1, 2));
    assert_eq!(a.policy_version(None).await.unwrap().unwrap().version, 2);
    assert_eq!(
        a.policy_version(Some(1)).await.unwrap().unwrap().author,
        "seed"
    );
    assert_eq!(b.policy_versions(10).await.unwrap().len(), 2);
    let v3 = a
        .insert_policy_version("seed", "apply", "", "y: 2\n", NOW + 100)
        .await
        .unwrap();
    let since = |t| {
        let b = b.clone();
        async move {
            b.policy_versions_since(t)
                .await
                .unwrap()
                .iter()
                .map(|v| v.version)
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(since(NOW - 1).await, [v1, v2, v3], "none in force yet");
    assert_eq!(since(NOW + 50).await, [v2, v3], "v2 in force, v3 later");
    assert_eq!(since(NOW + 100).await, [v3]);
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_broker_replicas_on_one_database_act_as_one() {
    use support::broker::{channel_as, serve_store, settings};
    use tally::sidecar::watch::{MeshState, follow};
    let pg = Postgres::start();
    let url = pg.database().await;
    let key = Sealer::generate_key_text().unwrap();
    let policy = include_str!("fixtures/policy.yaml");
    let replica = || async {
        let store = open(&url, &key).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        serve_store(store, settings(policy), listener).await
    };
    let a = replica().await;
    let b = replica().await;
    assert_eq!(a.broker.bundle_pem(), b.broker.bundle_pem(), "one CA");

    // A sidecar follows replica B.
    let channel = channel_as(&b, "spiffe://example.org/ns/pay/sa/payments");
    let (state, rx) = tokio::sync::watch::channel(MeshState::default());
    let follower = tokio::spawn(follow(
        move || channel.clone(),
        Arc::new(tally::clock::SystemClock),
        state,
    ));
    let wait = |what: &'static str, f: fn(&MeshState) -> bool| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f))
                .await
                .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
                .unwrap()
                .clone()
        }
    };
    wait("the initial state", |s| s.ready() && s.connected).await;

    // Revocations made on A reach the sidecar on B by LISTEN/NOTIFY, not
    // B's 5 s catch-up: five made one after another, each waited for,
    // arrive in well under 10 s; by the catch-up alone the last could not
    // arrive before 20 s (one tick apart each). Both margins are 10 s.
    let admin = "spiffe://example.org/admin".parse().unwrap();
    let started = std::time::Instant::now();
    for n in 1..=5u64 {
        a.broker
            .revoke(
                tally::token::RevocationTarget::Jkt(
                    tally::dpop::ProofKey::generate().unwrap().thumbprint(),
                ),
                None,
                "replica test",
                &admin,
            )
            .await
            .unwrap();
        let mut rx = rx.clone();
        tokio::time::timeout(
            Duration::from_secs(10),
            rx.wait_for(|s| s.revocations_seen >= n),
        )
        .await
        .unwrap_or_else(|_| panic!("revocation {n} from the other replica never arrived"))
        .unwrap();
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "delivered by NOTIFY, not the catch-up: {:?}",
        started.elapsed()
    );

    // A key rotation on A: B signs with the new key too, and the sidecar
    // on B learns it.
    let (kid, _) = a.broker.rotate_signing_key(0, None).await.unwrap();
    wait("the rotated JWKS", |s| {
        s.jwks.as_ref().is_some_and(|j| j.len() == 2)
    })
    .await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while b.broker.jwks().get(&kid).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "B never took in the rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A policy applied on A is what B decides by.
    let tightened = policy.replace("scopes: [payments:read]\n", "scopes: [payments:refund]\n");
    a.broker
        .apply_policy(&tightened, &admin, "replica test")
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while *b.broker.policy() != tally::policy::Policy::parse(&tightened).unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "B never took in the policy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Both write one audit chain.
    let checked = b.broker.verify_audit().await.unwrap();
    assert!(checked.problem.is_none(), "{:?}", checked.problem);
    drop(rx);
    a.stop().await;
    b.stop().await;
    follower.await.unwrap();
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_denied_on_one_replica_is_refused_by_the_other_and_a_replica_started_later() {
    use support::broker::{channel_as, serve_store, settings};
    use tally::sidecar::watch::{MeshState, follow};
    const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
    let pg = Postgres::start();
    let url = pg.database().await;
    let key = Sealer::generate_key_text().unwrap();
    let replica = || async {
        let store = open(&url, &key).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        serve_store(
            store,
            settings(include_str!("fixtures/policy.yaml")),
            listener,
        )
        .await
    };
    let (a, b) = (replica().await, replica().await);
    let (state, mut rx) = tokio::sync::watch::channel(MeshState::default());
    let channel = channel_as(&b, "spiffe://example.org/ns/pay/sa/payments");
    let follower = tokio::spawn(follow(
        move || channel.clone(),
        Arc::new(tally::clock::SystemClock),
        state,
    ));
    let renew = |served: &support::broker::ServedBroker| {
        let channel = channel_as(served, CHECKOUT);
        async move {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let csr = rcgen::CertificateParams::default()
                .serialize_request(&key)
                .unwrap();
            tally::proto::v1::identity_client::IdentityClient::new(channel)
                .renew(tally::proto::v1::RenewRequest {
                    csr_der: csr.der().to_vec(),
                })
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    renew(&b).await.unwrap();

    let (id, admin) = (
        CHECKOUT.parse().unwrap(),
        "spiffe://example.org/admin".parse().unwrap(),
    );
    a.broker
        .deny_identity(&id, "replica test", &admin)
        .await
        .unwrap();
    let seen = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|s| s.denied.is_denied(&id)),
    );
    seen.await
        .expect("the denial never reached B's subscriber")
        .unwrap();
    assert!(
        b.broker.is_denied(&id),
        "B took it in before waking its subscribers"
    );
    assert_eq!(renew(&b).await, Err(tonic::Code::PermissionDenied));
    // A replica started now loads it from the feed.
    let c = replica().await;
    assert_eq!(renew(&c).await, Err(tonic::Code::PermissionDenied));

    // Allowed on B: A and C let it renew again.
    b.broker.allow_identity(&id, "", &admin).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.broker.is_denied(&id) || c.broker.is_denied(&id) {
        assert!(
            std::time::Instant::now() < deadline,
            "the allow never reached A and C"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    renew(&a).await.unwrap();
    drop(rx);
    for served in [a, b, c] {
        served.stop().await;
    }
    follower.await.unwrap();
    drop(pg);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_whose_notify_was_missed_reaches_subscribers_at_the_catch_up() {
    use sqlx::Connection as _;
    use support::broker::{channel_as, serve_store, settings};
    use tally::sidecar::watch::{MeshState, follow};
    let pg = Postgres::start();
    let url = pg.database().await;
    let key = Sealer::generate_key_text().unwrap();
    let store = open(&url, &key).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let replica = serve_store(
        store,
        settings(include_str!("fixtures/policy.yaml")),
        listener,
    )
    .await;
    let channel = channel_as(&replica, "spiffe://example.org/ns/pay/sa/payments");
    let (state, mut rx) = tokio::sync::watch::channel(MeshState::default());
    let follower = tokio::spawn(follow(
        move || channel.clone(),
        Arc::new(tally::clock::SystemClock),
        state,
    ));
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| s.ready()))
        .await
        .expect("the initial state")
        .unwrap();

    // Another replica's revocation whose notification never came (it was
    // committed while this replica's listening connection was down): the
    // entry is in the feed, and nothing announces it.
    let now = tally::clock::Clock::now(&tally::clock::SystemClock);
    let entry = tally::token::Revocation {
        target: tally::token::RevocationTarget::Subject(
            "spiffe://example.org/ns/shop/sa/checkout".parse().unwrap(),
        ),
        issued_before: now,
        expires_at: now + 3600,
        reason: "made elsewhere".into(),
    };
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    sqlx::query(
        "WITH s AS (UPDATE change_head SET seq = seq + 1 WHERE id = 1 RETURNING seq) \
         INSERT INTO changes (seq, at_ms, kind, body) SELECT seq, $1, 'revocation', $2 FROM s",
    )
    .bind(i64::try_from(now * 1000).unwrap())
    .bind(entry.to_json())
    .execute(&mut db)
    .await
    .unwrap();
    db.close().await.unwrap();

    // The catch-up reads the feed every 5 s: the sidecar has it within one
    // period (bound: two periods and a margin).
    let started = std::time::Instant::now();
    let seen = tokio::time::timeout(
        Duration::from_secs(15),
        rx.wait_for(|s| s.revocations_seen >= 1),
    )
    .await
    .expect("the missed change never reached the subscriber")
    .unwrap()
    .clone();
    assert!(
        started.elapsed() < Duration::from_secs(11),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(seen.revocations.len(), 1);
    drop(rx);
    replica.stop().await;
    follower.await.unwrap();
    drop(pg);
}

#[test]
fn the_broker_binary_runs_on_postgres_and_never_shows_the_password() {
    use support::broker::{POLICY_FILE, Spawned};
    use support::process::{PATIENCE, output_within};
    let pg = Postgres::start();
    let plain = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(pg.database());
    // A password in the URL (the test cluster trusts local connections and
    // never asks for it, so the broker runs; a TALLY_TEST_POSTGRES URL
    // keeps its own).
    let (scheme, rest) = plain.split_once("://").unwrap();
    let (user, host) = rest.split_once('@').unwrap();
    let (url, password) = match user.split_once(':') {
        Some((_, password)) => (plain.clone(), password.to_owned()),
        None => {
            let password = "pw-7f3a9c1e5b".to_owned();
            (format!("{scheme}://{user}:{password}@{host}"), password)
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start_with(
        &data,
        &[
            "--policy",
            POLICY_FILE,
            "--database-url",
            &url,
            "--issuer",
            "https://tally-broker.example:8444",
        ],
    );
    // The control: the process was given the password.
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", broker.pid())).unwrap();
    assert!(String::from_utf8_lossy(&cmdline).contains(&password));
    let ctl = |args: &[&str]| {
        output_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
                .arg("ctl")
                .args(args)
                .arg("--broker")
                .arg(format!(
                    "https://{}",
                    broker.grpc.replace("127.0.0.1", "localhost")
                ))
                .arg("--data-dir")
                .arg(&data),
            PATIENCE,
        )
    };
    let o = ctl(&[
        "revoke",
        "--sub",
        "spiffe://example.org/ns/shop/sa/checkout",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = ctl(&["audit", "verify", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["intact"], true, "{report}");
    // Nothing went to a SQLite file.
    assert!(!data.join("tally.db").exists());

    // Not in what it serves on the admin port, what it printed, what it
    // logged (at debug, SQL included) or any file it wrote.
    let mut shown = Vec::new();
    for path in ["/metrics", "/readyz", "/healthz"] {
        shown.push((path.to_owned(), http_get(&broker.admin, path)));
    }
    assert!(shown[0].1.contains("tally_broker_"), "{}", shown[0].1);
    let (code, printed) = broker.stop();
    assert_eq!(code, Some(0));
    shown.push(("stdout".into(), printed.join("\n")));
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("sqlx::query"), "the log holds the SQL it ran");
    shown.push(("log".into(), log));
    for entry in walk(&data) {
        shown.push((
            entry.display().to_string(),
            String::from_utf8_lossy(&std::fs::read(&entry).unwrap()).into_owned(),
        ));
    }
    for (what, text) in &shown {
        assert!(
            !text.contains(&password),
            "{what} shows the database password"
        );
    }

    // A URL with a password that cannot connect: refused, password unsaid.
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["broker", "--trust-domain", "example.org", "--data-dir"])
        .arg(dir.path().join("other"))
        .args(support::broker::EPHEMERAL_PORTS)
        .args([
            "--database-url",
            "postgres://tally:hunter2@127.0.0.1:1/tally",
            "--issuer",
            "https://tally-broker.example:8444",
        ])
        .env_remove("TALLY_STORE_KEY")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("opening the PostgreSQL store"), "{err}");
    assert!(!err.contains("hunter2"), "{err}");
    drop(pg);
}

/// A plain HTTP/1.1 GET to `addr`; the whole response as text.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(support::process::PATIENCE))
        .unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).unwrap();
    out
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}
