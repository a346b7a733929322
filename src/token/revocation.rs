//! Revocations: what a revocation matches, its wire form in the change
//! feed, and the set a verifier checks every token against. Pure.
//!
//! An entry matches one token by `jti`; every token of a SPIFFE ID, of a
//! DPoP key, or of the whole trust domain issued at or before
//! `issued_before` (same second included: a revocation errs on the safe
//! side); or every token a signing key signed, whatever its `iat` (a
//! leaked key can mint tokens claiming any time). It can be dropped after
//! `expires_at`, when no token it matches can still be live, so the set
//! stays small; a signing-key entry is [`NEVER`] dropped, because a token
//! forged with a leaked key carries whatever `exp` the forger chose.

use crate::identity::SpiffeId;
use crate::jose::Jkt;
use crate::token::TokenClaims;
use std::collections::{HashMap, HashSet};

/// Longest `reason` kept.
pub const MAX_REASON: usize = 200;

/// The `expires_at` of an entry that never lapses: the largest time the
/// change feed's JSON, both stores' `BIGINT` and the wire's `int64` hold.
pub const NEVER: u64 = i64::MAX as u64;

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
    /// Every token signed by this key, whenever it claims to be issued.
    Kid(String),
}

/// For logs and messages: `jti X`, `sub spiffe://…`, `jkt X`, `everything`,
/// `kid X` (ids and thumbprints, never a token).
impl std::fmt::Display for RevocationTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Jti(jti) => write!(f, "jti {jti}"),
            Self::Subject(sub) => write!(f, "sub {sub}"),
            Self::Jkt(jkt) => write!(f, "jkt {jkt}"),
            Self::Everything => f.write_str("everything"),
            Self::Kid(kid) => write!(f, "kid {kid}"),
        }
    }
}

impl RevocationTarget {
    /// Its kind (`jti`, `subject`, `jkt`, `everything`, `kid`) and value,
    /// as the feed and the audit log write them.
    pub fn kind_and_value(&self) -> (&'static str, String) {
        match self {
            Self::Jti(j) => ("jti", j.clone()),
            Self::Subject(s) => ("subject", s.to_string()),
            Self::Jkt(k) => ("jkt", k.to_string()),
            Self::Everything => ("everything", String::new()),
            Self::Kid(k) => ("kid", k.clone()),
        }
    }
}

/// The parts of a token a revocation can match.
#[derive(Debug, Clone, Copy)]
pub struct TokenRef<'a> {
    /// Its id.
    pub jti: &'a str,
    /// Its holder.
    pub sub: &'a SpiffeId,
    /// The DPoP key it is bound to (none: a bearer JWT-SVID, which no
    /// DPoP-key revocation covers; its jti, holder or signing key do).
    pub jkt: Option<&'a Jkt>,
    /// The key that signed it.
    pub kid: &'a str,
    /// When it was issued.
    pub iat: u64,
}

