//! The Grafana dashboard and Prometheus alert rules in
//! `deploy/observability/` stay true to what the code exports: the
//! dashboard is valid JSON with a query in every panel, every alert rule
//! has an expression, a severity and a summary, and every metric, label
//! and label value they name is in the real `/metrics` of a running broker
//! and sidecar after traffic that produces each one; and docs/METRICS.md
//! lists exactly the families exported, with their types and labels.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, authorize, send};
use tally::policy::yaml::{Node, Value};

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/observability");

/// One metric family as scraped: its type and the values seen per label.
#[derive(Debug, Default)]
struct Family {
    kind: String,
    labels: BTreeMap<String, BTreeSet<String>>,
}

/// What a scrape exported, by family name.
#[derive(Debug, Default)]
struct Scraped(BTreeMap<String, Family>);

impl Scraped {
    /// Adds a Prometheus text exposition.
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                self.0.entry(name.to_owned()).or_default().kind = kind.to_owned();
                continue;
            }
            if line.starts_with('#') || line.is_empty() {
                continue;
            }
            let series = line.rsplit_once(' ').unwrap().0;
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels.strip_suffix('}').unwrap()),
                None => (series, ""),
            };
            let family = self
                .family_of(name)
                .unwrap_or_else(|| panic!("no TYPE for {line}"));
            let family = self.0.get_mut(&family).unwrap();
            for pair in labels.split(',').filter(|p| !p.is_empty()) {
                let (label, value) = pair.split_once('=').unwrap();
                family
                    .labels
                    .entry(label.to_owned())
                    .or_default()
                    .insert(value.trim_matches('"').to_owned());
            }
        }
    }

    /// The family a sample or a query's name belongs to: itself, or a
    /// histogram's `_bucket`/`_sum`/`_count`.
    fn family_of(&self, name: &str) -> Option<String> {
        if self.0.contains_key(name) {
            return Some(name.to_owned());
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            (self.0.get(base)?.kind == "histogram").then(|| base.to_owned())
        })
    }

    /// What is wrong with the PromQL `expr`, against this scrape: metrics
    /// nothing exports, labels they lack, label values never produced.
    fn problems(&self, expr: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut families = Vec::new();
        let mut rest = expr;
        while let Some(at) = rest.find("tally_") {
            let tail = &rest[at..];
            let end = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
                .unwrap_or(tail.len());
            let name = &tail[..end];
            rest = &tail[end..];
            let Some(family) = self.family_of(name) else {
                problems.push(format!("{name}: not exported"));
                continue;
            };
            let labels = &self.0[&family].labels;
            if let Some(matchers) = rest.strip_prefix('{') {
                let matchers = &matchers[..matchers.find('}').unwrap()];
                for matcher in matchers.split(',') {
                    let op_at = matcher.find(['=', '!']).unwrap();
                    let label = matcher[..op_at].trim();
                    let values = matcher[op_at..]
                        .trim_start_matches(['=', '!', '~'])
                        .trim()
                        .trim_matches('"');
                    let Some(seen) = labels.get(label) else {
                        problems.push(format!("{name}: no label {label}"));
                        continue;
                    };
                    // Exclusions too: a misspelt one excludes nothing.
                    for value in values.split('|') {
                        if !seen.contains(value) {
                            problems.push(format!("{name}: {label}={value:?} never exported"));
                        }
                    }
                }
            }
            families.push(family);
        }
        // `by (…)` names labels of the series it groups; `instance` and
        // `job` are the ones Prometheus adds.
        let mut rest = expr;
        while let Some(at) = rest.find("by (") {
            let inside = &rest[at + 4..];
            let close = inside.find(')').unwrap();
            for label in inside[..close].split(',').map(str::trim) {
                let known = ["instance", "job"].contains(&label)
                    || families
                        .iter()
                        .any(|f| self.0[f].labels.contains_key(label));
                if !known {
                    problems.push(format!("by ({label}): no such label on {families:?}"));
                }
            }
            rest = &inside[close..];
        }
        problems
    }
}

