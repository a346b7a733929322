//! Audit events: what happened, to whom, with what outcome, as one JSON
//! object per line. The store keeps every record (with a sequence number)
//! and the broker appends the same line to a JSON-lines file for log
//! shippers.
//!
//! Never a raw token or key: a token appears as its `jti` and as
//! HMAC-SHA256(token) under the deployment's token-hash key
//! (`token_hmac`), a join token as its SHA-256 hash.

use serde_json::{Map, Value};

/// What kind of thing happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AuditKind {
    /// A workload proved who it is (join token, ServiceAccount token).
    Attest,
    /// A workload renewed its X.509-SVID.
    Renew,
    /// A token was asked for (issued or denied).
    TokenIssue,
    /// An admin made a join token.
    JoinTokenCreate,
    /// An admin minted a credential for a workload without a sidecar.
    SvidMint,
    /// The trust policy was (or failed to be) reloaded.
    PolicyReload,
    /// A signing key was rotated.
    KeyRotate,
    /// The CA's intermediate was replaced.
    CaRotate,
    /// Tokens were revoked.
    Revoke,
    /// An admin read something (keys, inventory, audit).
    AdminQuery,
}

impl AuditKind {
    /// The `kind` field of the record.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attest => "identity.attest",
            Self::Renew => "identity.renew",
            Self::TokenIssue => "token.issue",
            Self::JoinTokenCreate => "join_token.create",
            Self::SvidMint => "svid.mint",
            Self::PolicyReload => "policy.reload",
            Self::KeyRotate => "keys.rotate",
            Self::CaRotate => "ca.rotate_intermediate",
            Self::Revoke => "token.revoke",
            Self::AdminQuery => "admin.query",
        }
    }
}

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

    /// The JSON line for this event as record `seq` (no trailing newline).
    /// The fixed fields come first and cannot be overwritten by details.
    pub fn to_line(&self, seq: u64) -> String {
        let mut record = Map::new();
        record.insert("seq".into(), seq.into());
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
            .to_line(7);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["seq"], 7, "details cannot overwrite seq");
        assert_eq!(v["kind"], "token.issue");
        assert_eq!(v["outcome"], "denied");
        assert_eq!(v["actor"], "spiffe://td/a");
        assert_eq!(v["reason"], "no_rule");
        assert_eq!(v["time"], "2023-11-14T22:13:20Z");
        assert!(!line.contains('\n'));
    }

    #[test]
    fn hex_is_lowercase_and_two_digits_per_byte() {
        assert_eq!(hex(&[0, 0xab, 0x0f]), "00ab0f");
    }
}