impl<'a> From<&'a TokenClaims> for TokenRef<'a> {
    fn from(claims: &'a TokenClaims) -> Self {
        Self {
            jti: &claims.jti,
            sub: &claims.sub,
            jkt: Some(&claims.jkt),
            kid: &claims.kid,
            iat: claims.iat,
        }
    }
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
    /// Whether it covers this token.
    pub fn covers(&self, token: &TokenRef<'_>) -> bool {
        let before = token.iat <= self.issued_before;
        match &self.target {
            RevocationTarget::Jti(j) => j == token.jti,
            RevocationTarget::Subject(s) => before && s == token.sub,
            RevocationTarget::Jkt(k) => before && token.jkt == Some(k),
            RevocationTarget::Everything => before,
            RevocationTarget::Kid(k) => k == token.kid,
        }
    }

    /// The change-feed form (JSON).
    pub fn to_json(&self) -> String {
        let (target, value) = self.target.kind_and_value();
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
            "kid" if !value.is_empty() => RevocationTarget::Kid(value.to_owned()),
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
    kids: HashSet<String>,
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
        self.kids.clear();
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
                RevocationTarget::Kid(k) => {
                    self.kids.insert(k.clone());
                }
            }
        }
    }

    /// Whether `token` is revoked.
    pub fn revoked(&self, token: &TokenClaims) -> bool {
        self.covers(&token.into())
    }

    /// Whether the token with these parts is revoked.
    pub fn covers(&self, token: &TokenRef<'_>) -> bool {
        if self.entries.is_empty() {
            return false;
        }
        let iat = token.iat;
        self.jtis.contains(token.jti)
            || self.kids.contains(token.kid)
            || self.subjects.get(token.sub).is_some_and(|b| iat <= *b)
            || token
                .jkt
                .and_then(|jkt| self.jkts.get(jkt))
                .is_some_and(|b| iat <= *b)
            || self.everything.is_some_and(|b| iat <= b)
    }

    /// Whether a revocation covers the holder `sub` with key `jkt` as of
    /// `since` (Unix seconds): one for that subject, that key, or every
    /// token, whose `issued_before` is at or after `since`. A mesh
    /// connection opened at `since` by that holder ends then: what it was
    /// opened with is revoked.
    pub fn covers_holder(&self, sub: &SpiffeId, jkt: &Jkt, since: u64) -> bool {
        self.subjects.get(sub).is_some_and(|b| since <= *b)
            || self.jkts.get(jkt).is_some_and(|b| since <= *b)
            || self.everything.is_some_and(|b| since <= b)
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

    fn tok<'a>(
        jti: &'a str,
        sub: &'a SpiffeId,
        jkt: &'a Jkt,
        kid: &'a str,
        iat: u64,
    ) -> TokenRef<'a> {
        TokenRef {
            jti,
            sub,
            jkt: Some(jkt),
            kid,
            iat,
        }
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
        assert!(set.covers(&tok("j1", &b, &jkt(9), "k1", 1_500)));
        assert!(!set.covers(&tok("j2", &b, &jkt(9), "k1", 1_500)));
        set.insert(entry(RevocationTarget::Subject(a.clone()), 1_000), 1_000);
        assert!(
            set.covers(&tok("j2", &a, &jkt(9), "k1", 1_000)),
            "same second: covered"
        );
        assert!(
            !set.covers(&tok("j2", &a, &jkt(9), "k1", 1_001)),
            "issued after: not"
        );
        assert!(!set.covers(&tok("j2", &b, &jkt(9), "k1", 900)));
        set.insert(entry(RevocationTarget::Jkt(jkt(1)), 1_000), 1_000);
        assert!(set.covers(&tok("j3", &b, &jkt(1), "k1", 999)));
        assert!(!set.covers(&tok("j3", &b, &jkt(2), "k1", 999)));
        set.insert(entry(RevocationTarget::Everything, 500), 1_000);
        assert!(set.covers(&tok("j4", &b, &jkt(3), "k1", 500)));
        assert!(!set.covers(&tok("j4", &b, &jkt(3), "k1", 501)));
        // A signing key: every token it signed, even one claiming to be
        // issued later (a leaked key can write any iat).
        set.insert(entry(RevocationTarget::Kid("k2".into()), 0), 1_000);
        assert!(set.covers(&tok("j5", &b, &jkt(3), "k2", 9_999)));
        assert!(!set.covers(&tok("j5", &b, &jkt(3), "k1", 9_999)));
        assert_eq!(set.len(), 5);
        // Past their expiry, entries go.
        set.prune(2_000);
        assert!(set.is_empty());
        assert!(!set.covers(&tok("j1", &b, &jkt(9), "k1", 1_500)));
    }

    #[test]
    fn a_holder_is_covered_by_its_subject_key_or_everything_as_of_a_connection() {
        let a = id("spiffe://td/a");
        let b = id("spiffe://td/b");
        let entry = |target, issued_before| Revocation {
            target,
            issued_before,
            expires_at: 2_000,
            reason: "test".into(),
        };
        let mut set = RevocationSet::default();
        set.insert(entry(RevocationTarget::Jti("j1".into()), 1_500), 1_000);
        set.insert(entry(RevocationTarget::Kid("k1".into()), 1_500), 1_000);
        assert!(
            !set.covers_holder(&a, &jkt(1), 1_000),
            "one token or a signing key is not the holder"
        );
        set.insert(entry(RevocationTarget::Subject(a.clone()), 1_000), 1_000);
        assert!(set.covers_holder(&a, &jkt(1), 1_000), "opened by then");
        assert!(!set.covers_holder(&a, &jkt(1), 1_001), "opened after");
        assert!(!set.covers_holder(&b, &jkt(1), 900));
        set.insert(entry(RevocationTarget::Jkt(jkt(2)), 1_000), 1_000);
        assert!(set.covers_holder(&b, &jkt(2), 999));
        assert!(!set.covers_holder(&b, &jkt(3), 999));
        set.insert(entry(RevocationTarget::Everything, 800), 1_000);
        assert!(set.covers_holder(&b, &jkt(3), 800));
        assert!(!set.covers_holder(&b, &jkt(3), 801));
    }

    #[test]
    fn the_feed_form_round_trips_and_hostile_records_are_refused() {
        for target in [
            RevocationTarget::Jti("0001abc".into()),
            RevocationTarget::Subject(id("spiffe://td/ns/x/sa/y")),
            RevocationTarget::Jkt(jkt(7)),
            RevocationTarget::Everything,
            RevocationTarget::Kid("kid-1".into()),
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
            r#"{"target":"kid","value":"","issued_before":1,"expires_at":2,"reason":""}"#,
            r#"{"target":"everything","value":"","issued_before":-1,"expires_at":2,"reason":""}"#,
        ] {
            assert!(Revocation::from_json(bad).is_err(), "{bad}");
        }
    }
}
