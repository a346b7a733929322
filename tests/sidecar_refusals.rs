//! Refusals reported by the sidecars: in the audit log, found by the
//! leaked-token lookup, and the last ones sent by a stopping sidecar.

mod support;

use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, authorize, send};
use support::proxy::{Scene, charge_with};

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
