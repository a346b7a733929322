//! What only the embedded SQLite store has: one file in the data
//! directory in WAL mode, `synchronous=FULL` so a commit is on disk
//! before it is acknowledged, checkpoints beside the single writer
//! rather than inside its commits, and change-feed numbers from the row
//! id (this process is the only writer).

use super::db::{Pool, Row};
use super::rows::Cells;
use super::writer::{Alive, Chain, Numbering, Writer};
use super::{Sealer, Store, StoreError, schema};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// How often the WAL is copied into the database file. Often, so each
/// checkpoint is small: a large one makes the next commit's fsync wait for
/// its writes to reach the disk too.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// Opens (creating if needed) and migrates the database at `path`.
///
/// # Errors
/// [`StoreError`].
pub(super) async fn open(path: &Path, sealer: Sealer) -> Result<Store, StoreError> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .busy_timeout(Duration::from_secs(10))
        .foreign_keys(true)
        // Reads through a memory map and a 32 MiB page cache instead of
        // a read() per page: under issuance load the page reads were a
        // visible share of the broker's CPU.
        .pragma("mmap_size", "268435456")
        .pragma("cache_size", "-32768")
        // No checkpoint inside a commit: it stalled every writer for
        // hundreds of milliseconds under load. A background task
        // checkpoints instead (see `checkpoints`).
        .pragma("wal_autocheckpoint", "0")
        // Statement journals (multi-row inserts inside a transaction)
        // in memory, not in a temporary file written per batch.
        .pragma("temp_store", "MEMORY");
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(options)
        .await?;
    let db = Pool::Sqlite(pool.clone());
    schema::migrate(&mut db.acquire().await?, schema::SQLITE).await?;
    let last = Row::Sqlite(
        sqlx::query("SELECT COALESCE(MAX(seq), 0) AS seq FROM audit")
            .fetch_one(&pool)
            .await?,
    );
    let last = Cells::of("audit", &last).uint("seq")?;
    let head = super::rows::head_from_row(&db.query(super::audit::HEAD, &[]).one().await?)?;
    if head.seq != last {
        // Keep serving (the log is evidence, not a gate), but loudly:
        // `tally ctl audit verify` says what happened.
        tracing::error!(
            last_record = last,
            head = head.seq,
            "the audit log does not end where its last write did; run `tally ctl audit verify`"
        );
    }
    let chain = Chain {
        next_seq: last + 1,
        prev: head.hash,
    };
    let writer = Writer::spawn(db.clone(), Numbering::Local(chain));
    tokio::spawn(checkpoints(pool, writer.alive()));
    Ok(Store {
        db,
        sealer: Arc::new(sealer),
        writer,
    })
}

/// `journal_mode` and `synchronous`, on one of the store's connections.
///
/// # Errors
/// [`StoreError::Database`].
pub(super) async fn durability(
    pool: &SqlitePool,
) -> Result<Vec<(&'static str, String)>, StoreError> {
    let mut conn = pool.acquire().await?;
    let journal: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut *conn)
        .await?;
    let synchronous: i64 = sqlx::query_scalar("PRAGMA synchronous")
        .fetch_one(&mut *conn)
        .await?;
    Ok(vec![
        ("journal_mode", journal),
        ("synchronous", synchronous.to_string()),
    ])
}

/// Appends to the change feed: the row id numbers it, in commit order.
///
/// # Errors
/// [`StoreError`].
pub(super) async fn append_change(
    pool: &SqlitePool,
    kind: &str,
    body: &str,
    at_ms: u64,
) -> Result<u64, StoreError> {
    let row = sqlx::query("INSERT INTO changes (at_ms, kind, body) VALUES (?, ?, ?) RETURNING seq")
        .bind(super::db::db_int(at_ms))
        .bind(kind)
        .bind(body)
        .fetch_one(pool)
        .await?;
    Cells::of("changes", &Row::Sqlite(row)).uint("seq")
}

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`],
/// beside the writer rather than inside its commits (PASSIVE: never
/// waits for, nor blocks, the writer). Ends when the store is dropped.
async fn checkpoints(pool: SqlitePool, alive: Alive) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if !alive.get() {
            return;
        }
        // PASSIVE copies nearly everything without holding up the writer;
        // RESTART then copies the few frames committed meanwhile, holding
        // the writer for that moment, so the next commit starts the WAL
        // from its beginning. (Passive checkpoints alone never let the WAL
        // restart under continuous writes: it grew by ~60 MB/s.)
        for mode in [
            "PRAGMA wal_checkpoint(PASSIVE)",
            "PRAGMA wal_checkpoint(RESTART)",
        ] {
            let started = std::time::Instant::now();
            if let Err(e) = sqlx::query(mode).execute(&pool).await {
                tracing::warn!(error = %e, "WAL checkpoint failed; retrying shortly");
                break;
            }
            let took = started.elapsed();
            if took > Duration::from_millis(20) {
                tracing::warn!(?took, mode, "slow WAL checkpoint");
            } else {
                tracing::debug!(?took, mode, "WAL checkpoint");
            }
        }
    }
}
