//! Kubernetes projected ServiceAccount tokens, checked against the
//! cluster's JWKS (the document at the API server's
//! `/openid/v1/jwks`, found by [`discovery`] or given as a file):
//! signature (RS256 or ES256, key by `kid`), issuer, audience, times, and
//! the `system:serviceaccount:NS:NAME` subject, which becomes
//! `spiffe://<td>/ns/NS/sa/NAME`; the pod and node a bound token names
//! (its `kubernetes.io` claim) come with it. [`review`] is the
//! TokenReview wire format that asks the API server whether the token
//! (and its pod) still stands.
//!
//! Pure: bytes and `now` in, a typed result out. Parsing is strict (size
//! caps, canonical base64url, duplicate JSON members refused) like the rest
//! of tally's JOSE code.

pub mod discovery;
pub mod review;

use crate::jose::jwk::PublicKey;
use crate::jose::{b64, json};
use aws_lc_rs::signature::{self, RsaPublicKeyComponents};
use serde_json::{Map, Value};
use std::collections::HashMap;

/// Largest ServiceAccount token accepted (real ones are about 1 KiB).
pub const MAX_TOKEN_LEN: usize = 16 * 1024;
/// Largest JWKS document accepted.
pub const MAX_JWKS_LEN: usize = 256 * 1024;
/// Clock skew allowed on `exp`, `nbf` and `iat`, seconds.
pub const LEEWAY: u64 = 30;

/// Why a ServiceAccount token or its JWKS was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SaTokenError {
    /// Larger than [`MAX_TOKEN_LEN`].
    #[error("ServiceAccount token is larger than {MAX_TOKEN_LEN} bytes")]
    TooLarge,
    /// Not a compact JWS with a JSON header and payload.
    #[error("ServiceAccount token is not a well-formed JWT: {0}")]
    Malformed(&'static str),
    /// `alg` is not RS256 or ES256.
    #[error("ServiceAccount token alg {0:?} is not accepted (RS256 or ES256)")]
    Alg(String),
    /// No key with this `kid` in the configured JWKS.
    #[error("ServiceAccount token kid {0:?} is not in the configured JWKS")]
    UnknownKid(String),
    /// The key's type does not fit the `alg`.
    #[error("ServiceAccount token alg does not match its key's type")]
    KeyMismatch,
    /// The signature does not verify.
    #[error("ServiceAccount token signature does not verify")]
    BadSignature,
    /// `iss` is not the configured issuer.
    #[error("ServiceAccount token issuer {found:?} is not {expected:?}")]
    Issuer {
        /// In the token.
        found: String,
        /// Configured.
        expected: String,
    },
    /// `aud` does not contain the configured audience.
    #[error("ServiceAccount token audience does not include {expected:?}")]
    Audience {
        /// Configured.
        expected: String,
    },
    /// Past `exp`.
    #[error("ServiceAccount token expired at {exp} (now {now})")]
    Expired {
        /// Its expiry.
        exp: u64,
        /// The time checked against.
        now: u64,
    },
    /// Before `nbf` or `iat`.
    #[error("ServiceAccount token is not valid until {from} (now {now})")]
    NotYetValid {
        /// Its start.
        from: u64,
        /// The time checked against.
        now: u64,
    },
    /// `sub` is not `system:serviceaccount:NS:NAME` with valid names, or the
    /// `kubernetes.io` claim names another account.
    #[error("ServiceAccount token subject: {0}")]
    Subject(String),
    /// The JWKS document is unusable.
    #[error("ServiceAccount JWKS: {0}")]
    Jwks(String),
}

/// One verification key from the cluster's JWKS.
#[derive(Debug, Clone)]
enum SaKey {
    Rsa(RsaPublicKeyComponents<Vec<u8>>),
    Ec(PublicKey),
}

/// The cluster's ServiceAccount token keys, by `kid`.
#[derive(Debug, Clone, Default)]
pub struct SaKeys {
    keys: HashMap<String, SaKey>,
}

