//! The outbound proxy: an HTTP forward proxy for `http://` requests (the
//! app sets `HTTP_PROXY`). For a host in the service map it attaches
//! `Authorization: DPoP …` and a fresh proof for that exact request, and
//! on a `401` asking for a nonce (`use_dpop_nonce`) retries once with it
//! and remembers it for the origin. Hosts not in the map pass through
//! without a token, or are refused when the proxy is strict.
//!
//! - A destination whose service-map entry says `mtls` (the default for a
//!   workload's SPIFFE ID) is reached over mutual TLS and HTTP/2 through
//!   [`super::mesh_client`]: the server must prove that SPIFFE ID in the
//!   handshake before anything is sent (else 502, and no request at all).
//!   A token bound to this sidecar's SVID key then goes without a `DPoP`
//!   proof, since the handshake proved possession; one bound to an older
//!   key carries a proof for `https://host:port/path` signed with it.
//! - `CONNECT host:port` opens a TCP tunnel and passes bytes through
//!   untouched (TLS to the destination stays end to end; no token is
//!   added: the proxy cannot see inside).
//! - A request that already carries `Authorization` is forwarded as is.
//! - Strict (`--outbound-strict`): a destination outside the service map
//!   is refused (403), a `CONNECT` too, with or without credentials.
//! - Only the uids on the sidecar's allow-list (`--allow-uid`) may use the
//!   proxy: the caller's uid is read from the kernel's socket table (see
//!   [`crate::http::peer_uid`]); anyone else gets 403 naming their uid.
//! - The app picks scopes with `x-tally-scope: a b` (removed before
//!   forwarding); without it, the token carries what the policy grants.
//! - The nonce retry resends the body, so it needs the body in memory: only
//!   bodies up to [`RETRY_BODY_LIMIT`] with a `Content-Length` are held for
//!   it. Larger or streamed bodies go out once; the nonce is still
//!   remembered, so the next request carries it.

use super::api::{
    Destination, LocalApi, MeshHeaders, Proof, RequestHeaders, WimseHeaders, origin_of,
};
use super::cache::FetchTokens;
use super::mesh_client::{DialError, MeshClient};
use super::mtls::MeshTls;
use super::proxy::{self, NextHop, ProxyBody};
use crate::auth::credentials::{TXN_TOKEN_HEADER, WIT_HEADER, WPT_HEADER};
use crate::dpop::NormalizedUri;
use crate::identity::SpiffeId;
use crate::metrics::CounterVec;
use crate::token::{Audience, Scope, Scopes};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::Duration;

/// Largest body held in memory so a nonce retry can resend it.
pub const RETRY_BODY_LIMIT: u64 = 64 * 1024;

/// Lets the app choose scopes for a request (never forwarded).
pub const SCOPE: HeaderName = HeaderName::from_static("x-tally-scope");

/// Outbound proxy settings.
#[derive(Debug, Clone)]
pub struct OutboundConfig {
    /// Refuse hosts that are not in the service map (else pass them
    /// through without a token).
    pub strict: bool,
    /// How long a destination may take to connect and answer with headers.
    pub timeout: Duration,
    /// Largest request body forwarded.
    pub max_body: u64,
    /// How long an idle mutual-TLS connection to a mesh destination is
    /// kept.
    pub pool_idle: Duration,
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            strict: false,
            timeout: Duration::from_secs(30),
            max_body: 16 * 1024 * 1024,
            pool_idle: Duration::from_secs(90),
        }
    }
}

/// The outbound proxy. Share it behind an `Arc`.
pub struct Outbound<F: FetchTokens> {
    api: Arc<LocalApi<F>>,
    config: OutboundConfig,
    next_hop: NextHop,
    /// Mutual-TLS connections to mesh destinations.
    mesh: Arc<MeshClient>,
    /// Requests by result.
    requests: CounterVec,
}

impl<F: FetchTokens> std::fmt::Debug for Outbound<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbound")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// The request as it will be sent, with its body either held (so it can
/// be sent twice) or streamed (once).
enum Outgoing {
    Held(Bytes),
    Streamed(ProxyBody),
}

