//! What the Admin calls share: the admin check, audit of reads,
//! argument checks, and wire conversions.

use super::super::grpc::{internal, peer_id};
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::broker::Broker;
use crate::identity::SpiffeId;
use crate::proto::v1 as pb;
use tonic::{Request, Response, Status};

/// The caller, if it is an admin; a refusal is audited with the call's
/// name.
pub(super) async fn admin<T>(
    broker: &Broker,
    request: &Request<T>,
    call: &str,
) -> Result<SpiffeId, Status> {
    let id = peer_id(broker, request, crate::broker::state::denials::Call::Admin).await?;
    if broker.is_admin(&id) {
        return Ok(id);
    }
    tracing::warn!(caller = %id, call, "admin call refused: not an admin");
    broker
        .audit(
            AuditEvent::new(AuditKind::AdminCall, Outcome::Denied, broker.now())
                .actor(&id)
                .field("call", call)
                .field("reason", "not_admin"),
        )
        .await;
    Err(Status::permission_denied(format!(
        "{id} is not an admin of this broker"
    )))
}

/// Audits an admin's read (keys, audit, inventory).
pub(super) async fn audit_query(broker: &Broker, caller: &SpiffeId, what: &str) {
    broker
        .audit(
            AuditEvent::new(AuditKind::AdminQuery, Outcome::Ok, broker.now())
                .actor(caller)
                .field("what", what),
        )
        .await;
}

/// A query condition: empty means none; too long is refused, never
/// ignored (ignoring it would widen the query).
pub(super) fn condition(text: String, what: &str) -> Result<Option<String>, Status> {
    if text.len() > 512 {
        return Err(Status::invalid_argument(format!(
            "{what} is longer than 512 bytes"
        )));
    }
    Ok(Some(text).filter(|s| !s.is_empty()))
}

/// Audiences as the Admin messages carry them: separated by single spaces.
pub(super) fn audiences(aud: &[crate::token::Audience]) -> String {
    let texts: Vec<&str> = aud.iter().map(crate::token::Audience::as_str).collect();
    texts.join(" ")
}

pub(super) fn unix(t: u64) -> i64 {
    i64::try_from(t).unwrap_or(i64::MAX)
}

pub(super) fn version_message(v: crate::store::PolicyVersion) -> pb::PolicyVersion {
    pb::PolicyVersion {
        version: v.version,
        created_at: unix(v.created_at),
        author: v.author,
        source: v.source,
        comment: v.comment,
        yaml: v.yaml,
    }
}

/// The answer to a policy change; a refusal is audited.
pub(super) async fn policy_change(
    broker: &Broker,
    caller: &SpiffeId,
    how: &str,
    change: Result<
        crate::broker::state::governance::PolicyChange,
        crate::broker::state::governance::PolicyChangeError,
    >,
) -> Result<Response<pb::PolicyChangeResponse>, Status> {
    use crate::broker::state::governance::PolicyChangeError as E;
    let change = match change {
        Ok(change) => change,
        Err(e) => {
            let status = match &e {
                E::FileMode(_) => Status::failed_precondition(e.to_string()),
                E::Invalid(_) => Status::invalid_argument(e.to_string()),
                E::NoVersion(_) => Status::not_found(e.to_string()),
                _ => return Err(internal("changing the policy", e)),
            };
            broker
                .audit(
                    AuditEvent::new(AuditKind::PolicyChange, Outcome::Denied, broker.now())
                        .actor(caller)
                        .field("how", how)
                        .field("reason", status.message()),
                )
                .await;
            return Err(status);
        }
    };
    let count = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    Ok(Response::new(pb::PolicyChangeResponse {
        version: change.version,
        changed: !change.diff.is_empty(),
        added: count(change.diff.added),
        removed: count(change.diff.removed),
        diff: change.diff.text,
    }))
}

pub(super) fn workload_id(text: &str, broker: &Broker) -> Result<SpiffeId, Status> {
    let id: SpiffeId = text
        .parse()
        .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
    if id.trust_domain() != broker.settings().trust_domain.trust_domain() {
        return Err(Status::invalid_argument(format!(
            "spiffe_id {id} is not in trust domain {}",
            broker.settings().trust_domain
        )));
    }
    if id.path().is_empty() {
        return Err(Status::invalid_argument(
            "spiffe_id must name a workload, not the trust domain",
        ));
    }
    Ok(id)
}

/// The answer to a deny or allow; a refusal is audited under `kind`.
pub(super) async fn denial_change(
    broker: &Broker,
    caller: &SpiffeId,
    id: &SpiffeId,
    kind: AuditKind,
    done: Result<
        crate::broker::state::denials::DenialChange,
        crate::broker::state::denials::DenyError,
    >,
) -> Result<Response<pb::IdentityDenialResponse>, Status> {
    use crate::broker::state::denials::DenyError as E;
    let done = match done {
        Ok(done) => done,
        Err(e) => {
            let status = match &e {
                E::Admin(_) | E::Broker(_) => Status::failed_precondition(e.to_string()),
                E::NotAWorkload { .. } => Status::invalid_argument(e.to_string()),
                _ => return Err(internal("recording an identity denial", e)),
            };
            broker
                .audit(
                    AuditEvent::new(kind, Outcome::Denied, broker.now())
                        .actor(caller)
                        .field("spiffe_id", id.as_str())
                        .field("reason", status.message()),
                )
                .await;
            return Err(status);
        }
    };
    Ok(Response::new(pb::IdentityDenialResponse {
        sequence: done.sequence,
        was_denied: done.was_denied,
        at: unix(done.at),
    }))
}