impl SaKeys {
    /// Parses a JWKS document: RSA keys (2048 to 8192 bits) and P-256 EC
    /// keys, each with a unique `kid`; keys marked for encryption and other
    /// types are skipped.
    ///
    /// # Errors
    /// [`SaTokenError::Jwks`] when the document is too large, malformed,
    /// repeats a `kid`, or holds no usable key.
    pub fn parse(bytes: &[u8]) -> Result<Self, SaTokenError> {
        let bad = |m: String| SaTokenError::Jwks(m);
        if bytes.len() > MAX_JWKS_LEN {
            return Err(bad(format!("larger than {MAX_JWKS_LEN} bytes")));
        }
        let doc = json::parse_object(bytes).map_err(|e| bad(e.to_string()))?;
        let Some(Value::Array(keys)) = doc.get("keys") else {
            return Err(bad("no \"keys\" array".into()));
        };
        let mut out = HashMap::new();
        for (i, key) in keys.iter().enumerate() {
            let Value::Object(key) = key else {
                return Err(bad(format!("keys[{i}] is not an object")));
            };
            if key
                .get("use")
                .and_then(Value::as_str)
                .is_some_and(|u| u != "sig")
            {
                continue;
            }
            let Some(kid) = key.get("kid").and_then(Value::as_str) else {
                return Err(bad(format!("keys[{i}] has no kid")));
            };
            let parsed = match key.get("kty").and_then(Value::as_str) {
                Some("RSA") => {
                    let part = |name: &str| {
                        key.get(name)
                            .and_then(Value::as_str)
                            .and_then(|t| b64::decode(t.as_bytes()).ok())
                            .filter(|b| b.first().is_some_and(|&x| x != 0))
                            .ok_or_else(|| bad(format!("keys[{i}] ({kid}): bad or missing {name}")))
                    };
                    let (n, e) = (part("n")?, part("e")?);
                    if !(256..=1024).contains(&n.len()) || e.len() > 4 {
                        return Err(bad(format!(
                            "keys[{i}] ({kid}): RSA modulus must be 2048 to 8192 bits"
                        )));
                    }
                    SaKey::Rsa(RsaPublicKeyComponents { n, e })
                }
                Some("EC") => SaKey::Ec(
                    PublicKey::from_jwks_member(&Value::Object(key.clone()))
                        .map_err(|e| bad(format!("keys[{i}] ({kid}): {e}")))?,
                ),
                _ => continue,
            };
            if out.insert(kid.to_owned(), parsed).is_some() {
                return Err(bad(format!("kid {kid:?} appears twice")));
            }
        }
        if out.is_empty() {
            return Err(bad("no RSA or P-256 signing key".into()));
        }
        Ok(Self { keys: out })
    }

    /// How many keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What a token must say.
#[derive(Debug, Clone)]
pub struct SaTokenConfig {
    /// The cluster's issuer (`--service-account-issuer`).
    pub issuer: String,
    /// The audience the projected token was made for (the broker).
    pub audience: String,
}

/// The account a token proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccount {
    /// Namespace.
    pub namespace: String,
    /// ServiceAccount name.
    pub name: String,
    /// The pod a bound token was made for (absent from tokens not bound
    /// to a pod, such as a TokenRequest for a Secret).
    pub pod: Option<Pod>,
    /// The node that pod runs on, when the token says.
    pub node: Option<String>,
}

/// A pod, as a bound ServiceAccount token names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// `metadata.name`.
    pub name: String,
    /// `metadata.uid`: tells a pod from a later one of the same name.
    pub uid: String,
}

impl ServiceAccount {
    /// `system:serviceaccount:NS:NAME`, the username the API server gives
    /// this account.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

impl ServiceAccount {
    /// `spiffe://<trust_domain>/ns/<namespace>/sa/<name>`.
    ///
    /// # Errors
    /// If the result is not a valid SPIFFE ID.
    pub fn spiffe_id(&self, trust_domain: &str) -> Result<super::SpiffeId, super::SpiffeIdError> {
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.name
        )
        .parse()
    }
}

/// Verifies a projected ServiceAccount token at `now`.
///
/// # Errors
/// [`SaTokenError`], one variant per failed check.
pub fn verify(
    token: &str,
    keys: &SaKeys,
    config: &SaTokenConfig,
    now: u64,
) -> Result<ServiceAccount, SaTokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(SaTokenError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaTokenError::Malformed("not three segments"));
    };
    let decode = |seg: &str, what: &'static str| {
        b64::decode(seg.as_bytes()).map_err(|_| SaTokenError::Malformed(what))
    };
    let header = json::parse_object(&decode(h, "header is not base64url")?)
        .map_err(|_| SaTokenError::Malformed("header is not a JSON object"))?;
    let claims = json::parse_object(&decode(p, "payload is not base64url")?)
        .map_err(|_| SaTokenError::Malformed("payload is not a JSON object"))?;
    let sig = decode(s, "signature is not base64url")?;
    if header.contains_key("crit") {
        return Err(SaTokenError::Malformed("crit header is not supported"));
    }
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(SaTokenError::Malformed("no kid"))?;
    let key = keys
        .keys
        .get(kid)
        .ok_or_else(|| SaTokenError::UnknownKid(kid.chars().take(64).collect()))?;
    let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
    match (alg, key) {
        ("RS256", SaKey::Rsa(k)) => k
            .verify(&signature::RSA_PKCS1_2048_8192_SHA256, signed, &sig)
            .map_err(|_| SaTokenError::BadSignature)?,
        ("ES256", SaKey::Ec(k)) => k
            .parsed()
            .verify_sig(signed, &sig)
            .map_err(|_| SaTokenError::BadSignature)?,
        ("RS256" | "ES256", _) => return Err(SaTokenError::KeyMismatch),
        (other, _) => return Err(SaTokenError::Alg(other.chars().take(16).collect())),
    }
    check_claims(&claims, config, now)
}

