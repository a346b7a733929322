//! What the broker counts and whether it is ready, for the admin port.

use super::Broker;
use crate::metrics::{CounterVec, Histogram};

/// What the broker counts (rendered by [`Broker::render_metrics`]).
#[derive(Debug)]
pub struct BrokerMetrics {
    /// Token requests by result (`issued` or the refusal reason) and class.
    pub issuance: CounterVec,
    /// Time to answer a token request.
    pub issue_latency: Histogram,
    /// JWT-SVID requests by result (`issued` or the refusal reason) and
    /// class.
    pub jwt_svid_issuance: CounterVec,
    /// WIT requests by result (`issued` or the refusal reason).
    pub wit_issuance: CounterVec,
    /// Attestations and renewals by method and result.
    pub attestations: CounterVec,
    /// Policy reloads by result.
    pub policy_reloads: CounterVec,
    /// Calls refused because the caller's identity is denied, by call.
    pub denied_calls: CounterVec,
}

impl BrokerMetrics {
    pub(super) fn new() -> Self {
        Self {
            issuance: CounterVec::new(
                "tally_broker_issuance_total",
                "Token requests by result (issued or the refusal reason) and token class.",
                &["result", "class"],
            ),
            issue_latency: Histogram::new(
                "tally_broker_issuance_duration_seconds",
                "Time to answer a token request, including the durable inventory write.",
            ),
            jwt_svid_issuance: CounterVec::new(
                "tally_broker_jwt_svid_issuance_total",
                "JWT-SVID requests by result (issued or the refusal reason) and token class.",
                &["result", "class"],
            ),
            wit_issuance: CounterVec::new(
                "tally_broker_wit_issuance_total",
                "WIMSE Workload Identity Token requests by result (issued or the refusal reason).",
                &["result"],
            ),
            attestations: CounterVec::new(
                "tally_broker_attestations_total",
                "X.509-SVID requests by method (join_token, k8s_sa, renew, workload, admin_mint) and result.",
                &["method", "result"],
            ),
            policy_reloads: CounterVec::new(
                "tally_broker_policy_reloads_total",
                "Trust policy reloads by result (ok, error).",
                &["result"],
            ),
            denied_calls: CounterVec::new(
                "tally_broker_denied_identity_calls_total",
                "Calls refused because an admin denied the caller's identity, by call.",
                &["call"],
            ),
        }
    }
}

impl Broker {
    /// What the broker counts.
    pub fn metrics(&self) -> &BrokerMetrics {
        &self.metrics
    }

    /// Every metric in Prometheus text format.
    pub async fn render_metrics(&self) -> String {
        let now = self.clock.now();
        let mut out = String::new();
        self.metrics.issuance.render(&mut out);
        self.metrics.issue_latency.render(&mut out);
        self.metrics.jwt_svid_issuance.render(&mut out);
        self.metrics.wit_issuance.render(&mut out);
        self.metrics.attestations.render(&mut out);
        self.metrics.policy_reloads.render(&mut out);
        self.listeners.render(&mut out);
        self.metrics.denied_calls.render(&mut out);
        match self.store.live_svids(now).await {
            Ok(n) => {
                #[expect(clippy::cast_precision_loss, reason = "a count far below 2^52")]
                let n = n as f64;
                crate::metrics::render_gauge(
                    &mut out,
                    "tally_broker_svids_live",
                    "X.509-SVIDs issued and not yet expired.",
                    &[],
                    &[(vec![], n)],
                );
            }
            Err(e) => tracing::warn!(error = %e, "counting live SVIDs for /metrics failed"),
        }
        match self.store.live_token_counts(now).await {
            Ok((total, principals, most)) => {
                #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
                let gauges = [
                    (
                        "tally_broker_live_tokens",
                        "Tokens issued and not yet expired.",
                        total as f64,
                    ),
                    (
                        "tally_broker_live_token_holders",
                        "Workloads holding at least one live token.",
                        principals as f64,
                    ),
                    (
                        "tally_broker_live_tokens_max_per_holder",
                        "Live tokens of the workload holding the most (a hoarding or looping client stands out without a label per workload).",
                        most as f64,
                    ),
                ];
                for (name, help, value) in gauges {
                    crate::metrics::render_gauge(&mut out, name, help, &[], &[(vec![], value)]);
                }
            }
            Err(e) => tracing::warn!(error = %e, "counting live tokens for /metrics failed"),
        }
        let since = self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .current_since(now);
        if let Some(since) = since {
            #[expect(clippy::cast_precision_loss, reason = "seconds, far below 2^52")]
            let age = now.saturating_sub(since) as f64;
            crate::metrics::render_gauge(
                &mut out,
                "tally_broker_signing_key_age_seconds",
                "How long the current token-signing key has been signing.",
                &[],
                &[(vec![], age)],
            );
        }
        out
    }

    /// Whether the broker can issue now; the reason when it cannot.
    ///
    /// # Errors
    /// What is missing, in words.
    pub async fn readiness(&self) -> Result<(), String> {
        if *self.closing.borrow() {
            return Err("shutting down".into());
        }
        let failing = self.listeners.failing();
        if !failing.is_empty() {
            return Err(failing.join("; "));
        }
        let now = self.clock.now();
        if self
            .keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .current(now)
            .is_none()
        {
            return Err("no signing key is active".into());
        }
        self.store
            .schema_version()
            .await
            .map(|_| ())
            .map_err(|e| format!("store unreachable: {e}"))
    }
}
