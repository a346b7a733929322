//! The gRPC services. Each handler turns the request into domain types at
//! once, calls the broker, and maps failures to a precise status: caller
//! mistakes say what to fix, internal faults say "internal error" and log
//! the detail.

use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::broker::Broker;
use crate::broker::cluster::SaAttestError;
use crate::broker::state::denials::{Call, CallerError};
use crate::broker::state::issue::{IssueError, IssueInput};
use crate::ca::CaError;
use crate::identity::denial::DENIED_METADATA;
use crate::identity::k8s::Pod;
use crate::identity::{JoinToken, SpiffeId};
use crate::proto::v1 as pb;
use crate::store::{SvidRecord, Write};
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

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::CsrTooLarge
        | CaError::CsrInvalid
        | CaError::CsrKeyType { .. }
        | CaError::Lifetime { .. } => Status::invalid_argument(e.to_string()),
        CaError::CsrIdentity { .. } => Status::permission_denied(e.to_string()),
        other => internal("issuing a certificate", other),
    }
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
    let certs = request
        .extensions()
        .get::<Arc<crate::http::Peer>>()
        .and_then(|peer| peer.certs.as_deref());
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

/// Issues an X.509-SVID for `id` from the CSR, valid `ttl` seconds,
/// records it (inventory and audit, durably, with the `pod` it is for
/// when known) and counts it. `method` says how the identity was proved:
/// `join_token`, `k8s_sa`, `renew`, or `admin_mint` (then `actor` is the
/// admin; otherwise it is `id`). A denied `id` gets nothing, however it
/// proved itself: the one check for every SVID the broker signs.
pub(super) async fn issue_svid(
    broker: &Broker,
    id: &SpiffeId,
    csr: &[u8],
    method: &'static str,
    ttl: u64,
    actor: &SpiffeId,
    pod: Option<&Pod>,
) -> Result<Response<pb::SvidResponse>, Status> {
    let now = broker.now();
    let svid = sign_svid(broker, id, csr, method, ttl, actor, now).await?;
    hand_out(broker, id, svid, method, actor, pod, now).await
}

fn svid_audit_kind(method: &str) -> AuditKind {
    match method {
        "renew" => AuditKind::Renew,
        "admin_mint" => AuditKind::SvidMint,
        _ => AuditKind::Attest,
    }
}

/// Checks the CSR (form, self-signature, key, identity) and signs an
/// X.509-SVID for `id`, recording nothing yet; a refusal is counted and
/// audited.
async fn sign_svid(
    broker: &Broker,
    id: &SpiffeId,
    csr: &[u8],
    method: &'static str,
    ttl: u64,
    actor: &SpiffeId,
    now: u64,
) -> Result<crate::ca::Svid, Status> {
    // A denied `id` gets nothing, however it proved itself: the one
    // check for every SVID the broker signs.
    if broker.is_denied(id) {
        broker.metrics().attestations.inc(&[method, "denied"]);
        if method == "admin_mint" {
            let event = AuditEvent::new(svid_audit_kind(method), Outcome::Denied, now)
                .actor(actor)
                .field("spiffe_id", id.as_str())
                .field("method", method)
                .field("reason", "identity_denied");
            broker.audit(event).await;
            return Err(Status::failed_precondition(format!(
                "{id} is denied; `tally ctl identities allow` lifts the denial"
            )));
        }
        let call = if method == "renew" {
            Call::Renew
        } else {
            Call::Attest
        };
        broker.refuse_denied(id, call).await;
        return Err(denied_status(id.clone()));
    }
    let e = match broker.ca().issue_svid(csr, id, ttl, now) {
        Ok(svid) => return Ok(svid),
        Err(e) => e,
    };
    let status = ca_status(e);
    let outcome = if status.code() == tonic::Code::Internal {
        Outcome::Error
    } else {
        Outcome::Denied
    };
    broker
        .metrics()
        .attestations
        .inc(&[method, outcome.as_str()]);
    let event = AuditEvent::new(svid_audit_kind(method), outcome, now)
        .actor(actor)
        .field("spiffe_id", id.as_str())
        .field("method", method)
        .field("reason", "csr")
        .field("detail", status.message());
    broker.audit(event).await;
    Err(status)
}

