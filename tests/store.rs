//! The embedded store, on a real SQLite file in a temp directory.

use std::sync::Arc;
use tally::audit::{AuditEvent, AuditKind, Outcome};
use tally::ca::{Authority, Lifetimes};
use tally::identity::{JoinToken, SpiffeId};
use tally::store::{
    AuditFilter, IssuedToken, JoinTokenRefusal, Sealer, SigningKeyRecord, Store, StoreError, Write,
};
use zeroize::Zeroizing;

const NOW: u64 = 1_800_000_000;

fn key_text() -> Zeroizing<String> {
    Sealer::generate_key_text().unwrap()
}

async fn open(dir: &std::path::Path, key: &str) -> Store {
    Store::open_sqlite(
        &dir.join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).unwrap(),
    )
    .await
    .unwrap()
}

fn file_bytes(dir: &std::path::Path) -> Vec<u8> {
    // The main file and the WAL: a secret must be in neither.
    let mut all = std::fs::read(dir.join("tally.db")).unwrap();
    if let Ok(wal) = std::fs::read(dir.join("tally.db-wal")) {
        all.extend(wal);
    }
    all
}

fn issued(i: u64, exp: u64) -> IssuedToken {
    IssuedToken {
        jti: format!("jti-{i}"),
        kind: tally::token::TokenKind::Access,
        sub: "spiffe://example.org/ns/shop/sa/checkout".parse().unwrap(),
        aud: vec!["spiffe://example.org/ns/pay/sa/payments".parse().unwrap()],
        scope: "payments:charge".parse().unwrap(),
        class: "service".parse().unwrap(),
        jkt: Some(
            "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"
                .parse()
                .unwrap(),
        ),
        iat: NOW,
        exp,
        kid: "k1".into(),
        token_hmac: {
            let mut h = [0u8; 32];
            h[..8].copy_from_slice(&i.to_le_bytes());
            h
        },
    }
}

#[tokio::test]
async fn a_new_store_is_migrated_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_text();
    let store = open(dir.path(), &key).await;
    assert_eq!(store.schema_version().await.unwrap(), 11);
    drop(store);
    let again = open(dir.path(), &key).await;
    assert_eq!(again.schema_version().await.unwrap(), 11);
}

#[tokio::test]
async fn every_commit_is_fsynced_in_wal_mode() {
    // What "durable before acknowledged" rests on: a SIGKILL test (see
    // tests/durability.rs) cannot tell a commit in the page cache from one
    // on the disk; `synchronous = FULL` (2) is what fsyncs each commit.
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    assert_eq!(
        store.durability().await.unwrap(),
        [
            ("journal_mode", "wal".to_owned()),
            ("synchronous", "2".to_owned())
        ]
    );
}

#[tokio::test]
async fn ca_keys_are_sealed_at_rest_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_text();
    let td: SpiffeId = "spiffe://example.org".parse().unwrap();
    let (_, material) = Authority::generate(&td, Lifetimes::default(), NOW).unwrap();
    {
        let store = open(dir.path(), &key).await;
        assert!(store.save_ca(&material, false, NOW).await.unwrap());
        // A second CA does not silently replace the first.
        let (_, other) = Authority::generate(&td, Lifetimes::default(), NOW).unwrap();
        assert!(!store.save_ca(&other, false, NOW).await.unwrap());
    }
    let key_line = material
        .intermediate_key_pem
        .lines()
        .nth(1)
        .unwrap()
        .as_bytes()
        .to_vec();
    let raw = file_bytes(dir.path());
    assert!(
        !raw.windows(key_line.len())
            .any(|w| w == key_line.as_slice()),
        "private key in plaintext on disk"
    );
    let store = open(dir.path(), &key).await;
    let loaded = store.load_ca().await.unwrap().unwrap();
    assert_eq!(loaded.root_cert_pem, material.root_cert_pem);
    assert_eq!(*loaded.intermediate_key_pem, *material.intermediate_key_pem);
    Authority::load(&td, &loaded, Lifetimes::default()).unwrap();
}

#[tokio::test]
async fn the_wrong_sealing_key_cannot_open_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    store
        .secret_or_create("token-hmac", || Zeroizing::new(vec![42u8; 32]), NOW)
        .await
        .unwrap();
    drop(store);
    let other = open(dir.path(), &key_text()).await;
    let err = other
        .secret_or_create("token-hmac", || Zeroizing::new(vec![0u8; 32]), NOW)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Seal(_)), "{err:?}");
}

