//! WIMSE end to end on loopback: checkout's sidecar calls payments'
//! sidecar with a Workload Identity Token and a Workload Proof Token
//! (through its outbound proxy, and with header values from
//! `/v1/authorize`), and payments' inbound proxy tells its app who called.
//! Replays, proofs for another URL or by another key, revoked WITs and
//! denied holders are refused before the app sees anything.

mod support;

use std::sync::atomic::Ordering;
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, REPORTING, Started, local, send};
use support::proxy::revocations;
use tally::sidecar::api::ServiceMap;
use tally::sidecar::service_map::{Entry, Proof};

/// Checkout may hold a WIT; payments lets it read its status with the
/// WIT alone, and charge only with an access token carrying the scope.
const POLICY: &str = "\
trust_domain: example.org
issue:
  - from: spiffe://example.org/ns/shop/sa/checkout
    to: spiffe://example.org/ns/pay/sa/payments
    scopes: [payments:charge]
wit:
  - from: spiffe://example.org/ns/*/sa/*
    ttl: 30m
access:
  - workload: spiffe://example.org/ns/pay/sa/payments
    allow:
      - from: spiffe://example.org/ns/shop/sa/checkout
        methods: [POST]
        paths: [/v1/charges]
        scopes: [payments:charge]
      - from: spiffe://example.org/ns/shop/sa/checkout
        methods: [GET]
        paths: [/v1/status]
  - workload: spiffe://example.org/ns/finance/sa/reporting
    allow:
      - from: spiffe://example.org/ns/shop/sa/checkout
        methods: [GET]
        paths: [/v1/status]
";

async fn mesh() -> Mesh {
    Mesh::start_with_settings(support::broker::settings(POLICY)).await
}

/// The authority payments is configured to serve (`--inbound-authority`):
/// what lets it trust a WPT's `aud` without an access token or an mTLS
/// peer.
const PAYMENTS_HOST: &str = "payments.svc:8080";

async fn payments(mesh: &Mesh, app: &App) -> Started {
    mesh.sidecar(
        PAYMENTS,
        Parts {
            inbound_to: Some(app.addr),
            authorities: vec![PAYMENTS_HOST.to_owned()],
            ..Parts::default()
        },
    )
    .await
}

/// Payments without configured authorities (the default).
async fn payments_anywhere(mesh: &Mesh, app: &App) -> Started {
    mesh.sidecar(
        PAYMENTS,
        Parts {
            inbound_to: Some(app.addr),
            ..Parts::default()
        },
    )
    .await
}

/// Checkout with its socket, and an outbound proxy whose service map sends
/// `inbound` to payments with WIMSE proofs over `mtls`.
async fn checkout(mesh: &Mesh, inbound: std::net::SocketAddr, mtls: bool) -> Started {
    let map = ServiceMap::from_entries([Entry {
        destination: inbound.to_string(),
        audience: PAYMENTS.parse().unwrap(),
        mtls: Some(mtls),
        proof: Proof::Wimse,
    }])
    .unwrap();
    mesh.sidecar(
        CHECKOUT,
        Parts {
            socket: true,
            outbound: true,
            service_map: Some(map),
            ..Parts::default()
        },
    )
    .await
}

/// WIMSE header values from checkout's local API for one request, with
/// an access token when `scope` is given.
async fn authorize(
    socket: &std::path::Path,
    method: &str,
    url: &str,
    scope: Option<&str>,
) -> Vec<(String, String)> {
    let mut ask = serde_json::json!({"method": method, "url": url, "proof": "wimse"});
    if let Some(scope) = scope {
        ask["scope"] = scope.into();
        ask["audience"] = PAYMENTS.into();
    }
    let (status, answer) = local(socket, "POST", "/v1/authorize", Some(ask)).await;
    assert_eq!(status, 200, "{answer}");
    let mut headers = Vec::new();
    for name in [
        "workload-identity-token",
        "workload-proof-token",
        "authorization",
    ] {
        if let Some(value) = answer[name].as_str() {
            headers.push((name.to_owned(), value.to_owned()));
        }
    }
    assert!(
        answer.get("dpop").is_none(),
        "no DPoP proof with WIMSE: {answer}"
    );
    headers
}

/// `method path` at `inbound`, addressed to [`PAYMENTS_HOST`].
async fn call(
    inbound: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &[(String, String)],
) -> support::mesh::Answer {
    let mut all: Vec<(&str, &str)> = vec![("host", PAYMENTS_HOST)];
    all.extend(headers.iter().map(|(n, v)| (n.as_str(), v.as_str())));
    send(inbound, method, path, &all, "").await
}

