//! The inbound verifying proxy and the outbound proxy end to end on
//! loopback: a real broker over mTLS, sidecars started from their
//! settings, headers from the local socket API, and an app behind the
//! inbound proxy that reports what reached it.
//! This file: what the inbound proxy checks and lets through; the outbound
//! proxy, revocations and refusal reports have their own files.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, REPORTING, authorize, send};
use support::proxy::{Scene, caller, challenge, charge_with, pair};

/// A request with the app's headers from the socket and spoofed identity
/// headers: it reaches the app with only the proxy's own headers. Its
/// credentials, for the steps that reuse them.
async fn allowed_with_spoofed_headers(scene: &Scene) -> (String, String) {
    let socket = scene.socket.as_path();
    let inbound = scene.inbound;
    let url = &scene.url;
    let app = &scene.app;
    // The app's headers from the socket, plus spoofed identity headers.
    let (auth, dpop) = authorize(socket, "POST", url, "payments:charge").await;
    let body = vec![b'x'; 1 << 20];
    let ok = send(
        inbound,
        "POST",
        "/v1/charges?idempotency=7",
        &[
            ("authorization", &auth),
            ("dpop", &dpop),
            ("x-tally-caller", "spiffe://example.org/ns/evil/sa/mallory"),
            ("x-tally-admin", "yes"),
        ],
        body,
    )
    .await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let seen = ok.json();
    assert_eq!(seen["caller"], CHECKOUT, "spoofed caller replaced");
    assert_eq!(seen["scopes"], "payments:charge");
    assert!(!seen["token_id"].as_str().unwrap().is_empty());
    assert_eq!(
        seen["tally_headers"].as_array().unwrap().len(),
        4,
        "only the proxy's own x-tally-* headers: {seen}"
    );
    assert_eq!(seen["transport"], "plaintext");
    assert_eq!(
        seen["authorization"], false,
        "credentials stay at the proxy"
    );
    assert_eq!(seen["dpop"], false);
    assert_eq!(seen["path"], "/v1/charges?idempotency=7");
    assert_eq!(seen["body_len"], 1 << 20, "the body is streamed whole");
    assert_eq!(app.seen.load(Ordering::SeqCst), 1);
    (auth, dpop)
}

/// The same headers again: the proof was used.
async fn replayed(scene: &Scene, auth: &str, dpop: &str) {
    let inbound = scene.inbound;
    // The same headers again: the proof was used.
    let replay = charge_with(inbound, auth, dpop).await;
    assert_eq!(replay.status, 401);
    assert!(
        challenge(&replay).contains("invalid_dpop_proof"),
        "{}",
        challenge(&replay)
    );
}

/// A thief with the token but not the key: no proof, or Bearer.
async fn stolen(scene: &Scene, auth: &str) {
    let inbound = scene.inbound;
    // A thief with the token but not the key: no proof, or Bearer.
    let stolen = send(
        inbound,
        "POST",
        "/v1/charges",
        &[("authorization", auth)],
        "",
    )
    .await;
    assert_eq!(stolen.status, 401);
    assert!(challenge(&stolen).contains("invalid_dpop_proof"));
    let token = auth.strip_prefix("DPoP ").unwrap();
    let bearer = send(
        inbound,
        "POST",
        "/v1/charges",
        &[("authorization", &format!("Bearer {token}"))],
        "",
    )
    .await;
    assert_eq!(bearer.status, 401);
    assert!(challenge(&bearer).contains("invalid_token"));
}

/// A proof made for another URL.
async fn proof_for_another_url(scene: &Scene) {
    let socket = scene.socket.as_path();
    let inbound = scene.inbound;
    // A proof made for another URL.
    let (auth2, other) = authorize(
        socket,
        "POST",
        &format!("http://{inbound}/v1/refunds"),
        "payments:charge",
    )
    .await;
    let moved = charge_with(inbound, &auth2, &other).await;
    assert_eq!(moved.status, 401);
    assert!(challenge(&moved).contains("invalid_dpop_proof"));
}

/// Good credentials, but the access rules say no: method, then scope.
async fn denied_by_the_rules(scene: &Scene) {
    let socket = scene.socket.as_path();
    let inbound = scene.inbound;
    let url = &scene.url;
    // Good credentials, but the access rules say no: method, then scope.
    let (a, d) = authorize(socket, "GET", url, "payments:charge").await;
    let get = send(
        inbound,
        "GET",
        "/v1/charges",
        &[("authorization", &a), ("dpop", &d)],
        "",
    )
    .await;
    assert_eq!(get.status, 403);
    assert!(
        get.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("method GET")
    );
    let (a, d) = authorize(socket, "POST", url, "payments:read").await;
    let scope = charge_with(inbound, &a, &d).await;
    assert_eq!(scope.status, 403);
    assert!(challenge(&scope).contains("insufficient_scope"));
}

