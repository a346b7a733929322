//! The names a deployment keeps for life: its trust domain and its token
//! issuer. The first broker to start on a store records them; every later
//! start (a restart, another replica) must be configured the same, or it
//! refuses to start naming both. A broker that started under another
//! trust domain would write an admin credential for it under the old
//! root and refuse the old domain's join tokens; replicas with different
//! issuers would issue tokens each other's sidecars refuse.

use super::{Broker, BrokerError, BrokerSettings};
use crate::store::Store;

/// The deployment setting naming the trust domain.
pub const TRUST_DOMAIN: &str = "trust_domain";
/// The deployment setting naming the token issuer (`iss`).
pub const ISSUER: &str = "issuer";

/// A setting that differs from what the deployment recorded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DeploymentError {
    /// The store belongs to another trust domain.
    #[error(
        "this store belongs to trust domain {stored}, not {configured} (--trust-domain): its CA, \
         SVIDs, join tokens and admin credential are all for spiffe://{stored}. Start with \
         --trust-domain {stored}. A trust domain cannot be changed in place: to move to \
         {configured}, start a new deployment (another data directory or database) and move \
         the workloads to it (federation between trust domains is not built)"
    )]
    TrustDomain {
        /// What the store holds (recorded, or read from its CA).
        stored: String,
        /// What this broker was given.
        configured: String,
    },
    /// The store's tokens carry another issuer.
    #[error(
        "this store's tokens are issued as {stored}, not {configured} (--issuer): every sidecar \
         checks `iss`, so tokens from a broker with another issuer are refused, and all the \
         tokens issued as {stored} would be refused if the issuer changed. {}",
        if *shared {
            "Every replica on one database must be started with the same --issuer: the URL \
             sidecars reach the brokers' Service at"
        } else {
            "Start with --issuer set to the stored one; to change the issuer, start a new \
             deployment (another data directory) and move the workloads to it"
        }
    )]
    Issuer {
        /// What the store holds.
        stored: String,
        /// What this broker was given (or defaulted to).
        configured: String,
        /// The store is shared by replicas (PostgreSQL).
        shared: bool,
    },
    /// More than one setting differs: each, one per line.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
    Several(Vec<DeploymentError>),
}

/// `stored` against `configured`, pure: `Ok` when they agree.
///
/// # Errors
/// [`DeploymentError::TrustDomain`] when they differ.
pub fn check_trust_domain(stored: &str, configured: &str) -> Result<(), DeploymentError> {
    if stored == configured {
        Ok(())
    } else {
        Err(DeploymentError::TrustDomain {
            stored: stored.to_owned(),
            configured: configured.to_owned(),
        })
    }
}

/// `stored` against `configured`, pure; a trailing `/` is no difference
/// (the broker trims it wherever it builds a URL from the issuer).
///
/// # Errors
/// [`DeploymentError::Issuer`] when they differ.
pub fn check_issuer(stored: &str, configured: &str, shared: bool) -> Result<(), DeploymentError> {
    if stored.trim_end_matches('/') == configured.trim_end_matches('/') {
        Ok(())
    } else {
        Err(DeploymentError::Issuer {
            stored: stored.to_owned(),
            configured: configured.to_owned(),
            shared,
        })
    }
}

impl Broker {
    /// Checks `settings` against what the deployment on `store` recorded,
    /// before anything is written under them. A store from before the
    /// deployment was recorded is checked against its CA (the
    /// intermediate's URI SAN names the trust domain).
    pub(super) async fn check_deployment(
        settings: &BrokerSettings,
        store: &Store,
    ) -> Result<(), BrokerError> {
        let configured = settings.trust_domain.trust_domain();
        let stored = match store.deployment_setting(TRUST_DOMAIN).await? {
            Some(td) => Some(td),
            None => store.load_ca().await?.and_then(|ca| {
                let der = crate::ca::pem_body(&ca.intermediate_cert_pem)?;
                let id = crate::ca::spiffe_id_of(&der).ok()?;
                Some(id.trust_domain().to_owned())
            }),
        };
        // Both are checked, so a start that differs in both says so at once.
        let mut differ = Vec::new();
        if let Some(Err(e)) = stored.map(|stored| check_trust_domain(&stored, configured)) {
            differ.push(e);
        }
        if let Some(Err(e)) = store
            .deployment_setting(ISSUER)
            .await?
            .map(|stored| check_issuer(&stored, &settings.issuer, store.is_shared()))
        {
            differ.push(e);
        }
        match differ.len() {
            0 => Ok(()),
            1 => Err(differ.remove(0).into()),
            _ => Err(DeploymentError::Several(differ).into()),
        }
    }

    /// Records `settings`' trust domain and issuer for a deployment that
    /// has none recorded (its first start, or its first since they were
    /// recorded), once the broker has opened under them. A replica that
    /// recorded others first, in the meantime, wins: this one refuses.
    pub(super) async fn record_deployment(
        settings: &BrokerSettings,
        store: &Store,
        now: u64,
    ) -> Result<(), BrokerError> {
        let configured = settings.trust_domain.trust_domain();
        let stored = store
            .record_deployment_setting(TRUST_DOMAIN, configured, now)
            .await?;
        check_trust_domain(&stored, configured)?;
        let stored = store
            .record_deployment_setting(ISSUER, &settings.issuer, now)
            .await?;
        check_issuer(&stored, &settings.issuer, store.is_shared())?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trust_domain_change_names_both_and_how_to_move() {
        let e = check_trust_domain("old.example", "new.example").unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("trust domain old.example, not new.example"),
            "{text}"
        );
        assert!(text.contains("--trust-domain old.example"), "{text}");
        assert!(text.contains("new deployment"), "{text}");
        assert!(check_trust_domain("a.example", "a.example").is_ok());
    }

    #[test]
    fn an_issuer_change_names_both_and_a_trailing_slash_is_none() {
        assert!(check_issuer("https://b.example:8444/", "https://b.example:8444", false).is_ok());
        let e = check_issuer("https://a:8444", "https://b:8444", true).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains("issued as https://a:8444, not https://b:8444"),
            "{text}"
        );
        assert!(text.contains("same --issuer"), "{text}");
        let alone = check_issuer("https://a:8444", "https://b:8444", false).unwrap_err();
        assert!(alone.to_string().contains("new deployment"), "{alone}");
    }
}