#[tokio::test]
async fn a_secret_is_created_once_and_then_kept() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    let first = store
        .secret_or_create("n", || Zeroizing::new(vec![1u8; 32]), NOW)
        .await
        .unwrap();
    let second = store
        .secret_or_create("n", || Zeroizing::new(vec![2u8; 32]), NOW)
        .await
        .unwrap();
    assert_eq!(first.as_slice(), &[1u8; 32]);
    assert_eq!(second.as_slice(), &[1u8; 32]);
}

#[tokio::test]
async fn signing_keys_round_trip_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    let key = tally::jose::SigningKey::generate().unwrap();
    let pkcs8 = key.to_pkcs8_der().unwrap();
    store
        .insert_signing_key(&SigningKeyRecord {
            kid: "k1".into(),
            pkcs8: pkcs8.clone(),
            created_at: NOW,
            sign_from: NOW + 60,
            retired_at: None,
            withdrawn_at: None,
        })
        .await
        .unwrap();
    store.retire_signing_key("k1", NOW + 3600).await.unwrap();
    let keys = store.signing_keys().await.unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].retired_at, Some(NOW + 3600));
    assert_eq!(keys[0].withdrawn_at, None);
    // Withdrawn (a leak): retired no later than that moment.
    store.withdraw_signing_key("k1", NOW + 100).await.unwrap();
    let keys = store.signing_keys().await.unwrap();
    assert_eq!(keys[0].withdrawn_at, Some(NOW + 100));
    assert_eq!(keys[0].retired_at, Some(NOW + 100));
    let again = tally::jose::SigningKey::from_pkcs8_der(&keys[0].pkcs8).unwrap();
    assert_eq!(again.thumbprint(), key.thumbprint());
    assert!(format!("{:?}", keys[0]).contains("<redacted>"));
    assert!(
        !file_bytes(dir.path())
            .windows(pkcs8.len())
            .any(|w| w == pkcs8.as_slice())
    );
}

#[tokio::test]
async fn a_join_token_works_once_and_is_stored_only_as_a_hash() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    let id: SpiffeId = "spiffe://example.org/vm/build-1".parse().unwrap();
    let token = JoinToken::generate().unwrap();
    store
        .create_join_token(&token.hash(), &id, NOW + 600, NOW)
        .await
        .unwrap();
    assert!(
        !file_bytes(dir.path())
            .windows(20)
            .any(|w| w == &token.expose().as_bytes()[..20])
    );

    assert_eq!(
        store
            .consume_join_token(&token.hash(), NOW + 1)
            .await
            .unwrap(),
        Ok(id)
    );
    assert_eq!(
        store
            .consume_join_token(&token.hash(), NOW + 2)
            .await
            .unwrap(),
        Err(JoinTokenRefusal::AlreadyUsed)
    );
    let unknown = JoinToken::generate().unwrap();
    assert_eq!(
        store
            .consume_join_token(&unknown.hash(), NOW)
            .await
            .unwrap(),
        Err(JoinTokenRefusal::Unknown)
    );
}

#[tokio::test]
async fn an_expired_join_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    let id: SpiffeId = "spiffe://example.org/vm/build-1".parse().unwrap();
    let token = JoinToken::generate().unwrap();
    store
        .create_join_token(&token.hash(), &id, NOW + 600, NOW)
        .await
        .unwrap();
    assert_eq!(
        store
            .consume_join_token(&token.hash(), NOW + 600)
            .await
            .unwrap(),
        Err(JoinTokenRefusal::Expired)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_many_concurrent_uses_of_one_join_token_exactly_one_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    let id: SpiffeId = "spiffe://example.org/vm/build-1".parse().unwrap();
    let token = JoinToken::generate().unwrap();
    let hash = token.hash();
    store
        .create_join_token(&hash, &id, NOW + 600, NOW)
        .await
        .unwrap();
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.consume_join_token(&hash, NOW + 1).await.unwrap() })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(refusal) => assert_eq!(refusal, JoinTokenRefusal::AlreadyUsed),
        }
    }
    assert_eq!(wins, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_issuance_records_are_all_committed_and_durable() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_text();
    {
        let store = Arc::new(open(dir.path(), &key).await);
        let tasks: Vec<_> = (0..2000u64)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(
                    async move { record_issued(&store, issued(i, NOW + 300 + i % 10)).await },
                )
            })
            .collect();
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
    // Reopened: every acknowledged record is there.
    let store = open(dir.path(), &key).await;
    let live = store.live_tokens(NOW, 5000).await.unwrap();
    assert_eq!(live.len(), 2000);
    assert!(live.windows(2).all(|w| w[0].exp <= w[1].exp));
    // Expired ones are not live.
    assert_eq!(
        store.live_tokens(NOW + 305, 5000).await.unwrap().len(),
        2000 * 4 / 10
    );
    let found = store
        .token_by_jti("jti-7", &issued(7, 0).token_hmac)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(found.jti, "jti-7");
    // The right jti with another token's hash finds nothing.
    assert!(
        store
            .token_by_jti("jti-7", &issued(8, 0).token_hmac)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn a_duplicate_record_fails_its_batch_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    let first = record_issued(&store, issued(1, NOW + 300)).await.unwrap();
    let err = record_issued(&store, issued(1, NOW + 300))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::WriteFailed(_)), "{err:?}");
    // The writer keeps working after a failed batch, and the failed
    // batch's audit record was not kept: the next one follows without a gap.
    let next = record_issued(&store, issued(2, NOW + 300)).await.unwrap();
    assert_eq!((first.seq, next.seq), (1, 2));
    let audit = store.audit_after(0, 10).await.unwrap();
    assert_eq!(audit.iter().map(|a| a.seq).collect::<Vec<_>>(), [1, 2]);
}

