//! A `CheckRequest` read into the parts the gate judges, the moment it
//! arrives. Pure: a message in, a [`Described`] request or a typed
//! refusal out.
//!
//! - The method, scheme and `host` (the `:authority`) come from
//!   `attributes.request.http`; `path` holds the query, which is split
//!   off here (a proof's `htu` never names it).
//! - Headers come from `header_map` when Envoy sends it (the filter's
//!   `encode_raw_headers: true`: every header line apart, with its raw
//!   bytes), else from `headers`, where Envoy joins a repeated header's
//!   values with commas. Either way a comma in an `Authorization` or
//!   `DPoP` value means more than one credential (neither a token68 nor
//!   a JWS holds one), so the value counts as that many headers and is
//!   refused as the inbound proxy refuses two headers.
//! - When a check carries both forms, or a value and its raw bytes, or a
//!   pseudo-header beside the attribute it repeats, they must agree.
//! - A request body the filter sent along is never read.
//! - The peer: `source.principal` (Envoy's name for the verified client
//!   certificate's URI SAN) and `source.certificate` (URL-encoded PEM,
//!   with the filter's `include_peer_certificate: true`).

use crate::auth::ForwardedError;
use crate::auth::target::Scheme;
use crate::proto::envoy::config::core::v3::HeaderMap;
use crate::proto::envoy::service::auth::v3::CheckRequest;
use std::collections::HashMap;

/// Header names this module reads.
const AUTHORIZATION: &str = "authorization";
const DPOP: &str = "dpop";
use crate::auth::credentials::{TXN_TOKEN_HEADER, WIT_HEADER, WPT_HEADER};

impl crate::wimse::RequestHeaders for Described {
    fn field_values(&self, name: &str) -> Vec<&[u8]> {
        self.fields
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
            .collect()
    }
}

/// The request a check describes.
#[derive(Clone, PartialEq, Eq)]
pub struct Described {
    /// Method.
    pub method: String,
    /// `http` or `https`.
    pub scheme: Scheme,
    /// The `:authority` (`Host`).
    pub host: String,
    /// The path without the query, as sent.
    pub path: String,
    /// Every `Authorization` value, a comma-joined one split.
    pub authorization: Vec<Vec<u8>>,
    /// Every `DPoP` value, a comma-joined one split.
    pub dpop: Vec<Vec<u8>>,
    /// Every `Workload-Identity-Token` value, a comma-joined one split.
    pub wit: Vec<Vec<u8>>,
    /// Every `Workload-Proof-Token` value, a comma-joined one split.
    pub wpt: Vec<Vec<u8>>,
    /// Every `Txn-Token` value, a comma-joined one split.
    pub txn_token: Vec<Vec<u8>>,
    /// Every header line (lower-cased name, value), for a WPT's `oth`:
    /// empty unless the check carries WIMSE credentials.
    pub fields: Vec<(String, Vec<u8>)>,
    /// Names of the `x-tally-*` headers the request carries (the app must
    /// not receive them from outside).
    pub tally_headers: Vec<String>,
    /// `source.principal`, when not empty.
    pub principal: Option<String>,
    /// `source.certificate` decoded to PEM text, when not empty.
    pub certificate: Option<String>,
}

impl std::fmt::Debug for Described {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The credentials are secrets: only their count is shown.
        f.debug_struct("Described")
            .field("method", &self.method)
            .field("scheme", &self.scheme)
            .field("host", &self.host)
            .field("path", &self.path)
            .field("authorization", &self.authorization.len())
            .field("dpop", &self.dpop.len())
            .field("wit", &self.wit.len())
            .field("wpt", &self.wpt.len())
            .field("principal", &self.principal)
            .finish_non_exhaustive()
    }
}

