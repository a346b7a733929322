//! The change feed behind Watch (JWKS, bundle, policy, revocations,
//! identity denials, numbered in commit order) and the stored versions of
//! the trust policy.

use super::db::{Pool, Sql};
use super::rows::{Cells, change_from_row, policy_from_row};
use super::{Change, PolicyVersion, Store, StoreError, postgres, sqlite};

const CHANGES_AFTER: Sql =
    Sql::both("SELECT seq, at_ms, kind, body FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2");
const LATEST_CHANGES: Sql = Sql::both(
    "SELECT seq, at_ms, kind, body FROM changes \
     WHERE seq IN (SELECT MAX(seq) FROM changes GROUP BY kind) ORDER BY seq",
);
const CURRENT_STATE: Sql = Sql::each(
    "SELECT seq, at_ms, kind, body FROM changes \
     WHERE seq IN (SELECT MAX(seq) FROM changes \
         WHERE kind NOT IN ('revocation', 'denial') GROUP BY kind) \
     OR (kind = 'revocation' AND CAST(json_extract(body, '$.expires_at') AS INTEGER) > ?) \
     OR (seq IN (SELECT MAX(seq) FROM changes WHERE kind = 'denial' \
             GROUP BY json_extract(body, '$.spiffe_id')) \
         AND json_extract(body, '$.denied') = 1) \
     ORDER BY seq",
    "SELECT seq, at_ms, kind, body FROM changes \
     WHERE seq IN (SELECT MAX(seq) FROM changes \
         WHERE kind NOT IN ('revocation', 'denial') GROUP BY kind) \
     OR (kind = 'revocation' AND ((body::jsonb)->>'expires_at')::bigint > $1) \
     OR (seq IN (SELECT MAX(seq) FROM changes WHERE kind = 'denial' \
             GROUP BY (body::jsonb)->>'spiffe_id') \
         AND ((body::jsonb)->>'denied')::boolean) \
     ORDER BY seq",
);
const INSERT_POLICY: Sql = Sql::both(
    "INSERT INTO policy_versions (created_at, author, source, comment, yaml) \
     VALUES ($1, $2, $3, $4, $5) RETURNING version",
);
const POLICY: Sql = Sql::both("SELECT * FROM policy_versions WHERE version = $1");
const NEWEST_POLICY: Sql = Sql::both("SELECT * FROM policy_versions ORDER BY version DESC LIMIT 1");
const NEWEST_POLICIES: Sql =
    Sql::both("SELECT * FROM policy_versions ORDER BY version DESC LIMIT $1");
const POLICIES_SINCE: Sql = Sql::both(
    "SELECT * FROM policy_versions WHERE version >= \
     COALESCE((SELECT MAX(version) FROM policy_versions WHERE created_at <= $1), 0) \
     ORDER BY version",
);

impl Store {
    /// Appends a change to the feed, durably; returns its sequence number.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn append_change(
        &self,
        kind: &str,
        body: &str,
        at_ms: u64,
    ) -> Result<u64, StoreError> {
        // How an entry gets its number in commit order is each backend's
        // own: SQLite's one writer, or a row lock shared by replicas (who
        // are then told, by NOTIFY).
        match &self.db {
            Pool::Sqlite(pool) => sqlite::append_change(pool, kind, body, at_ms).await,
            Pool::Postgres(pool) => postgres::append_change(pool, kind, body, at_ms).await,
        }
    }

    /// Changes after sequence number `after`, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn changes_after(&self, after: u64, limit: u32) -> Result<Vec<Change>, StoreError> {
        let rows = self
            .db
            .query(CHANGES_AFTER, &[after.into(), limit.into()])
            .all()
            .await?;
        rows.iter().map(change_from_row).collect()
    }

    /// The newest change of each kind, oldest first: the whole current
    /// state, for a subscriber starting fresh.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn latest_changes(&self) -> Result<Vec<Change>, StoreError> {
        let rows = self.db.query(LATEST_CHANGES, &[]).all().await?;
        rows.iter().map(change_from_row).collect()
    }

    /// What a fresh Watch subscriber needs at `now`: the newest JWKS,
    /// bundle and policy, every revocation that can still match a live
    /// token, and every identity denial in force (the newest `denial`
    /// entry per identity, when it denies; denials never expire); oldest
    /// first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn current_state(&self, now: u64) -> Result<Vec<Change>, StoreError> {
        let rows = self.db.query(CURRENT_STATE, &[now.into()]).all().await?;
        rows.iter().map(change_from_row).collect()
    }

    /// Stores a new policy version, durably; returns its number.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn insert_policy_version(
        &self,
        author: &str,
        source: &str,
        comment: &str,
        yaml: &str,
        now: u64,
    ) -> Result<u64, StoreError> {
        let args = [
            now.into(),
            author.into(),
            source.into(),
            comment.into(),
            yaml.into(),
        ];
        let row = self.db.query(INSERT_POLICY, &args).one().await?;
        Cells::of("policy_versions", &row).uint("version")
    }

    /// One policy version, or the newest with `None`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn policy_version(
        &self,
        version: Option<u64>,
    ) -> Result<Option<PolicyVersion>, StoreError> {
        let row = match version {
            Some(v) => self.db.query(POLICY, &[v.into()]).optional().await?,
            None => self.db.query(NEWEST_POLICY, &[]).optional().await?,
        };
        row.as_ref().map(policy_from_row).transpose()
    }

    /// The newest `limit` policy versions, newest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn policy_versions(&self, limit: u32) -> Result<Vec<PolicyVersion>, StoreError> {
        let rows = self
            .db
            .query(NEWEST_POLICIES, &[limit.into()])
            .all()
            .await?;
        rows.iter().map(policy_from_row).collect()
    }

    /// The policy version in force at `t` (the newest stored at or before
    /// it) and every later one, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn policy_versions_since(&self, t: u64) -> Result<Vec<PolicyVersion>, StoreError> {
        let rows = self.db.query(POLICIES_SINCE, &[t.into()]).all().await?;
        rows.iter().map(policy_from_row).collect()
    }
}