impl Outgoing {
    /// The body for one attempt: a copy of a held one, else the stream
    /// (leaving an empty body behind).
    fn take(&mut self) -> Self {
        match self {
            Self::Held(bytes) => Self::Held(bytes.clone()),
            Self::Streamed(_) => std::mem::replace(self, Self::Held(Bytes::new())),
        }
    }
}

impl<F: FetchTokens> Outbound<F> {
    /// The proxy, taking tokens, proofs, the service map and nonces from
    /// the local API's state, and its TLS identity for mesh destinations
    /// from `tls`.
    pub fn new(api: Arc<LocalApi<F>>, config: OutboundConfig, tls: Arc<MeshTls>) -> Arc<Self> {
        Arc::new(Self {
            next_hop: proxy::next_hop(config.timeout),
            mesh: MeshClient::new(tls, config.timeout, config.pool_idle),
            api,
            config,
            requests: CounterVec::new(
                "tally_sidecar_outbound_requests_total",
                "Outbound proxy requests by result.",
                &["result"],
            ),
        })
    }

    /// The pool of mutual-TLS connections to mesh destinations.
    pub fn mesh(&self) -> &Arc<MeshClient> {
        &self.mesh
    }

    /// Appends the proxy's metrics in Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        self.requests.render(out);
    }

    /// Handles one proxied request from `peer`.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<crate::http::Peer>,
    ) -> Response<ProxyBody> {
        let (result, response) = if let Err(e) = self.api.admit(&peer, "outbound proxy") {
            // Anything sent here leaves signed as this workload: only the
            // uids the local socket serves may send it.
            tracing::debug!(uid = ?peer.uid, "outbound proxy refused a caller by uid");
            (
                "refused_uid",
                proxy::refusal(e.status, e.code, &e.description),
            )
        } else if req.method() == Method::CONNECT {
            self.connect(req, peer).await
        } else {
            self.forward(req).await
        };
        self.requests.inc(&[result]);
        response
    }

    async fn forward(&self, req: Request<Incoming>) -> (&'static str, Response<ProxyBody>) {
        let refuse = |status, code, text: &str| ("refused", proxy::refusal(status, code, text));
        let (mut parts, body) = req.into_parts();
        if parts.uri.scheme_str() != Some("http") || parts.uri.authority().is_none() {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "this is a forward proxy for http:// URLs: send the absolute URL (HTTP_PROXY); https goes through CONNECT",
            );
        }
        let url = parts.uri.to_string();
        let scopes = match scopes_from(&parts.headers) {
            Ok(s) => s,
            Err(why) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", &why),
        };
        // A WIMSE proof binds the app's Txn-Token (`tth`); the verifier
        // refuses one the WPT does not bind.
        let txn = match txn_token_of(&parts.headers) {
            Ok(t) => t,
            Err(why) => return refuse(StatusCode::BAD_REQUEST, "invalid_request", why),
        };
        parts.headers.remove(&SCOPE);
        proxy::strip_hop_by_hop(&mut parts.headers);
        // RFC 9112 §3.2.2: a proxy replaces `Host` with the target's
        // authority, which is also what a proof names.
        if let Some(host) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, host);
        }
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if length.is_some_and(|len| len > self.config.max_body) {
            return refuse(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                &format!("the body is larger than {} bytes", self.config.max_body),
            );
        }

        let destination = self.api.services().destination_for(&url).cloned();
        let mapped = destination.is_some();
        let proof = destination.as_ref().map_or(Proof::Dpop, Destination::proof);
        let signed = mapped && !parts.headers.contains_key(header::AUTHORIZATION);
        if let Some(server) = destination.as_ref().and_then(|d| d.mtls()) {
            // A mesh destination gets nothing in clear, not even
            // credentials the app made itself.
            let audience = destination
                .as_ref()
                .map(|d| d.audience())
                .filter(|_| signed);
            return self
                .forward_mtls(
                    parts,
                    body,
                    server,
                    audience,
                    &Credentials {
                        scopes: &scopes,
                        proof,
                        txn,
                    },
                )
                .await;
        }
        let Some(audience) = destination.map(|d| d.audience().clone()).filter(|_| signed) else {
            // Strict: nothing reaches a destination outside the service
            // map, whatever credentials the app put on it itself.
            if self.config.strict && !mapped {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "access_denied",
                    "the destination host is not in the service map and this proxy is strict",
                );
            }
            let out = Outgoing::Streamed(self.stream(body));
            return match self.send(&parts, out).await {
                Ok(response) => ("passed_through", response),
                Err(response) => ("upstream_error", response),
            };
        };
        let htu = match NormalizedUri::parse(&url) {
            Ok(htu) => htu,
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &format!("URL: {e}"),
                );
            }
        };
        let origin = origin_of(htu.as_str());
        let method = parts.method.as_str().to_owned();

        let Some(mut outgoing) = self.hold(body).await else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "reading the request body failed",
            );
        };

        for attempt in 0..2 {
            let set = match proof {
                Proof::Dpop => self
                    .api
                    .headers_for(&method, &htu, &audience, &scopes)
                    .await
                    .map(|h| set_credentials(&mut parts.headers, &h)),
                Proof::Wimse => self
                    .api
                    .wimse_headers_for(&htu, wimse_token(&audience, &scopes), txn.as_deref())
                    .await
                    .map(|h| set_wimse_credentials(&mut parts.headers, &h)),
            };
            if let Err(e) = set {
                return ("no_token", proxy::refusal(e.status, e.code, &e.description));
            }
            let this = outgoing.take();
            let retry_possible = matches!(this, Outgoing::Held(_)) && attempt == 0;
            let response = match self.send(&parts, this).await {
                Ok(r) => r,
                Err(r) => return ("upstream_error", r),
            };
            let nonce = response
                .headers()
                .get("dpop-nonce")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(nonce) = &nonce {
                self.api.remember_nonce(&origin, nonce);
            }
            if retry_possible && nonce.is_some() && asks_for_nonce(&response) {
                continue;
            }
            return ("signed", response);
        }
        unreachable!("the second attempt always returns")
    }

    /// Holds a small body of known length (none, or a Content-Length) so a
    /// retry can resend it; a chunked or large one is streamed once.
    async fn hold(&self, body: Incoming) -> Option<Outgoing> {
        let holdable = hyper::body::Body::size_hint(&body)
            .exact()
            .is_some_and(|len| len <= RETRY_BODY_LIMIT);
        if !holdable {
            return Some(Outgoing::Streamed(self.stream(body)));
        }
        let limit = usize::try_from(RETRY_BODY_LIMIT).unwrap_or(usize::MAX);
        let collected = Limited::new(body, limit).collect().await.ok()?;
        Some(Outgoing::Held(collected.to_bytes()))
    }

    /// A streamed body, cut off past the largest body forwarded.
    fn stream(&self, body: Incoming) -> ProxyBody {
        let limit = usize::try_from(self.config.max_body).unwrap_or(usize::MAX);
        Limited::new(body, limit).boxed_unsync()
    }

    /// Sends the request to its destination.
    async fn send(
        &self,
        parts: &http::request::Parts,
        body: Outgoing,
    ) -> Result<Response<ProxyBody>, Response<ProxyBody>> {
        let request = build(parts, body, http::Version::HTTP_11).map_err(|_| cannot_forward())?;
        match tokio::time::timeout(self.config.timeout, self.next_hop.request(request)).await {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                proxy::strip_hop_by_hop(&mut parts.headers);
                Ok(Response::from_parts(parts, proxy::stream(body)))
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "outbound destination did not answer");
                Err(proxy::refusal(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    "the destination did not answer",
                ))
            }
            Err(_) => Err(proxy::refusal(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the destination did not answer in time",
            )),
        }
    }
}

