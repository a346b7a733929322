//! The embedded SQLite store: one file in the data directory, WAL mode,
//! `synchronous=FULL` so a commit is on disk before it is acknowledged.
//! Issuance records go through one writer task that commits whatever has
//! queued up as a single transaction (group commit), so one fsync covers
//! many issuances.

use super::rows::{
    audit_from_row, ca_from_row, change_from_row, head_from_row, identities_from_rows,
    issued_from_row, join_token_from_row, kid_exp_from_row, policy_from_row, signing_key_from_row,
    time_of, usage_from_row,
};
use super::schema::{MIGRATIONS, latest};
use super::{
    AuditFilter, AuditHead, Change, IdentityRecord, IssuedToken, JoinTokenRefusal, PolicyVersion,
    Sealer, SigningKeyRecord, StoreError, TokenFilter, TokenUsage, Write,
};
use crate::audit::{AuditEvent, AuditRecord, ChainHash};
use crate::ca::CaMaterial;
use crate::identity::{JoinTokenHash, SpiffeId};
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

/// Most issuance records committed in one transaction.
const MAX_BATCH: usize = 512;
/// How often the WAL is copied into the database file. Often, so each
/// checkpoint is small: a large one makes the next commit's fsync wait for
/// its writes to reach the disk too.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// Queued issuance records before callers wait.
const QUEUE: usize = 8192;

/// One queued write: an optional inventory record and the audit event
/// that goes with it, committed together.
struct Pending {
    write: Option<Write>,
    event: AuditEvent,
    done: oneshot::Sender<Result<AuditRecord, StoreError>>,
}

/// Where the writer sends each committed audit line, in commit order.
type Tap = Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<String>>>>;

/// SQLite backend of [`super::Store`].
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    sealer: Arc<Sealer>,
    writer: mpsc::Sender<Pending>,
    tap: Tap,
}

fn db_time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

