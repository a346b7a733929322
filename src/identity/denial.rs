//! Identity denial: an admin cuts a workload off (`tally ctl identities
//! deny`) until it is allowed again. Pure: the entry's change-feed form
//! and the set the broker and every sidecar check callers against.
//!
//! Unlike a revocation, a denial names an identity, not tokens, and never
//! expires: it holds until an `allow` entry for the same identity comes
//! later in the feed. Entries are applied by feed sequence number, so the
//! set ends up the same whichever order two entries for one identity
//! arrive in (a replica that hears of them late, a stream resumed).

use super::SpiffeId;
use std::collections::HashMap;

/// Longest `reason` kept.
pub const MAX_REASON: usize = 200;

/// The gRPC metadata key on a status refusing a denied identity, so a
/// sidecar can tell "cut off" from other refusals without reading text.
pub const DENIED_METADATA: &str = "tally-identity-denied";

/// One deny or allow, as the change feed records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    /// Whom it is about.
    pub spiffe_id: SpiffeId,
    /// Denied from now on (`true`), or allowed again (`false`).
    pub denied: bool,
    /// Why (for people; never a secret).
    pub reason: String,
    /// The admin who decided.
    pub actor: String,
    /// When (Unix seconds).
    pub at: u64,
}

/// A denial record in the change feed that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("identity denial record: {0}")]
pub struct DenialFormatError(String);

impl Denial {
    /// The change-feed form (JSON).
    pub fn to_json(&self) -> String {
        serde_json::json!({
            "spiffe_id": self.spiffe_id.as_str(),
            "denied": self.denied,
            "reason": self.reason,
            "actor": self.actor,
            "at": self.at,
        })
        .to_string()
    }

    /// Reads the change-feed form.
    ///
    /// # Errors
    /// [`DenialFormatError`] naming the field that is wrong.
    pub fn from_json(text: &str) -> Result<Self, DenialFormatError> {
        let bad = |what: &str| DenialFormatError(what.to_owned());
        let v: serde_json::Value = serde_json::from_str(text).map_err(|_| bad("not JSON"))?;
        let text = |k: &str| v[k].as_str().ok_or_else(|| bad(k));
        Ok(Self {
            spiffe_id: text("spiffe_id")?.parse().map_err(|_| bad("spiffe_id"))?,
            denied: v["denied"].as_bool().ok_or_else(|| bad("denied"))?,
            reason: text("reason")?.chars().take(MAX_REASON).collect(),
            actor: text("actor")?.to_owned(),
            at: v["at"].as_u64().ok_or_else(|| bad("at"))?,
        })
    }
}

/// The newest entry per identity, by feed sequence number.
#[derive(Debug, Clone, Default)]
pub struct DenialSet {
    /// Allow entries are kept too (as tombstones), so an older deny that
    /// arrives after them cannot take effect again.
    newest: HashMap<SpiffeId, (u64, Denial)>,
}

impl DenialSet {
    /// Takes in entry `seq` of the feed, unless a later one for the same
    /// identity is already here. Returns whether it changed the set.
    pub fn apply(&mut self, seq: u64, entry: Denial) -> bool {
        match self.newest.get(&entry.spiffe_id) {
            Some((held, _)) if *held >= seq => false,
            _ => {
                self.newest.insert(entry.spiffe_id.clone(), (seq, entry));
                true
            }
        }
    }

    /// The denial in force for `id`, if any.
    pub fn denial(&self, id: &SpiffeId) -> Option<&Denial> {
        self.newest.get(id).map(|(_, d)| d).filter(|d| d.denied)
    }

    /// Whether `id` is denied.
    pub fn is_denied(&self, id: &SpiffeId) -> bool {
        self.denial(id).is_some()
    }

    /// Every denial in force, in no particular order.
    pub fn denied(&self) -> impl Iterator<Item = &Denial> {
        self.newest.values().map(|(_, d)| d).filter(|d| d.denied)
    }

    /// How many identities are denied.
    pub fn len(&self) -> usize {
        self.denied().count()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, denied: bool) -> Denial {
        Denial {
            spiffe_id: id.parse().unwrap(),
            denied,
            reason: "pod compromised".into(),
            actor: "spiffe://td/admin".into(),
            at: 1_000,
        }
    }

    #[test]
    fn a_denial_holds_until_a_later_allow_for_the_same_identity() {
        let a: SpiffeId = "spiffe://td/a".parse().unwrap();
        let b: SpiffeId = "spiffe://td/b".parse().unwrap();
        let mut set = DenialSet::default();
        assert!(set.apply(5, entry("spiffe://td/a", true)));
        assert!(set.is_denied(&a));
        assert!(!set.is_denied(&b), "only the identity named");
        assert!(set.apply(7, entry("spiffe://td/a", false)));
        assert!(!set.is_denied(&a));
        assert!(set.is_empty());
    }

    #[test]
    fn entries_arriving_out_of_order_end_in_the_feeds_order() {
        let a: SpiffeId = "spiffe://td/a".parse().unwrap();
        let mut set = DenialSet::default();
        assert!(set.apply(9, entry("spiffe://td/a", false)));
        assert!(
            !set.apply(4, entry("spiffe://td/a", true)),
            "an older deny after a newer allow changes nothing"
        );
        assert!(!set.is_denied(&a));
        assert!(!set.apply(9, entry("spiffe://td/a", true)), "seen already");
        assert!(set.apply(10, entry("spiffe://td/a", true)));
        assert_eq!(set.denial(&a).unwrap().reason, "pod compromised");
    }

    #[test]
    fn the_feed_form_round_trips_and_broken_records_are_refused() {
        for denied in [true, false] {
            let d = entry("spiffe://td/ns/x/sa/y", denied);
            assert_eq!(Denial::from_json(&d.to_json()).unwrap(), d);
        }
        for bad in [
            "",
            "[]",
            r#"{"spiffe_id":"not an id","denied":true,"reason":"","actor":"","at":1}"#,
            r#"{"spiffe_id":"spiffe://td/a","denied":"yes","reason":"","actor":"","at":1}"#,
            r#"{"spiffe_id":"spiffe://td/a","denied":true,"reason":"","actor":"","at":-1}"#,
            r#"{"spiffe_id":"spiffe://td/a","denied":true,"actor":"","at":1}"#,
        ] {
            assert!(Denial::from_json(bad).is_err(), "{bad}");
        }
    }
}
