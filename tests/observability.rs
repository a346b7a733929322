//! The Grafana dashboard and Prometheus alert rules in
//! `deploy/observability/` stay true to what the code exports: every
//! metric they name exists, the dashboard is valid JSON with a query in
//! every panel, and every alert rule has an expression, a severity and a
//! summary.

use std::collections::BTreeSet;
use tally::policy::yaml::{Node, Value};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/observability");

/// Every `tally_*` metric name the sources define (string literals).
fn exported() -> BTreeSet<String> {
    fn walk(dir: &std::path::Path, names: &mut BTreeSet<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, names);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                for piece in text.split('"').skip(1).step_by(2) {
                    if piece.starts_with("tally_")
                        && piece.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
                    {
                        names.insert(piece.to_owned());
                    }
                }
            }
        }
    }
    let mut names = BTreeSet::new();
    walk(
        std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/src")),
        &mut names,
    );
    names
}

/// Every `tally_*` name in `text`, with histogram suffixes removed.
fn named(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !(c.is_ascii_lowercase() || c == '_'))
        .filter(|w| w.starts_with("tally_"))
        .map(|w| {
            ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| w.strip_suffix(s))
                .unwrap_or(w)
                .to_owned()
        })
        .collect()
}

fn assert_exported(file: &str, text: &str) {
    let exported = exported();
    let named = named(text);
    assert!(!named.is_empty(), "{file} names no metric");
    let unknown: Vec<_> = named.difference(&exported).collect();
    assert!(
        unknown.is_empty(),
        "{file} names metrics nothing exports: {unknown:?}"
    );
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(format!("{DIR}/grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        let targets = panel["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{}", panel["title"]);
        for t in targets {
            assert!(t["expr"].as_str().is_some_and(|e| e.contains("tally_")));
        }
    }
    assert_exported("grafana-dashboard.json", &text);
    // Every SLI of the design has a panel.
    for metric in [
        "tally_broker_issuance_total",
        "tally_broker_issuance_duration_seconds",
        "tally_sidecar_inbound_requests_total",
        "tally_sidecar_revocation_lag_seconds",
        "tally_broker_live_tokens_max_per_holder",
        "tally_sidecar_svid_expires_in_seconds",
        "tally_broker_signing_key_age_seconds",
    ] {
        assert!(text.contains(metric), "no panel for {metric}");
    }
}

fn get<'a>(node: &'a Node, key: &str) -> Option<&'a Node> {
    match &node.value {
        Value::Map(entries) => entries.iter().find(|(k, _, _)| k == key).map(|(_, _, v)| v),
        _ => None,
    }
}

fn text_of(node: Option<&Node>) -> Option<&str> {
    match node.map(|n| &n.value) {
        Some(Value::Str(s)) => Some(s),
        _ => None,
    }
}

#[test]
fn every_alert_rule_is_complete_and_uses_exported_metrics() {
    let text = std::fs::read_to_string(format!("{DIR}/alerts.yaml")).unwrap();
    let doc = tally::policy::yaml::parse(&text).unwrap();
    let Some(Value::Seq(groups)) = get(&doc, "groups").map(|n| &n.value) else {
        panic!("no groups")
    };
    let mut alerts = BTreeSet::new();
    for group in groups {
        let Some(Value::Seq(rules)) = get(group, "rules").map(|n| &n.value) else {
            panic!("a group without rules")
        };
        for rule in rules {
            let name = text_of(get(rule, "alert")).expect("alert name");
            assert!(text_of(get(rule, "expr")).is_some(), "{name}: expr");
            let labels = get(rule, "labels").expect("labels");
            assert!(
                matches!(
                    text_of(get(labels, "severity")),
                    Some("warning" | "critical")
                ),
                "{name}: severity"
            );
            let annotations = get(rule, "annotations").expect("annotations");
            assert!(
                text_of(get(annotations, "summary")).is_some(),
                "{name}: summary"
            );
            assert!(alerts.insert(name.to_owned()), "{name} twice");
        }
    }
    // The alerts the design asks for.
    for wanted in [
        "TallyAuthFailureSpike",
        "TallyRevocationLagHigh",
        "TallyBrokerUnreachable",
        "TallySvidNearExpiry",
    ] {
        assert!(alerts.contains(wanted), "missing {wanted}");
    }
    assert_exported("alerts.yaml", &text);
}
