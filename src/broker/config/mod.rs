//! `tally broker` configuration: command-line flags, then `TALLY_*`
//! environment variables (clap reads both), then a YAML file, then
//! defaults. Every problem is reported at once.

use crate::config::DefaultValue::{Derived, Text};
use crate::config::Defaults;
use std::net::SocketAddr;
use std::path::PathBuf;

mod service_accounts;

pub use service_accounts::{SaConfig, SaKeysFrom};
use service_accounts::{SaGiven, service_accounts};

/// Settings as given (flags and environment); `None` means "not given".
#[derive(Debug, Clone, Default, clap::Args)]
#[command(mut_args(DEFAULTS.annotate()))]
pub struct BrokerFlags {
    /// YAML file with any of the settings below (flags and TALLY_* win).
    #[arg(long, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Directory for the store, trust bundle and admin credential.
    #[arg(long, env = "TALLY_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Trust domain name, e.g. example.org.
    #[arg(long, env = "TALLY_TRUST_DOMAIN")]
    pub trust_domain: Option<String>,
    /// gRPC (mTLS) listen address.
    #[arg(long, env = "TALLY_GRPC_LISTEN")]
    pub grpc_listen: Option<String>,
    /// HTTPS listen address (OAuth token endpoint, JWKS, metadata).
    #[arg(long, env = "TALLY_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Admin listen address (/metrics, /healthz, /readyz; plain HTTP).
    #[arg(long, env = "TALLY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// Audit JSON-lines file.
    #[arg(long, env = "TALLY_AUDIT_FILE")]
    pub audit_file: Option<PathBuf>,
    /// Trust policy YAML. With the file source, reloaded when it changes;
    /// with the store source, it seeds an empty store.
    #[arg(long, env = "TALLY_POLICY")]
    pub policy: Option<PathBuf>,
    /// Which policy wins: `file` (the --policy file; `ctl policy apply`
    /// refused) or `store` (versions set with `ctl policy apply` and
    /// `rollback`). A broker never starts with a file and stored versions
    /// disagreeing unless this says which wins.
    #[arg(long, env = "TALLY_POLICY_SOURCE")]
    pub policy_source: Option<String>,
    /// Extra DNS names for the broker's server certificate (repeatable).
    #[arg(long = "dns-name", env = "TALLY_DNS_NAMES", value_delimiter = ',')]
    pub dns_names: Vec<String>,
    /// PostgreSQL URL (postgres://user:password@host/db) for a store
    /// shared by broker replicas, instead of the embedded SQLite file.
    /// Replicas must share the store key too.
    #[arg(long, env = "TALLY_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// File holding the store sealing key (base64url, 32 bytes). Without
    /// it, TALLY_STORE_KEY is used, else a key file in the data dir.
    #[arg(long, env = "TALLY_STORE_KEY_FILE")]
    pub store_key_file: Option<PathBuf>,
    /// Token issuer URL (the `iss` claim). Without it: the one the store
    /// recorded, else https://localhost:<HTTPS port>. Required with
    /// --database-url. Recorded by the first start: a later start with
    /// another is refused.
    #[arg(long, env = "TALLY_ISSUER")]
    pub issuer: Option<String>,
    /// Root CA certificate (PEM) to issue under instead of generating one
    /// on first start; needs --ca-key.
    #[arg(long, env = "TALLY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// The root CA's private key (PEM); refused if group or others can read it.
    #[arg(long, env = "TALLY_CA_KEY")]
    pub ca_key: Option<PathBuf>,
    /// Issuer of Kubernetes ServiceAccount tokens (the cluster's
    /// --service-account-issuer); enables SA attestation. Alone, its keys
    /// are found by OpenID discovery at URL/.well-known/openid-configuration
    /// (https only), cached, and refreshed on an unknown kid.
    #[arg(long, env = "TALLY_SA_ISSUER", value_name = "URL")]
    pub sa_issuer: Option<String>,
    /// Offline instead of discovery: the cluster's JWKS document (from
    /// the API server's /openid/v1/jwks), read at start.
    #[arg(long, env = "TALLY_SA_JWKS", value_name = "FILE")]
    pub sa_jwks: Option<PathBuf>,
    /// Audience ServiceAccount tokens must carry.
    #[arg(long, env = "TALLY_SA_AUDIENCE")]
    pub sa_audience: Option<String>,
    /// CA certificates (PEM) that discovery and TokenReview verify the
    /// cluster's HTTPS servers with.
    #[arg(long, env = "TALLY_SA_CA_FILE", value_name = "FILE")]
    pub sa_ca_file: Option<PathBuf>,
    /// The broker's own ServiceAccount token, sent as bearer to discovery
    /// and TokenReview; read again on every use (the kubelet rotates it).
    #[arg(long, env = "TALLY_SA_API_TOKEN_FILE", value_name = "FILE")]
    pub sa_api_token_file: Option<PathBuf>,
    /// Before issuing an SVID, ask the API server (TokenReview) whether the
    /// token still authenticates, as the same account and pod: a deleted
    /// pod's token stops working at once.
    #[arg(long, env = "TALLY_SA_TOKEN_REVIEW")]
    pub sa_token_review: bool,
    /// The Kubernetes API server's URL, for TokenReview.
    #[arg(long, env = "TALLY_KUBE_API", value_name = "URL")]
    pub kube_api: Option<String>,
    /// Discovery: also accept a jwks_uri on this host (host or host:port),
    /// e.g. the API server's address, which kube-apiserver names by default;
    /// `*` for any host whose certificate chains to the cluster CA.
    #[arg(long, env = "TALLY_SA_JWKS_HOST", value_name = "HOST")]
    pub sa_jwks_host: Option<String>,
    /// Rotate the token-signing key after it has signed this long.
    #[arg(long, env = "TALLY_KEY_ROTATION")]
    pub key_rotation: Option<String>,
    /// Keep expired tokens, SVIDs and join tokens in the inventory this
    /// long, then delete them. `ctl review` and `ctl identities` see only
    /// what is kept; the audit log keeps everything (and `ctl audit
    /// lookup` finds a pruned token by its issuance record).
    #[arg(long, env = "TALLY_INVENTORY_RETENTION")]
    pub inventory_retention: Option<String>,
    /// X.509-SVID lifetime, from 1m to 24h.
    #[arg(long, env = "TALLY_SVID_TTL")]
    pub svid_ttl: Option<String>,
    /// Every listener: time from accept to a whole request head (TLS
    /// handshake included).
    #[arg(long, env = "TALLY_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// Every listener: close a connection with no request in flight after
    /// this long. A Watch stream is a request in flight.
    #[arg(long, env = "TALLY_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Every listener: most connections open at once.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
}

