//! Group commit: issuance records, SVID rows and their audit records go
//! through one writer task per store, which commits whatever has queued
//! as one transaction (one fsync for many issuances), numbers and chains
//! the audit records in queue order, answers every caller in the batch,
//! and hands the committed lines to the tap in commit order.
//!
//! Where a batch's chain continues is the one thing the backends do
//! differently ([`Numbering`]): SQLite has one writer, this task, which
//! keeps the chain's position itself; PostgreSQL replicas share the chain,
//! so each batch locks the head row and continues from what it holds.

use super::db::{Conn, Pool, Sql, Tx};
use super::rows::{Cells, batch_rows, chain_records};
use super::{StoreError, Write};
use crate::audit::{AuditEvent, AuditRecord, ChainHash};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};

/// Most records committed in one transaction.
const MAX_BATCH: usize = 512;
/// Queued records before callers wait.
const QUEUE: usize = 8192;

/// Each table gets one `INSERT … SELECT` over a JSON array of its rows,
/// whatever the batch's size (one statement per row cost a round trip
/// each, which dominated commit time under load).
const INSERT_ISSUED: Sql = Sql::each(
    "INSERT INTO issued_tokens \
     (jti, kind, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac) \
     SELECT value->>'jti', value->>'kind', value->>'sub', value->>'aud', value->>'scope', \
     value->>'class', value->>'jkt', value->>'iat', value->>'exp', value->>'kid', \
     unhex(value->>'token_hmac') FROM json_each(?)",
    "INSERT INTO issued_tokens \
     (jti, kind, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac) \
     SELECT jti, kind, sub, aud, scope, class, jkt, iat, exp, kid, decode(token_hmac, 'hex') \
     FROM jsonb_to_recordset($1::jsonb) AS x(jti text, kind text, sub text, aud text, \
     scope text, class text, jkt text, iat bigint, exp bigint, kid text, token_hmac text)",
);
const INSERT_SVIDS: Sql = Sql::each(
    "INSERT INTO svids (serial, spiffe_id, method, issued_at, expires_at, pod_name, pod_uid) \
     SELECT value->>'serial', value->>'spiffe_id', value->>'method', value->>'issued_at', \
     value->>'expires_at', value->>'pod_name', value->>'pod_uid' FROM json_each(?)",
    "INSERT INTO svids (serial, spiffe_id, method, issued_at, expires_at, pod_name, pod_uid) \
     SELECT serial, spiffe_id, method, issued_at, expires_at, pod_name, pod_uid \
     FROM jsonb_to_recordset($1::jsonb) AS x(serial text, spiffe_id text, method text, \
     issued_at bigint, expires_at bigint, pod_name text, pod_uid text)",
);
/// Each identity's first SVID, kept when its SVID rows are pruned
/// (`identities list` says since when a workload has been known). The
/// `WHERE true` keeps SQLite from reading `ON` as a join's.
const NOTE_FIRST_SEEN: Sql = Sql::each(
    "INSERT INTO identity_first_seen (spiffe_id, first_seen) \
     SELECT value->>'spiffe_id', MIN(value->>'issued_at') FROM json_each(?) WHERE true \
     GROUP BY value->>'spiffe_id' ON CONFLICT (spiffe_id) DO NOTHING",
    "INSERT INTO identity_first_seen (spiffe_id, first_seen) \
     SELECT spiffe_id, MIN(issued_at) FROM jsonb_to_recordset($1::jsonb) \
     AS x(spiffe_id text, issued_at bigint) GROUP BY spiffe_id \
     ON CONFLICT (spiffe_id) DO NOTHING",
);
const INSERT_AUDIT: Sql = Sql::each(
    "INSERT INTO audit (seq, at, kind, line) \
     SELECT value->>'seq', value->>'at', value->>'kind', value->>'line' FROM json_each(?)",
    "INSERT INTO audit (seq, at, kind, line) SELECT seq, at, kind, line \
     FROM jsonb_to_recordset($1::jsonb) AS x(seq bigint, at bigint, kind text, line text)",
);
const ADVANCE_HEAD: Sql = Sql::both("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1");
/// Only PostgreSQL's writer reads the head (SQLite's keeps it).
const LOCK_HEAD: Sql = Sql::each(
    "SELECT seq, hash FROM audit_head WHERE id = 1",
    "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
);

/// One queued write: an optional inventory record and the audit event
/// that goes with it, committed together.
struct Pending {
    write: Option<Write>,
    event: AuditEvent,
    done: oneshot::Sender<Result<AuditRecord, StoreError>>,
}

/// Where the writer sends each committed audit line, in commit order.
type Tap = Arc<std::sync::Mutex<Option<mpsc::UnboundedSender<String>>>>;

/// Where the audit chain stands: the next record's number and the hash it
/// will carry.
#[derive(Debug, Clone, Copy)]
pub(super) struct Chain {
    pub(super) next_seq: u64,
    pub(super) prev: ChainHash,
}

