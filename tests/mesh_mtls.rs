//! The inbound port between sidecars: mutual TLS beside plaintext on one
//! port, tokens bound to the peer's SVID key admitted without a proof,
//! everything else refused, and connections cut when their peer is.
//! Real broker, real sidecars, real TLS on loopback; the mesh peer is a
//! hand-driven HTTP/2 client holding a real sidecar's SVID.

mod support;

use std::time::Duration;
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, REPORTING, send};
use support::mtls::{client_config, connect, renewed, svid_of, token_from};

const ADMIN: &str = "spiffe://example.org/admin";

/// The app behind payments, payments' sidecar (inbound), and a checkout
/// sidecar whose SVID and tokens the test uses by hand.
async fn scene(mtls_required: bool) -> (Mesh, App, support::mesh::Started, support::mesh::Started) {
    let mesh = Mesh::start().await;
    let (app, payments, checkout) = sidecars(&mesh, mtls_required).await;
    (mesh, app, payments, checkout)
}

/// The same on a broker that issues SVIDs for `ttl_secs`, so sidecars
/// renew within the test (at 40–60% of the life).
async fn short_lived(ttl_secs: u64) -> (Mesh, App, support::mesh::Started, support::mesh::Started) {
    let mut settings = support::broker::settings(support::mesh::POLICY);
    settings.svid_ttl = ttl_secs;
    let mesh = Mesh::start_with_settings(settings).await;
    let (app, payments, checkout) = sidecars(&mesh, false).await;
    (mesh, app, payments, checkout)
}

async fn sidecars(
    mesh: &Mesh,
    mtls_required: bool,
) -> (App, support::mesh::Started, support::mesh::Started) {
    let app = App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                mtls_required,
                ..Parts::default()
            },
        )
        .await;
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                socket: true,
                ..Parts::default()
            },
        )
        .await;
    (app, payments, checkout)
}

/// Headers for one request to payments from a sidecar's socket.
async fn authorize(
    socket: &std::path::Path,
    method: &str,
    url: &str,
    scope: &str,
) -> (String, String) {
    let ask =
        serde_json::json!({"method": method, "url": url, "scope": scope, "audience": PAYMENTS});
    let (status, headers) = support::mesh::local(socket, "POST", "/v1/authorize", Some(ask)).await;
    assert_eq!(status, 200, "{headers}");
    (
        headers["authorization"].as_str().unwrap().to_owned(),
        headers["dpop"].as_str().unwrap().to_owned(),
    )
}

fn bearer(token: &str) -> String {
    format!("DPoP {token}")
}

