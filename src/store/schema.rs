//! Versioned schema of both stores. Each migration runs once, in order,
//! in its own transaction; `schema_version` holds the last one applied.
//! The two dialects keep the same tables and version numbers, each in its
//! own types (`BLOB`/`BYTEA`) and layout: SQLite's `WITHOUT ROWID` and
//! `INTEGER PRIMARY KEY` row ids, PostgreSQL's row-locked counters. A
//! shipped migration is never edited, so the two histories stay apart;
//! [`migrate`] applies either.

use super::StoreError;
use super::db::{Conn, Sql};
use super::rows::Cells;

const CREATE_VERSIONS: Sql =
    Sql::both("CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL)");
const VERSION: Sql = Sql::both("SELECT MAX(version) AS version FROM schema_version");
const INSERT_VERSION: Sql = Sql::both("INSERT INTO schema_version (version) VALUES ($1)");

/// The schema version in the database (0: none yet).
///
/// # Errors
/// [`StoreError`].
pub(super) async fn version(conn: &mut Conn) -> Result<i64, StoreError> {
    let row = conn.query(VERSION, &[]).one().await?;
    let found = Cells::of("schema_version", &row).opt_uint("version")?;
    Ok(super::db::db_int(found.unwrap_or(0)))
}

/// Applies the migrations of `history` the database does not have yet.
///
/// # Errors
/// [`StoreError::SchemaTooNew`] if the database is ahead of `history`;
/// [`StoreError`] if a migration fails (it leaves nothing behind).
pub(super) async fn migrate(
    conn: &mut Conn,
    history: &[(i64, &'static str)],
) -> Result<(), StoreError> {
    conn.query(CREATE_VERSIONS, &[]).execute().await?;
    let current = version(conn).await?;
    let supported = latest(history);
    if current > supported {
        return Err(StoreError::SchemaTooNew {
            found: current,
            supported,
        });
    }
    for &(version, sql) in history.iter().filter(|(v, _)| *v > current) {
        let mut tx = conn.begin().await?;
        tx.script(sql).await?;
        tx.query(INSERT_VERSION, &[version.into()])
            .execute()
            .await?;
        tx.commit().await?;
        tracing::info!(version, "applied store migration");
    }
    Ok(())
}

/// The newest version of `history`.
fn latest(history: &[(i64, &str)]) -> i64 {
    history.last().map_or(0, |(v, _)| *v)
}

/// What the deployment is (trust domain, issuer): recorded by the first
/// broker to start on the store, checked by every later one. One text
/// both dialects read.
const DEPLOYMENT: &str = "
CREATE TABLE deployment (
    name        TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    recorded_at BIGINT NOT NULL
);
";

/// When each identity was first issued an SVID, kept when its SVID rows
/// are pruned; filled from what the store still holds. One text both
/// dialects read.
const FIRST_SEEN: &str = "
CREATE TABLE identity_first_seen (
    spiffe_id   TEXT PRIMARY KEY,
    first_seen  BIGINT NOT NULL
);
INSERT INTO identity_first_seen (spiffe_id, first_seen)
    SELECT spiffe_id, MIN(at) FROM (
        SELECT spiffe_id, issued_at AS at FROM svids
        UNION ALL SELECT sub, iat FROM issued_tokens
    ) AS seen GROUP BY spiffe_id;
";

/// The pod a Kubernetes ServiceAccount token named, with the SVID it
/// got (and the renewals of that SVID); NULL for every other SVID and for
/// rows written before. One text both dialects read.
const SVID_POD: &str = "
ALTER TABLE svids ADD COLUMN pod_name TEXT;
ALTER TABLE svids ADD COLUMN pod_uid TEXT;
";

/// JWT-SVIDs in the inventory beside access tokens: `kind` says which
/// (rows written before are access tokens). A JWT-SVID's `aud` lists its
/// audiences separated by single spaces (an audience holds no whitespace);
/// its `scope` and `jkt` are empty: a bearer token has neither scopes nor
/// a key binding. One text both dialects read.
const TOKEN_KIND: &str = "
ALTER TABLE issued_tokens ADD COLUMN kind TEXT NOT NULL DEFAULT 'access';
";

/// SQLite's migrations, oldest first. Never edit one that has shipped:
/// add another (to both histories).
pub(super) const SQLITE: &[(i64, &str)] = &[
    (
        1,
        "
CREATE TABLE secrets (
    name        TEXT PRIMARY KEY,
    sealed      BLOB NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE TABLE ca (
    id                     INTEGER PRIMARY KEY CHECK (id = 1),
    root_cert_pem          TEXT NOT NULL,
    root_key_sealed        BLOB,
    intermediate_cert_pem  TEXT NOT NULL,
    intermediate_key_sealed BLOB NOT NULL,
    updated_at             BIGINT NOT NULL
);
CREATE TABLE signing_keys (
    kid         TEXT PRIMARY KEY,
    key_sealed  BLOB NOT NULL,
    created_at  BIGINT NOT NULL,
    sign_from   BIGINT NOT NULL,
    retired_at  BIGINT
);
CREATE TABLE join_tokens (
    hash        BLOB PRIMARY KEY,
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
    token_hmac  BLOB NOT NULL
);
CREATE INDEX issued_tokens_exp ON issued_tokens (exp);
CREATE INDEX issued_tokens_sub ON issued_tokens (sub);
CREATE UNIQUE INDEX issued_tokens_hmac ON issued_tokens (token_hmac);
",
    ),
    (
        2,
        "
-- The audit log: seq is the row id (one B-tree, appended in order).
CREATE TABLE audit (
    seq         INTEGER PRIMARY KEY,
    at          BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    line        TEXT NOT NULL
);
CREATE TABLE svids (
    serial      TEXT PRIMARY KEY,
    spiffe_id   TEXT NOT NULL,
    method      TEXT NOT NULL,
    issued_at   BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX svids_expires_at ON svids (expires_at);
CREATE INDEX svids_spiffe_id ON svids (spiffe_id);
-- The inventory clustered on jti (time-prefixed, so inserts append), and
-- no index on the token HMAC: random keys dirty a random page per insert.
-- A leaked token is found by its jti and confirmed by its HMAC.
CREATE TABLE issued_tokens_v2 (
    jti         TEXT PRIMARY KEY,
    sub         TEXT NOT NULL,
    aud         TEXT NOT NULL,
    scope       TEXT NOT NULL,
    class       TEXT NOT NULL,
    jkt         TEXT NOT NULL,
    iat         BIGINT NOT NULL,
    exp         BIGINT NOT NULL,
    kid         TEXT NOT NULL,
    token_hmac  BLOB NOT NULL
) WITHOUT ROWID;
INSERT INTO issued_tokens_v2 SELECT jti, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac FROM issued_tokens;
DROP TABLE issued_tokens;
ALTER TABLE issued_tokens_v2 RENAME TO issued_tokens;
CREATE INDEX issued_tokens_exp ON issued_tokens (exp);
CREATE INDEX issued_tokens_sub ON issued_tokens (sub);
",
    ),
    (
        3,
        "
-- The change feed behind Watch: JWKS and trust bundle states (later also
-- revocations and policy), numbered in commit order.
CREATE TABLE changes (
    seq         INTEGER PRIMARY KEY,
    at_ms       BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    body        TEXT NOT NULL
);
CREATE INDEX changes_kind ON changes (kind, seq);
",
    ),
    (
        4,
        "
-- The audit hash chain: each record's line carries the SHA-256 of the line
-- before it (`prev`); this row holds the last record written and its
-- hash, updated in the same transaction, so a cut-off or edited tail is
-- seen too. Records before `chain_from` predate the chain.
CREATE TABLE audit_head (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    chain_from  BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    hash        BLOB NOT NULL
);
INSERT INTO audit_head (id, chain_from, seq, hash)
    SELECT 1, COALESCE(MAX(seq), 0) + 1, COALESCE(MAX(seq), 0), zeroblob(32) FROM audit;
-- Every record that names a token (issuance, revocation, introspection,
-- refusals at sidecars), for leaked-token lookup.
CREATE INDEX audit_jti ON audit (line->>'jti') WHERE line->>'jti' IS NOT NULL;
",
    ),
    (
        5,
        "
-- A signing key withdrawn after a leak: never signs again and leaves the
-- JWKS at once, so nothing it signed verifies any more.
ALTER TABLE signing_keys ADD COLUMN withdrawn_at BIGINT;
",
    ),
    (
        6,
        "
-- Every trust policy the broker has served, newest last: applied with
-- `tally ctl policy apply`, rolled back to, or loaded from the policy file.
CREATE TABLE policy_versions (
    version     INTEGER PRIMARY KEY,
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
-- The audit log's beginning can be archived and removed: `anchor` is the
-- hash of the last removed record, which the first kept one (`chain_from`)
-- carries as `prev`.
ALTER TABLE audit_head ADD COLUMN anchor BLOB NOT NULL
    DEFAULT X'0000000000000000000000000000000000000000000000000000000000000000';
",
    ),
    (
        8,
        DEPLOYMENT,
    ),
    (9, FIRST_SEEN),
    (10, SVID_POD),
    (11, TOKEN_KIND),
];

/// PostgreSQL's migrations. A PostgreSQL store starts at the SQLite
/// store's version 6 (no earlier PostgreSQL deployments exist); later migrations
/// carry the same numbers in both.
pub(super) const POSTGRES: &[(i64, &str)] = &[
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
    (8, DEPLOYMENT),
    (9, FIRST_SEEN),
    (10, SVID_POD),
    (11, TOKEN_KIND),
];
