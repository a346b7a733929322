//! The SPIFFE Workload API on a Unix socket (`--spiffe-socket`), the
//! service exactly as the standard's `workload.proto` has it
//! (`/SpiffeWorkloadAPI/…`), so SPIFFE libraries (go-spiffe, java-spiffe,
//! py-spiffe, the Rust `spiffe` crate) and the proxies built on them use
//! tally unchanged.
//!
//! - Every call must carry `workload.spiffe.io: true` (the standard's
//!   guard against a request forged through some other client), else
//!   `InvalidArgument`; a peer whose uid (`SO_PEERCRED`) is not on the
//!   sidecar's allow-list gets `PermissionDenied`.
//! - X.509: the workload's own SVID, for a key made for it (see
//!   [`super::workload_svid`]); the sidecar's key never leaves it. Streams
//!   send the whole state in every message, a new one on every renewal
//!   and bundle change; a stream opened before the SVID exists starts
//!   once it does, a unary call then gets `Unavailable`.
//! - JWT: JWT-SVIDs come from the broker (`Tokens.IssueJwtSvid`, policy
//!   checked there) through the token cache; the JWT bundle is the
//!   broker's JWKS from the Watch stream; `ValidateJWTSVID` checks
//!   locally, revocations and identity denials included.
//!
//! Served by the same connection loop as the local API (connection cap,
//! idle and header timeouts).

use super::cache::{CacheError, TokenCache};
use super::identity::Svid;
use super::jwt_svids::{JwtAsk, JwtSvids};
use super::watch::MeshState;
use crate::clock::Clock;
use crate::identity::SpiffeId;
use crate::proto::spiffe_workload as pb;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// The metadata every Workload API call must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";

/// Largest JWT-SVID `ValidateJWTSVID` reads (the core caps it too).
const MAX_SVID_BYTES: usize = 8 * 1024;

/// Leeway on a JWT-SVID's `exp` and `iat`, seconds.
const JWT_LEEWAY: u64 = 30;

/// The Workload API's parts.
pub struct WorkloadApi {
    own_id: SpiffeId,
    svid: watch::Receiver<Option<Arc<Svid>>>,
    mesh: watch::Receiver<MeshState>,
    jwt: Arc<TokenCache<JwtSvids>>,
    allowed_uids: Option<Vec<u32>>,
    clock: Arc<dyn Clock>,
    stop: watch::Receiver<bool>,
}

impl std::fmt::Debug for WorkloadApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadApi")
            .field("own_id", &self.own_id)
            .field("allowed_uids", &self.allowed_uids)
            .finish_non_exhaustive()
    }
}

/// What a [`WorkloadApi`] is built from.
pub struct WorkloadParts {
    /// Whom the workload is.
    pub own_id: SpiffeId,
    /// The workload's X.509-SVID, once there is one.
    pub svid: watch::Receiver<Option<Arc<Svid>>>,
    /// The Watch stream's state (bundle, JWKS, revocations, denials).
    pub mesh: watch::Receiver<MeshState>,
    /// JWT-SVIDs, cached.
    pub jwt: Arc<TokenCache<JwtSvids>>,
    /// Only these peer uids may call, if set.
    pub allowed_uids: Option<Vec<u32>>,
    /// The clock (JWT-SVID validation).
    pub clock: Arc<dyn Clock>,
    /// Streams end when this turns true.
    pub stop: watch::Receiver<bool>,
}

impl WorkloadApi {
    /// The API over `parts`.
    pub fn new(parts: WorkloadParts) -> Arc<Self> {
        Arc::new(Self {
            own_id: parts.own_id,
            svid: parts.svid,
            mesh: parts.mesh,
            jwt: parts.jwt,
            allowed_uids: parts.allowed_uids,
            clock: parts.clock,
            stop: parts.stop,
        })
    }

