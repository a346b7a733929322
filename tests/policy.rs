//! Trust policy: parsing with positioned errors, issue and access
//! decisions, explanations.

use tally::identity::SpiffeId;
use tally::policy::{AccessDenial, AccessRequest, IssueDenial, IssueRequest, Policy, Rate};
use tally::token::{Audience, Scopes, TokenClass};

const FIXTURE: &str = include_str!("fixtures/policy.yaml");
const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn aud(s: &str) -> Audience {
    s.parse().unwrap()
}

fn scopes(s: &str) -> Scopes {
    s.parse().unwrap()
}

fn policy() -> Policy {
    Policy::parse(FIXTURE).unwrap()
}

fn issue(
    p: &Policy,
    from: &str,
    to: &str,
    scope: &str,
    ttl: Option<u64>,
) -> Result<tally::policy::IssueGrant, IssueDenial> {
    p.decide_issue(&IssueRequest {
        from: &id(from),
        audience: &aud(to),
        scopes: &scopes(scope),
        ttl,
    })
}

#[test]
fn the_design_example_parses() {
    let p = policy();
    assert_eq!(p.trust_domain, "example.org");
    assert_eq!(p.issue.len(), 2);
    assert_eq!(p.issue[0].pos.line, 7);
    assert_eq!(
        p.issue[0].rate,
        Some(Rate {
            count: 50,
            per_secs: 1
        })
    );
    assert_eq!(p.classes[&TokenClass::Service].max_ttl, 900);
    assert_eq!(p.classes[&TokenClass::Admin].default_ttl, 60);
    // Classes the file does not list keep built-in lifetimes.
    assert_eq!(p.classes[&TokenClass::Partner].default_ttl, 300);
    assert_eq!(p.access[0].allow.len(), 2);
}

#[test]
fn a_granted_request_gets_class_lifetimes() {
    let p = policy();
    let g = issue(&p, CHECKOUT, PAYMENTS, "payments:charge", None).unwrap();
    assert_eq!((g.rule, g.class, g.ttl), (0, TokenClass::Service, 300));
    assert_eq!(g.scopes.to_string(), "payments:charge");
    // Asking for longer is capped at the class maximum.
    assert_eq!(
        issue(&p, CHECKOUT, PAYMENTS, "payments:charge", Some(86_400))
            .unwrap()
            .ttl,
        900
    );
    assert_eq!(
        issue(&p, CHECKOUT, PAYMENTS, "payments:charge", Some(30))
            .unwrap()
            .ttl,
        30
    );
    // No scopes asked: everything the rule grants.
    assert_eq!(
        issue(&p, CHECKOUT, PAYMENTS, "", None)
            .unwrap()
            .scopes
            .to_string(),
        "payments:charge payments:read"
    );
}

#[test]
fn a_rule_cap_below_the_class_cap_applies() {
    let p = policy();
    let g = issue(
        &p,
        "spiffe://example.org/ns/finance/sa/reporting",
        PAYMENTS,
        "payments:read",
        Some(600),
    )
    .unwrap();
    assert_eq!((g.rule, g.ttl), (1, 120));
}

#[test]
fn scope_escalation_is_refused_naming_the_scope() {
    let p = policy();
    let err = issue(
        &p,
        "spiffe://example.org/ns/finance/sa/reporting",
        PAYMENTS,
        "payments:read payments:charge",
        None,
    )
    .unwrap_err();
    assert!(
        matches!(&err, IssueDenial::ScopeNotGranted { scope, .. } if scope.as_str() == "payments:charge"),
        "{err}"
    );
    let err = issue(&p, CHECKOUT, PAYMENTS, "payments:refund", None).unwrap_err();
    assert!(err.to_string().contains("payments:refund"));
}

#[test]
fn callers_and_audiences_without_a_rule_are_refused() {
    let p = policy();
    assert!(matches!(
        issue(
            &p,
            "spiffe://example.org/ns/shop/sa/cart",
            PAYMENTS,
            "payments:read",
            None
        ),
        Err(IssueDenial::NoRule { .. })
    ));
    assert!(matches!(
        issue(
            &p,
            CHECKOUT,
            "spiffe://example.org/ns/pay/sa/ledger",
            "",
            None
        ),
        Err(IssueDenial::NoRule { .. })
    ));
    assert!(matches!(
        issue(
            &p,
            "spiffe://other.org/ns/shop/sa/checkout",
            PAYMENTS,
            "",
            None
        ),
        Err(IssueDenial::NoRule { .. })
    ));
}

