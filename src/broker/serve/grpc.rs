//! The gRPC services (the Identity service is in [`super::identity`]).
//! Each handler turns the request into domain types at once, calls the
//! broker, and maps failures to a precise status: caller mistakes say
//! what to fix, internal faults say "internal error" and log the detail.

use crate::broker::Broker;
use crate::broker::state::denials::{Call, CallerError};
use crate::broker::state::issue::{IssueError, IssueInput};
use crate::broker::state::jwt_svid::{JwtSvidInput, audiences};
use crate::broker::state::wit::{WitError, WitInput};
use crate::identity::SpiffeId;
use crate::identity::denial::DENIED_METADATA;
use crate::proto::v1 as pb;
use crate::token::{Audience, Scope, Scopes};
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Logs an internal fault and hides it from the caller.
pub(super) fn internal(context: &str, error: impl std::fmt::Display) -> Status {
    tracing::error!(%error, "{context}");
    Status::internal("internal error")
}

/// The caller's client certificate chain, leaf first, as the TLS layer
/// verified it (the connection's [`crate::http::Peer`], put in the request
/// by [`super::serve_grpc`]).
pub(super) fn client_certs<T>(
    request: &Request<T>,
) -> Option<&[rustls_pki_types::CertificateDer<'static>]> {
    request
        .extensions()
        .get::<Arc<crate::http::Peer>>()
        .and_then(|peer| peer.certs.as_deref())
}

/// The caller's SPIFFE ID from its verified client certificate (the
/// connection's [`crate::http::Peer`], put in the request by
/// [`super::serve_grpc`]). A denied identity is refused (counted and audited as
/// a refusal of `call`).
pub(super) async fn peer_id<T>(
    broker: &Broker,
    request: &Request<T>,
    call: Call,
) -> Result<SpiffeId, Status> {
    let certs = client_certs(request);
    match broker.caller(certs) {
        Ok(id) => Ok(id),
        Err(CallerError::Denied { id }) => {
            broker.refuse_denied(&id, call).await;
            Err(denied_status(id))
        }
        Err(e) => Err(Status::unauthenticated(e.to_string())),
    }
}

