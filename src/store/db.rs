//! The one executor the operation bodies run on, whichever the backend:
//! a statement in both dialects ([`Sql`]), its parameters ([`Arg`]), and
//! where it runs (a [`Pool`], a held [`Conn`] or a [`Tx`]). Each method
//! here picks the backend's text and driver; nothing else in the store
//! above this file asks which backend it is on, except the few things
//! only one of them has (see `sqlite.rs` and `postgres.rs`).

use sqlx::postgres::{PgConnection, PgPool, PgRow, Postgres};
use sqlx::sqlite::{Sqlite, SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{Connection as _, Database, Decode, Encode, Row as _, Type};

/// One statement in both dialects. Most are the same text in both
/// (SQLite reads `$1` as PostgreSQL does); a few differ where the
/// dialects do (JSON operators, row locks, casts).
#[derive(Clone, Copy)]
pub(super) struct Sql {
    sqlite: &'static str,
    postgres: &'static str,
}

impl Sql {
    /// A statement both dialects read alike.
    pub(super) const fn both(text: &'static str) -> Self {
        Self {
            sqlite: text,
            postgres: text,
        }
    }

    /// A statement each dialect writes its own way.
    pub(super) const fn each(sqlite: &'static str, postgres: &'static str) -> Self {
        Self { sqlite, postgres }
    }
}

/// A statement parameter: the three column types the store has, each
/// possibly NULL (a filter condition that is off).
#[derive(Clone, Copy)]
pub(super) enum Arg<'a> {
    /// A time, count or sequence number.
    Int(Option<i64>),
    /// Text.
    Text(Option<&'a str>),
    /// Bytes (a hash, a sealed value).
    Blob(Option<&'a [u8]>),
}

/// A time, count or sequence number as the database holds it (`BIGINT`):
/// one past `i64::MAX` is as far in the future as matters.
pub(super) fn db_int(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

impl From<u64> for Arg<'_> {
    fn from(v: u64) -> Self {
        Self::Int(Some(db_int(v)))
    }
}

impl From<Option<u64>> for Arg<'_> {
    fn from(v: Option<u64>) -> Self {
        Self::Int(v.map(db_int))
    }
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Self::Int(Some(v))
    }
}

impl From<u32> for Arg<'_> {
    fn from(v: u32) -> Self {
        Self::Int(Some(i64::from(v)))
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Self::Text(Some(v))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(v: Option<&'a str>) -> Self {
        Self::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Self::Blob(Some(v))
    }
}

impl<'a> From<Option<&'a [u8]>> for Arg<'a> {
    fn from(v: Option<&'a [u8]>) -> Self {
        Self::Blob(v)
    }
}

/// A Rust type both drivers read a column into.
pub(super) trait Column:
    for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

impl<T> Column for T where
    T: for<'r> Decode<'r, Sqlite> + Type<Sqlite> + for<'r> Decode<'r, Postgres> + Type<Postgres>
{
}

/// A returned row, from either backend.
pub(super) enum Row {
    /// From SQLite.
    Sqlite(SqliteRow),
    /// From PostgreSQL.
    Postgres(PgRow),
}

impl Row {
    /// Column `column` as `T`.
    pub(super) fn get<T: Column>(&self, column: &str) -> Result<T, sqlx::Error> {
        match self {
            Self::Sqlite(row) => row.try_get(column),
            Self::Postgres(row) => row.try_get(column),
        }
    }
}

