//! Audit events: what happened, to whom, with what outcome, as one JSON
//! object per line. The store keeps every record (with a sequence number)
//! and the broker appends the same line to a JSON-lines file for log
//! shippers.
//!
//! Never a raw token or key: a token appears as its `jti` and as
//! HMAC-SHA256(token) under the deployment's token-hash key
//! (`token_hmac`), a join token as its SHA-256 hash.

mod kind;

pub use kind::AuditKind;
use serde_json::{Map, Value};

/// How it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused (policy, bad credential, rate limit): the `reason` field
    /// says why.
    Denied,
    /// Failed inside the broker.
    Error,
}

impl Outcome {
    /// The `outcome` field of the record.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

/// One event before the store gives it a sequence number.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEvent {
    /// When (Unix seconds).
    pub at: u64,
    /// What.
    pub kind: AuditKind,
    /// How it ended.
    pub outcome: Outcome,
    /// Who did it (the caller's SPIFFE ID), when known.
    pub actor: Option<String>,
    /// Details: audience, scopes, jti, token_hmac, reason, …
    pub fields: Map<String, Value>,
}

impl AuditEvent {
    /// An event of `kind` at `at`.
    pub fn new(kind: AuditKind, outcome: Outcome, at: u64) -> Self {
        Self {
            at,
            kind,
            outcome,
            actor: None,
            fields: Map::new(),
        }
    }

    /// Sets who did it.
    #[must_use]
    pub fn actor(mut self, actor: impl ToString) -> Self {
        self.actor = Some(actor.to_string());
        self
    }

    /// Adds a detail.
    #[must_use]
    pub fn field(mut self, name: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(name.to_owned(), value.into());
        self
    }

    /// The JSON line for this event as record `seq` following a record
    /// whose line hashes to `prev` (no trailing newline). The fixed fields
    /// come first and cannot be overwritten by details.
    pub fn to_line(&self, seq: u64, prev: &ChainHash) -> String {
        let mut record = Map::new();
        record.insert("seq".into(), seq.into());
        record.insert("prev".into(), hex(&prev.0).into());
        record.insert("at".into(), self.at.into());
        record.insert("time".into(), rfc3339(self.at).into());
        record.insert("kind".into(), self.kind.as_str().into());
        record.insert("outcome".into(), self.outcome.as_str().into());
        if let Some(actor) = &self.actor {
            record.insert("actor".into(), actor.clone().into());
        }
        for (k, v) in &self.fields {
            record.entry(k.clone()).or_insert_with(|| v.clone());
        }
        Value::Object(record).to_string()
    }
}

/// One stored audit record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// Position in the log, from 1, without gaps.
    pub seq: u64,
    /// When (Unix seconds).
    pub at: u64,
    /// The `kind` field.
    pub kind: String,
    /// The whole record as a JSON line.
    pub line: String,
}

/// SHA-256 of one record's line: what the next record carries as `prev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// What the first record of a chain carries as `prev`.
    pub const GENESIS: Self = Self([0; 32]);

    /// The hash of a record's line, exactly as stored.
    pub fn of(line: &str) -> Self {
        let d = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, line.as_bytes());
        let mut h = [0; 32];
        h.copy_from_slice(d.as_ref());
        Self(h)
    }
}

impl std::fmt::Display for ChainHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

/// Longest audit line a verifier reads; a record is a few hundred bytes.
pub const MAX_LINE: usize = 64 * 1024;

