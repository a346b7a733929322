//! Reading stored rows into the store's typed records, once, for both
//! backends. A column that does not read as what its table holds (a
//! negative time, a holder that is not a SPIFFE ID, a hash of the wrong
//! length) is [`StoreError::CorruptRow`] naming the table and column: the
//! caller never gets a guess. The reason never carries a secret: sealed
//! values and hashes are only ever judged by their length.

use super::db::{Column, Row};
use super::{
    AuditHead, Change, IdentityRecord, IssuedToken, JoinTokenRefusal, PolicyVersion, Sealer,
    SigningKeyRecord, StoreError, TokenUsage, Write,
};
use crate::audit::{AuditEvent, AuditRecord, ChainHash};
use crate::ca::CaMaterial;
use crate::identity::SpiffeId;
use crate::identity::k8s::Pod;
use crate::jose::Jkt;
use crate::token::{Audience, Scopes, TokenClass, TokenKind};
use serde_json::{Value, json};
use std::fmt::Display;
use std::str::FromStr;
use zeroize::Zeroizing;

/// One row of `table`, read column by column.
pub(super) struct Cells<'r> {
    table: &'static str,
    row: &'r Row,
}

impl<'r> Cells<'r> {
    /// `row`, as a row of `table` (named when a column does not read).
    pub(super) fn of(table: &'static str, row: &'r Row) -> Self {
        Self { table, row }
    }

    fn corrupt(&self, column: &'static str, reason: impl Display) -> StoreError {
        StoreError::CorruptRow {
            table: self.table,
            column,
            reason: reason.to_string(),
        }
    }

    /// A column that may be NULL. Always read as an `Option`: SQLite's
    /// driver would decode a NULL text as "" and a NULL integer as 0.
    fn opt<T: Column>(&self, column: &'static str) -> Result<Option<T>, StoreError> {
        self.row.get(column).map_err(|e| match e {
            // A value of the wrong type.
            sqlx::Error::ColumnDecode { source, .. } => self.corrupt(column, source),
            other => StoreError::Database(other),
        })
    }

    /// A column that may not be NULL.
    fn get<T: Column>(&self, column: &'static str) -> Result<T, StoreError> {
        self.opt(column)?
            .ok_or_else(|| self.corrupt(column, "NULL"))
    }

    /// A text column.
    pub(super) fn text(&self, column: &'static str) -> Result<String, StoreError> {
        self.get(column)
    }

