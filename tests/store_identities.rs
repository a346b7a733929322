//! The inventory's identities on a real SQLite file: since when each
//! workload has been known survives the pruning of its old SVIDs.

mod support;

use tally::audit::{AuditEvent, AuditKind, Outcome};
use tally::store::{Sealer, Store, SvidRecord, Write};

const NOW: u64 = 1_800_000_000;
const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";

async fn svid(store: &Store, serial: &str, issued_at: u64) {
    let id = CHECKOUT.parse().unwrap();
    let event = AuditEvent::new(AuditKind::Renew, Outcome::Ok, issued_at).actor(&id);
    store
        .record(
            Some(Write::Svid(SvidRecord {
                serial: serial.into(),
                spiffe_id: id,
                method: "renew",
                issued_at,
                expires_at: issued_at + 3600,
                pod: None,
            })),
            event,
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn an_identity_is_first_seen_at_its_first_svid_after_that_svid_is_pruned() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(
        &dir.path().join("tally.db"),
        Sealer::from_key_material(Sealer::generate_key_text().unwrap().as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    svid(&store, "01", NOW).await;
    svid(&store, "02", NOW + 1800).await;
    svid(&store, "03", NOW + 90 * 86_400).await;
    // The first two expired long ago and are pruned.
    let gone = store.prune_inventory(NOW + 30 * 86_400, 100).await.unwrap();
    assert_eq!(gone, 2);
    let ids = store.identities(NOW + 90 * 86_400).await.unwrap();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].svids, 1, "only the newest SVID row is left");
    assert_eq!(ids[0].first_seen, NOW, "first seen at the first SVID");
    assert_eq!(ids[0].last_seen(), NOW + 90 * 86_400);
}

#[tokio::test]
async fn svid_rows_from_before_pods_still_read_and_new_ones_keep_their_pod() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tally.db");
    let key = Sealer::generate_key_text().unwrap();
    let open = || Store::open_sqlite(&path, Sealer::from_key_material(key.as_bytes()).unwrap());
    drop(open().await.unwrap());
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    for sql in support::cluster::BEFORE_PODS {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    pool.close().await;
    support::cluster::pods_survive_the_migration(&open().await.unwrap()).await;
}

#[tokio::test]
async fn token_rows_from_before_kinds_read_as_access_tokens_and_jwt_svids_and_wits_sit_beside_them()
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tally.db");
    let key = Sealer::generate_key_text().unwrap();
    let open = || Store::open_sqlite(&path, Sealer::from_key_material(key.as_bytes()).unwrap());
    drop(open().await.unwrap());
    let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path);
    let pool = sqlx::SqlitePool::connect_with(options).await.unwrap();
    for sql in support::inventory::before_kinds(false) {
        sqlx::query(sqlx::AssertSqlSafe(sql))
            .execute(&pool)
            .await
            .unwrap();
    }
    pool.close().await;
    let store = open().await.unwrap();
    support::inventory::old_tokens_read_as_access_tokens(&store).await;
    drop(store);

    let other = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(
        &other.path().join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    support::inventory::jwt_svids_sit_beside_access_tokens(&store).await;
    support::inventory::wits_sit_beside_other_tokens(&store).await;
}