impl<F: FetchTokens> Outbound<F> {
    /// A request to a mesh destination, over mutual TLS and HTTP/2: the
    /// server at the address must prove it is `server` before anything is
    /// sent. `audience` is `None` when the app brought its own
    /// credentials (they go as they are, but never in clear).
    async fn forward_mtls(
        &self,
        mut parts: http::request::Parts,
        body: Incoming,
        server: &SpiffeId,
        audience: Option<&Audience>,
        credentials: &Credentials<'_>,
    ) -> (&'static str, Response<ProxyBody>) {
        let Credentials { scopes, proof, txn } = credentials;
        let refuse = |status, code, text: &str| ("refused", proxy::refusal(status, code, text));
        let Some(authority) = parts.uri.authority().cloned() else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the URL has no host",
            );
        };
        let dial = match authority.port_u16() {
            Some(_) => authority.to_string(),
            None => format!("{authority}:80"),
        };
        // The destination's inbound port sees the request over TLS, so a
        // proof names `https://` with the same authority and path; the
        // port is written out (`http://pay.svc/` is port 80, which over
        // TLS would otherwise read as 443).
        let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let Ok(uri) = format!("https://{dial}{path}").parse::<http::Uri>() else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the URL cannot be forwarded",
            );
        };
        let htu = match NormalizedUri::parse(&uri.to_string()) {
            Ok(htu) => htu,
            Err(e) => {
                let text = format!("URL: {e}");
                return refuse(StatusCode::BAD_REQUEST, "invalid_request", &text);
            }
        };
        parts.uri = uri;
        // `Host` names the same authority as the URI, port and all (the
        // inbound proxy refuses a request whose two disagree).
        if let Ok(host) = HeaderValue::from_str(&dial) {
            parts.headers.insert(header::HOST, host);
        }
        let origin = origin_of(htu.as_str());
        let method = parts.method.as_str().to_owned();
        let Some(mut outgoing) = self.hold(body).await else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "reading the request body failed",
            );
        };
        let (mut nonce_retried, mut resent) = (false, false);
        loop {
            // The handshake comes first: no token is even fetched for a
            // server that does not prove it is `server`.
            let mut lease = match self.mesh.lease(&dial, server).await {
                Ok(lease) => lease,
                Err(e) => return dial_refusal(&e),
            };
            if let Some(audience) = audience {
                let set = match *proof {
                    Proof::Dpop => self
                        .api
                        .mesh_headers_for(&method, &htu, audience, scopes, lease.jkt())
                        .await
                        .map(|h| set_mesh_credentials(&mut parts.headers, &h)),
                    Proof::Wimse => self
                        .api
                        .wimse_headers_for(&htu, wimse_token(audience, scopes), txn.as_deref())
                        .await
                        .map(|h| set_wimse_credentials(&mut parts.headers, &h)),
                };
                if let Err(e) = set {
                    return ("no_token", proxy::refusal(e.status, e.code, &e.description));
                }
            }
            let this = outgoing.take();
            let held = matches!(this, Outgoing::Held(_));
            let request = match build(&parts, this, http::Version::HTTP_2) {
                Ok(r) => r,
                Err(_) => return ("refused", cannot_forward()),
            };
            let response = match tokio::time::timeout(self.config.timeout, lease.send(request))
                .await
            {
                Ok(Ok(response)) => response,
                Ok(Err(mut e)) => {
                    // Never written: the pooled connection closed (GOAWAY,
                    // the server went away) between lease and send. Once
                    // more, on a new connection.
                    if let Some(returned) = e.take_message()
                        && !resent
                        && !lease.fresh()
                    {
                        resent = true;
                        if !held {
                            outgoing = Outgoing::Streamed(returned.into_body());
                        }
                        continue;
                    }
                    tracing::debug!(%server, error = %e.error(), "mesh destination did not answer");
                    let refusal = proxy::refusal(
                        StatusCode::BAD_GATEWAY,
                        "upstream_unavailable",
                        "the destination did not answer",
                    );
                    return ("upstream_error", refusal);
                }
                Err(_) => {
                    let refusal = proxy::refusal(
                        StatusCode::GATEWAY_TIMEOUT,
                        "upstream_timeout",
                        "the destination did not answer in time",
                    );
                    return ("upstream_error", refusal);
                }
            };
            let (mut head, body) = response.into_parts();
            proxy::strip_hop_by_hop(&mut head.headers);
            // The app's side of the proxy is HTTP/1.1.
            head.version = http::Version::HTTP_11;
            let response = Response::from_parts(head, proxy::stream(body));
            if audience.is_none() {
                return ("passed_through_mtls", response);
            }
            let nonce = response
                .headers()
                .get("dpop-nonce")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            if let Some(nonce) = &nonce {
                self.api.remember_nonce(&origin, nonce);
            }
            if held && !nonce_retried && nonce.is_some() && asks_for_nonce(&response) {
                nonce_retried = true;
                continue;
            }
            return ("signed_mtls", response);
        }
    }
}