    /// A text column holding a `T` (a SPIFFE ID, an audience…).
    pub(super) fn parse<T>(&self, column: &'static str) -> Result<T, StoreError>
    where
        T: FromStr,
        T::Err: Display,
    {
        self.text(column)?
            .parse()
            .map_err(|e| self.corrupt(column, e))
    }

    /// A text column that may be NULL.
    pub(super) fn opt_text(&self, column: &'static str) -> Result<Option<String>, StoreError> {
        self.opt(column)
    }

    /// The pod of an SVID row (`pod_name`, `pod_uid`): both or neither.
    pub(super) fn pod(&self) -> Result<Option<Pod>, StoreError> {
        match (self.opt_text("pod_name")?, self.opt_text("pod_uid")?) {
            (Some(name), Some(uid)) => Ok(Some(Pod { name, uid })),
            (None, None) => Ok(None),
            _ => Err(self.corrupt("pod_uid", "a pod name without a uid, or the reverse")),
        }
    }

    /// A time, count or sequence number: never negative.
    pub(super) fn uint(&self, column: &'static str) -> Result<u64, StoreError> {
        let v: i64 = self.get(column)?;
        u64::try_from(v).map_err(|_| self.corrupt(column, "negative"))
    }

    /// A time that may be NULL (not yet).
    pub(super) fn opt_uint(&self, column: &'static str) -> Result<Option<u64>, StoreError> {
        let v: Option<i64> = self.opt(column)?;
        v.map(|v| u64::try_from(v).map_err(|_| self.corrupt(column, "negative")))
            .transpose()
    }

    /// A blob column.
    pub(super) fn blob(&self, column: &'static str) -> Result<Vec<u8>, StoreError> {
        self.get(column)
    }

    /// A blob column that may be NULL.
    pub(super) fn opt_blob(&self, column: &'static str) -> Result<Option<Vec<u8>>, StoreError> {
        self.opt(column)
    }

    /// A SHA-256 or HMAC-SHA256 column.
    pub(super) fn hash(&self, column: &'static str) -> Result<[u8; 32], StoreError> {
        self.blob(column)?
            .try_into()
            .map_err(|b: Vec<u8>| self.corrupt(column, format_args!("{} bytes, not 32", b.len())))
    }
}

pub(super) fn change_from_row(row: &Row) -> Result<Change, StoreError> {
    let c = Cells::of("changes", row);
    Ok(Change {
        seq: c.uint("seq")?,
        at_ms: c.uint("at_ms")?,
        kind: c.text("kind")?,
        body: c.text("body")?,
    })
}

/// Audiences as the `aud` column holds them: separated by single spaces
/// (an [`Audience`] holds no whitespace, so the list reads back exactly).
pub(super) fn audience_text(aud: &[Audience]) -> String {
    let texts: Vec<&str> = aud.iter().map(Audience::as_str).collect();
    texts.join(" ")
}

impl Cells<'_> {
    /// The `aud` column: one or more audiences, or none (empty: a WIT).
    fn audiences(&self, column: &'static str) -> Result<Vec<Audience>, StoreError> {
        let text = self.text(column)?;
        if text.is_empty() {
            return Ok(Vec::new());
        }
        let aud = text
            .split(' ')
            .map(str::parse)
            .collect::<Result<Vec<Audience>, _>>()
            .map_err(|e| self.corrupt(column, e))?;
        Ok(aud)
    }

    /// The `jkt` column: empty for a bearer token.
    fn opt_jkt(&self, column: &'static str) -> Result<Option<Jkt>, StoreError> {
        match self.text(column)?.as_str() {
            "" => Ok(None),
            text => text.parse().map(Some).map_err(|e| self.corrupt(column, e)),
        }
    }
}

pub(super) fn issued_from_row(row: &Row) -> Result<IssuedToken, StoreError> {
    let c = Cells::of("issued_tokens", row);
    let kind: TokenKind = c.parse("kind")?;
    let jkt = c.opt_jkt("jkt")?;
    // What the kind promises, so nothing downstream meets a bound JWT-SVID,
    // an unbound access token or WIT, or a token for no audience but a WIT.
    match (kind, &jkt) {
        (TokenKind::Access | TokenKind::Wit, Some(_)) | (TokenKind::JwtSvid, None) => {}
        (TokenKind::Access, None) => return Err(c.corrupt("jkt", "empty for an access token")),
        (TokenKind::Wit, None) => return Err(c.corrupt("jkt", "empty for a WIT")),
        (TokenKind::JwtSvid, Some(_)) => return Err(c.corrupt("jkt", "set for a JWT-SVID")),
    }
    let aud = c.audiences("aud")?;
    match (kind, aud.is_empty()) {
        (TokenKind::Wit, true) | (TokenKind::Access | TokenKind::JwtSvid, false) => {}
        (TokenKind::Wit, false) => return Err(c.corrupt("aud", "set for a WIT")),
        (_, true) => return Err(c.corrupt("aud", "empty")),
    }
    Ok(IssuedToken {
        jti: c.text("jti")?,
        kind,
        sub: c.parse("sub")?,
        aud,
        scope: c.parse("scope")?,
        class: c.parse("class")?,
        jkt,
        iat: c.uint("iat")?,
        exp: c.uint("exp")?,
        kid: c.text("kid")?,
        token_hmac: c.hash("token_hmac")?,
    })
}

