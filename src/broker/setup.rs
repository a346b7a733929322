//! From `tally broker`'s configuration to a broker's [`Parts`]: the data
//! directory (0700), the store sealing key (a file that group or others
//! can read is refused; one is generated next to the data on first
//! start), the store (SQLite in the data directory, or PostgreSQL), the
//! policy file, a supplied root CA, ServiceAccount token attestation
//! (the keys file, or discovery with the cluster CA and the broker's own
//! token, and TokenReview).

use super::cluster::https::ClusterHttps;
use super::cluster::keys::{DiscoveredKeys, KeyRules};
use super::cluster::{KeySource, ServiceAccounts, TokenReview};
use super::config::{BrokerConfig, PolicySourceChoice, SaConfig, SaKeysFrom};
use super::run::{Parts, StartError, write_file};
use super::{BrokerSettings, PolicySource};
use crate::identity::k8s::{SaKeys, SaTokenConfig};
use crate::store::{Sealer, Store};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

fn read_text(path: &Path) -> Result<String, StartError> {
    crate::config::read_text(path).map_err(|e| StartError::Config(e.to_string()))
}

impl BrokerConfig {
    /// The parts of the broker this configuration describes, whose HTTPS
    /// listener is at `https` (the default issuer URL names its port).
    /// Makes the data directory and opens the store.
    ///
    /// # Errors
    /// [`StartError::Config`] for a bad setting or file,
    /// [`StartError::Failed`] when the data directory or store fails.
    pub async fn parts(&self, https: std::net::SocketAddr) -> Result<Parts, StartError> {
        let config = self;
        let failed = StartError::failed;
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| failed("creating the data dir", &e))?;
        std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| failed("securing the data dir", &e))?;
        let mut settings = match &config.policy {
            Some(path) => {
                let yaml = read_text(path)?;
                let policy = crate::policy::Policy::parse(&yaml).map_err(|e| {
                    StartError::Config(e.with_file(path.display().to_string()).to_string())
                })?;
                let mut settings = BrokerSettings::new(&config.trust_domain, policy)
                    .map_err(|e| StartError::Config(e.to_string()))?;
                settings.policy_yaml = Some(yaml);
                settings
            }
            None => {
                let none = crate::policy::Policy::parse(&format!(
                    "trust_domain: {}\n",
                    config.trust_domain
                ))
                .map_err(|e| StartError::Config(e.to_string()))?;
                BrokerSettings::new(&config.trust_domain, none)
                    .map_err(|e| StartError::Config(e.to_string()))?
            }
        };
        let store = match &config.database_url {
            Some(url) => Store::open_postgres(&url.0, sealer(config)?)
                .await
                .map_err(|e| failed(&format!("opening the PostgreSQL store at {url:?}"), &e))?,
            None => Store::open_sqlite(&config.data_dir.join("tally.db"), sealer(config)?)
                .await
                .map_err(|e| failed("opening the store", &e))?,
        };
        settings.policy_source = match (config.policy_source, &config.policy) {
            (PolicySourceChoice::Store, _) | (_, None) => PolicySource::Store,
            (choice, Some(path)) => PolicySource::File {
                name: path.display().to_string(),
                overrides_applied: choice == PolicySourceChoice::File,
            },
        };
        settings.issuer = match &config.issuer {
            Some(issuer) => issuer.clone(),
            None => default_issuer(&store, https).await?,
        };
        settings.svid_ttl = config.svid_ttl;
        settings.key_rotation = config.key_rotation;
        settings.inventory_retention = config.inventory_retention;
        settings.limits = config.limits;
        settings.audit_file = Some(config.audit_file.clone());
        if let Some((cert, key)) = &config.ca_root {
            settings.ca_root = Some(supplied_root(cert, key)?);
        }
        if let Some(sa) = &config.sa {
            let accounts = service_accounts(sa, &settings.issuer, &InCluster::default())?;
            settings.service_accounts = Some(std::sync::Arc::new(accounts));
        }
        let policy_file = match (config.policy_source, &config.policy) {
            (PolicySourceChoice::Store, _) | (_, None) => None,
            (_, Some(path)) => Some(path.clone()),
        };
        let mut parts = Parts::new(settings, store);
        parts.dns_names.clone_from(&config.dns_names);
        parts.data_dir = Some(config.data_dir.clone());
        parts.policy_file = policy_file;
        Ok(parts)
    }
}

/// Where a pod finds its ServiceAccount's CA and token, and the system
/// CA bundles looked for when there is no cluster CA (a field each, so
/// tests can point them elsewhere).
#[derive(Debug, Clone)]
struct InCluster {
    ca: PathBuf,
    token: PathBuf,
    system_bundles: Vec<PathBuf>,
}

