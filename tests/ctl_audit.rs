//! `tally ctl audit`: the leaked-token lookup, queries, what the audit log
//! holds (and never holds), the hash chain verified online and offline
//! against every kind of tampering, and the beginning archived then
//! removed.

mod support;

use std::process::{Command, Stdio};
use support::broker::Spawned;
use support::ctl::{
    CHECKOUT, Issued, attest, audited, create_join_token, ctl, exported, issue_with, mint_svid,
    text,
};
use support::process::{PATIENCE, finish_within, output_within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_string_alone_finds_its_holder_and_every_record_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let Issued {
        broker,
        data,
        issued,
    } = Issued::start(dir.path()).await;
    // The leaked-token runbook: from the token string alone, who held it,
    // what for, and every record naming it.
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "lookup",
            "--token",
            &issued.access_token,
            "--output",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let found: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(found["found"], true);
    assert_eq!(found["jti"], issued.jti.as_str());
    assert_eq!(found["sub"], "spiffe://example.org/ns/shop/sa/checkout");
    assert_eq!(found["aud"], "spiffe://example.org/ns/pay/sa/payments");
    assert_eq!(found["scope"], "payments:read");
    assert_eq!(found["revoked"], false);
    let kinds: Vec<&str> = found["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["token.issue"], "{found}");
    // Read from stdin (out of shell history), as a table; the lookup
    // itself is now on the token's record.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["ctl", "audit", "lookup", "--token", "-"])
        .arg("--broker")
        .arg(format!(
            "https://{}",
            broker.grpc.replace("127.0.0.1", "localhost")
        ))
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", issued.access_token).unwrap();
    }
    let o = finish_within(child, PATIENCE);
    assert_eq!(o.status.code(), Some(0));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("holder   spiffe://example.org/ns/shop/sa/checkout"),
        "{table}"
    );
    assert!(table.contains("LIVE"), "{table}");
    assert!(
        table.contains("token.issue") && table.contains("admin.query"),
        "{table}"
    );
    // A forged token naming the real jti finds nothing.
    let forged = format!("{}x", issued.access_token);
    let o = ctl(&broker, &data, &["audit", "lookup", "--token", &forged]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("not issued by this broker"),
        "{}",
        text(&o)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_query_selects_by_subject_and_family_and_refuses_a_bad_time() {
    let dir = tempfile::tempdir().unwrap();
    let Issued {
        broker,
        data,
        issued,
    } = Issued::start(dir.path()).await;
    // Queries: by subject and family (the refused admin call is in
    // tests/ctl_identity.rs).
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "query",
            "--sub",
            "spiffe://example.org/ns/shop/sa/checkout",
            "--type",
            "token",
            "--output",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let records: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["jti"], issued.jti.as_str());
    let o = ctl(&broker, &data, &["audit", "query", "--since", "soon"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admins_work_is_audited_and_no_secret_is_in_the_audit_log_the_log_or_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let token = create_join_token(&broker, &data, "spiffe://example.org/vm/build-7");
    let svid = attest(&broker, &data, &token).await;
    assert_eq!(svid.spiffe_id, "spiffe://example.org/vm/build-7");
    let checkout = dir.path().join("checkout");
    mint_svid(&broker, &data, CHECKOUT, &checkout);
    let issued = issue_with(&broker, &checkout).await.unwrap();

    // The admin rotates the signing key.
    let o = ctl(&broker, &data, &["keys", "rotate"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let kid = String::from_utf8(o.stdout)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();

    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
    // All of it audited with the admin as actor; the join token itself is
    // nowhere in the log.
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    for kind in [
        "join_token.create",
        "identity.attest",
        "svid.mint",
        "keys.rotate",
    ] {
        assert!(
            audit.contains(&format!("\"kind\":\"{kind}\"")),
            "{kind}: {audit}"
        );
    }
    assert!(audit.contains(&kid), "{audit}");
    assert!(audit.contains(&issued.jti), "{audit}");
    // No secret in the audit log, the debug log or the database: not the
    // join token, not the access token (not even its signature).
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("token issued"), "the log is really there");
    let mut db = std::fs::read(data.join("tally.db")).unwrap();
    db.extend(std::fs::read(data.join("tally.db-wal")).unwrap_or_default());
    let signature = issued.access_token.rsplit('.').next().unwrap();
    for secret in [token.as_str(), issued.access_token.as_str(), signature] {
        assert!(!audit.contains(secret), "audit log holds a secret");
        assert!(!log.contains(secret), "broker log holds a secret");
        assert!(
            !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "database holds a secret"
        );
    }
}

/// Copies a stopped broker's data directory, tampers with its store,
/// starts a broker on the copy and returns what `ctl audit verify` says.
async fn verify_after(
    data: &std::path::Path,
    scratch: &std::path::Path,
    name: &str,
    tamper: &'static str,
) -> (Option<i32>, String) {
    let copy = scratch.join(name);
    let status = Command::new("cp")
        .arg("-r")
        .arg(data)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let url = format!("sqlite://{}", copy.join("tally.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::raw_sql(tamper).execute(&pool).await.unwrap();
    pool.close().await;
    let broker = Spawned::start(&copy);
    let o = ctl(&broker, &copy, &["audit", "verify"]);
    assert_eq!(broker.stop().0, Some(0));
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_checks_the_chain_online_and_in_the_file_offline() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, data) = audited(dir.path(), 4);
    let o = ctl(&broker, &data, &["audit", "verify"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.starts_with("intact: "), "{out}");
    let o = ctl(&broker, &data, &["audit", "verify", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["intact"], true);
    assert_eq!(report["chain_from"], 1);
    assert!(report["records_checked"].as_u64().unwrap() >= 5, "{report}");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));

    // The JSON-lines file holds the same chain, checked offline.
    let file = data.join("audit.jsonl");
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["ctl", "audit", "verify", "--file"])
            .arg(&file),
        PATIENCE,
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let mut lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.remove(2);
    let cut = dir.path().join("cut.jsonl");
    std::fs::write(&cut, lines.join("\n")).unwrap();
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["ctl", "audit", "verify", "--file"])
            .arg(&cut),
        PATIENCE,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("record 3 is missing or out of place"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_first_edited_deleted_or_reordered_record() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, data) = audited(dir.path(), 4);
    assert_eq!(broker.stop().0, Some(0));
    let scratch = dir.path();
    let (code, out) = verify_after(
        &data,
        scratch,
        "edited",
        "UPDATE audit SET line = replace(line, 'signing_keys', 'nothing') WHERE seq = 3",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("BROKEN: record 3 was altered"), "{out}");
    // Record 3 is read (its successor exposes it), but it is not good.
    assert!(!out.contains("good records"), "{out}");
    assert!(
        out.contains("every record before the first one named above chains intact"),
        "{out}"
    );

    let (code, out) =
        verify_after(&data, scratch, "deleted", "DELETE FROM audit WHERE seq = 3").await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("record 3 is missing or out of place"), "{out}");

    let (code, out) = verify_after(
        &data,
        scratch,
        "reordered",
        "UPDATE audit SET line = CASE seq WHEN 3 THEN (SELECT line FROM audit WHERE seq = 4) \
         ELSE (SELECT line FROM audit WHERE seq = 3) END WHERE seq IN (3, 4)",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("found record 4 where 3 belongs"), "{out}");

    // A query column changed to hide a record from `audit query`.
    let (code, out) = verify_after(
        &data,
        scratch,
        "recolumned",
        "UPDATE audit SET kind = 'hidden' WHERE seq = 2",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("record 2 was altered: its stored kind"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_finds_records_removed_from_the_end_and_an_edited_last_record() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, data) = audited(dir.path(), 4);
    assert_eq!(broker.stop().0, Some(0));
    let scratch = dir.path();
    // Records up to the head gone and more than a page of records past it:
    // the check stops (it used to re-read the same page forever) and says
    // the log does not reach its head.
    let (code, out) = verify_after(
        &data,
        scratch,
        "beyond",
        "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 2200) \
         INSERT INTO audit (seq, at, kind, line) SELECT i, 0, 'x', '{}' FROM n; \
         UPDATE audit_head SET seq = 50",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("removed from the end"), "{out}");

    // The last record edited: no successor exposes it, the head does.
    let (code, out) = verify_after(
        &data,
        scratch,
        "tail",
        "UPDATE audit SET line = replace(line, '\"ok\"', '\"denied\"') \
         WHERE seq = (SELECT MAX(seq) FROM audit)",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("was altered"), "{out}");
}

#[test]
fn the_beginning_of_the_audit_log_is_exported_to_an_archive_that_verifies_alone() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("audit-1-4.jsonl");
    let (broker, data, sha) = exported(dir.path(), &archive);
    // The archive verifies on its own and ends at the exported hash.
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["ctl", "audit", "verify", "--output", "json", "--file"])
            .arg(&archive),
        PATIENCE,
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (report["intact"].as_bool(), report["head_seq"].as_u64()),
        (Some(true), Some(4))
    );
    assert_eq!(report["head_sha256"], sha.as_str());
    // Exporting over an existing file is refused.
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "export",
            "--through",
            "4",
            "--out",
            archive.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(64));
}

