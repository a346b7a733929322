//! The inbound verifying proxy and the outbound proxy end to end on
//! loopback: a real broker over mTLS, sidecars started from their
//! settings, headers from the local socket API, and an app behind the
//! inbound proxy that reports what reached it.

mod support;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, REPORTING, authorize, send};

/// A checkout sidecar (socket + outbound proxy) and a payments sidecar
/// (inbound proxy in front of `app`, admin port).
async fn pair(
    mesh: &Mesh,
    app: &App,
    nonces: bool,
) -> (support::mesh::Started, support::mesh::Started) {
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                admin: true,
                nonces,
                ..Parts::default()
            },
        )
        .await;
    let checkout = caller(mesh, CHECKOUT, payments.inbound.unwrap()).await;
    (checkout, payments)
}

/// A broker, the app, checkout calling payments (no server nonces), and
/// where to reach them.
struct Scene {
    mesh: Mesh,
    app: App,
    checkout: support::mesh::Started,
    payments: support::mesh::Started,
    /// Checkout's socket.
    socket: std::path::PathBuf,
    /// Payments' inbound proxy.
    inbound: std::net::SocketAddr,
    /// `POST` here to charge.
    url: String,
}

impl Scene {
    async fn start() -> Self {
        let mesh = Mesh::start().await;
        let app = App::start().await;
        let (checkout, payments) = pair(&mesh, &app, false).await;
        let socket = checkout.socket.clone().unwrap();
        let inbound = payments.inbound.unwrap();
        Self {
            url: format!("http://{inbound}/v1/charges"),
            mesh,
            app,
            checkout,
            payments,
            socket,
            inbound,
        }
    }
}

/// A calling sidecar for `id` (socket and outbound proxy) whose service
/// map sends `inbound` to the payments audience.
async fn caller(mesh: &Mesh, id: &str, inbound: std::net::SocketAddr) -> support::mesh::Started {
    let started = mesh
        .sidecar(
            id,
            Parts {
                socket: true,
                outbound: true,
                services: vec![(inbound.to_string(), PAYMENTS.to_owned())],
                ..Parts::default()
            },
        )
        .await;
    let scope = if id == CHECKOUT {
        "payments:charge"
    } else {
        "payments:read"
    };
    support::mesh::prime_nonce(started.socket.as_deref().unwrap(), inbound, scope).await;
    started
}

/// `POST /v1/charges` to the inbound proxy with these credentials.
async fn charge_with(
    inbound: std::net::SocketAddr,
    authorization: &str,
    dpop: &str,
) -> support::mesh::Answer {
    let headers = [("authorization", authorization), ("dpop", dpop)];
    send(inbound, "POST", "/v1/charges", &headers, "").await
}

