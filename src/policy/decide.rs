//! Decisions and explanations. Pure functions of the policy and the
//! request.

use super::{Policy, Pos, Rate};
use crate::identity::SpiffeId;
use crate::token::{Audience, Scope, Scopes, TokenClass};
use std::fmt;

/// A token request, as the broker sees it after authentication.
#[derive(Debug, Clone, Copy)]
pub struct IssueRequest<'a> {
    /// The caller, from its mTLS certificate.
    pub from: &'a SpiffeId,
    /// The audience asked for.
    pub audience: &'a Audience,
    /// Scopes asked for; empty asks for everything the rule grants.
    pub scopes: &'a Scopes,
    /// Lifetime asked for, in seconds; `None` for the class default.
    pub ttl: Option<u64>,
}

/// What the policy allows for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueGrant {
    /// Index of the rule in `issue:`.
    pub rule: usize,
    /// Where the rule is.
    pub pos: Pos,
    /// Scopes to put in the token.
    pub scopes: Scopes,
    /// Token class.
    pub class: TokenClass,
    /// Lifetime, capped by the class and the rule.
    pub ttl: u64,
    /// The rule's rate limit.
    pub rate: Option<Rate>,
}

/// Why a token request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IssueDenial {
    /// No rule lets this caller have tokens for this audience.
    #[error("no issue rule lets {from} get tokens for {audience}")]
    NoRule {
        /// Caller.
        from: String,
        /// Audience.
        audience: String,
    },
    /// Rules match, but none grants every requested scope.
    #[error("scope {scope} is not granted to {from} for {audience}")]
    ScopeNotGranted {
        /// The first scope no matching rule grants with the others.
        scope: Scope,
        /// Caller.
        from: String,
        /// Audience.
        audience: String,
    },
}

/// How one rule judged a request, for `policy explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleVerdict {
    /// Where the rule is.
    pub pos: Pos,
    /// Whether it would allow the request.
    pub allows: bool,
    /// Why, in words.
    pub reason: String,
}

impl fmt::Display for RuleVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let verdict = if self.allows { "ALLOWS" } else { "skips " };
        write!(f, "line {}: {verdict} {}", self.pos.line, self.reason)
    }
}

impl Policy {
    /// Decides a token request: the first rule (in file order) whose `from`
    /// and `to` match and that grants every requested scope wins.
    ///
    /// # Errors
    /// [`IssueDenial`] saying why nothing matched.
    pub fn decide_issue(&self, req: &IssueRequest<'_>) -> Result<IssueGrant, IssueDenial> {
        let mut matched_any = false;
        for (index, rule) in self.issue.iter().enumerate() {
            if !rule.from.matches(req.from) || !rule.to.matches(req.audience) {
                continue;
            }
            matched_any = true;
            if !rule.scopes.contains_all(req.scopes) {
                continue;
            }
            let scopes = if req.scopes.is_empty() {
                rule.scopes.clone()
            } else {
                req.scopes.clone()
            };
            // Parsing merges the built-in defaults, so every class has
            // limits; should one be missing, use the strictest (admin's).
            let limits = self
                .classes
                .get(&rule.class)
                .copied()
                .unwrap_or(super::ClassLimits {
                    default_ttl: 60,
                    max_ttl: 300,
                });
            let cap = rule
                .max_ttl
                .map_or(limits.max_ttl, |m| m.min(limits.max_ttl));
            let ttl = req
                .ttl
                .filter(|t| *t > 0)
                .unwrap_or(limits.default_ttl)
                .min(cap);
            return Ok(IssueGrant {
                rule: index,
                pos: rule.pos,
                scopes,
                class: rule.class,
                ttl,
                rate: rule.rate,
            });
        }
        let from = req.from.to_string();
        let audience = req.audience.to_string();
        if !matched_any {
            return Err(IssueDenial::NoRule { from, audience });
        }
        // Name a scope that no matching rule grants, or failing that the
        // first one of the request (no single rule grants the combination).
        let matching: Vec<&Scopes> = self
            .issue
            .iter()
            .filter(|r| r.from.matches(req.from) && r.to.matches(req.audience))
            .map(|r| &r.scopes)
            .collect();
        let scope = req
            .scopes
            .iter()
            .find(|s| matching.iter().all(|granted| !granted.contains(s)))
            .or_else(|| req.scopes.iter().next())
            .cloned()
            .unwrap_or_else(|| unreachable!("an empty request is granted by any matching rule"));
        Err(IssueDenial::ScopeNotGranted {
            scope,
            from,
            audience,
        })
    }

