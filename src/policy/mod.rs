//! Trust policy: who may get a token for what (`issue:`), token lifetimes
//! by class (`classes:`), what each workload accepts (`access:`), and who
//! may hold a WIMSE Workload Identity Token (`wit:`).
//!
//! Parsing ([`Policy::parse`]) reports every problem at once, each with
//! its line and column. Decisions ([`Policy::decide_issue`],
//! [`Policy::decide_access`], [`Policy::decide_wit`]) and explanations
//! are pure functions of the policy and the request.
//!
//! ```yaml
//! trust_domain: example.org
//! classes:                       # optional; built-in defaults below
//!   service: { default_ttl: 5m, max_ttl: 15m }
//! issue:
//!   - from: spiffe://example.org/ns/shop/sa/checkout   # `*` = one segment
//!     to: spiffe://example.org/ns/pay/sa/payments      # or a URI, exact
//!     scopes: [payments:charge, payments:read]
//!     class: service
//!     rate: 50/s                  # optional, per rule
//!     max_ttl: 10m                # optional, below the class cap
//! access:
//!   - workload: spiffe://example.org/ns/pay/sa/payments
//!     allow:
//!       - from: spiffe://example.org/ns/shop/sa/checkout
//!         methods: [POST]          # optional; any method when absent
//!         paths: [/v1/charges, /v1/charges/*]   # optional; `**` = rest
//!         scopes: [payments:charge]             # all required
//!         rate: 100/s              # optional, per caller
//! wit:                             # optional; nobody without a rule
//!   - from: spiffe://example.org/ns/*/sa/*
//!     ttl: 1h                      # optional, default 1h, 1m to 24h
//! ```

mod decide;
pub mod diff;
mod parse;
mod pattern;
pub mod review;
pub mod yaml;

pub use decide::{
    AccessDenial, AccessGrant, AccessRequest, IssueDenial, IssueGrant, IssueRequest, RuleVerdict,
    WitDenial, WitGrant,
};
pub use parse::{Diagnostic, KEYS as POLICY_KEYS, PolicyErrors};
pub use pattern::{AudiencePattern, IdPattern, PathPattern};
pub use yaml::Pos;

use crate::identity::SpiffeId;
use crate::token::{Scopes, TokenClass};
use std::collections::BTreeMap;

/// Token lifetimes for a class, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassLimits {
    /// Lifetime when the caller asks for none.
    pub default_ttl: u64,
    /// Longest lifetime a token of the class may have.
    pub max_ttl: u64,
}

/// Built-in class lifetimes, used for classes the policy does not list.
pub fn default_classes() -> BTreeMap<TokenClass, ClassLimits> {
    let limits = |d, m| ClassLimits {
        default_ttl: d,
        max_ttl: m,
    };
    BTreeMap::from([
        (TokenClass::Service, limits(300, 900)),
        (TokenClass::Partner, limits(300, 900)),
        (TokenClass::Admin, limits(60, 300)),
        (TokenClass::User, limits(300, 900)),
    ])
}

/// `N/s`, `N/m` or `N/h`: at most `count` per `per_secs`, bursts up to
/// `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per window.
    pub count: u32,
    /// Window length in seconds.
    pub per_secs: u64,
}

/// Who may get which tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRule {
    /// Where the rule starts in the source.
    pub pos: Pos,
    /// Callers.
    pub from: IdPattern,
    /// Audiences.
    pub to: AudiencePattern,
    /// Scopes the rule grants.
    pub scopes: Scopes,
    /// Class of the tokens it issues.
    pub class: TokenClass,
    /// Issuance rate limit for the rule, if any.
    pub rate: Option<Rate>,
    /// A lifetime cap below the class's, if any.
    pub max_ttl: Option<u64>,
}

/// What a workload accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRule {
    /// Where the rule starts.
    pub pos: Pos,
    /// The workload (destination) the rule protects.
    pub workload: IdPattern,
    /// Allowed calls; anything else is denied.
    pub allow: Vec<Allow>,
}

/// One allowed kind of call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allow {
    /// Where it starts.
    pub pos: Pos,
    /// Callers.
    pub from: IdPattern,
    /// Methods (upper case); empty means any.
    pub methods: Vec<String>,
    /// Paths; empty means any.
    pub paths: Vec<PathPattern>,
    /// Scopes the token must carry, all of them.
    pub scopes: Scopes,
    /// Per-caller request rate limit, if any.
    pub rate: Option<Rate>,
}

