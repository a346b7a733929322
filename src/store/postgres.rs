//! What only the PostgreSQL store has, for several broker replicas sharing
//! one database. The operations themselves are the SQLite store's, in
//! PostgreSQL's dialect where it differs; what is here makes them safe
//! when replicas write at once:
//!
//! - audit records are numbered and hash-chained under a row lock on the
//!   chain's head (`writer.rs`), so replicas' batches interleave as whole
//!   batches and the chain stays one chain;
//! - change-feed entries are numbered under a row lock too, so sequence
//!   numbers become visible in order (a reader never sees 10 before 9),
//!   and each commit notifies [`CHANGES_CHANNEL`] (LISTEN/NOTIFY), which
//!   every replica listens to so its Watch subscribers hear changes made
//!   elsewhere;
//! - replicas starting together migrate under an advisory lock.
//!
//! Durability is PostgreSQL's: a commit returns after its WAL is flushed.
//! Every connection sets `synchronous_commit = on` itself, so a database or
//! role default of `off` (or `local`/`remote_write` on a replica set up
//! for speed) cannot make an acknowledged write disappear in a crash; a
//! server running with `fsync = off` is reported at open, since no client
//! setting can undo it.

use super::db::{Pool, Row, Sql};
use super::rows::Cells;
use super::writer::{Numbering, Writer};
use super::{Sealer, Store, StoreError, schema};
use sqlx::postgres::{PgListener, PgPool, PgPoolOptions};
use std::sync::Arc;
use std::time::Duration;

/// The channel change-feed commits notify.
pub(super) const CHANGES_CHANNEL: &str = "tally_changes";

/// An arbitrary constant naming "tally's schema" for the advisory lock.
const MIGRATION_LOCK: Sql = Sql::both("SELECT pg_advisory_lock(7351001)");
const MIGRATION_UNLOCK: Sql = Sql::both("SELECT pg_advisory_unlock(7351001)");

/// Connects to `url` (`postgres://user@host/db`) and migrates.
///
/// # Errors
/// [`StoreError`].
pub(super) async fn open(url: &str, sealer: Sealer) -> Result<Store, StoreError> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .acquire_timeout(Duration::from_secs(10))
        .after_connect(|conn, _| {
            Box::pin(async move {
                sqlx::query("SET synchronous_commit = on")
                    .execute(&mut *conn)
                    .await?;
                Ok(())
            })
        })
        .connect(url)
        .await?;
    let db = Pool::Postgres(pool.clone());
    migrate(&db).await?;
    let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&pool).await?;
    if fsync != "on" {
        tracing::error!(
            fsync = %fsync,
            "the PostgreSQL server runs with fsync off: a crash of its machine can lose acknowledged writes"
        );
    }
    let writer = Writer::spawn(db.clone(), Numbering::Shared);
    Ok(Store {
        db,
        sealer: Arc::new(sealer),
        writer,
    })
}

/// Applies the migrations not yet applied. Replicas starting together
/// take an advisory lock (held by the session, so on one connection), so
/// exactly one migrates.
async fn migrate(db: &Pool) -> Result<(), StoreError> {
    let mut conn = db.acquire().await?;
    conn.query(MIGRATION_LOCK, &[]).execute().await?;
    let result = schema::migrate(&mut conn, schema::POSTGRES).await;
    conn.query(MIGRATION_UNLOCK, &[]).execute().await?;
    result
}

/// `synchronous_commit` and `fsync`, on one of the store's connections.
///
/// # Errors
/// [`StoreError::Database`].
pub(super) async fn durability(pool: &PgPool) -> Result<Vec<(&'static str, String)>, StoreError> {
    let mut conn = pool.acquire().await?;
    let mut settings = Vec::new();
    for name in ["synchronous_commit", "fsync"] {
        let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
            .fetch_one(&mut *conn)
            .await?;
        settings.push((name, value));
    }
    Ok(settings)
}

/// A listener on [`CHANGES_CHANNEL`].
///
/// # Errors
/// [`StoreError::Database`].
pub(super) async fn listen(pool: &PgPool) -> Result<PgListener, StoreError> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(CHANGES_CHANNEL).await?;
    Ok(listener)
}

/// Appends to the change feed, numbered under the counter's row lock (so
/// numbers from every replica become visible in commit order), and
/// notifies listeners when (and only if) it commits.
///
/// # Errors
/// [`StoreError`].
pub(super) async fn append_change(
    pool: &PgPool,
    kind: &str,
    body: &str,
    at_ms: u64,
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query("UPDATE change_head SET seq = seq + 1 WHERE id = 1 RETURNING seq")
        .fetch_one(&mut *tx)
        .await?;
    let seq = Cells::of("change_head", &Row::Postgres(row)).uint("seq")?;
    sqlx::query("INSERT INTO changes (seq, at_ms, kind, body) VALUES ($1, $2, $3, $4)")
        .bind(super::db::db_int(seq))
        .bind(super::db::db_int(at_ms))
        .bind(kind)
        .bind(body)
        .execute(&mut *tx)
        .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANGES_CHANNEL)
        .bind(seq.to_string())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(seq)
}
