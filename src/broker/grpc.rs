//! The gRPC services. Each handler turns the request into domain types at
//! once, calls the broker, and maps failures to a precise status: caller
//! mistakes say what to fix, internal faults say "internal error" and log
//! the detail.

use super::Broker;
use crate::ca::CaError;
use crate::dpop::ReplayError;
use crate::dpop::proof::{self, NonceRule, ProofContext};
use crate::identity::{JoinToken, SpiffeId};
use crate::proto::v1 as pb;
use crate::store::IssuedToken;
use crate::token::{Audience, MintRequest, Scope, Scopes};
use aws_lc_rs::hmac;
use std::pin::Pin;
use std::sync::Arc;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

/// Logs an internal fault and hides it from the caller.
fn internal(context: &str, error: impl std::fmt::Display) -> Status {
    tracing::error!(%error, "{context}");
    Status::internal("internal error")
}

fn ca_status(e: CaError) -> Status {
    match e {
        CaError::CsrTooLarge
        | CaError::CsrInvalid
        | CaError::CsrKeyType
        | CaError::Lifetime { .. } => Status::invalid_argument(e.to_string()),
        CaError::CsrIdentity { .. } => Status::permission_denied(e.to_string()),
        other => internal("issuing a certificate", other),
    }
}

/// The caller's SPIFFE ID from its verified client certificate.
fn peer_id<T>(broker: &Broker, request: &Request<T>) -> Result<SpiffeId, Status> {
    let certs = request
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate (X.509-SVID) is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate (X.509-SVID) is required"))?;
    // rustls has already verified the chain to our bundle, with the
    // validity period; what remains is the identity it names.
    let id = crate::ca::spiffe_id_of(leaf)
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    if id.trust_domain() != broker.settings.trust_domain.trust_domain() {
        return Err(Status::unauthenticated(format!(
            "{id} is not in trust domain {}",
            broker.settings.trust_domain
        )));
    }
    Ok(id)
}