/// Records a signed X.509-SVID (inventory and audit, durably), counts it,
/// and answers with it.
async fn hand_out(
    broker: &Broker,
    id: &SpiffeId,
    svid: crate::ca::Svid,
    method: &'static str,
    actor: &SpiffeId,
    pod: Option<&Pod>,
    now: u64,
) -> Result<Response<pb::SvidResponse>, Status> {
    let mut event = AuditEvent::new(svid_audit_kind(method), Outcome::Ok, now)
        .actor(actor)
        .field("spiffe_id", id.as_str())
        .field("method", method)
        .field("serial", svid.serial.as_str())
        .field("expires_at", svid.expires_at);
    if let Some(pod) = pod {
        event = event
            .field("pod", pod.name.as_str())
            .field("pod_uid", pod.uid.as_str());
    }
    let record = SvidRecord {
        serial: svid.serial.clone(),
        spiffe_id: id.clone(),
        method,
        issued_at: now,
        expires_at: svid.expires_at,
        pod: pod.cloned(),
    };
    broker
        .record(Some(Write::Svid(record)), event)
        .await
        .map_err(|e| internal("recording an X.509-SVID", e))?;
    broker.note_svid_pod(svid.serial.clone(), pod.cloned());
    broker.metrics().attestations.inc(&[method, "ok"]);
    tracing::info!(spiffe_id = %id, method, serial = %svid.serial, "issued X.509-SVID");
    Ok(Response::new(pb::SvidResponse {
        spiffe_id: id.to_string(),
        svid_der: svid.cert_der,
        chain_der: svid.chain_der,
        bundle_der: broker.ca().bundle_der(),
        expires_at: i64::try_from(svid.expires_at).unwrap_or(i64::MAX),
        issuer: broker.settings().issuer.clone(),
    }))
}

/// Refuses a join token: the reason is logged and audited; the caller
/// learns only that the token does not work.
async fn join_token_refused(
    broker: &Broker,
    hash: &crate::identity::JoinTokenHash,
    refusal: crate::store::JoinTokenRefusal,
) -> Status {
    tracing::warn!(?refusal, token = ?hash, "join token refused");
    broker.metrics().attestations.inc(&["join_token", "denied"]);
    let event = AuditEvent::new(AuditKind::Attest, Outcome::Denied, broker.now())
        .field("method", "join_token")
        .field("reason", refusal.to_string())
        .field("join_token_sha256", crate::audit::hex(&hash.0));
    broker.audit(event).await;
    Status::permission_denied("join token is not valid (unknown, expired or already used)")
}

/// Attests with a join token. The CSR is checked and the SVID signed
/// before the token is used, so a refused CSR leaves it usable; then one
/// atomic statement uses it (of concurrent callers one wins), and only
/// the winner's SVID is recorded and handed out.
async fn attest_join_token(
    broker: &Broker,
    text: &str,
    csr: &[u8],
) -> Result<Response<pb::SvidResponse>, Status> {
    let token = JoinToken::presented(text)
        .ok_or_else(|| Status::invalid_argument("join_token is empty or too long"))?;
    let hash = token.hash();
    let now = broker.now();
    let id = match broker
        .store()
        .join_token_identity(&hash, now)
        .await
        .map_err(|e| internal("reading a join token", e))?
    {
        Ok(id) => id,
        Err(refusal) => return Err(join_token_refused(broker, &hash, refusal).await),
    };
    let ttl = broker.settings().svid_ttl;
    let svid = sign_svid(broker, &id, csr, "join_token", ttl, &id, now).await?;
    match broker
        .store()
        .consume_join_token(&hash, now)
        .await
        .map_err(|e| internal("using a join token", e))?
    {
        Ok(used) if used == id => {}
        Ok(used) => {
            return Err(internal(
                "using a join token",
                format!("the token named {id} when read and {used} when used"),
            ));
        }
        // Another caller used it meanwhile: its SVID stands, this one is
        // dropped unseen.
        Err(refusal) => return Err(join_token_refused(broker, &hash, refusal).await),
    }
    hand_out(broker, &id, svid, "join_token", &id, None, now).await
}

/// The one mapping from ServiceAccount attestation refusals to statuses,
/// and whether the refusal is the token's (`Denied`) or the broker's
/// (`Error`: keys or the API server unreachable, never taken as a yes).
fn sa_status(e: &SaAttestError) -> (Status, Outcome) {
    match e {
        SaAttestError::Token(_) => (Status::permission_denied(e.to_string()), Outcome::Denied),
        SaAttestError::Review(_) => (Status::unauthenticated(e.to_string()), Outcome::Denied),
        SaAttestError::KeysUnavailable(_) | SaAttestError::ReviewUnavailable(_) => {
            (Status::unavailable(e.to_string()), Outcome::Error)
        }
    }
}

