//! The inbound verifying proxy: every request is judged before the app
//! sees it, then streamed to the app with the caller's identity in
//! `x-tally-*` headers.
//!
//! A request is judged in three steps, each pure and shared with every
//! other front end: its target, parsed once ([`crate::auth::target`]: the
//! authority it addresses, the URL a proof must name, the normalized
//! path); the token core ([`RequestVerifier`](crate::auth::RequestVerifier): credentials, the access
//! token against the broker's JWKS with `aud` = this workload, the DPoP
//! proof against that URL and this token, replay); then the admission
//! verdict ([`crate::auth::verdict::judge`]) on what the Watch stream delivered:
//! revocations and denied identities, staleness (when the stream has been
//! down too long, `admin` tokens, or all with `deny_when_stale`, get
//! 503), the `access:` rules for this workload and the per-caller rate
//! limit of the rule that admitted it. Every refusal is answered through
//! the one mapping ([`crate::auth::answer::refusal_answer`]) and never reaches
//! the app.
//!
//! The URL a proof must name is `http://` + the request's `Host` (or
//! HTTP/2 `:authority`) + its path: what the caller addressed. The path
//! the rules match, and the path the app receives, is the normalized one
//! (dot segments removed, percent-encoding normalized), so the app never
//! routes a path other than the one the policy judged.
//!
//! An HTTP/1.1 protocol upgrade (WebSocket) is checked like any request:
//! the handshake carries the token and proof. When the app answers 101,
//! the two upgraded connections are joined byte for byte, until the token
//! that opened the tunnel expires or a revocation covers it; frames after
//! the handshake are the app's protocol, not checked here.

use super::gate::{Gate, GateConfig, Head, Hop};
use super::proxy::{self, NextHop, ProxyBody};
use crate::auth::HttpAnswer;
use crate::auth::credentials::{TXN_TOKEN_HEADER, WIT_HEADER, WPT_HEADER};
use crate::auth::target::{Scheme, TargetError};
use crate::auth::verdict::{Allowed, Refusal};
use crate::dpop::UriError;
use crate::metrics::{CounterVec, Histogram};
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set by the proxy for the app: the caller's SPIFFE ID.
pub const CALLER: HeaderName = HeaderName::from_static("x-tally-caller");
/// Set by the proxy for the app: the token's scopes, space separated.
pub const SCOPES: HeaderName = HeaderName::from_static("x-tally-scopes");
/// Set by the proxy for the app: the token's `jti`.
pub const TOKEN_ID: HeaderName = HeaderName::from_static("x-tally-token-id");
/// Set by the proxy for the app: how the caller reached it, `mtls` (TLS
/// with a verified mesh SVID), `tls` (TLS without a client certificate)
/// or `plaintext`.
pub const TRANSPORT: HeaderName = HeaderName::from_static("x-tally-transport");

/// Inbound proxy settings.
#[derive(Debug, Clone)]
pub struct InboundConfig {
    /// The app: `host:port` of its plain-HTTP listener.
    pub upstream: String,
    /// Forward `Authorization` and `DPoP` to the app too (off: the app
    /// has no use for them and should not hold them).
    pub pass_credentials: bool,
    /// Largest request body streamed to the app.
    pub max_body: u64,
    /// How long the app may take to connect and answer with headers.
    pub upstream_timeout: Duration,
    /// Oldest DPoP proof accepted, seconds after its `iat`.
    pub proof_max_age: u64,
    /// Clock difference allowed between caller and this sidecar, seconds.
    pub clock_skew: u64,
    /// When the Watch stream has been down longer than this (seconds),
    /// revocations may be missing here.
    pub stale_after: u64,
    /// Then refuse every request (503) instead of only `admin`-class
    /// tokens, which are always refused when stale.
    pub deny_when_stale: bool,
    /// How often refusals are summarized to the broker's audit log.
    pub report_every: Duration,
    /// When not empty, the only authorities requests may address; any
    /// other is refused (421) before any token work.
    pub authorities: Vec<crate::auth::target::Authority>,
    /// Whether plaintext is refused (mutual TLS required) or served beside
    /// TLS on the same port.
    pub mtls: super::mtls::InboundMtls,
}

impl InboundConfig {
    /// The admission settings among these, for the [`Gate`].
    pub fn gate(&self) -> GateConfig {
        GateConfig {
            stale_after: self.stale_after,
            deny_when_stale: self.deny_when_stale,
            authorities: self.authorities.clone(),
        }
    }

