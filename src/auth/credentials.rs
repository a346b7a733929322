//! Reading `Authorization` and `DPoP` request headers (RFC 9449 §7.1,
//! RFC 6750 §2.1).

use super::error::{AuthError, RequestError};
use crate::jose::{b64, json};

/// The WIMSE WIT header (draft-ietf-wimse-workload-creds), lower case.
pub const WIT_HEADER: &str = "workload-identity-token";
/// The WIMSE WPT header of draft-ietf-wimse-wpt-01, lower case.
pub const WPT_HEADER: &str = "workload-proof-token";
/// The OAuth transaction token header, lower case: a WPT's `tth` binds it.
pub const TXN_TOKEN_HEADER: &str = "txn-token";

/// Longest header value considered, in bytes (beyond the JWS caps).
const MAX_HEADER_LEN: usize = 16 * 1024;

/// The credentials of a DPoP-bound request.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Credentials<'a> {
    /// The access token.
    pub token: &'a str,
    /// The DPoP proof.
    pub proof: &'a str,
}

impl std::fmt::Debug for Credentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(<redacted>)")
    }
}

/// Extracts the token and proof from all `Authorization` and all `DPoP`
/// header values of a request.
///
/// # Errors
/// [`AuthError::NoCredentials`] when there is nothing usable (no header, or
/// a scheme other than DPoP with a token that is not DPoP-bound);
/// [`AuthError::Request`] when the request is malformed.
pub fn parse<'a>(
    authorization: &[&'a [u8]],
    dpop: &[&'a [u8]],
) -> Result<Credentials<'a>, AuthError> {
    let malformed = AuthError::Request(RequestError::Malformed);
    if authorization.len() > 1 {
        return Err(AuthError::Request(RequestError::MultipleAuthorization));
    }
    if dpop.len() > 1 {
        return Err(AuthError::Request(RequestError::MultipleProofs));
    }
    let proof = match dpop.first() {
        None => None,
        Some(value) => Some(
            ascii(value)
                .filter(|p| !p.is_empty())
                .ok_or(malformed.clone())?,
        ),
    };
    let Some(value) = authorization.first() else {
        return Err(match proof {
            Some(_) => AuthError::Request(RequestError::MissingToken),
            None => AuthError::NoCredentials,
        });
    };
    let token = dpop_token(value, proof.is_some())?;
    let proof = proof.ok_or(AuthError::Request(RequestError::MissingProof))?;
    Ok(Credentials { token, proof })
}

/// The token of a request that sends `Authorization: DPoP <token>` and no
/// `DPoP` header: on a mutual-TLS connection whose handshake proved the
/// key (see [`super::bound`]).
///
/// # Errors
/// As [`parse`], except that no proof is asked for.
pub fn token_alone<'a>(authorization: &[&'a [u8]]) -> Result<&'a str, AuthError> {
    match authorization {
        [] => Err(AuthError::NoCredentials),
        [value] => dpop_token(value, false),
        _ => Err(AuthError::Request(RequestError::MultipleAuthorization)),
    }
}

/// The token in one `Authorization` value if its scheme is DPoP;
/// `with_proof` says whether a `DPoP` header came too.
fn dpop_token(value: &[u8], with_proof: bool) -> Result<&str, AuthError> {
    let malformed = AuthError::Request(RequestError::Malformed);
    let value = ascii(value).ok_or(malformed.clone())?;
    let (scheme, token) = value.split_once(' ').ok_or(malformed.clone())?;
    let token = token.trim_start_matches(' ');
    if !is_token68(token) {
        return Err(malformed);
    }
    if scheme.eq_ignore_ascii_case("DPoP") {
        return Ok(token);
    }
    if scheme.eq_ignore_ascii_case("Bearer") {
        if with_proof {
            return Err(AuthError::Request(RequestError::BearerWithProof));
        }
        if looks_dpop_bound(token) {
            return Err(AuthError::Request(RequestError::BoundTokenAsBearer));
        }
    }
    // Any other scheme, or a bearer token that is not ours: we only speak
    // DPoP, so this is a request without usable credentials.
    Err(AuthError::NoCredentials)
}

/// The WIMSE credentials of a request (draft-ietf-wimse-workload-creds,
/// draft-ietf-wimse-wpt): a Workload Identity Token, the Workload Proof
/// Token made for this request with its key, and the access token sent
/// with them, if any.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct WimseCredentials<'a> {
    /// The `Workload-Identity-Token` value.
    pub wit: &'a str,
    /// The WPT: the `Workload-Proof-Token` value (draft -01), or the
    /// credentials of `Authorization: WPT` (draft -02).
    pub wpt: &'a str,
    /// The access token of `Authorization: DPoP <token>` sent with a
    /// `Workload-Proof-Token` header (its hash is the WPT's `ath`).
    pub token: Option<&'a str>,
}