#[tokio::test]
async fn a_token_bound_to_the_peers_svid_needs_no_proof_over_mtls_and_many_share_a_connection() {
    let (mesh, app, payments, checkout) = scene(false).await;
    let inbound = payments.inbound.unwrap();
    let svid = svid_of(&checkout);
    let token = token_from(&checkout, PAYMENTS, "payments:charge").await;
    let claims = support::proxy::claims_of(&bearer(&token));
    // The sidecar's DPoP key is its SVID key.
    let key = tally::jose::SigningKey::from_pkcs8_pem(svid.key_pem.as_bytes()).unwrap();
    assert_eq!(claims["cnf"]["jkt"], key.thumbprint().to_string());

    let mut conn = connect(inbound, client_config(&svid, PAYMENTS))
        .await
        .unwrap();
    let auth = bearer(&token);
    let answer = conn
        .send("POST", "/v1/charges", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let seen = answer.json();
    assert_eq!(seen["caller"], CHECKOUT);
    assert_eq!(seen["transport"], "mtls");
    assert_eq!(seen["token_id"], claims["jti"]);

    // Twenty concurrent streams on the one connection, each admitted.
    let before = app.seen.load(std::sync::atomic::Ordering::SeqCst);
    let mut streams = Vec::new();
    for _ in 0..20 {
        let mut sender = conn.sender.clone();
        let auth = auth.clone();
        let uri = format!("https://{inbound}/v1/charges");
        streams.push(tokio::spawn(async move {
            let request = http::Request::post(uri)
                .header("authorization", auth)
                .body(http_body_util::Full::new(bytes::Bytes::new()))
                .unwrap();
            sender.send_request(request).await.unwrap().status()
        }));
    }
    for stream in streams {
        assert_eq!(stream.await.unwrap(), 200);
    }
    let after = app.seen.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(after - before, 20);
    let listeners = payments.sidecar.parts().listeners.clone();
    let mut metrics = String::new();
    listeners.render(&mut metrics);
    assert!(
        metrics.contains("tally_listener_connections{listener=\"inbound\"} 1"),
        "{metrics}"
    );

    // Two Authorization headers on the connection: malformed, whatever
    // the handshake proved.
    let answer = conn
        .send(
            "POST",
            "/v1/charges",
            &[("authorization", &auth), ("authorization", &auth)],
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 400, "{:?}", answer.body);
    assert_eq!(answer.json()["error"], "invalid_request");

    // A spoofed transport header from outside never reaches the app.
    let answer = conn
        .send(
            "POST",
            "/v1/charges",
            &[
                ("authorization", &auth),
                ("x-tally-transport", "mtls-forged"),
            ],
        )
        .await
        .unwrap();
    assert_eq!(answer.json()["transport"], "mtls");
    drop(conn);
    mesh.broker.stop().await;
}

#[tokio::test]
async fn without_the_handshake_the_same_request_needs_its_proof() {
    let (mesh, _app, payments, checkout) = scene(false).await;
    let inbound = payments.inbound.unwrap();
    let token = token_from(&checkout, PAYMENTS, "payments:charge").await;
    let auth = bearer(&token);
    // Captured and replayed on a fresh plaintext connection: no proof, no
    // entry.
    let answer = send(
        inbound,
        "POST",
        "/v1/charges",
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(answer.status, 401);
    assert_eq!(answer.json()["error"], "invalid_dpop_proof");
    // Plaintext with a proof still works (callers outside the mesh).
    let svid = svid_of(&checkout);
    let key = tally::dpop::ProofKey::new(
        tally::jose::SigningKey::from_pkcs8_pem(svid.key_pem.as_bytes()).unwrap(),
    );
    let answer = plaintext_with_proof(inbound, &key, &token).await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["transport"], "plaintext");
    mesh.broker.stop().await;
}

#[tokio::test]
async fn over_mtls_another_workloads_token_or_another_keys_token_is_refused() {
    let (mesh, _app, payments, checkout) = scene(false).await;
    let inbound = payments.inbound.unwrap();
    let svid = svid_of(&checkout);
    let mut conn = connect(inbound, client_config(&svid, PAYMENTS))
        .await
        .unwrap();

    // Reporting's token, with reporting's valid proof for this request,
    // relayed over checkout's connection: refused whatever the proof.
    let reporting = mesh
        .sidecar(
            REPORTING,
            Parts {
                socket: true,
                ..Parts::default()
            },
        )
        .await;
    let url = format!("https://{inbound}/v1/balance");
    let (authorization, dpop) = authorize(
        reporting.socket.as_deref().unwrap(),
        "GET",
        &url,
        "payments:read",
    )
    .await;
    let answer = conn
        .send(
            "GET",
            "/v1/balance",
            &[("authorization", &authorization), ("dpop", &dpop)],
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 401, "{:?}", answer.body);
    assert_eq!(answer.json()["error"], "invalid_token");
    assert!(
        answer.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("not this connection's TLS peer")
    );
    // Positive control: that proof is valid on its own holder's path.
    let reporting_svid = svid_of(&reporting);
    let mut own = connect(inbound, client_config(&reporting_svid, PAYMENTS))
        .await
        .unwrap();
    let mut answer = own
        .send(
            "GET",
            "/v1/balance",
            &[("authorization", &authorization), ("dpop", &dpop)],
        )
        .await
        .unwrap();
    if let (401, Some(nonce)) = (answer.status, answer.header("dpop-nonce")) {
        // A freshly started sidecar wants its nonce in proofs.
        let ask = serde_json::json!({"method": "GET", "url": url, "scope": "payments:read",
            "audience": PAYMENTS, "nonce": nonce});
        let (_, headers) = support::mesh::local(
            reporting.socket.as_deref().unwrap(),
            "POST",
            "/v1/authorize",
            Some(ask),
        )
        .await;
        let dpop = headers["dpop"].as_str().unwrap();
        answer = own
            .send(
                "GET",
                "/v1/balance",
                &[("authorization", &authorization), ("dpop", dpop)],
            )
            .await
            .unwrap();
    }
    assert_eq!(answer.status, 200, "{:?}", answer.body);

    // A checkout token bound to another key (issued to checkout for a
    // fresh key) over this checkout connection, without a proof: 401.
    let channel = support::broker::channel_as(&mesh.broker, CHECKOUT);
    let htu = format!(
        "{}/tally.v1.Tokens/Issue",
        svid.issuer.trim_end_matches('/')
    );
    let foreign_key_token = support::broker::issue(&channel, &htu, PAYMENTS, "payments:charge")
        .await
        .unwrap()
        .access_token;
    let answer = conn
        .send(
            "POST",
            "/v1/charges",
            &[("authorization", &bearer(&foreign_key_token))],
        )
        .await
        .unwrap();
    assert_eq!(answer.status, 401, "{:?}", answer.body);
    assert_eq!(answer.json()["error"], "invalid_dpop_proof");
    mesh.broker.stop().await;
}

#[tokio::test]
async fn required_mtls_refuses_plaintext_and_anonymous_tls_and_serves_mesh_peers() {
    let (mesh, _app, payments, checkout) = scene(true).await;
    let inbound = payments.inbound.unwrap();
    let socket = checkout.socket.as_deref().unwrap();
    let url = format!("http://{inbound}/v1/charges");
    let (authorization, dpop) = authorize(socket, "POST", &url, "payments:charge").await;
    let answer = send(
        inbound,
        "POST",
        "/v1/charges",
        &[("authorization", &authorization), ("dpop", &dpop)],
        "",
    )
    .await;
    assert_eq!(answer.status, 403);
    assert_eq!(answer.json()["error"], "mtls_required");

    // TLS without a client certificate: the handshake is refused (the
    // client learns it on its first read).
    let svid = svid_of(&checkout);
    let anonymous = {
        let mut c = (*client_config(&svid, PAYMENTS)).clone();
        c.client_auth_cert_resolver = std::sync::Arc::new(NoCert);
        std::sync::Arc::new(c)
    };
    let refused = match connect(inbound, anonymous).await {
        Err(e) => e,
        Ok(mut conn) => conn
            .send("POST", "/v1/charges", &[("authorization", &authorization)])
            .await
            .unwrap_err(),
    };
    assert!(!refused.is_empty());

    let token = token_from(&checkout, PAYMENTS, "payments:charge").await;
    let mut conn = connect(inbound, client_config(&svid, PAYMENTS))
        .await
        .unwrap();
    let answer = conn
        .send("POST", "/v1/charges", &[("authorization", &bearer(&token))])
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    mesh.broker.stop().await;
}

/// A client that has no certificate to offer.
#[derive(Debug)]
struct NoCert;

impl rustls::client::ResolvesClientCert for NoCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<std::sync::Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

/// `POST /v1/charges` with a proof by `key` for `token` and `url`, sent by
/// `send` (given the `Authorization` and `DPoP` values); once more with the
/// server nonce when a freshly started sidecar asks for one.
async fn with_own_proof(
    url: &str,
    key: &tally::dpop::ProofKey,
    token: &str,
    mut send: impl AsyncFnMut(String, String) -> support::mesh::Answer,
) -> support::mesh::Answer {
    let mut nonce: Option<String> = None;
    loop {
        let now = tally::clock::Clock::now(&tally::clock::SystemClock);
        let proof = key
            .mint("POST", url, Some(token), nonce.as_deref(), now)
            .unwrap();
        let answer = send(bearer(token), proof).await;
        match answer.header("dpop-nonce") {
            Some(n) if nonce.is_none() && answer.status == 401 => nonce = Some(n.to_owned()),
            _ => return answer,
        }
    }
}

/// The same in plaintext, on a new connection each time.
async fn plaintext_with_proof(
    inbound: std::net::SocketAddr,
    key: &tally::dpop::ProofKey,
    token: &str,
) -> support::mesh::Answer {
    let url = format!("http://{inbound}/v1/charges");
    with_own_proof(&url, key, token, async |auth, proof| {
        let headers = [("authorization", auth.as_str()), ("dpop", proof.as_str())];
        send(inbound, "POST", "/v1/charges", &headers, "").await
    })
    .await
}

/// Waits (bounded) for a connection to end.
async fn ended(conn: support::mtls::Connection) {
    tokio::time::timeout(Duration::from_secs(10), conn.ended)
        .await
        .expect("the connection stayed open")
        .unwrap()
        .ok();
}

#[tokio::test]
async fn denying_the_peer_closes_its_live_connections_and_not_a_bystanders() {
    let (mesh, _app, payments, checkout) = scene(false).await;
    let inbound = payments.inbound.unwrap();
    let svid = svid_of(&checkout);
    let token = token_from(&checkout, PAYMENTS, "payments:charge").await;
    let auth = bearer(&token);
    let mut conn = connect(inbound, client_config(&svid, PAYMENTS))
        .await
        .unwrap();
    let answer = conn
        .send("POST", "/v1/charges", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(answer.status, 200);
    // Another workload's connection stays up.
    let reporting = mesh.sidecar(REPORTING, Parts::default()).await;
    let bystander = connect(inbound, client_config(&svid_of(&reporting), PAYMENTS))
        .await
        .unwrap();

    let (id, admin) = (CHECKOUT.parse().unwrap(), ADMIN.parse().unwrap());
    mesh.broker
        .broker
        .deny_identity(&id, "pod compromised", &admin)
        .await
        .unwrap();
    ended(conn).await;
    assert!(
        !bystander.ended.is_finished(),
        "an innocent peer was cut off"
    );
    // A new connection is accepted but its requests are refused.
    let mut again = connect(inbound, client_config(&svid, PAYMENTS))
        .await
        .unwrap();
    let refused = again
        .send("POST", "/v1/charges", &[("authorization", &auth)])
        .await;
    assert!(
        refused.as_ref().map_or(true, |a| a.status == 401),
        "{refused:?}"
    );
    mesh.broker.stop().await;
}

#[tokio::test]
async fn revoking_the_peers_tokens_closes_its_connections_and_the_old_token_stays_refused() {
    let (mesh, _app, payments, checkout) = scene(false).await;
    let inbound = payments.inbound.unwrap();
    let svid = svid_of(&checkout);
    let token = token_from(&checkout, PAYMENTS, "payments:charge").await;
    let auth = bearer(&token);
    let mut conn = connect(inbound, client_config(&svid, PAYMENTS))
        .await
        .unwrap();
    assert_eq!(
        conn.send("POST", "/v1/charges", &[("authorization", &auth)])
            .await
            .unwrap()
            .status,
        200
    );
    let admin = ADMIN.parse().unwrap();
    mesh.broker
        .broker
        .revoke(
            tally::token::RevocationTarget::Subject(CHECKOUT.parse().unwrap()),
            None,
            "test",
            &admin,
        )
        .await
        .unwrap();
    ended(conn).await;
    // The revoked token itself stays refused, whatever the transport: on
    // plaintext with a valid proof signed by its key (the SVID key) ...
    let key = tally::dpop::ProofKey::new(
        tally::jose::SigningKey::from_pkcs8_pem(svid.key_pem.as_bytes()).unwrap(),
    );
    let answer = plaintext_with_proof(inbound, &key, &token).await;
    assert_eq!(answer.status, 401, "{:?}", answer.body);
    assert!(String::from_utf8_lossy(&answer.body).contains("revoked"));
    // ... and on a new mTLS connection (closed at once when it opens in
    // the revoked second, else refused by the verdict).
    let mut again = connect(inbound, client_config(&svid, PAYMENTS))
        .await
        .unwrap();
    let refused = again
        .send("POST", "/v1/charges", &[("authorization", &auth)])
        .await;
    assert!(
        refused.as_ref().map_or(true, |a| a.status == 401),
        "{refused:?}"
    );
    mesh.broker.stop().await;
}

/// One request on a fresh mTLS connection with `svid`; once more on
/// another fresh one if the first was closed under it (SVIDs renew every
/// few seconds here, and a renewal closes connections gracefully).
async fn on_fresh_connection(
    inbound: std::net::SocketAddr,
    svid: &std::sync::Arc<tally::sidecar::identity::Svid>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> support::mesh::Answer {
    let mut last = String::new();
    for _ in 0..2 {
        let mut conn = connect(inbound, client_config(svid, PAYMENTS))
            .await
            .unwrap();
        match conn.send(method, path, headers).await {
            Ok(answer) => return answer,
            Err(e) => last = e,
        }
    }
    panic!("two fresh connections failed: {last}");
}

#[tokio::test]
async fn the_servers_renewal_closes_connections_gracefully_and_the_next_sees_its_new_svid() {
    let (mesh, _app, payments, checkout) = short_lived(6).await;
    let inbound = payments.inbound.unwrap();
    let before = svid_of(&payments);
    let mut conn = connect(inbound, client_config(&svid_of(&checkout), PAYMENTS))
        .await
        .unwrap();
    let old_server = tally::identity::PeerIdentity::of(&conn.server_cert).unwrap();
    let token = token_from(&checkout, PAYMENTS, "payments:charge").await;
    let auth = bearer(&token);
    assert_eq!(
        conn.send("POST", "/v1/charges", &[("authorization", &auth)])
            .await
            .unwrap()
            .status,
        200
    );
    let after = renewed(&payments, &before).await;
    // GOAWAY, then the client's connection ends by itself.
    ended(conn).await;
    let fresh = connect(inbound, client_config(&svid_of(&checkout), PAYMENTS))
        .await
        .unwrap();
    let new_server = tally::identity::PeerIdentity::of(&fresh.server_cert).unwrap();
    assert_ne!(new_server.jkt, old_server.jkt);
    // The SVID payments holds now: the renewed one (or, were it renewed
    // again meanwhile, a later one).
    let current = svid_of(&payments);
    let current_key = tally::jose::SigningKey::from_pkcs8_pem(current.key_pem.as_bytes()).unwrap();
    assert_eq!(new_server.jkt, current_key.thumbprint());
    assert_ne!(after.chain_pem, before.chain_pem);
    mesh.broker.stop().await;
}

#[tokio::test]
async fn after_the_callers_renewal_a_token_bound_to_its_old_key_needs_that_keys_proof() {
    let (mesh, _app, payments, checkout) = short_lived(6).await;
    let inbound = payments.inbound.unwrap();
    let old = svid_of(&checkout);
    let token = token_from(&checkout, PAYMENTS, "payments:charge").await;
    let auth = bearer(&token);
    let new = renewed(&checkout, &old).await;

    // The new SVID's handshake does not prove the old key: no proof, 401.
    let answer = on_fresh_connection(
        inbound,
        &new,
        "POST",
        "/v1/charges",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(answer.status, 401, "{:?}", answer.body);
    assert_eq!(answer.json()["error"], "invalid_dpop_proof");
    // With a proof by the old key for the https URL, it passes.
    let old_key = tally::dpop::ProofKey::new(
        tally::jose::SigningKey::from_pkcs8_pem(old.key_pem.as_bytes()).unwrap(),
    );
    let url = format!("https://{inbound}/v1/charges");
    let answer = with_own_proof(&url, &old_key, &token, async |auth, proof| {
        let headers = [("authorization", auth.as_str()), ("dpop", proof.as_str())];
        on_fresh_connection(inbound, &new, "POST", "/v1/charges", &headers).await
    })
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    // And the old SVID, still valid, proves its own key by handshake.
    let answer = on_fresh_connection(
        inbound,
        &old,
        "POST",
        "/v1/charges",
        &[("authorization", &auth)],
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    mesh.broker.stop().await;
}

#[tokio::test]
async fn peers_under_a_rotated_intermediate_and_the_old_one_still_trust_each_other() {
    let (mesh, _app, payments, _checkout) = scene(false).await;
    let inbound = payments.inbound.unwrap();
    let admin = ADMIN.parse().unwrap();
    mesh.broker
        .broker
        .rotate_intermediate_now(&admin)
        .await
        .unwrap();
    // Reporting attests after the rotation: its SVID chains to the new
    // intermediate, payments' to the old one; both to the one root.
    let reporting = mesh
        .sidecar(
            REPORTING,
            Parts {
                socket: true,
                ..Parts::default()
            },
        )
        .await;
    let old_chain = svid_of(&payments).chain_pem.clone();
    let new_chain = svid_of(&reporting).chain_pem.clone();
    let intermediate = |pem: &str| {
        rustls_pki_types::pem::PemObject::pem_slice_iter(pem.as_bytes())
            .nth(1)
            .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.unwrap().to_vec())
            .unwrap()
    };
    assert_ne!(intermediate(&old_chain), intermediate(&new_chain));
    let token = token_from(&reporting, PAYMENTS, "payments:read").await;
    let answer = on_fresh_connection(
        inbound,
        &svid_of(&reporting),
        "GET",
        "/v1/balance",
        &[("authorization", &bearer(&token))],
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    mesh.broker.stop().await;
}

#[tokio::test]
async fn a_token_that_expires_ends_its_use_on_a_live_connection() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let clock = std::sync::Arc::new(tally::clock::ManualClock::new(tally::clock::Clock::now(
        &tally::clock::SystemClock,
    )));
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
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                socket: true,
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let token = token_from(&checkout, PAYMENTS, "payments:charge").await;
    let exp = support::proxy::claims_of(&bearer(&token))["exp"]
        .as_u64()
        .unwrap();
    let auth = bearer(&token);
    let mut conn = connect(inbound, client_config(&svid_of(&checkout), PAYMENTS))
        .await
        .unwrap();
    assert_eq!(
        conn.send("POST", "/v1/charges", &[("authorization", &auth)])
            .await
            .unwrap()
            .status,
        200
    );
    // The last second the verifier's 30 s leeway allows, then the first
    // it does not: same connection, same (cached) token.
    clock.set(exp + 29);
    let answer = conn
        .send("POST", "/v1/charges", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    clock.set(exp + 30);
    let answer = conn
        .send("POST", "/v1/charges", &[("authorization", &auth)])
        .await
        .unwrap();
    assert_eq!(answer.status, 401, "{:?}", answer.body);
    assert_eq!(answer.json()["error"], "invalid_token");
    mesh.broker.stop().await;
}