#[test]
fn the_archived_beginning_is_removed_and_the_rest_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("audit-1-4.jsonl");
    let (broker, data, sha) = exported(dir.path(), &archive);
    // A wrong hash removes nothing.
    let wrong = "0".repeat(64);
    let o = ctl(
        &broker,
        &data,
        &["audit", "truncate", "--through", "4", "--sha256", &wrong],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("export it again"));
    let o = ctl(
        &broker,
        &data,
        &["audit", "truncate", "--through", "4", "--sha256", &sha],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("removed 4 archived records"), "{out}");

    // What is left verifies from the archive's last hash, and the removal
    // is on record.
    let o = ctl(&broker, &data, &["audit", "verify", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["chain_from"], 5);
    assert_eq!(report["anchor_sha256"], sha.as_str());
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "query",
            "--type",
            "audit.truncate",
            "--output",
            "json",
        ],
    );
    let records: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(records[0]["through"], 4);
    assert_eq!(records[0]["anchor"], sha.as_str());
    let o = ctl(&broker, &data, &["audit", "query", "--output", "json"]);
    let left: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(left[0]["seq"], 5, "records 1 to 4 are gone from the store");
    assert_eq!(broker.stop().0, Some(0));
}

#[test]
fn truncate_takes_the_hash_from_the_archive_it_is_given_and_only_from_an_intact_one() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("audit-1-4.jsonl");
    let (broker, data, sha) = exported(dir.path(), &archive);
    let truncate = |through: &str, file: &std::path::Path| {
        ctl(
            &broker,
            &data,
            &[
                "audit",
                "truncate",
                "--through",
                through,
                "--archive",
                file.to_str().unwrap(),
            ],
        )
    };
    // An archive that ends elsewhere, or was edited, removes nothing.
    let o = truncate("3", &archive);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
    assert!(text(&o).contains("ends at record 4, not 3"), "{}", text(&o));
    let edited = dir.path().join("edited.jsonl");
    let mut lines: Vec<String> = std::fs::read_to_string(&archive)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    let mut second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    second["outcome"] = "edited".into();
    lines[1] = second.to_string();
    std::fs::write(&edited, lines.join("\n") + "\n").unwrap();
    let o = truncate("4", &edited);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("the archive is broken"), "{}", text(&o));
    let o = ctl(&broker, &data, &["audit", "verify", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["chain_from"], 1, "nothing was removed: {report}");
    // The archive itself: removed through record 4, anchored on its hash.
    let o = truncate("4", &archive);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert!(
        text(&o).starts_with("removed 4 archived records"),
        "{}",
        text(&o)
    );
    let o = ctl(&broker, &data, &["audit", "verify", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["anchor_sha256"], sha.as_str(), "{report}");
    // Without --stored-at, the record says the archive is where it was read.
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "export",
            "--through",
            "2",
            "--out",
            dir.path().join("again.jsonl").to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains(archive.to_str().unwrap()), "{}", text(&o));
    assert_eq!(broker.stop().0, Some(0));
}

