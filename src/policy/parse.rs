//! From YAML text to a validated [`Policy`], collecting every problem with
//! its position instead of stopping at the first.

use super::yaml::{self, Node, Pos, Value};
use super::{
    AccessRule, Allow, AudiencePattern, ClassLimits, IdPattern, IssueRule, PathPattern, Policy,
    Rate, WIT_DEFAULT_TTL, WIT_MAX_TTL, WIT_MIN_TTL, WitRule, default_classes,
};
use crate::clock::human_duration;
use crate::identity::SpiffeId;
use crate::token::{Scope, Scopes, TokenClass};
use std::collections::HashMap;
use std::fmt;

/// One problem in a policy document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// Where.
    pub pos: Pos,
    /// What is wrong, and how to fix it when we can tell.
    pub message: String,
}

/// Every problem found in a policy document.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors {
    /// File name to show in front of positions.
    pub file: String,
    /// The problems, in document order.
    pub diagnostics: Vec<Diagnostic>,
}

impl PolicyErrors {
    /// Names the file the positions refer to.
    #[must_use]
    pub fn with_file(mut self, file: impl Into<String>) -> Self {
        self.file = file.into();
        self
    }
}

impl fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.diagnostics.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{}: {}", self.file, d.pos, d.message)?;
        }
        Ok(())
    }
}

/// Keys of the document itself.
const TOP_KEYS: &[&str] = &["trust_domain", "classes", "issue", "access", "wit"];
/// Keys of a class under `classes`.
const CLASS_KEYS: &[&str] = &["default_ttl", "max_ttl"];
/// Keys of an `issue` rule.
const ISSUE_KEYS: &[&str] = &["from", "to", "scopes", "class", "rate", "max_ttl"];
/// Keys of an `access` rule.
const ACCESS_KEYS: &[&str] = &["workload", "allow"];
/// Keys of an `allow` entry.
const ALLOW_KEYS: &[&str] = &["from", "methods", "paths", "scopes", "rate"];
/// Keys of a `wit` rule.
const WIT_KEYS: &[&str] = &["from", "ttl"];

/// Every key the parser accepts, by where it goes (docs/POLICY.md lists
/// them all; a test checks).
pub const KEYS: [(&str, &[&str]); 6] = [
    ("policy", TOP_KEYS),
    ("class", CLASS_KEYS),
    ("issue rule", ISSUE_KEYS),
    ("access rule", ACCESS_KEYS),
    ("allow entry", ALLOW_KEYS),
    ("wit rule", WIT_KEYS),
];

#[derive(Default)]
struct Ctx {
    diagnostics: Vec<Diagnostic>,
}

impl Ctx {
    fn error(&mut self, pos: Pos, message: impl Into<String>) {
        self.diagnostics.push(Diagnostic {
            pos,
            message: message.into(),
        });
    }

    /// The entries of a mapping, checking keys: unknown ones are reported
    /// (with a suggestion), required ones must be there.
    fn fields<'a>(
        &mut self,
        node: &'a Node,
        what: &str,
        known: &[&str],
        required: &[&str],
    ) -> HashMap<&'a str, &'a Node> {
        let Value::Map(entries) = &node.value else {
            self.error(
                node.pos,
                format!("{what} must be a mapping, not {}", node.kind()),
            );
            return HashMap::new();
        };
        let mut out = HashMap::new();
        for (key, pos, value) in entries {
            if known.contains(&key.as_str()) {
                out.insert(key.as_str(), value);
            } else {
                let hint = suggest(key, known)
                    .map(|k| format!("; did you mean {k:?}?"))
                    .unwrap_or_default();
                self.error(
                    *pos,
                    format!(
                        "unknown key {key:?} in {what}{hint} (expected one of: {})",
                        known.join(", ")
                    ),
                );
            }
        }
        for key in required {
            if !out.contains_key(key) {
                self.error(node.pos, format!("{what} is missing required key {key:?}"));
            }
        }
        out
    }

    fn string<'a>(&mut self, node: &'a Node, what: &str) -> Option<&'a str> {
        match &node.value {
            Value::Str(s) => Some(s),
            _ => {
                self.error(
                    node.pos,
                    format!("{what} must be text, not {}", node.kind()),
                );
                None
            }
        }
    }

    fn list<'a>(&mut self, node: &'a Node, what: &str) -> Option<&'a [Node]> {
        match &node.value {
            Value::Seq(items) => Some(items),
            _ => {
                self.error(
                    node.pos,
                    format!("{what} must be a list, not {}", node.kind()),
                );
                None
            }
        }
    }

    fn parsed<T>(
        &mut self,
        node: &Node,
        what: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let text = self.string(node, what)?;
        match parse(text) {
            Ok(v) => Some(v),
            Err(e) => {
                self.error(node.pos, format!("{what}: {e}"));
                None
            }
        }
    }
}

