//! The payments app the tour calls, and the small HTTP helpers the steps
//! share.

use super::MAX_ANSWER;
use crate::cli::CliError;
use crate::http::{Answer, json, send};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the tour found: steps that went as narrated, and those that did not.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) passed: u32,
    pub(super) failed: Vec<String>,
}

impl Tally {
    /// Records whether `step` saw `expected`, printing the outcome.
    pub(super) fn check(&mut self, step: &str, answer: &Answer, expected: StatusCode) {
        if answer.status == expected {
            self.passed += 1;
            say!("   ✓ {} as expected", answer.status);
        } else {
            say!(
                "   ✗ expected {expected}, got {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
            self.failed.push(format!("{step}: {}", answer.status));
        }
    }

    /// Records whether `step` went as narrated (`what` says what it saw).
    pub(super) fn expect(&mut self, step: &str, ok: bool, what: &str) {
        if ok {
            self.passed += 1;
            say!("   ✓ {what}");
        } else {
            say!("   ✗ {what}");
            self.failed.push(step.to_owned());
        }
    }
}

/// The first and last characters of a token, and its length.
pub(super) fn short(token: &str) -> String {
    if token.len() <= 24 {
        return token.to_owned();
    }
    format!(
        "{}…{} ({} chars)",
        &token[..14],
        &token[token.len() - 6..],
        token.len()
    )
}

pub(super) fn request(
    method: &str,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(target)
        .header(http::header::HOST, host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

pub(super) async fn call(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Answer, CliError> {
    send(addr, req, MAX_ANSWER)
        .await
        .map_err(|e| CliError::Failed(format!("demo request: {e}")))
}

/// The payments API on `listener`: charges, and who asked for them (from
/// the headers the inbound proxy set).
pub(super) fn payments_app(
    listener: tokio::net::TcpListener,
) -> Result<(SocketAddr, tokio::sync::oneshot::Sender<()>), CliError> {
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let next = Arc::new(AtomicU64::new(1));
    tokio::spawn(crate::http::serve(
        listener,
        crate::http::Listen::new("demo app"),
        move |req: Request<hyper::body::Incoming>, _peer| {
            let next = Arc::clone(&next);
            async move {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                let (caller, scopes) = (header("x-tally-caller"), header("x-tally-scopes"));
                let transport = header("x-tally-transport");
                let leaked = req.headers().contains_key(http::header::AUTHORIZATION);
                match (req.method().as_str(), req.uri().path()) {
                    ("POST", "/v1/charges") => {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        json(
                            StatusCode::CREATED,
                            &serde_json::json!({
                                "charge": format!("ch_{id}"),
                                "requested_by": caller,
                                "scopes": scopes,
                                "transport": transport,
                                "app_saw_a_token": leaked,
                            }),
                        )
                    }
                    ("GET", path) if path.starts_with("/v1/charges/") => json(
                        StatusCode::OK,
                        &serde_json::json!({
                            "charge": path.trim_start_matches("/v1/charges/"),
                            "status": "succeeded",
                            "requested_by": caller,
                        }),
                    ),
                    _ => json(
                        StatusCode::NOT_FOUND,
                        &serde_json::json!({"error": "not_found"}),
                    ),
                }
            }
        },
        async {
            let _ = stopped.await;
        },
    ));
    Ok((addr, stop))
}

pub(super) async fn bind() -> Result<tokio::net::TcpListener, CliError> {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Failed(format!("binding a loopback port: {e}")))
}

pub(super) fn addr_of(l: &tokio::net::TcpListener) -> Result<SocketAddr, CliError> {
    l.local_addr().map_err(|e| CliError::Failed(e.to_string()))
}

pub(super) fn header<'a>(answer: &'a Answer, name: &str) -> &'a str {
    answer
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// `POST url` headers from the checkout sidecar's `/v1/authorize`:
/// (status, authorization, dpop, error description).
pub(super) async fn headers_for(
    socket: &Path,
    url: &str,
    scope: &str,
) -> Result<(u16, String, String, String), CliError> {
    let ask = serde_json::json!({"method": "POST", "url": url, "scope": scope});
    let (status, answer) = local(socket, "POST", "/v1/authorize", Some(ask)).await?;
    let text = |key: &str| answer[key].as_str().unwrap_or_default().to_owned();
    Ok((
        status,
        text("authorization"),
        text("dpop"),
        text("error_description"),
    ))
}

/// One request to the checkout sidecar's local API; (status, JSON).
pub(super) async fn local(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), CliError> {
    crate::cli::client::call(socket, method, target, body.map(|b| b.to_string())).await
}
