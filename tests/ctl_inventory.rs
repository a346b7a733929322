//! `tally ctl` inventory: the live tokens, the workloads, and the access
//! review, on a broker where checkout holds one token.

mod support;

use support::ctl::{Issued, ctl, text};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_list_shows_the_live_token_and_refuses_bad_conditions() {
    let dir = tempfile::tempdir().unwrap();
    let Issued {
        broker,
        data,
        issued,
    } = Issued::start(dir.path()).await;
    // Inventory: the live token, the workloads, and the access review.
    let o = ctl(
        &broker,
        &data,
        &[
            "tokens",
            "list",
            "--sub",
            "spiffe://example.org/ns/shop/sa/checkout",
            "--expiring-within",
            "1h",
            "--output",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let live: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(live.as_array().unwrap().len(), 1, "{live}");
    assert_eq!(live[0]["jti"], issued.jti.as_str());
    assert_eq!(live[0]["class"], "service");
    assert_eq!(live[0]["revoked"], false);
    let o = ctl(
        &broker,
        &data,
        &["tokens", "list", "--sub", "spiffe://example.org/nobody"],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1,
        "header only"
    );
    let o = ctl(
        &broker,
        &data,
        &["tokens", "list", "--expiring-within", "soon"],
    );
    assert_eq!(o.status.code(), Some(64));
    // An overlong condition is refused, not dropped (which would list all).
    let long = format!("spiffe://example.org/{}", "x".repeat(600));
    let o = ctl(&broker, &data, &["tokens", "list", "--sub", &long]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("longer than 512"), "{}", text(&o));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identities_list_counts_the_tokens_of_each_workload() {
    let dir = tempfile::tempdir().unwrap();
    let Issued { broker, data, .. } = Issued::start(dir.path()).await;
    let o = ctl(&broker, &data, &["identities", "list", "--output", "json"]);
    let ids: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let checkout_row = ids
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["spiffe_id"] == "spiffe://example.org/ns/shop/sa/checkout")
        .unwrap();
    assert_eq!(checkout_row["method"], "admin_mint");
    assert_eq!(checkout_row["tokens"], 1);
    assert_eq!(checkout_row["live_tokens"], 1);
    let unix = |name: &str| checkout_row[format!("{name}_unix")].as_i64().unwrap();
    assert!(unix("svid_expires_at") > unix("last_seen"));
    assert!(unix("first_seen") <= unix("last_seen"));
    let first = checkout_row["first_seen"].as_str().unwrap();
    assert!(first.ends_with('Z') && first.len() == 20, "{first}");
    assert_eq!(checkout_row["denied_at"], serde_json::Value::Null);

    // The table promises first and last seen.
    let o = ctl(&broker, &data, &["identities", "list"]);
    let table = String::from_utf8_lossy(&o.stdout);
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("SPIFFE ID")
            && header.contains("FIRST SEEN")
            && header.contains("LAST SEEN"),
        "{table}"
    );
    let row = table.lines().find(|l| l.contains("/sa/checkout")).unwrap();
    assert!(row.contains(first), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_review_names_unused_rules_and_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let Issued { broker, data, .. } = Issued::start(dir.path()).await;
    let o = ctl(
        &broker,
        &data,
        &["review", "--unused-for", "30d", "--output", "json"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let review: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(review["tokens_considered"], 1);
    // The reporting rule issued nothing; checkout's rule never needed
    // payments:charge.
    assert_eq!(review["unused_rules"][0]["line"], 12, "{review}");
    assert_eq!(review["unused_scopes"][0]["line"], 7, "{review}");
    assert_eq!(review["unused_scopes"][0]["scopes"][0], "payments:charge");
    let o = ctl(&broker, &data, &["review"]);
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.starts_with("Access review, "), "{report}");
    assert!(
        report.contains("Scopes granted but never carried: \n  - line 7: spiffe://example.org/ns/shop/sa/checkout -> spiffe://example.org/ns/pay/sa/payments: payments:charge"),
        "{report}"
    );
}