/// A statement with its parameters bound, ready to run on `DB`.
fn bound<DB: Database>(
    sql: &'static str,
    args: &[Arg<'_>],
) -> sqlx::query::Query<'static, DB, DB::Arguments>
where
    Option<i64>: for<'t> Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t str>: Encode<'t, DB> + Type<DB>,
    for<'t> Option<&'t [u8]>: Encode<'t, DB> + Type<DB>,
{
    args.iter().fold(sqlx::query(sql), |query, arg| match *arg {
        Arg::Int(v) => query.bind(v),
        Arg::Text(v) => query.bind(v),
        Arg::Blob(v) => query.bind(v),
    })
}

/// Where a statement runs.
enum On<'a> {
    SqlitePool(&'a SqlitePool),
    Sqlite(&'a mut SqliteConnection),
    PostgresPool(&'a PgPool),
    Postgres(&'a mut PgConnection),
}

/// A statement about to run: [`Query::all`], [`Query::optional`],
/// [`Query::one`] or [`Query::execute`] runs it.
pub(super) struct Query<'a> {
    on: On<'a>,
    sql: Sql,
    args: &'a [Arg<'a>],
}

impl Query<'_> {
    /// Every row it returns.
    ///
    /// # Errors
    /// [`sqlx::Error`].
    pub(super) async fn all(self) -> Result<Vec<Row>, sqlx::Error> {
        let (sql, args) = (self.sql, self.args);
        Ok(match self.on {
            On::SqlitePool(p) => rows(bound(sql.sqlite, args).fetch_all(p).await?, Row::Sqlite),
            On::Sqlite(c) => rows(bound(sql.sqlite, args).fetch_all(c).await?, Row::Sqlite),
            On::PostgresPool(p) => {
                rows(bound(sql.postgres, args).fetch_all(p).await?, Row::Postgres)
            }
            On::Postgres(c) => rows(bound(sql.postgres, args).fetch_all(c).await?, Row::Postgres),
        })
    }

    /// Its first row, if it returns one.
    ///
    /// # Errors
    /// [`sqlx::Error`].
    pub(super) async fn optional(self) -> Result<Option<Row>, sqlx::Error> {
        let (sql, args) = (self.sql, self.args);
        Ok(match self.on {
            On::SqlitePool(p) => bound(sql.sqlite, args)
                .fetch_optional(p)
                .await?
                .map(Row::Sqlite),
            On::Sqlite(c) => bound(sql.sqlite, args)
                .fetch_optional(c)
                .await?
                .map(Row::Sqlite),
            On::PostgresPool(p) => bound(sql.postgres, args)
                .fetch_optional(p)
                .await?
                .map(Row::Postgres),
            On::Postgres(c) => bound(sql.postgres, args)
                .fetch_optional(c)
                .await?
                .map(Row::Postgres),
        })
    }

    /// Its one row.
    ///
    /// # Errors
    /// [`sqlx::Error::RowNotFound`] if it returns none; [`sqlx::Error`].
    pub(super) async fn one(self) -> Result<Row, sqlx::Error> {
        self.optional().await?.ok_or(sqlx::Error::RowNotFound)
    }

    /// Runs it; returns how many rows it changed.
    ///
    /// # Errors
    /// [`sqlx::Error`].
    pub(super) async fn execute(self) -> Result<u64, sqlx::Error> {
        let (sql, args) = (self.sql, self.args);
        Ok(match self.on {
            On::SqlitePool(p) => bound(sql.sqlite, args).execute(p).await?.rows_affected(),
            On::Sqlite(c) => bound(sql.sqlite, args).execute(c).await?.rows_affected(),
            On::PostgresPool(p) => bound(sql.postgres, args).execute(p).await?.rows_affected(),
            On::Postgres(c) => bound(sql.postgres, args).execute(c).await?.rows_affected(),
        })
    }
}

fn rows<R>(found: Vec<R>, wrap: fn(R) -> Row) -> Vec<Row> {
    found.into_iter().map(wrap).collect()
}

/// The store's connection pool.
#[derive(Debug, Clone)]
pub(super) enum Pool {
    /// The embedded file.
    Sqlite(SqlitePool),
    /// The database replicas share.
    Postgres(PgPool),
}

impl Pool {
    /// `sql` with `args`, on any pooled connection.
    pub(super) fn query<'a>(&'a self, sql: Sql, args: &'a [Arg<'a>]) -> Query<'a> {
        let on = match self {
            Self::Sqlite(p) => On::SqlitePool(p),
            Self::Postgres(p) => On::PostgresPool(p),
        };
        Query { on, sql, args }
    }

    /// A transaction on a pooled connection.
    ///
    /// # Errors
    /// [`sqlx::Error`].
    pub(super) async fn begin(&self) -> Result<Tx<'static>, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(p) => Tx::Sqlite(p.begin().await?),
            Self::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    /// One connection, held until dropped.
    ///
    /// # Errors
    /// [`sqlx::Error`].
    pub(super) async fn acquire(&self) -> Result<Conn, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(p) => Conn::Sqlite(p.acquire().await?),
            Self::Postgres(p) => Conn::Postgres(p.acquire().await?),
        })
    }
}

