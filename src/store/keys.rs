//! Key material and credentials: deployment secrets, the CA, signing keys
//! (all sealed at rest) and join tokens (by hash). Concurrent writers,
//! in one process or across replicas, agree through single statements:
//! first writer wins, exactly one consumer.

use super::db::{Arg, Sql};
use super::rows::{Cells, ca_from_row, join_token_from_row, signing_key_from_row};
use super::{JoinTokenRefusal, SigningKeyRecord, Store, StoreError};
use crate::ca::CaMaterial;
use crate::identity::{JoinTokenHash, SpiffeId};
use zeroize::Zeroizing;

const SECRET: Sql = Sql::both("SELECT sealed FROM secrets WHERE name = $1");
const INSERT_SECRET: Sql = Sql::both(
    "INSERT INTO secrets (name, sealed, created_at) VALUES ($1, $2, $3) ON CONFLICT (name) DO NOTHING",
);
const INSERT_CA: Sql = Sql::both(
    "INSERT INTO ca (id, root_cert_pem, root_key_sealed, intermediate_cert_pem, \
     intermediate_key_sealed, updated_at) VALUES (1, $1, $2, $3, $4, $5) ON CONFLICT (id) DO NOTHING",
);
const UPSERT_CA: Sql = Sql::both(
    "INSERT INTO ca (id, root_cert_pem, root_key_sealed, intermediate_cert_pem, \
     intermediate_key_sealed, updated_at) VALUES (1, $1, $2, $3, $4, $5) ON CONFLICT (id) DO UPDATE SET \
     root_cert_pem = excluded.root_cert_pem, root_key_sealed = excluded.root_key_sealed, \
     intermediate_cert_pem = excluded.intermediate_cert_pem, \
     intermediate_key_sealed = excluded.intermediate_key_sealed, updated_at = excluded.updated_at",
);
const CA: Sql = Sql::both(
    "SELECT root_cert_pem, root_key_sealed, intermediate_cert_pem, intermediate_key_sealed \
     FROM ca WHERE id = 1",
);
const INSERT_SIGNING_KEY: Sql = Sql::both(
    "INSERT INTO signing_keys (kid, key_sealed, created_at, sign_from, retired_at, withdrawn_at) \
     VALUES ($1, $2, $3, $4, $5, $6)",
);
const RETIRE_SIGNING_KEY: Sql =
    Sql::both("UPDATE signing_keys SET retired_at = $1 WHERE kid = $2 AND retired_at IS NULL");
const WITHDRAW_SIGNING_KEY: Sql = Sql::both(
    "UPDATE signing_keys SET withdrawn_at = $1, \
     retired_at = CASE WHEN retired_at IS NULL OR retired_at > $1 THEN $1 ELSE retired_at END \
     WHERE kid = $2",
);
const SIGNING_KEYS: Sql = Sql::both(
    "SELECT kid, key_sealed, created_at, sign_from, retired_at, withdrawn_at \
     FROM signing_keys ORDER BY created_at, kid",
);
const INSERT_JOIN_TOKEN: Sql = Sql::both(
    "INSERT INTO join_tokens (hash, spiffe_id, created_at, expires_at) VALUES ($1, $2, $3, $4)",
);
const JOIN_TOKEN: Sql =
    Sql::both("SELECT spiffe_id, used_at, expires_at FROM join_tokens WHERE hash = $1");
/// One statement decides: of concurrent callers (on any replica), only
/// one sees the row still unused.
const CLAIM_JOIN_TOKEN: Sql = Sql::both(
    "UPDATE join_tokens SET used_at = $1 WHERE hash = $2 AND used_at IS NULL AND expires_at > $1 \
     RETURNING spiffe_id",
);
const JOIN_TOKEN_USED: Sql = Sql::both("SELECT used_at FROM join_tokens WHERE hash = $1");