/// Where a chain stops holding, naming the first record that is not what
/// was written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ChainBreak {
    /// A line that is not an audit record at all.
    #[error("line {line}: not an audit record ({why})")]
    Unreadable {
        /// 1-based position in the input.
        line: u64,
        /// What is wrong with it.
        why: String,
    },
    /// Records are missing or out of order: `found` came where `expected`
    /// should have.
    #[error(
        "record {expected} is missing or out of place: found record {found} where {expected} belongs (deleted or reordered)"
    )]
    Sequence {
        /// The sequence number the chain needed next.
        expected: u64,
        /// The one that came.
        found: u64,
    },
    /// Record `seq` does not hash to what its successor carries: it was
    /// edited after it was written (or the successor is not the record
    /// that was written after it).
    #[error(
        "record {seq} was altered: its hash is not the `prev` that record {next} carries (or record {next} is not the one written after it)"
    )]
    Altered {
        /// The altered record.
        seq: u64,
        /// The record that exposes it.
        next: u64,
    },
    /// The stored columns of a record disagree with its line.
    #[error("record {seq} was altered: its stored {column} does not match its line")]
    Column {
        /// The record.
        seq: u64,
        /// `at` or `kind`.
        column: &'static str,
    },
    /// The chain ends somewhere other than the head the store recorded
    /// with its last write: records were cut off the end or the last one
    /// was edited.
    #[error(
        "the log ends at record {found} ({found_hash}), but its last write was record {head} ({head_hash}): {why}"
    )]
    Head {
        /// Where the records end.
        found: u64,
        /// The hash of the last record read.
        found_hash: ChainHash,
        /// Where the store says the log ends.
        head: u64,
        /// The hash it recorded.
        head_hash: ChainHash,
        /// Which of the two it looks like.
        why: &'static str,
    },
}

/// Checks records one at a time, in order, against the chain: each
/// record's `seq` follows the previous one and its `prev` is the SHA-256
/// of the previous line. Feed it a store's records page by page or a
/// JSON-lines file line by line.
#[derive(Debug, Clone)]
pub struct ChainVerifier {
    next_seq: u64,
    prev: ChainHash,
    line: u64,
    checked: u64,
}

impl ChainVerifier {
    /// A verifier for a chain whose first record is `first_seq`, carrying
    /// [`ChainHash::GENESIS`].
    pub fn new(first_seq: u64) -> Self {
        Self {
            next_seq: first_seq,
            prev: ChainHash::GENESIS,
            line: 0,
            checked: 0,
        }
    }

    /// A verifier for a chain whose first record is `first_seq`, carrying
    /// `anchor` (the hash of the last record archived before it).
    pub fn anchored(first_seq: u64, anchor: ChainHash) -> Self {
        Self {
            prev: anchor,
            ..Self::new(first_seq)
        }
    }

    /// A verifier for a file that may start mid-chain (rotated logs): the
    /// first record is taken as given, and the chain is checked from it.
    pub fn from_first_record() -> Self {
        Self {
            next_seq: 0,
            prev: ChainHash::GENESIS,
            line: 0,
            checked: 0,
        }
    }

    /// Checks the next record's line; returns its sequence number.
    ///
    /// # Errors
    /// [`ChainBreak`] naming the first record that does not hold.
    pub fn push(&mut self, line: &str) -> Result<u64, ChainBreak> {
        self.line += 1;
        let unreadable = |why: &str| ChainBreak::Unreadable {
            line: self.line,
            why: why.to_owned(),
        };
        if line.len() > MAX_LINE {
            return Err(unreadable("longer than 64 KiB"));
        }
        let record: Value =
            serde_json::from_str(line).map_err(|_| unreadable("not a JSON object"))?;
        let seq = record
            .get("seq")
            .and_then(Value::as_u64)
            .ok_or_else(|| unreadable("no `seq`"))?;
        let prev = record
            .get("prev")
            .and_then(Value::as_str)
            .and_then(parse_hash)
            .ok_or_else(|| unreadable("no `prev` hash"))?;
        let first_of_file = self.next_seq == 0 && self.checked == 0;
        if !first_of_file {
            if seq != self.next_seq {
                return Err(ChainBreak::Sequence {
                    expected: self.next_seq,
                    found: seq,
                });
            }
            if prev != self.prev {
                return Err(ChainBreak::Altered {
                    seq: seq.saturating_sub(1),
                    next: seq,
                });
            }
        }
        self.prev = ChainHash::of(line);
        self.next_seq = seq + 1;
        self.checked += 1;
        Ok(seq)
    }

