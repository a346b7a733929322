//! Reading `Authorization` and `DPoP` request headers (RFC 9449 §7.1,
//! RFC 6750 §2.1).

use super::error::{AuthError, RequestError};
use crate::jose::{b64, json};

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
