//! Access review: what the policy grants that nobody used. Pure: the
//! broker hands in the policy and what its inventory saw in the window.
//!
//! Usage is attributed to the rule the *current* policy would use to
//! grant it (the first rule granting every scope the token carried), so
//! the report speaks of today's rules even after edits.

use super::{IssueRequest, Policy, Pos};
use crate::identity::SpiffeId;
use crate::token::{Audience, Scope, Scopes, TokenClass};
use std::collections::{BTreeMap, BTreeSet};

/// Tokens issued for one (holder, audience, scopes) in the window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Usage {
    /// Holder.
    pub sub: SpiffeId,
    /// Audience.
    pub aud: Audience,
    /// Scopes the tokens carried.
    pub scopes: Scopes,
    /// Class the tokens had.
    pub class: TokenClass,
    /// How many.
    pub count: u64,
    /// The longest lifetime among them (seconds).
    pub longest_life: u64,
}

/// An identity and when it was last seen (SVID or token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The workload.
    pub id: SpiffeId,
    /// Last attestation, renewal or token (Unix seconds).
    pub last_seen: u64,
}

/// One issue rule in the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    /// Where it is in the policy.
    pub pos: Pos,
    /// Its `from` and `to`, as written.
    pub from: String,
    /// Audience pattern.
    pub to: String,
}

/// A rule whose tokens never used some of its scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnusedScopes {
    /// The rule.
    pub rule: RuleRef,
    /// Granted, never carried by a token it issued in the window.
    pub scopes: Vec<Scope>,
}

/// Tokens that lived longer than their class now allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TtlFinding {
    /// The class.
    pub class: TokenClass,
    /// Its `max_ttl` in the policy (seconds).
    pub max_ttl: u64,
    /// The longest lifetime seen, or the class's own `max_ttl` when the
    /// finding is that the class allows more than the ceiling.
    pub seen: u64,
    /// How many tokens (0 for a class limit above the ceiling).
    pub tokens: u64,
    /// What is wrong, in words.
    pub what: String,
}

/// The report.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Review {
    /// Issue rules no token in the window needed.
    pub unused_rules: Vec<RuleRef>,
    /// Rules granting scopes no token in the window carried.
    pub unused_scopes: Vec<UnusedScopes>,
    /// Identities not seen since the window started, oldest first.
    pub dormant: Vec<Seen>,
    /// Token lifetimes above what the policy (or the ceiling) allows.
    pub ttl_findings: Vec<TtlFinding>,
    /// Tokens the current policy would not issue at all (granted under an
    /// earlier policy).
    pub ungranted: u64,
}

