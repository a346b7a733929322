//! What a request addresses, decided once from its head: the authority
//! (absolute-form target or HTTP/2 `:authority`, else `Host`; both must
//! agree when both are sent), whether this server serves it, the URL a
//! proof must name, and the path the rules judge and the app receives
//! (see [`super::path`]). Pure: bytes in, a [`RequestTarget`] or a typed
//! refusal out. The inbound proxy calls it; every front end that judges
//! a request should.

use super::path::{PathError, check_routable};
use crate::dpop::{NormalizedUri, UriError};

/// A request authority, normalized as in `htu` (host lower-cased) and
/// always with its port (`host:port`): a request without one means the
/// scheme's default, 80 in plaintext and 443 on TLS, so `pay.svc` over
/// TLS is `pay.svc:443`, never `pay.svc:80`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authority(String);

impl Authority {
    /// Parses and normalizes `text`, a port-less one meaning port 80 (as
    /// `--inbound-authority` values and plaintext requests).
    ///
    /// # Errors
    /// If `text` is not a host with an optional port.
    pub fn parse(text: &str) -> Result<Self, UriError> {
        Self::parse_for(Scheme::Http, text)
    }

    /// Parses and normalizes the authority of a request that arrived with
    /// `scheme`.
    ///
    /// # Errors
    /// If `text` is not a host with an optional port.
    pub fn parse_for(scheme: Scheme, text: &str) -> Result<Self, UriError> {
        if text.is_empty() || text.contains(['/', '?', '#', '@']) {
            return Err(UriError::Host);
        }
        let prefix = format!("{}://", scheme.as_str());
        let uri = NormalizedUri::parse(&format!("{prefix}{text}/"))?;
        let authority = uri
            .as_str()
            .strip_prefix(prefix.as_str())
            .and_then(|rest| rest.strip_suffix('/'))
            .ok_or(UriError::Host)?;
        // Normalizing dropped the scheme's default port: put it back, so
        // authorities of either scheme compare by the port they mean.
        let has_port = authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| !port.contains(']'));
        Ok(Self(if has_port {
            authority.to_owned()
        } else {
            let default = match scheme {
                Scheme::Http => 80,
                Scheme::Https => 443,
            };
            format!("{authority}:{default}")
        }))
    }

    /// The normalized text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A request target that may be judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestTarget {
    /// The authority as the caller wrote it (what the app gets as `Host`).
    pub authority: String,
    /// `http://` + authority + path, normalized: what a proof's `htu`
    /// must name.
    pub url: NormalizedUri,
}

impl RequestTarget {
    /// The normalized path the rules judge and the app receives.
    pub fn path(&self) -> &str {
        self.url.path()
    }
}

/// Why a request target is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TargetError {
    /// RFC 9112 §3.2: more than one `Host`.
    #[error("more than one Host header")]
    TwoHosts,
    /// Neither a target authority nor `Host`.
    #[error("the request names no host")]
    NoHost,
    /// `Host` is not text.
    #[error("the Host header is not text")]
    HostNotText,
    /// `Host` and the target's authority differ.
    #[error("the Host header does not name the authority of the request target")]
    HostMismatch,
    /// Not a host and port.
    #[error("request authority: {0}")]
    Authority(UriError),
    /// Not one of the authorities this server serves (421).
    #[error("this sidecar does not serve {0}")]
    Misdirected(String),
    /// The URL does not normalize.
    #[error("request URL: {0}")]
    Url(UriError),
    /// A path an app could route elsewhere.
    #[error("request path: {0}")]
    Path(PathError),
}

/// The scheme a request arrived with: what a proof's `htu` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// Plaintext HTTP.
    Http,
    /// HTTP over TLS.
    Https,
}

impl Scheme {
    /// `http` or `https`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Http => "http",
            Self::Https => "https",
        }
    }
}