    /// Refuses a call without the security header (`InvalidArgument`) or
    /// from a uid not on the allow-list (`PermissionDenied`).
    fn admit<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let header = request.metadata().get(SECURITY_HEADER);
        if header.is_none_or(|v| v.as_bytes() != b"true") {
            return Err(Status::invalid_argument(
                "security header missing from request: every Workload API call must carry `workload.spiffe.io: true`",
            ));
        }
        let uid = request
            .extensions()
            .get::<Arc<crate::http::Peer>>()
            .and_then(|peer| peer.uid);
        match &self.allowed_uids {
            Some(allowed) if !uid.is_some_and(|u| allowed.contains(&u)) => {
                Err(Status::permission_denied(format!(
                    "this Workload API serves only uids {allowed:?}; the caller is {}",
                    uid.map_or_else(|| "of unknown uid".into(), |u| format!("uid {u}"))
                )))
            }
            _ => Ok(()),
        }
    }

    /// The current workload SVID, if it exists and has not expired.
    fn current_svid(&self) -> Option<Arc<Svid>> {
        let now = self.clock.now();
        self.svid
            .borrow()
            .as_ref()
            .filter(|s| s.expires_at > now)
            .map(Arc::clone)
    }

    /// Runs `next` on every change of the SVID or the mesh state and
    /// streams what it returns whenever that differs from what was last
    /// sent (`None`: nothing to send yet). Ends when the client goes, or
    /// the sidecar stops.
    fn stream<M, F>(self: &Arc<Self>, next: F) -> ReceiverStream<Result<M, Status>>
    where
        M: Clone + PartialEq + Send + 'static,
        F: Fn(&Self) -> Option<M> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(2);
        let api = Arc::clone(self);
        tokio::spawn(async move {
            let (mut svid, mut mesh, mut stop) =
                (api.svid.clone(), api.mesh.clone(), api.stop.clone());
            let mut last: Option<M> = None;
            loop {
                svid.borrow_and_update();
                mesh.borrow_and_update();
                if *stop.borrow_and_update() {
                    return;
                }
                if let Some(message) = next(&api)
                    && last.as_ref() != Some(&message)
                {
                    let permit = tokio::select! {
                        permit = tx.reserve() => permit,
                        _ = stop.changed() => return,
                    };
                    let Ok(permit) = permit else { return };
                    permit.send(Ok(message.clone()));
                    last = Some(message);
                }
                // Any change is looked at afresh; a sender gone (the
                // sidecar stopping) ends the stream.
                let alive = tokio::select! {
                    r = svid.changed() => r.is_ok(),
                    r = mesh.changed() => r.is_ok(),
                    r = stop.changed() => r.is_ok(),
                    () = tx.closed() => false,
                };
                if !alive {
                    return;
                }
            }
        });
        ReceiverStream::new(rx)
    }

    fn x509_svid_response(&self) -> Option<pb::X509svidResponse> {
        let svid = self.current_svid()?;
        let bundle = self.bundle_der(Some(&svid));
        let message = x509_svid(&svid, &bundle)
            .inspect_err(|e| tracing::error!(error = %e, "cannot serve the workload's X.509-SVID"))
            .ok()?;
        Some(pb::X509svidResponse {
            svids: vec![message],
            crl: Vec::new(),
            federated_bundles: std::collections::HashMap::new(),
        })
    }

    /// The trust bundle, DER certificates concatenated: the Watch
    /// stream's (kept current through root rotations), else the one the
    /// SVID came with.
    fn bundle_der(&self, svid: Option<&Svid>) -> Vec<u8> {
        let from_mesh: Vec<u8> = self.mesh.borrow().bundle_der.concat();
        if !from_mesh.is_empty() {
            return from_mesh;
        }
        svid.map(|s| pem_certs_der(&s.bundle_pem).concat())
            .unwrap_or_default()
    }

    fn x509_bundles_response(&self) -> Option<pb::X509BundlesResponse> {
        let bundle = self.bundle_der(self.current_svid().as_deref());
        if bundle.is_empty() {
            return None;
        }
        Some(pb::X509BundlesResponse {
            crl: Vec::new(),
            bundles: [(self.trust_domain_id(), bundle)].into_iter().collect(),
        })
    }

    fn jwt_bundles_response(&self) -> Option<pb::JwtBundlesResponse> {
        let jwks = self.mesh.borrow().jwks.clone()?;
        Some(pb::JwtBundlesResponse {
            bundles: [(self.trust_domain_id(), jwt_bundle(&jwks))]
                .into_iter()
                .collect(),
        })
    }

    /// `spiffe://<trust domain>`, how the standard keys bundles.
    fn trust_domain_id(&self) -> String {
        format!("spiffe://{}", self.own_id.trust_domain())
    }
}