/// Reads `check`.
///
/// # Errors
/// [`ForwardedError`] when it does not describe one HTTP request.
pub fn describe(check: &CheckRequest) -> Result<Described, ForwardedError> {
    let attributes = check.attributes.as_ref();
    let http = attributes
        .and_then(|a| a.request.as_ref())
        .and_then(|r| r.http.as_ref())
        .ok_or(ForwardedError::NoHttpRequest)?;
    if http.method.is_empty() {
        return Err(ForwardedError::NoMethod);
    }
    let scheme = match http.scheme.as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        _ => return Err(ForwardedError::Scheme),
    };
    let headers = Headers::of(&http.headers, http.header_map.as_ref())?;
    for (pseudo, attribute) in [
        (":authority", &http.host),
        (":method", &http.method),
        (":path", &http.path),
    ] {
        if let Some(values) = headers.get(pseudo)
            && values.as_slice() != [attribute.as_bytes()]
        {
            return Err(ForwardedError::Disagrees(pseudo));
        }
    }
    let path = http.path.split_once('?').map_or(&*http.path, |(p, _)| p);
    let source = attributes.and_then(|a| a.source.as_ref());
    let principal = source
        .map(|s| s.principal.clone())
        .filter(|p| !p.is_empty());
    let certificate = source
        .filter(|s| !s.certificate.is_empty())
        .map(|s| percent_decode(&s.certificate))
        .transpose()?;
    let (wit, wpt) = (
        headers.credentials(WIT_HEADER),
        headers.credentials(WPT_HEADER),
    );
    // Every line is copied only for a WIMSE check (a WPT's `oth` may name
    // any of them); a DPoP check pays nothing for it.
    let fields = if wit.is_empty() && wpt.is_empty() {
        Vec::new()
    } else {
        headers.fields()
    };
    Ok(Described {
        method: http.method.clone(),
        scheme,
        host: http.host.clone(),
        path: path.to_owned(),
        authorization: headers.credentials(AUTHORIZATION),
        dpop: headers.credentials(DPOP),
        wit,
        wpt,
        txn_token: headers.credentials(TXN_TOKEN_HEADER),
        fields,
        tally_headers: headers.tally_names(),
        principal,
        certificate,
    })
}

/// The request's header lines by lower-cased name, in order.
struct Headers<'a>(HashMap<String, Vec<&'a [u8]>>);

impl<'a> Headers<'a> {
    /// From `header_map` when given (one entry a line), else from the
    /// joined `headers`; when both are given they must agree.
    fn of(
        joined: &'a HashMap<String, String>,
        map: Option<&'a HeaderMap>,
    ) -> Result<Self, ForwardedError> {
        let mut lines: HashMap<String, Vec<&'a [u8]>> = HashMap::new();
        let Some(map) = map.filter(|m| !m.headers.is_empty()) else {
            for (name, value) in joined {
                lines
                    .entry(name.to_ascii_lowercase())
                    .or_default()
                    .push(value.as_bytes());
            }
            return Ok(Self(lines));
        };
        for header in &map.headers {
            let name = header.key.to_ascii_lowercase();
            let value = match (header.value.as_bytes(), header.raw_value.as_slice()) {
                (v, []) => v,
                ([], raw) => raw,
                (v, raw) if v == raw => raw,
                _ => return Err(ForwardedError::Disagrees(known(&name))),
            };
            lines.entry(name).or_default().push(value);
        }
        for (name, value) in joined {
            let name = name.to_ascii_lowercase();
            let same = lines
                .get(&name)
                .is_some_and(|v| v.join(&b","[..]) == value.as_bytes());
            if !same {
                return Err(ForwardedError::Disagrees(known(&name)));
            }
        }
        Ok(Self(lines))
    }

    fn get(&self, name: &str) -> Option<&Vec<&'a [u8]>> {
        self.0.get(name)
    }

    /// Every credential in the `name` lines: one per line, and one per
    /// comma-separated piece of a line.
    fn credentials(&self, name: &str) -> Vec<Vec<u8>> {
        self.get(name)
            .into_iter()
            .flatten()
            .flat_map(|line| line.split(|&b| b == b','))
            .map(|piece| piece.trim_ascii().to_vec())
            .collect()
    }

    /// Every line, by name.
    fn fields(&self) -> Vec<(String, Vec<u8>)> {
        self.0
            .iter()
            .flat_map(|(name, lines)| lines.iter().map(|v| (name.clone(), v.to_vec())))
            .collect()
    }

    fn tally_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .0
            .keys()
            .filter(|n| n.starts_with("x-tally-"))
            .cloned()
            .collect();
        names.sort();
        names
    }
}

/// The name of a header an error may quote: one this module knows, so a
/// caller's header name never reaches an answer or a metric.
fn known(name: &str) -> &'static str {
    match name {
        AUTHORIZATION => AUTHORIZATION,
        DPOP => DPOP,
        WIT_HEADER => WIT_HEADER,
        WPT_HEADER => WPT_HEADER,
        TXN_TOKEN_HEADER => TXN_TOKEN_HEADER,
        ":authority" => ":authority",
        ":path" => ":path",
        ":method" => ":method",
        "host" => "host",
        _ => "other",
    }
}

