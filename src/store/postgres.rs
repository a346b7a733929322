//! The PostgreSQL store, for several broker replicas sharing one database.
//! Same tables and meaning as the SQLite store, in PostgreSQL's dialect,
//! and safe when replicas write at once:
//!
//! - audit records are numbered and hash-chained under a row lock on the
//!   chain's head, so replicas' batches interleave as whole batches and the
//!   chain stays one chain;
//! - change-feed entries are numbered under a row lock too, so sequence
//!   numbers become visible in order (a reader never sees 10 before 9),
//!   and each commit notifies `tally_changes` (LISTEN/NOTIFY), which every
//!   replica listens to so its Watch subscribers hear changes made
//!   elsewhere;
//! - secrets, the CA and join tokens use the same first-writer-wins and
//!   single-winner statements as SQLite.
//!
//! Durability is PostgreSQL's: a commit returns after its WAL is flushed.
//! Every connection sets `synchronous_commit = on` itself, so a database or
//! role default of `off` (or `local`/`remote_write` on a replica set up
//! for speed) cannot make an acknowledged write disappear in a crash; a
//! server running with `fsync = off` is reported at open, since no client
//! setting can undo it.

use super::rows::{
    audit_from_row, ca_from_row, change_from_row, head_from_row, identities_from_rows,
    issued_from_row, join_token_from_row, kid_exp_from_row, policy_from_row, signing_key_from_row,
    time_of, usage_from_row,
};
use super::{
    AuditFilter, AuditHead, Change, IdentityRecord, IssuedToken, JoinTokenRefusal, PolicyVersion,
    Sealer, SigningKeyRecord, StoreError, TokenFilter, TokenUsage, Write,
};
use crate::audit::{AuditEvent, AuditRecord, ChainHash};
use crate::ca::CaMaterial;
use crate::identity::{JoinTokenHash, SpiffeId};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::{Connection as _, Row};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

/// The channel change-feed commits notify.
pub const CHANGES_CHANNEL: &str = "tally_changes";
/// Most records committed in one transaction.
const MAX_BATCH: usize = 512;
/// Queued records before callers wait.
const QUEUE: usize = 8192;

