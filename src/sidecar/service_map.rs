//! The service map: which audience a destination (`host:port`, or
//! `host:*` for every port of a host) is, whether the hop to it is
//! mutual TLS, and which proof of possession requests to it carry (a
//! DPoP proof, or WIMSE's WIT and WPT). `/v1/authorize` and the outbound
//! proxy read it.
//!
//! A destination whose audience is a workload's SPIFFE ID is a tally
//! sidecar's inbound port, so the outbound proxy dials it with mTLS by
//! default and accepts the server only if it proves that SPIFFE ID; any
//! other audience (a URI outside the mesh) is plaintext with a DPoP proof
//! per request, and cannot be asked for mTLS: there is no SVID to check.

use crate::identity::SpiffeId;
use crate::token::Audience;
use std::collections::HashMap;

/// How a request proves the sidecar holds its key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Proof {
    /// `Authorization: DPoP <token>` and a `DPoP` proof (RFC 9449), or on
    /// a mutual-TLS hop the handshake itself.
    #[default]
    Dpop,
    /// `Workload-Identity-Token` and `Workload-Proof-Token` (WIMSE), with
    /// `Authorization: DPoP <token>` when the app asks for scopes.
    Wimse,
}

impl std::str::FromStr for Proof {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "dpop" => Ok(Self::Dpop),
            "wimse" => Ok(Self::Wimse),
            other => Err(format!("proof {other:?} must be dpop or wimse")),
        }
    }
}

/// One service-map entry: whom the destination's tokens are for, and how
/// to reach it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    audience: Audience,
    /// The workload the server must prove it is (mTLS), if the hop is TLS.
    mtls: Option<SpiffeId>,
    proof: Proof,
}

/// A service-map entry as written, before it is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// `host:port` or `host:*`.
    pub destination: String,
    /// The audience of tokens sent there.
    pub audience: Audience,
    /// Whether the hop is mutual TLS; `None`: exactly when the audience
    /// is a workload's SPIFFE ID.
    pub mtls: Option<bool>,
    /// The proof requests carry.
    pub proof: Proof,
}