/// Paths with dot segments: judged, and routed, as normalized.
async fn dot_segments(scene: &Scene) {
    let socket = scene.socket.as_path();
    let inbound = scene.inbound;
    // A dot segment does not smuggle a path past the rules: the rules
    // judge the normalized path (the refusal names it), and a path that
    // only matches once normalized is allowed and routed there. (The raw
    // `/v1/charges/../refunds` misses the rule too, so the status alone
    // would prove nothing; tests/hostile_inbound.rs covers the rest.)
    let sneaky = format!("http://{inbound}/v1/charges/../refunds");
    let (a, d) = authorize(socket, "POST", &sneaky, "payments:charge").await;
    let smuggled = send(
        inbound,
        "POST",
        "/v1/charges/../refunds",
        &[("authorization", &a), ("dpop", &d)],
        "",
    )
    .await;
    assert_eq!(smuggled.status, 403);
    assert_eq!(
        smuggled.json()["error_description"],
        "denied by policy: path /v1/refunds is not allowed for this caller",
        "judged as /v1/refunds"
    );
    let roundabout = format!("http://{inbound}/v1/refunds/../charges");
    let (a, d) = authorize(socket, "POST", &roundabout, "payments:charge").await;
    let routed = send(
        inbound,
        "POST",
        "/v1/refunds/../charges",
        &[("authorization", &a), ("dpop", &d)],
        "",
    )
    .await;
    assert_eq!(routed.status, 200, "{:?}", routed.body);
    assert_eq!(
        routed.json()["path"],
        "/v1/charges",
        "the app gets the path judged"
    );
}

/// Two Host headers.
async fn two_hosts(scene: &Scene) {
    let socket = scene.socket.as_path();
    let inbound = scene.inbound;
    let url = &scene.url;
    // Two Host headers: which one would the proof be for?
    let (a, d) = authorize(socket, "POST", url, "payments:charge").await;
    let doubled = send(
        inbound,
        "POST",
        "/v1/charges",
        &[
            ("host", &inbound.to_string()),
            ("host", "payments.evil.example"),
            ("authorization", &a),
            ("dpop", &d),
        ],
        "",
    )
    .await;
    assert_eq!(doubled.status, 400);
    assert!(
        doubled.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("more than one Host")
    );
}

