//! The HTTPS listener: the OAuth 2.0 token endpoint (client credentials
//! with DPoP, RFC 9449; client authentication by the caller's X.509-SVID,
//! RFC 8705 `tls_client_auth`), token introspection (RFC 7662) and
//! revocation (RFC 7009) for admins and each token's own holder, the
//! JWKS, and the RFC 8414 metadata.
//!
//! The JWKS and metadata are readable without a client certificate; the
//! token endpoint requires one. Errors are RFC 6749 §5.2 JSON, mapped in
//! one place ([`oauth_error`]).

use crate::auth::answer::safe_description;
use crate::broker::Broker;
use crate::broker::state::denials::{Call, CallerError};
use crate::broker::state::issue::{IssueError, IssueInput};
use crate::dpop::NormalizedUri;
use crate::http::{AfterRequest, Body, Peer, json, read_body};
use crate::identity::SpiffeId;
use crate::token::{Audience, Scope, Scopes, TokenKind};
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use serde_json::json;
use std::sync::Arc;

/// Largest token request body read.
const MAX_FORM: usize = 8 * 1024;

/// Paths served.
pub const TOKEN_PATH: &str = "/oauth2/token";
/// RFC 7662 token introspection.
pub const INTROSPECT_PATH: &str = "/oauth2/introspect";
/// RFC 7009 token revocation.
pub const REVOKE_PATH: &str = "/oauth2/revoke";
/// JWKS path.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";
/// RFC 8414 metadata path.
pub const METADATA_PATH: &str = "/.well-known/oauth-authorization-server";

/// The OAuth endpoints of one broker.
#[derive(Debug)]
pub struct OAuth {
    broker: Arc<Broker>,
    /// The DPoP `htu` of the token endpoint.
    token_uri: NormalizedUri,
}

impl OAuth {
    /// The endpoints under `broker`'s issuer URL.
    ///
    /// # Errors
    /// If the issuer and [`TOKEN_PATH`] do not make a URL.
    pub fn new(broker: Arc<Broker>) -> Result<Self, String> {
        let issuer = broker.issuer().trim_end_matches('/');
        let token_uri = NormalizedUri::parse(&format!("{issuer}{TOKEN_PATH}"))
            .map_err(|e| format!("issuer {issuer:?}: {e}"))?;
        Ok(Self { broker, token_uri })
    }
}

/// Answers one request on the HTTPS listener. A refusal decided before
/// the body was read (no client certificate) must still reach an HTTP/2
/// client as an answer, not a reset stream: the rest of a body within
/// [`MAX_FORM`] is read first, so the exchange ends cleanly; a bigger one
/// is kept unread until the answer is out (see [`AfterRequest`]).
pub async fn handle(
    oauth: Arc<OAuth>,
    req: Request<Incoming>,
    peer: Arc<Peer>,
) -> Response<AfterRequest<Body>> {
    let (parts, mut body) = req.into_parts();
    let response = answer(&oauth, Request::from_parts(parts, &mut body), &peer).await;
    crate::http::drain(&mut body, MAX_FORM).await;
    response.map(|answer| AfterRequest::new(answer, body))
}

async fn answer(oauth: &OAuth, req: Request<&mut Incoming>, peer: &Peer) -> Response<Body> {
    let broker = &oauth.broker;
    match (req.method(), req.uri().path()) {
        (&Method::POST, TOKEN_PATH) => token(broker, &oauth.token_uri, req, peer).await,
        (&Method::POST, INTROSPECT_PATH) => introspect(broker, req, peer)
            .await
            .unwrap_or_else(OAuthError::into_response),
        (&Method::POST, REVOKE_PATH) => revoke(broker, req, peer)
            .await
            .unwrap_or_else(OAuthError::into_response),
        (&Method::GET | &Method::HEAD, JWKS_PATH) => {
            let mut r = json(StatusCode::OK, &broker.jwks().to_json());
            // Verifiers refetch on an unknown kid anyway; a short cache
            // keeps rotations quick to reach them.
            r.headers_mut().insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("max-age=60"),
            );
            r
        }
        (&Method::GET | &Method::HEAD, METADATA_PATH) => json(StatusCode::OK, &metadata(oauth)),
        (_, TOKEN_PATH | INTROSPECT_PATH | REVOKE_PATH) => not_allowed("POST"),
        (_, JWKS_PATH | METADATA_PATH) => not_allowed("GET, HEAD"),
        _ => json(
            StatusCode::NOT_FOUND,
            &json!({"error": "not_found", "error_description": "no such endpoint"}),
        ),
    }
}