#[test]
fn a_removed_record_asked_for_again_is_said_to_be_archived_and_where() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("audit-1-4.jsonl");
    let (broker, data, sha) = exported(dir.path(), &archive);
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "truncate",
            "--through",
            "4",
            "--sha256",
            &sha,
            "--stored-at",
            "s3://audit-archive/tally/audit-1-4.jsonl",
            "--output",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", support::ctl::text(&o));
    let done: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (done["removed"].as_u64(), done["chain_from"].as_u64()),
        (Some(4), Some(5))
    );

    let again = dir.path().join("again.jsonl");
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "export",
            "--through",
            "2",
            "--out",
            again.to_str().unwrap(),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("record 2 is not in the store: records up to 4 were archived"),
        "{err}"
    );
    assert!(
        err.contains("s3://audit-archive/tally/audit-1-4.jsonl"),
        "{err}"
    );
    assert!(!err.contains("not found"), "{err}");
    assert!(!again.exists(), "no half archive");

    // Exporting what is still there, for a script.
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "export",
            "--through",
            "6",
            "--out",
            again.to_str().unwrap(),
            "--output",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", support::ctl::text(&o));
    let exported: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (exported["first"].as_u64(), exported["through"].as_u64()),
        (Some(5), Some(6))
    );
    assert_eq!(exported["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(broker.stop().0, Some(0));
}
