//! The service map: which audience a destination (`host:port`, or
//! `host:*` for every port of a host) is, and whether the hop to it is
//! mutual TLS. `/v1/authorize` and the outbound proxy read it.
//!
//! A destination whose audience is a workload's SPIFFE ID is a tally
//! sidecar's inbound port, so the outbound proxy dials it with mTLS by
//! default and accepts the server only if it proves that SPIFFE ID; any
//! other audience (a URI outside the mesh) is plaintext with a DPoP proof
//! per request, and cannot be asked for mTLS: there is no SVID to check.

use crate::identity::SpiffeId;
use crate::token::Audience;
use std::collections::HashMap;

/// One service-map entry: whom the destination's tokens are for, and how
/// to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    audience: Audience,
    /// The workload the server must prove it is (mTLS), if the hop is TLS.
    mtls: Option<SpiffeId>,
}

impl Destination {
    /// The audience of tokens sent there.
    pub fn audience(&self) -> &Audience {
        &self.audience
    }

    /// The SPIFFE ID the destination must prove in the TLS handshake when
    /// the hop is mutual TLS; `None` for plaintext.
    pub fn mtls(&self) -> Option<&SpiffeId> {
        self.mtls.as_ref()
    }
}

/// The SPIFFE ID of a workload audience (one with a path: a trust domain
/// alone is no workload).
fn workload_of(audience: &Audience) -> Option<SpiffeId> {
    audience
        .as_str()
        .parse::<SpiffeId>()
        .ok()
        .filter(|id| !id.path().is_empty())
}

/// Which destination is which audience. A bare `host` is refused: it
/// would send this workload's tokens to whatever listens on any port of
/// that host.
#[derive(Debug, Clone, Default)]
pub struct ServiceMap(HashMap<String, Destination>);

/// Why a service-map entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceMapError {
    /// `host` alone: which port is meant?
    #[error(
        "{0:?} names no port: write {0}:PORT for one port, or {0}:* to send tokens to every port of that host"
    )]
    NoPort(String),
    /// Not `host:port` or `host:*`.
    #[error("{0:?} is not host:port or host:*")]
    Malformed(String),
    /// The same destination twice.
    #[error("{0:?} appears twice")]
    Duplicate(String),
    /// `mtls: true` for an audience that is no workload's SPIFFE ID: the
    /// server would have no SVID to prove it.
    #[error(
        "{destination:?} asks for mtls but its audience {audience} is not a workload's SPIFFE ID (spiffe://TRUST-DOMAIN/PATH); use mtls: false for a destination outside the mesh"
    )]
    MtlsNeedsWorkload {
        /// The entry's destination.
        destination: String,
        /// Its audience.
        audience: Audience,
    },
}

impl ServiceMap {
    /// A map from (destination, audience) entries with the default
    /// transport, as a service-map file's short form: mutual TLS exactly
    /// when the audience is a workload's SPIFFE ID.
    ///
    /// # Errors
    /// One [`ServiceMapError`] per refused entry.
    pub fn new(
        entries: impl IntoIterator<Item = (String, Audience)>,
    ) -> Result<Self, Vec<ServiceMapError>> {
        Self::with_transport(entries.into_iter().map(|(d, a)| (d, a, None)))
    }

    /// A map from (destination, audience, `mtls`) entries, `mtls` `None`
    /// meaning the default: mutual TLS exactly when the audience is a
    /// workload's SPIFFE ID. Every entry is checked and every fault
    /// reported.
    ///
    /// # Errors
    /// One [`ServiceMapError`] per refused entry.
    pub fn with_transport(
        entries: impl IntoIterator<Item = (String, Audience, Option<bool>)>,
    ) -> Result<Self, Vec<ServiceMapError>> {
        let mut map = HashMap::new();
        let mut errors = Vec::new();
        for (destination, audience, mtls) in entries {
            let key = destination.to_ascii_lowercase();
            let Some((host, port)) = key.rsplit_once(':') else {
                errors.push(ServiceMapError::NoPort(destination));
                continue;
            };
            let port_ok = port == "*" || port.parse::<u16>().is_ok_and(|p| p != 0);
            let host_ok = !host.is_empty()
                && host
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
                || host.starts_with('[') && host.ends_with(']') && host.len() > 2;
            if !(port_ok && host_ok) {
                errors.push(ServiceMapError::Malformed(destination));
                continue;
            }
            let workload = workload_of(&audience);
            let mtls = match (mtls, workload) {
                (Some(true), None) => {
                    errors.push(ServiceMapError::MtlsNeedsWorkload {
                        destination,
                        audience,
                    });
                    continue;
                }
                (Some(false), _) | (None, None) => None,
                (Some(true) | None, Some(id)) => Some(id),
            };
            if map.insert(key, Destination { audience, mtls }).is_some() {
                errors.push(ServiceMapError::Duplicate(destination));
            }
        }
        if errors.is_empty() {
            Ok(Self(map))
        } else {
            Err(errors)
        }
    }

