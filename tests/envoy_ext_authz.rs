//! A real Envoy in front of an app, its ext_authz filter calling a real
//! sidecar (docs/envoy/envoy.yaml, ports swapped): the answers a caller
//! gets through Envoy are the inbound proxy's. Skips loudly without
//! `envoy` on PATH, fails then with `TALLY_REQUIRE_ENVOY=1`.

mod support;

use std::sync::atomic::Ordering;
use support::envoy::{Authz, DOC_CONFIGS, Envoy};
use support::ext_authz::{HOST, Scene};
use support::mesh::{Answer, App, CHECKOUT, PAYMENTS, Parts, REPORTING, authorize, send};

const CONFIG: &str = DOC_CONFIGS[0];

/// Envoy in front of a new app, checking with the scene's sidecar.
async fn envoy_for(scene: &Scene, envoy: &std::path::Path) -> (Envoy, App) {
    let app = App::start().await;
    let authz = Authz::Tcp(scene.payments.ext_authz.unwrap());
    (Envoy::start(envoy, CONFIG, app.addr, &authz).await, app)
}

/// `method path` through Envoy, addressed to [`HOST`], with `headers`.
async fn through(envoy: &Envoy, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut all = vec![("host", HOST)];
    all.extend_from_slice(headers);
    send(envoy.addr, method, path, &all, "").await
}

