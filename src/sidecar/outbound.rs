//! The outbound proxy: an HTTP forward proxy for `http://` requests (the
//! app sets `HTTP_PROXY`). For a host in the service map it attaches
//! `Authorization: DPoP …` and a fresh proof for that exact request, and
//! on a `401` asking for a nonce (`use_dpop_nonce`) retries once with it
//! and remembers it for the origin. Hosts not in the map pass through
//! without a token, or are refused when the proxy is strict.
//!
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

use super::api::{LocalApi, RequestHeaders, origin_of};
use super::cache::Fetch;
use super::proxy::{self, NextHop, ProxyBody};
use crate::dpop::NormalizedUri;
use crate::metrics::CounterVec;
use crate::token::{Scope, Scopes};
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
}

impl Default for OutboundConfig {
    fn default() -> Self {
        Self {
            strict: false,
            timeout: Duration::from_secs(30),
            max_body: 16 * 1024 * 1024,
        }
    }
}

/// The outbound proxy. Share it behind an `Arc`.
pub struct Outbound<F> {
    api: Arc<LocalApi<F>>,
    config: OutboundConfig,
    next_hop: NextHop,
    /// Requests by result.
    requests: CounterVec,
}

impl<F> std::fmt::Debug for Outbound<F> {
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
    Streamed(Incoming),
}

impl<F: Fetch> Outbound<F> {
    /// The proxy, taking tokens, proofs, the service map and nonces from
    /// the local API's state.
    pub fn new(api: Arc<LocalApi<F>>, config: OutboundConfig) -> Arc<Self> {
        Arc::new(Self {
            next_hop: proxy::next_hop(config.timeout),
            api,
            config,
            requests: CounterVec::new(
                "tally_sidecar_outbound_requests_total",
                "Outbound proxy requests by result.",
                &["result"],
            ),
        })
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

        let audience = self.api.services().audience_for(&url).cloned();
        let mapped = audience.is_some();
        let signed = mapped && !parts.headers.contains_key(header::AUTHORIZATION);
        let Some(audience) = audience.filter(|_| signed) else {
            // Strict: nothing reaches a destination outside the service
            // map, whatever credentials the app put on it itself.
            if self.config.strict && !mapped {
                return refuse(
                    StatusCode::FORBIDDEN,
                    "access_denied",
                    "the destination host is not in the service map and this proxy is strict",
                );
            }
            let out = Outgoing::Streamed(body);
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

        // Hold small bodies of known length (none, or a Content-Length) so
        // a nonce retry can resend them; chunked bodies are streamed once.
        let holdable = hyper::body::Body::size_hint(&body)
            .exact()
            .is_some_and(|len| len <= RETRY_BODY_LIMIT);
        let mut outgoing = if holdable {
            let limit = usize::try_from(RETRY_BODY_LIMIT).unwrap_or(usize::MAX);
            match Limited::new(body, limit).collect().await {
                Ok(collected) => Outgoing::Held(collected.to_bytes()),
                Err(_) => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "reading the request body failed",
                    );
                }
            }
        } else {
            Outgoing::Streamed(body)
        };

        for attempt in 0..2 {
            let headers = match self
                .api
                .headers_for(&method, &htu, &audience, &scopes)
                .await
            {
                Ok(h) => h,
                Err(e) => return ("no_token", proxy::refusal(e.status, e.code, &e.description)),
            };
            set_credentials(&mut parts.headers, &headers);
            let this = match &outgoing {
                Outgoing::Held(bytes) => Outgoing::Held(bytes.clone()),
                Outgoing::Streamed(_) => {
                    std::mem::replace(&mut outgoing, Outgoing::Held(Bytes::new()))
                }
            };
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

    /// Sends the request to its destination.
    async fn send(
        &self,
        parts: &http::request::Parts,
        body: Outgoing,
    ) -> Result<Response<ProxyBody>, Response<ProxyBody>> {
        let mut request = Request::builder()
            .method(parts.method.clone())
            .uri(parts.uri.clone())
            .version(http::Version::HTTP_11);
        if let Some(headers) = request.headers_mut() {
            headers.clone_from(&parts.headers);
        }
        let limit = usize::try_from(self.config.max_body).unwrap_or(usize::MAX);
        let body = match body {
            Outgoing::Held(bytes) => proxy::full(bytes),
            Outgoing::Streamed(body) => Limited::new(body, limit).boxed_unsync(),
        };
        let request = request.body(body).map_err(|_| {
            proxy::refusal(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request cannot be forwarded",
            )
        })?;
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

/// A 401 whose challenge is `use_dpop_nonce` (RFC 9449 §8).
fn asks_for_nonce(response: &Response<ProxyBody>) -> bool {
    response.status() == StatusCode::UNAUTHORIZED
        && response
            .headers()
            .get_all(header::WWW_AUTHENTICATE)
            .iter()
            .any(|v| v.as_bytes().windows(14).any(|w| w == b"use_dpop_nonce"))
}

impl<F: Fetch> Outbound<F> {
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
