//! `tally ctl revoke`: refused mistakes, and a revocation that is durable
//! the moment ctl returns.

mod support;

use support::broker::Spawned;
use support::ctl::ctl;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_durable_when_ctl_returns() {
    use tally::clock::Clock as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    // For scripts: one JSON document.
    let o = ctl(
        &broker,
        &data,
        &[
            "revoke",
            "--issued-before",
            "1700000000",
            "--output",
            "json",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(done["issued_before"], "2023-11-14T22:13:20Z");
    assert_eq!(done["issued_before_unix"], 1_700_000_000);
    assert!(
        done["expires_at"].as_str().unwrap().ends_with('Z'),
        "{done}"
    );
    assert!(done["expires_at_unix"].as_i64().unwrap() > 1_700_000_000);
    assert!(done["sequence"].as_u64().unwrap() > 0);
    // Mistakes are refused, not recorded.
    let o = ctl(&broker, &data, &["revoke", "--jti", "no-such-token"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no token with jti"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = ctl(&broker, &data, &["revoke", "--sub", "x", "--jkt", "y"]);
    assert_eq!(o.status.code(), Some(64));
    let o = ctl(
        &broker,
        &data,
        &["revoke", "--issued-before", "yesterday-ish"],
    );
    assert_eq!(o.status.code(), Some(64));

    // The revocation that counts comes last, so the kill follows its
    // answer at once: the revocation is then in the store, in the state
    // every new Watch subscriber gets, and in the audit log
    // (tests/durability.rs does the same under load, for every kind of
    // acknowledged write).
    let o = ctl(
        &broker,
        &data,
        &[
            "revoke",
            "--sub",
            "spiffe://example.org/ns/shop/sa/checkout",
            "--reason",
            "compromised pod",
        ],
    );
    broker.kill();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .starts_with("revoked: covers tokens issued at or before")
    );
    let key = std::fs::read(data.join("store.key")).unwrap();
    let store = tally::store::Store::open_sqlite(
        &data.join("tally.db"),
        tally::store::Sealer::from_key_material(&key).unwrap(),
    )
    .await
    .unwrap();
    let state = store
        .current_state(tally::clock::SystemClock.now())
        .await
        .unwrap();
    let revocations: Vec<_> = state.iter().filter(|c| c.kind == "revocation").collect();
    assert_eq!(revocations.len(), 1);
    let entry = tally::token::Revocation::from_json(&revocations[0].body).unwrap();
    assert_eq!(
        entry.target,
        tally::token::RevocationTarget::Subject(
            "spiffe://example.org/ns/shop/sa/checkout".parse().unwrap()
        )
    );
    assert_eq!(entry.reason, "compromised pod");
    // The store's log (the JSON-lines file is a copy written after the
    // commit, for log shippers).
    let filter = tally::store::AuditFilter {
        kind: Some("token.revoke".into()),
        ..Default::default()
    };
    let audit = store.audit_query(&filter, 10).await.unwrap();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert!(
        audit[1].line.contains("\"reason\":\"compromised pod\""),
        "{audit:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaked_token_is_revoked_from_the_token_itself_and_a_forgery_revokes_nothing() {
    use support::ctl::{Issued, text};
    let dir = tempfile::tempdir().unwrap();
    let issued = Issued::start(dir.path()).await;
    let token = issued.issued.access_token.clone();
    let lookup = |issued: &Issued| {
        let o = issued.ctl(&["audit", "lookup", "--token", &token, "--output", "json"]);
        assert_eq!(o.status.code(), Some(0), "{}", text(&o));
        serde_json::from_slice::<serde_json::Value>(&o.stdout).unwrap()["revoked"].clone()
    };
    // A forged token naming the real jti: refused, and the real token
    // stays live.
    let forged = format!("{token}x");
    let o = issued.ctl(&["revoke", "--token", &forged, "--reason", "forged"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("not issued by this broker") && text(&o).contains("nothing revoked"),
        "{}",
        text(&o)
    );
    assert_eq!(lookup(&issued), false);
    let o = issued.ctl(&["revoke", "--token", &forged, "--output", "json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let said: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (&said["found"], &said["revoked"]),
        (&false.into(), &false.into())
    );
    // The token itself, from stdin: revoked, by its jti.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "ctl", "revoke", "--token", "-", "--reason", "leaked", "--output", "json",
        ])
        .arg("--broker")
        .arg(format!(
            "https://{}",
            issued.broker.grpc.replace("127.0.0.1", "localhost")
        ))
        .arg("--data-dir")
        .arg(&issued.data)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{token}").unwrap();
    }
    let o = support::process::finish_within(child, support::process::PATIENCE);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let done: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(done["sequence"].as_u64().unwrap() > 0, "{done}");
    assert_eq!(lookup(&issued), true);
    // The token never reaches the output.
    assert!(!text(&o).contains(&token));
}
