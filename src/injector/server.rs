//! The webhook's HTTPS server, on the crate's one accept loop (header and
//! idle timeouts, connection cap): `POST /inject` answers an
//! AdmissionReview, `GET /healthz`, `/readyz` and `/metrics` serve the
//! probes and Prometheus. Nothing here decides about a pod: that is
//! [`super::pod::inject`].

use super::files::ReloadingBundle;
use super::pod::{self, Outcome, SkipReason, Verdict};
use super::review::{self, ReviewError};
use super::template::Template;
use crate::http::{Body, BodyError, Listen, Peer, json, read_body, respond};
use crate::metrics::CounterVec;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use std::sync::{Arc, RwLock};

const TEXT: &str = "text/plain; charset=utf-8";

/// The running webhook's state: the template every pod gets (rebuilt when
/// the trust bundle changes) and its counters.
pub struct Injector {
    /// Reviews being read or decided at once: each may hold a 1 MiB body
    /// and its parsed tree, so a flood of them must wait or be turned away
    /// (503) rather than grow the process past its memory limit.
    reviewing: tokio::sync::Semaphore,
    template: RwLock<Arc<Template>>,
    bundle: Option<ReloadingBundle>,
    injections: CounterVec,
    refused: CounterVec,
    listeners: crate::http::Listeners,
}

/// Reviews read and decided at once (see [`Injector`]'s `reviewing`).
pub const MAX_REVIEWS_IN_FLIGHT: usize = 8;
/// How long a review waits for its turn before a 503: well inside the
/// API server's webhook timeout (`timeoutSeconds`, 5 s in the manifests).
const REVIEW_QUEUE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("bundle", &self.bundle)
            .finish_non_exhaustive()
    }
}

impl Injector {
    /// A webhook injecting `template`; with `bundle`, its trust bundle is
    /// that file's, re-read when it changes.
    pub fn new(template: Template, bundle: Option<ReloadingBundle>) -> Self {
        Self {
            reviewing: tokio::sync::Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
            template: RwLock::new(Arc::new(template)),
            bundle,
            injections: CounterVec::new(
                "tally_injector_injections_total",
                "Pod admissions answered, by result (injected, skipped, error) and reason.",
                &["result", "reason"],
            ),
            refused: CounterVec::new(
                "tally_injector_bad_reviews_total",
                "Requests to /inject that were not an AdmissionReview the webhook could read, by status.",
                &["status"],
            ),
            listeners: crate::http::Listeners::default(),
        }
    }