/// The claims of a compact JWS, unverified (the test only reads them).
fn claims(jws: &str) -> serde_json::Value {
    let payload = jws.split('.').nth(1).unwrap();
    serde_json::from_slice(&tally::jose::b64::decode(payload.as_bytes()).unwrap()).unwrap()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> &'a str {
    &headers.iter().find(|(n, _)| n == name).unwrap().1
}

#[tokio::test]
async fn through_the_outbound_proxy_a_wimse_destination_gets_a_wit_and_wpt_and_the_app_sees_the_caller()
 {
    let mesh = mesh().await;
    let app = App::start().await;
    // Payments knows no authority of its own: over plaintext a WIT alone
    // is refused (its WPT's aud could be another server's), over mTLS the
    // handshake names the caller.
    let payments = payments_anywhere(&mesh, &app).await;
    let inbound = payments.inbound.unwrap();
    for mtls in [false, true] {
        let checkout = checkout(&mesh, inbound, mtls).await;
        let proxy = checkout.outbound.unwrap();
        let status_url = format!("http://{inbound}/v1/status");
        let answer = send(proxy, "GET", &status_url, &[], "").await;
        if mtls {
            // The WIT alone passes a rule that asks for no scope.
            assert_eq!(answer.status, 200, "mtls: {:?}", answer.body);
            let seen = answer.json();
            assert_eq!(seen["caller"], CHECKOUT);
            assert_eq!(seen["scopes"], "");
            assert_eq!(seen["transport"], "mtls");
            assert_eq!(seen["wit"], false, "the WIT is not forwarded to the app");
            assert_eq!(seen["wpt"], false, "the WPT is not forwarded to the app");
            assert_eq!(seen["authorization"], false);
            // The app's Txn-Token goes along, bound by the WPT (`tth`);
            // two are refused before anything is sent.
            let with_txn = send(
                proxy,
                "GET",
                &status_url,
                &[("txn-token", "txn.abc.def")],
                "",
            )
            .await;
            assert_eq!(with_txn.status, 200, "{:?}", with_txn.body);
            let two = send(
                proxy,
                "GET",
                &status_url,
                &[("txn-token", "a"), ("txn-token", "b")],
                "",
            )
            .await;
            assert_eq!(two.status, 400, "{:?}", two.body);
        } else {
            assert_eq!(answer.status, 401, "plaintext: {:?}", answer.body);
            assert_eq!(answer.json()["error"], "invalid_wpt");
        }
        // A rule that asks for a scope needs the access token, which the
        // app asks for by naming the scope.
        let charges = format!("http://{inbound}/v1/charges");
        let bare = send(proxy, "POST", &charges, &[], "{}").await;
        let expected = if mtls { 403 } else { 401 };
        assert_eq!(bare.status, expected, "{:?}", bare.body);
        let scoped = send(
            proxy,
            "POST",
            &charges,
            &[("x-tally-scope", "payments:charge")],
            "{}",
        )
        .await;
        assert_eq!(scoped.status, 200, "{:?}", scoped.body);
        assert_eq!(scoped.json()["scopes"], "payments:charge");
        assert_eq!(scoped.json()["caller"], CHECKOUT);
        assert_eq!(scoped.json()["wit"], false);
        checkout.sidecar.stop().await.unwrap();
    }
}