async fn record_issued(
    store: &Store,
    token: IssuedToken,
) -> Result<tally::audit::AuditRecord, StoreError> {
    let event = AuditEvent::new(AuditKind::TokenIssue, Outcome::Ok, token.iat)
        .actor(&token.sub)
        .field("jti", token.jti.as_str());
    store.record(Some(Write::Issued(token)), event).await
}

#[tokio::test]
async fn audit_records_are_numbered_without_gaps_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let key = key_text();
    {
        let store = Arc::new(open(dir.path(), &key).await);
        let tasks: Vec<_> = (0..50u64)
            .map(|i| {
                let store = Arc::clone(&store);
                tokio::spawn(async move {
                    store
                        .record(
                            None,
                            AuditEvent::new(AuditKind::Renew, Outcome::Ok, NOW + i),
                        )
                        .await
                })
            })
            .collect();
        let mut seqs = Vec::new();
        for t in tasks {
            seqs.push(t.await.unwrap().unwrap().seq);
        }
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>());
    }
    let store = open(dir.path(), &key).await;
    let next = store
        .record(
            None,
            AuditEvent::new(AuditKind::Attest, Outcome::Denied, NOW),
        )
        .await
        .unwrap();
    assert_eq!(next.seq, 51);
    let line: serde_json::Value = serde_json::from_str(&next.line).unwrap();
    assert_eq!(line["seq"], 51);
    assert_eq!(line["kind"], "identity.attest");
    let tail = store.audit_after(49, 10).await.unwrap();
    assert_eq!(tail.iter().map(|a| a.seq).collect::<Vec<_>>(), [50, 51]);
}

#[tokio::test]
async fn audit_queries_match_every_condition_given_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    let a = "spiffe://example.org/ns/a/sa/a";
    let events = [
        AuditEvent::new(AuditKind::TokenIssue, Outcome::Ok, NOW)
            .actor(a)
            .field("jti", "j1"),
        AuditEvent::new(AuditKind::TokenIssue, Outcome::Denied, NOW + 10)
            .actor("spiffe://example.org/b"),
        AuditEvent::new(AuditKind::Revoke, Outcome::Ok, NOW + 20)
            .actor("spiffe://example.org/admin")
            .field("jti", "j1"),
        AuditEvent::new(AuditKind::Attest, Outcome::Ok, NOW + 30).field("spiffe_id", a),
    ];
    for e in events {
        store.record(None, e).await.unwrap();
    }
    let seqs = |filter: AuditFilter| {
        let store = store.clone();
        async move {
            store
                .audit_query(&filter, 100)
                .await
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>()
        }
    };
    let f = AuditFilter::default;
    assert_eq!(seqs(f()).await, [1, 2, 3, 4]);
    assert_eq!(
        seqs(AuditFilter {
            jti: Some("j1".into()),
            ..f()
        })
        .await,
        [1, 3]
    );
    assert_eq!(
        seqs(AuditFilter {
            sub: Some(a.into()),
            ..f()
        })
        .await,
        [1, 4],
        "actor or spiffe_id"
    );
    assert_eq!(
        seqs(AuditFilter {
            kind: Some("token".into()),
            ..f()
        })
        .await,
        [1, 2, 3],
        "a family"
    );
    assert_eq!(
        seqs(AuditFilter {
            kind: Some("token.issue".into()),
            ..f()
        })
        .await,
        [1, 2]
    );
    // Not a pattern: `_` and `%` match themselves only.
    assert!(
        seqs(AuditFilter {
            kind: Some("token_issue".into()),
            ..f()
        })
        .await
        .is_empty()
    );
    assert!(
        seqs(AuditFilter {
            kind: Some("%".into()),
            ..f()
        })
        .await
        .is_empty()
    );
    assert_eq!(
        seqs(AuditFilter {
            since: Some(NOW + 10),
            until: Some(NOW + 30),
            ..f()
        })
        .await,
        [2, 3],
        "since inclusive, until exclusive"
    );
    assert_eq!(
        seqs(AuditFilter { after: 2, ..f() }).await,
        [3, 4],
        "paging"
    );
    // The head moves with every write and names the last record.
    let head = store.audit_head().await.unwrap();
    assert_eq!((head.chain_from, head.seq), (1, 4));
    let last = store.audit_after(3, 1).await.unwrap();
    assert_eq!(head.hash, tally::audit::ChainHash::of(&last[0].line));
}