/// PERMISSION_DENIED for a denied identity, marked so a sidecar knows it
/// is cut off (see [`DENIED_METADATA`]).
pub(super) fn denied_status(id: SpiffeId) -> Status {
    let mut status = Status::permission_denied(CallerError::Denied { id }.to_string());
    status.metadata_mut().insert(
        DENIED_METADATA,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    status
}

/// The one mapping from issuance refusals to gRPC statuses.
fn issue_status(e: IssueError) -> Status {
    match e {
        IssueError::Proof(_) => Status::unauthenticated(e.to_string()),
        IssueError::Busy => Status::unavailable(e.to_string()),
        IssueError::Denied(_) => Status::permission_denied(e.to_string()),
        IssueError::RateLimited { retry_after, .. } => {
            let mut status = Status::resource_exhausted(e.to_string());
            if let Ok(v) = retry_after.to_string().parse() {
                status.metadata_mut().insert("retry-after", v);
            }
            status
        }
        IssueError::Internal => Status::internal("internal error"),
    }
}

/// The one mapping from WIT refusals to gRPC statuses.
fn wit_status(e: WitError) -> Status {
    match e {
        WitError::KeyNotP256 => Status::invalid_argument(e.to_string()),
        WitError::Certificate(_) => Status::unauthenticated(e.to_string()),
        WitError::CertificateExpired { .. } => Status::failed_precondition(e.to_string()),
        WitError::Denied(_) => Status::permission_denied(e.to_string()),
        WitError::Internal => Status::internal("internal error"),
    }
}

struct TokensService(Arc<Broker>);

#[tonic::async_trait]
impl pb::tokens_server::Tokens for TokensService {
    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let broker = &self.0;
        let caller = peer_id(broker, &request, Call::Issue).await?;
        let certs = client_certs(&request);
        let pod = broker.caller_pod(certs).await;
        let body = request.into_inner();
        let audience: Audience = body
            .audience
            .parse()
            .map_err(|e| Status::invalid_argument(format!("audience: {e}")))?;
        let requested = body
            .scopes
            .iter()
            .map(|s| s.parse::<Scope>())
            .collect::<Result<Vec<_>, _>>()
            .and_then(Scopes::new)
            .map_err(|e| Status::invalid_argument(format!("scopes: {e}")))?;

        let issued = broker
            .issue(&IssueInput {
                caller: &caller,
                audience: &audience,
                scopes: &requested,
                ttl: (body.ttl_seconds > 0).then_some(u64::from(body.ttl_seconds)),
                proof: &body.dpop_proof,
                htu: broker.issue_htu(),
                require_nonce: false,
                via: "grpc",
                pod: pod.as_ref(),
            })
            .await
            .map_err(issue_status)?;
        let (token, claims) = (issued.token, issued.claims);
        Ok(Response::new(pb::IssueResponse {
            access_token: token.expose().to_owned(),
            token_type: "DPoP".into(),
            expires_at: i64::try_from(claims.exp).unwrap_or(i64::MAX),
            scopes: claims.scope.iter().map(ToString::to_string).collect(),
            jti: claims.jti,
            kid: claims.kid,
        }))
    }

    async fn issue_jwt_svid(
        &self,
        request: Request<pb::JwtSvidRequest>,
    ) -> Result<Response<pb::JwtSvidResponse>, Status> {
        let broker = &self.0;
        let caller = peer_id(broker, &request, Call::IssueJwtSvid).await?;
        let certs = client_certs(&request);
        let pod = broker.caller_pod(certs).await;
        let body = request.into_inner();
        let audiences =
            audiences(&body.audience).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let issued = broker
            .issue_jwt_svid(&JwtSvidInput {
                caller: &caller,
                audiences: &audiences,
                ttl: (body.ttl_seconds > 0).then_some(u64::from(body.ttl_seconds)),
                pod: pod.as_ref(),
            })
            .await
            .map_err(issue_status)?;
        Ok(Response::new(pb::JwtSvidResponse {
            svid: issued.svid.expose().to_owned(),
            expires_at: i64::try_from(issued.claims.exp).unwrap_or(i64::MAX),
            jti: issued.claims.jti,
            kid: issued.claims.kid,
        }))
    }

    async fn issue_wit(
        &self,
        request: Request<pb::WitRequest>,
    ) -> Result<Response<pb::WitResponse>, Status> {
        let broker = &self.0;
        let caller = peer_id(broker, &request, Call::IssueWit).await?;
        let certs = client_certs(&request);
        // `peer_id` found the caller in this leaf: it is there.
        let leaf = certs.and_then(<[_]>::first).ok_or_else(|| {
            Status::unauthenticated("a client certificate (X.509-SVID) is required")
        })?;
        let pod = broker.caller_pod(certs).await;
        let ttl = request.get_ref().ttl_seconds;
        let issued = broker
            .issue_wit(&WitInput {
                caller: &caller,
                certificate: leaf,
                ttl: (ttl > 0).then_some(u64::from(ttl)),
                via: "grpc",
                pod: pod.as_ref(),
            })
            .await
            .map_err(wit_status)?;
        let unix = |t: u64| i64::try_from(t).unwrap_or(i64::MAX);
        Ok(Response::new(pb::WitResponse {
            wit: issued.wit.expose().to_owned(),
            expires_at: unix(issued.claims.exp),
            jti: issued.claims.jti,
            kid: issued.claims.kid,
            issued_at: unix(issued.claims.iat),
        }))
    }
}

struct WatchService(Arc<Broker>);

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::Update, Status>> + Send>>;