/// The closest known key, if it is close enough to be a typo.
fn suggest<'k>(key: &str, known: &[&'k str]) -> Option<&'k str> {
    known
        .iter()
        .map(|k| (edit_distance(key, k), *k))
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, k)| k)
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// A lifetime like `5m`, `90s`, `1h30m`: whole seconds, at least one.
fn duration(text: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration like 30s, 5m or 1h ({e})"))?;
    if d.subsec_nanos() != 0 || d.as_secs() == 0 {
        return Err(format!(
            "{text:?} must be a whole number of seconds, at least 1s"
        ));
    }
    Ok(d.as_secs())
}

/// `N/s`, `N/m` or `N/h`.
fn rate(text: &str) -> Result<Rate, String> {
    let shape = || format!("{text:?} is not a rate like 50/s, 100/m or 1000/h");
    let (count, unit) = text.split_once('/').ok_or_else(shape)?;
    let count: u32 = count.trim().parse().map_err(|_| shape())?;
    let per_secs = match unit.trim() {
        "s" | "sec" | "second" => 1,
        "m" | "min" | "minute" => 60,
        "h" | "hour" => 3600,
        _ => return Err(shape()),
    };
    if count == 0 || count > 1_000_000 {
        return Err(format!("{text:?}: the count must be between 1 and 1000000"));
    }
    Ok(Rate { count, per_secs })
}

fn class(text: &str) -> Result<TokenClass, String> {
    text.parse()
        .map_err(|e: crate::token::ClaimValueError| e.to_string())
}

impl Policy {
    /// Parses and validates a policy document.
    ///
    /// # Errors
    /// [`PolicyErrors`] listing every problem with its position; name the
    /// file with [`PolicyErrors::with_file`].
    pub fn parse(text: &str) -> Result<Self, PolicyErrors> {
        let fail = |diagnostics| PolicyErrors {
            file: "policy".into(),
            diagnostics,
        };
        let root = yaml::parse(text).map_err(|e| {
            fail(vec![Diagnostic {
                pos: e.pos,
                message: e.message,
            }])
        })?;
        let mut ctx = Ctx::default();
        let policy = read_policy(&mut ctx, &root);
        match policy {
            Some(p) if ctx.diagnostics.is_empty() => Ok(p),
            _ => {
                let mut diagnostics = ctx.diagnostics;
                diagnostics.sort_by_key(|d| d.pos);
                Err(fail(diagnostics))
            }
        }
    }
}

