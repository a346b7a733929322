//! Attacks on the inbound verifying proxy's view of a request: encoded
//! path delimiters an app decodes before routing, an authority other than
//! the one the proof was checked against, and upgrades that would carry
//! unchecked traffic. A real broker, real sidecars, an app that reports
//! what reached it.

mod support;

use std::sync::atomic::Ordering;
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, REPORTING, authorize, send};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Payments behind an inbound proxy; a checkout and a reporting caller.
struct Scene {
    _mesh: Mesh,
    app: App,
    inbound: std::net::SocketAddr,
    checkout: support::mesh::Started,
    reporting: support::mesh::Started,
    _payments: support::mesh::Started,
}

impl Scene {
    async fn start(authorities: Vec<String>) -> Self {
        let mesh = Mesh::start().await;
        let app = App::start().await;
        let payments = mesh
            .sidecar(
                PAYMENTS,
                Parts {
                    inbound_to: Some(app.addr),
                    authorities: authorities.clone(),
                    ..Parts::default()
                },
            )
            .await;
        let inbound = payments.inbound.unwrap();
        let mut services = vec![(inbound.to_string(), PAYMENTS.to_owned())];
        services.extend(authorities.iter().map(|a| (a.clone(), PAYMENTS.to_owned())));
        let caller = |id| {
            mesh.sidecar(
                id,
                Parts {
                    socket: true,
                    services: services.clone(),
                    ..Parts::default()
                },
            )
        };
        let checkout = caller(CHECKOUT).await;
        let reporting = caller(REPORTING).await;
        Self {
            app,
            inbound,
            checkout,
            reporting,
            _payments: payments,
            _mesh: mesh,
        }
    }

