//! The one mapping from a refused request to its HTTP answer: status,
//! `WWW-Authenticate` (RFC 9449 §7.1, RFC 6750 §3), `DPoP-Nonce` and
//! `Retry-After`.

use super::{AuthError, RequestError};
use crate::jose::jws::ALG_ES256;

/// What to send back for a refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// The `error` code, if any (`invalid_token`, …).
    pub error: Option<&'static str>,
    /// The `WWW-Authenticate` header value, if any.
    pub www_authenticate: Option<String>,
    /// A fresh `DPoP-Nonce` header value, for `use_dpop_nonce`.
    pub dpop_nonce: Option<String>,
    /// `Retry-After` in seconds.
    pub retry_after: Option<u64>,
}

/// Maps `error` to its answer. `fresh_nonce` is sent as `DPoP-Nonce` when
/// the error asks for one.
///
/// Descriptions come from the errors' `Display`, which never holds a token
/// or key; they are cut to characters RFC 6750 §3 allows in a quoted
/// `error_description`, so nothing a client sent can break the header.
pub fn answer(error: &AuthError, fresh_nonce: Option<String>) -> HttpAnswer {
    let challenge = |code: &'static str| {
        Some(format!(
            "DPoP error=\"{code}\", error_description=\"{}\", algs=\"{ALG_ES256}\"",
            description(error)
        ))
    };
    let (status, code) = match error {
        AuthError::NoCredentials => {
            return HttpAnswer {
                status: 401,
                error: None,
                www_authenticate: Some(format!("DPoP algs=\"{ALG_ES256}\"")),
                dpop_nonce: None,
                retry_after: None,
            };
        }
        // A missing or doubled proof is a proof failure, and a bound token
        // sent as Bearer is not a valid token for that scheme (RFC 9449
        // §7.1, §7.2): 401, so clients treat them as authentication
        // failures. Other malformed requests are 400 (RFC 6750 §3.1).
        AuthError::Request(RequestError::MissingProof | RequestError::MultipleProofs) => {
            (401, "invalid_dpop_proof")
        }
        AuthError::Request(RequestError::BoundTokenAsBearer) => (401, "invalid_token"),
        AuthError::Request(_) => (400, "invalid_request"),
        AuthError::Token(_) | AuthError::Revoked | AuthError::IdentityDenied => {
            (401, "invalid_token")
        }
        AuthError::Proof(e) if e.wants_nonce() => (401, "use_dpop_nonce"),
        AuthError::Proof(_) => (401, "invalid_dpop_proof"),
        AuthError::InsufficientScope { .. } => (403, "insufficient_scope"),
        AuthError::Forbidden(_) => {
            return HttpAnswer {
                status: 403,
                error: None,
                www_authenticate: None,
                dpop_nonce: None,
                retry_after: None,
            };
        }
        AuthError::RateLimited { retry_after } => {
            return HttpAnswer {
                status: 429,
                error: None,
                www_authenticate: None,
                dpop_nonce: None,
                retry_after: Some(*retry_after),
            };
        }
        AuthError::Overloaded => {
            return HttpAnswer {
                status: 503,
                error: Some("temporarily_unavailable"),
                www_authenticate: None,
                dpop_nonce: None,
                retry_after: Some(1),
            };
        }
    };
    HttpAnswer {
        status,
        error: Some(code),
        www_authenticate: challenge(code),
        dpop_nonce: if code == "use_dpop_nonce" {
            fresh_nonce
        } else {
            None
        },
        retry_after: None,
    }
}

/// The error's text, restricted to `%x20-21 / %x23-5B / %x5D-7E` and 200
/// characters.
pub fn description(error: &AuthError) -> String {
    safe_description(&error.to_string())
}

/// `text` restricted to the characters RFC 6749/6750 allow in
/// `error_description` (`%x20-21 / %x23-5B / %x5D-7E`), at most 200, so
/// text a client sent cannot break the header or JSON it lands in.
pub fn safe_description(text: &str) -> String {
    text.chars()
        .filter(|&c| matches!(c, '\x20'..='\x21' | '\x23'..='\x5b' | '\x5d'..='\x7e'))
        .take(200)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpop::ProofError;
    use crate::token::TokenError;

    #[test]
    fn no_credentials_gets_a_bare_challenge() {
        let a = answer(&AuthError::NoCredentials, None);
        assert_eq!(a.status, 401);
        assert_eq!(a.www_authenticate.as_deref(), Some("DPoP algs=\"ES256\""));
    }

    #[test]
    fn each_error_kind_gets_its_code_and_status() {
        let cases = [
            (
                AuthError::Request(RequestError::MultipleAuthorization),
                400,
                "invalid_request",
            ),
            (
                AuthError::Request(RequestError::MultipleProofs),
                401,
                "invalid_dpop_proof",
            ),
            (
                AuthError::Request(RequestError::MissingProof),
                401,
                "invalid_dpop_proof",
            ),
            (
                AuthError::Request(RequestError::BoundTokenAsBearer),
                401,
                "invalid_token",
            ),
            (
                AuthError::Token(TokenError::KidMissing),
                401,
                "invalid_token",
            ),
            (AuthError::Revoked, 401, "invalid_token"),
            (AuthError::IdentityDenied, 401, "invalid_token"),
            (
                AuthError::Proof(ProofError::AthMismatch),
                401,
                "invalid_dpop_proof",
            ),
            (
                AuthError::Proof(ProofError::NonceMissing),
                401,
                "use_dpop_nonce",
            ),
            (
                AuthError::InsufficientScope {
                    scope: "a:b".into(),
                },
                403,
                "insufficient_scope",
            ),
        ];
        for (error, status, code) in cases {
            let a = answer(&error, Some("n0nce".into()));
            assert_eq!((a.status, a.error), (status, Some(code)), "{error:?}");
            let header = a.www_authenticate.unwrap();
            assert!(header.starts_with(&format!("DPoP error=\"{code}\", error_description=\"")));
            assert!(header.ends_with(", algs=\"ES256\""));
            assert_eq!(a.dpop_nonce.is_some(), code == "use_dpop_nonce");
        }
    }

    #[test]
    fn rate_limit_and_overload_carry_retry_after() {
        let a = answer(&AuthError::RateLimited { retry_after: 3 }, None);
        assert_eq!((a.status, a.retry_after), (429, Some(3)));
        let a = answer(&AuthError::Overloaded, None);
        assert_eq!((a.status, a.retry_after), (503, Some(1)));
    }

    #[test]
    fn client_text_cannot_break_out_of_the_header() {
        let error = AuthError::Proof(ProofError::HtmMismatch {
            expected: "GET".into(),
            found: "\"\r\nSet-Cookie: x=\\y".into(),
        });
        let header = answer(&error, None).www_authenticate.unwrap();
        assert!(!header.contains(['\r', '\n', '\\']));
        assert_eq!(header.matches('"').count(), 6);
    }
}
