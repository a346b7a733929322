//! `tally ctl keys`: the signing keys listed, rotated, and a leaked one
//! withdrawn at once.

mod support;

use support::broker::Spawned;
use support::ctl::ctl;

#[test]
fn ctl_lists_the_signing_keys_as_a_table_or_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let rotated = ctl(&broker, &data, &["keys", "rotate"]);
    assert_eq!(rotated.status.code(), Some(0));
    let new_kid = String::from_utf8(rotated.stdout).unwrap();
    let new_kid = new_kid.split_whitespace().next().unwrap().to_owned();

    let o = ctl(&broker, &data, &["keys", "list", "--output", "json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let keys: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let by_state = |s: &str| keys.iter().filter(|k| k["state"] == s).collect::<Vec<_>>();
    assert_eq!(by_state("signing").len(), 1);
    assert_eq!(by_state("signing")[0]["kid"], new_kid.as_str());
    assert_eq!(by_state("retired").len(), 1);
    assert!(
        keys.iter().all(|k| k["published"] == true),
        "the old key stays published for its tokens"
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!text.contains("PRIVATE") && !text.contains("pkcs8"));

    let table = ctl(&broker, &data, &["keys", "list"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("KID"), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"kind\":\"admin.query\""), "{audit}");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}

#[test]
fn a_leaked_signing_key_is_withdrawn_at_once_and_the_withdrawal_audited() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    // A key rotated once already, as in the listing above.
    let rotated = ctl(&broker, &data, &["keys", "rotate"]);
    assert_eq!(rotated.status.code(), Some(0));

    let o = ctl(&broker, &data, &["keys", "rotate", "--output", "json"]);
    let rotated: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    assert_eq!(rotated["withdrawn"], serde_json::json!([]));

    // The leaked-key runbook: the signing key is withdrawn at once.
    let o = ctl(
        &broker,
        &data,
        &["keys", "rotate", "--revoke-old", "--publish-lead", "5m"],
    );
    assert_eq!(o.status.code(), Some(64), "a leaked key is replaced now");
    let o = ctl(
        &broker,
        &data,
        &[
            "keys",
            "rotate",
            "--revoke-old",
            "--reason",
            "key in a core dump",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains(&format!("withdrawn: {new_kid}")), "{out}");
    let o = ctl(&broker, &data, &["keys", "list", "--output", "json"]);
    let keys: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let leaked = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == new_kid.as_str())
        .unwrap();
    assert_eq!(leaked["state"], "withdrawn");
    assert_eq!(leaked["published"], false);
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "query",
            "--type",
            "token.revoke",
            "--output",
            "json",
        ],
    );
    let revoked: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(revoked[0]["target"], "kid");
    assert_eq!(revoked[0]["value"], new_kid.as_str());
    assert_eq!(revoked[0]["reason"], "key in a core dump");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}

/// The states `Admin.ListSigningKeys` reports, by kid.
async fn key_states(
    admin: &mut tally::proto::v1::admin_client::AdminClient<tonic::transport::Channel>,
) -> std::collections::HashMap<String, String> {
    admin
        .list_signing_keys(tally::proto::v1::ListSigningKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys
        .into_iter()
        .map(|k| (k.kid, k.state))
        .collect()
}

#[tokio::test]
async fn a_key_rotated_with_a_publish_lead_keeps_signing_until_the_lead_has_passed() {
    use std::sync::Arc;
    use support::broker::{channel_as, serve_store_with_clock, settings};
    use tally::clock::ManualClock;
    use tally::store::{Sealer, Store};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_sqlite(
        &dir.path().join("tally.db"),
        Sealer::from_key_material(Sealer::generate_key_text().unwrap().as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    // From the wall clock: the TLS handshake checks certificates by it.
    let t0 = tally::clock::Clock::now(&tally::clock::SystemClock);
    let clock = Arc::new(ManualClock::new(t0));
    let policy = std::fs::read_to_string(support::broker::POLICY_FILE).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let served = serve_store_with_clock(store, settings(&policy), listener, clock.clone()).await;
    let mut admin = tally::proto::v1::admin_client::AdminClient::new(channel_as(
        &served,
        "spiffe://example.org/admin",
    ));
    let old = served.broker.signing_kid().unwrap();

    let rotated = admin
        .rotate_signing_key(tally::proto::v1::RotateSigningKeyRequest {
            publish_lead_seconds: 300,
            revoke_old: false,
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let states = key_states(&mut admin).await;
    assert_eq!(
        states[&old], "signing",
        "the old key signs through the lead"
    );
    assert_eq!(states[&rotated.kid], "next");
    assert_eq!(served.broker.signing_kid().as_deref(), Some(old.as_str()));

    clock.advance(299);
    assert_eq!(key_states(&mut admin).await[&old], "signing");
    clock.advance(1);
    let states = key_states(&mut admin).await;
    assert_eq!(states[&old], "retired", "{states:?}");
    assert_eq!(states[&rotated.kid], "signing", "{states:?}");
    served.stop().await;
}

#[test]
fn ctl_lists_the_key_that_still_signs_during_a_publish_lead_as_signing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let o = broker.ctl(
        &data,
        &["keys", "rotate", "--publish-lead", "5m", "--output", "json"],
    );
    let rotated: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let o = broker.ctl(&data, &["keys", "list", "--output", "json"]);
    let keys: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let state_of = |next: bool| {
        keys.as_array()
            .unwrap()
            .iter()
            .find(|k| (k["kid"] == rotated["kid"]) == next)
            .unwrap()["state"]
            .clone()
    };
    assert_eq!(state_of(false), "signing", "{keys}");
    assert_eq!(state_of(true), "next", "{keys}");
    let table = String::from_utf8(broker.ctl(&data, &["keys", "list"]).stdout).unwrap();
    assert!(table.contains("SIGNS UNTIL"), "{table}");
    assert!(!table.contains("retired"), "{table}");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}