/// Nothing at all.
async fn no_credentials(scene: &Scene) {
    let inbound = scene.inbound;
    // Nothing at all: a bare challenge.
    let none = send(inbound, "POST", "/v1/charges", &[], "").await;
    assert_eq!(none.status, 401);
    assert_eq!(challenge(&none), "DPoP algs=\"ES256\", WPT");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_request_reaches_the_app_with_only_the_proxys_headers() {
    let scene = Scene::start().await;
    allowed_with_spoofed_headers(&scene).await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_proof_is_refused() {
    let scene = Scene::start().await;
    let (auth, dpop) = allowed_with_spoofed_headers(&scene).await;
    replayed(&scene, &auth, &dpop).await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_token_without_its_key_is_refused() {
    let scene = Scene::start().await;
    let (auth, _) = allowed_with_spoofed_headers(&scene).await;
    stolen(&scene, &auth).await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_for_another_url_is_refused() {
    let scene = Scene::start().await;
    proof_for_another_url(&scene).await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_rules_refuse_a_method_then_a_scope() {
    let scene = Scene::start().await;
    denied_by_the_rules(&scene).await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dot_segment_does_not_smuggle_a_path_past_the_rules() {
    let scene = Scene::start().await;
    dot_segments(&scene).await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_host_headers_are_refused() {
    let scene = Scene::start().await;
    two_hosts(&scene).await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_get_a_bare_challenge() {
    let scene = Scene::start().await;
    no_credentials(&scene).await;
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_that_pass_every_check_reach_the_app() {
    let scene = Scene::start().await;
    let (auth, dpop) = allowed_with_spoofed_headers(&scene).await;
    replayed(&scene, &auth, &dpop).await;
    stolen(&scene, &auth).await;
    proof_for_another_url(&scene).await;
    denied_by_the_rules(&scene).await;
    dot_segments(&scene).await;
    two_hosts(&scene).await;
    no_credentials(&scene).await;
    let (app, payments) = (&scene.app, &scene.payments);

    assert_eq!(
        app.seen.load(Ordering::SeqCst),
        2,
        "no refused request reached the app"
    );

    // The admin port says so.
    let admin = payments.admin.unwrap();
    assert_eq!(send(admin, "GET", "/readyz", &[], "").await.status, 200);
    let metrics =
        String::from_utf8(send(admin, "GET", "/metrics", &[], "").await.body.to_vec()).unwrap();
    for line in [
        "tally_sidecar_inbound_requests_total{result=\"allowed\"} 2",
        "tally_sidecar_inbound_requests_total{result=\"replayed_proof\"} 1",
        "tally_sidecar_inbound_requests_total{result=\"policy_denied\"} 2",
        "tally_sidecar_inbound_requests_total{result=\"insufficient_scope\"} 1",
        "tally_sidecar_ready 1",
        "tally_sidecar_watch_connected 1",
    ] {
        assert!(metrics.contains(line), "{line} missing from:\n{metrics}");
    }
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_caller_rate_limits_answer_429_with_retry_after() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let reporting = caller(&mesh, REPORTING, inbound).await;
    let socket = reporting.socket.as_deref().unwrap();
    // The rule for reporting allows 10/s: a burst of 10, then one more
    // every 100 ms. Headers first, then the burst, so it takes a few ms.
    let url = format!("http://{inbound}/v1/charges/ch_1");
    let mut asks = Vec::new();
    for _ in 0..20 {
        asks.push(authorize(socket, "GET", &url, "payments:read").await);
    }
    let mut statuses = Vec::new();
    let mut last_refused = None;
    let started = std::time::Instant::now();
    for (a, d) in &asks {
        let answer = send(
            inbound,
            "GET",
            "/v1/charges/ch_1",
            &[("authorization", a), ("dpop", d)],
            "",
        )
        .await;
        statuses.push(answer.status);
        if answer.status != 200 {
            last_refused = Some(answer);
        }
    }
    // The burst of 10 passes; after it, at most one more per 100 ms that
    // the burst took (however slow the machine), and the rest get 429.
    let allowed = statuses.iter().filter(|s| **s == 200).count();
    let refills = usize::try_from(started.elapsed().as_millis() / 100).unwrap();
    assert!(statuses[..10].iter().all(|s| *s == 200), "{statuses:?}");
    assert!(allowed <= 10 + refills, "{statuses:?} in {refills} refills");
    let refused = last_refused.expect("the limit refused something");
    assert_eq!(refused.status, 429);
    assert!(
        refused
            .header("retry-after")
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(app.seen.load(Ordering::SeqCst) as usize, allowed);
    reporting.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_callers_are_verified_against_their_authority() {
    use http_body_util::{BodyExt as _, Full};
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let (checkout, payments) = pair(&mesh, &app, false).await;
    let inbound = payments.inbound.unwrap();
    let url = format!("http://{inbound}/v1/charges");
    let (auth, dpop) = authorize(
        checkout.socket.as_deref().unwrap(),
        "POST",
        &url,
        "payments:charge",
    )
    .await;

    let stream = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method("POST")
        .uri(&url)
        .header("authorization", &auth)
        .header("dpop", &dpop)
        .body(Full::new(bytes::Bytes::from_static(b"{}")))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), 200);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let seen: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(seen["caller"], CHECKOUT);
    assert_eq!(
        seen["host"],
        inbound.to_string(),
        "the app gets :authority as Host"
    );

    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_says_when_the_svid_has_expired() {
    use tally::clock::Clock as _;
    let mesh = Mesh::start().await;
    let clock = Arc::new(tally::clock::ManualClock::new(
        tally::clock::SystemClock.now(),
    ));
    let sidecar = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                admin: true,
                clock: Some(clock.clone()),
                ..Parts::default()
            },
        )
        .await;
    let admin = sidecar.admin.unwrap();
    assert_eq!(send(admin, "GET", "/readyz", &[], "").await.status, 200);
    // Past the SVID's expiry (no renewal happened: the clock jumped).
    let expires_at = sidecar.sidecar.parts().svid.borrow().expires_at;
    clock.set(expires_at + 5);
    let answer = send(admin, "GET", "/readyz", &[], "").await;
    assert_eq!(answer.status, 503);
    let body = String::from_utf8_lossy(&answer.body);
    assert!(body.contains("X.509-SVID expired 5s ago"), "{body}");
    let metrics = send(admin, "GET", "/metrics", &[], "").await;
    let metrics = String::from_utf8_lossy(&metrics.body);
    assert!(metrics.contains("tally_sidecar_ready 0"), "{metrics}");
    assert!(
        metrics.contains("tally_sidecar_svid_expires_in_seconds -5"),
        "{metrics}"
    );
    sidecar.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_proofs_expire_after_30_seconds() {
    use tally::clock::Clock as _;
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let now = tally::clock::SystemClock.now();
    let clock = Arc::new(tally::clock::ManualClock::new(now));
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                clock: Some(clock.clone()),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let checkout = caller(&mesh, CHECKOUT, inbound).await;
    let url = format!("http://{inbound}/v1/charges");
    let socket = checkout.socket.as_deref().unwrap();
    let (a, d) = authorize(socket, "POST", &url, "payments:charge").await;
    // A minute later at the payments side: the proof is too old (30 s).
    clock.set(tally::clock::SystemClock.now() + 60);
    let late = charge_with(inbound, &a, &d).await;
    assert_eq!(late.status, 401);
    let challenge = late.header("www-authenticate").unwrap();
    assert!(challenge.contains("invalid_dpop_proof"), "{challenge}");
    assert!(
        challenge.contains("more than 30s before now"),
        "{challenge}"
    );
    // Within the age limit, a fresh proof passes.
    clock.set(tally::clock::SystemClock.now() + 3);
    let (a, d) = authorize(socket, "POST", &url, "payments:charge").await;
    let fresh = charge_with(inbound, &a, &d).await;
    assert_eq!(fresh.status, 200);
    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}