impl Default for InCluster {
    fn default() -> Self {
        let mut system_bundles: Vec<PathBuf> = std::env::var_os("SSL_CERT_FILE")
            .map(PathBuf::from)
            .into_iter()
            .collect();
        system_bundles.extend(SYSTEM_BUNDLES.iter().map(PathBuf::from));
        Self {
            ca: PathBuf::from(SA_DIR).join("ca.crt"),
            token: PathBuf::from(SA_DIR).join("token"),
            system_bundles,
        }
    }
}

/// Where the kubelet mounts a pod's ServiceAccount credentials.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The system CA bundle, where the common distributions keep it
/// (Debian/Ubuntu/Alpine/distroless, Fedora/RHEL, openSUSE).
const SYSTEM_BUNDLES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
    "/etc/ssl/ca-bundle.pem",
    "/etc/ssl/cert.pem",
];

/// ServiceAccount token attestation from its settings: the JWKS file
/// read, or discovery set up (the CA read: the given file, else the
/// in-cluster one, else the system bundle; the bearer file: the given one,
/// which must exist, else the in-cluster one when it exists).
fn service_accounts(
    sa: &SaConfig,
    broker_issuer: &str,
    paths: &InCluster,
) -> Result<ServiceAccounts, StartError> {
    use crate::identity::k8s::discovery::{HttpsUrl, JwksHost};
    let usage = StartError::Config;
    let config = SaTokenConfig {
        issuer: sa.issuer.clone(),
        audience: sa
            .audience
            .clone()
            .unwrap_or_else(|| broker_issuer.to_owned()),
    };
    let needs_https = matches!(sa.keys, SaKeysFrom::Discovery { .. }) || sa.token_review.is_some();
    let https = if needs_https {
        let (ca_path, ca_pem) = cluster_ca(sa.ca_file.as_deref(), paths)?;
        let bearer = match &sa.api_token_file {
            Some(file) => {
                std::fs::metadata(file)
                    .map_err(|e| usage(format!("sa_api_token_file {}: {e}", file.display())))?;
                Some(file.clone())
            }
            None => paths.token.exists().then(|| paths.token.clone()),
        };
        tracing::info!(ca = %ca_path.display(), bearer = ?bearer, "the cluster's HTTPS servers are verified with this CA");
        let client = ClusterHttps::new(&ca_pem, bearer)
            .map_err(|e| usage(format!("sa_ca_file {}: {e}", ca_path.display())))?;
        Some(std::sync::Arc::new(client))
    } else {
        None
    };
    let keys = match (&sa.keys, &https) {
        (SaKeysFrom::File(jwks), _) => {
            let bytes = std::fs::read(jwks)
                .map_err(|e| usage(format!("sa_jwks {}: {e}", jwks.display())))?;
            let keys = SaKeys::parse(&bytes)
                .map_err(|e| usage(format!("sa_jwks {}: {e}", jwks.display())))?;
            tracing::info!(keys = keys.len(), issuer = %sa.issuer, "ServiceAccount token attestation on (keys from a file)");
            KeySource::File(keys)
        }
        (SaKeysFrom::Discovery { jwks_host }, Some(https)) => {
            let issuer: HttpsUrl = sa
                .issuer
                .parse()
                .map_err(|e| usage(format!("sa_issuer {:?} {e}", sa.issuer)))?;
            tracing::info!(issuer = %sa.issuer, "ServiceAccount token attestation on (keys by OpenID discovery)");
            KeySource::Discovery(std::sync::Arc::new(DiscoveredKeys::new(
                std::sync::Arc::clone(https),
                KeyRules {
                    issuer,
                    jwks_host: match jwks_host.as_deref() {
                        None => JwksHost::Issuer,
                        Some("*") => JwksHost::Any,
                        Some(host) => JwksHost::Also(host.to_owned()),
                    },
                    miss_interval: MISS_INTERVAL,
                },
            )))
        }
        (SaKeysFrom::Discovery { .. }, None) => unreachable!("needs_https covers discovery"),
    };
    let review = match (&sa.token_review, &https) {
        (Some(api), Some(https)) => {
            let api: HttpsUrl = api
                .parse()
                .map_err(|e| usage(format!("kube_api {api:?} {e}")))?;
            Some(TokenReview {
                https: std::sync::Arc::clone(https),
                url: api.with_path(crate::identity::k8s::review::PATH),
            })
        }
        _ => None,
    };
    Ok(ServiceAccounts::new(keys, config, review))
}

