//! The sidecar's admin port (plain HTTP on loopback by default):
//! `/healthz` (the process answers), `/readyz` (it holds a valid SVID and
//! the broker's keys, bundle and access rules, its Watch stream has not
//! been down longer than the staleness bound, and the broker does not
//! deny its identity; the body says what is missing) and `/metrics` (Prometheus text).

use super::api::LocalApi;
use super::identity::Svid;
use super::inbound::Inbound;
use super::issuer::BrokerIssuer;
use super::outbound::Outbound;
use super::watch::MeshState;
use crate::clock::Clock;
use crate::http::{Body, respond};
use crate::metrics::render_gauge;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use tokio::sync::watch;

/// What the admin port reads: the running sidecar's parts (what
/// `Sidecar::parts` hands out).
pub struct Parts {
    /// The current SVID.
    pub svid: watch::Receiver<Arc<Svid>>,
    /// What the Watch stream has delivered.
    pub mesh: watch::Receiver<MeshState>,
    /// The local API's state (token cache, service map, nonces).
    pub api: Arc<LocalApi<Arc<BrokerIssuer>>>,
    /// The inbound proxy, if it runs.
    pub inbound: Option<Arc<Inbound>>,
    /// The Envoy ext_authz service, if it runs.
    pub ext_authz: Option<Arc<super::ext_authz::ExtAuthz>>,
    /// The outbound proxy.
    pub outbound: Arc<Outbound<Arc<BrokerIssuer>>>,
    /// The sidecar's WIMSE Workload Identity Token, bound to its current
    /// key (fetched on first use, then refreshed ahead and replaced after
    /// an SVID renewal; see [`super::wits`]).
    pub wits: Arc<super::cache::TokenCache<super::wits::Wits>>,
    /// The clock.
    pub clock: Arc<dyn Clock>,
    /// Broker commit to arrival here, per revocation.
    pub revocation_lag: Arc<crate::metrics::Histogram>,
    /// Longest Watch outage before not-ready, seconds.
    pub watch_staleness: u64,
    /// Every listener's counters (not ready while one cannot accept).
    pub listeners: crate::http::Listeners,
}

const TEXT: &str = "text/plain; charset=utf-8";

/// Answers one request on the admin port.
pub async fn handle(parts: Arc<Parts>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            render_metrics(&parts),
        ),
        "/healthz" => respond(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => match readiness(&parts) {
            Ok(()) => respond(StatusCode::OK, TEXT, "ready\n"),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {}\n", why.join("; ")),
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics, /healthz or /readyz\n",
        ),
    }
}

/// Seconds the Watch stream has been down (0 while up).
fn down_for(mesh: &MeshState, now: u64) -> u64 {
    if mesh.connected || mesh.down_since_ms == 0 {
        0
    } else {
        now.saturating_sub(mesh.down_since_ms / 1000)
    }
}

/// Ready when the SVID is valid and the Watch stream has delivered keys,
/// bundle and access rules; otherwise every reason.
///
/// # Errors
/// What is missing.
pub fn readiness(parts: &Parts) -> Result<(), Vec<String>> {
    let now = parts.clock.now();
    let mut why = Vec::new();
    let expires_at = parts.svid.borrow().expires_at;
    if now >= expires_at {
        why.push(format!(
            "the X.509-SVID expired {}s ago and could not be renewed",
            now - expires_at
        ));
    }
    let mesh = parts.mesh.borrow();
    if mesh.jwks.is_none() {
        why.push("no JWKS from the broker yet".into());
    }
    if mesh.bundle_der.is_empty() {
        why.push("no trust bundle from the broker yet".into());
    }
    if mesh.access.is_none() {
        why.push("no access rules from the broker yet".into());
    }
    if mesh.own_identity_denied {
        why.push("an admin has denied this workload's identity at the broker".into());
    }
    let down_secs = down_for(&mesh, now);
    why.extend(parts.listeners.failing());
    if down_secs > parts.watch_staleness {
        why.push(format!(
            "the Watch stream to the broker has been down for {down_secs}s (bound {}s): revocations could be missed",
            parts.watch_staleness
        ));
    }
    if why.is_empty() { Ok(()) } else { Err(why) }
}