/// Judges a request head that arrived with `scheme`: the target's
/// authority (if absolute-form or HTTP/2), its path, every `Host` value,
/// and the authorities this server serves (empty: any).
///
/// # Errors
/// [`TargetError`].
pub fn request_target(
    scheme: Scheme,
    target_authority: Option<&str>,
    path: &str,
    hosts: &[&[u8]],
    served: &[Authority],
) -> Result<RequestTarget, TargetError> {
    let host = match hosts {
        [] => None,
        [one] => Some(std::str::from_utf8(one).map_err(|_| TargetError::HostNotText)?),
        _ => return Err(TargetError::TwoHosts),
    };
    // The authority as written (the app gets it as `Host`) and normalized
    // (what is compared).
    let (authority, normalized) = match (target_authority, host) {
        (Some(target), Some(host)) => {
            let parsed = Authority::parse_for(scheme, target).map_err(TargetError::Authority)?;
            if Authority::parse_for(scheme, host).as_ref() != Ok(&parsed) {
                return Err(TargetError::HostMismatch);
            }
            (target, parsed)
        }
        (Some(one), None) | (None, Some(one)) => (
            one,
            Authority::parse_for(scheme, one).map_err(TargetError::Authority)?,
        ),
        (None, None) => return Err(TargetError::NoHost),
    };
    if !served.is_empty() && !served.contains(&normalized) {
        return Err(TargetError::Misdirected(normalized.0));
    }
    // The URL as the caller wrote it, so its length limit counts what was
    // sent; normalizing it gives the normalized authority again.
    let url = NormalizedUri::parse(&format!("{}://{authority}{path}", scheme.as_str()))
        .map_err(TargetError::Url)?;
    check_routable(url.path()).map_err(TargetError::Path)?;
    Ok(RequestTarget {
        authority: authority.to_owned(),
        url,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_comes_from_the_target_or_host_and_both_must_agree() {
        let t = request_target(Scheme::Http, None, "/a", &[b"Svc:80"], &[]).unwrap();
        assert_eq!(t.authority, "Svc:80");
        assert_eq!(t.url.as_str(), "http://svc/a");
        let t = request_target(Scheme::Https, None, "/a", &[b"Svc:443"], &[]).unwrap();
        assert_eq!(
            t.url.as_str(),
            "https://svc/a",
            "over TLS a proof names https"
        );
        let t = request_target(Scheme::Http, Some("svc"), "/a", &[b"SVC:80"], &[]).unwrap();
        assert_eq!(t.authority, "svc");
        assert_eq!(
            request_target(Scheme::Http, Some("svc"), "/a", &[b"admin"], &[]),
            Err(TargetError::HostMismatch)
        );
        assert_eq!(
            request_target(Scheme::Http, None, "/a", &[b"a", b"a"], &[]),
            Err(TargetError::TwoHosts)
        );
        assert_eq!(
            request_target(Scheme::Http, None, "/a", &[], &[]),
            Err(TargetError::NoHost)
        );
        assert_eq!(
            request_target(Scheme::Http, None, "/a", &[b"\xff"], &[]),
            Err(TargetError::HostNotText)
        );
        assert_eq!(
            request_target(Scheme::Http, None, "/a", &[b"u@svc"], &[]),
            Err(TargetError::Authority(UriError::Host))
        );
    }

    #[test]
    fn only_served_authorities_pass_when_a_list_is_given() {
        // On TLS a port-less authority is :443, in plaintext :80.
        let tls_served = [Authority::parse("pay.svc:443").unwrap()];
        assert!(request_target(Scheme::Https, None, "/", &[b"pay.svc"], &tls_served).is_ok());
        assert_eq!(
            request_target(Scheme::Http, None, "/", &[b"pay.svc"], &tls_served),
            Err(TargetError::Misdirected("pay.svc:80".into()))
        );
        let plain_served = [Authority::parse("pay.svc:80").unwrap()];
        assert!(request_target(Scheme::Http, None, "/", &[b"PAY.svc"], &plain_served).is_ok());
        assert_eq!(
            request_target(Scheme::Https, None, "/", &[b"pay.svc"], &plain_served),
            Err(TargetError::Misdirected("pay.svc:443".into()))
        );
        assert!(request_target(Scheme::Https, None, "/", &[b"pay.svc:80"], &plain_served).is_ok());
        let v6 = [Authority::parse("[::1]:8080").unwrap()];
        assert!(request_target(Scheme::Http, None, "/", &[b"[::1]:8080"], &v6).is_ok());
        assert!(request_target(Scheme::Http, None, "/", &[b"[::1]"], &v6).is_err());
        let served = [Authority::parse("pay.svc:8080").unwrap()];
        assert!(request_target(Scheme::Http, None, "/", &[b"PAY.svc:8080"], &served).is_ok());
        assert_eq!(
            request_target(Scheme::Http, None, "/", &[b"pay.svc:9090"], &served),
            Err(TargetError::Misdirected("pay.svc:9090".into()))
        );
    }

    #[test]
    fn the_path_is_normalized_and_checked() {
        let t = request_target(Scheme::Http, None, "/v1/x/../charges", &[b"svc"], &[]).unwrap();
        assert_eq!(t.path(), "/v1/charges");
        assert_eq!(
            request_target(Scheme::Http, None, "/v1/..%2Fadmin", &[b"svc"], &[]),
            Err(TargetError::Path(PathError::EncodedSlash))
        );
    }
}