    /// The template now, with the trust bundle as it is on disk.
    fn template(&self) -> Arc<Template> {
        if let Some(bundle) = &self.bundle {
            let (pem, changed) = bundle.current();
            if changed {
                let mut t = self
                    .template
                    .write()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut next = (**t).clone();
                next.bundle_pem = pem.to_string();
                *t = Arc::new(next);
            }
        }
        Arc::clone(
            &self
                .template
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// Answers one AdmissionReview body: the review's response, or the
    /// error that makes it a bad request.
    ///
    /// # Errors
    /// [`ReviewError`] when the body is not a review to answer.
    pub fn review(&self, body: &[u8]) -> Result<serde_json::Value, ReviewError> {
        let request = review::parse(body)?;
        let namespace = request
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let label = pod::pod_label(&namespace, request.object.as_ref());
        let outcome = if request.is_pod_create() {
            pod::inject(&self.template(), &namespace, request.object.as_ref())
        } else {
            Outcome {
                verdict: Verdict::Skipped(SkipReason::NotPodCreate),
                patch: Vec::new(),
                warnings: Vec::new(),
            }
        };
        let (result, reason) = outcome.verdict.labels();
        self.injections.inc(&[result, reason]);
        match &outcome.verdict {
            Verdict::Failed(e) => tracing::warn!(
                pod = %label, uid = %request.uid, error = %e, warnings = ?outcome.warnings,
                "pod admitted without the sidecar"
            ),
            _ if !outcome.warnings.is_empty() => tracing::warn!(
                pod = %label, uid = %request.uid, result, reason, warnings = ?outcome.warnings,
                "pod admitted with warnings"
            ),
            _ => tracing::info!(pod = %label, uid = %request.uid, result, reason, "pod admitted"),
        }
        Ok(review::response(
            &request.uid,
            &outcome.patch,
            &outcome.warnings,
        ))
    }

    /// Where the server's listener counts (for `/readyz` and `/metrics`).
    pub fn listeners(&self) -> &crate::http::Listeners {
        &self.listeners
    }

    fn metrics(&self) -> String {
        let mut out = String::new();
        self.injections.render(&mut out);
        self.refused.render(&mut out);
        self.listeners.render(&mut out);
        out
    }
}

/// Serves the webhook on `listener` (TLS with `tls`) until `shutdown`.
///
/// # Errors
/// None today (see [`crate::http::serve`]).
pub async fn serve(
    injector: Arc<Injector>,
    listener: tokio::net::TcpListener,
    listen: Listen,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    injector.listeners.add(listen.stats());
    crate::http::serve(
        listener,
        listen,
        move |req, peer| handle(Arc::clone(&injector), req, peer),
        shutdown,
    )
    .await
}

async fn handle(
    injector: Arc<Injector>,
    req: Request<Incoming>,
    _peer: Arc<Peer>,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (path.as_str(), &method) {
        ("/inject", &Method::POST) => {}
        ("/inject", _) => return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use POST\n"),
        ("/healthz" | "/readyz" | "/metrics", &Method::GET | &Method::HEAD) => {
            return match path.as_str() {
                "/metrics" => respond(
                    StatusCode::OK,
                    "text/plain; version=0.0.4; charset=utf-8",
                    injector.metrics(),
                ),
                "/readyz" => match injector.listeners.failing() {
                    why if why.is_empty() => respond(StatusCode::OK, TEXT, "ready\n"),
                    why => respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        TEXT,
                        format!("not ready: {}\n", why.join("; ")),
                    ),
                },
                _ => respond(StatusCode::OK, TEXT, "ok\n"),
            };
        }
        ("/healthz" | "/readyz" | "/metrics", _) => {
            return respond(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n");
        }
        _ => {
            return respond(
                StatusCode::NOT_FOUND,
                TEXT,
                "not found; the webhook is POST /inject\n",
            );
        }
    }
    let permit = match tokio::time::timeout(REVIEW_QUEUE_WAIT, injector.reviewing.acquire()).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return refuse(
                &injector,
                StatusCode::SERVICE_UNAVAILABLE,
                "too many reviews at once; try again",
            );
        }
    };
    let mut incoming = req.into_body();
    let body = match read_body(&mut incoming, review::MAX_REVIEW_BYTES).await {
        Ok(body) => body,
        Err(e) => {
            // Read to the end (up to the API server's own 3 MiB request
            // limit) so the client hears the 413 instead of a reset.
            crate::http::drain(&mut incoming, 3 * 1024 * 1024).await;
            let status = match e {
                BodyError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                BodyError::Read | BodyError::TimedOut => StatusCode::BAD_REQUEST,
            };
            return refuse(&injector, status, &e.to_string());
        }
    };
    // The pod is decided on a blocking thread: a large review is parsed
    // and walked without holding the runtime's workers.
    let decider = Arc::clone(&injector);
    let answer = tokio::task::spawn_blocking(move || {
        let result = decider.review(&body);
        (decider, result)
    })
    .await;
    drop(permit);
    match answer {
        Ok((_, Ok(response))) => json(StatusCode::OK, &response),
        Ok((injector, Err(e))) => {
            let status = match e {
                ReviewError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                ReviewError::Json(_)
                | ReviewError::NotAnObject
                | ReviewError::WrongType { .. }
                | ReviewError::NoRequest
                | ReviewError::Field { .. } => StatusCode::BAD_REQUEST,
            };
            refuse(&injector, status, &e.to_string())
        }
        Err(e) => {
            tracing::error!(error = %e, "answering a review failed");
            respond(StatusCode::INTERNAL_SERVER_ERROR, TEXT, "internal error\n")
        }
    }
}

/// The one answer for a request that is not a review: its status and
/// what was wrong (the caller's own mistake, so it is told).
fn refuse(injector: &Injector, status: StatusCode, message: &str) -> Response<Body> {
    injector.refused.inc(&[status.as_str()]);
    tracing::warn!(
        status = status.as_u16(),
        error = message,
        "refused a request to /inject"
    );
    respond(status, TEXT, format!("{message}\n"))
}
