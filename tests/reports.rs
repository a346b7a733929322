//! The Reports service as a hostile sidecar would use it: every field
//! bounded, too many records refused, each reporter rate-limited.

mod support;

use support::broker::{channel_as, serve_broker, settings};
use tally::proto::v1 as pb;
use tally::store::{AuditFilter, Sealer};

fn record(path: &str) -> pb::FailureRecord {
    pb::FailureRecord {
        reason: "invalid_token".into(),
        method: "GET".into(),
        path: path.into(),
        jti: String::new(),
        claimed_sub: String::new(),
        count: 1,
        first_at: 1,
        last_at: 2,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_bounded_cleaned_and_rate_limited_per_reporter() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let served = serve_broker(
        dir.path(),
        &key,
        settings("trust_domain: example.org\n"),
        "127.0.0.1:0",
    )
    .await;
    let reporter = "spiffe://example.org/ns/pay/sa/payments";
    let mut client = pb::reports_client::ReportsClient::new(channel_as(&served, reporter));

    // Control characters and overlong fields are cleaned before the log
    // sees them.
    let mut hostile = record(&format!("/x\n{{\"kind\":\"forged\"}}{}", "y".repeat(5_000)));
    hostile.jti = "j\r\n1".into();
    client
        .verification_failures(pb::FailureReport {
            records: vec![hostile],
            overflow: [("invalid_token".to_owned(), 7)].into(),
        })
        .await
        .unwrap();
    let filter = AuditFilter {
        kind: Some("token.verify_failure".into()),
        ..AuditFilter::default()
    };
    let lines = served.broker.query_audit(&filter, 10).await.unwrap();
    assert_eq!(lines.len(), 2, "the record and the overflow summary");
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(&l.line).unwrap())
        .collect();
    let first = records
        .iter()
        .find(|r| r["reason"] == "invalid_token")
        .unwrap();
    assert_eq!(
        first["actor"], reporter,
        "the reporter is who the SVID says"
    );
    assert_eq!(first["jti"], "j1");
    let path = first["path"].as_str().unwrap();
    assert!(path.len() <= 256 && !path.contains('\n'), "{path}");
    let summary = records.iter().find(|r| r["reason"] == "summary").unwrap();
    assert_eq!(summary["overflow"]["invalid_token"], 7);

    // Too many records in one report.
    let flood = pb::FailureReport {
        records: (0..101).map(|i| record(&format!("/{i}"))).collect(),
        overflow: Default::default(),
    };
    let refused = client.verification_failures(flood).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    // A burst of 12 reports a minute (two used above), then refused.
    let mut accepted = 2;
    let status = loop {
        let one = pb::FailureReport {
            records: vec![record("/again")],
            overflow: Default::default(),
        };
        match client.verification_failures(one).await {
            Ok(_) => accepted += 1,
            Err(status) => break status,
        }
        assert!(accepted <= 12, "never limited");
    };
    assert_eq!(status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(accepted, 12);
    // Another reporter has its own budget.
    let other = "spiffe://example.org/ns/shop/sa/checkout";
    pb::reports_client::ReportsClient::new(channel_as(&served, other))
        .verification_failures(pb::FailureReport {
            records: vec![record("/")],
            overflow: Default::default(),
        })
        .await
        .unwrap();
    served.stop().await;
}
