//! The Identity service: X.509-SVIDs by attestation (join token or
//! ServiceAccount token), renewal, and a workload's second SVID for its
//! application, all through one signing and recording path
//! ([`issue_svid`]).

use super::grpc::{client_certs, denied_status, internal, peer_id};
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::broker::Broker;
use crate::broker::cluster::SaAttestError;
use crate::broker::state::denials::Call;
use crate::ca::CaError;
use crate::identity::k8s::Pod;
use crate::identity::{JoinToken, PeerIdentity, SpiffeId};
use crate::proto::v1 as pb;
use crate::store::{SvidRecord, Write};
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The least life a caller's SVID must have left for a workload SVID to
/// be worth signing (it expires when the caller's does): 10 s, or a tenth
/// of the SVID lifetime when that is shorter (a broker issuing seconds-long
/// SVIDs), at least 1 s.
pub const MIN_WORKLOAD_SVID_LIFE: u64 = 10;

fn min_workload_svid_life(svid_ttl: u64) -> u64 {
    MIN_WORKLOAD_SVID_LIFE.min(svid_ttl / 10).max(1)
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

/// Issues an X.509-SVID for `id` from the CSR, valid `ttl` seconds,
/// records it (inventory and audit, durably, with the `pod` it is for
/// when known) and counts it. `method` says how the identity was proved:
/// `join_token`, `k8s_sa`, `renew`, `workload`, or `admin_mint` (then `actor` is the
/// admin; otherwise it is `id`). A denied `id` gets nothing, however it
/// proved itself: the one check for every SVID the broker signs.
pub(in crate::broker::serve) async fn issue_svid(
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
        "workload" => AuditKind::WorkloadSvid,
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
        let call = match method {
            "renew" => Call::Renew,
            "workload" => Call::WorkloadSvid,
            _ => Call::Attest,
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
        let serial = client_certs(&request)
            .and_then(<[_]>::first)
            .and_then(|leaf| crate::ca::serial_of(leaf).ok());
        let pod = match &serial {
            Some(serial) => broker
                .store()
                .svid_pod(serial)
                .await
                .map_err(|e| internal("reading the SVID renewed", e))?,
            None => None,
        };
        // A workload SVID never outlives the sidecar SVID it was issued
        // under: renewing it would take it out of the sidecar's lifecycle.
        if let Some(serial) = &serial {
            let method = broker
                .store()
                .svid_method(serial)
                .await
                .map_err(|e| internal("reading the SVID renewed", e))?;
            if method.as_deref() == Some("workload") {
                return Err(Status::failed_precondition(
                    "this is a workload SVID (from the SPIFFE Workload API): it is not renewed; the sidecar hands out a new one with its own SVID",
                ));
            }
        }
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
        request: Request<pb::WorkloadSvidRequest>,
    ) -> Result<Response<pb::SvidResponse>, Status> {
        issue_workload_svid(&self.0, &request).await
    }
}

/// A second X.509-SVID for the caller's own identity, with a key made
/// for its application (the SPIFFE Workload API's `FetchX509SVID` must
/// never hand out the sidecar's key): the CSR may name no identity or
/// exactly the caller's, its key must not be the caller's, and the SVID
/// expires no later than the caller's, so it extends nothing (which is
/// why TokenReview does not stop it as it stops Renew).
async fn issue_workload_svid(
    broker: &Broker,
    request: &Request<pb::WorkloadSvidRequest>,
) -> Result<Response<pb::SvidResponse>, Status> {
    let id = peer_id(broker, request, Call::WorkloadSvid).await?;
    let certs = client_certs(request);
    let caller = certs
        .and_then(<[_]>::first)
        .map(|leaf| PeerIdentity::of(leaf))
        .transpose()
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?
        .ok_or_else(|| Status::unauthenticated("a client certificate (X.509-SVID) is required"))?;
    let now = broker.now();
    let left = caller.expires_at.saturating_sub(now);
    let pod = broker.caller_pod(certs).await;
    if left < min_workload_svid_life(broker.settings().svid_ttl) {
        let status = Status::failed_precondition(format!(
            "the calling X.509-SVID expires in {left}s and a workload SVID cannot outlive it: renew first"
        ));
        return Err(workload_refused(broker, &id, status, "caller_expiring", now).await);
    }
    let ttl = broker.settings().svid_ttl.min(left);
    let csr = &request.get_ref().csr_der;
    let svid = sign_svid(broker, &id, csr, "workload", ttl, &id, now).await?;
    // The broker never sees the sidecar's private key, but it does see
    // the public half: a CSR for it would hand the workload a certificate
    // for the sidecar's DPoP key.
    let issued = PeerIdentity::of(&svid.cert_der)
        .map_err(|e| internal("reading a signed workload SVID", e))?;
    if issued.jkt == caller.jkt {
        let status = Status::invalid_argument(
            "the CSR's key is the calling SVID's own key; a workload SVID needs a key made for the workload",
        );
        return Err(workload_refused(broker, &id, status, "same_key", now).await);
    }
    hand_out(broker, &id, svid, "workload", &id, pod.as_ref(), now).await
}

/// Counts and audits a refused workload SVID, and answers `status`.
async fn workload_refused(
    broker: &Broker,
    id: &SpiffeId,
    status: Status,
    reason: &'static str,
    now: u64,
) -> Status {
    broker.metrics().attestations.inc(&["workload", "denied"]);
    let event = AuditEvent::new(AuditKind::WorkloadSvid, Outcome::Denied, now)
        .actor(id)
        .field("spiffe_id", id.as_str())
        .field("method", "workload")
        .field("reason", reason)
        .field("detail", status.message());
    broker.audit(event).await;
    status
}

/// The Identity service.
pub fn identity_server(
    broker: Arc<Broker>,
) -> pb::identity_server::IdentityServer<impl pb::identity_server::Identity> {
    pb::identity_server::IdentityServer::new(IdentityService(broker))
}