impl std::fmt::Debug for WimseCredentials<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WimseCredentials(<redacted>)")
    }
}

/// The WIMSE credentials in a request's `Workload-Identity-Token`,
/// `Workload-Proof-Token`, `Authorization` and `DPoP` values, or `None`
/// when it sends none (neither WIMSE header, and no `WPT` scheme): it is
/// then judged as a DPoP request.
///
/// A request cannot mix the two: a `DPoP` header beside a WIT is refused,
/// as are two WITs, two WPTs (both headers, or a header and the `WPT`
/// scheme), a WIT without a WPT (a WIT is never a bearer token) and a
/// WPT without a WIT. The only access token taken with a WPT is a DPoP
/// one (tally's tokens are bound: a `Bearer` one is refused, as RFC 9449
/// §7.2 and the WPT draft's coexistence rules ask).
///
/// # Errors
/// [`AuthError::Request`] for a malformed request (400),
/// [`AuthError::WimseIncomplete`] for a WIT or WPT alone (401).
pub fn wimse<'a>(
    authorization: &[&'a [u8]],
    dpop: &[&'a [u8]],
    wit: &[&'a [u8]],
    wpt: &[&'a [u8]],
) -> Result<Option<WimseCredentials<'a>>, AuthError> {
    let malformed = AuthError::Request(RequestError::Malformed);
    let wpt_scheme = match authorization {
        [value] => wpt_credentials(value)?,
        _ => None,
    };
    if wit.is_empty() && wpt.is_empty() && wpt_scheme.is_none() {
        return Ok(None);
    }
    if authorization.len() > 1 {
        return Err(AuthError::Request(RequestError::MultipleAuthorization));
    }
    if wit.len() > 1 {
        return Err(AuthError::Request(RequestError::MultipleWits));
    }
    if wpt.len() > 1 || (wpt.len() == 1 && wpt_scheme.is_some()) {
        return Err(AuthError::Request(RequestError::MultipleWpts));
    }
    if !dpop.is_empty() {
        return Err(AuthError::Request(RequestError::DpopWithWimse));
    }
    let wit = match wit.first() {
        Some(value) => Some(jwt_value(value).ok_or(malformed.clone())?),
        None => None,
    };
    let wpt = match (wpt.first(), wpt_scheme) {
        (Some(value), _) => Some(jwt_value(value).ok_or(malformed.clone())?),
        (None, scheme) => scheme,
    };
    let (Some(wit), Some(wpt)) = (wit, wpt) else {
        return Err(AuthError::WimseIncomplete {
            missing: if wit.is_none() {
                "Workload-Identity-Token"
            } else {
                "Workload-Proof-Token"
            },
        });
    };
    // With the WPT in a header of its own, `Authorization` may carry the
    // access token the WPT's `ath` hashes.
    let token = match (wpt_scheme, authorization.first()) {
        (None, Some(value)) => Some(wimse_token(value)?),
        _ => None,
    };
    Ok(Some(WimseCredentials { wit, wpt, token }))
}

/// The credentials of `Authorization: WPT <jwt>`, if that is its scheme.
fn wpt_credentials(value: &[u8]) -> Result<Option<&str>, AuthError> {
    let malformed = AuthError::Request(RequestError::Malformed);
    let value = ascii(value).ok_or(malformed.clone())?;
    match value.split_once(' ') {
        Some((scheme, jwt)) if scheme.eq_ignore_ascii_case("WPT") => {
            let jwt = jwt.trim_start_matches(' ');
            is_compact_jwt(jwt).then_some(Some(jwt)).ok_or(malformed)
        }
        _ => Ok(None),
    }
}

/// The access token beside a `Workload-Proof-Token`: `DPoP <token>` only.
fn wimse_token(value: &[u8]) -> Result<&str, AuthError> {
    let malformed = AuthError::Request(RequestError::Malformed);
    let value = ascii(value).ok_or(malformed.clone())?;
    let (scheme, token) = value.split_once(' ').ok_or(malformed.clone())?;
    let token = token.trim_start_matches(' ');
    if !is_token68(token) {
        return Err(malformed);
    }
    if scheme.eq_ignore_ascii_case("DPoP") {
        Ok(token)
    } else if scheme.eq_ignore_ascii_case("Bearer") {
        Err(AuthError::Request(RequestError::BoundTokenAsBearer))
    } else {
        Err(AuthError::Request(RequestError::UnknownSchemeWithWimse))
    }
}

/// A header value that is one compact JWT (the WIT header's ABNF:
/// `base64url "." base64url "." base64url`), nothing else: no list, no
/// padding, no whitespace.
fn jwt_value(value: &[u8]) -> Option<&str> {
    let value = ascii(value)?;
    is_compact_jwt(value).then_some(value)
}

fn is_compact_jwt(s: &str) -> bool {
    let mut parts = s.split('.');
    let segment = |p: Option<&str>| {
        p.is_some_and(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
    };
    segment(parts.next())
        && segment(parts.next())
        && segment(parts.next())
        && parts.next().is_none()
}

fn ascii(value: &[u8]) -> Option<&str> {
    if value.len() > MAX_HEADER_LEN || !value.iter().all(|b| (0x20..0x7f).contains(b)) {
        return None;
    }
    std::str::from_utf8(value).ok()
}

/// RFC 7235 `token68`: `1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="`.
fn is_token68(s: &str) -> bool {
    let body = s.trim_end_matches('=');
    !body.is_empty()
        && body.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/')
        })
}

/// Whether an (unverified) JWT carries `cnf.jkt`. Only decides between two
/// refusals, so reading it unverified is safe.
fn looks_dpop_bound(token: &str) -> bool {
    let mut parts = token.split('.');
    let (Some(_), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    if payload.len() > MAX_HEADER_LEN {
        return false;
    }
    b64::decode(payload.as_bytes())
        .ok()
        .and_then(|bytes| json::parse_object(&bytes).ok())
        .is_some_and(|claims| claims.get("cnf").and_then(|c| c.get("jkt")).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_one<'a>(
        auth: Option<&'a str>,
        dpop: Option<&'a str>,
    ) -> Result<Credentials<'a>, AuthError> {
        let a: Vec<&[u8]> = auth.into_iter().map(str::as_bytes).collect();
        let d: Vec<&[u8]> = dpop.into_iter().map(str::as_bytes).collect();
        parse(&a, &d)
    }

    #[test]
    fn dpop_scheme_with_proof_is_accepted_in_any_case() {
        let c = parse_one(Some("DPoP abc.def.ghi"), Some("p.q.r")).unwrap();
        assert_eq!((c.token, c.proof), ("abc.def.ghi", "p.q.r"));
        assert!(parse_one(Some("dpop abc"), Some("p")).is_ok());
    }

    #[test]
    fn nothing_sent_is_no_credentials() {
        assert_eq!(parse_one(None, None).unwrap_err(), AuthError::NoCredentials);
        assert_eq!(
            parse_one(Some("Basic dXNlcjpwdw=="), None).unwrap_err(),
            AuthError::NoCredentials
        );
    }

    #[test]
    fn malformed_combinations_are_invalid_requests() {
        let req = |e| AuthError::Request(e);
        assert_eq!(
            parse(&[b"DPoP a", b"DPoP b"], &[b"p"]).unwrap_err(),
            req(RequestError::MultipleAuthorization)
        );
        assert_eq!(
            parse(&[b"DPoP a"], &[b"p", b"q"]).unwrap_err(),
            req(RequestError::MultipleProofs)
        );
        assert_eq!(
            parse_one(Some("Bearer a"), Some("p")).unwrap_err(),
            req(RequestError::BearerWithProof)
        );
        assert_eq!(
            parse_one(Some("DPoP a"), None).unwrap_err(),
            req(RequestError::MissingProof)
        );
        assert_eq!(
            parse_one(None, Some("p")).unwrap_err(),
            req(RequestError::MissingToken)
        );
        assert_eq!(
            parse_one(Some("DPoP"), Some("p")).unwrap_err(),
            req(RequestError::Malformed)
        );
        assert_eq!(
            parse_one(Some("DPoP a b"), Some("p")).unwrap_err(),
            req(RequestError::Malformed)
        );
        assert_eq!(
            parse(&[b"DPoP \xff"], &[b"p"]).unwrap_err(),
            req(RequestError::Malformed)
        );
        assert_eq!(
            parse(&[b"DPoP a\r\n"], &[b"p"]).unwrap_err(),
            req(RequestError::Malformed)
        );
    }

    fn wimse_one<'a>(
        auth: &[&'a str],
        dpop: &[&'a str],
        wit: &[&'a str],
        wpt: &[&'a str],
    ) -> Result<Option<WimseCredentials<'a>>, AuthError> {
        let bytes = |v: &[&'a str]| v.iter().map(|s| s.as_bytes()).collect::<Vec<&'a [u8]>>();
        wimse(&bytes(auth), &bytes(dpop), &bytes(wit), &bytes(wpt))
    }

    #[test]
    fn a_request_without_wimse_headers_is_left_to_dpop() {
        assert_eq!(
            wimse_one(&["DPoP a.b.c"], &["p.q.r"], &[], &[]).unwrap(),
            None
        );
        assert_eq!(wimse_one(&[], &[], &[], &[]).unwrap(), None);
        assert_eq!(wimse_one(&["Bearer x"], &[], &[], &[]).unwrap(), None);
    }

    #[test]
    fn both_draft_forms_of_the_wpt_are_read() {
        let c = wimse_one(&[], &[], &["w.i.t"], &["w.p.t"])
            .unwrap()
            .unwrap();
        assert_eq!((c.wit, c.wpt, c.token), ("w.i.t", "w.p.t", None));
        let c = wimse_one(&["DPoP a.b.c"], &[], &["w.i.t"], &["w.p.t"])
            .unwrap()
            .unwrap();
        assert_eq!(c.token, Some("a.b.c"));
        let c = wimse_one(&["wpt  w.p.t"], &[], &["w.i.t"], &[])
            .unwrap()
            .unwrap();
        assert_eq!((c.wit, c.wpt, c.token), ("w.i.t", "w.p.t", None));
    }

    #[test]
    fn mixed_doubled_or_partial_wimse_credentials_are_refused() {
        let req = |e| Err(AuthError::Request(e));
        assert_eq!(
            wimse_one(&[], &[], &["w.i.t", "w.i.t"], &["w.p.t"]),
            req(RequestError::MultipleWits)
        );
        assert_eq!(
            wimse_one(&[], &[], &["w.i.t"], &["w.p.t", "w.p.t"]),
            req(RequestError::MultipleWpts)
        );
        assert_eq!(
            wimse_one(&["WPT w.p.t"], &[], &["w.i.t"], &["w.p.t"]),
            req(RequestError::MultipleWpts)
        );
        assert_eq!(
            wimse_one(&["DPoP a.b.c"], &["p.q.r"], &["w.i.t"], &["w.p.t"]),
            req(RequestError::DpopWithWimse)
        );
        assert_eq!(
            wimse_one(&["Bearer a.b.c"], &[], &["w.i.t"], &["w.p.t"]),
            req(RequestError::BoundTokenAsBearer)
        );
        assert_eq!(
            wimse_one(&["Basic dXNlcg=="], &[], &["w.i.t"], &["w.p.t"]),
            req(RequestError::UnknownSchemeWithWimse)
        );
        assert_eq!(
            wimse_one(&["DPoP a", "DPoP b"], &[], &["w.i.t"], &["w.p.t"]),
            req(RequestError::MultipleAuthorization)
        );
        // A list, padding or whitespace is not one JWT.
        for bad in ["w.i.t,w.i.t", "w.i.t=", " w.i.t", "w.i", "w.i.t.x", "w..t"] {
            assert_eq!(
                wimse_one(&[], &[], &[bad], &["w.p.t"]),
                req(RequestError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(
            wimse_one(&[], &[], &["w.i.t"], &[]),
            Err(AuthError::WimseIncomplete {
                missing: "Workload-Proof-Token"
            })
        );
        assert_eq!(
            wimse_one(&["WPT w.p.t"], &[], &[], &[]),
            Err(AuthError::WimseIncomplete {
                missing: "Workload-Identity-Token"
            })
        );
    }

    #[test]
    fn bound_token_sent_as_bearer_is_an_invalid_request() {
        let payload = b64::encode(r#"{"sub":"x","cnf":{"jkt":"abc"}}"#);
        let token = format!("eyJhbGciOiJFUzI1NiJ9.{payload}.c2ln");
        assert_eq!(
            parse_one(Some(&format!("Bearer {token}")), None).unwrap_err(),
            AuthError::Request(RequestError::BoundTokenAsBearer)
        );
        let unbound = format!(
            "eyJhbGciOiJFUzI1NiJ9.{}.c2ln",
            b64::encode(r#"{"sub":"x"}"#)
        );
        assert_eq!(
            parse_one(Some(&format!("Bearer {unbound}")), None).unwrap_err(),
            AuthError::NoCredentials
        );
    }
}
