//! The Admin gRPC service: join tokens, credentials for workloads without
//! a sidecar, key rotation, revocation, identity denial, and reading the
//! audit log. Only identities the broker lists as admins may call it;
//! every call is audited with the admin as actor, and every refusal with
//! the caller.

use super::grpc::internal;
use super::identity::issue_svid;
use helpers::{
    admin, audiences, audit_query, condition, denial_change, policy_change, unix, version_message,
    workload_id,
};

mod helpers;
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::broker::Broker;
use crate::broker::state::keys::KeyState;
use crate::clock::human_duration;
use crate::proto::v1 as pb;
use crate::store::AuditFilter;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Longest join token lifetime.
const MAX_JOIN_TOKEN_TTL: u64 = 86_400;
/// Longest admin-minted SVID lifetime.
const MAX_MINT_TTL: u64 = 86_400;

struct AdminService(Arc<Broker>);

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminService {
    async fn create_join_token(
        &self,
        request: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "CreateJoinToken").await?;
        let body = request.into_inner();
        let id = workload_id(&body.spiffe_id, broker)?;
        let ttl = match u64::from(body.ttl_seconds) {
            0 => 600,
            t if t <= MAX_JOIN_TOKEN_TTL => t,
            t => {
                return Err(Status::invalid_argument(format!(
                    "ttl {} is longer than the {} maximum",
                    human_duration(t),
                    human_duration(MAX_JOIN_TOKEN_TTL)
                )));
            }
        };
        let token = broker
            .create_join_token(&id, ttl, Some(&caller))
            .await
            .map_err(|e| internal("creating a join token", e))?;
        tracing::info!(admin = %caller, spiffe_id = %id, ttl, "join token created");
        Ok(Response::new(pb::CreateJoinTokenResponse {
            join_token: token.expose().to_owned(),
            expires_at: i64::try_from(broker.now() + ttl).unwrap_or(i64::MAX),
        }))
    }

    async fn mint_svid(
        &self,
        request: Request<pb::MintSvidRequest>,
    ) -> Result<Response<pb::SvidResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "MintSvid").await?;
        let body = request.into_inner();
        let id = workload_id(&body.spiffe_id, broker)?;
        let ttl = match u64::from(body.ttl_seconds) {
            0 => broker.settings().svid_ttl,
            t if t <= MAX_MINT_TTL => t,
            t => {
                return Err(Status::invalid_argument(format!(
                    "ttl {} is longer than the {} maximum",
                    human_duration(t),
                    human_duration(MAX_MINT_TTL)
                )));
            }
        };
        issue_svid(broker, &id, &body.csr_der, "admin_mint", ttl, &caller, None).await
    }

    async fn rotate_signing_key(
        &self,
        request: Request<pb::RotateSigningKeyRequest>,
    ) -> Result<Response<pb::RotateSigningKeyResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "RotateSigningKey").await?;
        let body = request.into_inner();
        let lead = u64::from(body.publish_lead_seconds);
        if body.revoke_old {
            if lead > 0 {
                return Err(Status::invalid_argument(
                    "revoke_old replaces a leaked key at once: publish_lead_seconds must be 0",
                ));
            }
            let (kid, withdrawn) = broker
                .replace_leaked_signing_key(&caller, &body.reason)
                .await
                .map_err(|e| internal("replacing the signing key", e))?;
            return Ok(Response::new(pb::RotateSigningKeyResponse {
                kid,
                signs_from: unix(broker.now()),
                withdrawn,
            }));
        }
        let (kid, signs_from) = broker
            .rotate_signing_key(lead, Some(&caller))
            .await
            .map_err(|e| internal("rotating the signing key", e))?;
        Ok(Response::new(pb::RotateSigningKeyResponse {
            kid,
            signs_from: unix(signs_from),
            withdrawn: Vec::new(),
        }))
    }

    async fn list_signing_keys(
        &self,
        request: Request<pb::ListSigningKeysRequest>,
    ) -> Result<Response<pb::ListSigningKeysResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "ListSigningKeys").await?;
        let records = broker
            .store()
            .signing_keys()
            .await
            .map_err(|e| internal("reading the signing keys", e))?;
        let jwks = broker.jwks();
        let now = broker.now();
        // The state comes from the broker's clock and the same choice
        // issuance makes, not from the ctl host's clock: a key retiring at
        // the end of a publish lead signs until then.
        let signing = broker.signing_kid();
        let keys = records
            .iter()
            .map(|k| pb::SigningKeyInfo {
                kid: k.kid.clone(),
                created_at: unix(k.created_at),
                signs_from: unix(k.sign_from),
                retired_at: k.retired_at.map_or(0, unix),
                published: jwks.get(&k.kid).is_some(),
                withdrawn_at: k.withdrawn_at.map_or(0, unix),
                state: KeyState::of(
                    k.sign_from,
                    k.withdrawn_at.is_some(),
                    signing.as_deref() == Some(k.kid.as_str()),
                    now,
                )
                .as_str()
                .to_owned(),
            })
            .collect();
        audit_query(broker, &caller, "signing_keys").await;
        Ok(Response::new(pb::ListSigningKeysResponse { keys }))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "VerifyAudit").await?;
        let checked = broker
            .verify_audit()
            .await
            .map_err(|e| internal("verifying the audit log", e))?;
        audit_query(broker, &caller, "audit_verify").await;
        Ok(Response::new(pb::VerifyAuditResponse {
            intact: checked.problem.is_none(),
            records_checked: checked.checked,
            chain_from: checked.head.chain_from,
            head_seq: checked.head.seq,
            head_sha256: checked.head.hash.to_string(),
            anchor_sha256: checked.head.anchor.to_string(),
            problem: checked.problem.map(|p| p.to_string()).unwrap_or_default(),
        }))
    }

    async fn query_audit(
        &self,
        request: Request<pb::QueryAuditRequest>,
    ) -> Result<Response<pb::QueryAuditResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "QueryAudit").await?;
        let q = request.into_inner();
        let limit = match q.limit {
            0 => 100,
            l @ 1..=1000 => l,
            l => {
                return Err(Status::invalid_argument(format!(
                    "limit {l} is more than 1000"
                )));
            }
        };
        let time = |t: i64, what: &str| -> Result<Option<u64>, Status> {
            match t {
                0 => Ok(None),
                t => u64::try_from(t)
                    .map(Some)
                    .map_err(|_| Status::invalid_argument(format!("{what} must be Unix seconds"))),
            }
        };
        let filter = AuditFilter {
            after: q.after,
            jti: condition(q.jti, "jti")?,
            kind: condition(q.kind, "kind")?,
            since: time(q.since, "since")?,
            until: time(q.until, "until")?,
            sub: condition(q.sub, "sub")?,
        };
        let records = broker
            .query_audit(&filter, limit)
            .await
            .map_err(|e| internal("querying the audit log", e))?;
        audit_query(broker, &caller, "audit_query").await;
        let next_after = if records.len() == limit as usize {
            records.last().map_or(0, |r| r.seq)
        } else {
            0
        };
        Ok(Response::new(pb::QueryAuditResponse {
            records: records.into_iter().map(|r| r.line).collect(),
            next_after,
        }))
    }

    async fn apply_policy(
        &self,
        request: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::PolicyChangeResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "ApplyPolicy").await?;
        let body = request.into_inner();
        if body.yaml.len() > crate::policy::yaml::MAX_LEN {
            return Err(Status::invalid_argument("the policy is larger than 1 MiB"));
        }
        let change = broker
            .apply_policy(&body.yaml, &caller, &body.comment)
            .await;
        policy_change(broker, &caller, "apply", change).await
    }

    async fn rollback_policy(
        &self,
        request: Request<pb::RollbackPolicyRequest>,
    ) -> Result<Response<pb::PolicyChangeResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "RollbackPolicy").await?;
        let body = request.into_inner();
        let change = broker
            .rollback_policy(body.version, &caller, &body.comment)
            .await;
        policy_change(broker, &caller, "rollback", change).await
    }

    async fn policy_history(
        &self,
        request: Request<pb::PolicyHistoryRequest>,
    ) -> Result<Response<pb::PolicyHistoryResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "PolicyHistory").await?;
        let limit = match request.get_ref().limit {
            0 => 100,
            l => l.min(crate::broker::state::governance::MAX_HISTORY),
        };
        let versions = broker
            .store()
            .policy_versions(limit)
            .await
            .map_err(|e| internal("reading the policy history", e))?;
        audit_query(broker, &caller, "policy_history").await;
        Ok(Response::new(pb::PolicyHistoryResponse {
            versions: versions
                .into_iter()
                .map(|v| pb::PolicyVersion {
                    yaml: String::new(),
                    ..version_message(v)
                })
                .collect(),
            policy_source: match broker.settings().policy_source {
                crate::broker::PolicySource::File { .. } => "file",
                crate::broker::PolicySource::Store => "store",
            }
            .into(),
        }))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "GetPolicy").await?;
        let version = request.get_ref().version;
        let found = broker
            .store()
            .policy_version((version > 0).then_some(version))
            .await
            .map_err(|e| internal("reading a policy version", e))?;
        audit_query(broker, &caller, "policy_version").await;
        found
            .map(|v| Response::new(version_message(v)))
            .ok_or_else(|| match version {
                0 => Status::not_found("no policy version is stored yet"),
                v => Status::not_found(format!("no policy version {v}")),
            })
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "ListTokens").await?;
        let q = request.into_inner();
        let limit = match q.limit {
            0 => 100,
            l => l.min(1000),
        };
        let now = broker.now();
        let filter = crate::store::TokenFilter {
            now,
            sub: condition(q.sub, "sub")?,
            aud: condition(q.aud, "aud")?,
            class: condition(q.class, "class")?,
            expires_by: (q.expiring_within_seconds > 0)
                .then(|| now.saturating_add(q.expiring_within_seconds)),
            after: condition(q.after_jti, "after_jti")?
                .map(|j| (u64::try_from(q.after_exp).unwrap_or(0), j)),
            kind: condition(q.kind, "kind")?
                .map(|k| k.parse::<crate::token::TokenKind>())
                .transpose()
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
        };
        let found = broker
            .store()
            .find_live_tokens(&filter, limit)
            .await
            .map_err(|e| internal("listing tokens", e))?;
        let set = broker
            .revocations_in_force()
            .await
            .map_err(|e| internal("reading revocations", e))?;
        audit_query(broker, &caller, "tokens").await;
        let (next_after_exp, next_after_jti) = match found.last() {
            Some(t) if found.len() == limit as usize => (unix(t.exp), t.jti.clone()),
            _ => (0, String::new()),
        };
        let tokens = found
            .iter()
            .map(|t| pb::TokenInfo {
                revoked: crate::broker::state::revoke::is_revoked(&set, t),
                jti: t.jti.clone(),
                kind: t.kind.to_string(),
                sub: t.sub.to_string(),
                aud: audiences(&t.aud),
                scope: t.scope.to_string(),
                class: t.class.to_string(),
                jkt: t.jkt.map(|k| k.to_string()).unwrap_or_default(),
                kid: t.kid.clone(),
                iat: unix(t.iat),
                exp: unix(t.exp),
            })
            .collect();
        Ok(Response::new(pb::ListTokensResponse {
            tokens,
            next_after_exp,
            next_after_jti,
        }))
    }

    async fn list_identities(
        &self,
        request: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::ListIdentitiesResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "ListIdentities").await?;
        let found = broker
            .store()
            .identities(broker.now())
            .await
            .map_err(|e| internal("listing identities", e))?;
        audit_query(broker, &caller, "identities").await;
        let mut denials: std::collections::BTreeMap<String, crate::identity::Denial> = broker
            .denials()
            .into_iter()
            .map(|d| (d.spiffe_id.to_string(), d))
            .collect();
        let with_denial = |info: pb::IdentityInfo, denial: Option<crate::identity::Denial>| {
            let Some(d) = denial else { return info };
            pb::IdentityInfo {
                denied: true,
                denied_reason: d.reason,
                denied_at: unix(d.at),
                denied_by: d.actor,
                ..info
            }
        };
        let mut identities: Vec<pb::IdentityInfo> = found
            .into_iter()
            .map(|i| {
                let denial = denials.remove(i.spiffe_id.as_str());
                let info = pb::IdentityInfo {
                    first_seen: unix(i.first_seen),
                    last_seen: unix(i.last_seen()),
                    svid_expires_at: i.svid_expires_at.map_or(0, unix),
                    spiffe_id: i.spiffe_id.to_string(),
                    method: i.method,
                    svids: i.svids,
                    tokens: i.tokens,
                    live_tokens: i.live_tokens,
                    pods: i
                        .pods
                        .into_iter()
                        .map(|p| pb::PodRef {
                            name: p.name,
                            uid: p.uid,
                        })
                        .collect(),
                    ..pb::IdentityInfo::default()
                };
                with_denial(info, denial)
            })
            .collect();
        // Denied before the broker issued them anything (pre-emptively).
        identities.extend(denials.into_iter().map(|(id, d)| {
            let info = pb::IdentityInfo {
                spiffe_id: id,
                ..pb::IdentityInfo::default()
            };
            with_denial(info, Some(d))
        }));
        Ok(Response::new(pb::ListIdentitiesResponse { identities }))
    }

    async fn review(
        &self,
        request: Request<pb::ReviewRequest>,
    ) -> Result<Response<pb::ReviewResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "Review").await?;
        let q = request.into_inner();
        let unused_for = match q.unused_for_seconds {
            0 => 30 * 86_400,
            s => s.min(10 * 365 * 86_400),
        };
        let ceiling = match q.ttl_ceiling_seconds {
            0 => 3_600,
            s => s,
        };
        let report = broker
            .review(unused_for, ceiling)
            .await
            .map_err(|e| internal("reviewing access", e))?;
        audit_query(broker, &caller, "review").await;
        let line = |p: crate::policy::Pos| {
            (
                u32::try_from(p.line).unwrap_or(u32::MAX),
                u32::try_from(p.col).unwrap_or(u32::MAX),
            )
        };
        let rule = |r: &crate::policy::review::RuleRef, scopes: Vec<String>| {
            let (line, col) = line(r.pos);
            pb::ReviewRule {
                line,
                col,
                from: r.from.clone(),
                to: r.to.clone(),
                scopes,
            }
        };
        let r = &report.review;
        Ok(Response::new(pb::ReviewResponse {
            window_start: unix(report.window.0),
            window_end: unix(report.window.1),
            policy_version: report.policy_version,
            unused_rules: r.unused_rules.iter().map(|u| rule(u, Vec::new())).collect(),
            unused_scopes: r
                .unused_scopes
                .iter()
                .map(|u| rule(&u.rule, u.scopes.iter().map(ToString::to_string).collect()))
                .collect(),
            dormant_identities: r
                .dormant
                .iter()
                .map(|s| pb::ReviewIdentity {
                    spiffe_id: s.id.to_string(),
                    last_seen: unix(s.last_seen),
                })
                .collect(),
            ttl_findings: r.ttl_findings.iter().map(|f| f.what.clone()).collect(),
            tokens_outside_policy: r.ungranted,
            tokens_considered: report.tokens,
        }))
    }

    async fn rotate_intermediate(
        &self,
        request: Request<pb::RotateIntermediateRequest>,
    ) -> Result<Response<pb::RotateIntermediateResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "RotateIntermediate").await?;
        let expires_at = broker
            .rotate_intermediate_now(&caller)
            .await
            .map_err(|e| match e {
                crate::broker::BrokerError::Config(why) => Status::failed_precondition(why),
                other => internal("rotating the intermediate CA", other),
            })?;
        Ok(Response::new(pb::RotateIntermediateResponse {
            intermediate_expires_at: unix(expires_at),
        }))
    }

    async fn truncate_audit(
        &self,
        request: Request<pb::TruncateAuditRequest>,
    ) -> Result<Response<pb::TruncateAuditResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "TruncateAudit").await?;
        let body = request.into_inner();
        let expect = crate::audit::ChainHash::parse(&body.sha256)
            .ok_or_else(|| Status::invalid_argument("sha256 must be 64 hex digits"))?;
        if body.archive.chars().count() > 200 || body.archive.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "archive must be at most 200 characters, none of them control characters",
            ));
        }
        let archive = Some(body.archive.as_str()).filter(|a| !a.is_empty());
        let removed = broker
            .truncate_audit(body.through_seq, &expect, archive, &caller)
            .await
            .map_err(|e| match e {
                crate::broker::BrokerError::Store(crate::store::StoreError::Refused(why)) => {
                    Status::failed_precondition(why)
                }
                other => internal("removing archived audit records", other),
            })?;
        Ok(Response::new(pb::TruncateAuditResponse {
            removed,
            chain_from: body.through_seq + 1,
        }))
    }

    async fn lookup_token(
        &self,
        request: Request<pb::LookupTokenRequest>,
    ) -> Result<Response<pb::LookupTokenResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "LookupToken").await?;
        let token = request.into_inner().token;
        if token.len() > crate::jose::Limits::default().max_len {
            return Err(Status::invalid_argument("token is too long"));
        }
        let found = broker
            .lookup_token(token.trim())
            .await
            .map_err(|e| internal("looking up a token", e))?;
        let mut event = AuditEvent::new(AuditKind::AdminQuery, Outcome::Ok, broker.now())
            .actor(&caller)
            .field("what", "token_lookup")
            .field("found", found.is_some());
        if let Some(found) = &found {
            // The lookup itself names the token, so it shows up in the
            // next lookup: who went looking for a leaked token, and when.
            event = event.field("jti", found.token.jti.clone());
        }
        broker.audit(event).await;
        let Some(found) = found else {
            return Ok(Response::new(pb::LookupTokenResponse::default()));
        };
        let t = found.token;
        Ok(Response::new(pb::LookupTokenResponse {
            found: true,
            jti: t.jti,
            kind: t.kind.to_string(),
            sub: t.sub.to_string(),
            aud: audiences(&t.aud),
            scope: t.scope.to_string(),
            class: t.class.to_string(),
            jkt: t.jkt.map(|k| k.to_string()).unwrap_or_default(),
            iat: unix(t.iat),
            exp: unix(t.exp),
            kid: t.kid,
            revoked: found.revoked,
            records: found.records.into_iter().map(|r| r.line).collect(),
            from_audit_log: found.from_audit,
        }))
    }

    async fn deny_identity(
        &self,
        request: Request<pb::DenyIdentityRequest>,
    ) -> Result<Response<pb::IdentityDenialResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "DenyIdentity").await?;
        let body = request.into_inner();
        let id = workload_id(&body.spiffe_id, broker)?;
        let done = broker.deny_identity(&id, &body.reason, &caller).await;
        denial_change(broker, &caller, &id, AuditKind::IdentityDeny, done).await
    }

    async fn allow_identity(
        &self,
        request: Request<pb::AllowIdentityRequest>,
    ) -> Result<Response<pb::IdentityDenialResponse>, Status> {
        let broker = &self.0;
        let caller = admin(broker, &request, "AllowIdentity").await?;
        let body = request.into_inner();
        let id = workload_id(&body.spiffe_id, broker)?;
        let done = broker.allow_identity(&id, &body.reason, &caller).await;
        denial_change(broker, &caller, &id, AuditKind::IdentityAllow, done).await
    }

    async fn revoke(
        &self,
        request: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        use crate::token::RevocationTarget;
        let broker = &self.0;
        let caller = admin(broker, &request, "Revoke").await?;
        let body = request.into_inner();
        let (target, issued_before) = match body.target {
            Some(pb::revoke_request::Target::Jti(jti)) if !jti.is_empty() && jti.len() <= 256 => {
                (RevocationTarget::Jti(jti), None)
            }
            Some(pb::revoke_request::Target::Subject(s)) => {
                (RevocationTarget::Subject(workload_id(&s, broker)?), None)
            }
            Some(pb::revoke_request::Target::Jkt(k)) => (
                RevocationTarget::Jkt(
                    k.parse()
                        .map_err(|_| Status::invalid_argument("jkt is not a JWK thumbprint"))?,
                ),
                None,
            ),
            Some(pb::revoke_request::Target::IssuedBefore(t)) => {
                (
                    RevocationTarget::Everything,
                    Some(u64::try_from(t).map_err(|_| {
                        Status::invalid_argument("issued_before must be Unix seconds")
                    })?),
                )
            }
            _ => {
                return Err(Status::invalid_argument(
                    "give one of jti, subject, jkt or issued_before",
                ));
            }
        };
        let (sequence, revocation) = broker
            .revoke(target, issued_before, &body.reason, &caller)
            .await
            .map_err(|e| match e {
                crate::broker::BrokerError::Revoke(why) => Status::failed_precondition(why),
                other => internal("recording the revocation", other),
            })?;
        Ok(Response::new(pb::RevokeResponse {
            sequence,
            issued_before: i64::try_from(revocation.issued_before).unwrap_or(i64::MAX),
            expires_at: i64::try_from(revocation.expires_at).unwrap_or(i64::MAX),
        }))
    }
}

/// The Admin service.
pub fn admin_server(
    broker: Arc<Broker>,
) -> pb::admin_server::AdminServer<impl pb::admin_server::Admin> {
    pb::admin_server::AdminServer::new(AdminService(broker))
}
