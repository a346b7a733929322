//! From `tally broker`'s configuration to a broker's [`Parts`]: the data
//! directory (0700), the store sealing key (a file that group or others
//! can read is refused; one is generated next to the data on first
//! start), the store (SQLite in the data directory, or PostgreSQL), the
//! policy file, a supplied root CA, ServiceAccount token keys.

use super::config::{BrokerConfig, PolicySourceChoice};
use super::run::{Parts, StartError, write_file};
use super::{BrokerSettings, PolicySource};
use crate::store::{Sealer, Store};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

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
        if let Some((jwks, issuer, audience)) = &config.sa {
            let bytes = std::fs::read(jwks)
                .map_err(|e| StartError::Config(format!("sa_jwks {}: {e}", jwks.display())))?;
            let keys = crate::identity::k8s::SaKeys::parse(&bytes)
                .map_err(|e| StartError::Config(format!("sa_jwks {}: {e}", jwks.display())))?;
            tracing::info!(keys = keys.len(), %issuer, "ServiceAccount token attestation on");
            settings.service_accounts = Some((
                keys,
                crate::identity::k8s::SaTokenConfig {
                    issuer: issuer.clone(),
                    audience: audience.clone().unwrap_or_else(|| settings.issuer.clone()),
                },
            ));
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