    /// Checks a stored record: its line, and that the columns queries use
    /// say what the line says.
    ///
    /// # Errors
    /// [`ChainBreak`].
    pub fn push_record(&mut self, record: &AuditRecord) -> Result<(), ChainBreak> {
        let seq = self.push(&record.line)?;
        let line: Value = serde_json::from_str(&record.line).unwrap_or_default();
        if seq != record.seq {
            return Err(ChainBreak::Column { seq, column: "seq" });
        }
        if line.get("at").and_then(Value::as_u64) != Some(record.at) {
            return Err(ChainBreak::Column { seq, column: "at" });
        }
        if line.get("kind").and_then(Value::as_str) != Some(record.kind.as_str()) {
            return Err(ChainBreak::Column {
                seq,
                column: "kind",
            });
        }
        Ok(())
    }

    /// Checks that the chain ends where the store says its last write
    /// ended.
    ///
    /// # Errors
    /// [`ChainBreak::Head`].
    pub fn finish(&self, head_seq: u64, head_hash: &ChainHash) -> Result<(), ChainBreak> {
        let found = self.next_seq.saturating_sub(1);
        if found == head_seq && self.prev == *head_hash {
            return Ok(());
        }
        let why = if found < head_seq {
            "records were removed from the end"
        } else if found == head_seq {
            "the last record was altered"
        } else {
            "records were added after the last write"
        };
        Err(ChainBreak::Head {
            found,
            found_hash: self.prev,
            head: head_seq,
            head_hash: *head_hash,
            why,
        })
    }

    /// Records checked so far.
    pub fn checked(&self) -> u64 {
        self.checked
    }

    /// The last record checked and its hash (the chain's head).
    pub fn head(&self) -> (u64, ChainHash) {
        (self.next_seq.saturating_sub(1), self.prev)
    }
}

impl ChainHash {
    /// From 64 hex digits.
    pub fn parse(text: &str) -> Option<Self> {
        parse_hash(text)
    }
}

fn parse_hash(text: &str) -> Option<ChainHash> {
    unhex32(text).map(ChainHash)
}