    /// How each issue rule judges a request, in file order.
    pub fn explain_issue(&self, req: &IssueRequest<'_>) -> Vec<RuleVerdict> {
        self.issue
            .iter()
            .map(|rule| {
                let (allows, reason) = if !rule.from.matches(req.from) {
                    (
                        false,
                        format!("from {} does not match {}", rule.from, req.from),
                    )
                } else if !rule.to.matches(req.audience) {
                    (
                        false,
                        format!("to {} does not match {}", rule.to, req.audience),
                    )
                } else if let Some(missing) = req.scopes.iter().find(|s| !rule.scopes.contains(s)) {
                    (
                        false,
                        format!("does not grant scope {missing} (grants: {})", rule.scopes),
                    )
                } else {
                    (
                        true,
                        format!(
                            "from and to match; grants {} as class {}",
                            rule.scopes, rule.class
                        ),
                    )
                };
                RuleVerdict {
                    pos: rule.pos,
                    allows,
                    reason,
                }
            })
            .collect()
    }
}

/// What the policy allows a caller asking for a WIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WitGrant {
    /// Index of the rule in `wit:`.
    pub rule: usize,
    /// Where the rule is.
    pub pos: Pos,
    /// Lifetime, seconds: the one asked for capped by the rule's `ttl`
    /// (the rule's when none is asked for).
    pub ttl: u64,
}

/// Why a WIT is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WitDenial {
    /// No `wit:` rule names this caller.
    #[error("no wit rule lets {from} hold a Workload Identity Token")]
    NoRule {
        /// Caller.
        from: String,
    },
}

impl Policy {
    /// Decides a WIT request: the first rule (in file order) whose `from`
    /// matches the caller grants it, for `ttl` (0 or `None`: the rule's)
    /// capped by the rule's `ttl`.
    ///
    /// # Errors
    /// [`WitDenial::NoRule`] when no rule names the caller.
    pub fn decide_wit(&self, from: &SpiffeId, ttl: Option<u64>) -> Result<WitGrant, WitDenial> {
        self.wit
            .iter()
            .enumerate()
            .find(|(_, rule)| rule.from.matches(from))
            .map(|(index, rule)| WitGrant {
                rule: index,
                pos: rule.pos,
                ttl: ttl.filter(|t| *t > 0).map_or(rule.ttl, |t| t.min(rule.ttl)),
            })
            .ok_or_else(|| WitDenial::NoRule {
                from: from.to_string(),
            })
    }
}

/// An inbound call, as the destination's sidecar sees it after verifying
/// the token and proof.
#[derive(Debug, Clone, Copy)]
pub struct AccessRequest<'a> {
    /// This workload (the destination).
    pub workload: &'a SpiffeId,
    /// The caller (the token's `sub`).
    pub caller: &'a SpiffeId,
    /// HTTP method.
    pub method: &'a str,
    /// Normalized request path, without query.
    pub path: &'a str,
    /// The token's scopes.
    pub scopes: &'a Scopes,
}

/// The allow entry that admitted a call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessGrant {
    /// Where the entry is.
    pub pos: Pos,
    /// Its per-caller rate limit.
    pub rate: Option<Rate>,
}