/// Every PromQL expression of the dashboard and the alert rules.
fn queries() -> Vec<(String, String)> {
    let mut queries = Vec::new();
    let text = std::fs::read_to_string(format!("{DIR}/grafana-dashboard.json")).unwrap();
    let dashboard: serde_json::Value = serde_json::from_str(&text).unwrap();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let title = panel["title"].as_str().unwrap();
            queries.push((
                format!("panel {title:?}"),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    let text = std::fs::read_to_string(format!("{DIR}/alerts.yaml")).unwrap();
    let doc = tally::policy::yaml::parse(&text).unwrap();
    let Some(Value::Seq(groups)) = get(&doc, "groups").map(|n| &n.value) else {
        panic!("no groups")
    };
    for group in groups {
        let Some(Value::Seq(rules)) = get(group, "rules").map(|n| &n.value) else {
            panic!("a group without rules")
        };
        for rule in rules {
            let name = text_of(get(rule, "alert")).unwrap();
            let expr = text_of(get(rule, "expr")).unwrap();
            queries.push((format!("alert {name}"), expr.to_owned()));
        }
    }
    queries
}

/// A broker (with its admin port) and two sidecars, driven through every
/// outcome the dashboard and alerts name, then scraped.
async fn scrape_after_traffic() -> Scraped {
    let mesh = Mesh::start().await;
    let broker = &mesh.broker.broker;
    let admin_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let broker_admin = admin_listener.local_addr().unwrap();
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_server = tokio::spawn(tally::broker::serve::serve_admin(
        std::sync::Arc::clone(broker),
        admin_listener,
        async {
            let _ = admin_stopped.await;
        },
    ));
    let app = App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                admin: true,
                ext_authz: true,
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                socket: true,
                services: vec![(inbound.to_string(), PAYMENTS.to_owned())],
                ..Parts::default()
            },
        )
        .await;
    let socket = checkout.socket.as_deref().unwrap();
    // A freshly started inbound proxy asks for a nonce: use_dpop_nonce.
    support::mesh::prime_nonce(socket, inbound, "payments:charge").await;
    let url = format!("http://{inbound}/v1/charges");
    let charge = |(a, d): &(String, String)| {
        let headers = [("authorization", a.clone()), ("dpop", d.clone())];
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            send(inbound, "POST", "/v1/charges", &headers, "")
                .await
                .status
        }
    };
    // allowed, then replayed_proof.
    let first = authorize(socket, "POST", &url, "payments:charge").await;
    let kept = authorize(socket, "POST", &url, "payments:charge").await;
    assert_eq!(charge(&first).await, 200);
    assert_eq!(charge(&first).await, 401);
    // invalid_dpop_proof: a proof for another URL.
    let elsewhere = authorize(
        socket,
        "POST",
        &format!("http://{inbound}/v1/refunds"),
        "payments:charge",
    )
    .await;
    assert_eq!(charge(&elsewhere).await, 401);
    // The same verdict through Envoy's ext_authz, with its own metrics.
    let (a, d) = authorize(socket, "POST", &url, "payments:charge").await;
    let check = support::ext_authz::request(
        tally::proto::envoy::service::auth::v3::attribute_context::HttpRequest {
            method: "POST".into(),
            scheme: "http".into(),
            host: inbound.to_string(),
            path: "/v1/charges".into(),
            headers: [("authorization".into(), a), ("dpop".into(), d)].into(),
            ..Default::default()
        },
    );
    let answer = support::ext_authz::client(payments.ext_authz.unwrap())
        .await
        .check(check)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(support::ext_authz::status(&answer), 200, "{answer:?}");
    // revoked: headers made before their token was revoked.
    let jti = {
        let payload = kept
            .0
            .trim_start_matches("DPoP ")
            .split('.')
            .nth(1)
            .unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&tally::jose::b64::decode(payload.as_bytes()).unwrap()).unwrap();
        claims["jti"].as_str().unwrap().to_owned()
    };
    let admin_id = "spiffe://example.org/admin".parse().unwrap();
    broker
        .revoke(
            tally::token::RevocationTarget::Jti(jti),
            None,
            "",
            &admin_id,
        )
        .await
        .unwrap();
    let mut seen = payments.sidecar.parts().mesh.clone();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        seen.wait_for(|m| m.revocations_seen >= 1),
    )
    .await
    .expect("the revocation never reached payments")
    .unwrap();
    assert_eq!(charge(&kept).await, 401);
    // The broker's refusals: no_rule, scope_not_granted, dpop_nonce.
    for (audience, scope, require_nonce, reason) in [
        (
            "spiffe://example.org/ns/x/sa/nobody",
            "payments:charge",
            false,
            "no_rule",
        ),
        (PAYMENTS, "payments:refund", false, "scope_not_granted"),
        (PAYMENTS, "payments:charge", true, "dpop_nonce"),
    ] {
        let key = tally::dpop::ProofKey::generate().unwrap();
        let proof = key
            .mint(
                "POST",
                broker.issue_uri(),
                None,
                None,
                tally::clock::Clock::now(&tally::clock::SystemClock),
            )
            .unwrap();
        let refused = broker
            .issue(&tally::broker::issue::IssueInput {
                caller: &CHECKOUT.parse().unwrap(),
                audience: &audience.parse().unwrap(),
                scopes: &scope.parse().unwrap(),
                ttl: None,
                proof: &proof,
                htu: &tally::dpop::NormalizedUri::parse(broker.issue_uri()).unwrap(),
                require_nonce,
                via: "test",
                pod: None,
            })
            .await;
        assert_eq!(refused.unwrap_err().reason(), reason, "{audience} {scope}");
    }

    let mut scraped = Scraped::default();
    for addr in [broker_admin, payments.admin.unwrap()] {
        let answer = send(addr, "GET", "/metrics", &[], "").await;
        assert_eq!(answer.status, 200);
        scraped.add(std::str::from_utf8(&answer.body).unwrap());
    }
    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    app.stop();
    let _ = stop_admin.send(());
    admin_server.await.unwrap().unwrap();
    mesh.broker.stop().await;
    scraped
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_alerts_name_only_what_a_running_broker_and_sidecar_export() {
    let scraped = scrape_after_traffic().await;
    // The check itself can fail: a misspelt metric, label or value, or a
    // bucket of a counter.
    for wrong in [
        "rate(tally_broker_issuance_totl[5m])",
        "tally_broker_issuance_total{reason=\"issued\"}",
        "tally_broker_issuance_total{result!~\"issued|no_rules\"}",
        "tally_broker_issuance_total_bucket",
        "sum by (rezult) (tally_sidecar_inbound_requests_total)",
    ] {
        assert_eq!(scraped.problems(wrong).len(), 1, "{wrong}");
    }
    let queries = queries();
    assert!(queries.len() >= 20, "{queries:?}");
    let problems: Vec<String> = queries
        .iter()
        .flat_map(|(what, expr)| {
            scraped
                .problems(expr)
                .into_iter()
                .map(move |p| format!("{what}: {p}"))
        })
        .collect();
    assert!(problems.is_empty(), "{problems:#?}");
    metrics_reference_matches(&scraped);
}