/// The one mapping from a failed dial to the app's answer and the
/// metric's result label. The reason is logged, never sent to the app.
fn dial_refusal(e: &DialError) -> (&'static str, Response<ProxyBody>) {
    let (label, status, code, text) = match e {
        DialError::NotProven { expected, .. } => {
            // Someone else answers at a mesh destination's address:
            // worth an operator's attention.
            tracing::warn!(error = %e, "refused a mesh destination: nothing was sent");
            (
                "mtls_refused",
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                format!("the destination did not prove it is {expected}: nothing was sent"),
            )
        }
        DialError::Http2 { .. } => {
            tracing::warn!(error = %e, "a mesh destination did not speak HTTP/2: nothing was sent");
            (
                "mtls_refused",
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the destination did not speak HTTP/2 over mutual TLS: nothing was sent".into(),
            )
        }
        DialError::Unreachable { .. } => {
            tracing::debug!(error = %e, "mesh destination unreachable");
            (
                "upstream_error",
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the destination did not answer".into(),
            )
        }
        DialError::Timeout { .. } => {
            tracing::debug!(error = %e, "mesh destination too slow");
            (
                "upstream_error",
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the destination did not answer in time".into(),
            )
        }
        DialError::Credentials(_) => {
            tracing::error!(error = %e, "cannot dial a mesh destination");
            (
                "mtls_unavailable",
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal error: this sidecar has no usable TLS identity (see its log)".into(),
            )
        }
    };
    (label, proxy::refusal(status, code, &text))
}

