//! OpenID discovery of a cluster's ServiceAccount token keys: the
//! document at `<issuer>/.well-known/openid-configuration` names the
//! issuer (which must be the configured one, exactly) and the `jwks_uri`
//! (https, and on the issuer's host unless the operator allowed another).
//!
//! Pure: the document's bytes in, the URL to fetch out. The fetching is
//! the broker's (`broker::cluster`).

use crate::jose::json;
use serde_json::Value;

/// Largest discovery document accepted (real ones are under 1 KiB).
pub const MAX_DISCOVERY_LEN: usize = 64 * 1024;

/// Why a discovery document, or a URL, was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DiscoveryError {
    /// Larger than [`MAX_DISCOVERY_LEN`].
    #[error("the discovery document is larger than {MAX_DISCOVERY_LEN} bytes")]
    TooLarge,
    /// Not a JSON object (or one with duplicate members).
    #[error("the discovery document is not a JSON object: {0}")]
    Malformed(String),
    /// `issuer` is not the configured issuer (OpenID Connect Discovery
    /// §4.3: they must be identical).
    #[error("the discovery document names issuer {found:?}, not {expected:?}")]
    Issuer {
        /// Configured.
        expected: String,
        /// In the document.
        found: String,
    },
    /// No `jwks_uri` string.
    #[error("the discovery document has no jwks_uri")]
    NoJwksUri,
    /// `jwks_uri` is not an acceptable URL.
    #[error("jwks_uri {uri:?}: {why}")]
    JwksUri {
        /// As the document gives it (cut to 200 characters).
        uri: String,
        /// What is wrong with it.
        why: UrlError,
    },
}

/// What is wrong with a URL the broker was to fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UrlError {
    /// Not a URL.
    #[error("not a URL")]
    Invalid,
    /// Not `https://`: keys and bearer tokens are never fetched or sent in
    /// the clear.
    #[error("must be an https:// URL")]
    NotHttps,
    /// Carries `user:password@`.
    #[error("must not carry credentials")]
    Credentials,
    /// On another host than the issuer, and that host was not allowed
    /// (`--sa-jwks-host`).
    #[error("is not on the issuer's host (allow its host with --sa-jwks-host)")]
    OtherHost,
}

/// An `https://` URL: where the broker connects, and what it asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsUrl {
    host: String,
    port: u16,
    path: String,
    text: String,
}

impl HttpsUrl {
    /// The host (a DNS name or an IP address, without brackets).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port (443 unless given).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The path and query, at least `/`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `host` or `host:port`, as the `Host` header names it.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == 443 {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }

    /// The same origin with `path` (which starts with `/`).
    #[must_use]
    pub fn with_path(&self, path: &str) -> Self {
        let base = self.text.split_once("://").map_or("", |(_, rest)| rest);
        let authority = base.split('/').next().unwrap_or("");
        Self {
            host: self.host.clone(),
            port: self.port,
            path: path.to_owned(),
            text: format!("https://{authority}{path}"),
        }
    }

    /// The discovery document's URL for this issuer.
    pub fn discovery(&self) -> Self {
        let base = self.path.trim_end_matches('/');
        self.with_path(&format!("{base}/.well-known/openid-configuration"))
    }
}

impl std::fmt::Display for HttpsUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for HttpsUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        let uri: http::Uri = s.parse().map_err(|_| UrlError::Invalid)?;
        match uri.scheme_str() {
            Some("https") => {}
            Some(_) => return Err(UrlError::NotHttps),
            None => return Err(UrlError::Invalid),
        }
        let authority = uri.authority().ok_or(UrlError::Invalid)?;
        if authority.as_str().contains('@') {
            return Err(UrlError::Credentials);
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(UrlError::Invalid);
        }
        Ok(Self {
            host: host.to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(443),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            text: s.to_owned(),
        })
    }
}

/// Which hosts the `jwks_uri` may be on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksHost {
    /// The issuer's host only (the default).
    Issuer,
    /// The issuer's, or this one (`host` or `host:port`): an API server
    /// whose discovery document names its own address, as kube-apiserver
    /// does by default.
    Also(String),
    /// Any host (`--sa-jwks-host '*'`): the keys may be wherever the
    /// discovery document says, as long as that server's certificate
    /// chains to the same CA the issuer's does. For a cluster whose API
    /// server names an address that is not known when tally is deployed.
    Any,
}

impl JwksHost {
    fn allows(&self, issuer: &HttpsUrl, jwks: &HttpsUrl) -> bool {
        if jwks.host == issuer.host {
            return true;
        }
        match self {
            Self::Issuer => false,
            Self::Any => true,
            Self::Also(allowed) => {
                let allowed = allowed.to_ascii_lowercase();
                allowed == jwks.host
                    || allowed == jwks.authority()
                    || allowed == format!("{}:{}", jwks.host, jwks.port)
            }
        }
    }
}