#[expect(
    clippy::cast_precision_loss,
    reason = "gauges are floats in the exposition format"
)]
fn render_metrics(parts: &Parts) -> String {
    let mut out = String::new();
    let now = parts.clock.now();
    let now_ms = now.saturating_mul(1000);
    let gauge = |out: &mut String, name: &str, help: &str, value: f64| {
        render_gauge(out, name, help, &[], &[(Vec::new(), value)]);
    };
    let cache = parts.api.cache();
    let stats = cache.stats();
    for (name, help, value) in [
        (
            "tally_sidecar_token_cache_hits_total",
            "Token requests answered from the cache.",
            &stats.hits,
        ),
        (
            "tally_sidecar_token_cache_misses_total",
            "Token requests that waited for the broker.",
            &stats.misses,
        ),
        (
            "tally_sidecar_token_cache_refreshes_total",
            "Background refreshes started ahead of expiry.",
            &stats.refreshes,
        ),
        (
            "tally_sidecar_token_fetch_errors_total",
            "Broker calls for tokens that failed (unreachable).",
            &stats.fetch_errors,
        ),
    ] {
        let _ = std::fmt::Write::write_fmt(
            &mut out,
            format_args!(
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
                value.load(Ordering::Relaxed)
            ),
        );
    }
    gauge(
        &mut out,
        "tally_sidecar_token_cache_entries",
        "Tokens held in the cache.",
        cache.len() as f64,
    );
    gauge(
        &mut out,
        "tally_sidecar_broker_reachable",
        "1 unless the last token fetch found the broker unreachable.",
        if cache.unreachable_since().is_some() {
            0.0
        } else {
            1.0
        },
    );
    let expires_at = parts.svid.borrow().expires_at;
    gauge(
        &mut out,
        "tally_sidecar_svid_expires_in_seconds",
        "Seconds until the X.509-SVID expires (negative: expired).",
        expires_at as f64 - now as f64,
    );
    {
        let mesh = parts.mesh.borrow();
        gauge(
            &mut out,
            "tally_sidecar_watch_connected",
            "1 while the Watch stream to the broker is up.",
            if mesh.connected { 1.0 } else { 0.0 },
        );
        gauge(
            &mut out,
            "tally_sidecar_watch_down_seconds",
            "Seconds the Watch stream has been down (0 while up); not ready past the bound.",
            down_for(&mesh, now) as f64,
        );
        gauge(
            &mut out,
            "tally_sidecar_watch_last_update_age_seconds",
            "Seconds since the last Watch update arrived (0: none yet).",
            if mesh.received_at_ms == 0 {
                0.0
            } else {
                now_ms.saturating_sub(mesh.received_at_ms) as f64 / 1000.0
            },
        );
        gauge(
            &mut out,
            "tally_sidecar_watch_propagation_seconds",
            "Commit-to-arrival time of the last Watch update.",
            mesh.propagation_ms() as f64 / 1000.0,
        );
        gauge(
            &mut out,
            "tally_sidecar_watch_sequence",
            "Sequence number of the last Watch update applied.",
            mesh.sequence as f64,
        );
        gauge(
            &mut out,
            "tally_sidecar_jwks_keys",
            "Signing keys in the JWKS the sidecar verifies with.",
            mesh.jwks.as_ref().map_or(0, |j| j.len()) as f64,
        );
    }
    gauge(
        &mut out,
        "tally_sidecar_ready",
        "1 when /readyz answers 200.",
        if readiness(parts).is_ok() { 1.0 } else { 0.0 },
    );
    parts.revocation_lag.render(&mut out);
    gauge(
        &mut out,
        "tally_sidecar_revocations",
        "Revocations in force here.",
        parts.mesh.borrow().revocations.len() as f64,
    );
    if let Some(inbound) = &parts.inbound {
        inbound.metrics().render(&mut out);
    }
    if let Some(ext_authz) = &parts.ext_authz {
        ext_authz.metrics().render(&mut out);
    }
    parts.outbound.render_metrics(&mut out);
    parts.listeners.render(&mut out);
    out
}
