//! Reading stored rows into the store's types, the same way for both
//! backends: each backend only says how to get a text, a blob or an
//! integer out of its row type ([`Fields`]).

use super::{
    AuditHead, Change, IdentityRecord, IssuedToken, JoinTokenRefusal, PolicyVersion, Sealer,
    SigningKeyRecord, StoreError, TokenUsage, Write,
};
use crate::audit::{AuditEvent, AuditRecord, ChainHash};
use crate::ca::CaMaterial;
use serde_json::{Value, json};
use sqlx::Row as _;
use zeroize::Zeroizing;

/// A row's columns by name.
pub(super) trait Fields {
    /// A text column.
    fn text(&self, column: &str) -> Result<String, StoreError>;
    /// A blob column.
    fn blob(&self, column: &str) -> Result<Vec<u8>, StoreError>;
    /// An integer column.
    fn int(&self, column: &str) -> Result<i64, StoreError>;
    /// A blob column that may be NULL.
    fn opt_blob(&self, column: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// An integer column that may be NULL.
    fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError>;
}

/// Both backends' rows read every column type the same way.
macro_rules! fields_for {
    ($($row:ty),*) => {$(
        impl Fields for $row {
            fn text(&self, column: &str) -> Result<String, StoreError> {
                Ok(self.try_get(column)?)
            }
            fn blob(&self, column: &str) -> Result<Vec<u8>, StoreError> {
                Ok(self.try_get(column)?)
            }
            fn int(&self, column: &str) -> Result<i64, StoreError> {
                Ok(self.try_get(column)?)
            }
            fn opt_blob(&self, column: &str) -> Result<Option<Vec<u8>>, StoreError> {
                Ok(self.try_get(column)?)
            }
            fn opt_int(&self, column: &str) -> Result<Option<i64>, StoreError> {
                Ok(self.try_get(column)?)
            }
        }
    )*};
}

fields_for!(sqlx::sqlite::SqliteRow, sqlx::postgres::PgRow);

/// A time or count column, which is never negative.
pub(super) fn time_of(row: &impl Fields, column: &str) -> Result<u64, StoreError> {
    u64::try_from(row.int(column)?)
        .map_err(|_| StoreError::Corrupt(format!("negative value in {column}")))
}

fn hash_of(row: &impl Fields, column: &str) -> Result<[u8; 32], StoreError> {
    row.blob(column)?
        .try_into()
        .map_err(|_| StoreError::Corrupt(format!("{column} is not 32 bytes")))
}

pub(super) fn change_from_row(row: &impl Fields) -> Result<Change, StoreError> {
    Ok(Change {
        seq: time_of(row, "seq")?,
        at_ms: time_of(row, "at_ms")?,
        kind: row.text("kind")?,
        body: row.text("body")?,
    })
}

pub(super) fn issued_from_row(row: &impl Fields) -> Result<IssuedToken, StoreError> {
    Ok(IssuedToken {
        jti: row.text("jti")?,
        sub: row.text("sub")?,
        aud: row.text("aud")?,
        scope: row.text("scope")?,
        class: row.text("class")?,
        jkt: row.text("jkt")?,
        iat: time_of(row, "iat")?,
        exp: time_of(row, "exp")?,
        kid: row.text("kid")?,
        token_hmac: hash_of(row, "token_hmac")?,
    })
}

pub(super) fn policy_from_row(row: &impl Fields) -> Result<PolicyVersion, StoreError> {
    Ok(PolicyVersion {
        version: time_of(row, "version")?,
        created_at: time_of(row, "created_at")?,
        author: row.text("author")?,
        source: row.text("source")?,
        comment: row.text("comment")?,
        yaml: row.text("yaml")?,
    })
}

/// Whether the join token in `row` (`spiffe_id`, `used_at`, `expires_at`;
/// none: unknown) is usable at `now`, and whom it names.
pub(super) fn join_token_from_row(
    row: Option<&impl Fields>,
    now: u64,
) -> Result<Result<crate::identity::SpiffeId, JoinTokenRefusal>, StoreError> {
    let Some(row) = row else {
        return Ok(Err(JoinTokenRefusal::Unknown));
    };
    if row.opt_int("used_at")?.is_some() {
        return Ok(Err(JoinTokenRefusal::AlreadyUsed));
    }
    if time_of(row, "expires_at")? <= now {
        return Ok(Err(JoinTokenRefusal::Expired));
    }
    row.text("spiffe_id")?
        .parse()
        .map(Ok)
        .map_err(|e| StoreError::Corrupt(format!("join token SPIFFE ID: {e}")))
}

/// A signing key and the latest `exp` among the live tokens it signed.
pub(super) fn kid_exp_from_row(row: &impl Fields) -> Result<(String, u64), StoreError> {
    Ok((row.text("kid")?, time_of(row, "exp")?))
}

pub(super) fn audit_from_row(row: &impl Fields) -> Result<AuditRecord, StoreError> {
    Ok(AuditRecord {
        seq: time_of(row, "seq")?,
        at: time_of(row, "at")?,
        kind: row.text("kind")?,
        line: row.text("line")?,
    })
}

pub(super) fn head_from_row(row: &impl Fields) -> Result<AuditHead, StoreError> {
    Ok(AuditHead {
        chain_from: time_of(row, "chain_from")?,
        seq: time_of(row, "seq")?,
        hash: ChainHash(hash_of(row, "hash")?),
        anchor: ChainHash(hash_of(row, "anchor")?),
    })
}

/// A row of the per-(holder, audience, scopes, class) usage query.
pub(super) fn usage_from_row(row: &impl Fields) -> Result<TokenUsage, StoreError> {
    Ok(TokenUsage {
        sub: row.text("sub")?,
        aud: row.text("aud")?,
        scope: row.text("scope")?,
        class: row.text("class")?,
        count: time_of(row, "n")?,
        longest_life: time_of(row, "longest")?,
        last_issued: time_of(row, "last")?,
    })
}

/// Identities from the per-identity SVID summary (`spiffe_id`, `first`,
/// `last`, `expires`, `n`, `method`) and token summary (`sub`, `last`,
/// `n`, `live`) queries, merged by SPIFFE ID.
pub(super) fn identities_from_rows(
    svids: &[impl Fields],
    tokens: &[impl Fields],
) -> Result<Vec<IdentityRecord>, StoreError> {
    let mut by_id = std::collections::BTreeMap::new();
    for row in svids {
        let id = row.text("spiffe_id")?;
        by_id.insert(
            id.clone(),
            IdentityRecord {
                spiffe_id: id,
                first_seen: time_of(row, "first")?,
                last_svid_at: Some(time_of(row, "last")?),
                svid_expires_at: Some(time_of(row, "expires")?),
                svids: time_of(row, "n")?,
                method: row.text("method")?,
                last_token_at: None,
                tokens: 0,
                live_tokens: 0,
            },
        );
    }
    for row in tokens {
        let id = row.text("sub")?;
        let last = time_of(row, "last")?;
        let entry = by_id.entry(id.clone()).or_insert_with(|| IdentityRecord {
            spiffe_id: id,
            first_seen: last,
            last_svid_at: None,
            svid_expires_at: None,
            svids: 0,
            method: String::new(),
            last_token_at: None,
            tokens: 0,
            live_tokens: 0,
        });
        entry.last_token_at = Some(last);
        entry.tokens = time_of(row, "n")?;
        entry.live_tokens = time_of(row, "live")?;
    }
    Ok(by_id.into_values().collect())
}

/// A batch's audit records, numbered from `first` and chained from
/// `prev`, and the hash of the last one (the chain's new head).
pub(super) fn chain_records<'a>(
    events: impl Iterator<Item = &'a AuditEvent>,
    first: u64,
    mut prev: ChainHash,
) -> (Vec<AuditRecord>, ChainHash) {
    let records = events
        .zip(first..)
        .map(|(event, seq)| {
            let line = event.to_line(seq, &prev);
            prev = ChainHash::of(&line);
            AuditRecord {
                seq,
                at: event.at,
                kind: event.kind.as_str().to_owned(),
                line,
            }
        })
        .collect();
    (records, prev)
}