/// docs/METRICS.md lists every family the scrape found, with its type and
/// every label it carries, and nothing the scrape lacks.
fn metrics_reference_matches(scraped: &Scraped) {
    let page =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/METRICS.md")).unwrap();
    let mut documented = BTreeMap::new();
    for line in page.lines().filter(|l| l.starts_with("| `tally_")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let name = cells[1].trim_matches('`').to_owned();
        let labels: BTreeSet<String> = cells[3]
            .split(',')
            .map(|l| l.trim().trim_matches('`').to_owned())
            .filter(|l| !l.is_empty() && l != "—")
            .collect();
        documented.insert(name, (cells[2].to_owned(), labels));
    }
    let mut problems = Vec::new();
    for (name, family) in &scraped.0 {
        match documented.get(name) {
            None => problems.push(format!("{name} is exported but not in docs/METRICS.md")),
            Some((kind, labels)) => {
                if *kind != family.kind {
                    problems.push(format!(
                        "{name}: documented {kind}, exported {}",
                        family.kind
                    ));
                }
                for label in family.labels.keys().filter(|l| *l != "le") {
                    if !labels.contains(label) {
                        problems.push(format!("{name}: label {label} not documented"));
                    }
                }
            }
        }
    }
    // The injector's families are scraped from a running webhook by
    // tests/injector_hostile.rs.
    for name in documented
        .keys()
        .filter(|n| !n.starts_with("tally_injector_"))
    {
        if !scraped.0.contains_key(name) {
            problems.push(format!(
                "docs/METRICS.md lists {name}, which nothing exports"
            ));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_dashboard_panel_has_a_query_and_every_sli_a_panel() {
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
fn every_alert_rule_is_complete() {
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
}
