//! The one mapping from a refused request to its HTTP answer: status,
//! `WWW-Authenticate` (RFC 9449 §7.1, RFC 6750 §3), `DPoP-Nonce`,
//! `Retry-After` and the JSON body's `error` and `error_description`.
//! [`answer`] maps the token core's [`AuthError`]s; [`refusal_answer`]
//! every [`Refusal`] a front end gives (and the token core's through
//! [`answer`]).

use super::error::{AuthError, RequestError};
use super::forwarded::ForwardedError;
use super::target::TargetError;
use super::verdict::Refusal;
use crate::jose::jws::ALG_ES256;
use crate::policy::AccessDenial;

/// What to send back for a refused request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpAnswer {
    /// Status code.
    pub status: u16,
    /// The `error` code: the challenge's when there is one
    /// (`invalid_token`, …), and the JSON body's.
    pub error: &'static str,
    /// The `WWW-Authenticate` header value, if any.
    pub www_authenticate: Option<String>,
    /// A fresh `DPoP-Nonce` header value, for `use_dpop_nonce`.
    pub dpop_nonce: Option<String>,
    /// `Retry-After` in seconds.
    pub retry_after: Option<u64>,
    /// The `error_description`: the refusal's text, cut to the characters
    /// RFC 6750 §3 allows (see [`safe_description`]).
    pub description: String,
}

impl HttpAnswer {
    /// An answer with no challenge.
    fn plain(status: u16, error: &'static str, text: &str) -> Self {
        Self {
            status,
            error,
            www_authenticate: None,
            dpop_nonce: None,
            retry_after: None,
            description: safe_description(text),
        }
    }

    /// An answer with a `DPoP error=…` challenge saying the same.
    fn challenge(status: u16, error: &'static str, text: &str) -> Self {
        let description = safe_description(text);
        Self {
            www_authenticate: Some(format!(
                "DPoP error=\"{error}\", error_description=\"{description}\", algs=\"{ALG_ES256}\""
            )),
            description,
            ..Self::plain(status, error, "")
        }
    }

    /// An answer with a `WPT` challenge (draft-ietf-wimse-wpt §2.1: the
    /// scheme has no parameters, so the error is in the body only).
    fn wpt_challenge(status: u16, error: &'static str, text: &str) -> Self {
        Self {
            www_authenticate: Some(WPT_CHALLENGE.to_owned()),
            ..Self::plain(status, error, text)
        }
    }

    fn retry_after(self, secs: u64) -> Self {
        Self {
            retry_after: Some(secs),
            ..self
        }
    }
}

/// The challenge of the WIMSE `WPT` authentication scheme.
pub const WPT_CHALLENGE: &str = "WPT";

/// Maps a token-core `error` to its answer. `fresh_nonce` is sent as
/// `DPoP-Nonce` when the error asks for one.
///
/// Descriptions come from the errors' `Display`, which never holds a token
/// or key; they are cut to characters RFC 6750 §3 allows in a quoted
/// `error_description`, so nothing a client sent can break the header.
pub fn answer(error: &AuthError, fresh_nonce: Option<String>) -> HttpAnswer {
    let text = error.to_string();
    match error {
        // Both schemes this verifier accepts are offered (RFC 9110
        // §11.6.1: one field, a list of challenges).
        AuthError::NoCredentials => HttpAnswer {
            www_authenticate: Some(format!("DPoP algs=\"{ALG_ES256}\", {WPT_CHALLENGE}")),
            ..HttpAnswer::plain(401, "unauthorized", &text)
        },
        // A missing or doubled proof is a proof failure, and a bound token
        // sent as Bearer is not a valid token for that scheme (RFC 9449
        // §7.1, §7.2): 401, so clients treat them as authentication
        // failures. Other malformed requests are 400 (RFC 6750 §3.1).
        AuthError::Request(RequestError::MissingProof | RequestError::MultipleProofs) => {
            HttpAnswer::challenge(401, "invalid_dpop_proof", &text)
        }
        AuthError::Request(RequestError::BoundTokenAsBearer) => {
            HttpAnswer::challenge(401, "invalid_token", &text)
        }
        AuthError::Request(
            RequestError::MultipleAuthorization
            | RequestError::BearerWithProof
            | RequestError::MissingToken
            | RequestError::Malformed,
        ) => HttpAnswer::challenge(400, "invalid_request", &text),
        AuthError::Request(
            RequestError::MultipleWits
            | RequestError::MultipleWpts
            | RequestError::DpopWithWimse
            | RequestError::UnknownSchemeWithWimse,
        ) => HttpAnswer::plain(400, "invalid_request", &text),
        AuthError::Request(RequestError::MultipleTxnTokens) => {
            HttpAnswer::plain(400, "invalid_request", &text)
        }
        AuthError::Wit(_) => HttpAnswer::wpt_challenge(401, "invalid_wit", &text),
        AuthError::WimseIncomplete { .. }
        | AuthError::Wpt(_)
        | AuthError::WptReplayed
        | AuthError::WptBeforeRestart { .. }
        | AuthError::WptAudUnpinned => HttpAnswer::wpt_challenge(401, "invalid_wpt", &text),
        AuthError::TokenNotForWit => HttpAnswer::challenge(401, "invalid_token", &text),
        AuthError::Token(_) | AuthError::NotThePeer => {
            HttpAnswer::challenge(401, "invalid_token", &text)
        }
        AuthError::Proof(e) if e.wants_nonce() => HttpAnswer {
            dpop_nonce: fresh_nonce,
            ..HttpAnswer::challenge(401, "use_dpop_nonce", &text)
        },
        AuthError::Proof(_) => HttpAnswer::challenge(401, "invalid_dpop_proof", &text),
        AuthError::Overloaded => {
            HttpAnswer::plain(503, "temporarily_unavailable", &text).retry_after(1)
        }
    }
}