/// The request to send: `parts`' method, URI and headers with `body`.
fn build(
    parts: &http::request::Parts,
    body: Outgoing,
    version: http::Version,
) -> Result<Request<ProxyBody>, http::Error> {
    let mut request = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(version);
    if let Some(headers) = request.headers_mut() {
        headers.clone_from(&parts.headers);
    }
    let body = match body {
        Outgoing::Held(bytes) => proxy::full(bytes),
        Outgoing::Streamed(body) => body,
    };
    request.body(body)
}

/// The answer when [`build`] fails.
fn cannot_forward() -> Response<ProxyBody> {
    proxy::refusal(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "the request cannot be forwarded",
    )
}

/// Scopes the app asked for in `x-tally-scope`, if any.
fn scopes_from(headers: &http::HeaderMap) -> Result<Scopes, String> {
    let Some(value) = headers.get(&SCOPE) else {
        return Ok(Scopes::default());
    };
    let text = value
        .to_str()
        .map_err(|_| "x-tally-scope is not text".to_owned())?;
    text.split(' ')
        .filter(|s| !s.is_empty())
        .map(str::parse::<Scope>)
        .collect::<Result<Vec<_>, _>>()
        .and_then(Scopes::new)
        .map_err(|e| format!("x-tally-scope: {e}"))
}

fn set_credentials(headers: &mut http::HeaderMap, values: &RequestHeaders) {
    if let (Ok(auth), Ok(dpop)) = (
        HeaderValue::from_str(&values.authorization),
        HeaderValue::from_str(&values.dpop),
    ) {
        headers.insert(header::AUTHORIZATION, auth);
        headers.insert("dpop", dpop);
    }
}

/// What the outbound proxy puts on a request to a mapped destination.
struct Credentials<'a> {
    /// The scopes the app asked for (`x-tally-scope`).
    scopes: &'a Scopes,
    /// DPoP or WIMSE.
    proof: Proof,
    /// The app's `Txn-Token`, for a WIMSE proof to bind.
    txn: Option<String>,
}

/// The app's `Txn-Token`, if it sent one (two are refused: a WPT binds
/// one).
fn txn_token_of(headers: &http::HeaderMap) -> Result<Option<String>, &'static str> {
    let mut values = headers.get_all(TXN_TOKEN_HEADER).iter();
    match (values.next(), values.next()) {
        (None, _) => Ok(None),
        (Some(one), None) => one
            .to_str()
            .map(|t| Some(t.trim().to_owned()))
            .map_err(|_| "the Txn-Token header is not text"),
        (Some(_), Some(_)) => Err("more than one Txn-Token header"),
    }
}

/// The access token a WIMSE request carries: one for the scopes the app
/// named (`x-tally-scope`), none when it named none (the WIT alone names
/// the caller).
fn wimse_token<'a>(
    audience: &'a Audience,
    scopes: &'a Scopes,
) -> Option<(&'a Audience, &'a Scopes)> {
    (!scopes.is_empty()).then_some((audience, scopes))
}