/// Edits the store's file behind its back, as a database editor (or a bug
/// in some other program) could.
async fn tamper(dir: &std::path::Path, sql: &'static str) {
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(dir.join("tally.db"));
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    sqlx::query(sql).execute(&pool).await.unwrap();
    pool.close().await;
}

fn corrupt_at(err: &StoreError) -> Option<(&'static str, &'static str)> {
    match err {
        StoreError::CorruptRow { table, column, .. } => Some((table, column)),
        _ => None,
    }
}

#[tokio::test]
async fn a_stored_row_that_does_not_read_is_a_corrupt_row_naming_its_table_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), &key_text()).await;
    for i in [1, 2] {
        record_issued(&store, issued(i, NOW + 300)).await.unwrap();
    }
    let token = JoinToken::generate().unwrap();
    let id: SpiffeId = "spiffe://example.org/vm/build-1".parse().unwrap();
    store
        .create_join_token(&token.hash(), &id, NOW + 600, NOW)
        .await
        .unwrap();

    // A holder that is not a SPIFFE ID: not a guess (revoked, or skipped),
    // but an error saying where, without the value.
    tamper(
        dir.path(),
        "UPDATE issued_tokens SET sub = 'checkout-impostor' WHERE jti = 'jti-1'",
    )
    .await;
    let err = store
        .token_by_jti("jti-1", &issued(1, 0).token_hmac)
        .await
        .unwrap_err();
    assert_eq!(corrupt_at(&err), Some(("issued_tokens", "sub")), "{err:?}");
    assert!(!err.to_string().contains("impostor"), "{err}");
    let err = store.live_tokens(NOW, 10).await.unwrap_err();
    assert_eq!(corrupt_at(&err), Some(("issued_tokens", "sub")), "{err:?}");
    // The row beside it still reads.
    assert!(
        store
            .token_by_jti("jti-2", &issued(2, 0).token_hmac)
            .await
            .unwrap()
            .is_some()
    );

    // A negative time.
    tamper(
        dir.path(),
        "UPDATE issued_tokens SET exp = -1 WHERE jti = 'jti-2'",
    )
    .await;
    let err = store.token_exp("jti-2").await.unwrap_err();
    assert_eq!(corrupt_at(&err), Some(("issued_tokens", "exp")), "{err:?}");

    // A value of the wrong type.
    tamper(
        dir.path(),
        "UPDATE audit SET at = 'yesterday' WHERE seq = 1",
    )
    .await;
    let err = store.audit_after(0, 10).await.unwrap_err();
    assert_eq!(corrupt_at(&err), Some(("audit", "at")), "{err:?}");

    // A hash of the wrong length.
    tamper(dir.path(), "UPDATE audit_head SET hash = X'0102'").await;
    let err = store.audit_head().await.unwrap_err();
    assert_eq!(corrupt_at(&err), Some(("audit_head", "hash")), "{err:?}");
    assert_eq!(
        err.to_string(),
        "stored data is corrupt: audit_head.hash 2 bytes, not 32"
    );

    // A join token naming no SPIFFE ID is refused as corrupt, not used.
    tamper(dir.path(), "UPDATE join_tokens SET spiffe_id = 'build-1'").await;
    let err = store
        .consume_join_token(&token.hash(), NOW + 1)
        .await
        .unwrap_err();
    assert_eq!(
        corrupt_at(&err),
        Some(("join_tokens", "spiffe_id")),
        "{err:?}"
    );
}
