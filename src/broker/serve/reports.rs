//! The Reports service: sidecars' summaries of verification failures at
//! their inbound proxies, recorded in the audit log with the reporting
//! workload. Each reporter is rate-limited and every field bounded, so a
//! sidecar (or whoever holds its SVID) cannot flood the log.

use super::grpc::{internal, peer_id};
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::broker::Broker;
use crate::identity::SpiffeId;
use crate::policy::Rate;
use crate::proto::v1 as pb;
use crate::rate::RateLimiter;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// Records one report may carry (the sidecar sends at most 64).
const MAX_RECORDS: usize = 100;
/// Reports per reporter: a burst of 12, then one every 5 seconds (the
/// sidecar sends one per 10 s, and catches up after an outage).
const REPORTS: Rate = Rate {
    count: 12,
    per_secs: 60,
};
/// Longest field kept.
const MAX_FIELD: usize = 256;

struct ReportsService {
    broker: Arc<Broker>,
    limits: RateLimiter<SpiffeId>,
}

fn field(text: &str) -> String {
    crate::auth::answer::safe_description(text)
        .chars()
        .take(MAX_FIELD)
        .collect()
}

#[tonic::async_trait]
impl pb::reports_server::Reports for ReportsService {
    async fn verification_failures(
        &self,
        request: Request<pb::FailureReport>,
    ) -> Result<Response<pb::FailureReportAck>, Status> {
        let broker = &self.broker;
        let reporter = peer_id(
            broker,
            &request,
            crate::broker::state::denials::Call::Reports,
        )
        .await?;
        if let Err(retry_ms) = self
            .limits
            .take(&reporter, REPORTS, broker.clock().now_ms())
        {
            return Err(Status::resource_exhausted(format!(
                "too many reports; retry in {}",
                crate::clock::human_duration(retry_ms.div_ceil(1000))
            )));
        }
        let report = request.into_inner();
        if report.records.len() > MAX_RECORDS || report.overflow.len() > 32 {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_RECORDS} records per report"
            )));
        }
        let now = broker.now();
        let time = |t: i64| u64::try_from(t).unwrap_or(0);
        let events = report.records.iter().map(|r| {
            let mut event = AuditEvent::new(AuditKind::VerifyFailure, Outcome::Denied, now)
                .actor(&reporter)
                .field("reason", field(&r.reason))
                .field("method", field(&r.method))
                .field("path", field(&r.path))
                .field("count", r.count)
                .field("first_at", time(r.first_at))
                .field("last_at", time(r.last_at));
            if !r.jti.is_empty() {
                // As claimed by the presented token (whose signature may
                // not have verified): `audit lookup` of a token shows the
                // failures of anyone presenting it.
                event = event.field("jti", field(&r.jti));
            }
            if !r.claimed_sub.is_empty() {
                event = event.field("claimed_sub", field(&r.claimed_sub));
            }
            event
        });
        let mut events: Vec<AuditEvent> = events.collect();
        if !report.overflow.is_empty() {
            let overflow: serde_json::Map<String, serde_json::Value> = report
                .overflow
                .iter()
                .map(|(k, v)| (field(k), (*v).into()))
                .collect();
            events.push(
                AuditEvent::new(AuditKind::VerifyFailure, Outcome::Denied, now)
                    .actor(&reporter)
                    .field("reason", "summary")
                    .field("overflow", serde_json::Value::Object(overflow)),
            );
        }
        // Queued together, so the store commits them in one transaction.
        let mut writes = tokio::task::JoinSet::new();
        for event in events {
            let broker = Arc::clone(broker);
            writes.spawn(async move { broker.record(None, event).await });
        }
        while let Some(done) = writes.join_next().await {
            done.map_err(|e| internal("recording verification failures", e))?
                .map_err(|e| internal("recording verification failures", e))?;
        }
        Ok(Response::new(pb::FailureReportAck {}))
    }
}

/// The Reports service.
pub fn reports_server(
    broker: Arc<Broker>,
) -> pb::reports_server::ReportsServer<impl pb::reports_server::Reports> {
    pb::reports_server::ReportsServer::new(ReportsService {
        broker,
        limits: RateLimiter::new(),
    })
}
