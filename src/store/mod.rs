//! The broker's durable state: CA material and signing keys (sealed),
//! join tokens (hashed), the inventory of issued tokens (never the token
//! itself) and X.509-SVIDs, and the audit log.
//!
//! [`Store`] is the one interface the broker uses; the embedded SQLite
//! backend ([`sqlite`]) is the default, and a PostgreSQL backend will be a
//! second variant behind the same methods. Writes that matter are durable
//! (committed, fsynced) before the call returns.

pub mod postgres;
mod rows;
mod schema;
pub mod seal;
pub mod sqlite;

pub use seal::{SealError, Sealer};

use crate::audit::{AuditEvent, AuditRecord, ChainHash};
use crate::identity::{JoinTokenHash, SpiffeId};
use zeroize::Zeroizing;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The database failed (I/O, corruption, locked past the timeout).
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The database holds a newer schema than this build understands.
    #[error(
        "database schema version {found} is newer than this build's {supported}; upgrade tally"
    )]
    SchemaTooNew {
        /// In the database.
        found: i64,
        /// Known to this build.
        supported: i64,
    },
    /// A sealed value does not open.
    #[error("{0}")]
    Seal(#[from] SealError),
    /// A stored value is not what it should be.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The group-commit writer has stopped.
    #[error("the store's writer has stopped")]
    WriterGone,
    /// A group commit failed; nothing in it was recorded.
    #[error("recording issued tokens failed: {0}")]
    WriteFailed(String),
    /// The request does not fit what is stored (the reason says how).
    #[error("{0}")]
    Refused(String),
}

/// Why a join token was not accepted. Each case is audited; callers see
/// one generic refusal so a probe learns nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JoinTokenRefusal {
    /// No such token.
    #[error("unknown join token")]
    Unknown,
    /// Past its expiry.
    #[error("join token expired")]
    Expired,
    /// Already used once.
    #[error("join token already used")]
    AlreadyUsed,
}

/// A signing key as stored.
pub struct SigningKeyRecord {
    /// Key id.
    pub kid: String,
    /// PKCS#8 DER of the private key (sealed at rest).
    pub pkcs8: Zeroizing<Vec<u8>>,
    /// When it was created.
    pub created_at: u64,
    /// When it may start signing (published in the JWKS before that).
    pub sign_from: u64,
    /// When it stopped signing, if it has.
    pub retired_at: Option<u64>,
    /// When it was withdrawn (leaked): no longer published at all.
    pub withdrawn_at: Option<u64>,
}

impl std::fmt::Debug for SigningKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("kid", &self.kid)
            .field("pkcs8", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("sign_from", &self.sign_from)
            .field("retired_at", &self.retired_at)
            .field("withdrawn_at", &self.withdrawn_at)
            .finish()
    }
}

/// One issued token, as the inventory keeps it: never the token, only its
/// id and a keyed hash (for leaked-token lookup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// Token id.
    pub jti: String,
    /// Holder.
    pub sub: String,
    /// Audience.
    pub aud: String,
    /// Space-separated scopes.
    pub scope: String,
    /// Token class.
    pub class: String,
    /// DPoP key thumbprint it is bound to.
    pub jkt: String,
    /// Issued at.
    pub iat: u64,
    /// Expires at.
    pub exp: u64,
    /// Signing key id.
    pub kid: String,
    /// HMAC-SHA256 of the token under the deployment's token-hash key.
    pub token_hmac: [u8; 32],
}

/// One entry of the change feed (what `Watch` streams).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Position in the feed, from 1.
    pub seq: u64,
    /// When it was committed, Unix milliseconds.
    pub at_ms: u64,
    /// `jwks`, `bundle`, `policy`, `revocation` or `denial`.
    pub kind: String,
    /// The new state, JSON.
    pub body: String,
}

/// An X.509-SVID as the inventory keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidRecord {
    /// Serial number, hex.
    pub serial: String,
    /// Whom it names.
    pub spiffe_id: String,
    /// How it was obtained: `join_token`, `k8s_sa`, `renew`, `admin_mint`.
    pub method: &'static str,
    /// Issued at.
    pub issued_at: u64,
    /// Expires at.
    pub expires_at: u64,
}

/// Where the audit hash chain stands, as recorded with the last write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditHead {
    /// The first chained record (earlier ones predate the chain).
    pub chain_from: u64,
    /// The last record written (0: none).
    pub seq: u64,
    /// The SHA-256 of its line.
    pub hash: ChainHash,
    /// What the first kept record carries as `prev`: zeros, or the hash of
    /// the last record archived and removed.
    pub anchor: ChainHash,
}