/// How the writer knows where each batch's chain continues.
pub(super) enum Numbering {
    /// This task is the only writer (SQLite): it keeps the chain's
    /// position, and one connection (acquiring and pinging a pooled one
    /// per batch cost a round trip on every commit).
    Local(Chain),
    /// Replicas share the chain (PostgreSQL): each batch locks the head
    /// row and continues from it, on a pooled connection (the pool
    /// replaces one the server dropped).
    Shared,
}

/// The queue into a store's writer task.
#[derive(Debug, Clone)]
pub(super) struct Writer {
    queue: mpsc::Sender<Pending>,
    tap: Tap,
}

impl Writer {
    /// Starts the writer task on `pool`; it ends when the last [`Writer`]
    /// is dropped.
    pub(super) fn spawn(pool: Pool, numbering: Numbering) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        let tap = Tap::default();
        tokio::spawn(group_commit(pool, numbering, pending, tap.clone()));
        Self { queue, tap }
    }

    /// Tells a task beside the writer whether the store is still open.
    pub(super) fn alive(&self) -> Alive {
        Alive(self.queue.downgrade())
    }

    /// Queues a write and waits for its batch to commit.
    pub(super) async fn write(
        &self,
        write: Option<Write>,
        event: AuditEvent,
    ) -> Result<AuditRecord, StoreError> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Pending { write, event, done })
            .await
            .map_err(|_| StoreError::WriterGone)?;
        wait.await.map_err(|_| StoreError::WriterGone)?
    }

    /// Sends every committed audit line to `lines` from now on.
    pub(super) fn tap(&self, lines: mpsc::UnboundedSender<String>) {
        *self
            .tap
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(lines);
    }
}

/// Whether a store is still open (some [`Writer`] of it not dropped).
pub(super) struct Alive(mpsc::WeakSender<Pending>);

impl Alive {
    /// Whether the store is still open.
    pub(super) fn get(&self) -> bool {
        self.0.upgrade().is_some()
    }
}

async fn group_commit(
    pool: Pool,
    mut numbering: Numbering,
    mut queue: mpsc::Receiver<Pending>,
    tap: Tap,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    let mut held: Option<Conn> = None;
    while let Some(first) = queue.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        match commit(&pool, &mut numbering, &mut held, &batch).await {
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
                // Nothing in the batch was recorded; sequence numbers (and
                // the chain) are taken up again by the next batch, so the
                // log has no gaps. A fresh connection for the next batch.
                held = None;
                tracing::error!(error = %e, records = batch.len(), "group commit failed");
                for p in batch.drain(..) {
                    let _ = p.done.send(Err(StoreError::WriteFailed(e.to_string())));
                }
            }
        }
    }
}

/// Commits one batch; returns its audit records, numbered and chained.
async fn commit(
    pool: &Pool,
    numbering: &mut Numbering,
    held: &mut Option<Conn>,
    batch: &[Pending],
) -> Result<Vec<AuditRecord>, StoreError> {
    let (mut tx, at) = match numbering {
        Numbering::Local(chain) => {
            let conn = match held {
                Some(conn) => conn,
                None => held.insert(pool.acquire().await?),
            };
            (conn.begin().await?, *chain)
        }
        Numbering::Shared => {
            let mut tx = pool.begin().await?;
            let at = locked_head(&mut tx).await?;
            (tx, at)
        }
    };
    let (records, head) = chain_records(batch.iter().map(|p| &p.event), at.next_seq, at.prev);
    let (issued, svids, audit) = batch_rows(batch.iter().map(|p| &p.write), &records);
    if !issued.is_empty() {
        let rows = serde_json::Value::Array(issued).to_string();
        tx.query(INSERT_ISSUED, &[rows.as_str().into()])
            .execute()
            .await?;
    }
    if !svids.is_empty() {
        let rows = serde_json::Value::Array(svids).to_string();
        for sql in [INSERT_SVIDS, NOTE_FIRST_SEEN] {
            tx.query(sql, &[rows.as_str().into()]).execute().await?;
        }
    }
    let audit = serde_json::Value::Array(audit).to_string();
    tx.query(INSERT_AUDIT, &[audit.as_str().into()])
        .execute()
        .await?;
    if let Some(last) = records.last() {
        tx.query(ADVANCE_HEAD, &[last.seq.into(), head.0.as_slice().into()])
            .execute()
            .await?;
    }
    tx.commit().await?;
    if let Numbering::Local(chain) = numbering {
        *chain = Chain {
            next_seq: at.next_seq + records.len() as u64,
            prev: head,
        };
    }
    Ok(records)
}

/// Where the chain continues, read under the head row's lock (held until
/// `tx` ends), so replicas' batches interleave as whole batches.
async fn locked_head(tx: &mut Tx<'_>) -> Result<Chain, StoreError> {
    let row = tx.query(LOCK_HEAD, &[]).one().await?;
    let head = Cells::of("audit_head", &row);
    Ok(Chain {
        next_seq: head.uint("seq")? + 1,
        prev: ChainHash(head.hash("hash")?),
    })
}