fn challenge(answer: &Answer) -> &str {
    answer.header("www-authenticate").unwrap_or("")
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_admits_with_the_callers_identity_over_spoofed_headers_and_holds_back_credentials() {
    let Some(bin) = support::envoy::binary() else {
        return;
    };
    let scene = Scene::start().await;
    let (envoy, app) = envoy_for(&scene, &bin).await;
    let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
    let creds = [("authorization", auth.as_str()), ("dpop", dpop.as_str())];
    let mut spoofed = creds.to_vec();
    spoofed.push(("x-tally-caller", "spiffe://example.org/ns/evil/sa/mallory"));
    spoofed.push(("x-tally-admin", "yes"));
    let ok = through(&envoy, "POST", "/v1/charges?idempotency=7", &spoofed).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let seen = ok.json();
    assert_eq!(seen["caller"], CHECKOUT, "the spoofed caller is replaced");
    assert_eq!(seen["scopes"], "payments:charge");
    assert_eq!(seen["transport"], "plaintext");
    assert!(!seen["token_id"].as_str().unwrap().is_empty());
    assert_eq!(seen["tally_headers"].as_array().unwrap().len(), 4, "{seen}");
    assert_eq!(
        seen["authorization"], false,
        "credentials stay out of the app"
    );
    assert_eq!(seen["dpop"], false);
    assert_eq!(seen["path"], "/v1/charges?idempotency=7");

    // The same proof again: replayed, with the challenge.
    let replayed = through(&envoy, "POST", "/v1/charges", &creds).await;
    assert_eq!(replayed.status, 401);
    assert!(
        challenge(&replayed).contains("error=\"invalid_dpop_proof\""),
        "{}",
        challenge(&replayed)
    );
    assert!(challenge(&replayed).contains("replayed"));
    assert_eq!(replayed.json()["error"], "invalid_dpop_proof");
    assert_eq!(app.seen.load(Ordering::SeqCst), 1);
    drop(envoy);
    app.stop();
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_refuses_what_the_inbound_proxy_refuses_with_its_answers() {
    let Some(bin) = support::envoy::binary() else {
        return;
    };
    let scene = Scene::start().await;
    let (envoy, app) = envoy_for(&scene, &bin).await;

    let none = through(&envoy, "POST", "/v1/charges", &[]).await;
    assert_eq!(none.status, 401);
    assert_eq!(challenge(&none), "DPoP algs=\"ES256\", WPT");

    let (auth, _) = scene.credentials("POST", "/v1/charges").await;
    let no_proof = through(&envoy, "POST", "/v1/charges", &[("authorization", &auth)]).await;
    assert_eq!(no_proof.status, 401);
    assert!(challenge(&no_proof).contains("error=\"invalid_dpop_proof\""));

    let (auth, dpop) = scene.credentials("POST", "/v1/refunds").await;
    let elsewhere = [("authorization", auth.as_str()), ("dpop", dpop.as_str())];
    let wrong_url = through(&envoy, "POST", "/v1/charges", &elsewhere).await;
    assert_eq!(wrong_url.status, 401);
    assert!(challenge(&wrong_url).contains("invalid_dpop_proof"));

    // An access rule: checkout may POST charges, not GET them.
    let (auth, dpop) = scene.credentials("GET", "/v1/charges").await;
    let get = [("authorization", auth.as_str()), ("dpop", dpop.as_str())];
    let denied = through(&envoy, "GET", "/v1/charges", &get).await;
    assert_eq!(denied.status, 403);
    assert_eq!(denied.json()["error"], "access_denied");

    // Two proofs in two header lines (kept apart by encode_raw_headers).
    let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
    let two = [
        ("authorization", auth.as_str()),
        ("dpop", dpop.as_str()),
        ("dpop", dpop.as_str()),
    ];
    let doubled = through(&envoy, "POST", "/v1/charges", &two).await;
    assert_eq!(doubled.status, 401);
    assert_eq!(
        app.seen.load(Ordering::SeqCst),
        0,
        "nothing refused reached the app"
    );
    drop(envoy);
    app.stop();
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_answers_the_callers_rate_limit_with_429_and_retry_after() {
    let Some(bin) = support::envoy::binary() else {
        return;
    };
    let scene = Scene::start().await;
    let reporting = scene
        .mesh
        .sidecar(
            REPORTING,
            Parts {
                socket: true,
                services: vec![(HOST.to_owned(), PAYMENTS.to_owned())],
                ..Parts::default()
            },
        )
        .await;
    scene.prime(&reporting, "payments:read").await;
    let (envoy, app) = envoy_for(&scene, &bin).await;
    // The rule for reporting allows 10/s: headers first, then the burst.
    let url = format!("http://{HOST}/v1/charges/ch_1");
    let socket = reporting.socket.as_deref().unwrap();
    let mut asks = Vec::new();
    for _ in 0..20 {
        asks.push(authorize(socket, "GET", &url, "payments:read").await);
    }
    let mut last_refused = None;
    for (a, d) in &asks {
        let answer = through(
            &envoy,
            "GET",
            "/v1/charges/ch_1",
            &[("authorization", a), ("dpop", d)],
        )
        .await;
        if answer.status != 200 {
            last_refused = Some(answer);
        }
    }
    let refused = last_refused.expect("the limit refused something");
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"], "rate_limited");
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!(retry >= 1);
    assert!(app.seen.load(Ordering::SeqCst) >= 10);
    drop(envoy);
    app.stop();
    reporting.sidecar.stop().await.unwrap();
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_the_sidecar_down_envoy_refuses_every_request() {
    let Some(bin) = support::envoy::binary() else {
        return;
    };
    let app = App::start().await;
    // A port nothing listens on: the sidecar is down.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let envoy = Envoy::start(&bin, CONFIG, app.addr, &Authz::Tcp(dead)).await;
    let answer = through(
        &envoy,
        "POST",
        "/v1/charges",
        &[("authorization", "DPoP x"), ("dpop", "y")],
    )
    .await;
    assert_eq!(answer.status, 403, "failure_mode_allow: false");
    assert_eq!(app.seen.load(Ordering::SeqCst), 0);
    drop(envoy);
    app.stop();
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_reaches_the_sidecar_over_a_unix_socket_and_only_from_an_allowed_uid() {
    let Some(bin) = support::envoy::binary() else {
        return;
    };
    let me = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m))
        .unwrap();
    for (uids, admitted) in [(vec![me], true), (vec![me.wrapping_add(1)], false)] {
        let scene = Scene::start_with(Parts {
            ext_authz_socket: true,
            allowed_uids: Some(uids),
            ..Parts::default()
        })
        .await;
        let app = App::start().await;
        let socket = scene.payments.ext_authz_socket.clone().unwrap();
        let envoy = Envoy::start(&bin, DOC_CONFIGS[1], app.addr, &Authz::Unix(socket)).await;
        // The nonce a fresh gate asks for, through Envoy.
        let (auth, dpop) = scene.credentials("GET", "/nonce").await;
        let first = through(
            &envoy,
            "GET",
            "/nonce",
            &[("authorization", &auth), ("dpop", &dpop)],
        )
        .await;
        if let Some(nonce) = first.header("dpop-nonce") {
            let url = format!("http://{HOST}/nonce");
            let socket = scene.checkout.socket.as_deref().unwrap();
            support::mesh::authorize_with_nonce(
                socket,
                "GET",
                &url,
                "payments:charge",
                Some(nonce),
            )
            .await;
        }
        let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
        let answer = through(
            &envoy,
            "POST",
            "/v1/charges",
            &[("authorization", &auth), ("dpop", &dpop)],
        )
        .await;
        if admitted {
            assert_eq!(answer.status, 200, "{:?}", answer.body);
            assert_eq!(answer.json()["caller"], CHECKOUT);
        } else {
            assert_eq!(answer.status, 403, "a uid not allowed is refused");
            assert_eq!(app.seen.load(Ordering::SeqCst), 0);
        }
        drop(envoy);
        app.stop();
        scene.stop().await;
    }
}

#[test]
fn every_documented_envoy_config_passes_envoys_own_validation() {
    let Some(bin) = support::envoy::binary() else {
        return;
    };
    for config in DOC_CONFIGS {
        let out = std::process::Command::new(&bin)
            .args([
                "--mode",
                "validate",
                "--disable-hot-restart",
                "-l",
                "error",
                "-c",
                config,
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{config}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // docs/ENVOY.md includes both, by name.
    let doc = std::fs::read_to_string("docs/ENVOY.md").unwrap();
    for config in DOC_CONFIGS {
        let name = config.trim_start_matches("docs/");
        assert!(doc.contains(name), "docs/ENVOY.md does not name {name}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn envoy_admits_a_wit_and_wpt_once_and_holds_them_back_from_the_app() {
    let Some(bin) = support::envoy::binary() else {
        return;
    };
    let scene = Scene::start().await;
    let (envoy, app) = envoy_for(&scene, &bin).await;
    let socket = scene.checkout.socket.clone().unwrap();
    let ask = serde_json::json!({
        "method": "POST",
        "url": format!("http://{HOST}/v1/charges"),
        "scope": "payments:charge",
        "proof": "wimse",
    });
    let (code, values) = support::mesh::local(&socket, "POST", "/v1/authorize", Some(ask)).await;
    assert_eq!(code, 200, "{values}");
    let headers = [
        (
            "workload-identity-token",
            values["workload-identity-token"].as_str().unwrap(),
        ),
        (
            "workload-proof-token",
            values["workload-proof-token"].as_str().unwrap(),
        ),
        ("authorization", values["authorization"].as_str().unwrap()),
    ];
    let ok = through(&envoy, "POST", "/v1/charges", &headers).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    let seen = ok.json();
    assert_eq!(seen["caller"], CHECKOUT);
    assert_eq!(seen["scopes"], "payments:charge");
    assert_eq!(seen["wit"], false, "the WIT stays out of the app");
    assert_eq!(seen["wpt"], false, "the WPT stays out of the app");
    assert_eq!(seen["authorization"], false);

    let replayed = through(&envoy, "POST", "/v1/charges", &headers).await;
    assert_eq!(replayed.status, 401);
    assert_eq!(challenge(&replayed), "WPT");
    assert_eq!(replayed.json()["error"], "invalid_wpt");
    assert_eq!(app.seen.load(Ordering::SeqCst), 1);
    drop(envoy);
    app.stop();
    scene.stop().await;
}