#[tonic::async_trait]
impl pb::watch_server::Watch for WatchService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        let broker = Arc::clone(&self.0);
        let caller = peer_id(&broker, &request, Call::Watch).await?;
        let after = request.get_ref().after_sequence;
        let newest = *broker.watch_changes().borrow();
        // A fresh start, or a sequence this broker never issued (another
        // store): the whole current state. Otherwise every change since.
        let fresh = after == 0 || after > newest;
        let mut first = if fresh {
            broker.store().current_state(broker.now()).await
        } else {
            broker.store().changes_after(after, CHANGE_PAGE).await
        }
        .map_err(|e| internal("reading the change feed", e))?;
        if fresh {
            // Revocations and denials before the keys, bundle and rules: a
            // sidecar is ready (and verifies) once it holds the latter, so
            // by then it knows every revocation in force.
            first.sort_by_key(|c| {
                (
                    matches!(c.kind.as_str(), "jwks" | "bundle" | "policy"),
                    c.seq,
                )
            });
        }
        tracing::debug!(%caller, after, "watch subscriber");
        // One task per subscriber feeds its stream; the stream ends when
        // the broker closes (so shutdown can finish), the client leaves,
        // or an admin denies the subscriber (a denial is in force before
        // the feed moves past it, so the wake-up finds it).
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let mut changes = broker.watch_changes();
            let mut last = after;
            let mut pending = first;
            loop {
                if broker.is_denied(&caller) {
                    broker.refuse_denied(&caller, Call::Watch).await;
                    let _ = tx.send(Err(denied_status(caller))).await;
                    return;
                }
                for change in pending.drain(..) {
                    last = last.max(change.seq);
                    if tx.send(update(&change, &caller)).await.is_err() {
                        return;
                    }
                }
                // Page through a backlog before waiting.
                if last < *changes.borrow_and_update() {
                    match broker.store().changes_after(last, CHANGE_PAGE).await {
                        Ok(more) if !more.is_empty() => {
                            pending = more;
                            continue;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            let _ = tx.send(Err(internal("reading the change feed", e))).await;
                            return;
                        }
                    }
                }
                tokio::select! {
                    () = broker.closed() => return,
                    () = tx.closed() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Changes read from the store at a time.
const CHANGE_PAGE: u32 = 256;

/// A stored change as a Watch update for `subscriber`: a policy change
/// carries only the access rules that protect the subscriber.
fn update(change: &crate::store::Change, subscriber: &SpiffeId) -> Result<pb::Update, Status> {
    let kind = match change.kind.as_str() {
        "jwks" => pb::update::Kind::Jwks(pb::Jwks {
            json: change.body.clone(),
        }),
        "bundle" => {
            let roots: Vec<String> = serde_json::from_str(&change.body)
                .map_err(|e| internal("reading a stored bundle change", e))?;
            let roots_der = roots
                .iter()
                .map(|r| crate::jose::b64::decode(r.as_bytes()))
                .collect::<Result<_, _>>()
                .map_err(|e| internal("reading a stored bundle change", e))?;
            pb::update::Kind::Bundle(pb::TrustBundle { roots_der })
        }
        "revocation" => {
            use crate::token::{Revocation, RevocationTarget};
            let r = Revocation::from_json(&change.body)
                .map_err(|e| internal("reading a stored revocation", e))?;
            let target = match r.target {
                RevocationTarget::Jti(j) => pb::revocation::Target::Jti(j),
                RevocationTarget::Subject(s) => pb::revocation::Target::Subject(s.to_string()),
                RevocationTarget::Jkt(k) => pb::revocation::Target::Jkt(k.to_string()),
                RevocationTarget::Everything => pb::revocation::Target::Everything(true),
                RevocationTarget::Kid(k) => pb::revocation::Target::Kid(k),
            };
            pb::update::Kind::Revocation(pb::Revocation {
                target: Some(target),
                issued_before: i64::try_from(r.issued_before).unwrap_or(i64::MAX),
                expires_at: i64::try_from(r.expires_at).unwrap_or(i64::MAX),
                reason: r.reason,
            })
        }
        "denial" => {
            let d = crate::identity::Denial::from_json(&change.body)
                .map_err(|e| internal("reading a stored identity denial", e))?;
            pb::update::Kind::Denial(pb::IdentityDenial {
                spiffe_id: d.spiffe_id.to_string(),
                denied: d.denied,
                reason: d.reason,
                at: i64::try_from(d.at).unwrap_or(i64::MAX),
            })
        }
        "policy" => {
            let all = crate::policy::Policy::parse(&change.body)
                .map_err(|e| internal("reading a stored policy change", e))?;
            pb::update::Kind::Policy(pb::AccessPolicy {
                version: change.seq,
                yaml: all.access_document(Some(subscriber)),
            })
        }
        other => {
            return Err(internal(
                "reading the change feed",
                format!("unknown change kind {other:?}"),
            ));
        }
    };
    Ok(pb::Update {
        sequence: change.seq,
        committed_at_ms: i64::try_from(change.at_ms).unwrap_or(i64::MAX),
        kind: Some(kind),
    })
}

/// The Tokens service.
pub fn tokens_server(
    broker: Arc<Broker>,
) -> pb::tokens_server::TokensServer<impl pb::tokens_server::Tokens> {
    pb::tokens_server::TokensServer::new(TokensService(broker))
}

/// The Watch service.
pub fn watch_server(
    broker: Arc<Broker>,
) -> pb::watch_server::WatchServer<impl pb::watch_server::Watch> {
    pb::watch_server::WatchServer::new(WatchService(broker))
}
