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