fn read_policy(ctx: &mut Ctx, root: &Node) -> Option<Policy> {
    let top = ctx.fields(root, "the policy", TOP_KEYS, &["trust_domain"]);
    let trust_domain = top.get("trust_domain").and_then(|n| {
        ctx.parsed(n, "trust_domain", |t| {
            format!("spiffe://{t}")
                .parse::<SpiffeId>()
                .map(|_| t.to_owned())
                .map_err(|e| format!("{t:?} is not a trust domain name: {e}"))
        })
    });

    let mut classes = default_classes();
    if let Some(node) = top.get("classes") {
        read_classes(ctx, node, &mut classes);
    }

    let td = trust_domain.as_deref().unwrap_or_default();
    let mut issue = Vec::new();
    if let Some(node) = top.get("issue")
        && let Some(items) = ctx.list(node, "issue")
    {
        for item in items {
            if let Some(rule) = read_issue_rule(ctx, item, td, &classes) {
                issue.push(rule);
            }
        }
    }
    let mut access = Vec::new();
    if let Some(node) = top.get("access")
        && let Some(items) = ctx.list(node, "access")
    {
        for item in items {
            if let Some(rule) = read_access_rule(ctx, item, td) {
                access.push(rule);
            }
        }
    }
    let mut wit = Vec::new();
    if let Some(node) = top.get("wit")
        && let Some(items) = ctx.list(node, "wit")
    {
        for item in items {
            if let Some(rule) = read_wit_rule(ctx, item, td) {
                wit.push(rule);
            }
        }
    }
    Some(Policy {
        trust_domain: trust_domain?,
        classes,
        issue,
        access,
        wit,
    })
}

fn read_classes(
    ctx: &mut Ctx,
    node: &Node,
    classes: &mut std::collections::BTreeMap<TokenClass, ClassLimits>,
) {
    let Value::Map(entries) = &node.value else {
        ctx.error(
            node.pos,
            format!("classes must be a mapping, not {}", node.kind()),
        );
        return;
    };
    for (name, pos, body) in entries {
        let Ok(class) = class(name) else {
            ctx.error(
                *pos,
                format!("unknown token class {name:?} (expected service, partner, admin or user)"),
            );
            continue;
        };
        let f = ctx.fields(body, &format!("class {name}"), CLASS_KEYS, CLASS_KEYS);
        let default_ttl = f
            .get("default_ttl")
            .and_then(|n| ctx.parsed(n, "default_ttl", duration));
        let max_ttl = f
            .get("max_ttl")
            .and_then(|n| ctx.parsed(n, "max_ttl", duration));
        if let (Some(default_ttl), Some(max_ttl)) = (default_ttl, max_ttl) {
            if default_ttl > max_ttl {
                ctx.error(
                    body.pos,
                    format!(
                        "class {name}: default_ttl {} is longer than max_ttl {}",
                        human_duration(default_ttl),
                        human_duration(max_ttl)
                    ),
                );
            }
            classes.insert(
                class,
                ClassLimits {
                    default_ttl,
                    max_ttl,
                },
            );
        }
    }
}

fn id_pattern(ctx: &mut Ctx, node: &Node, what: &str, td: &str) -> Option<IdPattern> {
    let p = ctx.parsed(node, what, IdPattern::parse)?;
    if !td.is_empty() && p.trust_domain() != td {
        ctx.error(
            node.pos,
            format!("{what} {p} is outside the trust domain {td}"),
        );
        return None;
    }
    Some(p)
}

fn scopes(ctx: &mut Ctx, node: &Node, what: &str) -> Option<Scopes> {
    let items = ctx.list(node, what)?;
    let mut out = Vec::new();
    for item in items {
        if let Some(s) = ctx.parsed(item, "scope", |t| {
            t.parse::<Scope>().map_err(|e| e.to_string())
        }) {
            out.push(s);
        }
    }
    match Scopes::new(out) {
        Ok(s) => Some(s),
        Err(e) => {
            ctx.error(node.pos, e.to_string());
            None
        }
    }
}