fn check_claims(
    claims: &Map<String, Value>,
    config: &SaTokenConfig,
    now: u64,
) -> Result<ServiceAccount, SaTokenError> {
    let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
    if iss != config.issuer {
        return Err(SaTokenError::Issuer {
            found: iss.chars().take(200).collect(),
            expected: config.issuer.clone(),
        });
    }
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => *a == config.audience,
        Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(&config.audience)),
        _ => false,
    };
    if !audience_ok {
        return Err(SaTokenError::Audience {
            expected: config.audience.clone(),
        });
    }
    let time = |name: &str| claims.get(name).and_then(Value::as_u64);
    let exp = time("exp").ok_or(SaTokenError::Malformed("no integer exp"))?;
    if now > exp.saturating_add(LEEWAY) {
        return Err(SaTokenError::Expired { exp, now });
    }
    for from in [time("nbf"), time("iat")].into_iter().flatten() {
        if from > now.saturating_add(LEEWAY) {
            return Err(SaTokenError::NotYetValid { from, now });
        }
    }
    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
    let mut fields = sub.split(':');
    let (Some("system"), Some("serviceaccount"), Some(ns), Some(name), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err(SaTokenError::Subject(
            "not system:serviceaccount:NAMESPACE:NAME".into(),
        ));
    };
    if !is_dns_label(ns) || !is_dns_subdomain(name) {
        return Err(SaTokenError::Subject(
            "namespace or ServiceAccount name is not a valid Kubernetes name".into(),
        ));
    }
    let (mut pod, mut node) = (None, None);
    // When present, the structured claim must name the same account.
    if let Some(k8s) = claims.get("kubernetes.io").and_then(Value::as_object) {
        let claimed_ns = k8s.get("namespace").and_then(Value::as_str);
        let claimed_name = k8s
            .get("serviceaccount")
            .and_then(|s| s.get("name"))
            .and_then(Value::as_str);
        if claimed_ns.is_some_and(|c| c != ns) || claimed_name.is_some_and(|c| c != name) {
            return Err(SaTokenError::Subject(
                "kubernetes.io claim names another ServiceAccount than sub".into(),
            ));
        }
        pod = bound_pod(k8s.get("pod"))?;
        node = match k8s.get("node").and_then(|n| n.get("name")) {
            None => None,
            Some(Value::String(n)) if is_dns_subdomain(n) => Some(n.clone()),
            Some(_) => {
                return Err(SaTokenError::Subject(
                    "kubernetes.io node name is not a valid Kubernetes name".into(),
                ));
            }
        };
    }
    Ok(ServiceAccount {
        namespace: ns.to_owned(),
        name: name.to_owned(),
        pod,
        node,
    })
}

/// The `kubernetes.io.pod` member: both a valid name and a UID, or
/// absent. These go into the inventory and audit records, so a token that
/// carries anything else is refused rather than recorded.
fn bound_pod(claim: Option<&Value>) -> Result<Option<Pod>, SaTokenError> {
    let Some(claim) = claim else {
        return Ok(None);
    };
    let text = |key: &str| claim.get(key).and_then(Value::as_str);
    match (text("name"), text("uid")) {
        (Some(name), Some(uid)) if is_dns_subdomain(name) && is_uid(uid) => Ok(Some(Pod {
            name: name.to_owned(),
            uid: uid.to_owned(),
        })),
        _ => Err(SaTokenError::Subject(
            "kubernetes.io pod must have a valid name and uid".into(),
        )),
    }
}

/// A Kubernetes UID: a UUID in practice; letters, digits and `-`, at most
/// 64, so one cannot smuggle anything into a record.
fn is_uid(s: &str) -> bool {
    (1..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// RFC 1123 label, as Kubernetes namespaces are.
fn is_dns_label(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain, as ServiceAccount names are.
fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_names_are_checked() {
        assert!(is_dns_label("shop-1"));
        assert!(!is_dns_label("Shop"));
        assert!(!is_dns_label("-a"));
        assert!(!is_dns_label(""));
        assert!(is_dns_subdomain("build.bot"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(!is_dns_subdomain(".."));
    }
}