    /// Defaults for `upstream`: credentials dropped, 16 MiB bodies, 30 s
    /// for the app; proofs accepted for 30 s after `iat` with 5 s of clock
    /// skew. Callers in the mesh sign each proof just before sending it and
    /// keep their clocks in sync, and the replay cache holds every proof
    /// for age + skew, so a short window keeps it small: at 10,000
    /// requests per second, 350,000 live proofs, about 13 MB.
    pub fn new(upstream: impl Into<String>) -> Self {
        Self {
            upstream: upstream.into(),
            pass_credentials: false,
            max_body: 16 * 1024 * 1024,
            upstream_timeout: Duration::from_secs(30),
            proof_max_age: 30,
            clock_skew: 5,
            stale_after: 30,
            deny_when_stale: false,
            report_every: super::failures::INTERVAL,
            authorities: Vec::new(),
            mtls: super::mtls::InboundMtls::Optional,
        }
    }
}

/// Counters and latency of the inbound proxy.
#[derive(Debug)]
pub struct InboundMetrics {
    /// Requests by result (`allowed` or the refusal reason).
    pub requests: CounterVec,
    /// Time spent checking a request (not forwarding it).
    pub check_seconds: Histogram,
    /// Admitted requests by transport (`mtls`, `tls`, `plaintext`).
    pub admitted: CounterVec,
}

impl InboundMetrics {
    fn new() -> Self {
        Self {
            requests: CounterVec::new(
                "tally_sidecar_inbound_requests_total",
                "Inbound requests by result: allowed, or why they were refused.",
                &["result"],
            ),
            check_seconds: Histogram::new(
                "tally_sidecar_inbound_check_seconds",
                "Time to check an inbound request (token, proof, replay, policy).",
            ),
            admitted: CounterVec::new(
                "tally_sidecar_inbound_admitted_total",
                "Admitted inbound requests by how the caller reached this sidecar: mtls, tls or plaintext.",
                &["transport"],
            ),
        }
    }

    /// The same three metrics for another front end that judges inbound
    /// requests: `names` of the requests counter, the check histogram and
    /// the admitted counter.
    pub fn named(names: [&'static str; 3]) -> Self {
        let [requests, check_seconds, admitted] = names;
        Self {
            requests: CounterVec::new(
                requests,
                "Checked requests by result: allowed, or why they were refused.",
                &["result"],
            ),
            check_seconds: Histogram::new(
                check_seconds,
                "Time to check a request (token, proof, replay, policy).",
            ),
            admitted: CounterVec::new(
                admitted,
                "Admitted requests by how the caller reached the proxy in front: mtls, tls or plaintext.",
                &["transport"],
            ),
        }
    }

    /// Counts one check that took `took`, and its result.
    pub fn count(&self, took: Duration, result: Result<&'static str, &Refusal>) {
        self.check_seconds.observe(took);
        match result {
            Ok(transport) => {
                self.requests.inc(&["allowed"]);
                self.admitted.inc(&[transport]);
            }
            Err(refusal) => self.requests.inc(&[refusal.reason()]),
        }
    }

    /// Appends the metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        self.requests.render(out);
        self.check_seconds.render(out);
        self.admitted.render(out);
    }
}

/// A request that passed every check, and how it goes to the app.
struct Admitted {
    /// The verdict.
    allowed: Allowed,
    /// Normalized path plus the original query.
    path_and_query: String,
    /// The authority the proof was checked against: the app's `Host`.
    authority: HeaderValue,
    /// For an upgrade: the protocol asked for.
    upgrade: Option<HeaderValue>,
    /// How the caller reached this sidecar (see [`TRANSPORT`]).
    transport: &'static str,
}

/// Why an admitted request did not reach the app, or its answer the
/// caller: the one mapping of those to responses.
#[derive(Debug, Clone, Copy)]
enum Unforwarded {
    /// The declared body is larger than the limit (bytes).
    TooLarge(u64),
    /// The request target cannot be written for the app.
    Target,
    /// The app did not answer.
    AppUnavailable,
    /// The app did not answer in time.
    AppTimeout,
}

impl Unforwarded {
    fn response(self) -> Response<ProxyBody> {
        match self {
            Self::TooLarge(max) => proxy::refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request",
                &format!("the body is larger than {max} bytes"),
            ),
            Self::Target => proxy::refusal(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request target cannot be forwarded",
            ),
            Self::AppUnavailable => proxy::refusal(
                StatusCode::BAD_GATEWAY,
                "upstream_unavailable",
                "the application behind this sidecar did not answer",
            ),
            Self::AppTimeout => proxy::refusal(
                StatusCode::GATEWAY_TIMEOUT,
                "upstream_timeout",
                "the application behind this sidecar did not answer in time",
            ),
        }
    }
}

