//! The cluster's ServiceAccount token keys found by OpenID discovery,
//! cached. Refreshed every [`PERIODIC_REFRESH`] by the broker's
//! background task, and when a token names an unknown `kid` (the cluster
//! rotated its key): at most once per [`KeyRules::miss_interval`],
//! concurrent misses sharing one fetch, so a flood of made-up `kid`s
//! cannot turn the broker into a load generator against the API server.
//! A failed refresh keeps the keys held.

use super::https::{ClusterHttps, FetchError};
use crate::identity::k8s::discovery::{self, DiscoveryError, HttpsUrl, JwksHost};
use crate::identity::k8s::{MAX_JWKS_LEN, SaKeys, SaTokenError};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;
use tokio::time::Instant;

/// How often the keys are fetched anyway.
pub const PERIODIC_REFRESH: Duration = Duration::from_secs(300);
/// How soon a failed first fetch is tried again.
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// Why the keys could not be fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KeysError {
    /// The request failed.
    #[error("{0}")]
    Fetch(#[from] FetchError),
    /// The discovery document is unusable.
    #[error("{0}")]
    Discovery(#[from] DiscoveryError),
    /// The JWKS is unusable.
    #[error("{0}")]
    Jwks(#[from] SaTokenError),
    /// No fetch has ended yet.
    #[error("the keys have not been fetched yet")]
    NotFetched,
}

/// Where the keys are and how often they may be fetched.
#[derive(Debug, Clone)]
pub struct KeyRules {
    /// The cluster's issuer (`--sa-issuer`).
    pub issuer: HttpsUrl,
    /// Hosts the `jwks_uri` may be on.
    pub jwks_host: JwksHost,
    /// Least time between two fetches caused by unknown `kid`s.
    pub miss_interval: Duration,
}

#[derive(Debug, Default)]
struct Held {
    keys: Option<Arc<SaKeys>>,
    /// When the last fetch of any kind ended, and how.
    last_fetch: Option<(Instant, Result<(), KeysError>)>,
    /// When the last fetch for an unknown `kid` started.
    last_miss: Option<Instant>,
}

/// Keys by discovery, cached.
#[derive(Debug)]
pub struct DiscoveredKeys {
    https: Arc<ClusterHttps>,
    rules: KeyRules,
    held: Mutex<Held>,
    /// Held while fetching: one fetch at a time.
    fetching: tokio::sync::Mutex<()>,
}

impl DiscoveredKeys {
    /// Keys of `rules.issuer`, fetched with `https` (none held yet).
    pub fn new(https: Arc<ClusterHttps>, rules: KeyRules) -> Self {
        Self {
            https,
            rules,
            held: Mutex::new(Held::default()),
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The keys held, if any fetch succeeded yet.
    pub fn current(&self) -> Option<Arc<SaKeys>> {
        self.held().keys.clone()
    }

    /// Fetches now (the periodic refresh).
    ///
    /// # Errors
    /// [`KeysError`]; the keys held stay.
    pub async fn refresh(&self) -> Result<Arc<SaKeys>, KeysError> {
        let _one = self.fetching.lock().await;
        self.fetch_and_hold().await
    }

    /// Fetches because a token named a `kid` the keys held do not have,
    /// unless another fetch ended while this one waited its turn, or a
    /// miss fetched less than `miss_interval` ago: then the keys held.
    ///
    /// # Errors
    /// [`KeysError`] when no keys are held and the fetch failed (or was
    /// not due and the last one failed).
    pub async fn refresh_for_miss(&self) -> Result<Arc<SaKeys>, KeysError> {
        let asked = Instant::now();
        let _one = self.fetching.lock().await;
        {
            let held = self.held();
            let fresh = held.last_fetch.as_ref().filter(|(at, _)| *at >= asked);
            let recent_miss = held
                .last_miss
                .is_some_and(|at| at.elapsed() < self.rules.miss_interval);
            if fresh.is_some() || recent_miss {
                return match (&held.keys, &held.last_fetch) {
                    (Some(keys), _) => Ok(Arc::clone(keys)),
                    (None, Some((_, Err(e)))) => Err(e.clone()),
                    (None, _) => Err(KeysError::NotFetched),
                };
            }
        }
        self.held().last_miss = Some(Instant::now());
        self.fetch_and_hold().await
    }

    async fn fetch_and_hold(&self) -> Result<Arc<SaKeys>, KeysError> {
        let result = self.fetch().await.map(Arc::new);
        let mut held = self.held();
        match &result {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), issuer = %self.rules.issuer, "fetched the cluster's ServiceAccount token keys");
                held.keys = Some(Arc::clone(keys));
                held.last_fetch = Some((Instant::now(), Ok(())));
            }
            Err(e) => {
                tracing::warn!(error = %e, issuer = %self.rules.issuer, kept = held.keys.is_some(), "fetching the cluster's ServiceAccount token keys failed");
                held.last_fetch = Some((Instant::now(), Err(e.clone())));
            }
        }
        result
    }

    async fn fetch(&self) -> Result<SaKeys, KeysError> {
        let doc = self
            .https
            .get(&self.rules.issuer.discovery(), discovery::MAX_DISCOVERY_LEN)
            .await?;
        let jwks_uri = discovery::jwks_uri(&doc, &self.rules.issuer, &self.rules.jwks_host)?;
        let jwks = self.https.get(&jwks_uri, MAX_JWKS_LEN).await?;
        Ok(SaKeys::parse(&jwks)?)
    }
}

/// Keeps `keys` fresh: a fetch at once, then every [`PERIODIC_REFRESH`]
/// (every [`RETRY_AFTER_FAILURE`] while none has succeeded). Runs until
/// aborted.
pub async fn keep_fresh(keys: Arc<DiscoveredKeys>) {
    loop {
        let ok = keys.refresh().await.is_ok();
        let wait = if ok || keys.current().is_some() {
            PERIODIC_REFRESH
        } else {
            RETRY_AFTER_FAILURE
        };
        tokio::time::sleep(wait).await;
    }
}