#[test]
fn explain_says_which_rule_allows_and_why_the_others_do_not() {
    let p = policy();
    let verdicts = p.explain_issue(&IssueRequest {
        from: &id(CHECKOUT),
        audience: &aud(PAYMENTS),
        scopes: &scopes("payments:charge"),
        ttl: None,
    });
    assert_eq!(verdicts.len(), 2);
    assert!(verdicts[0].allows);
    assert!(!verdicts[1].allows);
    assert!(
        verdicts[1].reason.contains("does not match"),
        "{}",
        verdicts[1]
    );
    assert!(verdicts[0].to_string().starts_with("line 7: ALLOWS"));
}

fn access(
    p: &Policy,
    caller: &str,
    method: &str,
    path: &str,
    scope: &str,
) -> Result<tally::policy::AccessGrant, AccessDenial> {
    p.decide_access(&AccessRequest {
        workload: &id(PAYMENTS),
        caller: &id(caller),
        method,
        path,
        scopes: &scopes(scope),
    })
}

#[test]
fn access_rules_check_caller_method_path_and_scope() {
    let p = policy();
    assert!(access(&p, CHECKOUT, "POST", "/v1/charges", "payments:charge").is_ok());
    assert!(access(&p, CHECKOUT, "POST", "/v1/charges/ch_1", "payments:charge").is_ok());
    assert_eq!(
        access(&p, CHECKOUT, "GET", "/v1/charges", "payments:charge"),
        Err(AccessDenial::MethodNotAllowed("GET".into()))
    );
    assert_eq!(
        access(&p, CHECKOUT, "POST", "/v1/refunds", "payments:charge"),
        Err(AccessDenial::PathNotAllowed("/v1/refunds".into()))
    );
    assert!(
        matches!(access(&p, CHECKOUT, "POST", "/v1/charges", "payments:read"), Err(AccessDenial::MissingScope(s)) if s.as_str() == "payments:charge")
    );
    assert!(matches!(
        access(
            &p,
            "spiffe://example.org/ns/shop/sa/cart",
            "POST",
            "/v1/charges",
            "payments:charge"
        ),
        Err(AccessDenial::CallerNotAllowed(_))
    ));
    let reporting = "spiffe://example.org/ns/finance/sa/reporting";
    let g = access(
        &p,
        reporting,
        "GET",
        "/v1/charges/ch_1/events",
        "payments:read",
    )
    .unwrap();
    assert_eq!(
        g.rate,
        Some(Rate {
            count: 10,
            per_secs: 1
        })
    );
}

#[test]
fn a_workload_without_access_rules_denies_everything() {
    let p = policy();
    let err = p
        .decide_access(&AccessRequest {
            workload: &id("spiffe://example.org/ns/pay/sa/ledger"),
            caller: &id(CHECKOUT),
            method: "GET",
            path: "/",
            scopes: &Scopes::default(),
        })
        .unwrap_err();
    assert!(matches!(err, AccessDenial::NoRuleForWorkload(_)));
}