/// The `jwks_uri` of the discovery document `doc` for `issuer`.
///
/// # Errors
/// [`DiscoveryError`], one variant per failed check.
pub fn jwks_uri(
    doc: &[u8],
    issuer: &HttpsUrl,
    hosts: &JwksHost,
) -> Result<HttpsUrl, DiscoveryError> {
    if doc.len() > MAX_DISCOVERY_LEN {
        return Err(DiscoveryError::TooLarge);
    }
    let doc = json::parse_object(doc).map_err(|e| DiscoveryError::Malformed(e.to_string()))?;
    let found = doc.get("issuer").and_then(Value::as_str).unwrap_or("");
    if found != issuer.text {
        return Err(DiscoveryError::Issuer {
            expected: issuer.text.clone(),
            found: found.chars().take(200).collect(),
        });
    }
    let text = doc
        .get("jwks_uri")
        .and_then(Value::as_str)
        .ok_or(DiscoveryError::NoJwksUri)?;
    let bad = |why| DiscoveryError::JwksUri {
        uri: text.chars().take(200).collect(),
        why,
    };
    let uri: HttpsUrl = text.parse().map_err(bad)?;
    if !hosts.allows(issuer, &uri) {
        return Err(bad(UrlError::OtherHost));
    }
    Ok(uri)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer() -> HttpsUrl {
        "https://kubernetes.default.svc.cluster.local"
            .parse()
            .unwrap()
    }

    fn doc(iss: &str, jwks: &str) -> Vec<u8> {
        serde_json::json!({"issuer": iss, "jwks_uri": jwks})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn the_jwks_uri_on_the_issuers_host_is_accepted() {
        let iss = "https://kubernetes.default.svc.cluster.local";
        let uri = jwks_uri(
            &doc(iss, &format!("{iss}:6443/openid/v1/jwks")),
            &issuer(),
            &JwksHost::Issuer,
        )
        .unwrap();
        assert_eq!(uri.port(), 6443);
        assert_eq!(uri.path(), "/openid/v1/jwks");
        assert_eq!(
            issuer().discovery().to_string(),
            format!("{iss}/.well-known/openid-configuration")
        );
        let gke: HttpsUrl = "https://container.googleapis.com/v1/projects/p/locations/l/clusters/c"
            .parse()
            .unwrap();
        assert_eq!(
            gke.discovery().path(),
            "/v1/projects/p/locations/l/clusters/c/.well-known/openid-configuration"
        );
    }

    #[test]
    fn a_wrong_issuer_an_http_or_foreign_jwks_uri_is_refused() {
        let iss = "https://kubernetes.default.svc.cluster.local";
        let check = |d: Vec<u8>, hosts: &JwksHost| jwks_uri(&d, &issuer(), hosts).unwrap_err();
        assert!(matches!(
            check(doc(&format!("{iss}/"), "https://x/j"), &JwksHost::Issuer),
            DiscoveryError::Issuer { .. }
        ));
        let why = |e| match e {
            DiscoveryError::JwksUri { why, .. } => why,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            why(check(
                doc(iss, "http://kubernetes.default.svc.cluster.local/j"),
                &JwksHost::Issuer
            )),
            UrlError::NotHttps
        );
        assert_eq!(
            why(check(doc(iss, "https://evil.example/j"), &JwksHost::Issuer)),
            UrlError::OtherHost
        );
        assert_eq!(
            why(check(
                doc(iss, "https://u:p@kubernetes.default.svc.cluster.local/j"),
                &JwksHost::Issuer
            )),
            UrlError::Credentials
        );
        assert!(
            jwks_uri(
                &doc(iss, "https://172.18.0.2:6443/openid/v1/jwks"),
                &issuer(),
                &JwksHost::Any
            )
            .is_ok()
        );
        // Any host, but never plain HTTP.
        assert!(
            jwks_uri(
                &doc(iss, "http://172.18.0.2:6443/openid/v1/jwks"),
                &issuer(),
                &JwksHost::Any
            )
            .is_err()
        );
        let api = JwksHost::Also("172.18.0.2:6443".into());
        assert!(
            jwks_uri(
                &doc(iss, "https://172.18.0.2:6443/openid/v1/jwks"),
                &issuer(),
                &api
            )
            .is_ok()
        );
        assert_eq!(
            why(check(
                doc(iss, "https://172.18.0.2:7443/openid/v1/jwks"),
                &api
            )),
            UrlError::OtherHost
        );
        assert!(matches!(
            check(b"{\"issuer\"".to_vec(), &JwksHost::Issuer),
            DiscoveryError::Malformed(_)
        ));
        assert_eq!(
            check(vec![b' '; MAX_DISCOVERY_LEN + 1], &JwksHost::Issuer),
            DiscoveryError::TooLarge
        );
    }
}
