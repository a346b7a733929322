//! Versioned schema of the SQLite store. Each migration runs once, in
//! order, in its own transaction; `schema_version` holds the last one
//! applied. Layout choices here are SQLite's (`WITHOUT ROWID`, `INTEGER
//! PRIMARY KEY` row ids); the PostgreSQL backend keeps the same tables and
//! version numbers in its own dialect.

/// Migrations, oldest first. Never edit one that has shipped: add another.
pub(crate) const MIGRATIONS: &[(i64, &str)] = &[
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
];

/// The newest schema this build knows.
pub(crate) fn latest() -> i64 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}