/// A PostgreSQL URL; it may hold a password, so `Debug` shows only where
/// it points.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(pub String);

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // postgres://user:secret@host/db → postgres://…@host/db
        match self.0.split_once("://").zip(self.0.rsplit_once('@')) {
            Some(((scheme, _), (_, rest))) => write!(f, "\"{scheme}://…@{rest}\""),
            None => f.write_str("\"postgres://…\""),
        }
    }
}

/// Which policy the operator said wins.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicySourceChoice {
    /// The file, because one was given and nothing else was said.
    FileByDefault,
    /// The file, explicitly (it overrides applied versions).
    File,
    /// Stored versions.
    Store,
}

/// Resolved, validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Trust domain name.
    pub trust_domain: String,
    /// gRPC listen address.
    pub grpc_listen: SocketAddr,
    /// HTTPS listen address.
    pub http_listen: SocketAddr,
    /// Admin listen address.
    pub admin_listen: SocketAddr,
    /// Audit JSON-lines file.
    pub audit_file: PathBuf,
    /// Policy file, if any.
    pub policy: Option<PathBuf>,
    /// Which policy wins, and whether that was said explicitly.
    pub policy_source: PolicySourceChoice,
    /// Extra DNS names for the server certificate.
    pub dns_names: Vec<String>,
    /// Store key file, if any.
    pub store_key_file: Option<PathBuf>,
    /// PostgreSQL store, if any (else SQLite in the data directory).
    pub database_url: Option<DatabaseUrl>,
    /// Issuer URL, if given (else derived from the bound HTTPS port).
    pub issuer: Option<String>,
    /// SVID lifetime in seconds.
    pub svid_ttl: u64,
    /// Signing-key rotation period in seconds.
    pub key_rotation: u64,
    /// How long expired inventory rows are kept, in seconds.
    pub inventory_retention: u64,
    /// Timeouts and connection cap of each listener.
    pub limits: crate::http::Limits,
    /// Supplied root CA certificate and key files.
    pub ca_root: Option<(PathBuf, PathBuf)>,
    /// Kubernetes ServiceAccount token attestation, when on.
    pub sa: Option<SaConfig>,
}