fn read_issue_rule(
    ctx: &mut Ctx,
    node: &Node,
    td: &str,
    classes: &std::collections::BTreeMap<TokenClass, ClassLimits>,
) -> Option<IssueRule> {
    let f = ctx.fields(node, "issue rule", ISSUE_KEYS, &["from", "to", "scopes"]);
    let from = f.get("from").and_then(|n| id_pattern(ctx, n, "from", td));
    let to = f.get("to").and_then(|n| {
        let p = ctx.parsed(n, "to", AudiencePattern::parse)?;
        if let AudiencePattern::Id(id) = &p
            && !td.is_empty()
            && id.trust_domain() != td
        {
            ctx.error(n.pos, format!("to {p} is outside the trust domain {td}"));
            return None;
        }
        Some(p)
    });
    let granted = f.get("scopes").and_then(|n| scopes(ctx, n, "scopes"));
    if let (Some(s), Some(n)) = (&granted, f.get("scopes"))
        && s.is_empty()
    {
        ctx.error(n.pos, "an issue rule must grant at least one scope");
    }
    let class = match f.get("class") {
        Some(n) => ctx.parsed(n, "class", class),
        None => Some(TokenClass::Service),
    };
    let rate = f.get("rate").and_then(|n| ctx.parsed(n, "rate", rate));
    let max_ttl = f
        .get("max_ttl")
        .and_then(|n| ctx.parsed(n, "max_ttl", duration));
    if let (Some(c), Some(m), Some(n)) = (class, max_ttl, f.get("max_ttl"))
        && let Some(limits) = classes.get(&c)
        && m > limits.max_ttl
    {
        ctx.error(
            n.pos,
            format!(
                "max_ttl {} is longer than class {c}'s max_ttl {}",
                human_duration(m),
                human_duration(limits.max_ttl)
            ),
        );
    }
    Some(IssueRule {
        pos: node.pos,
        from: from?,
        to: to?,
        scopes: granted?,
        class: class?,
        rate: if f.contains_key("rate") {
            Some(rate?)
        } else {
            None
        },
        max_ttl: if f.contains_key("max_ttl") {
            Some(max_ttl?)
        } else {
            None
        },
    })
}

fn read_access_rule(ctx: &mut Ctx, node: &Node, td: &str) -> Option<AccessRule> {
    let f = ctx.fields(node, "access rule", ACCESS_KEYS, ACCESS_KEYS);
    let workload = f
        .get("workload")
        .and_then(|n| id_pattern(ctx, n, "workload", td));
    let mut allow = Vec::new();
    if let Some(n) = f.get("allow")
        && let Some(items) = ctx.list(n, "allow")
    {
        for item in items {
            if let Some(a) = read_allow(ctx, item, td) {
                allow.push(a);
            }
        }
    }
    Some(AccessRule {
        pos: node.pos,
        workload: workload?,
        allow,
    })
}

fn read_allow(ctx: &mut Ctx, node: &Node, td: &str) -> Option<Allow> {
    let f = ctx.fields(node, "allow entry", ALLOW_KEYS, &["from"]);
    let from = f.get("from").and_then(|n| id_pattern(ctx, n, "from", td));
    let mut methods = Vec::new();
    if let Some(n) = f.get("methods")
        && let Some(items) = ctx.list(n, "methods")
    {
        for item in items {
            if let Some(m) = ctx.parsed(item, "method", |t| {
                if !t.is_empty() && t.len() <= 32 && t.bytes().all(|b| b.is_ascii_uppercase()) {
                    Ok(t.to_owned())
                } else {
                    Err(format!(
                        "{t:?} is not an HTTP method in upper case (GET, POST, …)"
                    ))
                }
            }) {
                methods.push(m);
            }
        }
    }
    let mut paths = Vec::new();
    if let Some(n) = f.get("paths")
        && let Some(items) = ctx.list(n, "paths")
    {
        for item in items {
            if let Some(p) = ctx.parsed(item, "path", PathPattern::parse) {
                paths.push(p);
            }
        }
    }
    let required = match f.get("scopes") {
        Some(n) => scopes(ctx, n, "scopes"),
        None => Some(Scopes::default()),
    };
    let rate = f.get("rate").and_then(|n| ctx.parsed(n, "rate", rate));
    Some(Allow {
        pos: node.pos,
        from: from?,
        methods,
        paths,
        scopes: required?,
        rate: if f.contains_key("rate") {
            Some(rate?)
        } else {
            None
        },
    })
}