/// The inbound proxy. Share it behind an `Arc`.
pub struct Inbound {
    config: InboundConfig,
    gate: Arc<Gate>,
    next_hop: NextHop,
    metrics: InboundMetrics,
}

impl std::fmt::Debug for Inbound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inbound")
            .field("gate", &self.gate)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Inbound {
    /// The proxy, judging every request with `gate`.
    pub fn new(config: InboundConfig, gate: Arc<Gate>) -> Arc<Self> {
        let next_hop = proxy::next_hop(config.upstream_timeout);
        Arc::new(Self {
            config,
            gate,
            next_hop,
            metrics: InboundMetrics::new(),
        })
    }

    /// Its settings.
    pub fn config(&self) -> &InboundConfig {
        &self.config
    }

    /// The refusals of the current interval, for the broker's audit log.
    pub fn failures(&self) -> &Arc<super::failures::FailureLog> {
        self.gate.failures()
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> &InboundMetrics {
        &self.metrics
    }

    /// Checks `req` and, if it passes, streams it to the app and the
    /// app's answer back.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<crate::http::Peer>,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let now_ms = self.gate.clock().now_ms();
        let checked = self.check(&req, &peer, now_ms);
        self.metrics.count(
            started.elapsed(),
            checked.as_ref().map(|admitted| admitted.transport),
        );
        match checked {
            Ok(admitted) => {
                if let Some(protocol) = admitted.upgrade.clone() {
                    return self.tunnel(req, admitted, protocol, peer).await;
                }
                self.forward(req, admitted).await
            }
            Err(refusal) => self.refuse(&req, &refusal, now_ms / 1000),
        }
    }

    /// Every check, without touching the body: the target, the token
    /// core, then the verdict.
    fn check(
        &self,
        req: &Request<Incoming>,
        peer: &crate::http::Peer,
        now_ms: u64,
    ) -> Result<Admitted, Refusal> {
        let mesh_peer = peer.identity.as_ref().filter(|_| peer.tls);
        if self.config.mtls == super::mtls::InboundMtls::Required && mesh_peer.is_none() {
            return Err(Refusal::MtlsRequired);
        }
        let (scheme, transport) = match (peer.tls, mesh_peer) {
            (true, Some(_)) => (Scheme::Https, "mtls"),
            (true, None) => (Scheme::Https, "tls"),
            (false, _) => (Scheme::Http, "plaintext"),
        };
        let values = |name: &str| -> Vec<&[u8]> {
            req.headers()
                .get_all(name)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect()
        };
        let (hosts, authorization, dpop) = (
            values(header::HOST.as_str()),
            values(header::AUTHORIZATION.as_str()),
            values("dpop"),
        );
        let (wit, wpt, txn_token) = (
            values(WIT_HEADER),
            values(WPT_HEADER),
            values(TXN_TOKEN_HEADER),
        );
        let passed = self.gate.check(
            &Head {
                scheme,
                target_authority: req.uri().authority().map(|a| a.as_str()),
                hosts: &hosts,
                path: req.uri().path(),
                method: req.method().as_str(),
                authorization: &authorization,
                dpop: &dpop,
                wit: &wit,
                wpt: &wpt,
                txn_token: &txn_token,
                headers: req.headers(),
                hop: match mesh_peer {
                    Some(identity) => Hop::Mesh {
                        peer: identity,
                        tokens: &peer.tokens,
                    },
                    None => Hop::Plain,
                },
                // The app gets the normalized path from this proxy.
                forwarded_as_sent: false,
            },
            now_ms,
        )?;
        // The target check admitted only host characters and a port, so
        // this holds; were it not so, the authority would be malformed.
        let authority = HeaderValue::from_str(&passed.target.authority)
            .map_err(|_| TargetError::Authority(UriError::Host))?;
        let mut path_and_query = passed.target.path().to_owned();
        if let Some(query) = req.uri().query() {
            path_and_query.push('?');
            path_and_query.push_str(query);
        }
        Ok(Admitted {
            allowed: passed.allowed,
            path_and_query,
            authority,
            upgrade: upgrade_to(req),
            transport,
        })
    }

    /// Counts, audits and answers a refused request, through the one
    /// mapping in [`crate::auth::answer`].
    fn refuse(&self, req: &Request<Incoming>, refusal: &Refusal, now: u64) -> Response<ProxyBody> {
        let authorization: Vec<&[u8]> = req
            .headers()
            .get_all(header::AUTHORIZATION)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let wit: Vec<&[u8]> = req
            .headers()
            .get_all(WIT_HEADER)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        let answer = self.gate.refuse(
            req.method().as_str(),
            req.uri().path(),
            &authorization,
            &wit,
            refusal,
            now,
        );
        tracing::debug!(
            reason = refusal.reason(),
            status = answer.status,
            method = %req.method(),
            path = req.uri().path(),
            "inbound request refused"
        );
        respond(answer)
    }

    /// The request's head as the app receives it: hop-by-hop and spoofed
    /// `x-tally-*` headers removed, credentials dropped unless configured,
    /// the caller's identity set, the target rewritten to the app.
    fn upstream_head(
        &self,
        parts: &mut http::request::Parts,
        admitted: Admitted,
    ) -> Result<(), Unforwarded> {
        let headers = &mut parts.headers;
        proxy::strip_hop_by_hop(headers);
        let spoofed: Vec<HeaderName> = headers
            .keys()
            .filter(|name| name.as_str().starts_with("x-tally-"))
            .cloned()
            .collect();
        for name in spoofed {
            headers.remove(name);
        }
        if !self.config.pass_credentials {
            headers.remove(header::AUTHORIZATION);
            headers.remove("dpop");
            headers.remove(WIT_HEADER);
            headers.remove(WPT_HEADER);
        }
        // The authority the proof was checked against, whatever `Host`
        // said (HTTP/2 callers send `:authority`; the app gets `Host`).
        headers.insert(header::HOST, admitted.authority);
        let allowed = &admitted.allowed;
        for (name, value) in [
            (CALLER, allowed.caller().to_string()),
            (SCOPES, allowed.scopes().to_string()),
            (TOKEN_ID, allowed.token_id().to_owned()),
            (TRANSPORT, admitted.transport.to_owned()),
        ] {
            if let Ok(value) = HeaderValue::try_from(value) {
                headers.insert(name, value);
            }
        }
        let uri = format!("http://{}{}", self.config.upstream, admitted.path_and_query);
        parts.uri = uri.parse::<Uri>().map_err(|_| Unforwarded::Target)?;
        parts.version = http::Version::HTTP_11;
        Ok(())
    }

    /// A checked upgrade: the handshake goes to the app; on its 101 the
    /// caller's and the app's connections are joined.
    async fn tunnel(
        &self,
        mut req: Request<Incoming>,
        admitted: Admitted,
        protocol: HeaderValue,
        peer: Arc<crate::http::Peer>,
    ) -> Response<ProxyBody> {
        let credentials = admitted.allowed.credentials.clone();
        let caller_side = hyper::upgrade::on(&mut req);
        let (mut parts, _) = req.into_parts();
        if let Err(unforwarded) = self.upstream_head(&mut parts, admitted) {
            return unforwarded.response();
        }
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, protocol);
        let empty = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        let answer = tokio::time::timeout(
            self.config.upstream_timeout,
            self.next_hop.request(Request::from_parts(parts, empty)),
        )
        .await;
        let mut response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, upstream = %self.config.upstream, "the app did not answer the upgrade");
                return Unforwarded::AppUnavailable.response();
            }
            Err(_) => return Unforwarded::AppTimeout.response(),
        };
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            // The app declined: its answer goes back as any other.
            let (mut parts, body) = response.into_parts();
            proxy::strip_hop_by_hop(&mut parts.headers);
            return Response::from_parts(parts, proxy::stream(body));
        }
        let app_side = hyper::upgrade::on(&mut response);
        let (mut parts, _) = response.into_parts();
        let agreed = parts.headers.get(header::UPGRADE).cloned();
        proxy::strip_hop_by_hop(&mut parts.headers);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if let Some(agreed) = agreed {
            parts.headers.insert(header::UPGRADE, agreed);
        }
        let mut mesh = self.gate.mesh().clone();
        let clock = Arc::clone(self.gate.clock());
        tokio::spawn(async move {
            let (caller, app) = match tokio::try_join!(caller_side, app_side) {
                Ok(both) => both,
                Err(e) => {
                    tracing::debug!(error = %e, "an upgraded connection did not complete");
                    return;
                }
            };
            let mut caller = hyper_util::rt::TokioIo::new(caller);
            let mut app = hyper_util::rt::TokioIo::new(app);
            // The tunnel lives as long as the token that opened it, and
            // no longer than a mesh peer's SVID: it is closed when either
            // expires or a revocation or denial covers the token.
            let expires_at = credentials.expires_at();
            let until = peer
                .identity
                .as_ref()
                .map_or(expires_at, |p| expires_at.min(p.expires_at));
            let left = until.saturating_sub(clock.now());
            let ended = async {
                loop {
                    let why = {
                        let m = mesh.borrow_and_update();
                        if credentials.revoked_by(&m.revocations) {
                            Some("revoked")
                        } else {
                            m.denied.is_denied(credentials.sub()).then_some("denied")
                        }
                    };
                    if let Some(why) = why {
                        return why;
                    }
                    if mesh.changed().await.is_err() {
                        return std::future::pending().await;
                    }
                }
            };
            tokio::select! {
                // The tunnel keeps the connection's slot (`peer`), and ends
                // when both sides are quiet for the idle timeout.
                how = crate::http::tunnel::join(&mut caller, &mut app, peer.idle_timeout()) => {
                    tracing::debug!(jti = credentials.token_id(), ?how, "a tunnel ended");
                }
                () = tokio::time::sleep(Duration::from_secs(left)) => {
                    tracing::debug!(jti = credentials.token_id(), "closed a tunnel: its token (or the peer's SVID) expired");
                }
                why = ended => tracing::info!(jti = credentials.token_id(), why, "closed a tunnel: its token was revoked or its holder denied"),
            }
        });
        let empty = http_body_util::Empty::new()
            .map_err(|never| match never {})
            .boxed_unsync();
        Response::from_parts(parts, empty)
    }

    /// Streams an admitted request to the app and its answer back.
    async fn forward(&self, req: Request<Incoming>, admitted: Admitted) -> Response<ProxyBody> {
        let (mut parts, body) = req.into_parts();
        let too_large = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .is_some_and(|len| len > self.config.max_body);
        if too_large {
            return Unforwarded::TooLarge(self.config.max_body).response();
        }

        if let Err(unforwarded) = self.upstream_head(&mut parts, admitted) {
            return unforwarded.response();
        }
        let limit = usize::try_from(self.config.max_body).unwrap_or(usize::MAX);
        let body = Limited::new(body, limit).boxed_unsync();
        let upstream = Request::from_parts(parts, body);

        let answer = tokio::time::timeout(
            self.config.upstream_timeout,
            self.next_hop.request(upstream),
        )
        .await;
        match answer {
            Ok(Ok(response)) => {
                let (mut parts, body) = response.into_parts();
                proxy::strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, proxy::stream(body))
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, upstream = %self.config.upstream, "the app did not answer");
                Unforwarded::AppUnavailable.response()
            }
            Err(_) => Unforwarded::AppTimeout.response(),
        }
    }
}

