//! The ServiceAccount token attestation settings (`--sa-*`,
//! `--kube-api`), checked together: discovery or a JWKS file, TokenReview
//! and what each needs.

use super::DEFAULTS;
use std::path::PathBuf;

/// Where the cluster's ServiceAccount token keys come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaKeysFrom {
    /// A JWKS file (offline).
    File(PathBuf),
    /// OpenID discovery at the issuer; the `jwks_uri` may also be on this
    /// host.
    Discovery {
        /// `--sa-jwks-host`.
        jwks_host: Option<String>,
    },
}

/// ServiceAccount token attestation settings, as given (the in-cluster
/// defaults for the CA and token files are applied at start, where files
/// are looked at).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaConfig {
    /// The cluster's issuer.
    pub issuer: String,
    /// The audience tokens must carry (default: the broker's issuer).
    pub audience: Option<String>,
    /// Keys.
    pub keys: SaKeysFrom,
    /// `--sa-ca-file`.
    pub ca_file: Option<PathBuf>,
    /// `--sa-api-token-file`.
    pub api_token_file: Option<PathBuf>,
    /// The API server to ask for TokenReview, when on.
    pub token_review: Option<String>,
}

/// The ServiceAccount settings as given, before checking.
pub(super) struct SaGiven {
    pub(super) jwks: Option<PathBuf>,
    pub(super) issuer: Option<String>,
    pub(super) audience: Option<String>,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) api_token_file: Option<PathBuf>,
    pub(super) review: bool,
    pub(super) kube_api: Option<String>,
    pub(super) jwks_host: Option<String>,
}

/// Checks the ServiceAccount settings together; every fault to `errors`.
pub(super) fn service_accounts(given: SaGiven, errors: &mut Vec<String>) -> Option<SaConfig> {
    use crate::identity::k8s::discovery::HttpsUrl;
    let https = |key: &str, url: &str, errors: &mut Vec<String>| {
        if let Err(e) = url.parse::<HttpsUrl>() {
            errors.push(format!("{key} {url:?} {e}"));
        }
    };
    let Some(issuer) = given.issuer else {
        let stray = [
            ("sa_jwks", given.jwks.is_some()),
            ("sa_audience", given.audience.is_some()),
            ("sa_ca_file", given.ca_file.is_some()),
            ("sa_api_token_file", given.api_token_file.is_some()),
            ("sa_token_review", given.review),
            ("kube_api", given.kube_api.is_some()),
            ("sa_jwks_host", given.jwks_host.is_some()),
        ];
        for (key, _) in stray.iter().filter(|(_, set)| *set) {
            errors.push(format!(
                "{key} needs sa_issuer (ServiceAccount token attestation is on only with the cluster's issuer)"
            ));
        }
        return None;
    };
    let keys = match given.jwks {
        Some(file) => {
            if given.jwks_host.is_some() {
                errors.push(
                    "sa_jwks_host is for discovery; with sa_jwks the keys come from the file"
                        .into(),
                );
            }
            SaKeysFrom::File(file)
        }
        None => {
            https("sa_issuer", &issuer, errors);
            SaKeysFrom::Discovery {
                jwks_host: given.jwks_host,
            }
        }
    };
    let token_review = if given.review {
        let api = match (&keys, given.kube_api) {
            (_, Some(api)) => api,
            (SaKeysFrom::Discovery { .. }, None) => DEFAULTS.text("kube_api"),
            (SaKeysFrom::File(_), None) => {
                errors.push("sa_token_review with sa_jwks (offline keys) needs kube_api, the API server's https:// URL".into());
                String::new()
            }
        };
        if !api.is_empty() {
            https("kube_api", &api, errors);
        }
        Some(api)
    } else {
        if given.kube_api.is_some() {
            errors.push("kube_api is used only by sa_token_review".into());
        }
        None
    };
    if matches!(keys, SaKeysFrom::File(_)) && token_review.is_none() {
        for (key, set) in [
            ("sa_ca_file", given.ca_file.is_some()),
            ("sa_api_token_file", given.api_token_file.is_some()),
        ] {
            if set {
                errors.push(format!(
                    "{key} is used only by discovery and sa_token_review; with sa_jwks nothing is fetched"
                ));
            }
        }
    }
    Some(SaConfig {
        issuer,
        audience: given.audience,
        keys,
        ca_file: given.ca_file,
        api_token_file: given.api_token_file,
        token_review,
    })
}

#[cfg(test)]
mod tests {
    use super::super::{BrokerConfig, BrokerFlags};
    use super::*;

    #[test]
    fn service_account_settings_are_checked_together() {
        let with = |edit: &dyn Fn(&mut BrokerFlags)| {
            let mut flags = BrokerFlags::default();
            edit(&mut flags);
            BrokerConfig::resolve(&flags, None)
        };
        let c = with(&|f| {
            f.sa_issuer = Some("https://kubernetes.default.svc.cluster.local".into());
            f.sa_token_review = true;
        })
        .unwrap();
        let sa = c.sa.unwrap();
        assert_eq!(sa.keys, SaKeysFrom::Discovery { jwks_host: None });
        assert_eq!(
            sa.token_review.as_deref(),
            Some("https://kubernetes.default.svc")
        );
        let errors = with(&|f| {
            f.sa_issuer = Some("http://kubernetes.default.svc".into());
            f.kube_api = Some("https://x".into());
            f.sa_ca_file = Some("ca.crt".into());
        })
        .unwrap_err();
        let all = errors.join("\n");
        assert!(
            all.contains("sa_issuer \"http://kubernetes.default.svc\" must be an https:// URL"),
            "{all}"
        );
        assert!(
            all.contains("kube_api is used only by sa_token_review"),
            "{all}"
        );
        assert_eq!(errors.len(), 2, "{all}");
        let errors = with(&|f| {
            f.sa_issuer = Some("https://k".into());
            f.sa_jwks = Some("jwks.json".into());
            f.sa_token_review = true;
            f.sa_jwks_host = Some("10.0.0.1".into());
        })
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        let errors = with(&|f| {
            f.sa_token_review = true;
            f.sa_audience = Some("a".into());
        })
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].contains("needs sa_issuer"), "{errors:?}");
    }
}