/// Maps any `refusal` to its answer: the token core's through [`answer`]
/// (with `fresh_nonce`), the rest here.
pub fn refusal_answer(refusal: &Refusal, fresh_nonce: Option<String>) -> HttpAnswer {
    let text = refusal.to_string();
    match refusal {
        Refusal::Unverified(error) => answer(error, fresh_nonce),
        Refusal::Target(TargetError::Misdirected(_)) => {
            HttpAnswer::plain(421, "invalid_request", &text)
        }
        Refusal::Target(
            TargetError::TwoHosts
            | TargetError::NoHost
            | TargetError::HostNotText
            | TargetError::HostMismatch
            | TargetError::Authority(_)
            | TargetError::Url(_)
            | TargetError::Path(_),
        ) => HttpAnswer::plain(400, "invalid_request", &text),
        Refusal::Forwarded(ForwardedError::PeerUnverified(_)) => {
            HttpAnswer::plain(403, "invalid_peer", &text)
        }
        Refusal::Forwarded(
            ForwardedError::NoHttpRequest
            | ForwardedError::NoMethod
            | ForwardedError::Scheme
            | ForwardedError::Disagrees(_)
            | ForwardedError::NotNormalized,
        ) => HttpAnswer::plain(400, "invalid_request", &text),
        Refusal::MtlsRequired => HttpAnswer::plain(403, "mtls_required", &text),
        Refusal::NotReady => {
            HttpAnswer::plain(503, "temporarily_unavailable", &text).retry_after(1)
        }
        Refusal::Revoked { .. } | Refusal::IdentityDenied { .. } => {
            HttpAnswer::challenge(401, "invalid_token", &text)
        }
        Refusal::WitRevoked { .. } => HttpAnswer::wpt_challenge(401, "invalid_wit", &text),
        // Long enough for a reconnecting Watch stream to catch up.
        Refusal::Stale { .. } => {
            HttpAnswer::plain(503, "temporarily_unavailable", &text).retry_after(5)
        }
        Refusal::AccessDenied(AccessDenial::MissingScope(_)) => {
            HttpAnswer::challenge(403, "insufficient_scope", &text)
        }
        Refusal::AccessDenied(
            AccessDenial::NoRuleForWorkload(_)
            | AccessDenial::CallerNotAllowed(_)
            | AccessDenial::MethodNotAllowed(_)
            | AccessDenial::PathNotAllowed(_),
        ) => HttpAnswer::plain(403, "access_denied", &text),
        Refusal::RateLimited { retry_after } => {
            HttpAnswer::plain(429, "rate_limited", &text).retry_after(*retry_after)
        }
    }
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
        assert_eq!((a.status, a.error), (401, "unauthorized"));
        assert_eq!(
            a.www_authenticate.as_deref(),
            Some("DPoP algs=\"ES256\", WPT")
        );
        assert_eq!(a.description, "no DPoP credentials");
    }

    #[test]
    fn each_error_kind_gets_its_code_and_status() {
        let cases: [(Refusal, u16, &str); 12] = [
            (
                AuthError::Request(RequestError::MultipleAuthorization).into(),
                400,
                "invalid_request",
            ),
            (
                AuthError::Request(RequestError::MultipleProofs).into(),
                401,
                "invalid_dpop_proof",
            ),
            (
                AuthError::Request(RequestError::MissingProof).into(),
                401,
                "invalid_dpop_proof",
            ),
            (
                AuthError::Request(RequestError::BoundTokenAsBearer).into(),
                401,
                "invalid_token",
            ),
            (
                AuthError::Token(TokenError::KidMissing).into(),
                401,
                "invalid_token",
            ),
            (Refusal::Revoked { jti: "j1".into() }, 401, "invalid_token"),
            (
                Refusal::IdentityDenied {
                    caller: "spiffe://td/a".parse().unwrap(),
                },
                401,
                "invalid_token",
            ),
            (
                AuthError::Proof(ProofError::AthMismatch).into(),
                401,
                "invalid_dpop_proof",
            ),
            (
                AuthError::Proof(ProofError::NonceMissing).into(),
                401,
                "use_dpop_nonce",
            ),
            (
                AuthError::Proof(ProofError::Replayed).into(),
                401,
                "invalid_dpop_proof",
            ),
            (
                Refusal::AccessDenied(AccessDenial::MissingScope("a:b".parse().unwrap())),
                403,
                "insufficient_scope",
            ),
            (
                AuthError::Request(RequestError::Malformed).into(),
                400,
                "invalid_request",
            ),
        ];
        for (refusal, status, code) in cases {
            let a = refusal_answer(&refusal, Some("n0nce".into()));
            assert_eq!((a.status, a.error), (status, code), "{refusal:?}");
            let header = a.www_authenticate.unwrap();
            let said = refusal.to_string();
            assert_eq!(
                header,
                format!("DPoP error=\"{code}\", error_description=\"{said}\", algs=\"ES256\"")
            );
            assert_eq!(a.description, said);
            assert_eq!(a.dpop_nonce.is_some(), code == "use_dpop_nonce");
            assert_eq!(a.retry_after, None);
        }
    }

    #[test]
    fn refusals_without_a_challenge_say_why_in_the_body_and_when_to_retry() {
        let cases = [
            (
                Refusal::Target(TargetError::Misdirected("pay.svc:9090".into())),
                421,
                "invalid_request",
                None,
                "this sidecar does not serve pay.svc:9090",
            ),
            (
                Refusal::Target(TargetError::TwoHosts),
                400,
                "invalid_request",
                None,
                "more than one Host header",
            ),
            (
                Refusal::NotReady,
                503,
                "temporarily_unavailable",
                Some(1),
                "the sidecar has not received the broker's keys and access rules yet",
            ),
            (
                Refusal::Stale {
                    down_for: 40,
                    after: 30,
                },
                503,
                "temporarily_unavailable",
                Some(5),
                "this sidecar has not heard from the broker for too long to know whether the token is revoked",
            ),
            (
                Refusal::AccessDenied(AccessDenial::CallerNotAllowed("spiffe://td/x".into())),
                403,
                "access_denied",
                None,
                "denied by policy: spiffe://td/x may not call this workload",
            ),
            (
                Refusal::RateLimited { retry_after: 3 },
                429,
                "rate_limited",
                Some(3),
                "rate limit exceeded",
            ),
            (
                AuthError::Overloaded.into(),
                503,
                "temporarily_unavailable",
                Some(1),
                "verifier overloaded",
            ),
        ];
        for (refusal, status, error, retry_after, description) in cases {
            let a = refusal_answer(&refusal, Some("n0nce".into()));
            let expected = HttpAnswer {
                status,
                error,
                www_authenticate: None,
                dpop_nonce: None,
                retry_after,
                description: description.into(),
            };
            assert_eq!(a, expected, "{refusal:?}");
        }
    }

    #[test]
    fn the_token_core_answers_the_same_alone_or_as_a_refusal() {
        let error = AuthError::Proof(ProofError::NonceMissing);
        let nonce = Some("n0nce".to_owned());
        assert_eq!(
            answer(&error, nonce.clone()),
            refusal_answer(&Refusal::Unverified(error), nonce)
        );
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
