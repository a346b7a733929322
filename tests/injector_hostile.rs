//! `tally injector` against what a hostile or broken client sends, and
//! its certificate and trust bundle changing under it: it answers with
//! the right status, says why, and keeps serving.

mod support;
#[path = "support/injector.rs"]
mod webhook;

use serde_json::{Value, json};
use webhook::{Webhook, fixture, patch_of, review_body, write_serving_pair};

#[tokio::test]
async fn bad_bodies_get_their_status_and_a_message_and_the_server_keeps_serving() {
    let hook = Webhook::start(&[]);
    let (status, _) = hook.post(vec![b' '; 2 * 1024 * 1024]).await;
    assert_eq!(status, 413);
    let (status, body) = hook.post("not json").await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).starts_with("not JSON: expected ident at line 1"),
        "{body:?}"
    );
    let no_request = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"});
    let (status, body) = hook.post(serde_json::to_vec(&no_request).unwrap()).await;
    assert_eq!(
        (status, &body[..]),
        (400, &b"the review has no request\n"[..])
    );
    let mut no_uid: Value =
        serde_json::from_slice(&review_body(&fixture("opt-out"), "shop", "CREATE", "Pod")).unwrap();
    no_uid["request"].as_object_mut().unwrap().remove("uid");
    let (status, body) = hook.post(serde_json::to_vec(&no_uid).unwrap()).await;
    assert_eq!(
        (status, &body[..]),
        (400, &b"request.uid: is required\n"[..])
    );
    let deep = format!("{}{}", "[".repeat(50_000), "]".repeat(50_000));
    let (status, body) = hook.post(deep).await;
    assert_eq!(status, 400);
    assert!(
        String::from_utf8_lossy(&body).contains("nesting deeper than 64 levels"),
        "{body:?}"
    );
    let twice =
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","kind":"Other"}"#.to_vec();
    assert_eq!(hook.post(twice).await.0, 400);
    let mut conn = hook.connect().await;
    assert_eq!(conn.request("GET", "/inject", "".into()).await.0, 405);
    assert_eq!(conn.request("POST", "/mutate", "".into()).await.0, 404);
    assert_eq!(conn.request("POST", "/healthz", "".into()).await.0, 405);
    assert_eq!(conn.request("GET", "/healthz", "".into()).await.0, 200);
    assert_eq!(conn.request("GET", "/readyz", "".into()).await.0, 200);
    // Still serving, and counting.
    let response = hook.review(&fixture("deployment-pod"), "shop").await;
    assert!(!patch_of(&response).is_empty());
    let (_, metrics) = conn.request("GET", "/metrics", "".into()).await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    for line in [
        "tally_injector_injections_total{result=\"injected\",reason=\"none\"} 1",
        "tally_injector_bad_reviews_total{status=\"400\"} 5",
        "tally_injector_bad_reviews_total{status=\"413\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }
    hook.stop();
}

#[tokio::test]
async fn other_kinds_and_operations_are_allowed_without_a_patch() {
    let hook = Webhook::start(&[]);
    let pod = fixture("deployment-pod");
    for (operation, kind) in [
        ("UPDATE", "Pod"),
        ("CREATE", "Deployment"),
        ("DELETE", "Pod"),
    ] {
        let (status, body) = hook.post(review_body(&pod, "shop", operation, kind)).await;
        assert_eq!(status, 200);
        let response: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            patch_of(&response),
            Vec::<Value>::new(),
            "{operation} {kind}"
        );
    }
    let mut conn = hook.connect().await;
    let (_, metrics) = conn.request("GET", "/metrics", "".into()).await;
    let metrics = String::from_utf8(metrics.to_vec()).unwrap();
    assert!(
        metrics.contains(
            "tally_injector_injections_total{result=\"skipped\",reason=\"not_pod_create\"} 3"
        ),
        "{metrics}"
    );
    hook.stop();
}

