//! The verdict as a `CheckResponse`. Pure.
//!
//! - Admitted: `OkHttpResponse` setting `x-tally-caller`,
//!   `x-tally-scopes`, `x-tally-token-id` and `x-tally-transport` with
//!   `OVERWRITE_IF_EXISTS_OR_ADD` (a value from outside never survives
//!   beside ours), removing every other `x-tally-*` header the request
//!   carried, and `authorization` and `dpop` unless credentials are
//!   passed on.
//! - Refused: `DeniedHttpResponse` with the status, `WWW-Authenticate`,
//!   `DPoP-Nonce`, `Retry-After` and JSON body of the one mapping
//!   ([`mod@crate::auth::answer`]), and a non-OK `status` (Envoy's ext_authz
//!   denies on any): `UNAUTHENTICATED` for 401, `PERMISSION_DENIED` for
//!   every other refusal.

use crate::auth::HttpAnswer;
use crate::auth::credentials::{WIT_HEADER, WPT_HEADER};
use crate::auth::verdict::Allowed;
use crate::proto::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use crate::proto::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use crate::proto::envoy::service::auth::v3::check_response::HttpResponse;
use crate::proto::envoy::service::auth::v3::{CheckResponse, DeniedHttpResponse, OkHttpResponse};
use crate::proto::envoy::r#type::v3::HttpStatus;
use crate::proto::google::rpc::Status;

/// The inbound proxy's identity headers ([`crate::sidecar::inbound`]).
const CALLER: &str = "x-tally-caller";
const SCOPES: &str = "x-tally-scopes";
const TOKEN_ID: &str = "x-tally-token-id";
const TRANSPORT: &str = "x-tally-transport";

/// `google.rpc.Code` values.
const OK: i32 = 0;
const PERMISSION_DENIED: i32 = 7;
const UNAUTHENTICATED: i32 = 16;

/// The identity headers an admission sets, by name.
pub type IdentityHeaders = [(&'static str, String); 4];

/// The headers the app gets for an admitted request (`allowed`, that
/// reached the proxy in front by `transport`), as the inbound proxy sets
/// them.
pub fn identity_headers(allowed: &Allowed, transport: &'static str) -> IdentityHeaders {
    [
        (CALLER, allowed.caller().to_string()),
        (SCOPES, allowed.scopes().to_string()),
        (TOKEN_ID, allowed.token_id().to_owned()),
        (TRANSPORT, transport.to_owned()),
    ]
}

/// The answer admitting a request: the app gets `ours` (see
/// [`identity_headers`]); `tally_headers` are the `x-tally-*` names the
/// request carried.
pub fn admitted(
    ours: IdentityHeaders,
    tally_headers: &[String],
    pass_credentials: bool,
) -> CheckResponse {
    let mut headers = Vec::new();
    let mut remove: Vec<String> = tally_headers.to_vec();
    for (name, value) in ours {
        // Only a value a header may hold is set; without one the header
        // is removed, so an outside value cannot stand in for it.
        if http::HeaderValue::from_str(&value).is_ok() {
            headers.push(overwrite(name, value));
            remove.retain(|n| n != name);
        } else if !remove.iter().any(|n| n == name) {
            remove.push(name.to_owned());
        }
    }
    if !pass_credentials {
        remove.extend(["authorization", "dpop", WIT_HEADER, WPT_HEADER].map(str::to_owned));
    }
    CheckResponse {
        status: Some(Status {
            code: OK,
            ..Status::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove: remove,
            ..OkHttpResponse::default()
        })),
        dynamic_metadata: None,
    }
}

/// The answer refusing a request with `answer`.
pub fn refused(answer: &HttpAnswer) -> CheckResponse {
    let body = serde_json::json!({
        "error": answer.error,
        "error_description": answer.description,
    });
    let mut headers = vec![overwrite("content-type", "application/json".to_owned())];
    if let Some(challenge) = &answer.www_authenticate {
        headers.push(overwrite("www-authenticate", challenge.clone()));
    }
    if let Some(nonce) = &answer.dpop_nonce {
        headers.push(overwrite("dpop-nonce", nonce.clone()));
    }
    if let Some(secs) = answer.retry_after {
        headers.push(overwrite("retry-after", secs.to_string()));
    }
    let code = if answer.status == 401 {
        UNAUTHENTICATED
    } else {
        PERMISSION_DENIED
    };
    CheckResponse {
        status: Some(Status {
            code,
            message: answer.error.to_owned(),
            details: Vec::new(),
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(answer.status),
            }),
            headers,
            body: body.to_string(),
        })),
        dynamic_metadata: None,
    }
}

