//! The kinds of audit record, what each means (docs/AUDIT.md is made
//! from [`AuditKind::ALL`]), and the `kind` field each is written with.

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
    /// An admin applied or rolled back the trust policy.
    PolicyChange,
    /// A signing key was rotated.
    KeyRotate,
    /// The CA's intermediate was replaced.
    CaRotate,
    /// Tokens were revoked.
    Revoke,
    /// An admin read something (keys, inventory, audit).
    AdminQuery,
    /// Requests a sidecar's inbound proxy refused (summarized per
    /// interval, reported by that sidecar).
    VerifyFailure,
    /// A call to the Admin service (`outcome` denied: not an admin).
    AdminCall,
    /// The beginning of the audit log was archived and removed.
    AuditTruncate,
    /// An admin denied an identity (cut a workload off).
    IdentityDeny,
    /// An admin lifted an identity's denial.
    IdentityAllow,
    /// A call without an audit kind of its own (Watch, Reports, Admin,
    /// OAuth introspection or revocation) refused before it reached its
    /// service: the caller's identity is denied.
    CallRefused,
    /// A JWT-SVID was asked for (issued or denied).
    JwtSvidIssue,
    /// A workload got a second X.509-SVID for its own identity, with a
    /// key made for the application (SPIFFE Workload API).
    WorkloadSvid,
    /// A WIMSE Workload Identity Token was asked for (issued or denied).
    WitIssue,
}

impl AuditKind {
    /// Every kind, for the reference (docs/AUDIT.md is made from it).
    pub const ALL: [Self; 20] = [
        Self::Attest,
        Self::Renew,
        Self::TokenIssue,
        Self::JoinTokenCreate,
        Self::SvidMint,
        Self::PolicyReload,
        Self::PolicyChange,
        Self::KeyRotate,
        Self::CaRotate,
        Self::Revoke,
        Self::AdminQuery,
        Self::VerifyFailure,
        Self::AdminCall,
        Self::AuditTruncate,
        Self::IdentityDeny,
        Self::IdentityAllow,
        Self::CallRefused,
        Self::JwtSvidIssue,
        Self::WorkloadSvid,
        Self::WitIssue,
    ];

    /// What a record of this kind says happened, for the reference.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::Attest => {
                "A workload proved who it is (join token or ServiceAccount token) and got its first X.509-SVID, or was refused."
            }
            Self::Renew => "A workload renewed its X.509-SVID over mTLS.",
            Self::TokenIssue => {
                "A token was asked for (gRPC or OAuth): issued, with `jti` and `token_hmac`, or denied with the reason."
            }
            Self::JoinTokenCreate => {
                "An admin made a join token (recorded by its SHA-256, never its value)."
            }
            Self::SvidMint => {
                "An admin minted a credential for a workload without a sidecar (`ctl svid mint`)."
            }
            Self::PolicyReload => {
                "The policy file was reloaded (with its diff), or a broken one refused (with its errors)."
            }
            Self::PolicyChange => "An admin applied or rolled back a policy version.",
            Self::KeyRotate => {
                "A token-signing key was rotated, on schedule or by `ctl keys rotate`."
            }
            Self::CaRotate => "The CA's intermediate was replaced.",
            Self::Revoke => {
                "Tokens were revoked (by jti, holder, key, signing key or issue time), or a holder's RFC 7009 revocation."
            }
            Self::AdminQuery => {
                "An admin read something: inventory, keys, audit records, a leaked-token lookup."
            }
            Self::VerifyFailure => {
                "A sidecar's summary of inbound requests it refused in an interval: reason, method, path, claimed token, count; the reporting sidecar is the actor."
            }
            Self::AdminCall => {
                "A call to the Admin service refused because the caller is not an admin."
            }
            Self::AuditTruncate => {
                "The beginning of the log was removed from the store (`ctl audit export`, then `ctl audit truncate`); the new first record's `prev` is the anchor."
            }
            Self::IdentityDeny => "An admin denied an identity (`ctl identities deny`).",
            Self::IdentityAllow => "An admin lifted an identity's denial (`ctl identities allow`).",
            Self::CallRefused => {
                "A call with no kind of its own (Watch, Reports, Admin, OAuth introspection or revocation) refused because the caller's identity is denied."
            }
            Self::JwtSvidIssue => {
                "A JWT-SVID was asked for (`Tokens.IssueJwtSvid`): issued, with `audience` (a list), `jti`, `exp`, `kid` and `token_hmac`, or denied with the reason."
            }
            Self::WorkloadSvid => {
                "A workload got a second X.509-SVID for its own identity with a key made for its application (`Identity.IssueWorkloadSvid`, method `workload`), or was refused."
            }
            Self::WitIssue => {
                "A WIMSE Workload Identity Token was asked for (`Tokens.IssueWit`): issued, with `jti`, `token_hmac`, `exp`, `kid`, `jkt` (its `cnf.jwk`: the client certificate's key) and `via`, or denied with the reason."
            }
        }
    }

    /// The `kind` field of the record.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attest => "identity.attest",
            Self::Renew => "identity.renew",
            Self::TokenIssue => "token.issue",
            Self::JoinTokenCreate => "join_token.create",
            Self::SvidMint => "svid.mint",
            Self::PolicyReload => "policy.reload",
            Self::PolicyChange => "policy.change",
            Self::KeyRotate => "keys.rotate",
            Self::CaRotate => "ca.rotate_intermediate",
            Self::Revoke => "token.revoke",
            Self::AdminQuery => "admin.query",
            Self::VerifyFailure => "token.verify_failure",
            Self::AdminCall => "admin.call",
            Self::AuditTruncate => "audit.truncate",
            Self::IdentityDeny => "identity.deny",
            Self::IdentityAllow => "identity.allow",
            Self::CallRefused => "call.refused",
            Self::JwtSvidIssue => "jwt_svid.issue",
            Self::WorkloadSvid => "identity.workload_svid",
            Self::WitIssue => "wit.issue",
        }
    }
}