fn not_allowed(allow: &'static str) -> Response<Body> {
    let mut r = json(
        StatusCode::METHOD_NOT_ALLOWED,
        &json!({"error": "invalid_request", "error_description": format!("method not allowed; use {allow}")}),
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// RFC 8414 authorization server metadata.
fn metadata(oauth: &OAuth) -> serde_json::Value {
    let broker = &oauth.broker;
    let issuer = broker.issuer().trim_end_matches('/');
    json!({
        "issuer": issuer,
        "token_endpoint": oauth.token_uri.as_str(),
        "introspection_endpoint": format!("{issuer}{INTROSPECT_PATH}"),
        "introspection_endpoint_auth_methods_supported": ["tls_client_auth"],
        "revocation_endpoint": format!("{issuer}{REVOKE_PATH}"),
        "revocation_endpoint_auth_methods_supported": ["tls_client_auth"],
        "jwks_uri": format!("{issuer}{JWKS_PATH}"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["tls_client_auth"],
        "dpop_signing_alg_values_supported": ["ES256"],
        // Tokens are bound to the DPoP key (cnf.jkt), not to the client
        // certificate (cnf.x5t#S256).
        "tls_client_certificate_bound_access_tokens": false,
        "token_endpoint_dpop_nonce_required": broker.settings().token_endpoint_nonce,
        // The DPoP htu for the gRPC Tokens.Issue call.
        "tally_grpc_issue_htu": broker.issue_uri(),
    })
}

/// An RFC 6749 §5.2 error answer.
#[derive(Debug)]
struct OAuthError {
    status: StatusCode,
    code: &'static str,
    description: String,
    nonce: Option<String>,
    retry_after: Option<u64>,
}

impl OAuthError {
    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            code,
            description: description.into(),
            nonce: None,
            retry_after: None,
        }
    }

    fn invalid_request(description: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", description)
    }

    /// A fault inside the broker: logged with `what`, answered as
    /// "internal error".
    fn internal(what: &str, e: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %e, "{what} failed");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal error",
        )
    }

    fn into_response(self) -> Response<Body> {
        let mut r = json(
            self.status,
            &json!({"error": self.code, "error_description": safe_description(&self.description)}),
        );
        let headers = r.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Some(nonce) = self.nonce.and_then(|n| HeaderValue::from_str(&n).ok()) {
            headers.insert("dpop-nonce", nonce);
        }
        if let Some(v) = self
            .retry_after
            .and_then(|s| HeaderValue::from_str(&s.to_string()).ok())
        {
            headers.insert(header::RETRY_AFTER, v);
        }
        r
    }
}

/// The one mapping from issuance refusals to OAuth errors.
fn oauth_error(broker: &Broker, e: &IssueError) -> OAuthError {
    let text = e.to_string();
    match e {
        IssueError::Proof(p) if p.wants_nonce() => OAuthError {
            nonce: Some(broker.dpop_nonce()),
            ..OAuthError::new(StatusCode::BAD_REQUEST, "use_dpop_nonce", text)
        },
        IssueError::Proof(_) => {
            OAuthError::new(StatusCode::BAD_REQUEST, "invalid_dpop_proof", text)
        }
        IssueError::Denied(crate::policy::IssueDenial::NoRule { .. }) => {
            OAuthError::new(StatusCode::BAD_REQUEST, "unauthorized_client", text)
        }
        IssueError::Denied(_) => OAuthError::new(StatusCode::BAD_REQUEST, "invalid_scope", text),
        IssueError::RateLimited { retry_after, .. } => OAuthError {
            retry_after: Some(*retry_after),
            ..OAuthError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "temporarily_unavailable",
                text,
            )
        },
        IssueError::Busy => OAuthError {
            retry_after: Some(1),
            ..OAuthError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                text,
            )
        },
        IssueError::Internal => OAuthError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "internal error",
        ),
    }
}