fn challenge(answer: &support::mesh::Answer) -> String {
    answer.header("www-authenticate").unwrap_or("").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_requests_that_pass_every_check_reach_the_app() {
    let Scene {
        mesh,
        app,
        checkout,
        payments,
        socket,
        inbound,
        url,
    } = Scene::start().await;
    let socket = socket.as_path();

    // The app's headers from the socket, plus spoofed identity headers.
    let (auth, dpop) = authorize(socket, "POST", &url, "payments:charge").await;
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
        3,
        "only the proxy's own x-tally-* headers: {seen}"
    );
    assert_eq!(
        seen["authorization"], false,
        "credentials stay at the proxy"
    );
    assert_eq!(seen["dpop"], false);
    assert_eq!(seen["path"], "/v1/charges?idempotency=7");
    assert_eq!(seen["body_len"], 1 << 20, "the body is streamed whole");
    assert_eq!(app.seen.load(Ordering::SeqCst), 1);

    // The same headers again: the proof was used.
    let replay = charge_with(inbound, &auth, &dpop).await;
    assert_eq!(replay.status, 401);
    assert!(
        challenge(&replay).contains("invalid_dpop_proof"),
        "{}",
        challenge(&replay)
    );

    // A thief with the token but not the key: no proof, or Bearer.
    let stolen = send(
        inbound,
        "POST",
        "/v1/charges",
        &[("authorization", &auth)],
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

    // Good credentials, but the access rules say no: method, then scope.
    let (a, d) = authorize(socket, "GET", &url, "payments:charge").await;
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
    let (a, d) = authorize(socket, "POST", &url, "payments:read").await;
    let scope = charge_with(inbound, &a, &d).await;
    assert_eq!(scope.status, 403);
    assert!(challenge(&scope).contains("insufficient_scope"));
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

    // Two Host headers: which one would the proof be for?
    let (a, d) = authorize(socket, "POST", &url, "payments:charge").await;
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

    // Nothing at all: a bare challenge.
    let none = send(inbound, "POST", "/v1/charges", &[], "").await;
    assert_eq!(none.status, 401);
    assert_eq!(challenge(&none), "DPoP algs=\"ES256\"");

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

    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    app.stop();
    mesh.broker.stop().await;
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
async fn the_outbound_proxy_signs_mapped_hosts_and_answers_nonce_challenges() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    // The payments side demands server nonces.
    let (checkout, payments) = pair(&mesh, &app, true).await;
    let proxy = checkout.outbound.unwrap();
    let inbound = payments.inbound.unwrap();

    // The app just sends plain HTTP through its proxy.
    let url = format!("http://{inbound}/v1/charges");
    let answer = send(
        proxy,
        "POST",
        &url,
        &[
            ("host", &inbound.to_string()),
            ("x-tally-scope", "payments:charge"),
        ],
        r#"{"amount": 100}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let seen = answer.json();
    assert_eq!(seen["caller"], CHECKOUT);
    assert_eq!(
        seen["body_len"], 15,
        "the body was resent on the nonce retry"
    );
    // First try without a nonce, then once with it; the nonce is kept, so
    // the next request needs no retry.
    let again = send(
        proxy,
        "POST",
        &url,
        &[
            ("host", &inbound.to_string()),
            ("x-tally-scope", "payments:charge"),
        ],
        "",
    )
    .await;
    assert_eq!(again.status, 200);
    let admin = payments.admin.unwrap();
    let metrics =
        String::from_utf8(send(admin, "GET", "/metrics", &[], "").await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("tally_sidecar_inbound_requests_total{result=\"use_dpop_nonce\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_sidecar_inbound_requests_total{result=\"allowed\"} 2"),
        "{metrics}"
    );

    // A chunked body larger than what is held for retries is streamed
    // (with the nonce remembered from before, so no retry is needed).
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let head = format!(
            "POST {url} HTTP/1.1\r\nHost: {inbound}\r\nx-tally-scope: payments:charge\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'z'; 100_000];
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(&chunk).await.unwrap();
        stream.write_all(b"\r\n0\r\n\r\n").await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8_lossy(&raw);
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        assert!(raw.contains("\"body_len\":100000"), "{raw}");
    }

    // A host not in the service map passes through untouched.
    let direct = format!("http://{}/health", app.addr);
    let plain = send(
        proxy,
        "GET",
        &direct,
        &[("host", &app.addr.to_string())],
        "",
    )
    .await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.json()["authorization"], false);
    assert_eq!(plain.json()["caller"], serde_json::Value::Null);

    // Origin-form requests are not proxy requests.
    let wrong = send(proxy, "GET", "/v1/charges", &[], "").await;
    assert_eq!(wrong.status, 400);

    // CONNECT: a tunnel, bytes passed through untouched.
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let target = app.addr.to_string();
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).await.unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    stream
        .write_all(
            format!("GET /tunnelled HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"path\":\"/tunnelled\""), "{raw}");

    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_outbound_proxy_refuses_unknown_hosts() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                outbound: true,
                strict: true,
                ..Parts::default()
            },
        )
        .await;
    let proxy = checkout.outbound.unwrap();
    let url = format!("http://{}/x", app.addr);
    let refused = send(proxy, "GET", &url, &[("host", &app.addr.to_string())], "").await;
    assert_eq!(refused.status, 403);
    assert_eq!(app.seen.load(Ordering::SeqCst), 0);
    checkout.sidecar.stop().await.unwrap();
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