fn db_time(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

/// A batch as JSON arrays of rows, one per table (issued tokens, SVIDs,
/// audit records), so each table takes one INSERT however large the batch.
pub(super) fn batch_rows<'a>(
    writes: impl Iterator<Item = &'a Option<Write>>,
    records: &[AuditRecord],
) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    let mut issued = Vec::new();
    let mut svids = Vec::new();
    for write in writes {
        match write {
            Some(Write::Issued(t)) => issued.push(json!({
                "jti": t.jti, "sub": t.sub, "aud": t.aud, "scope": t.scope,
                "class": t.class, "jkt": t.jkt, "iat": db_time(t.iat),
                "exp": db_time(t.exp), "kid": t.kid,
                "token_hmac": crate::audit::hex(&t.token_hmac),
            })),
            Some(Write::Svid(v)) => svids.push(json!({
                "serial": v.serial, "spiffe_id": v.spiffe_id, "method": v.method,
                "issued_at": db_time(v.issued_at), "expires_at": db_time(v.expires_at),
            })),
            None => {}
        }
    }
    let audit = records
        .iter()
        .map(
            |r| json!({"seq": db_time(r.seq), "at": db_time(r.at), "kind": r.kind, "line": r.line}),
        )
        .collect();
    (issued, svids, audit)
}

/// A signing key row (`kid`, `key_sealed`, `created_at`, `sign_from`,
/// `retired_at`, `withdrawn_at`), its key unsealed.
pub(super) fn signing_key_from_row(
    row: &impl Fields,
    sealer: &Sealer,
) -> Result<SigningKeyRecord, StoreError> {
    let kid = row.text("kid")?;
    let time = |t: Option<i64>| t.map(|t| u64::try_from(t).unwrap_or(0));
    Ok(SigningKeyRecord {
        pkcs8: sealer.open(&format!("signing-key/{kid}"), &row.blob("key_sealed")?)?,
        created_at: time_of(row, "created_at")?,
        sign_from: time_of(row, "sign_from")?,
        retired_at: time(row.opt_int("retired_at")?),
        withdrawn_at: time(row.opt_int("withdrawn_at")?),
        kid,
    })
}

/// The CA row, its keys unsealed.
pub(super) fn ca_from_row(row: &impl Fields, sealer: &Sealer) -> Result<CaMaterial, StoreError> {
    let text = |bytes: Zeroizing<Vec<u8>>| {
        String::from_utf8(bytes.to_vec())
            .map(Zeroizing::new)
            .map_err(|_| StoreError::Corrupt("CA key is not UTF-8 PEM".into()))
    };
    let root_key_pem = row
        .opt_blob("root_key_sealed")?
        .map(|s| sealer.open("ca/root", &s))
        .transpose()?
        .map(text)
        .transpose()?;
    Ok(CaMaterial {
        root_cert_pem: row.text("root_cert_pem")?,
        root_key_pem,
        intermediate_cert_pem: row.text("intermediate_cert_pem")?,
        intermediate_key_pem: text(
            sealer.open("ca/intermediate", &row.blob("intermediate_key_sealed")?)?,
        )?,
    })
}
