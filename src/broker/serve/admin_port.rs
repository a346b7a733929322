//! The broker's admin port (plain HTTP, bind it to a private address):
//! `/metrics` (Prometheus text), `/healthz` (the process answers) and
//! `/readyz` (it can issue: store reachable, a signing key active, not
//! shutting down).

use crate::broker::Broker;
use crate::http::{Body, Peer, respond};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::sync::Arc;

/// Answers one request on the admin port.
pub async fn handle(
    broker: Arc<Broker>,
    req: Request<Incoming>,
    _peer: Arc<Peer>,
) -> Response<Body> {
    const TEXT: &str = "text/plain; charset=utf-8";
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n");
    }
    match req.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            broker.render_metrics().await,
        ),
        "/healthz" => respond(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => match broker.readiness().await {
            Ok(()) => respond(StatusCode::OK, TEXT, "ready\n"),
            Err(why) => respond(
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT,
                format!("not ready: {why}\n"),
            ),
        },
        _ => respond(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics, /healthz or /readyz\n",
        ),
    }
}