/// One connection taken from the pool (for a session-level lock, or a
/// writer that keeps its connection).
pub(super) enum Conn {
    /// SQLite.
    Sqlite(sqlx::pool::PoolConnection<Sqlite>),
    /// PostgreSQL.
    Postgres(sqlx::pool::PoolConnection<Postgres>),
}

impl Conn {
    /// `sql` with `args`, on this connection.
    pub(super) fn query<'a>(&'a mut self, sql: Sql, args: &'a [Arg<'a>]) -> Query<'a> {
        let on = match self {
            Self::Sqlite(c) => On::Sqlite(c),
            Self::Postgres(c) => On::Postgres(c),
        };
        Query { on, sql, args }
    }

    /// A transaction on this connection.
    ///
    /// # Errors
    /// [`sqlx::Error`].
    pub(super) async fn begin(&mut self) -> Result<Tx<'_>, sqlx::Error> {
        Ok(match self {
            Self::Sqlite(c) => Tx::Sqlite(c.begin().await?),
            Self::Postgres(c) => Tx::Postgres(c.begin().await?),
        })
    }
}

/// A transaction: rolled back when dropped unless committed.
pub(super) enum Tx<'c> {
    /// SQLite.
    Sqlite(sqlx::Transaction<'c, Sqlite>),
    /// PostgreSQL.
    Postgres(sqlx::Transaction<'c, Postgres>),
}

impl Tx<'_> {
    /// `sql` with `args`, in this transaction.
    pub(super) fn query<'a>(&'a mut self, sql: Sql, args: &'a [Arg<'a>]) -> Query<'a> {
        let on = match self {
            Self::Sqlite(t) => On::Sqlite(t),
            Self::Postgres(t) => On::Postgres(t),
        };
        Query { on, sql, args }
    }

    /// Runs a script of several statements without parameters (a
    /// migration), in this transaction.
    ///
    /// # Errors
    /// [`sqlx::Error`].
    pub(super) async fn script(&mut self, sql: &'static str) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(t) => {
                sqlx::raw_sql(sql).execute(&mut **t).await?;
            }
            Self::Postgres(t) => {
                sqlx::raw_sql(sql).execute(&mut **t).await?;
            }
        }
        Ok(())
    }

    /// Commits.
    ///
    /// # Errors
    /// [`sqlx::Error`]; nothing was committed.
    pub(super) async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Self::Sqlite(t) => t.commit().await,
            Self::Postgres(t) => t.commit().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::rows::Cells;

    async fn memory() -> Pool {
        Pool::Sqlite(SqlitePool::connect("sqlite::memory:").await.unwrap())
    }

    #[tokio::test]
    async fn sqlite_reads_numbered_parameters_as_postgresql_does() {
        // What lets most statements be one text for both dialects: `$n`
        // is the n-th bound value, however often and in whatever order
        // the text names it.
        let db = memory().await;
        let sql = Sql::both("SELECT $2 AS name, $1 AS n, $1 + $1 AS twice");
        let row = db
            .query(sql, &[20u64.into(), "checkout".into()])
            .one()
            .await
            .unwrap();
        let c = Cells::of("test", &row);
        assert_eq!(c.text("name").unwrap(), "checkout");
        assert_eq!(c.uint("n").unwrap(), 20);
        assert_eq!(c.uint("twice").unwrap(), 40);
    }

    #[tokio::test]
    async fn an_absent_filter_is_bound_as_null() {
        let db = memory().await;
        let sql = Sql::both("SELECT ($1 IS NULL) AS text_off, ($2 IS NULL) AS int_off");
        let absent: Option<&str> = None;
        let row = db
            .query(sql, &[absent.into(), Some(5u64).into()])
            .one()
            .await
            .unwrap();
        let c = Cells::of("test", &row);
        assert_eq!(
            (c.uint("text_off").unwrap(), c.uint("int_off").unwrap()),
            (1, 0)
        );
    }

    #[test]
    fn a_time_past_the_database_range_is_bound_as_the_largest_it_holds() {
        assert_eq!(db_int(u64::MAX), i64::MAX);
        assert_eq!(db_int(7), 7);
    }
}
