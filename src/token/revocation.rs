//! Revocations: what a revocation matches, its wire form in the change
//! feed, and the set a verifier checks every token against. Pure.
//!
//! An entry matches one token by `jti`, or every token of a SPIFFE ID, of
//! a DPoP key, or of the whole trust domain issued at or before
//! `issued_before` (same second included: a revocation errs on the safe
//! side). It can be dropped after `expires_at`, when no token it matches
//! can still be live, so the set stays small.

use crate::identity::SpiffeId;
use crate::jose::Jkt;
use crate::token::TokenClaims;
use std::collections::{HashMap, HashSet};

/// Longest `reason` kept.
pub const MAX_REASON: usize = 200;

/// What a revocation covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationTarget {
    /// One token.
    Jti(String),
    /// Every token of this workload issued up to `issued_before`.
    Subject(SpiffeId),
    /// Every token bound to this DPoP key issued up to `issued_before`.
    Jkt(Jkt),
    /// Every token issued up to `issued_before`.
    Everything,
}

/// One revocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// What it covers.
    pub target: RevocationTarget,
    /// Tokens issued at or before this (Unix seconds) are covered.
    pub issued_before: u64,
    /// After this no token it matches can be live.
    pub expires_at: u64,
    /// Why (for people; never a token).
    pub reason: String,
}

/// A revocation in the change feed that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("revocation record: {0}")]
pub struct RevocationFormatError(String);

impl Revocation {
    /// Whether it covers the token with these parts.
    pub fn covers(&self, jti: &str, sub: &SpiffeId, jkt: &Jkt, iat: u64) -> bool {
        let before = iat <= self.issued_before;
        match &self.target {
            RevocationTarget::Jti(j) => j == jti,
            RevocationTarget::Subject(s) => before && s == sub,
            RevocationTarget::Jkt(k) => before && k == jkt,
            RevocationTarget::Everything => before,
        }
    }

    /// The change-feed form (JSON).
    pub fn to_json(&self) -> String {
        let (target, value) = match &self.target {
            RevocationTarget::Jti(j) => ("jti", j.clone()),
            RevocationTarget::Subject(s) => ("subject", s.to_string()),
            RevocationTarget::Jkt(k) => ("jkt", k.to_string()),
            RevocationTarget::Everything => ("everything", String::new()),
        };
        serde_json::json!({
            "target": target,
            "value": value,
            "issued_before": self.issued_before,
            "expires_at": self.expires_at,
            "reason": self.reason,
        })
        .to_string()
    }

    /// Reads the change-feed form.
    ///
    /// # Errors
    /// [`RevocationFormatError`] naming what is wrong.
    pub fn from_json(text: &str) -> Result<Self, RevocationFormatError> {
        let bad = |what: &str| RevocationFormatError(what.to_owned());
        let v: serde_json::Value = serde_json::from_str(text).map_err(|_| bad("not JSON"))?;
        let field = |k: &str| v[k].as_str().ok_or_else(|| bad(k));
        let value = field("value")?;
        let target = match field("target")? {
            "jti" if !value.is_empty() => RevocationTarget::Jti(value.to_owned()),
            "subject" => RevocationTarget::Subject(value.parse().map_err(|_| bad("subject"))?),
            "jkt" => RevocationTarget::Jkt(value.parse().map_err(|_| bad("jkt"))?),
            "everything" => RevocationTarget::Everything,
            _ => return Err(bad("target")),
        };
        Ok(Self {
            target,
            issued_before: v["issued_before"]
                .as_u64()
                .ok_or_else(|| bad("issued_before"))?,
            expires_at: v["expires_at"].as_u64().ok_or_else(|| bad("expires_at"))?,
            reason: field("reason")?.chars().take(MAX_REASON).collect(),
        })
    }
}

/// The revocations a verifier enforces, indexed for a check per request.
#[derive(Debug, Clone, Default)]
pub struct RevocationSet {
    entries: Vec<Revocation>,
    jtis: HashSet<String>,
    /// Latest `issued_before` per subject / key.
    subjects: HashMap<SpiffeId, u64>,
    jkts: HashMap<Jkt, u64>,
    everything: Option<u64>,
}

impl RevocationSet {
    /// Adds an entry (and drops those over at `now`).
    pub fn insert(&mut self, revocation: Revocation, now: u64) {
        self.entries.push(revocation);
        self.prune(now);
    }