/// The protocol an HTTP/1.1 request asks to upgrade to (`Connection:
/// upgrade` and `Upgrade: websocket`), if it is a WebSocket. Any other
/// upgrade (`h2c`, `TLS/1.0`, a list of several) is not tunneled: its
/// `Upgrade` header is dropped with the other hop-by-hop headers and the
/// request goes to the app as a plain one, which RFC 9110 §7.8 allows (a
/// server may ignore `Upgrade`). An `h2c` upgrade would otherwise let
/// HTTP/2 requests reach the app that this proxy never checked.
fn upgrade_to(req: &Request<Incoming>) -> Option<HeaderValue> {
    if req.version() != http::Version::HTTP_11 {
        return None;
    }
    let asks = req
        .headers()
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    let mut upgrades = req.headers().get_all(header::UPGRADE).iter();
    let protocol = upgrades.next()?;
    let websocket =
        upgrades.next().is_none() && protocol.as_bytes().eq_ignore_ascii_case(b"websocket");
    (asks && websocket).then(|| protocol.clone())
}

/// A refusal on the wire: the answer's status and headers, and its
/// `{error, error_description}` body.
fn respond(answer: HttpAnswer) -> Response<ProxyBody> {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::UNAUTHORIZED);
    let mut response = proxy::refusal(status, answer.error, &answer.description);
    let headers = response.headers_mut();
    if let Some(challenge) = answer
        .www_authenticate
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert(header::WWW_AUTHENTICATE, challenge);
    }
    if let Some(nonce) = answer
        .dpop_nonce
        .and_then(|v| HeaderValue::from_str(&v).ok())
    {
        headers.insert("dpop-nonce", nonce);
    }
    if let Some(secs) = answer.retry_after {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    response
}