#[tokio::test]
async fn authorize_gives_wimse_headers_the_inbound_accepts_once_and_for_that_url_only() {
    let mesh = mesh().await;
    let app = App::start().await;
    let payments = payments(&mesh, &app).await;
    let inbound = payments.inbound.unwrap();
    let checkout = checkout(&mesh, inbound, false).await;
    let socket = checkout.socket.clone().unwrap();
    let url = format!("http://{PAYMENTS_HOST}/v1/status");

    let headers = authorize(&socket, "GET", &url, None).await;
    let wit = claims(header(&headers, "workload-identity-token"));
    assert_eq!(wit["sub"], CHECKOUT);
    let wpt = claims(header(&headers, "workload-proof-token"));
    assert_eq!(wpt["aud"], url);
    assert!(wpt.get("ath").is_none(), "no token, no ath: {wpt}");
    assert!(headers.iter().all(|(n, _)| n != "authorization"));

    let ok = call(inbound, "GET", "/v1/status", &headers).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
    assert_eq!(ok.json()["caller"], CHECKOUT);
    assert_eq!(ok.json()["token_id"], wit["jti"]);
    let seen = app.seen.load(Ordering::SeqCst);

    // The same headers again: the WPT's jti was spent.
    let replayed = call(inbound, "GET", "/v1/status", &headers).await;
    assert_eq!(replayed.status, 401, "{:?}", replayed.body);
    assert_eq!(replayed.header("www-authenticate"), Some("WPT"));
    assert_eq!(replayed.json()["error"], "invalid_wpt");

    // A fresh WPT for the status URL, sent to another path.
    let headers = authorize(&socket, "GET", &url, None).await;
    let elsewhere = call(inbound, "GET", "/v1/status/x", &headers).await;
    assert_eq!(elsewhere.status, 401, "{:?}", elsewhere.body);
    assert_eq!(elsewhere.json()["error"], "invalid_wpt");

    // With a scope, the access token comes along, bound to the WIT's key
    // and hashed into the WPT.
    let charges = format!("http://{PAYMENTS_HOST}/v1/charges");
    let headers = authorize(&socket, "POST", &charges, Some("payments:charge")).await;
    let token = header(&headers, "authorization")
        .strip_prefix("DPoP ")
        .unwrap();
    let wpt = claims(header(&headers, "workload-proof-token"));
    assert_eq!(
        wpt["ath"],
        tally::dpop::TokenHash::of(token).to_ath(),
        "ath is the token's hash"
    );
    let charged = call(inbound, "POST", "/v1/charges", &headers).await;
    assert_eq!(charged.status, 200, "{:?}", charged.body);
    assert_eq!(charged.json()["scopes"], "payments:charge");
    // Without the token, the WPT's ath names a token that is not there.
    let headers = authorize(&socket, "POST", &charges, Some("payments:charge")).await;
    let stripped: Vec<(String, String)> = headers
        .into_iter()
        .filter(|(n, _)| n != "authorization")
        .collect();
    let refused = call(inbound, "POST", "/v1/charges", &stripped).await;
    assert_eq!(refused.status, 401, "{:?}", refused.body);
    assert_eq!(
        app.seen.load(Ordering::SeqCst),
        seen + 1,
        "only the good requests reached the app"
    );
}

