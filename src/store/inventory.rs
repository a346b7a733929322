//! The inventory of what the broker issued: tokens, access tokens and
//! JWT-SVIDs alike (by `jti` and keyed hash, never the token) and X.509-SVIDs, for lookup, listings, access
//! review, how long revocations and retired keys must last, and pruning.

use super::db::Sql;
use super::rows::{Cells, identities_from_rows, issued_from_row, kid_exp_from_row, usage_from_row};
use super::{IdentityRecord, IssuedToken, Store, StoreError, TokenFilter, TokenUsage};

const TOKEN_EXP: Sql = Sql::both("SELECT exp FROM issued_tokens WHERE jti = $1");
/// Walks the exp index down from the latest: tokens issued after
/// `issued_before` are the only ones skipped.
const LATEST_LIVE_EXP: Sql = Sql::each(
    "SELECT exp FROM issued_tokens WHERE exp > ?1 AND iat <= ?2 \
     AND (?3 IS NULL OR sub = ?3) AND (?4 IS NULL OR jkt = ?4) \
     ORDER BY exp DESC LIMIT 1",
    "SELECT exp FROM issued_tokens WHERE exp > $1 AND iat <= $2 \
     AND ($3::text IS NULL OR sub = $3) AND ($4::text IS NULL OR jkt = $4) \
     ORDER BY exp DESC LIMIT 1",
);
const LIVE_EXP_BY_KID: Sql =
    Sql::both("SELECT kid, MAX(exp) AS exp FROM issued_tokens WHERE exp > $1 GROUP BY kid");