/// Reviews `policy` against the window's `usage` and `identities` last
/// seen; identities seen before `window_start` are dormant; classes whose
/// `max_ttl` exceeds `ttl_ceiling` are reported too.
pub fn review(
    policy: &Policy,
    usage: &[Usage],
    identities: &[Seen],
    window_start: u64,
    ttl_ceiling: u64,
) -> Review {
    let mut used_rules = BTreeSet::new();
    let mut carried: BTreeMap<usize, BTreeSet<Scope>> = BTreeMap::new();
    let mut report = Review::default();
    let mut too_long: BTreeMap<TokenClass, (u64, u64)> = BTreeMap::new();
    for u in usage {
        let request = IssueRequest {
            from: &u.sub,
            audience: &u.aud,
            scopes: &u.scopes,
            ttl: None,
        };
        match policy.decide_issue(&request) {
            Ok(grant) => {
                used_rules.insert(grant.rule);
                carried
                    .entry(grant.rule)
                    .or_default()
                    .extend(u.scopes.iter().cloned());
            }
            Err(_) => report.ungranted += u.count,
        }
        let max = policy.classes.get(&u.class).map_or(0, |c| c.max_ttl);
        if max > 0 && u.longest_life > max {
            let e = too_long.entry(u.class).or_insert((0, 0));
            e.0 = e.0.max(u.longest_life);
            e.1 += u.count;
        }
    }
    for (i, rule) in policy.issue.iter().enumerate() {
        let reference = RuleRef {
            pos: rule.pos,
            from: rule.from.to_string(),
            to: rule.to.to_string(),
        };
        if !used_rules.contains(&i) {
            report.unused_rules.push(reference);
            continue;
        }
        let seen = carried.get(&i);
        let unused: Vec<Scope> = rule
            .scopes
            .iter()
            .filter(|s| seen.is_none_or(|c| !c.contains(*s)))
            .cloned()
            .collect();
        if !unused.is_empty() {
            report.unused_scopes.push(UnusedScopes {
                rule: reference,
                scopes: unused,
            });
        }
    }
    report.dormant = identities
        .iter()
        .filter(|s| s.last_seen < window_start)
        .cloned()
        .collect();
    report.dormant.sort_by_key(|s| s.last_seen);
    for (class, (seen, tokens)) in too_long {
        let max_ttl = policy.classes.get(&class).map_or(0, |c| c.max_ttl);
        report.ttl_findings.push(TtlFinding {
            class,
            max_ttl,
            seen,
            tokens,
            what: format!(
                "{tokens} {class} tokens lived up to {seen}s, above the class's max_ttl of {max_ttl}s (issued under an earlier policy)"
            ),
        });
    }
    for (class, limits) in &policy.classes {
        if limits.max_ttl > ttl_ceiling {
            report.ttl_findings.push(TtlFinding {
                class: *class,
                max_ttl: limits.max_ttl,
                seen: limits.max_ttl,
                tokens: 0,
                what: format!(
                    "class {class} allows tokens of {}s, above the review ceiling of {ttl_ceiling}s",
                    limits.max_ttl
                ),
            });
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "\
trust_domain: td
classes:
  partner: { default_ttl: 5m, max_ttl: 2h }
issue:
  - from: spiffe://td/ns/shop/sa/checkout
    to: spiffe://td/ns/pay/sa/payments
    scopes: [payments:charge, payments:read, payments:refund]
  - from: spiffe://td/ns/ops/sa/*
    to: spiffe://td/ns/pay/sa/payments
    scopes: [payments:read]
";

    fn usage(sub: &str, scopes: &str, count: u64, life: u64) -> Usage {
        Usage {
            sub: sub.parse().unwrap(),
            aud: "spiffe://td/ns/pay/sa/payments".parse().unwrap(),
            scopes: scopes.parse().unwrap(),
            class: TokenClass::Service,
            count,
            longest_life: life,
        }
    }

    #[test]
    fn unused_rules_scopes_identities_and_lifetimes_are_reported() {
        let policy = Policy::parse(POLICY).unwrap();
        let used = [
            usage(
                "spiffe://td/ns/shop/sa/checkout",
                "payments:charge",
                40,
                300,
            ),
            usage("spiffe://td/ns/shop/sa/checkout", "payments:read", 2, 3_600),
            // Granted under an earlier policy: no rule grants it now.
            usage("spiffe://td/ns/old/sa/batch", "payments:read", 3, 300),
        ];
        let seen = [
            Seen {
                id: "spiffe://td/ns/shop/sa/checkout".parse().unwrap(),
                last_seen: 2_000,
            },
            Seen {
                id: "spiffe://td/ns/ops/sa/cron".parse().unwrap(),
                last_seen: 500,
            },
        ];
        let r = review(&policy, &used, &seen, 1_000, 3_600);
        assert_eq!(r.unused_rules.len(), 1);
        assert_eq!(r.unused_rules[0].pos.line, 8);
        assert_eq!(r.unused_rules[0].from, "spiffe://td/ns/ops/sa/*");
        assert_eq!(r.unused_scopes.len(), 1);
        assert_eq!(
            r.unused_scopes[0].scopes,
            vec!["payments:refund".parse::<Scope>().unwrap()]
        );
        assert_eq!(r.dormant.len(), 1);
        assert_eq!(r.dormant[0].id.as_str(), "spiffe://td/ns/ops/sa/cron");
        assert_eq!(r.ungranted, 3);
        // Service tokens of an hour (max 15m now), and the partner class
        // allowing 2h against a 1h ceiling.
        assert_eq!(r.ttl_findings.len(), 2, "{:?}", r.ttl_findings);
        assert_eq!(r.ttl_findings[0].class, TokenClass::Service);
        assert_eq!(
            (r.ttl_findings[0].seen, r.ttl_findings[0].tokens),
            (3_600, 2)
        );
        assert_eq!(r.ttl_findings[1].class, TokenClass::Partner);
    }

    #[test]
    fn a_fully_used_policy_has_nothing_to_report() {
        let policy = Policy::parse(POLICY).unwrap();
        let used = [
            usage(
                "spiffe://td/ns/shop/sa/checkout",
                "payments:charge payments:read payments:refund",
                1,
                60,
            ),
            usage("spiffe://td/ns/ops/sa/cron", "payments:read", 1, 60),
        ];
        let r = review(&policy, &used, &[], 0, 86_400);
        assert_eq!(r, Review::default());
    }
}