    /// The entry for a URL's authority: its `host:port` (the scheme's
    /// default port when none is written), then `host:*`.
    pub fn destination_for(&self, url: &str) -> Option<&Destination> {
        let (scheme, rest) = url.split_once("://")?;
        let authority = rest.split(['/', '?', '#']).next()?.to_ascii_lowercase();
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "http" => "80",
            "https" => "443",
            _ => return None,
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) if !host.is_empty() && !port.contains(']') => (host, port),
            _ => (authority.as_str(), default_port),
        };
        let port = if port.is_empty() { default_port } else { port };
        self.0
            .get(&format!("{host}:{port}"))
            .or_else(|| self.0.get(&format!("{host}:*")))
    }

    /// The audience for a URL's authority (see [`Self::destination_for`]).
    pub fn audience_for(&self, url: &str) -> Option<&Audience> {
        self.destination_for(url).map(Destination::audience)
    }

    /// The audience for a `CONNECT host:port` target.
    pub fn audience_for_authority(&self, authority: &str) -> Option<&Audience> {
        self.audience_for(&format!("http://{authority}/"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_service_map_finds_an_audience_by_host_and_port() {
        let map = ServiceMap::new([
            (
                "payments.svc:*".to_owned(),
                "spiffe://td/pay".parse().unwrap(),
            ),
            (
                "ledger:8443".to_owned(),
                "spiffe://td/ledger".parse().unwrap(),
            ),
            ("web:80".to_owned(), "spiffe://td/web".parse().unwrap()),
        ])
        .unwrap();
        let aud = |u: &str| map.audience_for(u).map(|a| a.as_str().to_owned());
        assert_eq!(
            aud("http://Payments.svc:8080/v1/x?y").as_deref(),
            Some("spiffe://td/pay")
        );
        assert_eq!(
            aud("https://ledger:8443/").as_deref(),
            Some("spiffe://td/ledger")
        );
        assert_eq!(aud("http://web/x").as_deref(), Some("spiffe://td/web"));
        assert_eq!(aud("http://web:80/x").as_deref(), Some("spiffe://td/web"));
        assert_eq!(aud("http://web:8080/x"), None);
        assert_eq!(aud("https://ledger:9000/"), None);
        assert_eq!(aud("https://ledger/"), None, "443 is not 8443");
        assert_eq!(aud("not a url"), None);
        assert_eq!(
            map.audience_for_authority("ledger:8443")
                .map(Audience::as_str),
            Some("spiffe://td/ledger")
        );
    }

    #[test]
    fn a_service_map_entry_without_a_port_is_refused_with_the_fix() {
        let aud: Audience = "spiffe://td/pay".parse().unwrap();
        let errors = ServiceMap::new([
            ("localhost".to_owned(), aud.clone()),
            ("a b:80".to_owned(), aud.clone()),
            ("x:99999".to_owned(), aud.clone()),
            ("y:80".to_owned(), aud.clone()),
            ("Y:80".to_owned(), aud),
        ])
        .unwrap_err();
        assert_eq!(
            errors,
            vec![
                ServiceMapError::NoPort("localhost".into()),
                ServiceMapError::Malformed("a b:80".into()),
                ServiceMapError::Malformed("x:99999".into()),
                ServiceMapError::Duplicate("Y:80".into()),
            ]
        );
        assert!(
            errors[0].to_string().contains("localhost:*"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn a_workload_audience_is_mtls_by_default_and_anything_else_plaintext() {
        let entry = |a: &str, mtls| ("h:1".to_owned(), a.parse().unwrap(), mtls);
        let one = |e| {
            let map = ServiceMap::with_transport([e]).unwrap();
            map.destination_for("http://h:1/")
                .unwrap()
                .mtls()
                .map(|id| id.as_str().to_owned())
        };
        let pay = "spiffe://td/ns/pay/sa/payments";
        assert_eq!(one(entry(pay, None)).as_deref(), Some(pay));
        assert_eq!(one(entry(pay, Some(true))).as_deref(), Some(pay));
        assert_eq!(one(entry(pay, Some(false))), None);
        assert_eq!(one(entry("https://api.partner.example", None)), None);
        // A trust domain alone names no workload.
        assert_eq!(one(entry("spiffe://td", None)), None);
        assert_eq!(
            ServiceMap::new([("h:1".to_owned(), pay.parse().unwrap())])
                .unwrap()
                .destination_for("http://h:1/")
                .unwrap()
                .mtls(),
            None,
            "the plain constructor is plaintext"
        );
    }

    #[test]
    fn mtls_for_an_audience_outside_the_mesh_is_refused_naming_the_entry() {
        let errors = ServiceMap::with_transport([
            (
                "partner:443".to_owned(),
                "https://api.partner.example".parse().unwrap(),
                Some(true),
            ),
            (
                "td:80".to_owned(),
                "spiffe://td".parse().unwrap(),
                Some(true),
            ),
        ])
        .unwrap_err();
        assert_eq!(errors.len(), 2, "{errors:?}");
        let text = errors[0].to_string();
        assert!(
            text.contains("\"partner:443\"") && text.contains("https://api.partner.example"),
            "{text}"
        );
    }
}