const COUNT_ISSUED: Sql = Sql::both("SELECT COUNT(*) AS n FROM issued_tokens");
const LIVE_SVIDS: Sql = Sql::both("SELECT COUNT(*) AS n FROM svids WHERE expires_at > $1");
/// Walks the exp index from `now` (or the page's last row); each
/// condition is off when its parameter is NULL.
/// An audience matches a row naming it among others (a JWT-SVID's `aud`
/// lists them separated by single spaces) by position, never by pattern.
const LIVE_TOKENS: Sql = Sql::each(
    "SELECT jti, kind, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac \
     FROM issued_tokens WHERE exp > ?1 \
     AND (?2 IS NULL OR exp > ?2 OR (exp = ?2 AND jti > ?3)) \
     AND (?4 IS NULL OR sub = ?4) \
     AND (?5 IS NULL OR aud = ?5 OR instr(' ' || aud || ' ', ' ' || ?5 || ' ') > 0) \
     AND (?6 IS NULL OR class = ?6) AND (?7 IS NULL OR exp <= ?7) \
     AND (?9 IS NULL OR kind = ?9) \
     ORDER BY exp, jti LIMIT ?8",
    "SELECT jti, kind, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac \
     FROM issued_tokens WHERE exp > $1 \
     AND ($2::bigint IS NULL OR exp > $2 OR (exp = $2 AND jti > $3)) \
     AND ($4::text IS NULL OR sub = $4) \
     AND ($5::text IS NULL OR aud = $5 OR strpos(' ' || aud || ' ', ' ' || $5 || ' ') > 0) \
     AND ($6::text IS NULL OR class = $6) AND ($7::bigint IS NULL OR exp <= $7) \
     AND ($9::text IS NULL OR kind = $9) \
     ORDER BY exp, jti LIMIT $8",
);
const LIVE_TOKEN_COUNTS: Sql = Sql::both(
    "SELECT CAST(COALESCE(SUM(n), 0) AS BIGINT) AS total, COUNT(*) AS holders, \
     COALESCE(MAX(n), 0) AS most \
     FROM (SELECT COUNT(*) AS n FROM issued_tokens WHERE exp > $1 GROUP BY sub) AS per_holder",
);
const PRUNE: [Sql; 3] = [
    Sql::both(
        "DELETE FROM issued_tokens WHERE jti IN \
         (SELECT jti FROM issued_tokens WHERE exp < $1 ORDER BY exp LIMIT $2)",
    ),
    Sql::both(
        "DELETE FROM svids WHERE serial IN \
         (SELECT serial FROM svids WHERE expires_at < $1 ORDER BY expires_at LIMIT $2)",
    ),
    Sql::both(
        "DELETE FROM join_tokens WHERE hash IN \
         (SELECT hash FROM join_tokens WHERE expires_at < $1 LIMIT $2)",
    ),
];
/// Tokens issued since `since` also expire after it: the exp index
/// narrows the scan.
const TOKEN_USAGE: Sql = Sql::both(
    "SELECT sub, aud, scope, class, COUNT(*) AS n, MAX(exp - iat) AS longest, MAX(iat) AS last \
     FROM issued_tokens WHERE exp >= $1 AND iat >= $1 \
     GROUP BY sub, aud, scope, class",
);
const SVIDS_BY_IDENTITY: Sql = Sql::both(
    "SELECT spiffe_id, MIN(issued_at) AS first, MAX(issued_at) AS last, \
     MAX(expires_at) AS expires, COUNT(*) AS n, \
     (SELECT method FROM svids s2 WHERE s2.spiffe_id = svids.spiffe_id \
      ORDER BY issued_at DESC LIMIT 1) AS method \
     FROM svids GROUP BY spiffe_id ORDER BY spiffe_id",
);
const TOKENS_BY_IDENTITY: Sql = Sql::both(
    "SELECT sub, MIN(iat) AS first, MAX(iat) AS last, COUNT(*) AS n, \
     COUNT(*) FILTER (WHERE exp > $1) AS live FROM issued_tokens GROUP BY sub",
);
/// The pods holding each identity's live SVIDs (renewals repeat a pod:
/// one line each).
const LIVE_PODS: Sql = Sql::both(
    "SELECT DISTINCT spiffe_id, pod_name, pod_uid FROM svids \
     WHERE expires_at > $1 AND pod_uid IS NOT NULL ORDER BY spiffe_id, pod_name, pod_uid",
);
/// The pod an SVID was issued to, by serial (a renewal keeps it).
const SVID_POD: Sql = Sql::both("SELECT pod_name, pod_uid FROM svids WHERE serial = $1");
const SVID_METHOD: Sql = Sql::both("SELECT method FROM svids WHERE serial = $1");
/// Each identity's first SVID as noted when it was issued: it outlives
/// the pruned SVID rows.
const FIRST_SEEN: Sql = Sql::both("SELECT spiffe_id, first_seen FROM identity_first_seen");
const TOKEN_BY_JTI: Sql = Sql::both(
    "SELECT jti, kind, sub, aud, scope, class, jkt, iat, exp, kid, token_hmac \
     FROM issued_tokens WHERE jti = $1 AND token_hmac = $2",
);