#[test]
fn every_error_is_reported_at_once_with_its_position() {
    let text = "\
trust_domain: example.org
classes:
  service: { default_ttl: 20m, max_ttl: 15m }
  servce: { default_ttl: 1m, max_ttl: 2m }
issue:
  - from: spiffe://example.org/ns/shop/sa/checkout
    to: spiffe://other.org/ns/pay/sa/payments
    scope: [payments:charge]
  - from: spiffe://example.org/ns/sh*p/sa/x
    to: https://partner.example
    scopes: [ok, \"bad scope\"]
    class: root
    rate: fast
";
    let err = Policy::parse(text).unwrap_err().with_file("policy.yaml");
    let lines: Vec<String> = err.to_string().lines().map(str::to_owned).collect();
    let has = |prefix: &str, needle: &str| {
        lines
            .iter()
            .any(|l| l.starts_with(prefix) && l.contains(needle))
    };
    assert!(
        has(
            "policy.yaml:3:",
            "default_ttl 20m is longer than max_ttl 15m"
        ),
        "{err}"
    );
    assert!(
        has("policy.yaml:4:3:", "unknown token class \"servce\""),
        "{err}"
    );
    assert!(
        has("policy.yaml:6:", "missing required key \"scopes\""),
        "{err}"
    );
    assert!(
        has("policy.yaml:7:9:", "outside the trust domain example.org"),
        "{err}"
    );
    assert!(has("policy.yaml:8:5:", "did you mean \"scopes\"?"), "{err}");
    assert!(has("policy.yaml:9:11:", "'*' must stand alone"), "{err}");
    assert!(has("policy.yaml:11:", "\"bad scope\""), "{err}");
    assert!(
        has("policy.yaml:12:12:", "unknown token class \"root\""),
        "{err}"
    );
    assert!(has("policy.yaml:13:11:", "not a rate"), "{err}");
    assert_eq!(err.diagnostics.len(), 9, "every error, each once: {err}");
}

#[test]
fn yaml_syntax_errors_and_hostile_documents_are_refused() {
    assert_eq!(
        Policy::parse("trust_domain: [").unwrap_err().to_string(),
        "policy:2:1: while parsing a node, did not find expected node content"
    );
    assert!(
        Policy::parse("trust_domain: example.org\ntrust_domain: evil.org\n")
            .unwrap_err()
            .to_string()
            .contains("duplicate key")
    );
    let bomb = "a: &a [1]\nb: &b [*a, *a]\ntrust_domain: example.org\n";
    assert!(
        Policy::parse(bomb)
            .unwrap_err()
            .to_string()
            .contains("aliases")
    );
    assert!(
        Policy::parse("")
            .unwrap_err()
            .to_string()
            .contains("must be a mapping")
    );
    assert_eq!(
        Policy::parse(&"x".repeat(2 << 20)).unwrap_err().to_string(),
        "policy:0:0: document is larger than 1048576 bytes"
    );
}

/// Access rules with their positions blanked (a rendered document puts
/// them elsewhere), for comparing what they mean.
fn meaning(rules: &[tally::policy::AccessRule]) -> Vec<tally::policy::AccessRule> {
    let mut rules = rules.to_vec();
    for rule in &mut rules {
        rule.pos = Default::default();
        for allow in &mut rule.allow {
            allow.pos = Default::default();
        }
    }
    rules
}

#[test]
fn the_access_document_reads_back_as_the_same_rules() {
    let p = policy();
    let all = Policy::parse(&p.access_document(None)).unwrap();
    assert_eq!(meaning(&all.access), meaning(&p.access));
    assert!(all.issue.is_empty(), "issue rules are not sent to sidecars");
    assert_eq!(all.trust_domain, p.trust_domain);

    // For one workload: only the rules protecting it, deciding as before.
    let mine = Policy::parse(&p.access_document(Some(&id(PAYMENTS)))).unwrap();
    let expected: Vec<_> = p
        .access
        .iter()
        .filter(|r| r.workload.matches(&id(PAYMENTS)))
        .cloned()
        .collect();
    assert!(!expected.is_empty() && expected.len() < p.access.len());
    assert_eq!(meaning(&mine.access), meaning(&expected));
    assert!(access(&mine, CHECKOUT, "POST", "/v1/charges", "payments:charge").is_ok());
    assert_eq!(
        access(&mine, CHECKOUT, "GET", "/v1/charges", "payments:charge"),
        Err(AccessDenial::MethodNotAllowed("GET".into()))
    );

    let stranger =
        Policy::parse(&p.access_document(Some(&id("spiffe://example.org/ns/x/sa/y")))).unwrap();
    assert!(stranger.access.is_empty());
}

#[test]
fn a_double_star_in_a_spiffe_id_pattern_is_refused_for_what_it_is() {
    // `**` ends path patterns only; in a SPIFFE ID, even as its last
    // segment, it is refused, and the message must not claim otherwise.
    let text = "\
trust_domain: example.org
issue:
  - from: spiffe://example.org/**
    to: spiffe://example.org/ns/pay/sa/payments
    scopes: [payments:read]
";
    let err = Policy::parse(text).unwrap_err().to_string();
    assert!(
        err.contains("'**' is not allowed in a SPIFFE ID pattern"),
        "{err}"
    );
    assert!(!err.contains("only allowed as the last segment"), "{err}");
}