#[tokio::test]
async fn a_wpt_not_signed_by_the_wits_key_is_refused() {
    let mesh = mesh().await;
    let app = App::start().await;
    let payments = payments(&mesh, &app).await;
    let inbound = payments.inbound.unwrap();
    let checkout = checkout(&mesh, inbound, false).await;
    let socket = checkout.socket.clone().unwrap();
    let url = format!("http://{PAYMENTS_HOST}/v1/status");
    let headers = authorize(&socket, "GET", &url, None).await;
    let wit = header(&headers, "workload-identity-token").to_owned();

    // Someone holding the WIT but not its key makes a WPT with all the
    // right claims, signed by a key of its own.
    let stranger = tally::jose::SigningKey::generate().unwrap();
    let now = tally::clock::Clock::now(&tally::clock::SystemClock);
    let forged = tally::wimse::wpt::mint(
        &stranger,
        &tally::wimse::wpt::WptInput {
            aud: &url,
            wit: &wit,
            access_token: None,
            txn_token: None,
            other: &[],
            lifetime: 60,
        },
        now,
    )
    .unwrap();
    let answer = call(
        inbound,
        "GET",
        "/v1/status",
        &[
            ("workload-identity-token".into(), wit.clone()),
            ("workload-proof-token".into(), forged),
        ],
    )
    .await;
    assert_eq!(answer.status, 401, "{:?}", answer.body);
    assert_eq!(answer.json()["error"], "invalid_wpt");
    // The WIT alone, as a bearer token, is refused too.
    let bare = call(
        inbound,
        "GET",
        "/v1/status",
        &[("workload-identity-token".into(), wit)],
    )
    .await;
    assert_eq!(bare.status, 401, "{:?}", bare.body);
    assert_eq!(app.seen.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_wit_is_refused_and_its_holder_fetches_another() {
    use tally::token::RevocationTarget;
    let mesh = mesh().await;
    let app = App::start().await;
    let payments = payments(&mesh, &app).await;
    let inbound = payments.inbound.unwrap();
    let checkout = checkout(&mesh, inbound, false).await;
    let socket = checkout.socket.clone().unwrap();
    let url = format!("http://{PAYMENTS_HOST}/v1/status");
    let admin: tally::identity::SpiffeId = "spiffe://example.org/admin".parse().unwrap();

    let before = authorize(&socket, "GET", &url, None).await;
    let held = authorize(&socket, "GET", &url, None).await;
    assert_eq!(
        call(inbound, "GET", "/v1/status", &before).await.status,
        200
    );
    let jti = claims(header(&held, "workload-identity-token"))["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    mesh.broker
        .broker
        .revoke(RevocationTarget::Jti(jti.clone()), None, "leaked", &admin)
        .await
        .unwrap();
    revocations(&payments, 1).await;
    revocations(&checkout, 1).await;
    let refused = call(inbound, "GET", "/v1/status", &held).await;
    assert_eq!(refused.status, 401, "{:?}", refused.body);
    assert_eq!(refused.json()["error"], "invalid_wit");
    assert_eq!(refused.header("www-authenticate"), Some("WPT"));
    // The refusal reaches the broker's audit log under the WIT's claims.
    let wit_text = header(&held, "workload-identity-token").to_owned();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let failure: serde_json::Value = loop {
        let found = mesh
            .broker
            .broker
            .lookup_token(&wit_text)
            .await
            .unwrap()
            .unwrap();
        if let Some(r) = found
            .records
            .iter()
            .find(|r| r.kind == "token.verify_failure")
        {
            break serde_json::from_str(&r.line).unwrap();
        }
        assert!(std::time::Instant::now() < deadline, "no failure reported");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(failure["reason"], "revoked");
    assert_eq!(failure["claimed_sub"], CHECKOUT);
    assert_eq!(failure["jti"], jti.as_str());
    assert!(
        !failure.to_string().contains(&wit_text),
        "no WIT in the audit log"
    );

    let fresh = authorize(&socket, "GET", &url, None).await;
    let new_jti = claims(header(&fresh, "workload-identity-token"))["jti"].clone();
    assert_ne!(new_jti, jti.as_str(), "the holder dropped the revoked WIT");
    assert_eq!(call(inbound, "GET", "/v1/status", &fresh).await.status, 200);

    // Revoking the holder covers every WIT it was issued until then.
    let held = authorize(&socket, "GET", &url, None).await;
    mesh.broker
        .broker
        .revoke(
            RevocationTarget::Subject(CHECKOUT.parse().unwrap()),
            None,
            "compromised",
            &admin,
        )
        .await
        .unwrap();
    revocations(&payments, 2).await;
    let refused = call(inbound, "GET", "/v1/status", &held).await;
    assert_eq!(refused.status, 401, "{:?}", refused.body);
    assert_eq!(refused.json()["error"], "invalid_wit");
}

#[tokio::test]
async fn a_wit_and_wpt_made_for_one_workload_are_refused_by_another() {
    let mesh = mesh().await;
    let app = App::start().await;
    let payments = payments(&mesh, &app).await;
    let checkout = checkout(&mesh, payments.inbound.unwrap(), false).await;
    let socket = checkout.socket.clone().unwrap();
    let url = format!("http://{PAYMENTS_HOST}/v1/status");
    // Reporting lets checkout read its status too; one copy of it serves
    // any authority (the default), one only its own.
    let reporting = |authorities: Vec<String>| {
        mesh.sidecar(
            REPORTING,
            Parts {
                inbound_to: Some(app.addr),
                authorities,
                ..Parts::default()
            },
        )
    };
    let anywhere = reporting(Vec::new()).await;
    let ledger = reporting(vec!["reporting.svc:8080".to_owned()]).await;

    // What payments (or anyone on its path) saw, sent on to reporting with
    // payments' Host: nothing ties the WPT's aud to reporting.
    let captured = authorize(&socket, "GET", &url, None).await;
    let replayed = call(anywhere.inbound.unwrap(), "GET", "/v1/status", &captured).await;
    assert_eq!(replayed.status, 401, "{:?}", replayed.body);
    assert_eq!(replayed.json()["error"], "invalid_wpt");
    let misdirected = call(ledger.inbound.unwrap(), "GET", "/v1/status", &captured).await;
    assert_eq!(misdirected.status, 421, "{:?}", misdirected.body);
    assert_eq!(app.seen.load(Ordering::SeqCst), 0);
    // Payments, which knows its authority, takes it (once).
    let ok = call(payments.inbound.unwrap(), "GET", "/v1/status", &captured).await;
    assert_eq!(ok.status, 200, "{:?}", ok.body);
}