pub(super) fn policy_from_row(row: &Row) -> Result<PolicyVersion, StoreError> {
    let c = Cells::of("policy_versions", row);
    Ok(PolicyVersion {
        version: c.uint("version")?,
        created_at: c.uint("created_at")?,
        author: c.text("author")?,
        source: c.text("source")?,
        comment: c.text("comment")?,
        yaml: c.text("yaml")?,
    })
}

/// Whether the join token in `row` (`spiffe_id`, `used_at`, `expires_at`;
/// none: unknown) is usable at `now`, and whom it names.
pub(super) fn join_token_from_row(
    row: Option<&Row>,
    now: u64,
) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
    let Some(row) = row else {
        return Ok(Err(JoinTokenRefusal::Unknown));
    };
    let c = Cells::of("join_tokens", row);
    if c.opt_uint("used_at")?.is_some() {
        return Ok(Err(JoinTokenRefusal::AlreadyUsed));
    }
    if c.uint("expires_at")? <= now {
        return Ok(Err(JoinTokenRefusal::Expired));
    }
    c.parse("spiffe_id").map(Ok)
}

/// A signing key and the latest `exp` among the live tokens it signed.
pub(super) fn kid_exp_from_row(row: &Row) -> Result<(String, u64), StoreError> {
    let c = Cells::of("issued_tokens", row);
    Ok((c.text("kid")?, c.uint("exp")?))
}

pub(super) fn audit_from_row(row: &Row) -> Result<AuditRecord, StoreError> {
    let c = Cells::of("audit", row);
    Ok(AuditRecord {
        seq: c.uint("seq")?,
        at: c.uint("at")?,
        kind: c.text("kind")?,
        line: c.text("line")?,
    })
}

pub(super) fn head_from_row(row: &Row) -> Result<AuditHead, StoreError> {
    let c = Cells::of("audit_head", row);
    Ok(AuditHead {
        chain_from: c.uint("chain_from")?,
        seq: c.uint("seq")?,
        hash: ChainHash(c.hash("hash")?),
        anchor: ChainHash(c.hash("anchor")?),
    })
}

/// A row of the per-(holder, audience, scopes, class) usage query: one
/// usage per audience (a JWT-SVID's row lists several; a WIT's none: it
/// is granted by no issue rule).
pub(super) fn usage_from_row(row: &Row) -> Result<Vec<TokenUsage>, StoreError> {
    let c = Cells::of("issued_tokens", row);
    let (sub, scope, class): (SpiffeId, Scopes, TokenClass) =
        (c.parse("sub")?, c.parse("scope")?, c.parse("class")?);
    let (count, longest_life, last_issued) = (c.uint("n")?, c.uint("longest")?, c.uint("last")?);
    Ok(c.audiences("aud")?
        .into_iter()
        .map(|aud| TokenUsage {
            sub: sub.clone(),
            aud,
            scope: scope.clone(),
            class,
            count,
            longest_life,
            last_issued,
        })
        .collect())
}