/// `Workload-Identity-Token`, `Workload-Proof-Token`, and `Authorization`
/// when a token goes along (never the app's own `DPoP` or
/// `Authorization` beside ours).
fn set_wimse_credentials(headers: &mut http::HeaderMap, values: &WimseHeaders) {
    headers.remove("dpop");
    headers.remove(header::AUTHORIZATION);
    let (Ok(wit), Ok(wpt)) = (
        HeaderValue::from_str(&values.wit),
        HeaderValue::from_str(&values.wpt),
    ) else {
        return;
    };
    headers.insert(WIT_HEADER, wit);
    headers.insert(WPT_HEADER, wpt);
    if let Some(auth) = values
        .authorization
        .as_deref()
        .and_then(|a| HeaderValue::from_str(a).ok())
    {
        headers.insert(header::AUTHORIZATION, auth);
    }
}

/// `Authorization`, and `DPoP` only when the token needs a proof on this
/// connection (an app's own `DPoP` header never rides along with ours).
fn set_mesh_credentials(headers: &mut http::HeaderMap, values: &MeshHeaders) {
    headers.remove("dpop");
    let Ok(auth) = HeaderValue::from_str(&values.authorization) else {
        return;
    };
    headers.insert(header::AUTHORIZATION, auth);
    if let Some(dpop) = values
        .dpop
        .as_deref()
        .and_then(|d| HeaderValue::from_str(d).ok())
    {
        headers.insert("dpop", dpop);
    }
}

/// A 401 whose challenge is `use_dpop_nonce` (RFC 9449 §8).
fn asks_for_nonce(response: &Response<ProxyBody>) -> bool {
    response.status() == StatusCode::UNAUTHORIZED
        && response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .any(|v| v.as_bytes().windows(14).any(|w| w == b"use_dpop_nonce"))
}

impl<F: FetchTokens> Outbound<F> {
    /// `CONNECT host:port`: a tunnel, unless the proxy is strict and the
    /// destination is not in the service map.
    async fn connect(
        &self,
        req: Request<Incoming>,
        peer: Arc<crate::http::Peer>,
    ) -> (&'static str, Response<ProxyBody>) {
        let mapped = req.uri().authority().is_some_and(|a| {
            self.api
                .services()
                .audience_for_authority(a.as_str())
                .is_some()
        });
        if self.config.strict && !mapped {
            let refusal = proxy::refusal(
                StatusCode::FORBIDDEN,
                "access_denied",
                "the CONNECT destination is not in the service map and this proxy is strict",
            );
            return ("refused", refusal);
        }
        tunnel(req, self.config.timeout, peer).await
    }
}

/// Answers `CONNECT host:port`: connects to the destination, then 200
/// and bytes copied both ways until either side closes or both are quiet
/// for the idle timeout (or 502 if the destination cannot be reached).
async fn tunnel(
    req: Request<Incoming>,
    timeout: Duration,
    peer: Arc<crate::http::Peer>,
) -> (&'static str, Response<ProxyBody>) {
    let Some(target) = req.uri().authority().map(|a| a.as_str().to_owned()) else {
        let refusal = proxy::refusal(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "CONNECT needs host:port",
        );
        return ("refused", refusal);
    };
    let mut server =
        match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&target)).await {
            Ok(Ok(s)) => s,
            _ => {
                tracing::debug!(%target, "CONNECT destination unreachable");
                let refusal = proxy::refusal(
                    StatusCode::BAD_GATEWAY,
                    "upstream_unavailable",
                    "the destination did not answer",
                );
                return ("upstream_error", refusal);
            }
        };
    let _ = server.set_nodelay(true);
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => u,
            Err(e) => {
                tracing::debug!(error = %e, "CONNECT upgrade failed");
                return;
            }
        };
        let mut client = hyper_util::rt::TokioIo::new(upgraded);
        // The tunnel keeps the connection's slot (`peer`) and ends when
        // neither side has sent anything for the idle timeout.
        let ended = crate::http::tunnel::join(&mut client, &mut server, peer.idle_timeout()).await;
        tracing::debug!(?ended, "CONNECT tunnel ended");
    });
    ("tunnel", Response::new(proxy::full(Bytes::new())))
}