/// The trust domain's JWT authorities as a SPIFFE bundle's JWKS: every
/// key with its `kid`, marked `use: jwt-svid`.
fn jwt_bundle(jwks: &crate::token::Jwks) -> Vec<u8> {
    let mut doc = jwks.to_json();
    if let Some(keys) = doc["keys"].as_array_mut() {
        for key in keys {
            key["use"] = serde_json::json!("jwt-svid");
        }
    }
    doc.to_string().into_bytes()
}

/// The DER certificates in `pem`, in order.
fn pem_certs_der(pem: &str) -> Vec<Vec<u8>> {
    use rustls_pki_types::pem::PemObject as _;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .filter_map(Result::ok)
        .map(|c| c.as_ref().to_vec())
        .collect()
}

/// `svid` as the Workload API sends it: chain DER (leaf first), PKCS#8
/// DER key, and `bundle`.
fn x509_svid(svid: &Svid, bundle: &[u8]) -> Result<pb::X509svid, String> {
    use rustls_pki_types::pem::PemObject as _;
    let key = rustls_pki_types::PrivatePkcs8KeyDer::from_pem_slice(svid.key_pem.as_bytes())
        .map_err(|e| format!("the workload key is not PKCS#8 PEM: {e}"))?;
    let chain = pem_certs_der(&svid.chain_pem);
    if chain.is_empty() {
        return Err("the workload SVID has no certificate".into());
    }
    Ok(pb::X509svid {
        spiffe_id: svid.spiffe_id.to_string(),
        x509_svid: chain.concat(),
        x509_svid_key: key.secret_pkcs8_der().to_vec(),
        bundle: bundle.to_vec(),
        hint: String::new(),
    })
}

/// A JSON value as a protobuf `Value` (for `ValidateJWTSVID`'s claims).
fn proto_value(v: &serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    let kind = match v {
        serde_json::Value::Null => Kind::NullValue(0),
        serde_json::Value::Bool(b) => Kind::BoolValue(*b),
        #[expect(
            clippy::cast_precision_loss,
            reason = "protobuf's Struct holds numbers as doubles"
        )]
        serde_json::Value::Number(n) => Kind::NumberValue(
            n.as_f64()
                .or_else(|| n.as_u64().map(|u| u as f64))
                .unwrap_or(0.0),
        ),
        serde_json::Value::String(s) => Kind::StringValue(s.clone()),
        serde_json::Value::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.iter().map(proto_value).collect(),
        }),
        serde_json::Value::Object(o) => Kind::StructValue(proto_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

fn proto_struct(o: &serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: o.iter().map(|(k, v)| (k.clone(), proto_value(v))).collect(),
    }
}

type Stream<M> = ReceiverStream<Result<M, Status>>;