/// Identities from the per-identity SVID summary (`spiffe_id`, `first`,
/// `last`, `expires`, `n`, `method`) and token summary (`sub`, `first`,
/// `last`, `n`, `live`) queries, merged by SPIFFE ID, each first seen at
/// the earliest of those and of its noted first SVID
/// (`identity_first_seen`: it outlives pruned rows).
pub(super) fn identities_from_rows(
    svids: &[Row],
    tokens: &[Row],
    first_seen: &[Row],
    pods: &[Row],
) -> Result<Vec<IdentityRecord>, StoreError> {
    let mut by_id = std::collections::BTreeMap::new();
    for row in svids {
        let c = Cells::of("svids", row);
        let id: SpiffeId = c.parse("spiffe_id")?;
        by_id.insert(
            id.clone(),
            IdentityRecord {
                spiffe_id: id,
                first_seen: c.uint("first")?,
                last_svid_at: Some(c.uint("last")?),
                svid_expires_at: Some(c.uint("expires")?),
                svids: c.uint("n")?,
                method: c.text("method")?,
                last_token_at: None,
                tokens: 0,
                live_tokens: 0,
                pods: Vec::new(),
            },
        );
    }
    for row in tokens {
        let c = Cells::of("issued_tokens", row);
        let id: SpiffeId = c.parse("sub")?;
        let first = c.uint("first")?;
        let last = c.uint("last")?;
        let entry = by_id.entry(id.clone()).or_insert_with(|| IdentityRecord {
            spiffe_id: id,
            first_seen: first,
            last_svid_at: None,
            svid_expires_at: None,
            svids: 0,
            method: String::new(),
            last_token_at: None,
            tokens: 0,
            live_tokens: 0,
            pods: Vec::new(),
        });
        // A token older than every SVID still held (they were pruned
        // before first sightings were noted) is the earlier sighting.
        entry.first_seen = entry.first_seen.min(first);
        entry.last_token_at = Some(last);
        entry.tokens = c.uint("n")?;
        entry.live_tokens = c.uint("live")?;
    }
    for row in first_seen {
        let c = Cells::of("identity_first_seen", row);
        let id: SpiffeId = c.parse("spiffe_id")?;
        if let Some(entry) = by_id.get_mut(&id) {
            entry.first_seen = entry.first_seen.min(c.uint("first_seen")?);
        }
    }
    for row in pods {
        let c = Cells::of("svids", row);
        let id: SpiffeId = c.parse("spiffe_id")?;
        if let (Some(entry), Some(pod)) = (by_id.get_mut(&id), c.pod()?) {
            entry.pods.push(pod);
        }
    }
    Ok(by_id.into_values().collect())
}

/// A signing key row (`kid`, `key_sealed`, `created_at`, `sign_from`,
/// `retired_at`, `withdrawn_at`), its key unsealed.
pub(super) fn signing_key_from_row(
    row: &Row,
    sealer: &Sealer,
) -> Result<SigningKeyRecord, StoreError> {
    let c = Cells::of("signing_keys", row);
    let kid = c.text("kid")?;
    Ok(SigningKeyRecord {
        pkcs8: sealer.open(&format!("signing-key/{kid}"), &c.blob("key_sealed")?)?,
        created_at: c.uint("created_at")?,
        sign_from: c.uint("sign_from")?,
        retired_at: c.opt_uint("retired_at")?,
        withdrawn_at: c.opt_uint("withdrawn_at")?,
        kid,
    })
}

/// The CA row, its keys unsealed.
pub(super) fn ca_from_row(row: &Row, sealer: &Sealer) -> Result<CaMaterial, StoreError> {
    let c = Cells::of("ca", row);
    let pem = |column: &'static str, bytes: Zeroizing<Vec<u8>>| {
        String::from_utf8(bytes.to_vec())
            .map(Zeroizing::new)
            .map_err(|_| c.corrupt(column, "the unsealed key is not UTF-8 PEM"))
    };
    let root_key_pem = c
        .opt_blob("root_key_sealed")?
        .map(|s| sealer.open("ca/root", &s))
        .transpose()?
        .map(|k| pem("root_key_sealed", k))
        .transpose()?;
    Ok(CaMaterial {
        root_cert_pem: c.text("root_cert_pem")?,
        root_key_pem,
        intermediate_cert_pem: c.text("intermediate_cert_pem")?,
        intermediate_key_pem: pem(
            "intermediate_key_sealed",
            sealer.open("ca/intermediate", &c.blob("intermediate_key_sealed")?)?,
        )?,
    })
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