/// A WIT rule's lifetime when it names none: an hour, seconds.
pub const WIT_DEFAULT_TTL: u64 = 3600;
/// The shortest lifetime a WIT rule may name (a minute), seconds.
pub const WIT_MIN_TTL: u64 = 60;
/// The longest lifetime a WIT rule may name (a day), seconds.
pub const WIT_MAX_TTL: u64 = 86_400;

/// Who may hold a WIMSE Workload Identity Token (a WIT names its holder
/// and binds its key; it carries no audience or scope).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitRule {
    /// Where the rule starts.
    pub pos: Pos,
    /// The holders.
    pub from: IdPattern,
    /// The longest lifetime of a WIT this rule grants, seconds (also the
    /// lifetime when the request names none).
    pub ttl: u64,
}

/// A parsed, validated trust policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// The trust domain every ID in the policy belongs to.
    pub trust_domain: String,
    /// Lifetimes per class (built-in defaults merged with the file's).
    pub classes: BTreeMap<TokenClass, ClassLimits>,
    /// Issuance rules, in file order.
    pub issue: Vec<IssueRule>,
    /// Access rules, in file order.
    pub access: Vec<AccessRule>,
    /// WIT rules, in file order (none: nobody holds a WIT).
    pub wit: Vec<WitRule>,
}

impl std::fmt::Display for Rate {
    /// `N/s`, `N/m` or `N/h`, as the policy spells it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per_secs {
            1 => "s",
            60 => "m",
            _ => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Policy {
    /// The `access:` part of the policy as a policy document of its own
    /// (JSON, which the YAML reader accepts): every rule, or only the rules
    /// protecting `workload`. This is what a sidecar is sent on the Watch
    /// stream: what it enforces, and nothing about who may get which token
    /// (neither `issue:` nor `wit:`).
    pub fn access_document(&self, workload: Option<&SpiffeId>) -> String {
        let rules: Vec<serde_json::Value> = self
            .access
            .iter()
            .filter(|r| workload.is_none_or(|w| r.workload.matches(w)))
            .map(|r| {
                let allow: Vec<serde_json::Value> = r
                    .allow
                    .iter()
                    .map(|a| {
                        let mut entry = serde_json::json!({ "from": a.from.to_string() });
                        if !a.methods.is_empty() {
                            entry["methods"] = a.methods.clone().into();
                        }
                        if !a.paths.is_empty() {
                            entry["paths"] = a
                                .paths
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .into();
                        }
                        entry["scopes"] = a
                            .scopes
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .into();
                        if let Some(rate) = a.rate {
                            entry["rate"] = rate.to_string().into();
                        }
                        entry
                    })
                    .collect();
                serde_json::json!({ "workload": r.workload.to_string(), "allow": allow })
            })
            .collect();
        serde_json::json!({ "trust_domain": self.trust_domain, "access": rules }).to_string()
    }

    /// The longest lifetime any token this policy issues may have, seconds:
    /// the classes' `max_ttl` and the WIT rules' `ttl`. Revocations and
    /// the published keys must outlive every token, WITs included.
    pub fn longest_token_life(&self) -> u64 {
        let classes = self.classes.values().map(|c| c.max_ttl);
        let wits = self.wit.iter().map(|r| r.ttl);
        classes.chain(wits).max().unwrap_or(900)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "\
trust_domain: td
issue:
  - from: spiffe://td/a
    to: spiffe://td/b
    scopes: [s]
access:
  - workload: spiffe://td/b
    allow:
      - from: spiffe://td/a
wit:
  - from: spiffe://td/ns/*/sa/*
    ttl: 6h
";

    #[test]
    fn the_access_document_carries_neither_issue_nor_wit_rules() {
        let policy = Policy::parse(POLICY).unwrap();
        assert_eq!(policy.wit.len(), 1);
        let doc = policy.access_document(None);
        assert!(!doc.contains("wit"), "{doc}");
        assert!(!doc.contains("issue"), "{doc}");
        let sent = Policy::parse(&doc).unwrap();
        assert!(sent.wit.is_empty() && sent.issue.is_empty());
        assert_eq!(sent.access.len(), 1);
        assert_eq!(sent.access[0].workload, policy.access[0].workload);
    }

    #[test]
    fn the_longest_token_life_counts_wit_rules() {
        let policy = Policy::parse(POLICY).unwrap();
        assert_eq!(policy.longest_token_life(), 6 * 3600);
        let without = Policy::parse("trust_domain: td\n").unwrap();
        assert_eq!(without.longest_token_life(), 900, "the classes' 15m");
    }
}