/// Decodes `%XX` escapes (Envoy URL-encodes the peer certificate's PEM);
/// every other byte stands for itself (`+` is a base64 digit here, not a
/// space).
fn percent_decode(text: &str) -> Result<String, ForwardedError> {
    let bad = || ForwardedError::PeerUnverified("the certificate is not URL-encoded PEM".into());
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or_else(bad)?;
            let hex = std::str::from_utf8(hex).map_err(|_| bad())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| bad())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::envoy::config::core::v3::HeaderValue;
    use crate::proto::envoy::service::auth::v3::{AttributeContext, attribute_context};

    fn check(http: attribute_context::HttpRequest) -> CheckRequest {
        CheckRequest {
            attributes: Some(AttributeContext {
                request: Some(attribute_context::Request {
                    http: Some(http),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }
    }

    fn http(headers: &[(&str, &str)]) -> attribute_context::HttpRequest {
        attribute_context::HttpRequest {
            method: "GET".into(),
            scheme: "http".into(),
            host: "pay.svc".into(),
            path: "/v1/charges?limit=5".into(),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect(),
            ..Default::default()
        }
    }

    fn raw(lines: &[(&str, &[u8])]) -> Option<HeaderMap> {
        Some(HeaderMap {
            headers: lines
                .iter()
                .map(|(k, v)| HeaderValue {
                    key: (*k).into(),
                    raw_value: v.to_vec(),
                    ..Default::default()
                })
                .collect(),
        })
    }

    #[test]
    fn the_query_is_split_off_and_credentials_come_from_the_headers() {
        let d = describe(&check(http(&[
            ("authorization", "DPoP t"),
            ("dpop", "p"),
            ("x-tally-caller", "spiffe://example.org/evil"),
        ])))
        .unwrap();
        assert_eq!((d.method.as_str(), d.path.as_str()), ("GET", "/v1/charges"));
        assert_eq!(d.scheme, Scheme::Http);
        assert_eq!(d.authorization, [b"DPoP t".to_vec()]);
        assert_eq!(d.dpop, [b"p".to_vec()]);
        assert_eq!(d.tally_headers, ["x-tally-caller"]);
        assert!(!format!("{d:?}").contains("DPoP t"));
    }

    #[test]
    fn a_comma_joined_credential_counts_as_two() {
        let d = describe(&check(http(&[
            ("dpop", "p1,p2"),
            ("authorization", "DPoP a, DPoP b"),
        ])))
        .unwrap();
        assert_eq!(d.dpop.len(), 2);
        assert_eq!(d.authorization.len(), 2);
        let mut h = http(&[]);
        h.header_map = raw(&[
            ("dpop", b"p1"),
            ("dpop", b"p2"),
            ("authorization", b"DPoP a"),
        ]);
        let d = describe(&check(h)).unwrap();
        assert_eq!(d.dpop.len(), 2, "two raw lines are two proofs");
    }

    #[test]
    fn the_two_header_forms_must_agree() {
        let mut h = http(&[("authorization", "DPoP a")]);
        h.header_map = raw(&[("authorization", b"DPoP b")]);
        assert_eq!(
            describe(&check(h)),
            Err(ForwardedError::Disagrees("authorization"))
        );
        let mut h = http(&[("dpop", "p1,p2")]);
        h.header_map = raw(&[("dpop", b"p1"), ("dpop", b"p2")]);
        assert!(describe(&check(h)).is_ok(), "Envoy joins with commas");
        let mut h = http(&[]);
        h.header_map = Some(HeaderMap {
            headers: vec![HeaderValue {
                key: "dpop".into(),
                value: "a".into(),
                raw_value: b"b".to_vec(),
            }],
        });
        assert_eq!(describe(&check(h)), Err(ForwardedError::Disagrees("dpop")));
        let h = http(&[(":authority", "admin.svc")]);
        assert_eq!(
            describe(&check(h)),
            Err(ForwardedError::Disagrees(":authority"))
        );
        let h = http(&[("x-unknown", "1")]);
        let mut with_map = h.clone();
        with_map.header_map = raw(&[("x-other", b"1")]);
        assert_eq!(
            describe(&check(with_map)),
            Err(ForwardedError::Disagrees("other")),
            "a caller's header name is never quoted"
        );
    }

    #[test]
    fn a_check_without_a_whole_http_request_is_refused() {
        assert_eq!(
            describe(&CheckRequest::default()),
            Err(ForwardedError::NoHttpRequest)
        );
        let mut h = http(&[]);
        h.method.clear();
        assert_eq!(describe(&check(h)), Err(ForwardedError::NoMethod));
        let mut h = http(&[]);
        h.scheme = "ftp".into();
        assert_eq!(describe(&check(h)), Err(ForwardedError::Scheme));
    }

    #[test]
    fn the_peer_certificate_is_url_decoded_keeping_plus_signs() {
        assert_eq!(
            percent_decode("-----BEGIN%20CERT-----%0Aab+/=%0A").unwrap(),
            "-----BEGIN CERT-----\nab+/=\n"
        );
        assert!(percent_decode("%zz").is_err());
        assert!(percent_decode("%4").is_err());
        assert!(percent_decode("%ff").is_err(), "not UTF-8");
    }
}