/// Least time between two key fetches for unknown `kid`s.
const MISS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// The CA the cluster's servers are verified with, and where it was read.
fn cluster_ca(given: Option<&Path>, paths: &InCluster) -> Result<(PathBuf, Vec<u8>), StartError> {
    let read = |path: &Path| {
        std::fs::read(path)
            .map(|pem| (path.to_owned(), pem))
            .map_err(|e| StartError::Config(format!("sa_ca_file {}: {e}", path.display())))
    };
    if let Some(path) = given {
        return read(path);
    }
    let found = std::iter::once(&paths.ca)
        .chain(&paths.system_bundles)
        .find(|p| p.exists());
    match found {
        Some(path) => read(path),
        None => Err(StartError::Config(format!(
            "sa_ca_file: none given, no cluster CA at {}, and no system CA bundle ({}); give --sa-ca-file",
            paths.ca.display(),
            paths
                .system_bundles
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// The issuer of a broker given none (a single broker: PostgreSQL
/// replicas must be given theirs): the one its deployment recorded at its
/// first start, whose tokens and sidecars the broker's clients hold, or
/// else `https://localhost:<HTTPS port>`. A broker restarted on another
/// HTTPS port keeps its issuer; one given another `--issuer` is refused
/// by [`crate::broker::Broker::open`].
async fn default_issuer(store: &Store, https: std::net::SocketAddr) -> Result<String, StartError> {
    let own = format!("https://localhost:{}", https.port());
    let recorded = store
        .deployment_setting(super::state::deployment::ISSUER)
        .await
        .map_err(|e| StartError::failed("reading the deployment's issuer", &e))?;
    Ok(match recorded {
        Some(recorded) => {
            if recorded != own {
                tracing::info!(issuer = %recorded, default = %own, "issuer as recorded at the deployment's first start (give --issuer to say so)");
            }
            recorded
        }
        None => own,
    })
}

/// Reads `--ca-cert` and `--ca-key`, refusing a key file that group or
/// others can read.
fn supplied_root(cert: &Path, key: &Path) -> Result<crate::ca::SuppliedRoot, StartError> {
    let usage = |what: String| StartError::Config(what);
    let meta =
        std::fs::metadata(key).map_err(|e| usage(format!("ca_key {}: {e}", key.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(usage(format!(
            "ca_key {} must not be readable by group or others (chmod 600)",
            key.display()
        )));
    }
    Ok(crate::ca::SuppliedRoot {
        cert_pem: read_text(cert)?,
        key_pem: zeroize::Zeroizing::new(read_text(key)?),
    })
}

fn sealer(config: &BrokerConfig) -> Result<Sealer, StartError> {
    let usage = |what: String| StartError::Config(what);
    if let Some(path) = &config.store_key_file {
        let meta = std::fs::metadata(path)
            .map_err(|e| usage(format!("store key file {}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(usage(format!(
                "store key file {} must not be readable by group or others (chmod 600)",
                path.display()
            )));
        }
        let text = zeroize::Zeroizing::new(
            std::fs::read(path).map_err(|e| usage(format!("{}: {e}", path.display())))?,
        );
        return Sealer::from_key_material(&text)
            .map_err(|e| usage(format!("store key file {}: {e}", path.display())));
    }
    if let Ok(key) = std::env::var("TALLY_STORE_KEY") {
        return Sealer::from_key_material(key.as_bytes())
            .map_err(|e| usage(format!("TALLY_STORE_KEY: {e}")));
    }
    let path = config.data_dir.join("store.key");
    if !path.exists() {
        let key = Sealer::generate_key_text().map_err(|e| StartError::Failed(e.to_string()))?;
        write_file(&path, key.as_bytes(), 0o600)?;
        tracing::warn!(
            path = %path.display(),
            "generated a store sealing key next to the data; in production keep it elsewhere (--store-key-file or TALLY_STORE_KEY)"
        );
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read(&path).map_err(|e| StartError::Failed(format!("{}: {e}", path.display())))?,
    );
    Sealer::from_key_material(&text)
        .map_err(|e| StartError::Config(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cluster_ca_is_the_given_file_else_the_pods_else_the_systems() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, name).unwrap();
            p
        };
        let (given, pod, system) = (
            file("given.pem"),
            dir.path().join("ca.crt"),
            file("system.pem"),
        );
        let mut paths = InCluster {
            ca: pod.clone(),
            token: dir.path().join("token"),
            system_bundles: vec![dir.path().join("absent.pem"), system.clone()],
        };
        assert_eq!(cluster_ca(Some(&given), &paths).unwrap().0, given);
        assert_eq!(cluster_ca(None, &paths).unwrap().0, system);
        std::fs::write(&pod, "pod").unwrap();
        assert_eq!(cluster_ca(None, &paths).unwrap().0, pod);
        std::fs::remove_file(&pod).unwrap();
        paths.system_bundles.clear();
        let e = cluster_ca(None, &paths).unwrap_err().to_string();
        assert!(e.contains("give --sa-ca-file"), "{e}");
    }
}