/// Which audit records a query wants; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only records after this sequence number (paging).
    pub after: u64,
    /// Records naming this token id.
    pub jti: Option<String>,
    /// Records of this kind (`token.issue`) or family (`token`).
    pub kind: Option<String>,
    /// Records at or after this time (Unix seconds).
    pub since: Option<u64>,
    /// Records before this time.
    pub until: Option<u64>,
    /// Records whose actor, `spiffe_id` or `sub` is this SPIFFE ID.
    pub sub: Option<String>,
}

/// Which live tokens a listing wants; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFilter {
    /// Live at this time.
    pub now: u64,
    /// Holder.
    pub sub: Option<String>,
    /// Audience.
    pub aud: Option<String>,
    /// Class.
    pub class: Option<String>,
    /// Expiring at or before this time.
    pub expires_by: Option<u64>,
    /// After this (exp, jti): the previous page's last row.
    pub after: Option<(u64, String)>,
}

/// Tokens issued for one (holder, audience, scopes, class).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUsage {
    /// Holder.
    pub sub: String,
    /// Audience.
    pub aud: String,
    /// Space-separated scopes.
    pub scope: String,
    /// Class.
    pub class: String,
    /// How many.
    pub count: u64,
    /// Longest lifetime among them (seconds).
    pub longest_life: u64,
    /// The newest one's `iat`.
    pub last_issued: u64,
}

/// An identity as the inventory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    /// The workload.
    pub spiffe_id: String,
    /// First SVID (or token) issued.
    pub first_seen: u64,
    /// Newest SVID issued, if any.
    pub last_svid_at: Option<u64>,
    /// When its newest SVID expires.
    pub svid_expires_at: Option<u64>,
    /// SVIDs issued.
    pub svids: u64,
    /// How the newest SVID was obtained.
    pub method: String,
    /// Newest token issued, if any.
    pub last_token_at: Option<u64>,
    /// Tokens issued (the inventory keeps them all).
    pub tokens: u64,
    /// Of which live now.
    pub live_tokens: u64,
}

impl IdentityRecord {
    /// Last attestation, renewal or token.
    pub fn last_seen(&self) -> u64 {
        self.last_svid_at
            .unwrap_or(0)
            .max(self.last_token_at.unwrap_or(0))
            .max(self.first_seen)
    }
}

/// One stored version of the trust policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersion {
    /// From 1, in the order they were stored.
    pub version: u64,
    /// When (Unix seconds).
    pub created_at: u64,
    /// Who: an admin's SPIFFE ID, or `file:<path>`.
    pub author: String,
    /// How: `apply`, `rollback`, `file` or `seed`.
    pub source: String,
    /// Why, as the author said.
    pub comment: String,
    /// The document.
    pub yaml: String,
}

/// An inventory record written in the same transaction as its audit event.
#[derive(Debug, Clone)]
pub enum Write {
    /// A token was issued.
    Issued(IssuedToken),
    /// An X.509-SVID was issued.
    Svid(SvidRecord),
}

/// The broker's store.
#[derive(Debug, Clone)]
pub enum Store {
    /// Embedded SQLite (the default).
    Sqlite(sqlite::SqliteStore),
    /// PostgreSQL, shared by broker replicas.
    Postgres(postgres::PgStore),
}

impl Store {
    /// Opens (creating and migrating) a SQLite store at `path`.
    ///
    /// # Errors
    /// [`StoreError`] if the file cannot be opened or migrated.
    pub async fn open_sqlite(path: &std::path::Path, sealer: Sealer) -> Result<Self, StoreError> {
        sqlite::SqliteStore::open(path, sealer)
            .await
            .map(Self::Sqlite)
    }

    /// Connects (and migrates) a PostgreSQL store at `url`.
    ///
    /// # Errors
    /// [`StoreError`] if it cannot connect or migrate.
    pub async fn open_postgres(url: &str, sealer: Sealer) -> Result<Self, StoreError> {
        postgres::PgStore::open(url, sealer)
            .await
            .map(Self::Postgres)
    }