fn overwrite(name: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_owned(),
            value,
            raw_value: Vec::new(),
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd.into(),
        ..HeaderValueOption::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok_response(r: &CheckResponse) -> &OkHttpResponse {
        match &r.http_response {
            Some(HttpResponse::OkResponse(ok)) => ok,
            other => panic!("not OK: {other:?}"),
        }
    }

    #[test]
    fn the_identity_headers_are_the_inbound_proxys() {
        use crate::sidecar::inbound;
        assert_eq!(
            [CALLER, SCOPES, TOKEN_ID, TRANSPORT],
            [
                inbound::CALLER.as_str(),
                inbound::SCOPES.as_str(),
                inbound::TOKEN_ID.as_str(),
                inbound::TRANSPORT.as_str()
            ]
        );
    }

    #[test]
    fn a_refusal_carries_the_challenge_and_a_non_ok_status() {
        let answer = crate::auth::answer(&crate::auth::AuthError::NoCredentials, None);
        let r = refused(&answer);
        assert_eq!(r.status.as_ref().unwrap().code, UNAUTHENTICATED);
        let Some(HttpResponse::DeniedResponse(denied)) = &r.http_response else {
            panic!("not denied");
        };
        assert_eq!(denied.status.unwrap().code, 401);
        let challenge = denied
            .headers
            .iter()
            .find(|h| h.header.as_ref().unwrap().key == "www-authenticate")
            .unwrap();
        assert_eq!(
            challenge.append_action,
            i32::from(HeaderAppendAction::OverwriteIfExistsOrAdd)
        );
        assert!(denied.body.contains("\"unauthorized\""));
        let limited = crate::auth::refusal_answer(
            &crate::auth::Refusal::RateLimited { retry_after: 3 },
            None,
        );
        let r = refused(&limited);
        assert_eq!(r.status.as_ref().unwrap().code, PERMISSION_DENIED);
        let Some(HttpResponse::DeniedResponse(denied)) = &r.http_response else {
            panic!("not denied");
        };
        assert!(denied.headers.iter().any(|h| {
            let h = h.header.as_ref().unwrap();
            h.key == "retry-after" && h.value == "3"
        }));
    }

    #[test]
    fn an_admission_overwrites_our_headers_and_removes_other_tally_headers_and_credentials() {
        let ours = || {
            [
                (
                    "x-tally-caller",
                    "spiffe://example.org/ns/shop/sa/checkout".to_owned(),
                ),
                ("x-tally-scopes", "payments:charge".to_owned()),
                ("x-tally-token-id", "0190a1b2".to_owned()),
                ("x-tally-transport", "plaintext".to_owned()),
            ]
        };
        let r = admitted(
            ours(),
            &["x-tally-caller".into(), "x-tally-extra".into()],
            false,
        );
        assert_eq!(r.status.as_ref().unwrap().code, OK);
        let ok = ok_response(&r);
        assert_eq!(ok.headers.len(), 4);
        assert!(
            ok.headers
                .iter()
                .all(|h| h.append_action == i32::from(HeaderAppendAction::OverwriteIfExistsOrAdd))
        );
        assert_eq!(
            ok.headers_to_remove,
            [
                "x-tally-extra",
                "authorization",
                "dpop",
                "workload-identity-token",
                "workload-proof-token"
            ]
        );
        let passing = admitted(ours(), &[], true);
        assert!(ok_response(&passing).headers_to_remove.is_empty());
        let mut bad = ours();
        bad[2].1 = "a\nb".into();
        let r = admitted(bad, &[], true);
        assert_eq!(
            ok_response(&r).headers_to_remove,
            ["x-tally-token-id"],
            "a value no header may hold is removed, never left to the caller"
        );
    }
}