impl SqliteStore {
    /// Opens (creating if needed) and migrates the database at `path`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn open(path: &Path, sealer: Sealer) -> Result<Self, StoreError> {
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
        migrate(&pool).await?;
        let last: Option<i64> = sqlx::query_scalar("SELECT MAX(seq) FROM audit")
            .fetch_one(&pool)
            .await?;
        let last = u64::try_from(last.unwrap_or(0))
            .map_err(|_| StoreError::Corrupt("negative audit sequence".into()))?;
        let head = audit_head(&pool).await?;
        if head.seq != last {
            // Keep serving (the log is evidence, not a gate), but loudly:
            // `tally ctl audit verify` says what happened.
            tracing::error!(
                last_record = last,
                head = head.seq,
                "the audit log does not end where its last write did; run `tally ctl audit verify`"
            );
        }
        let (writer, queue) = mpsc::channel(QUEUE);
        let tap = Tap::default();
        let chain = Chain {
            next_seq: last + 1,
            prev: head.hash,
        };
        tokio::spawn(group_commit(pool.clone(), queue, chain, tap.clone()));
        tokio::spawn(checkpoints(pool.clone(), writer.downgrade()));
        Ok(Self {
            pool,
            sealer: Arc::new(sealer),
            writer,
            tap,
        })
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
             VALUES (?, ?, ?, ?, ?) RETURNING version",
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
                sqlx::query("SELECT * FROM policy_versions WHERE version = ?")
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
        let rows = sqlx::query("SELECT * FROM policy_versions ORDER BY version DESC LIMIT ?")
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
             COALESCE((SELECT MAX(version) FROM policy_versions WHERE created_at <= ?), 0) \
             ORDER BY version",
        )
        .bind(db_time(t))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(policy_from_row).collect()
    }

    pub(super) fn tap_audit(&self, lines: mpsc::UnboundedSender<String>) {
        *self
            .tap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(lines);
    }

    pub(super) async fn audit_head(&self) -> Result<AuditHead, StoreError> {
        audit_head(&self.pool).await
    }

    pub(super) async fn truncate_audit(
        &self,
        through: u64,
        expect: &ChainHash,
    ) -> Result<u64, StoreError> {
        let mut tx = self.pool.begin().await?;
        let head = sqlx::query("SELECT chain_from, seq, hash, anchor FROM audit_head WHERE id = 1")
            .fetch_one(&mut *tx)
            .await?;
        let head = head_from_row(&head)?;
        if through < head.chain_from || through > head.seq {
            return Err(StoreError::Refused(format!(
                "record {through} is not in the log (records {} to {})",
                head.chain_from, head.seq
            )));
        }
        let line: String = sqlx::query_scalar("SELECT line FROM audit WHERE seq = ?")
            .bind(db_time(through))
            .fetch_one(&mut *tx)
            .await?;
        if ChainHash::of(&line) != *expect {
            return Err(StoreError::Refused(format!(
                "record {through} hashes to {}, not {expect}: export it again",
                ChainHash::of(&line)
            )));
        }
        let gone = sqlx::query("DELETE FROM audit WHERE seq <= ?")
            .bind(db_time(through))
            .execute(&mut *tx)
            .await?
            .rows_affected();
        sqlx::query("UPDATE audit_head SET chain_from = ?, anchor = ? WHERE id = 1")
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
        // Each condition is off when its parameter is NULL. A jti uses the
        // expression index; the others scan from `after`.
        let rows = sqlx::query(
            "SELECT seq, at, kind, line FROM audit WHERE seq > ?1 \
             AND (?2 IS NULL OR line->>'jti' = ?2) \
             AND (?3 IS NULL OR kind = ?3 OR substr(kind, 1, length(?3) + 1) = ?3 || '.') \
             AND (?4 IS NULL OR at >= ?4) \
             AND (?5 IS NULL OR at < ?5) \
             AND (?6 IS NULL OR line->>'actor' = ?6 OR line->>'spiffe_id' = ?6 OR line->>'sub' = ?6) \
             ORDER BY seq LIMIT ?7",
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

    pub(super) async fn durability(&self) -> Result<Vec<(&'static str, String)>, StoreError> {
        let mut conn = self.pool.acquire().await?;
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
        sqlx::query("INSERT INTO secrets (name, sealed, created_at) VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING")
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
            sqlx::query_scalar("SELECT sealed FROM secrets WHERE name = ?")
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
             intermediate_key_sealed, updated_at) VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING";
        const UPSERT: &str = "INSERT INTO ca (id, root_cert_pem, root_key_sealed, intermediate_cert_pem, \
             intermediate_key_sealed, updated_at) VALUES (1, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET \
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
        sqlx::query("INSERT INTO signing_keys (kid, key_sealed, created_at, sign_from, retired_at) VALUES (?, ?, ?, ?, ?)")
            .bind(&r.kid)
            .bind(sealed)
            .bind(db_time(r.created_at))
            .bind(db_time(r.sign_from))
            .bind(r.retired_at.map(db_time))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn retire_signing_key(&self, kid: &str, at: u64) -> Result<(), StoreError> {
        sqlx::query("UPDATE signing_keys SET retired_at = ? WHERE kid = ? AND retired_at IS NULL")
            .bind(db_time(at))
            .bind(kid)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub(super) async fn withdraw_signing_key(&self, kid: &str, at: u64) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE signing_keys SET withdrawn_at = ?1, \
             retired_at = CASE WHEN retired_at IS NULL OR retired_at > ?1 THEN ?1 ELSE retired_at END \
             WHERE kid = ?2",
        )
        .bind(db_time(at))
        .bind(kid)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    pub(super) async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let rows = sqlx::query("SELECT kid, key_sealed, created_at, sign_from, retired_at, withdrawn_at FROM signing_keys ORDER BY created_at, kid")
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
            "INSERT INTO join_tokens (hash, spiffe_id, created_at, expires_at) VALUES (?, ?, ?, ?)",
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
            sqlx::query("SELECT spiffe_id, used_at, expires_at FROM join_tokens WHERE hash = ?")
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
        // One statement decides: of concurrent callers, only one sees the
        // row still unused.
        let claimed: Option<String> = sqlx::query_scalar(
            "UPDATE join_tokens SET used_at = ? WHERE hash = ? AND used_at IS NULL AND expires_at > ? RETURNING spiffe_id",
        )
        .bind(db_time(now))
        .bind(&hash.0[..])
        .bind(db_time(now))
        .fetch_optional(&self.pool)
        .await?;
        if let Some(id) = claimed {
            return id
                .parse()
                .map(Ok)
                .map_err(|e| StoreError::Corrupt(format!("join token SPIFFE ID: {e}")));
        }
        let row = sqlx::query("SELECT used_at FROM join_tokens WHERE hash = ?")
            .bind(&hash.0[..])
            .fetch_optional(&self.pool)
            .await?;
        Ok(Err(match row {
            None => JoinTokenRefusal::Unknown,
            Some(r) if r.try_get::<Option<i64>, _>("used_at")?.is_some() => {
                JoinTokenRefusal::AlreadyUsed
            }
            Some(_) => JoinTokenRefusal::Expired,
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
        let rows =
            sqlx::query("SELECT seq, at, kind, line FROM audit WHERE seq > ? ORDER BY seq LIMIT ?")
                .bind(db_time(after))
                .bind(i64::from(limit))
                .fetch_all(&self.pool)
                .await?;
        rows.iter().map(audit_from_row).collect()
    }

    pub(super) async fn append_change(
        &self,
        kind: &str,
        body: &str,
        at_ms: u64,
    ) -> Result<u64, StoreError> {
        let seq: i64 = sqlx::query_scalar(
            "INSERT INTO changes (at_ms, kind, body) VALUES (?, ?, ?) RETURNING seq",
        )
        .bind(db_time(at_ms))
        .bind(kind)
        .bind(body)
        .fetch_one(&self.pool)
        .await?;
        u64::try_from(seq).map_err(|_| StoreError::Corrupt("negative change sequence".into()))
    }

    pub(super) async fn changes_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<Change>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, at_ms, kind, body FROM changes WHERE seq > ? ORDER BY seq LIMIT ?",
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
             OR (kind = 'revocation' AND CAST(json_extract(body, '$.expires_at') AS INTEGER) > ?) \
             OR (seq IN (SELECT MAX(seq) FROM changes WHERE kind = 'denial' \
                     GROUP BY json_extract(body, '$.spiffe_id')) \
                 AND json_extract(body, '$.denied') = 1) \
             ORDER BY seq",
        )
        .bind(db_time(now))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(change_from_row).collect()
    }

    pub(super) async fn token_exp(&self, jti: &str) -> Result<Option<u64>, StoreError> {
        let exp: Option<i64> = sqlx::query_scalar("SELECT exp FROM issued_tokens WHERE jti = ?")
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
            "SELECT exp FROM issued_tokens WHERE exp > ?1 AND iat <= ?2 \
             AND (?3 IS NULL OR sub = ?3) AND (?4 IS NULL OR jkt = ?4) \
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
            "SELECT kid, MAX(exp) AS exp FROM issued_tokens WHERE exp > ? GROUP BY kid",
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
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM svids WHERE expires_at > ?")
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
        // Walks the exp index from `now` (or the page's last row); each
        // condition is off when its parameter is NULL.
        let (after_exp, after_jti) = filter
            .after
            .as_ref()
            .map_or((None, None), |(e, j)| (Some(db_time(*e)), Some(j.as_str())));
        let rows = sqlx::query(
            "SELECT jti, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac FROM issued_tokens \
             WHERE exp > ?1 \
             AND (?2 IS NULL OR exp > ?2 OR (exp = ?2 AND jti > ?3)) \
             AND (?4 IS NULL OR sub = ?4) AND (?5 IS NULL OR aud = ?5) \
             AND (?6 IS NULL OR class = ?6) AND (?7 IS NULL OR exp <= ?7) \
             ORDER BY exp, jti LIMIT ?8",
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
             (SELECT jti FROM issued_tokens WHERE exp < ?1 ORDER BY exp LIMIT ?2)",
            "DELETE FROM svids WHERE serial IN \
             (SELECT serial FROM svids WHERE expires_at < ?1 ORDER BY expires_at LIMIT ?2)",
            "DELETE FROM join_tokens WHERE hash IN \
             (SELECT hash FROM join_tokens WHERE expires_at < ?1 LIMIT ?2)",
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
            "SELECT COALESCE(SUM(n), 0) AS total, COUNT(*) AS holders, COALESCE(MAX(n), 0) AS most \
             FROM (SELECT COUNT(*) AS n FROM issued_tokens WHERE exp > ? GROUP BY sub)",
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
        // Tokens issued since `since` also expire after it: the exp index
        // narrows the scan.
        let rows = sqlx::query(
            "SELECT sub, aud, scope, class, COUNT(*) AS n, MAX(exp - iat) AS longest, MAX(iat) AS last \
             FROM issued_tokens WHERE exp >= ?1 AND iat >= ?1 \
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
            "SELECT sub, MAX(iat) AS last, COUNT(*) AS n, SUM(exp > ?) AS live \
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
             WHERE jti = ? AND token_hmac = ?",
        )
        .bind(jti)
        .bind(&hmac[..])
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(issued_from_row).transpose()
    }
}

async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)")
        .execute(pool)
        .await?;
    let current: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_version")
        .fetch_one(pool)
        .await?;
    let current = current.unwrap_or(0);
    if current > latest() {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported: latest(),
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(*sql).execute(&mut *tx).await?;
        sqlx::query("INSERT INTO schema_version (version) VALUES (?)")
            .bind(version)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        tracing::info!(version, "applied store migration");
    }
    Ok(())
}