/// Every setting's default; see [`Defaults`].
pub static DEFAULTS: Defaults = Defaults(&[
    ("data_dir", Text("tally-data")),
    ("trust_domain", Text("tally.local")),
    ("grpc_listen", Text("127.0.0.1:8443")),
    ("http_listen", Text("127.0.0.1:8444")),
    ("admin_listen", Text("127.0.0.1:9090")),
    ("audit_file", Derived("DATA_DIR/audit.jsonl")),
    ("policy_source", Derived("file with --policy, else store")),
    ("issuer", Derived("https://localhost:<HTTPS port>")),
    ("svid_ttl", Text("1h")),
    ("key_rotation", Text("24h")),
    ("inventory_retention", Text("90d")),
    ("header_timeout", Text("10s")),
    ("idle_timeout", Text("60s")),
    ("max_connections", Text("1024")),
    ("sa_audience", Derived("the broker's issuer URL")),
    (
        "sa_ca_file",
        Derived(
            "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt when it exists, else the system CA bundle",
        ),
    ),
    (
        "sa_api_token_file",
        Derived("/var/run/secrets/kubernetes.io/serviceaccount/token when it exists, else none"),
    ),
    ("kube_api", Text("https://kubernetes.default.svc")),
    ("sa_jwks_host", Derived("the issuer's host only")),
]);

/// Flags with no key in a `--config` file (the file's own name).
pub const FLAG_ONLY: &[&str] = &["config"];

/// The keys a `--config` file may set: every flag's long name with `_`
/// for `-`, but [`FLAG_ONLY`].
pub const KEYS: &[&str] = &[
    "data_dir",
    "trust_domain",
    "grpc_listen",
    "http_listen",
    "admin_listen",
    "audit_file",
    "policy",
    "policy_source",
    "dns_names",
    "store_key_file",
    "database_url",
    "issuer",
    "svid_ttl",
    "key_rotation",
    "inventory_retention",
    "header_timeout",
    "idle_timeout",
    "max_connections",
    "ca_cert",
    "ca_key",
    "sa_jwks",
    "sa_issuer",
    "sa_audience",
    "sa_ca_file",
    "sa_api_token_file",
    "sa_token_review",
    "kube_api",
    "sa_jwks_host",
];

impl BrokerConfig {
    /// Resolves `flags` (already merged with the environment by clap) over
    /// the config file's text, if any (`file` is its name, for errors).
    ///
    /// # Errors
    /// Every problem found, one line each.
    pub fn resolve(flags: &BrokerFlags, file: Option<(&str, &str)>) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let from_file = crate::config::FileSettings::read(file, KEYS, &mut errors);
        let one = |flag: Option<String>, key: &str| -> Option<String> {
            flag.or_else(|| from_file.one(key))
        };
        let path = |flag: &Option<PathBuf>, key: &str| -> Option<PathBuf> {
            flag.clone()
                .or_else(|| from_file.one(key).map(PathBuf::from))
        };

