//! The local API: HTTP/1.1 JSON over a Unix socket, for the application
//! next to the sidecar. Apps get ready-made header values and never see a
//! private key.
//!
//! - `GET /v1/token?audience=A&scope=S` → `{access_token, token_type,
//!   expires_at, scope}`
//! - `POST /v1/authorize {method, url, audience?, scope?, nonce?, proof?}` →
//!   `{authorization, dpop}`: a fresh proof for that request on every call
//!   (with `ath`, and the nonce given, else the last nonce the sidecar saw
//!   for the URL's origin: after a `401` with `use_dpop_nonce`, ask again
//!   with the answer's `DPoP-Nonce`);
//!   the audience comes from the service map by host when omitted. With
//!   `proof: "wimse"` (the default for a service-map entry that says so)
//!   → `{workload-identity-token, workload-proof-token, authorization?}`:
//!   the sidecar's WIT and a fresh WPT for the URL, and the access token
//!   (its hash in the WPT's `ath`) only when `scope` is given.
//! - `GET /v1/identity` → `{spiffe_id, trust_domain, expires_at}`
//!
//! Errors are `{error, error_description}` with 400, 403 (the broker or
//! the peer-uid allow-list refused, or an admin denied this workload's
//! identity), 503 (broker unreachable) — mapped in one place
//! (`api_error`).

use super::cache::{CacheError, FetchTokens, Fetched, TokenAsk, TokenCache};
use super::identity::Svid;
pub use super::service_map::{Destination, Proof, ServiceMap, ServiceMapError};
use super::watch::MeshState;
use super::wits::{FetchedWit, WitAsk, Wits};
use crate::auth::answer::safe_description;
use crate::clock::Clock;
use crate::dpop::NormalizedUri;
use crate::http::{Body, Peer, json, read_body};
use crate::jose::Jkt;
use crate::token::{Audience, Scope, Scopes};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Largest request body read.
const MAX_BODY: usize = 16 * 1024;

/// How long a WPT this sidecar makes is valid: long enough for a slow
/// hop, well inside a verifier's 300 s maximum.
pub const WPT_LIFETIME: u64 = 60;

/// The local API's state.
pub struct LocalApi<F: FetchTokens> {
    cache: Arc<TokenCache<F>>,
    /// The sidecar's WIT, for WIMSE proofs (none: WIMSE is refused).
    wits: Option<Arc<TokenCache<Wits>>>,
    identity: tokio::sync::watch::Receiver<Arc<Svid>>,
    /// The broker's revocations, when the sidecar follows Watch: a cached
    /// token they cover is never handed out.
    mesh: Option<tokio::sync::watch::Receiver<MeshState>>,
    services: ServiceMap,
    /// Last `DPoP-Nonce` seen per origin (filled by the outbound proxy).
    nonces: Mutex<HashMap<String, String>>,
    allowed_uids: Option<Vec<u32>>,
    clock: Arc<dyn Clock>,
}

impl<F: FetchTokens> std::fmt::Debug for LocalApi<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalApi")
            .field("allowed_uids", &self.allowed_uids)
            .finish_non_exhaustive()
    }
}

/// Header values for one request (they hold the token: never log them).
pub struct RequestHeaders {
    /// `Authorization: DPoP <token>`.
    pub authorization: String,
    /// `DPoP: <proof>`.
    pub dpop: String,
}

/// Header values for one request over a mutual-TLS connection (they hold
/// the token: never log them).
pub struct MeshHeaders {
    /// `Authorization: DPoP <token>`.
    pub authorization: String,
    /// `DPoP: <proof>`, unless the token is bound to the connection's key.
    pub dpop: Option<String>,
}

/// WIMSE header values for one request (they hold the WIT and the
/// token: never log them).
pub struct WimseHeaders {
    /// `Workload-Identity-Token: <wit>`.
    pub wit: String,
    /// `Workload-Proof-Token: <wpt>`.
    pub wpt: String,
    /// `Authorization: DPoP <token>`, when a token was asked for.
    pub authorization: Option<String>,
}