    /// Headers for `method url` from `who`'s socket, sent to the inbound
    /// proxy with `target` as written and the nonce round trip a client
    /// does (a fresh sidecar asks for one).
    async fn call(
        &self,
        who: &support::mesh::Started,
        method: &str,
        url: &str,
        target: &str,
        scope: &str,
        extra: &[(&str, &str)],
    ) -> support::mesh::Answer {
        let socket = who.socket.as_deref().unwrap();
        let mut nonce: Option<String> = None;
        for _ in 0..2 {
            let (authorization, dpop) =
                support::mesh::authorize_with_nonce(socket, method, url, scope, nonce.as_deref())
                    .await;
            let mut headers = vec![
                ("authorization", authorization.as_str()),
                ("dpop", dpop.as_str()),
            ];
            headers.extend_from_slice(extra);
            let answer = send(self.inbound, method, target, &headers, "").await;
            match answer.header("dpop-nonce") {
                Some(n) if answer.status == 401 && nonce.is_none() => nonce = Some(n.to_owned()),
                _ => return answer,
            }
        }
        unreachable!("the second answer is returned")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encoded_delimiters_never_reach_the_app() {
    let scene = Scene::start(Vec::new()).await;
    let inbound = scene.inbound;
    // Each passes `POST /v1/charges/*` as one encoded segment, and an app
    // that decodes before routing would serve another path.
    for path in [
        "/v1/charges/..%2F..%2Fadmin",
        "/v1/charges/..%2f..%2fadmin",
        "/v1/charges/%2E%2E%2F%2E%2E%2Fadmin",
        "/v1/charges/..%5C..%5Cadmin",
        "/v1/charges/%252e%252e%252fadmin",
        "/v1/charges/x%00.json",
        "/v1/charges/%C0%AE%C0%AE",
        "/v1/charges/..;",
    ] {
        let seen = scene.app.seen.load(Ordering::SeqCst);
        let url = format!("http://{inbound}{path}");
        let answer = scene
            .call(&scene.checkout, "POST", &url, path, "payments:charge", &[])
            .await;
        assert_eq!(answer.status, 400, "{path}: {:?}", answer.body);
        let body = answer.json();
        assert_eq!(body["error"], "invalid_request", "{path}");
        assert!(
            body["error_description"]
                .as_str()
                .unwrap()
                .starts_with("request path: "),
            "{path}: {body}"
        );
        assert_eq!(
            scene.app.seen.load(Ordering::SeqCst),
            seen,
            "{path} reached the app"
        );
    }
    // A dot segment with parameters under a `/v1/**` rule.
    let path = "/v1/public/..;/admin";
    let url = format!("http://{inbound}{path}");
    let answer = scene
        .call(&scene.reporting, "GET", &url, path, "payments:read", &[])
        .await;
    assert_eq!(answer.status, 400, "{:?}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_routes_exactly_the_path_the_rules_judged() {
    let scene = Scene::start(Vec::new()).await;
    let inbound = scene.inbound;
    // Allowed only once normalized: `/v1/refunds/../charges` is
    // `/v1/charges`, which checkout may POST to; the raw path matches no
    // rule of checkout's.
    let path = "/v1/refunds/../charges";
    let url = format!("http://{inbound}{path}");
    let answer = scene
        .call(&scene.checkout, "POST", &url, path, "payments:charge", &[])
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["path"], "/v1/charges");
    // Encoded unreserved characters are decoded for the app too.
    let path = "/v1/charges/%7Ealice";
    let url = format!("http://{inbound}{path}");
    let answer = scene
        .call(&scene.checkout, "POST", &url, path, "payments:charge", &[])
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["path"], "/v1/charges/~alice");
    // And one that normalizes out of the rule is judged there: denied.
    let path = "/v1/charges/../../admin";
    let url = format!("http://{inbound}{path}");
    let answer = scene
        .call(&scene.checkout, "POST", &url, path, "payments:charge", &[])
        .await;
    assert_eq!(answer.status, 403, "{:?}", answer.body);
}

/// Writes `request` on a new connection and reads until the server
/// closes or 5 s pass.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    got.extend_from_slice(&buf[..n]);
                    if got.windows(4).any(|w| w == b"\r\n\r\n") && got.ends_with(b"}") {
                        break;
                    }
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_app_sees_the_authority_the_proof_was_checked_against() {
    let scene = Scene::start(Vec::new()).await;
    let inbound = scene.inbound;
    let socket = scene.checkout.socket.as_deref().unwrap();
    let url = format!("http://{inbound}/v1/charges");

    // Absolute form with a different Host: refused before the app.
    let seen = scene.app.seen.load(Ordering::SeqCst);
    let (authorization, dpop) = authorize(socket, "POST", &url, "payments:charge").await;
    let head = raw(
        inbound,
        &format!(
            "POST {url} HTTP/1.1\r\nHost: admin.internal\r\nAuthorization: {authorization}\r\nDPoP: {dpop}\r\nContent-Length: 0\r\n\r\n"
        ),
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.contains("the Host header does not name the authority"),
        "{head}"
    );
    assert_eq!(scene.app.seen.load(Ordering::SeqCst), seen);

    // Absolute form with the same authority: the app gets that as Host.
    let answer = scene
        .call(
            &scene.checkout,
            "POST",
            &url,
            &url,
            "payments:charge",
            &[("host", &inbound.to_string())],
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["host"], inbound.to_string());

    // HTTP/2: `:authority` and a different `host` header.
    let (authorization, dpop) = authorize(socket, "POST", &url, "payments:charge").await;
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let request = http::Request::builder()
        .method("POST")
        .uri(&url)
        .header("host", "admin.internal")
        .header("authorization", authorization)
        .header("dpop", dpop)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 400);
    assert_eq!(scene.app.seen.load(Ordering::SeqCst), seen + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authority_outside_the_allowed_list_is_refused_before_any_token_work() {
    let mesh_authority = "payments.pay.svc:8080";
    let scene = Scene::start(vec![mesh_authority.to_owned()]).await;
    let inbound = scene.inbound;
    let seen = scene.app.seen.load(Ordering::SeqCst);
    // No credentials at all: the authority decides first (421, not 401).
    let answer = send(inbound, "GET", "/v1/charges", &[], "").await;
    assert_eq!(answer.status, 421, "{:?}", answer.body);
    assert_eq!(answer.json()["error"], "invalid_request");
    // The allowed authority (as the caller addressed it) is served.
    let url = format!("http://{mesh_authority}/v1/charges");
    let answer = scene
        .call(
            &scene.checkout,
            "POST",
            &url,
            "/v1/charges",
            "payments:charge",
            &[("host", "Payments.Pay.Svc:8080")],
        )
        .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["host"], "Payments.Pay.Svc:8080");
    assert_eq!(scene.app.seen.load(Ordering::SeqCst), seen + 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_websocket_upgrades_are_tunneled() {
    let scene = Scene::start(Vec::new()).await;
    let inbound = scene.inbound;
    let url = format!("http://{inbound}/v1/ws/prices");
    for upgrade in ["h2c", "echo", "websocket, h2c", "TLS/1.0"] {
        let socket = scene.reporting.socket.as_deref().unwrap();
        let mut nonce = None;
        let head = loop {
            let (authorization, dpop) = support::mesh::authorize_with_nonce(
                socket,
                "GET",
                &url,
                "payments:read",
                nonce.as_deref(),
            )
            .await;
            let mut extra = String::new();
            if upgrade == "h2c" {
                extra.push_str("HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n");
            }
            let head = raw(
                inbound,
                &format!(
                    "GET /v1/ws/prices HTTP/1.1\r\nHost: {inbound}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: {upgrade}\r\n{extra}Authorization: {authorization}\r\nDPoP: {dpop}\r\n\r\n"
                ),
            )
            .await;
            let asked = head
                .lines()
                .find_map(|l| l.strip_prefix("dpop-nonce: "))
                .map(str::to_owned);
            match asked {
                Some(n) if head.starts_with("HTTP/1.1 401") && nonce.is_none() => nonce = Some(n),
                _ => break head,
            }
        };
        // The request reaches the app as a plain one (it answers 200 with
        // JSON), never switching protocols: the app saw no Upgrade.
        assert!(head.starts_with("HTTP/1.1 200"), "{upgrade}: {head}");
        assert!(!head.contains("101"), "{upgrade}: {head}");
        let body = &head[head.find("\r\n\r\n").unwrap() + 4..];
        let description: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(description["upgrade"], serde_json::Value::Null, "{upgrade}");
    }
}
