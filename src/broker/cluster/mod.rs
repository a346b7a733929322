//! Kubernetes ServiceAccount token attestation, the I/O around
//! [`crate::identity::k8s`]: the cluster's keys (a JWKS file, or OpenID
//! discovery with a cache, [`keys`]), and an optional TokenReview at the
//! API server before an SVID is issued. [`ServiceAccounts::attest`] is
//! the one entry; [`SaAttestError`] says why a token was not accepted,
//! and the gRPC front end maps it once.
//!
//! - [`https`]: the HTTPS client (cluster CA, bearer file, caps, timeouts).
//! - [`keys`]: discovered keys, refreshed on unknown `kid`s (rate-limited)
//!   and periodically.

pub mod https;
pub mod keys;

use crate::identity::k8s::discovery::HttpsUrl;
use crate::identity::k8s::review::{self, ReviewError};
use crate::identity::k8s::{self, SaKeys, SaTokenConfig, SaTokenError, ServiceAccount};
use https::{ClusterHttps, FetchError};
use keys::{DiscoveredKeys, KeysError};
use std::sync::Arc;

/// Why a ServiceAccount token did not attest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SaAttestError {
    /// The token itself fails a check (signature, issuer, audience, times,
    /// subject, an unknown `kid` after a refresh).
    #[error("{0}")]
    Token(#[from] SaTokenError),
    /// The cluster's keys are not available: discovery or the JWKS fetch
    /// failed and none are cached.
    #[error("the cluster's ServiceAccount token keys are not available ({0}); retry later")]
    KeysUnavailable(KeysError),
    /// The API server's TokenReview does not confirm the token.
    #[error("{0}")]
    Review(#[from] ReviewError),
    /// The TokenReview could not be made: never taken as a yes.
    #[error("the TokenReview at the API server failed ({0}); retry later")]
    ReviewUnavailable(FetchError),
}

/// Where the cluster's keys come from.
#[derive(Debug)]
pub enum KeySource {
    /// A JWKS file read at start (offline).
    File(SaKeys),
    /// OpenID discovery at the issuer, cached.
    Discovery(Arc<DiscoveredKeys>),
}

/// The TokenReview call.
#[derive(Debug)]
pub struct TokenReview {
    /// The API server's client.
    pub https: Arc<ClusterHttps>,
    /// `<kube-api>/apis/authentication.k8s.io/v1/tokenreviews`.
    pub url: HttpsUrl,
}

/// ServiceAccount token attestation as configured.
#[derive(Debug)]
pub struct ServiceAccounts {
    keys: KeySource,
    config: SaTokenConfig,
    review: Option<TokenReview>,
}

impl ServiceAccounts {
    /// Attestation with `keys`, tokens saying what `config` says,
    /// confirmed by `review` when given.
    pub fn new(keys: KeySource, config: SaTokenConfig, review: Option<TokenReview>) -> Self {
        Self {
            keys,
            config,
            review,
        }
    }

    /// Whether every attestation is confirmed by a TokenReview: then an
    /// SVID a pod's token got is renewed only by attesting again (the
    /// review must see the pod still there), never on the SVID alone.
    pub fn reviews(&self) -> bool {
        self.review.is_some()
    }

    /// Offline attestation against a JWKS (no TokenReview).
    pub fn offline(keys: SaKeys, config: SaTokenConfig) -> Self {
        Self::new(KeySource::File(keys), config, None)
    }

    /// What tokens must say.
    pub fn config(&self) -> &SaTokenConfig {
        &self.config
    }

    /// The discovered keys, for the broker's refresh task.
    pub fn discovered(&self) -> Option<&Arc<DiscoveredKeys>> {
        match &self.keys {
            KeySource::Discovery(keys) => Some(keys),
            KeySource::File(_) => None,
        }
    }

    /// Verifies `token` at `now` (refreshing discovered keys once if it
    /// names an unknown `kid`), then asks the API server when TokenReview
    /// is on.
    ///
    /// # Errors
    /// [`SaAttestError`].
    pub async fn attest(&self, token: &str, now: u64) -> Result<ServiceAccount, SaAttestError> {
        let account = match &self.keys {
            KeySource::File(keys) => k8s::verify(token, keys, &self.config, now)?,
            KeySource::Discovery(cache) => {
                let first = match cache.current() {
                    Some(keys) => k8s::verify(token, &keys, &self.config, now),
                    None => Err(SaTokenError::UnknownKid(String::new())),
                };
                match first {
                    Err(SaTokenError::UnknownKid(_)) => {
                        let keys = match (cache.refresh_for_miss().await, cache.current()) {
                            (Ok(keys), _) => keys,
                            // Keys held but the refresh failed: the token
                            // is judged by them (and its kid stays unknown).
                            (Err(_), Some(held)) => held,
                            (Err(e), None) => return Err(SaAttestError::KeysUnavailable(e)),
                        };
                        k8s::verify(token, &keys, &self.config, now)?
                    }
                    other => other?,
                }
            }
        };
        if let Some(review) = &self.review {
            let answer = review
                .https
                .post_json(
                    &review.url,
                    review::request(token, &self.config.audience),
                    review::MAX_ANSWER_LEN,
                )
                .await
                .map_err(SaAttestError::ReviewUnavailable)?;
            review::judge(&answer, &account, &self.config.audience)?;
        }
        Ok(account)
    }
}