/// A refusal, as the app sees it.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// The `error` code.
    pub code: &'static str,
    /// The `error_description`.
    pub description: String,
}

impl ApiError {
    fn bad_request(description: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            code: "invalid_request",
            description: description.into(),
        }
    }
}

/// The body of `POST /v1/authorize`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthorizeAsk {
    method: String,
    url: String,
    audience: Option<String>,
    scope: Option<String>,
    /// The `DPoP-Nonce` the destination answered with
    /// (`use_dpop_nonce`): the proof carries it, and later proofs
    /// for that origin too.
    nonce: Option<String>,
    /// `dpop` or `wimse`; the service map's choice for the URL's
    /// host when omitted, else `dpop`.
    proof: Option<String>,
    /// WIMSE: the `Txn-Token` the request will carry, bound by
    /// the WPT's `tth`.
    txn_token: Option<String>,
}

/// The one mapping from cache refusals to HTTP answers.
fn api_error(e: &CacheError) -> ApiError {
    match e {
        CacheError::Refused(why) => ApiError {
            status: StatusCode::FORBIDDEN,
            code: "access_denied",
            description: why.clone(),
        },
        CacheError::Unreachable { .. } => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            code: "broker_unreachable",
            description: e.to_string(),
        },
    }
}

impl<F: FetchTokens> LocalApi<F> {
    /// The API over these parts. `allowed_uids`, when set, lists the only
    /// peer user ids served; `mesh`, when set, supplies revocations.
    pub fn new(
        cache: Arc<TokenCache<F>>,
        identity: tokio::sync::watch::Receiver<Arc<Svid>>,
        mesh: Option<tokio::sync::watch::Receiver<MeshState>>,
        services: ServiceMap,
        allowed_uids: Option<Vec<u32>>,
        clock: Arc<dyn Clock>,
        wits: Option<Arc<TokenCache<Wits>>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            cache,
            wits,
            identity,
            mesh,
            services,
            nonces: Mutex::new(HashMap::new()),
            allowed_uids,
            clock,
        })
    }

    /// Remembers the server nonce last seen for `origin`.
    pub fn remember_nonce(&self, origin: &str, nonce: &str) {
        self.nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(origin.to_ascii_lowercase(), nonce.to_owned());
    }

    /// Answers one request.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        peer: Arc<Peer>,
    ) -> Response<Body> {
        let answer = self.route(req, &peer).await;
        answer.unwrap_or_else(|e| {
            json(
                e.status,
                &json!({"error": e.code, "error_description": safe_description(&e.description)}),
            )
        })
    }

    /// Whether only some uids may use this sidecar.
    pub fn restricts_uids(&self) -> bool {
        self.allowed_uids.is_some()
    }

    /// Refuses a peer whose uid is not on the allow-list (when there is
    /// one): the local API and the outbound proxy both act as this
    /// workload, so both serve only these uids.
    ///
    /// # Errors
    /// 403 naming the allowed uids and the caller's.
    pub fn admit(&self, peer: &Peer, what: &str) -> Result<(), ApiError> {
        match &self.allowed_uids {
            Some(allowed) if !peer.uid.is_some_and(|uid| allowed.contains(&uid)) => Err(ApiError {
                status: StatusCode::FORBIDDEN,
                code: "access_denied",
                description: format!(
                    "this {what} serves only uids {allowed:?}; the caller is {}",
                    peer.uid
                        .map_or_else(|| "of unknown uid".into(), |u| format!("uid {u}"))
                ),
            }),
            _ => Ok(()),
        }
    }

    async fn route(&self, req: Request<Incoming>, peer: &Peer) -> Result<Response<Body>, ApiError> {
        self.admit(peer, "socket")?;
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/v1/token") => self.token(req.uri().query().unwrap_or("")).await,
            (&Method::POST, "/v1/authorize") => {
                let body = read_body(req.into_body(), MAX_BODY)
                    .await
                    .map_err(|e| ApiError::bad_request(e.to_string()))?;
                self.authorize(&body).await
            }
            (&Method::GET, "/v1/identity") => Ok(self.identity()),
            _ => Err(ApiError {
                status: StatusCode::NOT_FOUND,
                code: "not_found",
                description: "try GET /v1/token, POST /v1/authorize or GET /v1/identity".into(),
            }),
        }
    }

    async fn token(&self, query: &str) -> Result<Response<Body>, ApiError> {
        let (mut audience, mut scope) = (None, None);
        for (k, v) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match k.as_ref() {
                "audience" => &mut audience,
                "scope" => &mut scope,
                _ => continue,
            };
            if slot.replace(v.into_owned()).is_some() {
                return Err(ApiError::bad_request(format!("{k} is repeated")));
            }
        }
        let audience: Audience = audience
            .ok_or_else(|| ApiError::bad_request("audience is required"))?
            .parse()
            .map_err(|e| ApiError::bad_request(format!("audience: {e}")))?;
        let scopes = parse_scopes(scope.as_deref().unwrap_or(""))?;
        let fetched = self.fetch(&audience, &scopes).await?;
        let expires_at = self.clock.now() + fetched.expires_in.as_secs();
        Ok(json(
            StatusCode::OK,
            &json!({
                "access_token": fetched.token.expose(),
                "token_type": "DPoP",
                "expires_at": expires_at,
                "scope": fetched.scopes.to_string(),
            }),
        ))
    }

    async fn authorize(&self, body: &[u8]) -> Result<Response<Body>, ApiError> {
        let ask: AuthorizeAsk = serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("body: {e}")))?;
        if let Some(nonce) = &ask.nonce {
            // RFC 9449 §8.1: NQCHAR, 1*%x21 / %x23-5B / %x5D-7E.
            let ok = !nonce.is_empty()
                && nonce.len() <= 512
                && nonce
                    .bytes()
                    .all(|b| matches!(b, 0x21 | 0x23..=0x5b | 0x5d..=0x7e));
            if !ok {
                return Err(ApiError::bad_request(
                    "nonce must be the DPoP-Nonce value: 1 to 512 visible ASCII characters, no quote or backslash",
                ));
            }
        }
        if ask.method.is_empty() || !ask.method.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ApiError::bad_request(
                "method must be an upper-case HTTP method",
            ));
        }
        let htu = NormalizedUri::parse(&ask.url)
            .map_err(|e| ApiError::bad_request(format!("url: {e}")))?;
        let proof = match &ask.proof {
            Some(p) => p.parse().map_err(ApiError::bad_request)?,
            None => self
                .services
                .destination_for(&ask.url)
                .map_or(Proof::Dpop, Destination::proof),
        };
        if proof == Proof::Wimse {
            return self.authorize_wimse(&ask.url, &htu, &ask).await;
        }
        if ask.txn_token.is_some() {
            return Err(ApiError::bad_request(
                "txn_token is bound by a WIMSE proof only (proof: wimse)",
            ));
        }
        let audience = match &ask.audience {
            Some(a) => a
                .parse()
                .map_err(|e| ApiError::bad_request(format!("audience: {e}")))?,
            None => self
                .services
                .audience_for(&ask.url)
                .cloned()
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "no audience given and the URL's host is not in the service map",
                    )
                })?,
        };
        let scopes = parse_scopes(ask.scope.as_deref().unwrap_or(""))?;
        if let Some(nonce) = &ask.nonce {
            self.remember_nonce(&origin_of(htu.as_str()), nonce);
        }
        let headers = self
            .headers_for(&ask.method, &htu, &audience, &scopes)
            .await?;
        Ok(json(
            StatusCode::OK,
            &json!({
                "authorization": headers.authorization,
                "dpop": headers.dpop,
            }),
        ))
    }

    /// The WIMSE answer of `/v1/authorize`.
    async fn authorize_wimse(
        &self,
        url: &str,
        htu: &NormalizedUri,
        ask: &AuthorizeAsk,
    ) -> Result<Response<Body>, ApiError> {
        let (audience, scope) = (ask.audience.as_deref(), ask.scope.as_deref());
        if let Some(txn) = &ask.txn_token
            && (txn.is_empty() || !txn.bytes().all(|b| (0x21..0x7f).contains(&b)))
        {
            return Err(ApiError::bad_request(
                "txn_token must be a header value: visible ASCII, no spaces",
            ));
        }
        if ask.nonce.is_some() {
            return Err(ApiError::bad_request(
                "nonce is a DPoP server nonce: a WIMSE proof carries none",
            ));
        }
        // A token only when scopes are asked for: the WIT alone names
        // the caller.
        let token = match scope {
            None => None,
            Some(scope) => {
                let audience: Audience = match audience {
                    Some(a) => a
                        .parse()
                        .map_err(|e| ApiError::bad_request(format!("audience: {e}")))?,
                    None => self.services.audience_for(url).cloned().ok_or_else(|| {
                        ApiError::bad_request(
                            "no audience given and the URL's host is not in the service map",
                        )
                    })?,
                };
                Some((audience, parse_scopes(scope)?))
            }
        };
        let headers = self
            .wimse_headers_for(
                htu,
                token.as_ref().map(|(a, s)| (a, s)),
                ask.txn_token.as_deref(),
            )
            .await?;
        let mut answer = json!({
            "workload-identity-token": headers.wit,
            "workload-proof-token": headers.wpt,
        });
        if let Some(authorization) = headers.authorization {
            answer["authorization"] = authorization.into();
        }
        Ok(json(StatusCode::OK, &answer))
    }

    /// WIMSE values for a request to `htu` (its `aud`): the sidecar's WIT,
    /// a fresh WPT signed with the WIT's key (binding `txn_token`, the
    /// request's `Txn-Token`, with `tth`), and, when `token` names an
    /// audience and scopes, the cached access token for them, bound to
    /// the same key and hashed into the WPT's `ath`.
    ///
    /// # Errors
    /// [`ApiError`]: 403 if the broker refuses (no `wit:` rule, a denied
    /// or revoked workload), 503 if it is unreachable or the token and
    /// WIT cannot be had for one key.
    pub async fn wimse_headers_for(
        &self,
        htu: &NormalizedUri,
        token: Option<(&Audience, &Scopes)>,
        txn_token: Option<&str>,
    ) -> Result<WimseHeaders, ApiError> {
        let wit = self.wit().await?;
        let token = match token {
            None => None,
            Some((audience, scopes)) => {
                let mut fetched = self.fetch(audience, scopes).await?;
                if fetched.key.thumbprint() != wit.jkt {
                    // Cached for the key before a renewal: one for the
                    // WIT's key is needed (the WPT is its proof).
                    self.cache.forget_where(|f| f.key.thumbprint() != wit.jkt);
                    fetched = self.fetch(audience, scopes).await?;
                }
                if fetched.key.thumbprint() != wit.jkt {
                    return Err(ApiError {
                        status: StatusCode::SERVICE_UNAVAILABLE,
                        code: "broker_unreachable",
                        description: "the access token and the WIT are bound to different keys (an SVID renewal is under way); try again".into(),
                    });
                }
                Some(fetched)
            }
        };
        let access_token = token.as_ref().map(|t| t.token.expose());
        let wpt = crate::wimse::wpt::mint(
            wit.key.signing_key(),
            &crate::wimse::WptInput {
                aud: htu.as_str(),
                wit: wit.wit.expose(),
                access_token,
                txn_token,
                other: &[],
                lifetime: WPT_LIFETIME,
            },
            self.clock.now(),
        )
        .map_err(|e| ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            code: "server_error",
            description: format!("signing the WPT: {e}"),
        })?;
        Ok(WimseHeaders {
            wit: wit.wit.expose().to_owned(),
            wpt,
            authorization: access_token.map(|t| format!("DPoP {t}")),
        })
    }

    /// The sidecar's WIT, unless a revocation known here covers it (then
    /// it is dropped and replaced; covered again, 403) or an admin denied
    /// this workload.
    async fn wit(&self) -> Result<FetchedWit, ApiError> {
        let Some(wits) = &self.wits else {
            return Err(ApiError {
                status: StatusCode::NOT_IMPLEMENTED,
                code: "unsupported",
                description: "this sidecar has no WIMSE identity token source".into(),
            });
        };
        self.refuse_if_denied()?;
        let fetched = wits.get(&WitAsk).await.map_err(|e| api_error(&e))?;
        let Some(mesh) = &self.mesh else {
            return Ok(fetched);
        };
        let set = Arc::clone(&mesh.borrow().revocations);
        let own = self.identity.borrow().spiffe_id.clone();
        let covered = |w: &FetchedWit| w.revoked_by(&set, &own);
        if !covered(&fetched) {
            return Ok(fetched);
        }
        wits.forget_where(covered);
        let again = wits.get(&WitAsk).await.map_err(|e| api_error(&e))?;
        if covered(&again) {
            return Err(ApiError {
                status: StatusCode::FORBIDDEN,
                code: "access_denied",
                description: "the broker has revoked this workload's WIT; new ones are revoked too until the revocation's time has passed".into(),
            });
        }
        Ok(again)
    }

    /// 403 while the broker denies this workload's identity: even a
    /// cached token or WIT would be refused everywhere.
    fn refuse_if_denied(&self) -> Result<(), ApiError> {
        if self
            .mesh
            .as_ref()
            .is_some_and(|m| m.borrow().own_identity_denied)
        {
            return Err(ApiError {
                status: StatusCode::FORBIDDEN,
                code: "access_denied",
                description: "an admin has denied this workload's identity at the broker: no token is handed out until it is allowed again".into(),
            });
        }
        Ok(())
    }

    /// `Authorization` and `DPoP` values for `method` on `htu`: the cached
    /// token for (`audience`, `scopes`) and a fresh proof signed with the
    /// key that token is bound to, carrying the last nonce seen for the
    /// origin.
    ///
    /// # Errors
    /// [`ApiError`]: 403 if the broker refuses, 503 if it is unreachable.
    pub async fn headers_for(
        &self,
        method: &str,
        htu: &NormalizedUri,
        audience: &Audience,
        scopes: &Scopes,
    ) -> Result<RequestHeaders, ApiError> {
        let fetched = self.fetch(audience, scopes).await?;
        Ok(RequestHeaders {
            dpop: self.proof(&fetched, method, htu)?,
            authorization: format!("DPoP {}", fetched.token.expose()),
        })
    }

    /// The same for a request sent over a mutual-TLS connection whose
    /// client certificate's key has the thumbprint `connection_key`: a
    /// token bound to that key has proven possession in the handshake and
    /// goes without a proof; one bound to another (an older SVID's) key
    /// carries a proof signed with that key, as over plaintext.
    ///
    /// # Errors
    /// As [`Self::headers_for`].
    pub async fn mesh_headers_for(
        &self,
        method: &str,
        htu: &NormalizedUri,
        audience: &Audience,
        scopes: &Scopes,
        connection_key: &Jkt,
    ) -> Result<MeshHeaders, ApiError> {
        let fetched = self.fetch(audience, scopes).await?;
        let dpop = if fetched.key.thumbprint() == *connection_key {
            None
        } else {
            Some(self.proof(&fetched, method, htu)?)
        };
        Ok(MeshHeaders {
            authorization: format!("DPoP {}", fetched.token.expose()),
            dpop,
        })
    }

    /// A fresh proof for `method` on `htu` with `fetched`'s key, carrying
    /// the last nonce seen for the origin.
    fn proof(
        &self,
        fetched: &Fetched,
        method: &str,
        htu: &NormalizedUri,
    ) -> Result<String, ApiError> {
        let nonce = self.nonce_for(&origin_of(htu.as_str()));
        fetched
            .key
            .mint(
                method,
                htu.as_str(),
                Some(fetched.token.expose()),
                nonce.as_deref(),
                self.clock.now(),
            )
            .map_err(|e| ApiError {
                status: StatusCode::INTERNAL_SERVER_ERROR,
                code: "server_error",
                description: format!("signing the proof: {e}"),
            })
    }

    /// A token from the cache that no revocation known here covers: a
    /// covered one (the cache may not have dropped it yet) is dropped and
    /// replaced, and if the new one is covered too (the workload itself is
    /// revoked) the answer is 403. While the broker denies this workload's
    /// identity, 403 at once: even a cached token would be refused
    /// everywhere.
    async fn fetch(&self, audience: &Audience, scopes: &Scopes) -> Result<Fetched, ApiError> {
        self.refuse_if_denied()?;
        let fetched = self
            .cache
            .get(&TokenAsk::new(audience, scopes))
            .await
            .map_err(|e| api_error(&e))?;
        let Some(mesh) = &self.mesh else {
            return Ok(fetched);
        };
        let set = Arc::clone(&mesh.borrow().revocations);
        let own = self.identity.borrow().spiffe_id.clone();
        let covered = |f: &Fetched| f.revoked_by(&set, &own);
        if !covered(&fetched) {
            return Ok(fetched);
        }
        self.cache.forget_where(covered);
        let again = self
            .cache
            .get(&TokenAsk::new(audience, scopes))
            .await
            .map_err(|e| api_error(&e))?;
        if covered(&again) {
            return Err(ApiError {
                status: StatusCode::FORBIDDEN,
                code: "access_denied",
                description: "the broker has revoked this workload's tokens; new ones are revoked too until the revocation's time has passed".into(),
            });
        }
        Ok(again)
    }

    /// The server nonce last seen for `origin` (`scheme://authority`).
    pub fn nonce_for(&self, origin: &str) -> Option<String> {
        self.nonces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(origin)
            .cloned()
    }

    /// The service map.
    pub fn services(&self) -> &ServiceMap {
        &self.services
    }

    /// The token cache.
    pub fn cache(&self) -> &Arc<TokenCache<F>> {
        &self.cache
    }

    fn identity(&self) -> Response<Body> {
        let svid = Arc::clone(&self.identity.borrow());
        json(
            StatusCode::OK,
            &json!({
                "spiffe_id": svid.spiffe_id.as_str(),
                "trust_domain": svid.spiffe_id.trust_domain(),
                "expires_at": svid.expires_at,
            }),
        )
    }
}