        let trust_domain = one(flags.trust_domain.clone(), "trust_domain")
            .unwrap_or_else(|| DEFAULTS.text("trust_domain"));
        if let Err(e) = format!("spiffe://{trust_domain}").parse::<crate::identity::SpiffeId>() {
            errors.push(format!("trust_domain {trust_domain:?}: {e}"));
        }
        let mut address = |flag: &Option<String>, key: &str| {
            let text = one(flag.clone(), key).unwrap_or_else(|| DEFAULTS.text(key));
            text.parse::<SocketAddr>()
                .map_err(|e| errors.push(format!("{key} {text:?}: {e}")))
                .ok()
        };
        let grpc_listen = address(&flags.grpc_listen, "grpc_listen");
        let http_listen = address(&flags.http_listen, "http_listen");
        let admin_listen = address(&flags.admin_listen, "admin_listen");
        let issuer = one(flags.issuer.clone(), "issuer");
        if let Some(issuer) = &issuer
            && (crate::dpop::NormalizedUri::parse(issuer).is_err()
                || !issuer.starts_with("https://"))
        {
            errors.push(format!("issuer {issuer:?} must be an https:// URL"));
        }
        let ttl_text =
            one(flags.svid_ttl.clone(), "svid_ttl").unwrap_or_else(|| DEFAULTS.text("svid_ttl"));
        let svid_ttl = match humantime::parse_duration(&ttl_text) {
            Ok(d) if (60..=86_400).contains(&d.as_secs()) => Some(d.as_secs()),
            _ => {
                errors.push(format!(
                    "svid_ttl {ttl_text:?} must be a duration from 1m to 24h"
                ));
                None
            }
        };
        let rotation_text = one(flags.key_rotation.clone(), "key_rotation")
            .unwrap_or_else(|| DEFAULTS.text("key_rotation"));
        let key_rotation = match humantime::parse_duration(&rotation_text) {
            Ok(d) if (600..=90 * 86_400).contains(&d.as_secs()) => Some(d.as_secs()),
            _ => {
                errors.push(format!(
                    "key_rotation {rotation_text:?} must be a duration from 10m to 90d"
                ));
                None
            }
        };
        let retention_text = one(flags.inventory_retention.clone(), "inventory_retention")
            .unwrap_or_else(|| DEFAULTS.text("inventory_retention"));
        let inventory_retention = match humantime::parse_duration(&retention_text) {
            Ok(d) if (86_400..=3_650 * 86_400).contains(&d.as_secs()) => d.as_secs(),
            _ => {
                errors.push(format!(
                    "inventory_retention {retention_text:?} must be a duration from 1d to 3650d"
                ));
                0
            }
        };
        let limits = crate::config::listener_limits(
            one(flags.header_timeout.clone(), "header_timeout"),
            one(flags.idle_timeout.clone(), "idle_timeout"),
            one(flags.max_connections.clone(), "max_connections"),
            &DEFAULTS,
            &mut errors,
        );
        let dns_names = if flags.dns_names.is_empty() {
            from_file.all("dns_names")
        } else {
            flags.dns_names.clone()
        };
        for name in &dns_names {
            let ok = !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !ok {
                errors.push(format!("dns_names: {name:?} is not a DNS name"));
            }
        }
        let database_url = one(flags.database_url.clone(), "database_url").map(DatabaseUrl);
        if let Some(url) = &database_url
            && !(url.0.starts_with("postgres://") || url.0.starts_with("postgresql://"))
        {
            errors.push(format!("database_url {url:?} must be a postgres:// URL"));
        }
        if database_url.is_some() && issuer.is_none() {
            // The default names this replica's own port: replicas would
            // sign as different issuers, and each one's sidecars refuse
            // the others' tokens.
            errors.push(
                "issuer is required with database_url: every replica on one database signs \
                 tokens as the same issuer, the https:// URL sidecars reach the brokers' Service \
                 at (e.g. --issuer https://tally-broker.tally-system.svc:8444)"
                    .to_owned(),
            );
        }
        let policy = path(&flags.policy, "policy");
        let policy_source = match one(flags.policy_source.clone(), "policy_source").as_deref() {
            None if policy.is_some() => PolicySourceChoice::FileByDefault,
            None => PolicySourceChoice::Store,
            Some("file") if policy.is_some() => PolicySourceChoice::File,
            Some("file") => {
                errors.push("policy_source file needs a policy file (--policy)".into());
                PolicySourceChoice::Store
            }
            Some("store") => PolicySourceChoice::Store,
            Some(other) => {
                errors.push(format!("policy_source {other:?} must be file or store"));
                PolicySourceChoice::Store
            }
        };
        let ca_root = match (
            path(&flags.ca_cert, "ca_cert"),
            path(&flags.ca_key, "ca_key"),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => {
                errors.push("ca_cert and ca_key go together".into());
                None
            }
        };
        let sa_review = flags.sa_token_review
            || from_file.one("sa_token_review").is_some_and(|t| {
                crate::config::boolean("sa_token_review", &t)
                    .map_err(|e| errors.push(e))
                    .unwrap_or(false)
            });
        let sa = service_accounts(
            SaGiven {
                jwks: path(&flags.sa_jwks, "sa_jwks"),
                issuer: one(flags.sa_issuer.clone(), "sa_issuer"),
                audience: one(flags.sa_audience.clone(), "sa_audience"),
                ca_file: path(&flags.sa_ca_file, "sa_ca_file"),
                api_token_file: path(&flags.sa_api_token_file, "sa_api_token_file"),
                review: sa_review,
                kube_api: one(flags.kube_api.clone(), "kube_api"),
                jwks_host: one(flags.sa_jwks_host.clone(), "sa_jwks_host"),
            },
            &mut errors,
        );
        if !errors.is_empty() {
            return Err(errors);
        }
        let data_dir =
            path(&flags.data_dir, "data_dir").unwrap_or_else(|| DEFAULTS.text("data_dir").into());
        Ok(Self {
            audit_file: path(&flags.audit_file, "audit_file")
                .unwrap_or_else(|| data_dir.join("audit.jsonl")),
            data_dir,
            trust_domain,
            grpc_listen: grpc_listen.unwrap_or_else(|| unreachable!("checked above")),
            http_listen: http_listen.unwrap_or_else(|| unreachable!("checked above")),
            admin_listen: admin_listen.unwrap_or_else(|| unreachable!("checked above")),
            policy,
            policy_source,
            dns_names,
            store_key_file: path(&flags.store_key_file, "store_key_file"),
            database_url,
            issuer,
            svid_ttl: svid_ttl.unwrap_or_else(|| unreachable!("checked above")),
            key_rotation: key_rotation.unwrap_or_else(|| unreachable!("checked above")),
            inventory_retention,
            limits,
            ca_root,
            sa,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_work_with_nothing_given() {
        let c = BrokerConfig::resolve(&BrokerFlags::default(), None).unwrap();
        assert_eq!(c.trust_domain, "tally.local");
        assert_eq!(c.grpc_listen, "127.0.0.1:8443".parse().unwrap());
        assert_eq!(c.data_dir, PathBuf::from("tally-data"));
        assert_eq!(c.svid_ttl, 3600);
        assert_eq!(c.policy_source, PolicySourceChoice::Store);
        assert_eq!(c.database_url, None);
        assert_eq!(c.inventory_retention, 90 * 86_400);
        assert_eq!(c.key_rotation, 86_400);
        assert_eq!(c.limits, crate::http::Limits::default());
        assert_eq!(c.http_listen, "127.0.0.1:8444".parse().unwrap());
        assert_eq!(c.admin_listen, "127.0.0.1:9090".parse().unwrap());
        assert_eq!(c.audit_file, PathBuf::from("tally-data/audit.jsonl"));
        let short = BrokerFlags {
            inventory_retention: Some("1h".into()),
            ..BrokerFlags::default()
        };
        let errors = BrokerConfig::resolve(&short, None).unwrap_err();
        assert!(
            errors[0].contains("inventory_retention \"1h\""),
            "{errors:?}"
        );
    }

    #[test]
    fn a_database_url_is_checked_and_never_shown_with_its_password() {
        let flags = BrokerFlags {
            database_url: Some("postgres://tally:s3cret@db.internal:5432/tally".into()),
            issuer: Some("https://tally-broker.example:8444".into()),
            ..BrokerFlags::default()
        };
        let c = BrokerConfig::resolve(&flags, None).unwrap();
        let shown = format!("{c:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("…@db.internal:5432/tally"), "{shown}");
        let flags = BrokerFlags {
            database_url: Some("mysql://x:pw@y/z".into()),
            ..BrokerFlags::default()
        };
        let errors = BrokerConfig::resolve(&flags, None).unwrap_err();
        assert!(
            errors[0].contains("must be a postgres:// URL"),
            "{errors:?}"
        );
        assert!(!errors[0].contains("pw"), "{errors:?}");
    }

    #[test]
    fn replicas_on_a_database_must_be_given_their_one_issuer() {
        let flags = BrokerFlags {
            database_url: Some("postgres://tally:s3cret@db.internal:5432/tally".into()),
            ..BrokerFlags::default()
        };
        let errors = BrokerConfig::resolve(&flags, None).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].contains("issuer is required with database_url"),
            "{errors:?}"
        );
        assert!(!errors[0].contains("s3cret"), "{errors:?}");
    }

    #[test]
    fn the_policy_source_follows_the_file_unless_told() {
        let with_file = BrokerFlags {
            policy: Some("p.yaml".into()),
            ..BrokerFlags::default()
        };
        let c = BrokerConfig::resolve(&with_file, None).unwrap();
        assert_eq!(c.policy_source, PolicySourceChoice::FileByDefault);
        let c =
            BrokerConfig::resolve(&with_file, Some(("b.yaml", "policy_source: store\n"))).unwrap();
        assert_eq!(c.policy_source, PolicySourceChoice::Store);
        let c =
            BrokerConfig::resolve(&with_file, Some(("b.yaml", "policy_source: file\n"))).unwrap();
        assert_eq!(c.policy_source, PolicySourceChoice::File);
        let errors = BrokerConfig::resolve(
            &BrokerFlags {
                policy_source: Some("file".into()),
                ..BrokerFlags::default()
            },
            None,
        )
        .unwrap_err();
        assert!(errors[0].contains("needs a policy file"), "{errors:?}");
        let errors = BrokerConfig::resolve(
            &BrokerFlags {
                policy_source: Some("both".into()),
                ..BrokerFlags::default()
            },
            None,
        )
        .unwrap_err();
        assert!(errors[0].contains("must be file or store"), "{errors:?}");
    }

    #[test]
    fn flags_win_over_the_file() {
        let flags = BrokerFlags {
            trust_domain: Some("flag.example".into()),
            ..BrokerFlags::default()
        };
        let file = "trust_domain: file.example\ngrpc_listen: 127.0.0.1:9443\ndns_names: [broker.example]\n";
        let c = BrokerConfig::resolve(&flags, Some(("broker.yaml", file))).unwrap();
        assert_eq!(c.trust_domain, "flag.example");
        assert_eq!(c.grpc_listen.port(), 9443);
        assert_eq!(c.dns_names, vec!["broker.example".to_owned()]);
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let flags = BrokerFlags {
            grpc_listen: Some("nowhere".into()),
            svid_ttl: Some("5s".into()),
            ..BrokerFlags::default()
        };
        let file = "trust_domain: Bad_Domain\nissuer: http://x\ncolour: blue\n";
        let errors = BrokerConfig::resolve(&flags, Some(("broker.yaml", file))).unwrap_err();
        let all = errors.join("\n");
        assert!(
            all.contains("broker.yaml:3:1: unknown key \"colour\""),
            "{all}"
        );
        assert!(all.contains("trust_domain \"Bad_Domain\""), "{all}");
        assert!(all.contains("grpc_listen \"nowhere\""), "{all}");
        assert!(all.contains("issuer \"http://x\""), "{all}");
        assert!(all.contains("svid_ttl \"5s\""), "{all}");
        assert_eq!(errors.len(), 5, "{all}");
    }
}