#[tokio::test]
async fn a_client_that_sends_nothing_is_closed_at_the_header_timeout() {
    use tokio::io::AsyncReadExt as _;
    let hook = Webhook::start(&[]);
    let started = std::time::Instant::now();
    let mut silent = tokio::net::TcpStream::connect(hook.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read =
        tokio::time::timeout(std::time::Duration::from_secs(15), silent.read(&mut buf)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(2));
    // Others were served meanwhile and after.
    assert_eq!(
        hook.connect()
            .await
            .request("GET", "/healthz", "".into())
            .await
            .0,
        200
    );
    hook.stop();
}

#[tokio::test]
async fn a_rotated_certificate_serves_new_connections_and_old_ones_keep_working() {
    let hook = Webhook::start(&[]);
    let mut old = hook.connect().await;
    let first = old.server_cert.clone();
    let second_ca = write_serving_pair(hook.dir.path(), "injector two");
    let mut new = hook.connect_trusting(&second_ca).await;
    assert_ne!(
        new.server_cert, first,
        "a new connection sees the new certificate"
    );
    assert_eq!(new.request("GET", "/healthz", "".into()).await.0, 200);
    assert_eq!(
        old.request("GET", "/healthz", "".into()).await.0,
        200,
        "the old connection still works"
    );
    // A broken pair keeps the one in use.
    std::fs::write(hook.dir.path().join("tls.crt"), "garbage").unwrap();
    let still = hook.connect_trusting(&second_ca).await;
    assert_eq!(still.server_cert, new.server_cert);
    hook.stop();
}

#[tokio::test]
async fn a_changed_trust_bundle_goes_into_the_next_pods() {
    let hook = Webhook::start(&[]);
    let bundle = |response: &Value| {
        let ops = patch_of(response);
        let op = ops
            .iter()
            .find(|op| op["path"] == "/spec/initContainers")
            .unwrap();
        op["value"][0]["env"][0]["value"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let pod = fixture("deployment-pod");
    assert_eq!(bundle(&hook.review(&pod, "shop").await), hook.ca_pem);
    let other = tempfile::tempdir().unwrap();
    let next = write_serving_pair(other.path(), "bundle two");
    let path = hook.dir.path().join("bundle.pem");
    std::fs::write(hook.dir.path().join(".bundle.new"), &next).unwrap();
    std::fs::rename(hook.dir.path().join(".bundle.new"), &path).unwrap();
    assert_eq!(bundle(&hook.review(&pod, "shop").await), next);
    std::fs::write(&path, "not a bundle").unwrap();
    assert_eq!(
        bundle(&hook.review(&pod, "shop").await),
        next,
        "a broken bundle keeps the last good one"
    );
    hook.stop();
}

#[test]
fn bad_settings_are_all_reported_and_exit_64() {
    let o = support::process::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_tally")).args([
            "injector",
            "--sa-token-expiration",
            "1m",
        ]),
        support::process::PATIENCE,
    );
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    for expected in [
        "image: give",
        "trust_bundle: give",
        "sa_audience: give",
        "sa_token_expiration \"1m\"",
        "tls_cert and tls_key",
    ] {
        assert!(err.contains(expected), "{expected} not in {err}");
    }
}

/// A TLS connection that sends a review's head and one byte of its body,
/// then stalls: the review holds its turn until the body timeout.
async fn stalled_review(hook: &Webhook) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt as _;
    let mut tls = hook.tls_trusting(&hook.ca_pem).await;
    tls.write_all(b"POST /inject HTTP/1.1\r\nhost: localhost\r\ncontent-length: 100000\r\n\r\n{")
        .await
        .unwrap();
    tls.flush().await.unwrap();
    tls
}

#[tokio::test]
async fn reviews_past_the_limit_in_flight_are_turned_away_and_served_again_after() {
    let hook = Webhook::start(&[]);
    let mut held = Vec::new();
    for _ in 0..tally::injector::server::MAX_REVIEWS_IN_FLIGHT {
        held.push(stalled_review(&hook).await);
    }
    // Every turn is taken by a review whose body never comes: the next one
    // waits its bounded while, then hears 503 (the API server's webhook
    // timeout is longer), instead of the process reading without bound.
    let (status, body) = hook
        .post(review_body(
            &fixture("deployment-pod"),
            "shop",
            "CREATE",
            "Pod",
        ))
        .await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    assert!(String::from_utf8_lossy(&body).contains("too many reviews at once"));
    drop(held);
    let response = hook.review(&fixture("deployment-pod"), "shop").await;
    assert!(!patch_of(&response).is_empty());
    hook.stop();
}