/// 32 bytes from 64 hex digits (a hash or HMAC as records write them).
pub fn unhex32(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut h = [0u8; 32];
    for (i, pair) in text.as_bytes().chunks(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        h[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(h)
}

/// Lowercase hex, for hashes in records.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn rfc3339(at: u64) -> String {
    i64::try_from(at)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_carries_the_fixed_fields_and_the_details() {
        let line = AuditEvent::new(AuditKind::TokenIssue, Outcome::Denied, 1_700_000_000)
            .actor("spiffe://td/a")
            .field("reason", "no_rule")
            .field("seq", 99)
            .field("prev", "x")
            .to_line(7, &ChainHash::GENESIS);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 7, "details cannot overwrite seq");
        assert_eq!(v["prev"], "0".repeat(64), "nor the chain");
        assert_eq!(v["kind"], "token.issue");
        assert_eq!(v["outcome"], "denied");
        assert_eq!(v["actor"], "spiffe://td/a");
        assert_eq!(v["reason"], "no_rule");
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert!(!line.contains('\n'));
    }

    /// A chain of `n` records from seq 1, as the store writes them.
    fn chain(n: u64) -> Vec<String> {
        let mut prev = ChainHash::GENESIS;
        (1..=n)
            .map(|seq| {
                let line = AuditEvent::new(AuditKind::TokenIssue, Outcome::Ok, 1_700_000_000 + seq)
                    .field("jti", format!("j{seq}"))
                    .to_line(seq, &prev);
                prev = ChainHash::of(&line);
                line
            })
            .collect()
    }

    fn verify(lines: &[String]) -> Result<ChainVerifier, ChainBreak> {
        let mut v = ChainVerifier::new(1);
        for line in lines {
            v.push(line)?;
        }
        Ok(v)
    }

    #[test]
    fn an_untouched_chain_verifies_to_its_head() {
        let lines = chain(5);
        let v = verify(&lines).unwrap();
        assert_eq!(v.checked(), 5);
        assert_eq!(v.head(), (5, ChainHash::of(&lines[4])));
        v.finish(5, &ChainHash::of(&lines[4])).unwrap();
    }

    #[test]
    fn an_edited_record_is_named() {
        let mut lines = chain(5);
        lines[2] = lines[2].replace("\"j3\"", "\"jX\"");
        assert_eq!(
            verify(&lines).unwrap_err(),
            ChainBreak::Altered { seq: 3, next: 4 }
        );
    }

    #[test]
    fn a_deleted_record_is_named() {
        let mut lines = chain(5);
        lines.remove(1);
        assert_eq!(
            verify(&lines).unwrap_err(),
            ChainBreak::Sequence {
                expected: 2,
                found: 3
            }
        );
    }

    #[test]
    fn reordered_records_are_named() {
        let mut lines = chain(5);
        lines.swap(2, 3);
        assert_eq!(
            verify(&lines).unwrap_err(),
            ChainBreak::Sequence {
                expected: 3,
                found: 4
            }
        );
    }

    #[test]
    fn a_renumbered_deletion_is_still_caught_by_the_hashes() {
        // Delete record 2 and renumber the rest: the sequence holds, the
        // chain does not.
        let mut lines = chain(4);
        lines.remove(1);
        lines[1] = lines[1].replace("\"seq\":3", "\"seq\":2");
        lines[2] = lines[2].replace("\"seq\":4", "\"seq\":3");
        assert_eq!(
            verify(&lines).unwrap_err(),
            ChainBreak::Altered { seq: 1, next: 2 }
        );
    }

    #[test]
    fn the_end_of_the_log_is_checked_against_the_head() {
        let lines = chain(5);
        let head = ChainHash::of(&lines[4]);
        // Last record edited: the chain cannot see it, the head can.
        let mut edited = lines.clone();
        edited[4] = edited[4].replace("\"j5\"", "\"jX\"");
        let err = verify(&edited).unwrap().finish(5, &head).unwrap_err();
        assert!(
            err.to_string().contains("the last record was altered"),
            "{err}"
        );
        // Tail cut off.
        let err = verify(&lines[..3]).unwrap().finish(5, &head).unwrap_err();
        assert!(err.to_string().contains("removed from the end"), "{err}");
    }

    #[test]
    fn hostile_lines_are_refused_with_their_position() {
        let mut lines = chain(2);
        for bad in ["", "{", "[]", "{\"seq\":3}", &"x".repeat(MAX_LINE + 1)] {
            lines.push(bad.to_owned());
            let err = verify(&lines).unwrap_err();
            assert!(
                matches!(err, ChainBreak::Unreadable { line: 3, .. }),
                "{bad:.20}: {err}"
            );
            lines.pop();
        }
        // A `prev` that is not 64 hex digits.
        let odd = lines[1].replace("\"prev\":\"", "\"prev\":\"zz");
        lines[1] = odd;
        assert!(matches!(
            verify(&lines).unwrap_err(),
            ChainBreak::Unreadable { line: 2, .. }
        ));
    }

    #[test]
    fn a_chain_kept_after_an_archive_verifies_from_its_anchor() {
        let lines = chain(6);
        let anchor = ChainHash::of(&lines[2]);
        let mut v = ChainVerifier::anchored(4, anchor);
        for line in &lines[3..] {
            v.push(line).unwrap();
        }
        v.finish(6, &ChainHash::of(&lines[5])).unwrap();
        // A wrong anchor shows at the first kept record.
        let mut v = ChainVerifier::anchored(4, ChainHash::GENESIS);
        assert_eq!(
            v.push(&lines[3]).unwrap_err(),
            ChainBreak::Altered { seq: 3, next: 4 }
        );
    }

    #[test]
    fn a_file_may_start_mid_chain() {
        let lines = chain(6);
        let mut v = ChainVerifier::from_first_record();
        for line in &lines[3..] {
            v.push(line).unwrap();
        }
        assert_eq!(v.head().0, 6);
        assert_eq!(v.checked(), 3);
    }

    #[test]
    fn hex_is_lowercase_and_two_digits_per_byte() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }
}
