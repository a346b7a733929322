//! `tally ctl policy` with the store as the policy source: versions
//! applied, diffed, rolled back and audited, and a policy file that never
//! silently wins over the stored version when the broker starts again.

mod support;

use std::process::Command;
use support::broker::{POLICY_FILE, Spawned};
use support::ctl::{RolledBack, ctl};
use support::process::{PATIENCE, output_within};

#[test]
fn policy_versions_are_applied_diffed_and_rolled_back_and_each_change_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let state = RolledBack::start(dir.path());
    let run = |args: &[&str]| state.run(args);
    let original = state.original.clone();

    let (code, out, _) = run(&["policy", "diff", "1", "2"]);
    assert_eq!(code, Some(1), "a difference exits 1, like diff(1)");
    assert!(out.starts_with("--- v1\n+++ v2\n"), "{out}");
    let (_, shown, _) = run(&["policy", "show"]);
    assert_eq!(shown, original, "version 3 is version 1's document");
    let (code, out, _) = run(&["policy", "diff", "1", "3"]);
    assert_eq!((code, out.as_str()), (Some(0), ""));
    let (_, table, _) = run(&["policy", "history"]);
    assert!(
        table.contains("rollback") && table.contains("refunds were a mistake"),
        "{table}"
    );
    // An unknown version: refused in the broker's words (exit 1), nothing served.
    let (code, out, err) = run(&["policy", "rollback", "9"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("the broker refused: no policy version 9"),
        "{err}"
    );
    // Each change is audited with its author and diff.
    let (_, out, _) = run(&[
        "audit",
        "query",
        "--type",
        "policy.change",
        "--output",
        "json",
    ]);
    let changes: serde_json::Value = serde_json::from_str(&out).unwrap();
    let changes = changes.as_array().unwrap();
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert_eq!(changes[0]["how"], "apply");
    assert_eq!(changes[0]["actor"], "spiffe://example.org/admin");
    assert!(
        changes[0]["diff"]
            .as_str()
            .unwrap()
            .contains("payments:refund")
    );
    assert_eq!(changes[1]["how"], "rollback");
    assert_eq!(changes[1]["rolled_back_to"], 1);
    assert_eq!(changes[2]["outcome"], "denied", "the unknown version");
    assert_eq!(state.broker.stop().0, Some(0));
}

#[test]
fn a_policy_file_that_differs_from_the_stored_version_never_silently_wins() {
    let dir = tempfile::tempdir().unwrap();
    let RolledBack {
        broker,
        data,
        widened,
        ..
    } = RolledBack::start(dir.path());
    assert_eq!(broker.stop().0, Some(0));

    // Started again with a file that differs from the applied version and
    // nothing said about which wins: refused, with both ways out.
    let start = |args: &[&str]| {
        output_within(
            Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(["broker", "--trust-domain", "example.org", "--data-dir"])
                .arg(&data)
                .args(support::broker::EPHEMERAL_PORTS)
                .args(args)
                .env_remove("TALLY_STORE_KEY"),
            PATIENCE,
        )
    };
    let o = start(&["--policy", widened.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(
        err.contains("policy version 3")
            && err.contains("--policy-source store")
            && err.contains("--policy-source file"),
        "{err}"
    );
    let o = start(&[
        "--policy",
        widened.to_str().unwrap(),
        "--policy-source",
        "store",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(
        err.contains("differs from the stored policy version 3"),
        "{err}"
    );

    // Said explicitly: the file wins, is stored as a version, and applying
    // is refused while it does.
    let broker = Spawned::start_with(
        &data,
        &[
            "--policy",
            widened.to_str().unwrap(),
            "--policy-source",
            "file",
        ],
    );
    let o = ctl(&broker, &data, &["policy", "apply", POLICY_FILE]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("serves the policy file"), "{err}");
    let o = ctl(&broker, &data, &["policy", "history", "--output", "json"]);
    let history: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(history["policy_source"], "file");
    assert_eq!(history["versions"][0]["version"], 4);
    assert_eq!(history["versions"][0]["source"], "file");
    assert_eq!(broker.stop().0, Some(0));
}
