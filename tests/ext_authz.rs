//! The sidecar's Envoy ext_authz service (`Authorization/Check`) over a
//! real gRPC client, no Envoy: what a check admits, and hostile checks
//! (doubled credentials, disagreeing header forms, missing attributes,
//! paths an app would route differently, huge messages, forged peers).
//! A real Envoy in front of an app: tests/envoy_ext_authz.rs.

mod support;

use support::ext_authz::{
    HOST, Scene, error, from_peer, header, http, raw, removed, request, status,
};
use support::mesh::{CHECKOUT, REPORTING};
use tally::proto::envoy::service::auth::v3::{CheckRequest, attribute_context};

#[tokio::test(flavor = "multi_thread")]
async fn an_admitted_check_sets_the_identity_headers_over_spoofed_ones_and_removes_credentials() {
    let scene = Scene::start().await;
    let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
    let answer = scene
        .check(http(
            "POST",
            "/v1/charges?idempotency=7",
            &[
                ("authorization", &auth),
                ("dpop", &dpop),
                ("x-tally-caller", "spiffe://example.org/ns/evil/sa/mallory"),
                ("x-tally-admin", "yes"),
            ],
        ))
        .await;
    assert_eq!(status(&answer), 200, "{answer:?}");
    assert_eq!(header(&answer, "x-tally-caller").unwrap(), CHECKOUT);
    assert_eq!(
        header(&answer, "x-tally-scopes").unwrap(),
        "payments:charge"
    );
    assert_eq!(header(&answer, "x-tally-transport").unwrap(), "plaintext");
    assert!(!header(&answer, "x-tally-token-id").unwrap().is_empty());
    assert_eq!(
        removed(&answer),
        [
            "x-tally-admin",
            "authorization",
            "dpop",
            "workload-identity-token",
            "workload-proof-token"
        ]
    );

    // The same proof again: the gate's replay cache, as at the inbound proxy.
    let again = scene
        .check(http(
            "POST",
            "/v1/charges",
            &[("authorization", &auth), ("dpop", &dpop)],
        ))
        .await;
    assert_eq!(status(&again), 401);
    assert!(
        header(&again, "www-authenticate")
            .unwrap()
            .contains("invalid_dpop_proof")
    );

    let admin =
        support::mesh::send(scene.payments.admin.unwrap(), "GET", "/metrics", &[], "").await;
    let metrics = String::from_utf8_lossy(&admin.body).into_owned();
    assert!(
        metrics.contains("tally_sidecar_ext_authz_requests_total{result=\"allowed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_sidecar_ext_authz_requests_total{result=\"replayed_proof\"} 1")
    );
    assert!(metrics.contains("tally_sidecar_ext_authz_admitted_total{transport=\"plaintext\"} 1"));
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_comma_joined_or_repeated_credential_is_refused_as_two() {
    let scene = Scene::start().await;
    let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
    // Envoy joins a repeated header with commas in `headers`.
    let two_proofs = format!("{dpop},{dpop}");
    let answer = scene
        .check(http(
            "POST",
            "/v1/charges",
            &[("authorization", &auth), ("dpop", &two_proofs)],
        ))
        .await;
    assert_eq!(status(&answer), 401);
    assert_eq!(error(&answer), "invalid_dpop_proof");
    let two_tokens = format!("{auth}, {auth}");
    let answer = scene
        .check(http(
            "POST",
            "/v1/charges",
            &[("authorization", &two_tokens), ("dpop", &dpop)],
        ))
        .await;
    assert_eq!(
        (status(&answer), error(&answer).as_str()),
        (400, "invalid_request")
    );
    // And in `header_map`, one entry a line.
    let answer = scene
        .check(raw(
            "POST",
            "/v1/charges",
            &[("authorization", &auth), ("dpop", &dpop), ("dpop", &dpop)],
        ))
        .await;
    assert_eq!(status(&answer), 401);
    // None of these burnt the proof: it still admits once.
    let ok = scene
        .check(raw(
            "POST",
            "/v1/charges",
            &[("authorization", &auth), ("dpop", &dpop)],
        ))
        .await;
    assert_eq!(status(&ok), 200, "{ok:?}");
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn header_forms_that_disagree_and_checks_without_a_request_are_refused_not_errors() {
    let scene = Scene::start().await;
    let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
    let mut both = raw(
        "POST",
        "/v1/charges",
        &[("authorization", &auth), ("dpop", &dpop)],
    );
    let http_attrs = both.attributes.as_mut().unwrap().request.as_mut().unwrap();
    let h = http_attrs.http.as_mut().unwrap();
    // The joined form names another token than the raw lines.
    h.headers
        .insert("authorization".into(), "DPoP another.token.here".into());
    h.headers.insert("dpop".into(), dpop.clone());
    let answer = scene.check(both).await;
    assert_eq!(
        (status(&answer), error(&answer).as_str()),
        (400, "invalid_request")
    );

    // A pseudo-header naming another authority than `host`.
    let answer = scene
        .check(http(
            "POST",
            "/v1/charges",
            &[
                ("authorization", &auth),
                ("dpop", &dpop),
                (":authority", "admin.svc"),
            ],
        ))
        .await;
    assert_eq!(status(&answer), 400);

    for hollow in [
        CheckRequest::default(),
        request(attribute_context::HttpRequest::default()),
        request(attribute_context::HttpRequest {
            method: "POST".into(),
            scheme: "gopher".into(),
            host: HOST.into(),
            path: "/v1/charges".into(),
            ..Default::default()
        }),
    ] {
        let answer = scene.check(hollow).await;
        assert_eq!(status(&answer), 400, "{answer:?}");
    }
    let answer = scene
        .check(request(attribute_context::HttpRequest {
            method: "POST".into(),
            scheme: "http".into(),
            path: "/v1/charges".into(),
            ..Default::default()
        }))
        .await;
    assert_eq!(status(&answer), 400, "no host");
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_path_the_app_could_route_elsewhere_is_refused_before_the_proof_is_spent() {
    let scene = Scene::start().await;
    for path in [
        "/v1/charges/..%2Fadmin",
        "/v1/charges/%5Cadmin",
        "/v1/charges/%252e%252e/admin",
        // Normal form only: the app gets this path from Envoy as it is.
        "/v1/x/../charges",
        "/v1/%63harges",
    ] {
        let (auth, dpop) = scene.credentials("POST", path).await;
        let answer = scene
            .check(http(
                "POST",
                path,
                &[("authorization", &auth), ("dpop", &dpop)],
            ))
            .await;
        assert_eq!(status(&answer), 400, "{path}: {answer:?}");
        assert_eq!(error(&answer), "invalid_request");
    }
    let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
    let ok = scene
        .check(http(
            "POST",
            "/v1/charges",
            &[("authorization", &auth), ("dpop", &dpop)],
        ))
        .await;
    assert_eq!(status(&ok), 200);
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_huge_check_is_refused_by_the_decoder_and_the_service_goes_on() {
    let scene = Scene::start().await;
    let big = "x".repeat(300 * 1024);
    let mut client = scene.client.clone().unwrap();
    let refused = client
        .check(http("POST", "/v1/charges", &[("x-padding", &big)]))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::OutOfRange, "{refused:?}");
    let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
    let ok = scene
        .check(http(
            "POST",
            "/v1/charges",
            &[("authorization", &auth), ("dpop", &dpop)],
        ))
        .await;
    assert_eq!(status(&ok), 200);
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_peer_gains_nothing_and_a_verified_one_needs_no_proof() {
    let scene = Scene::start().await;
    let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
    let creds = [("authorization", auth.as_str()), ("dpop", dpop.as_str())];

    // A certificate for checkout from a CA outside the trust bundle.
    let td: tally::identity::SpiffeId = "spiffe://example.org".parse().unwrap();
    let now = tally::clock::Clock::now(&tally::clock::SystemClock);
    let (rogue, _) =
        tally::ca::Authority::generate(&td, tally::ca::Lifetimes::default(), now).unwrap();
    let forged = rogue
        .issue_credential(&CHECKOUT.parse().unwrap(), &[], &[], 600, now)
        .unwrap()
        .cert_chain_pem;
    let answer = scene
        .check(from_peer(
            http("POST", "/v1/charges", &creds),
            CHECKOUT,
            Some(&forged),
        ))
        .await;
    assert_eq!(
        (status(&answer), error(&answer).as_str()),
        (403, "invalid_peer")
    );

    // A principal alone only narrows: another workload's name refuses the
    // token, whatever proof it carries; its holder's name still needs one.
    let answer = scene
        .check(from_peer(
            http("POST", "/v1/charges", &creds),
            REPORTING,
            None,
        ))
        .await;
    assert_eq!(status(&answer), 401);
    assert!(
        header(&answer, "www-authenticate")
            .unwrap()
            .contains("invalid_token")
    );
    let token_only = [("authorization", auth.as_str())];
    let answer = scene
        .check(from_peer(
            http("POST", "/v1/charges", &token_only),
            CHECKOUT,
            None,
        ))
        .await;
    assert_eq!(
        (status(&answer), error(&answer).as_str()),
        (401, "invalid_dpop_proof")
    );
    let answer = scene
        .check(from_peer(
            http("POST", "/v1/charges", &creds),
            CHECKOUT,
            None,
        ))
        .await;
    assert_eq!(status(&answer), 200, "{answer:?}");
    assert_eq!(header(&answer, "x-tally-transport").unwrap(), "tls");

    // Checkout sidecar's own SVID (its key is the token's). A certificate
    // is public: over TCP, where any local process can send a check, it
    // does not replace the proof; it only narrows, like a principal.
    let leaf = leaf_of(&scene.checkout);
    let (auth, dpop) = scene.credentials("POST", "/v1/charges").await;
    let token_only = [("authorization", auth.as_str())];
    let answer = scene
        .check(from_peer(
            http("POST", "/v1/charges", &token_only),
            CHECKOUT,
            Some(&leaf),
        ))
        .await;
    assert_eq!(
        (status(&answer), error(&answer).as_str()),
        (401, "invalid_dpop_proof"),
        "a replayed certificate stood for the key over TCP"
    );
    let creds = [("authorization", auth.as_str()), ("dpop", dpop.as_str())];
    let answer = scene
        .check(from_peer(
            http("POST", "/v1/charges", &creds),
            CHECKOUT,
            Some(&leaf),
        ))
        .await;
    assert_eq!(status(&answer), 200, "{answer:?}");
    assert_eq!(header(&answer, "x-tally-transport").unwrap(), "tls");
    // The same certificate claimed for another workload.
    let answer = scene
        .check(from_peer(
            http("POST", "/v1/charges", &token_only),
            REPORTING,
            Some(&leaf),
        ))
        .await;
    assert_eq!(status(&answer), 403);
    scene.stop().await;
}

/// The first certificate of `sidecar`'s own SVID chain, PEM.
fn leaf_of(sidecar: &support::mesh::Started) -> String {
    let chain = sidecar.sidecar.parts().svid.borrow().chain_pem.clone();
    let leaf_end = chain.find("-----END CERTIFICATE-----").unwrap() + 26;
    chain[..leaf_end].to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn on_the_unix_socket_a_verified_peer_certificate_stands_for_its_key() {
    use tally::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let scene = Scene::start_with(support::mesh::Parts {
        ext_authz_socket: true,
        ..support::mesh::Parts::default()
    })
    .await;
    let path = scene.payments.ext_authz_socket.clone().unwrap();
    let channel = support::grpc::unix_channel(&path).await;
    let mut client = AuthorizationClient::new(channel);
    let (auth, _) = scene.credentials("POST", "/v1/charges").await;
    let token_only = [("authorization", auth.as_str())];
    let leaf = leaf_of(&scene.checkout);
    let answer = client
        .check(from_peer(
            http("POST", "/v1/charges", &token_only),
            CHECKOUT,
            Some(&leaf),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&answer), 200, "{answer:?}");
    assert_eq!(header(&answer, "x-tally-transport").unwrap(), "mtls");
    scene.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wimse_check_is_judged_like_any_other_and_its_credentials_removed() {
    let scene = Scene::start().await;
    let socket = scene.checkout.socket.clone().unwrap();
    let url = format!("http://{}/v1/charges", support::ext_authz::HOST);
    let ask = serde_json::json!({
        "method": "POST", "url": url, "scope": "payments:charge", "proof": "wimse",
    });
    let (code, values) = support::mesh::local(&socket, "POST", "/v1/authorize", Some(ask)).await;
    assert_eq!(code, 200, "{values}");
    let (wit, wpt, auth) = (
        values["workload-identity-token"].as_str().unwrap(),
        values["workload-proof-token"].as_str().unwrap(),
        values["authorization"].as_str().unwrap(),
    );
    let headers = [
        ("workload-identity-token", wit),
        ("workload-proof-token", wpt),
        ("authorization", auth),
    ];
    let answer = scene.check(http("POST", "/v1/charges", &headers)).await;
    assert_eq!(status(&answer), 200, "{answer:?}");
    assert_eq!(header(&answer, "x-tally-caller").unwrap(), CHECKOUT);
    assert_eq!(
        header(&answer, "x-tally-scopes").unwrap(),
        "payments:charge"
    );
    assert!(removed(&answer).contains(&"workload-identity-token".to_owned()));
    assert!(removed(&answer).contains(&"workload-proof-token".to_owned()));

    // The same WPT again, spent at the gate.
    let again = scene.check(http("POST", "/v1/charges", &headers)).await;
    assert_eq!(status(&again), 401);
    assert_eq!(header(&again, "www-authenticate").as_deref(), Some("WPT"));
    // A comma-joined WIT is two WITs; the WIT alone is no credential.
    let joined = format!("{wit},{wit}");
    let doubled = scene
        .check(http(
            "POST",
            "/v1/charges",
            &[
                ("workload-identity-token", &joined),
                ("workload-proof-token", wpt),
            ],
        ))
        .await;
    assert_eq!(status(&doubled), 400, "{doubled:?}");
    let bare = scene
        .check(http(
            "POST",
            "/v1/charges",
            &[("workload-identity-token", wit)],
        ))
        .await;
    assert_eq!(status(&bare), 401);
    scene.stop().await;
}