fn read_wit_rule(ctx: &mut Ctx, node: &Node, td: &str) -> Option<WitRule> {
    let f = ctx.fields(node, "wit rule", WIT_KEYS, &["from"]);
    let from = f.get("from").and_then(|n| id_pattern(ctx, n, "from", td));
    let ttl = match f.get("ttl") {
        Some(n) => ctx.parsed(n, "ttl", wit_ttl),
        None => Some(WIT_DEFAULT_TTL),
    };
    Some(WitRule {
        pos: node.pos,
        from: from?,
        ttl: ttl?,
    })
}

/// A WIT rule's `ttl`: a duration from [`WIT_MIN_TTL`] to [`WIT_MAX_TTL`].
fn wit_ttl(text: &str) -> Result<u64, String> {
    let ttl = duration(text)?;
    if (WIT_MIN_TTL..=WIT_MAX_TTL).contains(&ttl) {
        Ok(ttl)
    } else {
        Err(format!(
            "{text:?} is outside {} to {}: a WIT lives at least a minute and at most a day",
            human_duration(WIT_MIN_TTL),
            human_duration(WIT_MAX_TTL)
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_rates() {
        assert_eq!(duration("5m"), Ok(300));
        assert_eq!(duration("1h30m"), Ok(5400));
        assert!(duration("0s").is_err());
        assert!(duration("500ms").is_err());
        assert!(duration("five").is_err());
        assert_eq!(
            rate("50/s"),
            Ok(Rate {
                count: 50,
                per_secs: 1
            })
        );
        assert_eq!(
            rate("100/m"),
            Ok(Rate {
                count: 100,
                per_secs: 60
            })
        );
        assert!(rate("0/s").is_err());
        assert!(rate("50").is_err());
        assert!(rate("50/d").is_err());
    }

    #[test]
    fn wit_rules_take_a_pattern_and_a_lifetime_of_a_minute_to_a_day() {
        let policy = Policy::parse(
            "trust_domain: td\nwit:\n  - from: spiffe://td/ns/*/sa/*\n  - from: spiffe://td/a\n    ttl: 24h\n",
        )
        .unwrap();
        assert_eq!(policy.wit.len(), 2);
        assert_eq!(policy.wit[0].from.to_string(), "spiffe://td/ns/*/sa/*");
        assert_eq!(policy.wit[0].ttl, 3600, "the default");
        assert_eq!((policy.wit[1].pos.line, policy.wit[1].ttl), (4, 86_400));
        assert_eq!(wit_ttl("1m"), Ok(60));
        for bad in ["59s", "25h", "0s", "soon"] {
            assert!(wit_ttl(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_bad_wit_rule_is_reported_with_its_line() {
        let e = Policy::parse(
            "trust_domain: td\nwit:\n  - from: spiffe://other/a\n  - from: spiffe://td/a\n    ttl: 2d\n    to: spiffe://td/b\n  - ttl: 1h\n",
        )
        .unwrap_err();
        let lines: Vec<(usize, &str)> = e
            .diagnostics
            .iter()
            .map(|d| (d.pos.line, d.message.as_str()))
            .collect();
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(lines[0].0, 3);
        assert!(
            lines[0].1.contains("outside the trust domain td"),
            "{lines:?}"
        );
        assert_eq!(lines[1].0, 5);
        assert!(lines[1].1.contains("at most a day"), "{lines:?}");
        assert_eq!(lines[2].0, 6);
        assert!(
            lines[2].1.contains(r#"unknown key "to" in wit rule"#),
            "{lines:?}"
        );
        assert_eq!(lines[3].0, 7);
        assert!(
            lines[3].1.contains(r#"missing required key "from""#),
            "{lines:?}"
        );
        let e = Policy::parse("trust_domain: td\nwit: spiffe://td/a\n").unwrap_err();
        assert!(e.to_string().contains("wit must be a list"), "{e}");
    }

    #[test]
    fn typos_get_a_suggestion() {
        assert_eq!(suggest("scope", &["from", "to", "scopes"]), Some("scopes"));
        assert_eq!(suggest("zzzzzz", &["from", "to", "scopes"]), None);
    }
}