impl Destination {
    /// The proof of possession requests to it carry.
    pub fn proof(&self) -> Proof {
        self.proof
    }

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
        Self::from_entries(
            entries
                .into_iter()
                .map(|(destination, audience, mtls)| Entry {
                    destination,
                    audience,
                    mtls,
                    proof: Proof::Dpop,
                }),
        )
    }

    /// A map from whole entries. Every entry is checked and every fault
    /// reported.
    ///
    /// # Errors
    /// One [`ServiceMapError`] per refused entry.
    pub fn from_entries(
        entries: impl IntoIterator<Item = Entry>,
    ) -> Result<Self, Vec<ServiceMapError>> {
        let mut map = HashMap::new();
        let mut errors = Vec::new();
        for Entry {
            destination,
            audience,
            mtls,
            proof,
        } in entries
        {
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
            let entry = Destination {
                audience,
                mtls,
                proof,
            };
            if map.insert(key, entry).is_some() {
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

/// Reads a service map (`name` is the file's, for errors): a YAML
/// mapping of `host:port` (or `host:*`) to an audience, or to
/// `{audience: AUDIENCE, mtls: true|false, proof: dpop|wimse}` (mtls
/// defaults to true for a workload's SPIFFE ID, false otherwise; proof
/// to dpop).
///
/// # Errors
/// Every problem found, one line each.
pub fn parse(name: &str, text: &str) -> Result<ServiceMap, Vec<String>> {
    use crate::config::boolean;
    use crate::policy::yaml::{self, Value};
    let doc = yaml::parse(text).map_err(|e| vec![format!("{name}:{}: {}", e.pos, e.message)])?;
    let Value::Map(entries) = doc.value else {
        return Err(vec![format!(
            "{name}: expected a mapping of host to audience"
        )]);
    };
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (host, pos, node) in entries {
        let (audience, mtls, proof) = match &node.value {
            Value::Str(a) => ((a.as_str(), node.pos), None, Proof::Dpop),
            Value::Map(fields) => {
                let (mut audience, mut mtls, mut proof) = (None, None, Proof::Dpop);
                let faults_before = errors.len();
                for (key, key_pos, value) in fields {
                    match (key.as_str(), &value.value) {
                        ("audience", Value::Str(a)) => audience = Some((a.as_str(), value.pos)),
                        ("mtls", Value::Str(t)) => match boolean("mtls", t) {
                            Ok(b) => mtls = Some(b),
                            Err(e) => errors.push(format!("{name}:{}: {host}: {e}", value.pos)),
                        },
                        ("proof", Value::Str(p)) => match p.parse() {
                            Ok(p) => proof = p,
                            Err(e) => errors.push(format!("{name}:{}: {host}: {e}", value.pos)),
                        },
                        ("audience" | "mtls" | "proof", _) => errors.push(format!(
                            "{name}:{}: {host}: {key} must be text, not {}",
                            value.pos,
                            value.kind()
                        )),
                        _ => errors.push(format!(
                            "{name}:{key_pos}: {host}: unknown key {key:?} (expected audience, mtls, proof)"
                        )),
                    }
                }
                // One fault an entry: an audience that was not text is not
                // also reported missing.
                if errors.len() > faults_before {
                    continue;
                }
                let Some(audience) = audience else {
                    errors.push(format!("{name}:{pos}: {host}: audience is required"));
                    continue;
                };
                (audience, mtls, proof)
            }
            _ => {
                errors.push(format!(
                    "{name}:{pos}: the audience for {host} must be text or {{audience, mtls, proof}}"
                ));
                continue;
            }
        };
        let (text, at) = audience;
        match text.parse() {
            Ok(audience) => out.push(Entry {
                destination: host,
                audience,
                mtls,
                proof,
            }),
            Err(e) => errors.push(format!("{name}:{at}: audience for {host}: {e}")),
        }
    }
    match ServiceMap::from_entries(out) {
        Ok(map) if errors.is_empty() => Ok(map),
        Ok(_) => Err(errors),
        Err(faults) => {
            errors.extend(faults.iter().map(|f| format!("{name}: {f}")));
            Err(errors)
        }
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
                .mtls()
                .map(SpiffeId::as_str),
            Some(pay),
            "the short form takes the defaults"
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

    #[test]
    fn a_service_map_reports_every_bad_entry() {
        let map = parse("map.yaml", "a.svc:80: spiffe://td/a\n").unwrap();
        assert!(format!("{map:?}").contains("a.svc:80"));
        let errors = parse("map.yaml", "a: [1]\nb.svc: spiffe://td/b\n").unwrap_err();
        assert_eq!(
            errors,
            [
                "map.yaml:1:1: the audience for a must be text or {audience, mtls, proof}",
                "map.yaml: \"b.svc\" names no port: write b.svc:PORT for one port, or b.svc:* to send tokens to every port of that host"
            ]
        );
        let errors = parse("map.yaml", "b.svc: spiffe://td/b\n").unwrap_err();
        assert!(
            errors[0].starts_with("map.yaml: \"b.svc\" names no port"),
            "{errors:?}"
        );
        let errors = parse("map.yaml", "- a\n").unwrap_err();
        assert_eq!(errors, ["map.yaml: expected a mapping of host to audience"]);
    }

    #[test]
    fn a_service_map_entry_may_say_whether_the_hop_is_mtls() {
        let text = "\
pay.svc:8080: spiffe://td/ns/pay/sa/payments
ledger.svc:80: {audience: spiffe://td/ns/fin/sa/ledger, mtls: false}
legacy.svc:80:
  audience: spiffe://td/ns/old/sa/legacy
  mtls: true
partner.example:80: {audience: https://api.partner.example}
";
        let map = parse("map.yaml", text).unwrap();
        let mtls = |url: &str| {
            let d = map.destination_for(url).unwrap();
            (
                d.audience().as_str().to_owned(),
                d.mtls().map(|id| id.as_str().to_owned()),
            )
        };
        let pay = "spiffe://td/ns/pay/sa/payments".to_owned();
        assert_eq!(mtls("http://pay.svc:8080/"), (pay.clone(), Some(pay)));
        assert_eq!(
            mtls("http://ledger.svc/"),
            ("spiffe://td/ns/fin/sa/ledger".into(), None)
        );
        let legacy = "spiffe://td/ns/old/sa/legacy".to_owned();
        assert_eq!(mtls("http://legacy.svc/"), (legacy.clone(), Some(legacy)));
        assert_eq!(
            mtls("http://partner.example/"),
            ("https://api.partner.example".into(), None)
        );
    }

    #[test]
    fn every_fault_of_a_long_service_map_entry_is_reported_with_its_position() {
        let text = "\
a.svc:80: {audience: spiffe://td/ns/a/sa/a, mtls: sometimes}
b.svc:80: {audience: spiffe://td/ns/b/sa/b, tls: true}
c.svc:80: {mtls: true}
partner.example:443: {audience: https://api.partner.example, mtls: true}
d.svc:80: {audience: [x]}
";
        let errors = parse("map.yaml", text).unwrap_err();
        assert_eq!(
            errors,
            [
                "map.yaml:1:51: a.svc:80: mtls \"sometimes\" must be true or false",
                "map.yaml:2:45: b.svc:80: unknown key \"tls\" (expected audience, mtls, proof)",
                "map.yaml:3:1: c.svc:80: audience is required",
                "map.yaml:5:22: d.svc:80: audience must be text, not a list",
                "map.yaml: \"partner.example:443\" asks for mtls but its audience https://api.partner.example is not a workload's SPIFFE ID (spiffe://TRUST-DOMAIN/PATH); use mtls: false for a destination outside the mesh",
            ]
        );
    }

    #[test]
    fn a_service_map_entry_may_ask_for_wimse_proofs_and_dpop_is_the_default() {
        let text = "\
pay.svc:80: {audience: spiffe://td/ns/pay/sa/payments, proof: wimse}
ledger.svc:80: spiffe://td/ns/fin/sa/ledger
web.svc:80: {audience: https://web.example, mtls: false, proof: dpop}
bad.svc:80: {audience: spiffe://td/ns/x/sa/x, proof: bearer}
";
        let errors = parse("map.yaml", text).unwrap_err();
        assert_eq!(
            errors,
            ["map.yaml:4:54: bad.svc:80: proof \"bearer\" must be dpop or wimse"]
        );
        let map = parse(
            "map.yaml",
            &text.lines().take(3).collect::<Vec<_>>().join("\n"),
        )
        .unwrap();
        let proof = |url: &str| map.destination_for(url).map(Destination::proof);
        assert_eq!(proof("http://pay.svc/"), Some(Proof::Wimse));
        assert_eq!(proof("http://ledger.svc/"), Some(Proof::Dpop));
        assert_eq!(proof("http://web.svc/"), Some(Proof::Dpop));
        assert!(
            map.destination_for("http://pay.svc/")
                .unwrap()
                .mtls()
                .is_some()
        );
    }
}