    /// Drops entries that can no longer match a live token.
    pub fn prune(&mut self, now: u64) {
        self.entries.retain(|r| r.expires_at > now);
        self.jtis.clear();
        self.subjects.clear();
        self.jkts.clear();
        self.everything = None;
        for r in &self.entries {
            let at = r.issued_before;
            match &r.target {
                RevocationTarget::Jti(j) => {
                    self.jtis.insert(j.clone());
                }
                RevocationTarget::Subject(s) => {
                    let e = self.subjects.entry(s.clone()).or_insert(at);
                    *e = (*e).max(at);
                }
                RevocationTarget::Jkt(k) => {
                    let e = self.jkts.entry(*k).or_insert(at);
                    *e = (*e).max(at);
                }
                RevocationTarget::Everything => {
                    self.everything = Some(self.everything.map_or(at, |e| e.max(at)));
                }
            }
        }
    }

    /// Whether `token` is revoked.
    pub fn revoked(&self, token: &TokenClaims) -> bool {
        self.covers(&token.jti, &token.sub, &token.jkt, token.iat)
    }

    /// Whether the token with these parts is revoked.
    pub fn covers(&self, jti: &str, sub: &SpiffeId, jkt: &Jkt, iat: u64) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        self.jtis.contains(jti)
            || self.subjects.get(sub).is_some_and(|b| iat <= *b)
            || self.jkts.get(jkt).is_some_and(|b| iat <= *b)
            || self.everything.is_some_and(|b| iat <= b)
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn jkt(n: u8) -> Jkt {
        crate::jose::b64::encode([n; 32]).parse().unwrap()
    }

    #[test]
    fn each_kind_matches_what_it_says_and_nothing_else() {
        let a = id("spiffe://td/a");
        let b = id("spiffe://td/b");
        let mut set = RevocationSet::default();
        let entry = |target, issued_before| Revocation {
            target,
            issued_before,
            expires_at: 2_000,
            reason: "test".into(),
        };
        set.insert(entry(RevocationTarget::Jti("j1".into()), 0), 1_000);
        assert!(set.covers("j1", &b, &jkt(9), 1_500));
        assert!(!set.covers("j2", &b, &jkt(9), 1_500));
        set.insert(entry(RevocationTarget::Subject(a.clone()), 1_000), 1_000);
        assert!(set.covers("j2", &a, &jkt(9), 1_000), "same second: covered");
        assert!(!set.covers("j2", &a, &jkt(9), 1_001), "issued after: not");
        assert!(!set.covers("j2", &b, &jkt(9), 900));
        set.insert(entry(RevocationTarget::Jkt(jkt(1)), 1_000), 1_000);
        assert!(set.covers("j3", &b, &jkt(1), 999));
        assert!(!set.covers("j3", &b, &jkt(2), 999));
        set.insert(entry(RevocationTarget::Everything, 500), 1_000);
        assert!(set.covers("j4", &b, &jkt(3), 500));
        assert!(!set.covers("j4", &b, &jkt(3), 501));
        assert_eq!(set.len(), 4);
        // Past their expiry, entries go.
        set.prune(2_000);
        assert!(set.is_empty());
        assert!(!set.covers("j1", &b, &jkt(9), 1_500));
    }

    #[test]
    fn the_feed_form_round_trips_and_hostile_records_are_refused() {
        for target in [
            RevocationTarget::Jti("0001abc".into()),
            RevocationTarget::Subject(id("spiffe://td/ns/x/sa/y")),
            RevocationTarget::Jkt(jkt(7)),
            RevocationTarget::Everything,
        ] {
            let r = Revocation {
                target,
                issued_before: 10,
                expires_at: 20,
                reason: "leaked".into(),
            };
            assert_eq!(Revocation::from_json(&r.to_json()).unwrap(), r);
        }
        for bad in [
            "",
            "[]",
            r#"{"target":"jti","value":"","issued_before":1,"expires_at":2,"reason":""}"#,
            r#"{"target":"subject","value":"not an id","issued_before":1,"expires_at":2,"reason":""}"#,
            r#"{"target":"nobody","value":"x","issued_before":1,"expires_at":2,"reason":""}"#,
            r#"{"target":"everything","value":"","issued_before":-1,"expires_at":2,"reason":""}"#,
        ] {
            assert!(Revocation::from_json(bad).is_err(), "{bad}");
        }
    }
}