    /// For a store shared by replicas, a stream of change-feed sequence
    /// numbers committed by anyone (PostgreSQL LISTEN); `None` for the
    /// embedded store, whose only writer is this process.
    ///
    /// # Errors
    /// [`StoreError`] if listening fails.
    pub async fn listen_changes(&self) -> Result<Option<sqlx::postgres::PgListener>, StoreError> {
        match self {
            Self::Sqlite(_) => Ok(None),
            Self::Postgres(s) => {
                let mut listener = sqlx::postgres::PgListener::connect_with(s.pool()).await?;
                listener.listen(postgres::CHANGES_CHANNEL).await?;
                Ok(Some(listener))
            }
        }
    }

    /// The settings an acknowledged write's durability rests on, as the
    /// database reports them on one of the store's own connections:
    /// SQLite `journal_mode` (`wal`) and `synchronous` (`2`, FULL: each
    /// commit is fsynced); PostgreSQL `synchronous_commit` (`on`: a commit
    /// returns once its WAL is flushed) and `fsync` (the server's; `off`
    /// would make the flush a no-op).
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn durability(&self) -> Result<Vec<(&'static str, String)>, StoreError> {
        match self {
            Self::Sqlite(s) => s.durability().await,
            Self::Postgres(s) => s.durability().await,
        }
    }

    /// The schema version in the database.
    ///
    /// # Errors
    /// [`StoreError::Database`].
    pub async fn schema_version(&self) -> Result<i64, StoreError> {
        match self {
            Self::Sqlite(s) => s.schema_version().await,
            Self::Postgres(s) => s.schema_version().await,
        }
    }