async fn token(
    broker: &Broker,
    token_uri: &NormalizedUri,
    req: Request<&mut Incoming>,
    peer: &Peer,
) -> Response<Body> {
    match token_checked(broker, token_uri, req, peer).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// The client's SPIFFE ID from its certificate (RFC 8705 §2.1.2: the
/// client is identified by the SAN of a certificate that chains to our
/// bundle, which the TLS layer has checked). A denied identity fails
/// client authentication (RFC 6749 §5.2 `invalid_client`), counted and
/// audited as a refusal of `call`.
async fn client_id(broker: &Broker, peer: &Peer, call: Call) -> Result<SpiffeId, OAuthError> {
    let checked = broker.caller(peer.certs.as_deref());
    if let Err(CallerError::Denied { id }) = &checked {
        broker.refuse_denied(id, call).await;
    }
    checked
        .map_err(|why| OAuthError::new(StatusCode::UNAUTHORIZED, "invalid_client", why.to_string()))
}

/// Refuses a body that is not a form (RFC 6749 §3.2, RFC 7662 §2.1, RFC
/// 7009 §2.1).
fn require_form<B>(req: &Request<B>) -> Result<(), OAuthError> {
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase());
    if content_type.as_deref() == Some("application/x-www-form-urlencoded") {
        Ok(())
    } else {
        Err(OAuthError::invalid_request(
            "the body must be application/x-www-form-urlencoded",
        ))
    }
}

/// The parameters of a token request, each at most once.
#[derive(Debug, Default)]
struct TokenForm {
    grant_type: Option<String>,
    scope: Option<String>,
    audience: Option<String>,
    resource: Option<String>,
    client_id: Option<String>,
}

fn parse_form(body: &[u8]) -> Result<TokenForm, OAuthError> {
    let mut form = TokenForm::default();
    for (name, value) in form_urlencoded::parse(body) {
        let slot = match name.as_ref() {
            "grant_type" => &mut form.grant_type,
            "scope" => &mut form.scope,
            "audience" => &mut form.audience,
            "resource" => &mut form.resource,
            "client_id" => &mut form.client_id,
            // RFC 6749 §3.2: unrecognized parameters are ignored.
            _ => continue,
        };
        if slot.is_some() {
            // RFC 6749 §3.2: parameters must not be included more than once.
            return Err(OAuthError::invalid_request(format!(
                "parameter {name} is repeated"
            )));
        }
        *slot = Some(value.into_owned());
    }
    Ok(form)
}