fn svid_response(
    broker: &Broker,
    id: &SpiffeId,
    csr: &[u8],
) -> Result<Response<pb::SvidResponse>, Status> {
    let now = broker.clock.now();
    let svid = broker
        .ca
        .issue_svid(csr, id, broker.settings.svid_ttl, now)
        .map_err(ca_status)?;
    Ok(Response::new(pb::SvidResponse {
        spiffe_id: id.to_string(),
        svid_der: svid.cert_der,
        chain_der: svid.chain_der,
        bundle_der: broker.ca.bundle_der(),
        expires_at: i64::try_from(svid.expires_at).unwrap_or(i64::MAX),
    }))
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
        let id = match body.credential {
            Some(pb::attest_request::Credential::JoinToken(text)) => {
                let token = JoinToken::presented(&text)
                    .ok_or_else(|| Status::invalid_argument("join_token is empty or too long"))?;
                let hash = token.hash();
                match broker
                    .store
                    .consume_join_token(&hash, broker.clock.now())
                    .await
                    .map_err(|e| internal("using a join token", e))?
                {
                    Ok(id) => {
                        tracing::info!(spiffe_id = %id, "attested with a join token");
                        id
                    }
                    Err(refusal) => {
                        // The reason is logged; the caller learns only that
                        // the token does not work.
                        tracing::warn!(?refusal, token = ?hash, "join token refused");
                        return Err(Status::permission_denied(
                            "join token is not valid (unknown, expired or already used)",
                        ));
                    }
                }
            }
            Some(pb::attest_request::Credential::ServiceAccountToken(_)) => {
                return Err(Status::unimplemented(
                    "Kubernetes ServiceAccount token attestation is not implemented in this build; use a join token",
                ));
            }
            None => {
                return Err(Status::invalid_argument(
                    "set join_token or service_account_token",
                ));
            }
        };
        svid_response(broker, &id, &body.csr_der)
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::SvidResponse>, Status> {
        let id = peer_id(&self.0, &request)?;
        let response = svid_response(&self.0, &id, &request.get_ref().csr_der)?;
        tracing::info!(spiffe_id = %id, "renewed X.509-SVID");
        Ok(response)
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
        let caller = peer_id(broker, &request)?;
        let body = request.into_inner();
        let now = broker.clock.now();

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

        let ctx = ProofContext {
            method: "POST",
            uri: &broker.issue_uri,
            token_hash: None,
            expected_jkt: None,
            nonce: NonceRule::NotRequired,
            keys: Some(&broker.proof_keys),
        };
        let proof = proof::verify(&body.dpop_proof, &ctx, &broker.proof_config, now, &mut ())
            .map_err(|e| Status::unauthenticated(format!("invalid DPoP proof: {e}")))?;
        let key = broker.replay.key(&proof.jkt, &proof.jti);
        match broker
            .replay
            .check_and_insert(key, proof.iat + broker.proof_config.max_age, now)
        {
            Ok(()) => {}
            Err(ReplayError::Replayed) => {
                return Err(Status::unauthenticated("invalid DPoP proof: already used"));
            }
            Err(ReplayError::Full) => {
                return Err(Status::unavailable(
                    "too many proofs in flight; retry shortly",
                ));
            }
        }

        let policy = broker.policy();
        let grant = policy
            .decide_issue(&crate::policy::IssueRequest {
                from: &caller,
                audience: &audience,
                scopes: &requested,
                ttl: (body.ttl_seconds > 0).then_some(u64::from(body.ttl_seconds)),
            })
            .map_err(|denial| {
                tracing::info!(caller = %caller, %audience, reason = %denial, "issuance denied");
                Status::permission_denied(denial.to_string())
            })?;
        if let Some(rate) = grant.rate {
            let now_ms = now.saturating_mul(1000);
            if let Err(retry_after) = broker.rule_limits.take(&grant.rule, rate, now_ms) {
                let mut status = Status::resource_exhausted(format!(
                    "rate limit of the issue rule at line {} reached; retry in {retry_after} s",
                    grant.pos.line
                ));
                if let Ok(v) = retry_after.to_string().parse() {
                    status.metadata_mut().insert("retry-after", v);
                }
                return Err(status);
            }
        }

        let (token, claims) = {
            let keys = broker
                .keys
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let signer = keys
                .current(now)
                .ok_or_else(|| internal("issuing a token", "no signing key is active"))?;
            signer
                .mint(
                    &MintRequest {
                        subject: &caller,
                        audience: &audience,
                        scope: &grant.scopes,
                        class: grant.class,
                        ttl: grant.ttl,
                        jkt: proof.jkt,
                    },
                    now,
                )
                .map_err(|e| internal("signing a token", e))?
        };
        let mut token_hmac = [0u8; 32];
        token_hmac
            .copy_from_slice(hmac::sign(&broker.token_hmac, token.expose().as_bytes()).as_ref());
        // Durable before the token leaves the broker.
        broker
            .store
            .record_issued(IssuedToken {
                jti: claims.jti.clone(),
                sub: caller.to_string(),
                aud: audience.to_string(),
                scope: claims.scope.to_string(),
                class: claims.class.to_string(),
                jkt: claims.jkt.to_string(),
                iat: claims.iat,
                exp: claims.exp,
                kid: claims.kid.clone(),
                token_hmac,
            })
            .await
            .map_err(|e| internal("recording an issued token", e))?;
        tracing::info!(caller = %caller, %audience, jti = %claims.jti, class = %claims.class, "token issued");
        Ok(Response::new(pb::IssueResponse {
            access_token: token.expose().to_owned(),
            token_type: "DPoP".into(),
            expires_at: i64::try_from(claims.exp).unwrap_or(i64::MAX),
            scopes: claims.scope.iter().map(ToString::to_string).collect(),
            jti: claims.jti,
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
        let broker = &self.0;
        peer_id(broker, &request)?;
        // The current state, complete: JWKS and trust bundle. Sequence
        // numbers and the change feed (rotations, revocations, policy) come
        // with the governance work; until then a subscriber gets the state
        // once and the stream stays open.
        let now_ms = i64::try_from(broker.clock.now().saturating_mul(1000)).unwrap_or(i64::MAX);
        let first = vec![
            Ok(pb::Update {
                sequence: 1,
                committed_at_ms: now_ms,
                kind: Some(pb::update::Kind::Jwks(pb::Jwks {
                    json: broker.jwks().to_json().to_string(),
                })),
            }),
            Ok(pb::Update {
                sequence: 2,
                committed_at_ms: now_ms,
                kind: Some(pb::update::Kind::Bundle(pb::TrustBundle {
                    roots_der: broker.ca.bundle_der(),
                })),
            }),
        ];
        // One task per subscriber feeds its stream; the stream ends when
        // the broker closes (so shutdown can finish) or the client leaves.
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let broker = Arc::clone(broker);
        tokio::spawn(async move {
            for update in first {
                if tx.send(update).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                () = broker.closed() => {}
                () = tx.closed() => {}
            }
        });
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        Ok(Response::new(Box::pin(stream)))
    }
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
