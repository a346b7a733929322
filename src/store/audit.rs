//! The audit log: recorded through the group-commit writer (`writer.rs`),
//! read back by sequence number or by query, its hash chain's head, and
//! archiving its beginning away.

use super::db::Sql;
use super::rows::{Cells, audit_from_row, head_from_row};
use super::{AuditFilter, AuditHead, Store, StoreError, Write};
use crate::audit::{AuditEvent, AuditRecord, ChainHash};
use tokio::sync::mpsc;

const AUDIT_AFTER: Sql =
    Sql::both("SELECT seq, at, kind, line FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2");
pub(super) const HEAD: Sql =
    Sql::both("SELECT chain_from, seq, hash, anchor FROM audit_head WHERE id = 1");
/// The head, locked against a replica's writer until the truncation
/// commits (SQLite's one writer needs no lock).
const HEAD_FOR_TRUNCATE: Sql = Sql::each(
    "SELECT chain_from, seq, hash, anchor FROM audit_head WHERE id = 1",
    "SELECT chain_from, seq, hash, anchor FROM audit_head WHERE id = 1 FOR UPDATE",
);
const LINE: Sql = Sql::both("SELECT line FROM audit WHERE seq = $1");
const DELETE_THROUGH: Sql = Sql::both("DELETE FROM audit WHERE seq <= $1");
const ANCHOR: Sql = Sql::both("UPDATE audit_head SET chain_from = $1, anchor = $2 WHERE id = 1");
/// Each condition is off when its parameter is NULL. A jti uses the
/// expression index; the others scan from `after`.
const QUERY: Sql = Sql::each(
    "SELECT seq, at, kind, line FROM audit WHERE seq > ?1 \
     AND (?2 IS NULL OR line->>'jti' = ?2) \
     AND (?3 IS NULL OR kind = ?3 OR substr(kind, 1, length(?3) + 1) = ?3 || '.') \
     AND (?4 IS NULL OR at >= ?4) \
     AND (?5 IS NULL OR at < ?5) \
     AND (?6 IS NULL OR line->>'actor' = ?6 OR line->>'spiffe_id' = ?6 OR line->>'sub' = ?6) \
     ORDER BY seq LIMIT ?7",
    "SELECT seq, at, kind, line FROM audit WHERE seq > $1 \
     AND ($2::text IS NULL OR (line::jsonb)->>'jti' = $2) \
     AND ($3::text IS NULL OR kind = $3 OR left(kind, length($3) + 1) = $3 || '.') \
     AND ($4::bigint IS NULL OR at >= $4) \
     AND ($5::bigint IS NULL OR at < $5) \
     AND ($6::text IS NULL OR (line::jsonb)->>'actor' = $6 OR (line::jsonb)->>'spiffe_id' = $6 \
          OR (line::jsonb)->>'sub' = $6) \
     ORDER BY seq LIMIT $7",
);

impl Store {
    /// Durably records an audit event, and with it (same transaction) an
    /// inventory record if given. Concurrent callers are batched into one
    /// transaction (group commit); this returns once this record is
    /// committed, with the sequence number the event got.
    ///
    /// # Errors
    /// [`StoreError`]; nothing was recorded, so an issued token or
    /// certificate must then not be handed out.
    pub async fn record(
        &self,
        write: Option<Write>,
        event: AuditEvent,
    ) -> Result<AuditRecord, StoreError> {
        self.writer.write(write, event).await
    }

    /// Sends every audit line, once committed, to `lines`, in commit
    /// order (the broker's JSON-lines file).
    pub fn tap_audit(&self, lines: mpsc::UnboundedSender<String>) {
        self.writer.tap(lines);
    }

    /// Audit records after sequence number `after`, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn audit_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let rows = self
            .db
            .query(AUDIT_AFTER, &[after.into(), limit.into()])
            .all()
            .await?;
        rows.iter().map(audit_from_row).collect()
    }

    /// Where the audit chain stands.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn audit_head(&self) -> Result<AuditHead, StoreError> {
        head_from_row(&self.db.query(HEAD, &[]).one().await?)
    }

    /// Removes the audit records up to `through` (archived elsewhere
    /// first), if record `through` hashes to `expect` (proof the caller
    /// holds what goes); the chain then starts after it, anchored on that
    /// hash. Returns how many records went.
    ///
    /// # Errors
    /// [`StoreError::Refused`] when the range or the hash is wrong;
    /// [`StoreError`] otherwise.
    pub async fn truncate_audit(
        &self,
        through: u64,
        expect: &ChainHash,
    ) -> Result<u64, StoreError> {
        let mut tx = self.db.begin().await?;
        let head = head_from_row(&tx.query(HEAD_FOR_TRUNCATE, &[]).one().await?)?;
        if through < head.chain_from || through > head.seq {
            return Err(StoreError::Refused(format!(
                "record {through} is not in the log (records {} to {})",
                head.chain_from, head.seq
            )));
        }
        let line = tx.query(LINE, &[through.into()]).one().await?;
        let found = ChainHash::of(&Cells::of("audit", &line).text("line")?);
        if found != *expect {
            return Err(StoreError::Refused(format!(
                "record {through} hashes to {found}, not {expect}: export it again"
            )));
        }
        let gone = tx
            .query(DELETE_THROUGH, &[through.into()])
            .execute()
            .await?;
        tx.query(ANCHOR, &[(through + 1).into(), expect.0.as_slice().into()])
            .execute()
            .await?;
        tx.commit().await?;
        Ok(gone)
    }

    /// Audit records matching `filter`, oldest first, at most `limit`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn audit_query(
        &self,
        filter: &AuditFilter,
        limit: u32,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let args = [
            filter.after.into(),
            filter.jti.as_deref().into(),
            filter.kind.as_deref().into(),
            filter.since.into(),
            filter.until.into(),
            filter.sub.as_deref().into(),
            limit.into(),
        ];
        let rows = self.db.query(QUERY, &args).all().await?;
        rows.iter().map(audit_from_row).collect()
    }
}