#[tonic::async_trait]
impl pb::spiffe_workload_api_server::SpiffeWorkloadApi for Arc<WorkloadApi> {
    type FetchX509SVIDStream = Stream<pb::X509svidResponse>;
    type FetchX509BundlesStream = Stream<pb::X509BundlesResponse>;
    type FetchJWTBundlesStream = Stream<pb::JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<pb::X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        self.admit(&request)?;
        Ok(Response::new(self.stream(WorkloadApi::x509_svid_response)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<pb::X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        self.admit(&request)?;
        Ok(Response::new(
            self.stream(WorkloadApi::x509_bundles_response),
        ))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<pb::JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.admit(&request)?;
        Ok(Response::new(
            self.stream(WorkloadApi::jwt_bundles_response),
        ))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<pb::JwtsvidRequest>,
    ) -> Result<Response<pb::JwtsvidResponse>, Status> {
        self.admit(&request)?;
        let body = request.into_inner();
        if !body.spiffe_id.is_empty() && body.spiffe_id != self.own_id.as_str() {
            return Err(Status::permission_denied(format!(
                "this workload is {}; it has no identity {:?}",
                self.own_id,
                body.spiffe_id.chars().take(200).collect::<String>()
            )));
        }
        let ask = JwtAsk::parse(&body.audience)
            .map_err(|e| Status::invalid_argument(format!("audience: {e}")))?;
        if self.current_svid().is_none() {
            return Err(Status::unavailable(
                "this workload has no identity yet; retry shortly",
            ));
        }
        if self.mesh.borrow().own_identity_denied {
            return Err(Status::permission_denied(format!(
                "the broker has denied {}",
                self.own_id
            )));
        }
        let fetch = || async {
            self.jwt.get(&ask).await.map_err(|e| match e {
                CacheError::Refused(why) => Status::permission_denied(why),
                unreachable @ CacheError::Unreachable { .. } => {
                    Status::unavailable(unreachable.to_string())
                }
            })
        };
        let revoked = |got: &super::jwt_svids::FetchedJwtSvid| {
            got.revoked_by(&self.mesh.borrow().revocations, &self.own_id)
        };
        let mut got = fetch().await?;
        // A revocation may have arrived while this one was being fetched,
        // after the cache dropped what it covered: never hand it out.
        if revoked(&got) {
            let jti = got.jti.clone();
            self.jwt.forget_where(|j| j.jti == jti);
            got = fetch().await?;
            if revoked(&got) {
                return Err(Status::unavailable(
                    "the broker's JWT-SVID is covered by a revocation; retry shortly",
                ));
            }
        }
        Ok(Response::new(pb::JwtsvidResponse {
            svids: vec![pb::Jwtsvid {
                spiffe_id: self.own_id.to_string(),
                svid: got.svid.expose().to_owned(),
                hint: String::new(),
            }],
        }))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<pb::ValidateJwtsvidRequest>,
    ) -> Result<Response<pb::ValidateJwtsvidResponse>, Status> {
        self.admit(&request)?;
        let body = request.into_inner();
        if body.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if body.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        if body.svid.len() > MAX_SVID_BYTES {
            return Err(Status::invalid_argument(format!(
                "the JWT-SVID is longer than {MAX_SVID_BYTES} bytes"
            )));
        }
        let (jwks, revocations, denied) = {
            let mesh = self.mesh.borrow();
            let Some(jwks) = mesh.jwks.clone() else {
                return Err(Status::unavailable(
                    "no JWT bundle from the broker yet; retry shortly",
                ));
            };
            (
                jwks,
                Arc::clone(&mesh.revocations),
                Arc::clone(&mesh.denied),
            )
        };
        let now = self.clock.now();
        let verified =
            crate::token::jwt_svid::verify(&body.svid, &jwks, &body.audience, now, JWT_LEEWAY)
                .map_err(|e| Status::invalid_argument(format!("the JWT-SVID is not valid: {e}")))?;
        if denied.is_denied(&verified.sub) {
            return Err(Status::invalid_argument(format!(
                "the JWT-SVID is not valid: {} is denied",
                verified.sub
            )));
        }
        let revoked = revocations.covers(&crate::token::TokenRef {
            jti: verified.jti.as_deref().unwrap_or(""),
            sub: &verified.sub,
            jkt: None,
            kid: &verified.kid,
            iat: verified.iat.unwrap_or(0),
        });
        if revoked {
            return Err(Status::invalid_argument(
                "the JWT-SVID is not valid: it has been revoked",
            ));
        }
        Ok(Response::new(pb::ValidateJwtsvidResponse {
            spiffe_id: verified.sub.to_string(),
            claims: Some(proto_struct(&verified.claims)),
        }))
    }
}

/// Serves the Workload API on `listener` until `shutdown` (then open
/// streams end).
///
/// # Errors
/// If accepting fails.
pub async fn serve(
    api: Arc<WorkloadApi>,
    listener: tokio::net::UnixListener,
    listen: crate::http::Listen,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use tower_service::Service as _;
    let routes = tonic::service::Routes::builder()
        .add_service(
            pb::spiffe_workload_api_server::SpiffeWorkloadApiServer::new(api)
                .max_decoding_message_size(64 * 1024),
        )
        .clone()
        .routes()
        .prepare();
    crate::http::serve_unix(
        listener,
        listen.http2_only(),
        move |mut req, peer| {
            let mut routes = routes.clone();
            req.extensions_mut().insert(peer);
            async move {
                match routes.call(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        },
        shutdown,
    )
    .await
}