async fn token_checked(
    broker: &Broker,
    token_uri: &NormalizedUri,
    req: Request<&mut Incoming>,
    peer: &Peer,
) -> Result<Response<Body>, OAuthError> {
    let caller = client_id(broker, peer, Call::OAuthToken).await?;
    require_form(&req)?;
    let mut proofs = req.headers().get_all("dpop").iter();
    let proof = match (proofs.next(), proofs.next()) {
        (Some(p), None) => p
            .to_str()
            .map_err(|_| {
                OAuthError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_dpop_proof",
                    "DPoP header is not ASCII",
                )
            })?
            .to_owned(),
        (None, _) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_dpop_proof",
                "a DPoP header with a proof for this request is required",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_dpop_proof",
                "exactly one DPoP header is allowed",
            ));
        }
    };
    let body = read_body(req.into_body(), MAX_FORM)
        .await
        .map_err(|e| OAuthError::invalid_request(e.to_string()))?;
    let form = parse_form(&body)?;

    match form.grant_type.as_deref() {
        Some("client_credentials") => {}
        Some(other) => {
            return Err(OAuthError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                format!("grant_type {other} is not supported; use client_credentials"),
            ));
        }
        None => return Err(OAuthError::invalid_request("grant_type is required")),
    }
    if let Some(id) = &form.client_id
        && id != caller.as_str()
    {
        return Err(OAuthError::new(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            format!("client_id {id} does not match the client certificate ({caller})"),
        ));
    }
    let audience_text = match (&form.audience, &form.resource) {
        (Some(a), Some(r)) if a != r => {
            return Err(OAuthError::invalid_request(
                "audience and resource name different targets; send one",
            ));
        }
        (Some(a), _) | (None, Some(a)) => a,
        (None, None) => {
            return Err(OAuthError::invalid_request(
                "audience (or resource) is required",
            ));
        }
    };
    let audience: Audience = audience_text.parse().map_err(|e| {
        OAuthError::new(
            StatusCode::BAD_REQUEST,
            "invalid_target",
            format!("audience: {e}"),
        )
    })?;
    let scopes = form
        .scope
        .as_deref()
        .unwrap_or("")
        .split(' ')
        .filter(|s| !s.is_empty())
        .map(str::parse::<Scope>)
        .collect::<Result<Vec<_>, _>>()
        .and_then(Scopes::new)
        .map_err(|e| {
            OAuthError::new(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                format!("scope: {e}"),
            )
        })?;

    let pod = broker.caller_pod(peer.certs.as_deref()).await;
    let issued = broker
        .issue(&IssueInput {
            caller: &caller,
            audience: &audience,
            scopes: &scopes,
            ttl: None,
            proof: &proof,
            htu: token_uri,
            require_nonce: broker.settings().token_endpoint_nonce,
            via: "oauth",
            pod: pod.as_ref(),
        })
        .await
        .map_err(|e| oauth_error(broker, &e))?;
    let now = broker.now();
    let mut r = json(
        StatusCode::OK,
        &json!({
            "access_token": issued.token.expose(),
            "token_type": "DPoP",
            "expires_in": issued.claims.exp.saturating_sub(now),
            "scope": issued.claims.scope.to_string(),
        }),
    );
    let headers = r.headers_mut();
    // RFC 6749 §5.1: token responses are never cached.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    if broker.settings().token_endpoint_nonce
        && let Ok(nonce) = HeaderValue::from_str(&broker.dpop_nonce())
    {
        // The nonce for the client's next request (RFC 9449 §8.2).
        headers.insert("dpop-nonce", nonce);
    }
    Ok(r)
}

/// The `token` parameter of an introspection or revocation request
/// (`token_type_hint` is accepted and, with one kind of token, ignored).
async fn token_param(
    req: Request<&mut Incoming>,
) -> Result<zeroize::Zeroizing<String>, OAuthError> {
    require_form(&req)?;
    let body = read_body(req.into_body(), MAX_FORM)
        .await
        .map_err(|e| OAuthError::invalid_request(e.to_string()))?;
    let mut token = None;
    for (name, value) in form_urlencoded::parse(&body) {
        if name == "token" {
            if token.is_some() {
                return Err(OAuthError::invalid_request("parameter token is repeated"));
            }
            token = Some(zeroize::Zeroizing::new(value.into_owned()));
        }
    }
    token.ok_or_else(|| OAuthError::invalid_request("the token parameter is required"))
}

/// The authenticated caller, and the token the request names if this
/// broker issued it and it is live (not expired, not revoked, its holder
/// not denied: every sidecar refuses it).
async fn live_token(
    broker: &Broker,
    req: Request<&mut Incoming>,
    peer: &Peer,
    call: Call,
) -> Result<(SpiffeId, Option<crate::store::IssuedToken>), OAuthError> {
    let what = call.as_str();
    let caller = client_id(broker, peer, call).await?;
    let token = token_param(req).await?;
    let found = broker
        .find_token(&token)
        .await
        .map_err(|e| OAuthError::internal(what, &e))?;
    let now = broker.now();
    let denied = |t: &crate::store::IssuedToken| broker.is_denied(&t.sub);
    let live = found.and_then(|(t, revoked)| (!revoked && t.exp > now && !denied(&t)).then_some(t));
    Ok((caller, live))
}

/// Admins may see and revoke any token; a workload, its own.
fn may_manage(broker: &Broker, caller: &SpiffeId, token: &crate::store::IssuedToken) -> bool {
    broker.is_admin(caller) || token.sub == *caller
}

