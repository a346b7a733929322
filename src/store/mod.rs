//! The broker's durable state: CA material and signing keys (sealed),
//! join tokens (hashed), the inventory of issued tokens (never the token
//! itself) and X.509-SVIDs, the audit log, the change feed and the stored
//! policy versions. Writes that matter are durable (committed, fsynced)
//! before the call returns.
//!
//! # Layering
//!
//! - [`Store`] is the one interface the broker uses, whichever database is
//!   behind it: the embedded SQLite file (the default) or PostgreSQL
//!   (shared by broker replicas).
//! - Each operation is one method body, written once for both, in the file
//!   of its concern: `keys.rs` (secrets, CA, signing keys, join tokens),
//!   `audit.rs`, `feed.rs` (change feed, policy versions), `inventory.rs`,
//!   and `writer.rs` (group commit). A body names its statement, binds its
//!   parameters and reads the rows it gets back.
//! - A statement (`db::Sql`) is one text where both dialects read it
//!   alike, or one text each where they differ (JSON operators, row locks,
//!   casts); `db.rs` runs it on the backend's driver.
//! - Rows become typed records (`SpiffeId`, `Audience`, `Scopes`,
//!   `TokenClass`, `Jkt`) once, in `rows.rs`; one that does not read is
//!   [`StoreError::CorruptRow`], never a guess.
//! - What only one backend has stays in its file, small: connection setup,
//!   SQLite's pragmas and checkpoints (`sqlite.rs`); PostgreSQL's
//!   synchronous commit, advisory-locked migrations, LISTEN/NOTIFY and
//!   row-locked numbering (`postgres.rs`); the schema in each dialect
//!   (`schema.rs`).
//!
//! ```text
//! Store::token_by_jti            inventory.rs: the one body
//!   TOKEN_BY_JTI: Sql            the statement (one text, or one per dialect)
//!   Pool::query(..).optional()   db.rs: run on SQLite's or PostgreSQL's driver
//!   rows::issued_from_row        rows.rs: an IssuedToken, or CorruptRow
//! ```

mod audit;
mod db;
mod deployment;
mod feed;
mod inventory;
mod keys;
mod postgres;
mod records;
mod rows;
mod schema;
pub mod seal;
mod sqlite;
mod writer;

pub use records::{
    AuditFilter, AuditHead, Change, IdentityRecord, IssuedToken, PolicyVersion, SigningKeyRecord,
    SvidRecord, TokenFilter, TokenUsage, Write,
};
pub use seal::{SealError, Sealer};

use db::Pool;
use std::sync::Arc;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O, corruption, locked past the timeout).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database holds a newer schema than this build understands.
    #[error(
        "database schema version {found} is newer than this build's {supported}; upgrade tally"
    )]
    SchemaTooNew {
        /// In the database.
        found: i64,
        /// Known to this build.
        supported: i64,
    },
    /// A sealed value does not open.
    #[error("{0}")]
    Seal(#[from] SealError),
    /// A stored value is not what it should be.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// A stored row does not read as what its table holds (edited by
    /// hand, or written by something else): a time that is negative, a
    /// holder that is not a SPIFFE ID, a hash of the wrong length. Names
    /// where, never the value.
    #[error("stored data is corrupt: {table}.{column} {reason}")]
    CorruptRow {
        /// The table.
        table: &'static str,
        /// The column.
        column: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The group-commit writer has stopped.
    #[error("the store's writer has stopped")]
    WriterGone,
    /// A group commit failed; nothing in it was recorded.
    #[error("recording issued tokens failed: {0}")]
    WriteFailed(String),
    /// The request does not fit what is stored (the reason says how).
    #[error("{0}")]
    Refused(String),
}

/// Why a join token was not accepted. Each case is audited; callers see
/// one generic refusal so a probe learns nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinTokenRefusal {
    /// No such token.
    #[error("unknown join token")]
    Unknown,
    /// Past its expiry.
    #[error("join token expired")]
    Expired,
    /// Already used once.
    #[error("join token already used")]
    AlreadyUsed,
}

/// The broker's store.
#[derive(Debug, Clone)]
pub struct Store {
    db: Pool,
    sealer: Arc<Sealer>,
    writer: writer::Writer,
}

impl Store {
    /// Opens (creating and migrating) a SQLite store at `path`.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be opened or migrated.
    pub async fn open_sqlite(path: &std::path::Path, sealer: Sealer) -> Result<Self, StoreError> {
        sqlite::open(path, sealer).await
    }

    /// Connects (and migrates) a PostgreSQL store at `url`.
    ///
    /// # Errors
    /// [`StoreError`] if it cannot connect or migrate.
    pub async fn open_postgres(url: &str, sealer: Sealer) -> Result<Self, StoreError> {
        postgres::open(url, sealer).await
    }

    /// Whether replicas may share this store (PostgreSQL), so every
    /// broker on it must be configured alike.
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Pool::Postgres(_))
    }

    /// For a store shared by replicas, a stream of change-feed sequence
    /// numbers committed by anyone (PostgreSQL LISTEN); `None` for the
    /// embedded store, whose only writer is this process.
    ///
    /// # Errors
    /// [`StoreError`] if listening fails.
    pub async fn listen_changes(&self) -> Result<Option<sqlx::postgres::PgListener>, StoreError> {
        match &self.db {
            Pool::Sqlite(_) => Ok(None),
            Pool::Postgres(pool) => postgres::listen(pool).await.map(Some),
        }
    }

    /// The settings an acknowledged write's durability rests on, as the
    /// database reports them on one of the store's own connections:
    /// SQLite `journal_mode` (`wal`) and `synchronous` (`2`, FULL: each
    /// commit is fsynced); PostgreSQL `synchronous_commit` (`on`: a commit
    /// returns once its WAL is flushed) and `fsync` (the server's; `off`
    /// would make the flush a no-op).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn durability(&self) -> Result<Vec<(&'static str, String)>, StoreError> {
        match &self.db {
            Pool::Sqlite(pool) => sqlite::durability(pool).await,
            Pool::Postgres(pool) => postgres::durability(pool).await,
        }
    }

    /// The schema version in the database.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        schema::version(&mut self.db.acquire().await?).await
    }
}