fn parse_scopes(text: &str) -> Result<Scopes, ApiError> {
    text.split(' ')
        .filter(|s| !s.is_empty())
        .map(str::parse::<Scope>)
        .collect::<Result<Vec<_>, _>>()
        .and_then(Scopes::new)
        .map_err(|e| ApiError::bad_request(format!("scope: {e}")))
}

/// `scheme://authority` of a normalized URI.
pub fn origin_of(uri: &str) -> String {
    match uri.split_once("://") {
        Some((scheme, rest)) => format!("{scheme}://{}", rest.split('/').next().unwrap_or("")),
        None => uri.to_owned(),
    }
}

/// Binds the API's socket at `path` with mode 0660, replacing a stale
/// socket file left by a previous run (never any other kind of file, and
/// never a socket a live process still answers on).
///
/// # Errors
/// If the socket cannot be bound or its mode set; `AddrInUse` when
/// another process answers on `path`.
pub fn bind(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    bind_with_mode(path, 0o660)
}

/// [`bind`], the socket file given `mode` (0666 in a pod, where the
/// peer-uid check decides who may use it).
///
/// # Errors
/// As [`bind`].
pub fn bind_with_mode(
    path: &std::path::Path,
    mode: u32,
) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && meta.file_type().is_socket()
    {
        // A socket someone still answers on belongs to a running sidecar:
        // taking it over would cut that one's apps off without a word.
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(std::io::ErrorKind::AddrInUse.into());
        }
        // Left behind by a sidecar that is gone.
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(listener)
}

/// Serves the API on `listener` (see [`bind`]) until `shutdown`.
///
/// # Errors
/// If accepting fails.
pub async fn serve<F: FetchTokens>(
    api: Arc<LocalApi<F>>,
    listener: tokio::net::UnixListener,
    listen: crate::http::Listen,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    crate::http::serve_unix(
        listener,
        listen,
        move |req, peer| Arc::clone(&api).handle(req, peer),
        shutdown,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_scheme_and_authority() {
        assert_eq!(
            origin_of("https://a.example:8443/x/y"),
            "https://a.example:8443"
        );
    }
}