    /// A secret by name, created with `generate` (and stored sealed) if it
    /// does not exist yet. Concurrent callers all get the same value.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn secret_or_create(
        &self,
        name: &str,
        generate: impl FnOnce() -> Zeroizing<Vec<u8>>,
        now: u64,
    ) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        match self {
            Self::Sqlite(s) => s.secret_or_create(name, generate, now).await,
            Self::Postgres(s) => s.secret_or_create(name, generate, now).await,
        }
    }

    /// Saves the CA material (keys sealed). Refuses to overwrite an existing
    /// CA unless `replace` is set (rotation).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn save_ca(
        &self,
        material: &crate::ca::CaMaterial,
        replace: bool,
        now: u64,
    ) -> Result<bool, StoreError> {
        match self {
            Self::Sqlite(s) => s.save_ca(material, replace, now).await,
            Self::Postgres(s) => s.save_ca(material, replace, now).await,
        }
    }

    /// The CA material, if a CA was saved.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn load_ca(&self) -> Result<Option<crate::ca::CaMaterial>, StoreError> {
        match self {
            Self::Sqlite(s) => s.load_ca().await,
            Self::Postgres(s) => s.load_ca().await,
        }
    }

    /// Stores a new signing key (sealed).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn insert_signing_key(&self, record: &SigningKeyRecord) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(s) => s.insert_signing_key(record).await,
            Self::Postgres(s) => s.insert_signing_key(record).await,
        }
    }

    /// Marks a signing key as no longer signing.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn retire_signing_key(&self, kid: &str, at: u64) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(s) => s.retire_signing_key(kid, at).await,
            Self::Postgres(s) => s.retire_signing_key(kid, at).await,
        }
    }

    /// Withdraws a signing key (it leaked): it stops signing at `at` if it
    /// had not already, and is no longer published.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn withdraw_signing_key(&self, kid: &str, at: u64) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(s) => s.withdraw_signing_key(kid, at).await,
            Self::Postgres(s) => s.withdraw_signing_key(kid, at).await,
        }
    }

    /// Every stored signing key, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        match self {
            Self::Sqlite(s) => s.signing_keys().await,
            Self::Postgres(s) => s.signing_keys().await,
        }
    }

    /// Records a join token (by hash) for `id`, valid until `expires_at`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn create_join_token(
        &self,
        hash: &JoinTokenHash,
        id: &SpiffeId,
        expires_at: u64,
        now: u64,
    ) -> Result<(), StoreError> {
        match self {
            Self::Sqlite(s) => s.create_join_token(hash, id, expires_at, now).await,
            Self::Postgres(s) => s.create_join_token(hash, id, expires_at, now).await,
        }
    }

    /// Whom a join token names, if it is still usable (known, unexpired,
    /// unused), without using it: lets a request be checked before the
    /// token is spent. [`Store::consume_join_token`] still decides.
    ///
    /// # Errors
    /// `Ok(Err(refusal))` for an unknown, expired or used token;
    /// [`StoreError`] for a database failure.
    pub async fn join_token_identity(
        &self,
        hash: &JoinTokenHash,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        match self {
            Self::Sqlite(s) => s.join_token_identity(hash, now).await,
            Self::Postgres(s) => s.join_token_identity(hash, now).await,
        }
    }

    /// Uses a join token: atomically marks it used and returns its SPIFFE
    /// ID. Of many concurrent callers with the same token, exactly one
    /// succeeds.
    ///
    /// # Errors
    /// `Ok(Err(refusal))` for an unknown, expired or used token;
    /// [`StoreError`] for a database failure.
    pub async fn consume_join_token(
        &self,
        hash: &JoinTokenHash,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        match self {
            Self::Sqlite(s) => s.consume_join_token(hash, now).await,
            Self::Postgres(s) => s.consume_join_token(hash, now).await,
        }
    }

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
        match self {
            Self::Sqlite(s) => s.write(write, event).await,
            Self::Postgres(s) => s.write(write, event).await,
        }
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
        match self {
            Self::Sqlite(s) => s.audit_after(after, limit).await,
            Self::Postgres(s) => s.audit_after(after, limit).await,
        }
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
        match self {
            Self::Sqlite(s) => {
                s.insert_policy_version(author, source, comment, yaml, now)
                    .await
            }
            Self::Postgres(s) => {
                s.insert_policy_version(author, source, comment, yaml, now)
                    .await
            }
        }
    }

    /// One policy version, or the newest with `None`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn policy_version(
        &self,
        version: Option<u64>,
    ) -> Result<Option<PolicyVersion>, StoreError> {
        match self {
            Self::Sqlite(s) => s.policy_version(version).await,
            Self::Postgres(s) => s.policy_version(version).await,
        }
    }

    /// The newest `limit` policy versions, newest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn policy_versions(&self, limit: u32) -> Result<Vec<PolicyVersion>, StoreError> {
        match self {
            Self::Sqlite(s) => s.policy_versions(limit).await,
            Self::Postgres(s) => s.policy_versions(limit).await,
        }
    }

    /// The policy version in force at `t` (the newest stored at or before
    /// it) and every later one, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn policy_versions_since(&self, t: u64) -> Result<Vec<PolicyVersion>, StoreError> {
        match self {
            Self::Sqlite(s) => s.policy_versions_since(t).await,
            Self::Postgres(s) => s.policy_versions_since(t).await,
        }
    }

    /// Sends every audit line, once committed, to `lines`, in commit
    /// order (the broker's JSON-lines file).
    pub fn tap_audit(&self, lines: tokio::sync::mpsc::UnboundedSender<String>) {
        match self {
            Self::Sqlite(s) => s.tap_audit(lines),
            Self::Postgres(s) => s.tap_audit(lines),
        }
    }

    /// Where the audit chain stands.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn audit_head(&self) -> Result<AuditHead, StoreError> {
        match self {
            Self::Sqlite(s) => s.audit_head().await,
            Self::Postgres(s) => s.audit_head().await,
        }
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
        match self {
            Self::Sqlite(s) => s.truncate_audit(through, expect).await,
            Self::Postgres(s) => s.truncate_audit(through, expect).await,
        }
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
        match self {
            Self::Sqlite(s) => s.audit_query(filter, limit).await,
            Self::Postgres(s) => s.audit_query(filter, limit).await,
        }
    }

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
        match self {
            Self::Sqlite(s) => s.append_change(kind, body, at_ms).await,
            Self::Postgres(s) => s.append_change(kind, body, at_ms).await,
        }
    }

    /// Changes after sequence number `after`, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn changes_after(&self, after: u64, limit: u32) -> Result<Vec<Change>, StoreError> {
        match self {
            Self::Sqlite(s) => s.changes_after(after, limit).await,
            Self::Postgres(s) => s.changes_after(after, limit).await,
        }
    }

    /// The newest change of each kind, oldest first: the whole current
    /// state, for a subscriber starting fresh.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn latest_changes(&self) -> Result<Vec<Change>, StoreError> {
        match self {
            Self::Sqlite(s) => s.latest_changes().await,
            Self::Postgres(s) => s.latest_changes().await,
        }
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
        match self {
            Self::Sqlite(s) => s.current_state(now).await,
            Self::Postgres(s) => s.current_state(now).await,
        }
    }

    /// When the token with this `jti` expires, if the inventory has it.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn token_exp(&self, jti: &str) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Sqlite(s) => s.token_exp(jti).await,
            Self::Postgres(s) => s.token_exp(jti).await,
        }
    }

    /// The latest `exp` of the tokens live at `now` and issued at or
    /// before `issued_before`, of holder `sub` and DPoP key `jkt` when
    /// given: how long a revocation covering them must last.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn latest_live_exp(
        &self,
        now: u64,
        issued_before: u64,
        sub: Option<&str>,
        jkt: Option<&str>,
    ) -> Result<Option<u64>, StoreError> {
        match self {
            Self::Sqlite(s) => s.latest_live_exp(now, issued_before, sub, jkt).await,
            Self::Postgres(s) => s.latest_live_exp(now, issued_before, sub, jkt).await,
        }
    }

    /// Per signing key, the latest `exp` of the live tokens it signed: how
    /// long a retired key must stay published.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn live_exp_by_kid(&self, now: u64) -> Result<Vec<(String, u64)>, StoreError> {
        match self {
            Self::Sqlite(s) => s.live_exp_by_kid(now).await,
            Self::Postgres(s) => s.live_exp_by_kid(now).await,
        }
    }

    /// How many tokens the inventory holds (live or not).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn count_issued(&self) -> Result<u64, StoreError> {
        match self {
            Self::Sqlite(s) => s.count_issued().await,
            Self::Postgres(s) => s.count_issued().await,
        }
    }

    /// How many X.509-SVIDs have not expired at `now`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn live_svids(&self, now: u64) -> Result<u64, StoreError> {
        match self {
            Self::Sqlite(s) => s.live_svids(now).await,
            Self::Postgres(s) => s.live_svids(now).await,
        }
    }

    /// Tokens not yet expired at `now`, soonest expiry first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn live_tokens(&self, now: u64, limit: u32) -> Result<Vec<IssuedToken>, StoreError> {
        let filter = TokenFilter {
            now,
            ..TokenFilter::default()
        };
        self.find_live_tokens(&filter, limit).await
    }

    /// Live tokens matching `filter`, soonest expiry first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn find_live_tokens(
        &self,
        filter: &TokenFilter,
        limit: u32,
    ) -> Result<Vec<IssuedToken>, StoreError> {
        match self {
            Self::Sqlite(s) => s.live_tokens(filter, limit).await,
            Self::Postgres(s) => s.live_tokens(filter, limit).await,
        }
    }

    /// Live tokens at `now`: how many, how many holders, and the most any
    /// one holder has.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn live_token_counts(&self, now: u64) -> Result<(u64, u64, u64), StoreError> {
        match self {
            Self::Sqlite(s) => s.live_token_counts(now).await,
            Self::Postgres(s) => s.live_token_counts(now).await,
        }
    }

    /// Deletes at most `limit` each of tokens and SVIDs that expired before
    /// `before`, and join tokens that did; returns how many rows went.
    /// The audit log keeps its records (and so `audit lookup` still finds
    /// a pruned token by the HMAC in its issuance record).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn prune_inventory(&self, before: u64, limit: u32) -> Result<u64, StoreError> {
        match self {
            Self::Sqlite(s) => s.prune_inventory(before, limit).await,
            Self::Postgres(s) => s.prune_inventory(before, limit).await,
        }
    }

    /// Tokens issued since `since`, counted per holder, audience, scopes
    /// and class (for access review).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn token_usage(&self, since: u64) -> Result<Vec<TokenUsage>, StoreError> {
        match self {
            Self::Sqlite(s) => s.token_usage(since).await,
            Self::Postgres(s) => s.token_usage(since).await,
        }
    }

    /// Every identity the broker has issued an SVID or a token to.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn identities(&self, now: u64) -> Result<Vec<IdentityRecord>, StoreError> {
        match self {
            Self::Sqlite(s) => s.identities(now).await,
            Self::Postgres(s) => s.identities(now).await,
        }
    }

    /// The inventory record of a token: by its `jti`, and only if its keyed
    /// hash matches too (so a forged token naming a real `jti` finds
    /// nothing).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn token_by_jti(
        &self,
        jti: &str,
        hmac: &[u8; 32],
    ) -> Result<Option<IssuedToken>, StoreError> {
        match self {
            Self::Sqlite(s) => s.token_by_jti(jti, hmac).await,
            Self::Postgres(s) => s.token_by_jti(jti, hmac).await,
        }
    }
}