/// A batch as JSON arrays of rows, one per table (issued tokens, SVIDs,
/// audit records), so each table takes one INSERT however large the batch.
pub(super) fn batch_rows<'a>(
    writes: impl Iterator<Item = &'a Option<Write>>,
    records: &[AuditRecord],
) -> (Vec<Value>, Vec<Value>, Vec<Value>) {
    use super::db::db_int;
    let mut issued = Vec::new();
    let mut svids = Vec::new();
    for write in writes {
        match write {
            Some(Write::Issued(t)) => issued.push(json!({
                "jti": t.jti, "kind": t.kind.as_str(), "sub": t.sub.as_str(),
                "aud": audience_text(&t.aud),
                "scope": t.scope.to_string(), "class": t.class.as_str(),
                "jkt": t.jkt.map(|k| k.to_string()).unwrap_or_default(), "iat": db_int(t.iat),
                "exp": db_int(t.exp), "kid": t.kid,
                "token_hmac": crate::audit::hex(&t.token_hmac),
            })),
            Some(Write::Svid(v)) => svids.push(json!({
                "serial": v.serial, "spiffe_id": v.spiffe_id.as_str(), "method": v.method,
                "issued_at": db_int(v.issued_at), "expires_at": db_int(v.expires_at),
                "pod_name": v.pod.as_ref().map(|p| p.name.as_str()),
                "pod_uid": v.pod.as_ref().map(|p| p.uid.as_str()),
            })),
            None => {}
        }
    }
    let audit = records
        .iter()
        .map(|r| json!({"seq": db_int(r.seq), "at": db_int(r.at), "kind": r.kind, "line": r.line}))
        .collect();
    (issued, svids, audit)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::sqlite::SqlitePool;

    /// One row of literal values, as SQLite returns it.
    async fn row(select: &'static str) -> Row {
        let pool = SqlitePool::connect("sqlite::memory:").await.unwrap();
        Row::Sqlite(sqlx::query(select).fetch_one(&pool).await.unwrap())
    }

    fn place(err: StoreError) -> (&'static str, &'static str, String) {
        match err {
            StoreError::CorruptRow {
                table,
                column,
                reason,
            } => (table, column, reason),
            other => panic!("not a corrupt row: {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_negative_time_is_corrupt_not_zero() {
        let r = row("SELECT -5 AS exp").await;
        let err = Cells::of("issued_tokens", &r).uint("exp").unwrap_err();
        assert_eq!(place(err), ("issued_tokens", "exp", "negative".to_owned()));
    }

    #[tokio::test]
    async fn a_value_that_does_not_parse_names_the_column_but_not_the_value() {
        let r = row("SELECT 'spiffe://Example.org/secret-looking' AS sub").await;
        let err = Cells::of("issued_tokens", &r)
            .parse::<SpiffeId>("sub")
            .unwrap_err();
        let (table, column, reason) = place(err);
        assert_eq!((table, column), ("issued_tokens", "sub"));
        assert!(!reason.contains("secret-looking"), "{reason}");
    }

    #[tokio::test]
    async fn a_hash_is_judged_by_its_length_only() {
        let r = row("SELECT X'00112233' AS token_hmac").await;
        let err = Cells::of("issued_tokens", &r)
            .hash("token_hmac")
            .unwrap_err();
        assert_eq!(
            place(err),
            ("issued_tokens", "token_hmac", "4 bytes, not 32".to_owned())
        );
    }

    #[tokio::test]
    async fn null_where_a_value_must_be_is_corrupt() {
        let r = row("SELECT NULL AS kind").await;
        let (table, column, _) = place(Cells::of("changes", &r).text("kind").unwrap_err());
        assert_eq!((table, column), ("changes", "kind"));
    }

    #[tokio::test]
    async fn a_missing_column_is_a_database_error_not_corruption() {
        let r = row("SELECT 1 AS seq").await;
        let err = Cells::of("changes", &r).uint("at_ms").unwrap_err();
        assert!(matches!(err, StoreError::Database(_)), "{err:?}");
    }
}