/// Why a call is refused (403, or 403 `insufficient_scope`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AccessDenial {
    /// The policy has no access rule for this workload: default deny.
    #[error("no access rule protects {0}; every call is denied")]
    NoRuleForWorkload(String),
    /// No allow entry names this caller.
    #[error("{0} may not call this workload")]
    CallerNotAllowed(String),
    /// The caller is allowed, but not with this method.
    #[error("method {0} is not allowed for this caller")]
    MethodNotAllowed(String),
    /// The caller is allowed, but not on this path.
    #[error("path {0} is not allowed for this caller")]
    PathNotAllowed(String),
    /// Everything matches but the token lacks a required scope.
    #[error("token lacks the required scope {0}")]
    MissingScope(Scope),
}

impl Policy {
    /// Decides an inbound call: the first allow entry (of the access rules
    /// for this workload, in file order) that matches caller, method, path
    /// and scopes admits it. Anything else is denied.
    ///
    /// # Errors
    /// [`AccessDenial`] with the most specific reason found.
    pub fn decide_access(&self, req: &AccessRequest<'_>) -> Result<AccessGrant, AccessDenial> {
        let allows: Vec<&super::Allow> = self
            .access
            .iter()
            .filter(|r| r.workload.matches(req.workload))
            .flat_map(|r| &r.allow)
            .collect();
        if allows.is_empty() {
            return Err(AccessDenial::NoRuleForWorkload(req.workload.to_string()));
        }
        let mut denial = AccessDenial::CallerNotAllowed(req.caller.to_string());
        for allow in allows {
            if !allow.from.matches(req.caller) {
                continue;
            }
            if !allow.methods.is_empty() && !allow.methods.iter().any(|m| m == req.method) {
                if matches!(denial, AccessDenial::CallerNotAllowed(_)) {
                    denial = AccessDenial::MethodNotAllowed(req.method.to_owned());
                }
                continue;
            }
            if !allow.paths.is_empty() && !allow.paths.iter().any(|p| p.matches(req.path)) {
                if matches!(
                    denial,
                    AccessDenial::CallerNotAllowed(_) | AccessDenial::MethodNotAllowed(_)
                ) {
                    denial = AccessDenial::PathNotAllowed(req.path.to_owned());
                }
                continue;
            }
            if let Some(missing) = allow.scopes.iter().find(|s| !req.scopes.contains(s)) {
                denial = AccessDenial::MissingScope(missing.clone());
                continue;
            }
            return Ok(AccessGrant {
                pos: allow.pos,
                rate: allow.rate,
            });
        }
        Err(denial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: &str = "\
trust_domain: td
wit:
  - from: spiffe://td/ns/shop/sa/checkout
    ttl: 10m
  - from: spiffe://td/ns/*/sa/*
";

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn the_first_wit_rule_naming_the_caller_grants_and_caps_the_lifetime() {
        let policy = Policy::parse(POLICY).unwrap();
        let checkout = id("spiffe://td/ns/shop/sa/checkout");
        let grant = policy.decide_wit(&checkout, None).unwrap();
        assert_eq!((grant.rule, grant.pos.line, grant.ttl), (0, 3, 600));
        assert_eq!(policy.decide_wit(&checkout, Some(0)).unwrap().ttl, 600);
        assert_eq!(policy.decide_wit(&checkout, Some(90)).unwrap().ttl, 90);
        assert_eq!(policy.decide_wit(&checkout, Some(7200)).unwrap().ttl, 600);
        let other = policy
            .decide_wit(&id("spiffe://td/ns/pay/sa/payments"), Some(7200))
            .unwrap();
        assert_eq!((other.rule, other.ttl), (1, 3600));
    }

    #[test]
    fn a_caller_no_wit_rule_names_is_refused_and_so_is_everyone_without_rules() {
        let policy = Policy::parse(POLICY).unwrap();
        let vm = id("spiffe://td/vm/batch");
        assert_eq!(
            policy.decide_wit(&vm, None),
            Err(WitDenial::NoRule {
                from: vm.to_string()
            })
        );
        let none = Policy::parse("trust_domain: td\n").unwrap();
        let e = none
            .decide_wit(&id("spiffe://td/ns/shop/sa/checkout"), None)
            .unwrap_err();
        assert!(e.to_string().contains("no wit rule"), "{e}");
    }
}
