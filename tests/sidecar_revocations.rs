//! Revocations, a Watch stream down and a withdrawn signing key, end to
//! end on loopback: what the sidecars enforce and when they stop being ready.

mod support;

use std::sync::Arc;
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, authorize, send};
use support::proxy::{Scene, charge_with, claims_of, revocations};

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