/// Schema, as migrations. A PostgreSQL store starts at the SQLite store's
/// version 6 (no earlier PostgreSQL deployments exist); later migrations
/// carry the same numbers in both.
const MIGRATIONS: &[(i64, &str)] = &[
    (
        6,
        "
CREATE TABLE secrets (
    name        TEXT PRIMARY KEY,
    sealed      BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE TABLE ca (
    id                      INTEGER PRIMARY KEY CHECK (id = 1),
    root_cert_pem           TEXT NOT NULL,
    root_key_sealed         BYTEA,
    intermediate_cert_pem   TEXT NOT NULL,
    intermediate_key_sealed BYTEA NOT NULL,
    updated_at              BIGINT NOT NULL
);
CREATE TABLE signing_keys (
    kid          TEXT PRIMARY KEY,
    key_sealed   BYTEA NOT NULL,
    created_at   BIGINT NOT NULL,
    sign_from    BIGINT NOT NULL,
    retired_at   BIGINT,
    withdrawn_at BIGINT
);
CREATE TABLE join_tokens (
    hash        BYTEA PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL,
    used_at     BIGINT
);
CREATE TABLE issued_tokens (
    jti         TEXT PRIMARY KEY,
    sub         TEXT NOT NULL,
    aud         TEXT NOT NULL,
    scope       TEXT NOT NULL,
    class       TEXT NOT NULL,
    jkt         TEXT NOT NULL,
    iat         BIGINT NOT NULL,
    exp         BIGINT NOT NULL,
    kid         TEXT NOT NULL,
    token_hmac  BYTEA NOT NULL
);
CREATE INDEX issued_tokens_exp ON issued_tokens (exp);
CREATE INDEX issued_tokens_sub ON issued_tokens (sub);
CREATE TABLE svids (
    serial      TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    method      TEXT NOT NULL,
    issued_at   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX svids_expires_at ON svids (expires_at);
CREATE INDEX svids_spiffe_id ON svids (spiffe_id);
-- The line is kept as text: its exact bytes are what the chain hashes.
CREATE TABLE audit (
    seq         BIGINT PRIMARY KEY,
    at          BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    line        TEXT NOT NULL
);
CREATE INDEX audit_jti ON audit (((line::jsonb)->>'jti')) WHERE (line::jsonb)->>'jti' IS NOT NULL;
CREATE TABLE audit_head (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    chain_from  BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    hash        BYTEA NOT NULL
);
INSERT INTO audit_head (id, chain_from, seq, hash) VALUES (1, 1, 0, decode(repeat('00', 32), 'hex'));
CREATE TABLE changes (
    seq         BIGINT PRIMARY KEY,
    at_ms       BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    body        TEXT NOT NULL
);
CREATE INDEX changes_kind ON changes (kind, seq);
-- Numbers change-feed entries in commit order (a row lock, not a sequence).
CREATE TABLE change_head (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    seq         BIGINT NOT NULL
);
INSERT INTO change_head (id, seq) VALUES (1, 0);
CREATE TABLE policy_versions (
    version     BIGSERIAL PRIMARY KEY,
    created_at  BIGINT NOT NULL,
    author      TEXT NOT NULL,
    source      TEXT NOT NULL,
    comment     TEXT NOT NULL,
    yaml        TEXT NOT NULL
);
",
    ),
    (
        7,
        "
ALTER TABLE audit_head ADD COLUMN anchor BYTEA NOT NULL DEFAULT decode(repeat('00', 32), 'hex');
",
    ),
];

/// One queued write and its answer.
struct Pending {
    write: Option<Write>,
    event: AuditEvent,
    done: oneshot::Sender<Result<AuditRecord, StoreError>>,
}

/// Where the writer sends each committed audit line, in commit order.
type Tap = Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<String>>>>;

/// PostgreSQL backend of [`super::Store`].
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    sealer: Arc<Sealer>,
    writer: mpsc::Sender<Pending>,
    tap: Tap,
}

fn db_time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

impl PgStore {
    /// Connects to `url` (`postgres://user@host/db`) and migrates.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn open(url: &str, sealer: Sealer) -> Result<Self, StoreError> {
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
        migrate(&pool).await?;
        let fsync: String = sqlx::query_scalar("SHOW fsync").fetch_one(&pool).await?;
        if fsync != "on" {
            tracing::error!(
                fsync = %fsync,
                "the PostgreSQL server runs with fsync off: a crash of its machine can lose acknowledged writes"
            );
        }
        let (writer, queue) = mpsc::channel(QUEUE);
        let tap = Tap::default();
        tokio::spawn(group_commit(pool.clone(), queue, tap.clone()));
        Ok(Self {
            pool,
            sealer: Arc::new(sealer),
            writer,
            tap,
        })
    }

    /// The pool, for LISTEN.
    pub(super) fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub(super) async fn durability(&self) -> Result<Vec<(&'static str, String)>, StoreError> {
        let mut conn = self.pool.acquire().await?;
        let mut settings = Vec::new();
        for name in ["synchronous_commit", "fsync"] {
            let value: String = sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SHOW {name}")))
                .fetch_one(&mut *conn)
                .await?;
            settings.push((name, value));
        }
        Ok(settings)
    }

    pub(super) async fn schema_version(&self) -> Result<i64, StoreError> {
        let v: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(&self.pool)
            .await?;
        Ok(v.unwrap_or(0))
    }

    pub(super) async fn secret_or_create(
        &self,
        name: &str,
        generate: impl FnOnce() -> Zeroizing<Vec<u8>>,
        now: u64,
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let record = format!("secret/{name}");
        if let Some(found) = self.secret(&record).await? {
            return Ok(found);
        }
        let sealed = self.sealer.seal(&record, &generate())?;
        // Another replica may have won the race: keep whichever was first.
        sqlx::query(
            "INSERT INTO secrets (name, sealed, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
        )
        .bind(&record)
        .bind(sealed)
        .bind(db_time(now))
        .execute(&self.pool)
        .await?;
        self.secret(&record)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("{record} vanished after insert")))
    }

    async fn secret(&self, record: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let sealed: Option<Vec<u8>> =
            sqlx::query_scalar("SELECT sealed FROM secrets WHERE name = $1")
                .bind(record)
                .fetch_optional(&self.pool)
                .await?;
        sealed
            .map(|s| self.sealer.open(record, &s).map_err(StoreError::from))
            .transpose()
    }

    pub(super) async fn save_ca(
        &self,
        m: &CaMaterial,
        replace: bool,
        now: u64,
    ) -> Result<bool, StoreError> {
        let root_key = m
            .root_key_pem
            .as_ref()
            .map(|k| self.sealer.seal("ca/root", k.as_bytes()))
            .transpose()?;
        let inter_key = self
            .sealer
            .seal("ca/intermediate", m.intermediate_key_pem.as_bytes())?;
        const INSERT: &str = "INSERT INTO ca (id, root_cert_pem, root_key_sealed, intermediate_cert_pem, \
             intermediate_key_sealed, updated_at) VALUES (1, $1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING";
        const UPSERT: &str = "INSERT INTO ca (id, root_cert_pem, root_key_sealed, intermediate_cert_pem, \
             intermediate_key_sealed, updated_at) VALUES (1, $1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET \
             root_cert_pem = excluded.root_cert_pem, root_key_sealed = excluded.root_key_sealed, \
             intermediate_cert_pem = excluded.intermediate_cert_pem, \
             intermediate_key_sealed = excluded.intermediate_key_sealed, updated_at = excluded.updated_at";
        let done = sqlx::query(if replace { UPSERT } else { INSERT })
            .bind(&m.root_cert_pem)
            .bind(root_key)
            .bind(&m.intermediate_cert_pem)
            .bind(inter_key)
            .bind(db_time(now))
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn load_ca(&self) -> Result<Option<CaMaterial>, StoreError> {
        let Some(row) = sqlx::query(
            "SELECT root_cert_pem, root_key_sealed, intermediate_cert_pem, intermediate_key_sealed FROM ca WHERE id = 1",
        )
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        ca_from_row(&row, &self.sealer).map(Some)
    }

    pub(super) async fn insert_signing_key(&self, r: &SigningKeyRecord) -> Result<(), StoreError> {
        let sealed = self
            .sealer
            .seal(&format!("signing-key/{}", r.kid), &r.pkcs8)?;
        sqlx::query(
            "INSERT INTO signing_keys (kid, key_sealed, created_at, sign_from, retired_at, withdrawn_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(&r.kid)
        .bind(sealed)
        .bind(db_time(r.created_at))
        .bind(db_time(r.sign_from))
        .bind(r.retired_at.map(db_time))
        .bind(r.withdrawn_at.map(db_time))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn retire_signing_key(&self, kid: &str, at: u64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE signing_keys SET retired_at = $1 WHERE kid = $2 AND retired_at IS NULL",
        )
        .bind(db_time(at))
        .bind(kid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn withdraw_signing_key(&self, kid: &str, at: u64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE signing_keys SET withdrawn_at = $1, retired_at = LEAST(COALESCE(retired_at, $1), $1) \
             WHERE kid = $2",
        )
        .bind(db_time(at))
        .bind(kid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT kid, key_sealed, created_at, sign_from, retired_at, withdrawn_at \
             FROM signing_keys ORDER BY created_at, kid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| signing_key_from_row(row, &self.sealer))
            .collect()
    }

    pub(super) async fn create_join_token(
        &self,
        hash: &JoinTokenHash,
        id: &SpiffeId,
        expires_at: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO join_tokens (hash, spiffe_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
        )
        .bind(&hash.0[..])
        .bind(id.as_str())
        .bind(db_time(now))
        .bind(db_time(expires_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn join_token_identity(
        &self,
        hash: &JoinTokenHash,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        let row =
            sqlx::query("SELECT spiffe_id, used_at, expires_at FROM join_tokens WHERE hash = $1")
                .bind(&hash.0[..])
                .fetch_optional(&self.pool)
                .await?;
        join_token_from_row(row.as_ref(), now)
    }

    pub(super) async fn consume_join_token(
        &self,
        hash: &JoinTokenHash,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        // One statement decides: of concurrent callers (on any replica),
        // only one sees the row still unused.
        let claimed: Option<String> = sqlx::query_scalar(
            "UPDATE join_tokens SET used_at = $1 WHERE hash = $2 AND used_at IS NULL AND expires_at > $1 \
             RETURNING spiffe_id",
        )
        .bind(db_time(now))
        .bind(&hash.0[..])
        .fetch_optional(&self.pool)
        .await?;
        if let Some(id) = claimed {
            return id
                .parse()
                .map(Ok)
                .map_err(|e| StoreError::Corrupt(format!("join token SPIFFE ID: {e}")));
        }
        let used: Option<Option<i64>> =
            sqlx::query_scalar("SELECT used_at FROM join_tokens WHERE hash = $1")
                .bind(&hash.0[..])
                .fetch_optional(&self.pool)
                .await?;
        Ok(Err(match used {
            None => JoinTokenRefusal::Unknown,
            Some(Some(_)) => JoinTokenRefusal::AlreadyUsed,
            Some(None) => JoinTokenRefusal::Expired,
        }))
    }

    pub(super) async fn write(
        &self,
        write: Option<Write>,
        event: AuditEvent,
    ) -> Result<AuditRecord, StoreError> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(Pending { write, event, done })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        wait.await.map_err(|_| StoreError::WriterGone)?
    }

    pub(super) async fn audit_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, kind, line FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(db_time(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    pub(super) fn tap_audit(&self, lines: mpsc::UnboundedSender<String>) {
        *self
            .tap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(lines);
    }

    pub(super) async fn audit_head(&self) -> Result<AuditHead, StoreError> {
        let row = sqlx::query("SELECT chain_from, seq, hash, anchor FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        head_from_row(&row)
    }

    pub(super) async fn truncate_audit(
        &self,
        through: u64,
        expect: &ChainHash,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let head = sqlx::query(
            "SELECT chain_from, seq, hash, anchor FROM audit_head WHERE id = 1 FOR UPDATE",
        )
        .fetch_one(&mut *tx)
        .await?;
        let head = head_from_row(&head)?;
        if through < head.chain_from || through > head.seq {
            return Err(StoreError::Refused(format!(
                "record {through} is not in the log (records {} to {})",
                head.chain_from, head.seq
            )));
        }
        let line: String = sqlx::query_scalar("SELECT line FROM audit WHERE seq = $1")
            .bind(db_time(through))
            .fetch_one(&mut *tx)
            .await?;
        if ChainHash::of(&line) != *expect {
            return Err(StoreError::Refused(format!(
                "record {through} hashes to {}, not {expect}: export it again",
                ChainHash::of(&line)
            )));
        }
        let gone = sqlx::query("DELETE FROM audit WHERE seq <= $1")
            .bind(db_time(through))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("UPDATE audit_head SET chain_from = $1, anchor = $2 WHERE id = 1")
            .bind(db_time(through + 1))
            .bind(&expect.0[..])
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(gone)
    }

    pub(super) async fn audit_query(
        &self,
        filter: &AuditFilter,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at, kind, line FROM audit WHERE seq > $1 \
             AND ($2::text IS NULL OR (line::jsonb)->>'jti' = $2) \
             AND ($3::text IS NULL OR kind = $3 OR left(kind, length($3) + 1) = $3 || '.') \
             AND ($4::bigint IS NULL OR at >= $4) \
             AND ($5::bigint IS NULL OR at < $5) \
             AND ($6::text IS NULL OR (line::jsonb)->>'actor' = $6 OR (line::jsonb)->>'spiffe_id' = $6 \
                  OR (line::jsonb)->>'sub' = $6) \
             ORDER BY seq LIMIT $7",
        )
        .bind(db_time(filter.after))
        .bind(filter.jti.as_deref())
        .bind(filter.kind.as_deref())
        .bind(filter.since.map(db_time))
        .bind(filter.until.map(db_time))
        .bind(filter.sub.as_deref())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(audit_from_row).collect()
    }

    pub(super) async fn insert_policy_version(
        &self,
        author: &str,
        source: &str,
        comment: &str,
        yaml: &str,
        now: u64,
    ) -> Result<u64, StoreError> {
        let version: i64 = sqlx::query_scalar(
            "INSERT INTO policy_versions (created_at, author, source, comment, yaml) \
             VALUES ($1, $2, $3, $4, $5) RETURNING version",
        )
        .bind(db_time(now))
        .bind(author)
        .bind(source)
        .bind(comment)
        .bind(yaml)
        .fetch_one(&self.pool)
        .await?;
        u64::try_from(version).map_err(|_| StoreError::Corrupt("negative policy version".into()))
    }

    pub(super) async fn policy_version(
        &self,
        version: Option<u64>,
    ) -> Result<Option<PolicyVersion>, StoreError> {
        let row = match version {
            Some(v) => {
                sqlx::query("SELECT * FROM policy_versions WHERE version = $1")
                    .bind(db_time(v))
                    .fetch_optional(&self.pool)
                    .await?
            }
            None => {
                sqlx::query("SELECT * FROM policy_versions ORDER BY version DESC LIMIT 1")
                    .fetch_optional(&self.pool)
                    .await?
            }
        };
        row.as_ref().map(policy_from_row).transpose()
    }

    pub(super) async fn policy_versions(
        &self,
        limit: u32,
    ) -> Result<Vec<PolicyVersion>, StoreError> {
        let rows = sqlx::query("SELECT * FROM policy_versions ORDER BY version DESC LIMIT $1")
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(policy_from_row).collect()
    }

    pub(super) async fn policy_versions_since(
        &self,
        t: u64,
    ) -> Result<Vec<PolicyVersion>, StoreError> {
        let rows = sqlx::query(
            "SELECT * FROM policy_versions WHERE version >= \
             COALESCE((SELECT MAX(version) FROM policy_versions WHERE created_at <= $1), 0) \
             ORDER BY version",
        )
        .bind(db_time(t))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(policy_from_row).collect()
    }

    pub(super) async fn append_change(
        &self,
        kind: &str,
        body: &str,
        at_ms: u64,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        // The row lock orders appends from every replica: numbers become
        // visible in commit order.
        let seq: i64 =
            sqlx::query_scalar("UPDATE change_head SET seq = seq + 1 WHERE id = 1 RETURNING seq")
                .fetch_one(&mut *tx)
                .await?;
        sqlx::query("INSERT INTO changes (seq, at_ms, kind, body) VALUES ($1, $2, $3, $4)")
            .bind(seq)
            .bind(db_time(at_ms))
            .bind(kind)
            .bind(body)
            .execute(&mut *tx)
            .await?;
        // Delivered to listeners when (and only if) this commits.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CHANGES_CHANNEL)
            .bind(seq.to_string())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        u64::try_from(seq).map_err(|_| StoreError::Corrupt("negative change sequence".into()))
    }

    pub(super) async fn changes_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, kind, body FROM changes WHERE seq > $1 ORDER BY seq LIMIT $2",
        )
        .bind(db_time(after))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    pub(super) async fn latest_changes(&self) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, kind, body FROM changes \
             WHERE seq IN (SELECT MAX(seq) FROM changes GROUP BY kind) ORDER BY seq",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    pub(super) async fn current_state(&self, now: u64) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, kind, body FROM changes \
             WHERE seq IN (SELECT MAX(seq) FROM changes \
                 WHERE kind NOT IN ('revocation', 'denial') GROUP BY kind) \
             OR (kind = 'revocation' AND ((body::jsonb)->>'expires_at')::bigint > $1) \
             OR (seq IN (SELECT MAX(seq) FROM changes WHERE kind = 'denial' \
                     GROUP BY (body::jsonb)->>'spiffe_id') \
                 AND ((body::jsonb)->>'denied')::boolean) \
             ORDER BY seq",
        )
        .bind(db_time(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    pub(super) async fn token_exp(&self, jti: &str) -> Result<Option<u64>, StoreError> {
        let exp: Option<i64> = sqlx::query_scalar("SELECT exp FROM issued_tokens WHERE jti = $1")
            .bind(jti)
            .fetch_optional(&self.pool)
            .await?;
        Ok(exp.map(|e| u64::try_from(e).unwrap_or(0)))
    }

    pub(super) async fn latest_live_exp(
        &self,
        now: u64,
        issued_before: u64,
        sub: Option<&str>,
        jkt: Option<&str>,
    ) -> Result<Option<u64>, StoreError> {
        // Walks the exp index down from the latest: tokens issued after
        // `issued_before` are the only ones skipped.
        let exp: Option<i64> = sqlx::query_scalar(
            "SELECT exp FROM issued_tokens WHERE exp > $1 AND iat <= $2 \
             AND ($3::text IS NULL OR sub = $3) AND ($4::text IS NULL OR jkt = $4) \
             ORDER BY exp DESC LIMIT 1",
        )
        .bind(db_time(now))
        .bind(db_time(issued_before))
        .bind(sub)
        .bind(jkt)
        .fetch_optional(&self.pool)
        .await?;
        Ok(exp.map(|e| u64::try_from(e).unwrap_or(0)))
    }

    pub(super) async fn live_exp_by_kid(&self, now: u64) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = sqlx::query(
            "SELECT kid, MAX(exp) AS exp FROM issued_tokens WHERE exp > $1 GROUP BY kid",
        )
        .bind(db_time(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(kid_exp_from_row).collect()
    }

    pub(super) async fn count_issued(&self) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM issued_tokens")
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) async fn live_svids(&self, now: u64) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM svids WHERE expires_at > $1")
            .bind(db_time(now))
            .fetch_one(&self.pool)
            .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub(super) async fn live_tokens(
        &self,
        filter: &TokenFilter,
        limit: u32,
    ) -> Result<Vec<IssuedToken>, StoreError> {
        let (after_exp, after_jti) = filter
            .after
            .as_ref()
            .map_or((None, None), |(e, j)| (Some(db_time(*e)), Some(j.as_str())));
        let rows = sqlx::query(
            "SELECT jti, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac FROM issued_tokens \
             WHERE exp > $1 \
             AND ($2::bigint IS NULL OR exp > $2 OR (exp = $2 AND jti > $3)) \
             AND ($4::text IS NULL OR sub = $4) AND ($5::text IS NULL OR aud = $5) \
             AND ($6::text IS NULL OR class = $6) AND ($7::bigint IS NULL OR exp <= $7) \
             ORDER BY exp, jti LIMIT $8",
        )
        .bind(db_time(filter.now))
        .bind(after_exp)
        .bind(after_jti)
        .bind(filter.sub.as_deref())
        .bind(filter.aud.as_deref())
        .bind(filter.class.as_deref())
        .bind(filter.expires_by.map(db_time))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(issued_from_row).collect()
    }

    pub(super) async fn prune_inventory(&self, before: u64, limit: u32) -> Result<u64, StoreError> {
        let mut gone = 0;
        for sql in [
            "DELETE FROM issued_tokens WHERE jti IN \
             (SELECT jti FROM issued_tokens WHERE exp < $1 ORDER BY exp LIMIT $2)",
            "DELETE FROM svids WHERE serial IN \
             (SELECT serial FROM svids WHERE expires_at < $1 ORDER BY expires_at LIMIT $2)",
            "DELETE FROM join_tokens WHERE hash IN \
             (SELECT hash FROM join_tokens WHERE expires_at < $1 LIMIT $2)",
        ] {
            gone += sqlx::query(sql)
                .bind(db_time(before))
                .bind(i64::from(limit))
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        Ok(gone)
    }

    pub(super) async fn live_token_counts(&self, now: u64) -> Result<(u64, u64, u64), StoreError> {
        let row = sqlx::query(
            "SELECT COALESCE(SUM(n), 0)::bigint AS total, COUNT(*) AS holders, COALESCE(MAX(n), 0) AS most \
             FROM (SELECT COUNT(*) AS n FROM issued_tokens WHERE exp > $1 GROUP BY sub) AS per_holder",
        )
        .bind(db_time(now))
        .fetch_one(&self.pool)
        .await?;
        Ok((
            time_of(&row, "total")?,
            time_of(&row, "holders")?,
            time_of(&row, "most")?,
        ))
    }

    pub(super) async fn token_usage(&self, since: u64) -> Result<Vec<TokenUsage>, StoreError> {
        let rows = sqlx::query(
            "SELECT sub, aud, scope, class, COUNT(*) AS n, MAX(exp - iat) AS longest, MAX(iat) AS last \
             FROM issued_tokens WHERE exp >= $1 AND iat >= $1 \
             GROUP BY sub, aud, scope, class",
        )
        .bind(db_time(since))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(usage_from_row).collect()
    }

    pub(super) async fn identities(&self, now: u64) -> Result<Vec<IdentityRecord>, StoreError> {
        let svids = sqlx::query(
            "SELECT spiffe_id, MIN(issued_at) AS first, MAX(issued_at) AS last, \
             MAX(expires_at) AS expires, COUNT(*) AS n, \
             (SELECT method FROM svids s2 WHERE s2.spiffe_id = svids.spiffe_id \
              ORDER BY issued_at DESC LIMIT 1) AS method \
             FROM svids GROUP BY spiffe_id ORDER BY spiffe_id",
        )
        .fetch_all(&self.pool)
        .await?;
        let tokens = sqlx::query(
            "SELECT sub, MAX(iat) AS last, COUNT(*) AS n, COUNT(*) FILTER (WHERE exp > $1) AS live \
             FROM issued_tokens GROUP BY sub",
        )
        .bind(db_time(now))
        .fetch_all(&self.pool)
        .await?;
        identities_from_rows(&svids, &tokens)
    }

    pub(super) async fn token_by_jti(
        &self,
        jti: &str,
        hmac: &[u8; 32],
    ) -> Result<Option<IssuedToken>, StoreError> {
        let row = sqlx::query(
            "SELECT jti, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac FROM issued_tokens \
             WHERE jti = $1 AND token_hmac = $2",
        )
        .bind(jti)
        .bind(&hmac[..])
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(issued_from_row).transpose()
    }
}

/// Applies the migrations not yet applied. Replicas starting together
/// take an advisory lock, so exactly one migrates.
async fn migrate(pool: &PgPool) -> Result<(), StoreError> {
    let latest = MIGRATIONS.last().map_or(0, |(v, _)| *v);
    let mut conn = pool.acquire().await?;
    // An arbitrary constant naming "tally's schema" for the advisory lock.
    sqlx::query("SELECT pg_advisory_lock(7351001)")
        .execute(&mut *conn)
        .await?;
    let result = async {
        sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
            .execute(&mut *conn)
            .await?;
        let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
            .fetch_one(&mut *conn)
            .await?;
        let current = current.unwrap_or(0);
        if current > latest {
            return Err(StoreError::SchemaTooNew {
                found: current,
                supported: latest,
            });
        }
        for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            let mut tx = conn.begin().await?;
            sqlx::raw_sql(*sql).execute(&mut *tx).await?;
            sqlx::query("INSERT INTO schema_version (version) VALUES ($1)")
                .bind(version)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            tracing::info!(version, "applied store migration (PostgreSQL)");
        }
        Ok(())
    }
    .await;
    sqlx::query("SELECT pg_advisory_unlock(7351001)")
        .execute(&mut *conn)
        .await?;
    result
}

/// The writer task: whatever has queued is committed as one transaction,
/// numbered and chained after the head it locks, so batches from several
/// replicas form one chain.
async fn group_commit(pool: PgPool, mut queue: mpsc::Receiver<Pending>, tap: Tap) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match commit_batch(&pool, &batch).await {
            Ok(records) => {
                if let Some(tap) = tap
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .as_ref()
                {
                    for record in &records {
                        let _ = tap.send(record.line.clone());
                    }
                }
                for (p, record) in batch.drain(..).zip(records) {
                    let _ = p.done.send(Ok(record));
                }
            }
            Err(e) => {
                tracing::error!(error = %e, records = batch.len(), "group commit failed");
                for p in batch.drain(..) {
                    let _ = p.done.send(Err(StoreError::WriteFailed(e.to_string())));
                }
            }
        }
    }
}

async fn commit_batch(pool: &PgPool, batch: &[Pending]) -> Result<Vec<AuditRecord>, sqlx::Error> {
    use serde_json::Value;
    let mut tx = pool.begin().await?;
    let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE")
        .fetch_one(&mut *tx)
        .await?;
    let last: i64 = head.try_get("seq")?;
    let hash: Vec<u8> = head.try_get("hash")?;
    let prev = ChainHash(
        hash.try_into()
            .map_err(|_| sqlx::Error::Protocol("audit head hash is not 32 bytes".into()))?,
    );
    let first = u64::try_from(last).unwrap_or(0) + 1;
    let (records, head) = super::rows::chain_records(batch.iter().map(|p| &p.event), first, prev);
    let (issued, svids, audit) = super::rows::batch_rows(batch.iter().map(|p| &p.write), &records);
    if !issued.is_empty() {
        sqlx::query(
            "INSERT INTO issued_tokens (jti, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac) \
             SELECT jti, sub, aud, scope, class, jkt, iat, exp, kid, decode(token_hmac, 'hex') \
             FROM jsonb_to_recordset($1::jsonb) AS x(jti text, sub text, aud text, scope text, \
             class text, jkt text, iat bigint, exp bigint, kid text, token_hmac text)",
        )
        .bind(Value::Array(issued).to_string())
        .execute(&mut *tx)
        .await?;
    }
    if !svids.is_empty() {
        sqlx::query(
            "INSERT INTO svids (serial, spiffe_id, method, issued_at, expires_at) \
             SELECT serial, spiffe_id, method, issued_at, expires_at \
             FROM jsonb_to_recordset($1::jsonb) AS x(serial text, spiffe_id text, method text, \
             issued_at bigint, expires_at bigint)",
        )
        .bind(Value::Array(svids).to_string())
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO audit (seq, at, kind, line) SELECT seq, at, kind, line \
         FROM jsonb_to_recordset($1::jsonb) AS x(seq bigint, at bigint, kind text, line text)",
    )
    .bind(Value::Array(audit).to_string())
    .execute(&mut *tx)
    .await?;
    if let Some(last) = records.last() {
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(db_time(last.seq))
            .bind(&head.0[..])
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(records)
}