/// Attests with a Kubernetes ServiceAccount token: verified (keys by
/// discovery or file), reviewed at the API server when configured, then
/// an SVID for its account, recorded with the pod it names. The token is
/// never logged or audited; refusals are, with their reason.
async fn attest_service_account(
    broker: &Broker,
    token: &str,
    csr: &[u8],
) -> Result<Response<pb::SvidResponse>, Status> {
    let Some(accounts) = &broker.settings().service_accounts else {
        return Err(Status::failed_precondition(
            "this broker does not accept Kubernetes ServiceAccount tokens (start it with --sa-issuer, and --sa-jwks for offline keys); use a join token",
        ));
    };
    let now = broker.now();
    let refused = |status: Status, outcome: Outcome, pod: Option<&Pod>| {
        tracing::warn!(reason = %status.message(), "ServiceAccount token refused");
        broker
            .metrics()
            .attestations
            .inc(&["k8s_sa", outcome.as_str()]);
        let mut event = AuditEvent::new(AuditKind::Attest, outcome, now)
            .field("method", "k8s_sa")
            .field("reason", status.message());
        if let Some(pod) = pod {
            event = event
                .field("pod", pod.name.as_str())
                .field("pod_uid", pod.uid.as_str());
        }
        async move {
            broker.audit(event).await;
            Err(status)
        }
    };
    let account = match accounts.attest(token, now).await {
        Ok(account) => account,
        Err(e) => {
            let (status, outcome) = sa_status(&e);
            return refused(status, outcome, None).await;
        }
    };
    let id = match account.spiffe_id(broker.settings().trust_domain.trust_domain()) {
        Ok(id) => id,
        Err(e) => {
            let status = Status::permission_denied(format!("ServiceAccount name: {e}"));
            return refused(status, Outcome::Denied, account.pod.as_ref()).await;
        }
    };
    if let Some(node) = &account.node {
        tracing::debug!(spiffe_id = %id, node = %node, "ServiceAccount token from a pod on this node");
    }
    let ttl = broker.settings().svid_ttl;
    issue_svid(broker, &id, csr, "k8s_sa", ttl, &id, account.pod.as_ref()).await
}

struct IdentityService(Arc<Broker>);

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityService {
    async fn attest(
        &self,
        request: Request<pb::AttestRequest>,
    ) -> Result<Response<pb::SvidResponse>, Status> {
        let broker = &self.0;
        let body = request.into_inner();
        match body.credential {
            Some(pb::attest_request::Credential::JoinToken(text)) => {
                attest_join_token(broker, &text, &body.csr_der).await
            }
            Some(pb::attest_request::Credential::ServiceAccountToken(text)) => {
                let text = zeroize::Zeroizing::new(text);
                attest_service_account(broker, &text, &body.csr_der).await
            }
            None => Err(Status::invalid_argument(
                "set join_token or service_account_token",
            )),
        }
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::SvidResponse>, Status> {
        let broker = &self.0;
        let id = peer_id(broker, &request, Call::Renew).await?;
        // The renewed SVID stays with the pod its first one was attested by.
        let serial = request
            .extensions()
            .get::<Arc<crate::http::Peer>>()
            .and_then(|peer| peer.certs.as_deref())
            .and_then(<[_]>::first)
            .and_then(|leaf| crate::ca::serial_of(leaf).ok());
        let pod = match serial {
            Some(serial) => broker
                .store()
                .svid_pod(&serial)
                .await
                .map_err(|e| internal("reading the SVID renewed", e))?,
            None => None,
        };
        // With TokenReview on, a pod's SVID is renewed by its current
        // ServiceAccount token (Attest, reviewed again), never by the SVID
        // alone: the key of a deleted pod must not renew itself forever.
        if pod.is_some()
            && broker
                .settings()
                .service_accounts
                .as_ref()
                .is_some_and(|accounts| accounts.reviews())
        {
            return Err(Status::failed_precondition(
                "this SVID was attested by a pod's ServiceAccount token and TokenReview is on: attest again with the current token to renew",
            ));
        }
        let ttl = broker.settings().svid_ttl;
        let csr = &request.get_ref().csr_der;
        issue_svid(broker, &id, csr, "renew", ttl, &id, pod.as_ref()).await
    }

    async fn issue_workload_svid(
        &self,
        _request: Request<pb::WorkloadSvidRequest>,
    ) -> Result<Response<pb::SvidResponse>, Status> {
        Err(Status::unimplemented("workload SVIDs are not issued yet"))
    }
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

struct TokensService(Arc<Broker>);

#[tonic::async_trait]
impl pb::tokens_server::Tokens for TokensService {
    async fn issue(
        &self,
        request: Request<pb::IssueRequest>,
    ) -> Result<Response<pb::IssueResponse>, Status> {
        let broker = &self.0;
        let caller = peer_id(broker, &request, Call::Issue).await?;
        let certs = request
            .extensions()
            .get::<Arc<crate::http::Peer>>()
            .and_then(|peer| peer.certs.as_deref());
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
        _request: Request<pb::JwtSvidRequest>,
    ) -> Result<Response<pb::JwtSvidResponse>, Status> {
        Err(Status::unimplemented("JWT-SVIDs are not issued yet"))
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

/// The Identity service.
pub fn identity_server(
    broker: Arc<Broker>,
) -> pb::identity_server::IdentityServer<impl pb::identity_server::Identity> {
    pb::identity_server::IdentityServer::new(IdentityService(broker))
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