/// `POST /oauth2/introspect` (RFC 7662): for an admin, or the token's own
/// holder, the token's metadata; `{"active": false}` for anything else
/// (unknown, forged, expired, revoked, a denied holder's, or someone
/// else's token), so the endpoint tells a stranger nothing.
async fn introspect(
    broker: &Broker,
    req: Request<&mut Incoming>,
    peer: &Peer,
) -> Result<Response<Body>, OAuthError> {
    let (caller, live) = live_token(broker, req, peer, Call::Introspect).await?;
    let answer = match live {
        // Only access tokens: a JWT-SVID (bearer, no cnf) must never be
        // described as one, so it is inactive here as a stranger's is.
        Some(t) if may_manage(broker, &caller, &t) && t.kind == TokenKind::Access => {
            let aud: Vec<&str> = t.aud.iter().map(Audience::as_str).collect();
            json!({
                "active": true,
                "iss": broker.issuer(),
                "sub": t.sub.as_str(),
                "client_id": t.sub.as_str(),
                "aud": aud.join(" "),
                "scope": t.scope.to_string(),
                "iat": t.iat,
                "exp": t.exp,
                "jti": t.jti,
                "token_type": "DPoP",
                "cnf": {"jkt": t.jkt.map(|k| k.to_string()).unwrap_or_default()},
                "tcl": t.class.as_str(),
            })
        }
        _ => json!({"active": false}),
    };
    let mut r = json(StatusCode::OK, &answer);
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

/// `POST /oauth2/revoke` (RFC 7009): an admin or the token's own holder
/// revokes it (durably, then on Watch to every sidecar). Everything else
/// is answered exactly as an invalid token is (RFC 7009 §2.2: 200, empty
/// body): an unknown, forged, expired or revoked token, and someone else's
/// live token, which stays live. To anyone but its holder and the admins,
/// another workload's token is no token at all, so the endpoint cannot
/// tell a stranger which tokens exist (§2.1's refusal for a token issued
/// to another client would). The attempt is audited, not answered.
async fn revoke(
    broker: &Arc<Broker>,
    req: Request<&mut Incoming>,
    peer: &Peer,
) -> Result<Response<Body>, OAuthError> {
    let (caller, live) = live_token(broker, req, peer, Call::OAuthRevoke).await?;
    match live {
        Some(t) if may_manage(broker, &caller, &t) => {
            broker
                .revoke(
                    crate::token::RevocationTarget::Jti(t.jti),
                    None,
                    "revoked through /oauth2/revoke",
                    &caller,
                )
                .await
                .map_err(|e| OAuthError::internal("revocation", &e))?;
        }
        Some(t) => {
            tracing::warn!(%caller, jti = %t.jti, "a workload tried to revoke another's token");
            let event = crate::audit::AuditEvent::new(
                crate::audit::AuditKind::Revoke,
                crate::audit::Outcome::Denied,
                broker.now(),
            )
            .actor(&caller)
            .field("jti", t.jti.as_str())
            .field("reason", "not the token's holder or an admin")
            .field("via", "oauth");
            // Recorded off the answer's path: waiting for the commit would
            // make this answer slower than an unknown token's.
            let broker = Arc::clone(broker);
            tokio::spawn(async move { broker.audit(event).await });
        }
        None => {}
    }
    let mut r = Response::new(Body::default());
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_parameter_is_refused() {
        let e = parse_form(b"grant_type=client_credentials&scope=a&scope=b").unwrap_err();
        assert_eq!(e.code, "invalid_request");
        assert!(e.description.contains("scope is repeated"), "{e:?}");
    }

    #[test]
    fn unknown_parameters_are_ignored_and_values_decoded() {
        let f = parse_form(
            b"grant_type=client_credentials&foo=1&scope=a%3Ab+c&audience=spiffe%3A%2F%2Ftd%2Fx",
        )
        .unwrap();
        assert_eq!(f.scope.as_deref(), Some("a:b c"));
        assert_eq!(f.audience.as_deref(), Some("spiffe://td/x"));
    }
}