/// The claims of the token in an `Authorization: DPoP …` value.
fn claims_of(authorization: &str) -> serde_json::Value {
    let payload = authorization
        .trim_start_matches("DPoP ")
        .split('.')
        .nth(1)
        .unwrap();
    serde_json::from_slice(&tally::jose::b64::decode(payload.as_bytes()).unwrap()).unwrap()
}

/// Waits until the sidecar has received `n` revocations.
async fn revocations(sidecar: &support::mesh::Started, n: u64) {
    let mut mesh = sidecar.sidecar.parts().mesh.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        mesh.wait_for(|m| m.revocations_seen >= n),
    )
    .await
    .unwrap_or_else(|_| {
        panic!(
            "revocation {n} never arrived; seen {}",
            sidecar.sidecar.parts().mesh.borrow().revocations_seen
        )
    })
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_reach_the_sidecars_and_are_enforced() {
    use tally::clock::Clock as _;
    use tally::token::RevocationTarget;
    let Scene {
        mesh,
        app: _app,
        checkout,
        payments,
        socket,
        inbound,
        url,
    } = Scene::start().await;
    let socket = socket.as_path();
    let admin: tally::identity::SpiffeId = "spiffe://example.org/admin".parse().unwrap();
    let broker = &mesh.broker.broker;
    let charge = |(a, d): (String, String)| async move { charge_with(inbound, &a, &d).await };

    // Two sets of headers for the same cached token; the first works.
    let first = authorize(socket, "POST", &url, "payments:charge").await;
    let second = authorize(socket, "POST", &url, "payments:charge").await;
    assert_eq!(first.0, second.0, "one cached token");
    let ok = charge(first).await;
    assert_eq!(ok.status, 200);
    let jti = ok.json()["token_id"].as_str().unwrap().to_owned();

    // Revoked by jti: durable at the broker, then enforced at payments
    // (the token was verified and cached there already).
    let unknown = broker
        .revoke(RevocationTarget::Jti("nope".into()), None, "", &admin)
        .await;
    assert!(
        matches!(&unknown, Err(tally::broker::BrokerError::Revoke(m)) if m == "no token with jti \"nope\" in the inventory"),
        "an unknown jti is refused, not recorded: {unknown:?}"
    );
    broker
        .revoke(
            RevocationTarget::Jti(jti.clone()),
            None,
            "leaked in a log",
            &admin,
        )
        .await
        .unwrap();
    revocations(&payments, 1).await;
    revocations(&checkout, 1).await;
    let refused = charge(second).await;
    assert_eq!(refused.status, 401);
    let challenge = refused.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("invalid_token") && challenge.contains("revoked"),
        "{challenge}"
    );
    // The holder dropped its copy: the next headers carry a new token.
    let fresh = authorize(socket, "POST", &url, "payments:charge").await;
    let answer = charge(fresh).await;
    assert_eq!(answer.status, 200);
    assert_ne!(answer.json()["token_id"].as_str().unwrap(), jti);

    // By DPoP key (another key's: no effect; checkout's own: refused) and
    // by workload: headers made before are refused.
    let probe = authorize(socket, "POST", &url, "payments:charge").await;
    let claims = claims_of(&probe.0);
    let own_key: tally::jose::Jkt = claims["cnf"]["jkt"].as_str().unwrap().parse().unwrap();
    let other_key = tally::dpop::ProofKey::generate().unwrap().thumbprint();
    // Headers made before each revocation (one token, three proofs).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(authorize(socket, "POST", &url, "payments:charge").await);
    }
    let mut workload_revoked_up_to = 0;
    for ((n, target, expected), before) in [
        (2, RevocationTarget::Jkt(other_key), 200),
        (3, RevocationTarget::Jkt(own_key), 401),
        (4, RevocationTarget::Subject(CHECKOUT.parse().unwrap()), 401),
    ]
    .into_iter()
    .zip(held)
    {
        let (_, entry) = broker
            .revoke(target.clone(), None, "", &admin)
            .await
            .unwrap();
        workload_revoked_up_to = entry.issued_before;
        revocations(&payments, n).await;
        assert_eq!(charge(before).await.status, expected, "{target:?}");
    }
    // The revoked workload is not handed tokens the revocation covers:
    // within the revocation's second the socket says so (403); later it
    // gets a new token, issued after the revocation (a token from inside
    // the revoked second would be refused everywhere). Which of the two
    // depends on the wall clock here; tests/hostile_revocation.rs pins
    // both with a manual clock.
    revocations(&checkout, 4).await;
    let ask = serde_json::json!({"method": "POST", "url": url, "scope": "payments:charge"});
    let (status, answer) = support::mesh::local(socket, "POST", "/v1/authorize", Some(ask)).await;
    match status {
        403 => assert!(
            answer["error_description"]
                .as_str()
                .unwrap()
                .contains("revoked")
        ),
        200 => {
            let replacement = answer["authorization"].as_str().unwrap();
            assert_ne!(replacement, probe.0);
            let iat = claims_of(replacement)["iat"].as_u64().unwrap();
            assert!(
                iat > workload_revoked_up_to,
                "a token issued at {iat}, inside the revoked second {workload_revoked_up_to}"
            );
        }
        other => panic!("{other}: {answer}"),
    }
    // Everything issued before a time.
    let everything = tally::clock::SystemClock.now();
    let (seq, entry) = broker
        .revoke(RevocationTarget::Everything, Some(everything), "", &admin)
        .await
        .unwrap();
    assert!(seq > 0 && entry.expires_at > everything);
    revocations(&payments, 5).await;
    let late = broker
        .revoke(
            RevocationTarget::Everything,
            Some(everything + 3600),
            "",
            &admin,
        )
        .await;
    assert!(
        matches!(&late, Err(tally::broker::BrokerError::Revoke(m)) if m.contains("is in the future")),
        "a time in the future is refused: {late:?}"
    );

    let admin_port = payments.admin.unwrap();
    let metrics = String::from_utf8(
        send(admin_port, "GET", "/metrics", &[], "")
            .await
            .body
            .to_vec(),
    )
    .unwrap();
    assert!(
        metrics.contains("tally_sidecar_revocation_lag_seconds_count 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_sidecar_inbound_requests_total{result=\"revoked\"}"),
        "{metrics}"
    );

    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_stream_down_past_the_bound_makes_the_sidecar_not_ready() {
    use tally::clock::Clock as _;
    let mesh = Mesh::start().await;
    let now = tally::clock::SystemClock.now();
    let clock = Arc::new(tally::clock::ManualClock::new(now));
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
    // The broker goes away; the sidecar notices the stream is down.
    mesh.broker.stop().await;
    let mut state = sidecar.sidecar.parts().mesh.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        state.wait_for(|m| !m.connected),
    )
    .await
    .unwrap()
    .unwrap();
    // Within the bound it stays ready (it still verifies with what it has)...
    clock.set(now + 20);
    assert_eq!(send(admin, "GET", "/readyz", &[], "").await.status, 200);
    // ...past it, it says why it is not.
    clock.set(now + 45);
    let answer = send(admin, "GET", "/readyz", &[], "").await;
    assert_eq!(answer.status, 503);
    let body = String::from_utf8_lossy(&answer.body);
    assert!(
        body.contains("Watch stream to the broker has been down for 45s"),
        "{body}"
    );
    let metrics = send(admin, "GET", "/metrics", &[], "").await;
    assert!(String::from_utf8_lossy(&metrics.body).contains("tally_sidecar_watch_down_seconds 45"));
    sidecar.sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_deny_when_stale_an_out_of_touch_sidecar_refuses_instead_of_guessing() {
    use tally::clock::Clock as _;
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let now = tally::clock::SystemClock.now();
    let clock = Arc::new(tally::clock::ManualClock::new(now));
    let mut inbound = Vec::new();
    let mut sidecars = Vec::new();
    for deny in [false, true] {
        let s = mesh
            .sidecar(
                PAYMENTS,
                Parts {
                    inbound_to: Some(app.addr),
                    deny_when_stale: deny,
                    clock: Some(clock.clone()),
                    ..Parts::default()
                },
            )
            .await;
        inbound.push(s.inbound.unwrap());
        sidecars.push(s);
    }
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                socket: true,
                services: inbound
                    .iter()
                    .map(|a| (a.to_string(), PAYMENTS.to_owned()))
                    .collect(),
                clock: Some(clock.clone()),
                ..Parts::default()
            },
        )
        .await;
    let socket = checkout.socket.as_deref().unwrap();
    let urls: Vec<String> = inbound
        .iter()
        .map(|a| format!("http://{a}/v1/charges"))
        .collect();
    // The checkout sidecar has its token cached before the outage.
    authorize(socket, "POST", &urls[0], "payments:charge").await;
    // The broker goes away and stays away past the 30 s bound.
    mesh.broker.stop().await;
    for s in &sidecars {
        let mut state = s.sidecar.parts().mesh.clone();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            state.wait_for(|m| !m.connected),
        )
        .await
        .unwrap()
        .unwrap();
    }
    // A minute on (one clock for all three sidecars, so proofs are fresh).
    clock.set(now + 60);
    let mut held = Vec::new();
    for url in &urls {
        held.push(authorize(socket, "POST", url, "payments:charge").await);
    }
    // Default: a service token is still checked against what it knows.
    let (a, d) = &held[0];
    assert_eq!(charge_with(inbound[0], a, d).await.status, 200);
    // deny_when_stale: refused, saying why.
    let (a, d) = &held[1];
    let refused = charge_with(inbound[1], a, d).await;
    assert_eq!(refused.status, 503);
    assert!(
        refused.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("revoked")
    );
    assert!(refused.header("retry-after").is_some());
    checkout.sidecar.stop().await.unwrap();
    for s in sidecars {
        s.sidecar.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_signing_key_is_withdrawn_and_nothing_it_signs_passes_any_more() {
    use tally::clock::Clock as _;
    let Scene {
        mesh,
        app: _app,
        checkout,
        payments,
        socket,
        inbound,
        url,
    } = Scene::start().await;
    let socket = socket.as_path();
    let admin: tally::identity::SpiffeId = "spiffe://example.org/admin".parse().unwrap();
    let broker = &mesh.broker.broker;

    // Whoever holds the signing key can mint any token, with any iat, for
    // a DPoP key of their own: this is what the runbook must stop.
    let stored = broker.store().signing_keys().await.unwrap();
    assert_eq!(stored.len(), 1);
    let leaked = tally::token::TokenSigner::new(
        tally::jose::SigningKey::from_pkcs8_der(&stored[0].pkcs8).unwrap(),
        stored[0].kid.clone(),
        broker.issuer(),
    );
    let forge = |nonce: Option<&str>| {
        let thief = tally::dpop::ProofKey::generate().unwrap();
        let now = tally::clock::SystemClock.now();
        let (token, _) = leaked
            .mint(
                &tally::token::MintRequest {
                    subject: &CHECKOUT.parse().unwrap(),
                    audience: &PAYMENTS.parse().unwrap(),
                    scope: &"payments:charge".parse().unwrap(),
                    class: tally::token::TokenClass::Service,
                    ttl: 300,
                    jkt: thief.thumbprint(),
                },
                now,
            )
            .unwrap();
        let proof = thief
            .mint("POST", &url, Some(token.expose()), nonce, now)
            .unwrap();
        (format!("DPoP {}", token.expose()), proof)
    };
    // The freshly started sidecar asks for a nonce, as it would of anyone.
    let (a, d) = forge(None);
    let asked = charge_with(inbound, &a, &d).await;
    assert_eq!(asked.status, 401);
    let nonce = asked.header("dpop-nonce").unwrap().to_owned();
    let forge = || forge(Some(&nonce));
    let (a, d) = forge();
    assert_eq!(
        charge_with(inbound, &a, &d).await.status,
        200,
        "the forgery works"
    );
    let held = authorize(socket, "POST", &url, "payments:charge").await;
    let before = authorize(socket, "POST", &url, "payments:charge").await;
    assert_eq!(charge_with(inbound, &held.0, &held.1).await.status, 200);

    let (new_kid, withdrawn) = broker
        .replace_leaked_signing_key(&admin, "signing key in a core dump")
        .await
        .unwrap();
    assert_eq!(withdrawn, [stored[0].kid.clone()]);
    assert_ne!(new_kid, stored[0].kid);
    revocations(&payments, 1).await;
    revocations(&checkout, 1).await;

    // Forged now, with a fresh iat: refused. Headers made before: refused.
    let (a, d) = forge();
    assert_eq!(charge_with(inbound, &a, &d).await.status, 401);
    assert_eq!(charge_with(inbound, &before.0, &before.1).await.status, 401);
    // The holder dropped its old-key token; the next one is signed by the
    // new key and passes.
    let fresh = authorize(socket, "POST", &url, "payments:charge").await;
    assert_ne!(fresh.0, before.0);
    let answer = charge_with(inbound, &fresh.0, &fresh.1).await;
    assert_eq!(answer.status, 200);

    // The broker never signs with it again, nor publishes it.
    let keys = broker.store().signing_keys().await.unwrap();
    let old = keys.iter().find(|k| k.kid == stored[0].kid).unwrap();
    assert!(old.withdrawn_at.is_some());
    assert!(broker.jwks().get(&stored[0].kid).is_none());
    assert!(broker.jwks().get(&new_kid).is_some());

    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_reach_the_audit_log_and_a_leaked_token_lookup_shows_them() {
    let Scene {
        mesh,
        app: _app,
        checkout,
        payments,
        socket,
        inbound,
        url,
    } = Scene::start().await;
    let socket = socket.as_path();
    let broker = &mesh.broker.broker;

    // The token leaks; a thief uses it three times with their own key.
    let (authorization, _) = authorize(socket, "POST", &url, "payments:charge").await;
    let token = authorization.trim_start_matches("DPoP ").to_owned();
    let thief = tally::dpop::ProofKey::generate().unwrap();
    for _ in 0..3 {
        let now = tally::clock::Clock::now(&tally::clock::SystemClock);
        let proof = thief.mint("POST", &url, Some(&token), None, now).unwrap();
        assert_eq!(
            charge_with(inbound, &authorization, &proof).await.status,
            401
        );
    }
    // A flood with no credentials at all is summarized, not one record each.
    for _ in 0..200 {
        let answer = send(inbound, "GET", "/probe", &[], "").await;
        assert_eq!(answer.status, 401);
    }

    // From the token alone: who it was issued to, and every failed use,
    // reported by the payments sidecar.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let lookup = loop {
        let found = broker.lookup_token(&token).await.unwrap().unwrap();
        if found
            .records
            .iter()
            .any(|r| r.kind == "token.verify_failure")
        {
            break found;
        }
        assert!(std::time::Instant::now() < deadline, "no failure reported");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(lookup.token.sub.as_str(), CHECKOUT);
    let failure: serde_json::Value = lookup
        .records
        .iter()
        .find(|r| r.kind == "token.verify_failure")
        .map(|r| serde_json::from_str(&r.line).unwrap())
        .unwrap();
    assert_eq!(
        failure["actor"], PAYMENTS,
        "reported by the verifying sidecar"
    );
    assert_eq!(failure["reason"], "invalid_dpop_proof");
    assert_eq!(failure["path"], "/v1/charges");
    assert_eq!(failure["claimed_sub"], CHECKOUT);
    // All three uses in the one record, unless the interval ended between
    // them.
    let uses: u64 = lookup
        .records
        .iter()
        .filter(|r| r.kind == "token.verify_failure")
        .map(|r| {
            serde_json::from_str::<serde_json::Value>(&r.line).unwrap()["count"]
                .as_u64()
                .unwrap()
        })
        .sum();
    assert_eq!(uses, 3);
    // The flood: one record per interval with its count (distinct keys
    // past 64 per interval are counted by reason only; see the unit test).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let flood = loop {
        let filter = tally::store::AuditFilter {
            kind: Some("token.verify_failure".into()),
            ..Default::default()
        };
        let records = broker.query_audit(&filter, 1000).await.unwrap();
        let counted: u64 = records
            .iter()
            .map(|r| serde_json::from_str::<serde_json::Value>(&r.line).unwrap())
            .filter(|v| v["reason"] == "no_credentials" || v["reason"] == "summary")
            .map(|v| {
                v["count"].as_u64().unwrap_or(0)
                    + v["overflow"]["no_credentials"].as_u64().unwrap_or(0)
            })
            .sum();
        if counted == 200 {
            break records;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "counted {counted} of 200"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let probes = flood
        .iter()
        .filter(|r| r.line.contains("\"path\":\"/probe\""))
        .count();
    assert!(probes <= 20, "{probes} records for 200 refusals");

    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_sidecar_reports_its_last_refusals() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    // Reports every hour: only the flush at stop can deliver this one.
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                report_every: Some(std::time::Duration::from_secs(3600)),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let answer = send(inbound, "GET", "/v1/charges/last-words", &[], "").await;
    assert_eq!(answer.status, 401);
    payments.sidecar.stop().await.unwrap();
    let filter = tally::store::AuditFilter {
        kind: Some("token.verify_failure".into()),
        ..Default::default()
    };
    let records = mesh.broker.broker.query_audit(&filter, 10).await.unwrap();
    assert_eq!(records.len(), 1, "delivered before stop returned");
    assert!(
        records[0].line.contains("/v1/charges/last-words"),
        "{}",
        records[0].line
    );
    mesh.broker.stop().await;
}

/// Reads from `tcp` until a blank line ends the response head; returns it
/// and whatever came after.
async fn response_head(tcp: &mut tokio::net::TcpStream) -> (String, Vec<u8>) {
    use tokio::io::AsyncReadExt as _;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "closed before the head ended: {:?}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
        if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = got.split_off(end + 4);
            return (String::from_utf8_lossy(&got).into_owned(), rest);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_handshake_is_checked_then_joined_to_the_app() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Scene {
        mesh,
        app,
        checkout,
        payments,
        inbound,
        ..
    } = Scene::start().await;
    let reporting = caller(&mesh, REPORTING, inbound).await;
    let socket = reporting.socket.as_deref().unwrap();
    let url = format!("http://{inbound}/v1/ws/prices");
    let (authorization, dpop) = authorize(socket, "GET", &url, "payments:read").await;
    let handshake = |extra: &str| {
        format!(
            "GET /v1/ws/prices HTTP/1.1\r\nHost: {inbound}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{extra}\r\n"
        )
    };

    // Checked like any request: no credentials, no tunnel, and the app
    // never hears of it.
    let seen = app.seen.load(Ordering::SeqCst);
    let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    tcp.write_all(handshake("").as_bytes()).await.unwrap();
    let (head, _) = response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(app.seen.load(Ordering::SeqCst), seen);

    // With the token and its proof: 101, then bytes both ways, the app
    // having been told who is calling.
    let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let credentials = format!("Authorization: {authorization}\r\nDPoP: {dpop}\r\n");
    tcp.write_all(handshake(&credentials).as_bytes())
        .await
        .unwrap();
    let (head, mut rest) = response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    while !rest.contains(&b'\n') {
        let mut buf = [0u8; 256];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&buf[..n]);
    }
    let first_line = String::from_utf8_lossy(&rest)
        .lines()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        first_line, REPORTING,
        "the app learned the caller from the sidecar"
    );
    tcp.write_all(b"ping 1234").await.unwrap();
    let mut echoed = vec![0u8; 9];
    tcp.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping 1234");

    // The same proof again: a replay, refused before any upgrade.
    let mut replay = tokio::net::TcpStream::connect(inbound).await.unwrap();
    replay
        .write_all(handshake(&credentials).as_bytes())
        .await
        .unwrap();
    let (head, _) = response_head(&mut replay).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");

    // The tunnel lives only as long as its token: a revocation covering it
    // closes the open connection.
    let admin = "spiffe://example.org/admin".parse().unwrap();
    mesh.broker
        .broker
        .revoke(
            tally::token::RevocationTarget::Subject(REPORTING.parse().unwrap()),
            None,
            "",
            &admin,
        )
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the tunnel is closed once the revocation arrives");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    reporting.sidecar.stop().await.unwrap();
    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}
