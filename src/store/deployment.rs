//! What a deployment is, fixed when it first starts: its trust domain and
//! its token issuer. Every broker (every replica, every restart) on the
//! same store compares its settings with these, so two brokers never
//! serve one store under different names. The first writer wins, as for
//! the deployment secrets.

use super::db::Sql;
use super::rows::Cells;
use super::{Store, StoreError};

const SETTING: Sql = Sql::both("SELECT value FROM deployment WHERE name = $1");
const INSERT_SETTING: Sql = Sql::both(
    "INSERT INTO deployment (name, value, recorded_at) VALUES ($1, $2, $3) \
     ON CONFLICT (name) DO NOTHING",
);

impl Store {
    /// The deployment's recorded `name` (`trust_domain`, `issuer`), if
    /// one is recorded.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn deployment_setting(&self, name: &str) -> Result<Option<String>, StoreError> {
        let row = self.db.query(SETTING, &[name.into()]).optional().await?;
        row.map(|row| Cells::of("deployment", &row).text("value"))
            .transpose()
    }

    /// Records `name` as `value` unless the deployment has one already,
    /// and returns what is recorded: `value`, or what another broker (a
    /// replica starting at the same moment) recorded first.
    ///
    /// # Errors
    /// [`StoreError`].
    pub async fn record_deployment_setting(
        &self,
        name: &str,
        value: &str,
        now: u64,
    ) -> Result<String, StoreError> {
        self.db
            .query(INSERT_SETTING, &[name.into(), value.into(), now.into()])
            .execute()
            .await?;
        self.deployment_setting(name).await?.ok_or_else(|| {
            StoreError::Corrupt(format!("deployment setting {name} vanished after insert"))
        })
    }
}