impl Store {
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
        let record = format!("secret/{name}");
        if let Some(found) = self.secret(&record).await? {
            return Ok(found);
        }
        let sealed = self.sealer.seal(&record, &generate())?;
        // Another caller (or replica) may have won the race: keep whichever
        // was first.
        self.db
            .query(
                INSERT_SECRET,
                &[record.as_str().into(), sealed.as_slice().into(), now.into()],
            )
            .execute()
            .await?;
        self.secret(&record)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("{record} vanished after insert")))
    }

    async fn secret(&self, record: &str) -> Result<Option<Zeroizing<Vec<u8>>>, StoreError> {
        let Some(row) = self.db.query(SECRET, &[record.into()]).optional().await? else {
            return Ok(None);
        };
        let sealed = Cells::of("secrets", &row).blob("sealed")?;
        Ok(Some(self.sealer.open(record, &sealed)?))
    }

    /// Saves the CA material (keys sealed). Refuses to overwrite an existing
    /// CA unless `replace` is set (rotation); returns whether it saved.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn save_ca(
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
        let args = [
            m.root_cert_pem.as_str().into(),
            root_key.as_deref().into(),
            m.intermediate_cert_pem.as_str().into(),
            inter_key.as_slice().into(),
            now.into(),
        ];
        let sql = if replace { UPSERT_CA } else { INSERT_CA };
        Ok(self.db.query(sql, &args).execute().await? == 1)
    }

    /// The CA material, if a CA was saved.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn load_ca(&self) -> Result<Option<CaMaterial>, StoreError> {
        let row = self.db.query(CA, &[]).optional().await?;
        row.map(|row| ca_from_row(&row, &self.sealer)).transpose()
    }

    /// Stores a new signing key (sealed).
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn insert_signing_key(&self, r: &SigningKeyRecord) -> Result<(), StoreError> {
        let sealed = self
            .sealer
            .seal(&format!("signing-key/{}", r.kid), &r.pkcs8)?;
        let args = [
            r.kid.as_str().into(),
            sealed.as_slice().into(),
            r.created_at.into(),
            r.sign_from.into(),
            r.retired_at.into(),
            r.withdrawn_at.into(),
        ];
        self.db.query(INSERT_SIGNING_KEY, &args).execute().await?;
        Ok(())
    }

    /// Marks a signing key as no longer signing.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn retire_signing_key(&self, kid: &str, at: u64) -> Result<(), StoreError> {
        self.db
            .query(RETIRE_SIGNING_KEY, &[at.into(), kid.into()])
            .execute()
            .await?;
        Ok(())
    }

    /// Withdraws a signing key (it leaked): it stops signing at `at` if it
    /// had not already, and is no longer published.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn withdraw_signing_key(&self, kid: &str, at: u64) -> Result<(), StoreError> {
        self.db
            .query(WITHDRAW_SIGNING_KEY, &[at.into(), kid.into()])
            .execute()
            .await?;
        Ok(())
    }

    /// Every stored signing key, oldest first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyRecord>, StoreError> {
        let rows = self.db.query(SIGNING_KEYS, &[]).all().await?;
        rows.iter()
            .map(|row| signing_key_from_row(row, &self.sealer))
            .collect()
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
        let args = [
            hash.0.as_slice().into(),
            id.as_str().into(),
            now.into(),
            expires_at.into(),
        ];
        self.db.query(INSERT_JOIN_TOKEN, &args).execute().await?;
        Ok(())
    }

    /// Whom a join token names, if it is still usable (known, unexpired,
    /// unused), without using it: lets a request be checked before the
    /// token is spent. [`Store::consume_join_token`] still decides.
    ///
    /// # Errors
    /// `Ok(Err(refusal))` for an unknown, expired or used token;
    /// [`StoreError`] for a database failure or a corrupt row.
    pub async fn join_token_identity(
        &self,
        hash: &JoinTokenHash,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        let row = self
            .db
            .query(JOIN_TOKEN, &[hash.0.as_slice().into()])
            .optional()
            .await?;
        join_token_from_row(row.as_ref(), now)
    }

    /// Uses a join token: atomically marks it used and returns its SPIFFE
    /// ID. Of many concurrent callers with the same token, exactly one
    /// succeeds.
    ///
    /// # Errors
    /// `Ok(Err(refusal))` for an unknown, expired or used token;
    /// [`StoreError`] for a database failure or a corrupt row.
    pub async fn consume_join_token(
        &self,
        hash: &JoinTokenHash,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        let hash: Arg<'_> = hash.0.as_slice().into();
        let claimed = self
            .db
            .query(CLAIM_JOIN_TOKEN, &[now.into(), hash])
            .optional()
            .await?;
        if let Some(row) = claimed {
            return Cells::of("join_tokens", &row).parse("spiffe_id").map(Ok);
        }
        let Some(row) = self.db.query(JOIN_TOKEN_USED, &[hash]).optional().await? else {
            return Ok(Err(JoinTokenRefusal::Unknown));
        };
        Ok(Err(
            match Cells::of("join_tokens", &row).opt_uint("used_at")? {
                Some(_) => JoinTokenRefusal::AlreadyUsed,
                None => JoinTokenRefusal::Expired,
            },
        ))
    }
}