impl Store {
    /// When the token with this `jti` expires, if the inventory has it.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn token_exp(&self, jti: &str) -> Result<Option<u64>, StoreError> {
        let row = self.db.query(TOKEN_EXP, &[jti.into()]).optional().await?;
        row.map(|row| Cells::of("issued_tokens", &row).uint("exp"))
            .transpose()
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
        let args = [now.into(), issued_before.into(), sub.into(), jkt.into()];
        let row = self.db.query(LATEST_LIVE_EXP, &args).optional().await?;
        row.map(|row| Cells::of("issued_tokens", &row).uint("exp"))
            .transpose()
    }

    /// Per signing key, the latest `exp` of the live tokens it signed: how
    /// long a retired key must stay published.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn live_exp_by_kid(&self, now: u64) -> Result<Vec<(String, u64)>, StoreError> {
        let rows = self.db.query(LIVE_EXP_BY_KID, &[now.into()]).all().await?;
        rows.iter().map(kid_exp_from_row).collect()
    }

    /// How many tokens the inventory holds (live or not).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn count_issued(&self) -> Result<u64, StoreError> {
        let row = self.db.query(COUNT_ISSUED, &[]).one().await?;
        Cells::of("issued_tokens", &row).uint("n")
    }

    /// How many X.509-SVIDs have not expired at `now`.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn live_svids(&self, now: u64) -> Result<u64, StoreError> {
        let row = self.db.query(LIVE_SVIDS, &[now.into()]).one().await?;
        Cells::of("svids", &row).uint("n")
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
        let (after_exp, after_jti) = filter
            .after
            .as_ref()
            .map_or((None, None), |(e, j)| (Some(*e), Some(j.as_str())));
        let args = [
            filter.now.into(),
            after_exp.into(),
            after_jti.into(),
            filter.sub.as_deref().into(),
            filter.aud.as_deref().into(),
            filter.class.as_deref().into(),
            filter.expires_by.into(),
            limit.into(),
            filter.kind.map(|k| k.as_str()).into(),
        ];
        let rows = self.db.query(LIVE_TOKENS, &args).all().await?;
        rows.iter().map(issued_from_row).collect()
    }

    /// Live tokens at `now`: how many, how many holders, and the most any
    /// one holder has.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn live_token_counts(&self, now: u64) -> Result<(u64, u64, u64), StoreError> {
        let row = self
            .db
            .query(LIVE_TOKEN_COUNTS, &[now.into()])
            .one()
            .await?;
        let c = Cells::of("issued_tokens", &row);
        Ok((c.uint("total")?, c.uint("holders")?, c.uint("most")?))
    }

    /// Deletes at most `limit` each of tokens and SVIDs that expired before
    /// `before`, and join tokens that did; returns how many rows went.
    /// The audit log keeps its records (and so `audit lookup` still finds
    /// a pruned token by the HMAC in its issuance record).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn prune_inventory(&self, before: u64, limit: u32) -> Result<u64, StoreError> {
        let mut gone = 0;
        for sql in PRUNE {
            gone += self
                .db
                .query(sql, &[before.into(), limit.into()])
                .execute()
                .await?;
        }
        Ok(gone)
    }

    /// Tokens issued since `since`, counted per holder, audience, scopes
    /// and class (for access review).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn token_usage(&self, since: u64) -> Result<Vec<TokenUsage>, StoreError> {
        let rows = self.db.query(TOKEN_USAGE, &[since.into()]).all().await?;
        let per_row = rows
            .iter()
            .map(usage_from_row)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(per_row.into_iter().flatten().collect())
    }

    /// Every identity the broker has issued an SVID or a token to.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn identities(&self, now: u64) -> Result<Vec<IdentityRecord>, StoreError> {
        let svids = self.db.query(SVIDS_BY_IDENTITY, &[]).all().await?;
        let tokens = self
            .db
            .query(TOKENS_BY_IDENTITY, &[now.into()])
            .all()
            .await?;
        let first_seen = self.db.query(FIRST_SEEN, &[]).all().await?;
        let pods = self.db.query(LIVE_PODS, &[now.into()]).all().await?;
        identities_from_rows(&svids, &tokens, &first_seen, &pods)
    }

    /// The pod the SVID with `serial` (hex) was issued to, if it was
    /// attested by a pod's ServiceAccount token (or renewed from one
    /// that was).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn svid_pod(
        &self,
        serial: &str,
    ) -> Result<Option<crate::identity::k8s::Pod>, StoreError> {
        let row = self.db.query(SVID_POD, &[serial.into()]).optional().await?;
        match row {
            Some(row) => Cells::of("svids", &row).pod(),
            None => Ok(None),
        }
    }

    /// How the SVID with `serial` (hex) was issued (`join_token`,
    /// `k8s_sa`, `renew`, `workload`, `admin_mint`), if it is recorded.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn svid_method(&self, serial: &str) -> Result<Option<String>, StoreError> {
        let row = self
            .db
            .query(SVID_METHOD, &[serial.into()])
            .optional()
            .await?;
        row.map(|row| Cells::of("svids", &row).opt_text("method"))
            .transpose()
            .map(Option::flatten)
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
        let row = self
            .db
            .query(TOKEN_BY_JTI, &[jti.into(), hmac.as_slice().into()])
            .optional()
            .await?;
        row.as_ref().map(issued_from_row).transpose()
    }
}