async fn audit_head(pool: &SqlitePool) -> Result<AuditHead, StoreError> {
    let row = sqlx::query("SELECT chain_from, seq, hash, anchor FROM audit_head WHERE id = 1")
        .fetch_one(pool)
        .await?;
    head_from_row(&row)
}

/// Where the audit chain stands: the next record's number and the hash it
/// will carry.
struct Chain {
    next_seq: u64,
    prev: ChainHash,
}

/// Copies the WAL into the database file every [`CHECKPOINT_EVERY`], beside the writer
/// rather than inside its commits (PASSIVE: never waits for, nor blocks,
/// the writer). Ends when the store is dropped (`alive` no longer
/// upgrades).
async fn checkpoints(pool: SqlitePool, alive: mpsc::WeakSender<Pending>) {
    let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if alive.upgrade().is_none() {
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

/// The writer task: takes whatever has queued, commits it as one
/// transaction (audit records numbered and chained in queue order),
/// answers every caller in the batch, and hands the committed lines to the
/// tap in order.
async fn group_commit(
    pool: SqlitePool,
    mut queue: mpsc::Receiver<Pending>,
    mut chain: Chain,
    tap: Tap,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    let mut writer: Option<sqlx::pool::PoolConnection<sqlx::Sqlite>> = None;
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (records, prev) =
            super::rows::chain_records(batch.iter().map(|p| &p.event), chain.next_seq, chain.prev);
        // The writer keeps one connection: acquiring (and pinging) a pooled
        // one per batch cost a round trip on every commit.
        if writer.is_none() {
            writer = pool.acquire().await.ok();
        }
        let result = match writer.as_mut() {
            Some(conn) => insert_batch(conn, &batch, &records, &prev).await,
            None => Err(sqlx::Error::PoolClosed),
        };
        if result.is_err() {
            // A fresh connection for the next batch.
            writer = None;
        }
        match result {
            Ok(()) => {
                chain.next_seq += records.len() as u64;
                chain.prev = prev;
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
                // Nothing in the batch was recorded; sequence numbers (and
                // the chain) are taken up again by the next batch, so the
                // log has no gaps.
                tracing::error!(error = %e, records = batch.len(), "group commit failed");
                for p in batch.drain(..) {
                    let _ = p.done.send(Err(StoreError::WriteFailed(e.to_string())));
                }
            }
        }
    }
}

/// Writes a batch with a constant number of statements, whatever its size:
/// each table gets one `INSERT … SELECT … FROM json_each(?)` over a JSON
/// array of its rows. (One statement per row costs a round trip to the
/// SQLite worker thread each, which dominated commit time under load.)
async fn insert_batch(
    conn: &mut sqlx::SqliteConnection,
    batch: &[Pending],
    records: &[AuditRecord],
    head: &ChainHash,
) -> Result<(), sqlx::Error> {
    use serde_json::Value;
    let (issued, svids, audit) = super::rows::batch_rows(batch.iter().map(|p| &p.write), records);

    let mut tx = sqlx::Connection::begin(conn).await?;
    if !issued.is_empty() {
        sqlx::query(
            "INSERT INTO issued_tokens (jti, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac) \
             SELECT value->>'jti', value->>'sub', value->>'aud', value->>'scope', value->>'class', \
             value->>'jkt', value->>'iat', value->>'exp', value->>'kid', unhex(value->>'token_hmac') \
             FROM json_each(?)",
        )
        .bind(Value::Array(issued).to_string())
        .execute(&mut *tx)
        .await?;
    }
    if !svids.is_empty() {
        sqlx::query(
            "INSERT INTO svids (serial, spiffe_id, method, issued_at, expires_at) \
             SELECT value->>'serial', value->>'spiffe_id', value->>'method', value->>'issued_at', \
             value->>'expires_at' FROM json_each(?)",
        )
        .bind(Value::Array(svids).to_string())
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query(
        "INSERT INTO audit (seq, at, kind, line) \
         SELECT value->>'seq', value->>'at', value->>'kind', value->>'line' FROM json_each(?)",
    )
    .bind(Value::Array(audit).to_string())
    .execute(&mut *tx)
    .await?;
    if let Some(last) = records.last() {
        sqlx::query("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1")
            .bind(db_time(last.seq))
            .bind(&head.0[..])
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}
