//! What the store hands back and takes in: its records, typed. A value
//! the rest of the broker decides on (a holder, an audience, scopes, a
//! token class, a DPoP key thumbprint) is parsed once, where the row is
//! read (`rows.rs`), so no caller re-parses stored text or guesses when
//! it does not parse.

use crate::audit::ChainHash;
use crate::identity::SpiffeId;
use crate::jose::Jkt;
use crate::token::{Audience, Scopes, TokenClass, TokenKind};
use zeroize::Zeroizing;

/// A signing key as stored.
pub struct SigningKeyRecord {
    /// Key id.
    pub kid: String,
    /// PKCS#8 DER of the private key (sealed at rest).
    pub pkcs8: Zeroizing<Vec<u8>>,
    /// When it was created.
    pub created_at: u64,
    /// When it may start signing (published in the JWKS before that).
    pub sign_from: u64,
    /// When it stopped signing, if it has.
    pub retired_at: Option<u64>,
    /// When it was withdrawn (leaked): no longer published at all.
    pub withdrawn_at: Option<u64>,
}

impl std::fmt::Debug for SigningKeyRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeyRecord")
            .field("kid", &self.kid)
            .field("pkcs8", &"<redacted>")
            .field("created_at", &self.created_at)
            .field("sign_from", &self.sign_from)
            .field("retired_at", &self.retired_at)
            .field("withdrawn_at", &self.withdrawn_at)
            .finish()
    }
}

/// One issued token (an access token or a JWT-SVID), as the inventory
/// keeps it: never the token, only its id and a keyed hash (for
/// leaked-token lookup).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedToken {
    /// Token id.
    pub jti: String,
    /// Access token, JWT-SVID or WIT.
    pub kind: TokenKind,
    /// Holder.
    pub sub: SpiffeId,
    /// Audiences: one for an access token, one or more for a JWT-SVID,
    /// none for a WIT.
    pub aud: Vec<Audience>,
    /// Scopes (none for a JWT-SVID or a WIT).
    pub scope: Scopes,
    /// Token class (a JWT-SVID's: that of the rule that capped its life;
    /// a WIT's: `service`).
    pub class: TokenClass,
    /// Key thumbprint it is bound to: the DPoP key of an access token, the
    /// `cnf.jwk` of a WIT (none: a bearer JWT-SVID).
    pub jkt: Option<Jkt>,
    /// Issued at.
    pub iat: u64,
    /// Expires at.
    pub exp: u64,
    /// Signing key id.
    pub kid: String,
    /// HMAC-SHA256 of the token under the deployment's token-hash key.
    pub token_hmac: [u8; 32],
}

/// One entry of the change feed (what `Watch` streams).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Position in the feed, from 1.
    pub seq: u64,
    /// When it was committed, Unix milliseconds.
    pub at_ms: u64,
    /// `jwks`, `bundle`, `policy`, `revocation` or `denial`.
    pub kind: String,
    /// The new state, JSON.
    pub body: String,
}

/// An X.509-SVID as the inventory keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidRecord {
    /// Serial number, hex.
    pub serial: String,
    /// Whom it names.
    pub spiffe_id: SpiffeId,
    /// How it was obtained: `join_token`, `k8s_sa`, `renew`, `admin_mint`.
    pub method: &'static str,
    /// Issued at.
    pub issued_at: u64,
    /// Expires at.
    pub expires_at: u64,
    /// The pod whose ServiceAccount token attested it (carried over to
    /// its renewals), if any.
    pub pod: Option<crate::identity::k8s::Pod>,
}

/// Where the audit hash chain stands, as recorded with the last write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditHead {
    /// The first chained record (earlier ones predate the chain).
    pub chain_from: u64,
    /// The last record written (0: none).
    pub seq: u64,
    /// The SHA-256 of its line.
    pub hash: ChainHash,
    /// What the first kept record carries as `prev`: zeros, or the hash of
    /// the last record archived and removed.
    pub anchor: ChainHash,
}

/// Which audit records a query wants; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditFilter {
    /// Only records after this sequence number (paging).
    pub after: u64,
    /// Records naming this token id.
    pub jti: Option<String>,
    /// Records of this kind (`token.issue`) or family (`token`).
    pub kind: Option<String>,
    /// Records at or after this time (Unix seconds).
    pub since: Option<u64>,
    /// Records before this time.
    pub until: Option<u64>,
    /// Records whose actor, `spiffe_id` or `sub` is this SPIFFE ID.
    pub sub: Option<String>,
}

/// Which live tokens a listing wants; every condition given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFilter {
    /// Live at this time.
    pub now: u64,
    /// Holder.
    pub sub: Option<String>,
    /// Audience (one of a JWT-SVID's).
    pub aud: Option<String>,
    /// Class.
    pub class: Option<String>,
    /// Expiring at or before this time.
    pub expires_by: Option<u64>,
    /// After this (exp, jti): the previous page's last row.
    pub after: Option<(u64, String)>,
    /// One kind only (access tokens, JWT-SVIDs or WITs).
    pub kind: Option<TokenKind>,
}

/// Tokens issued for one (holder, audience, scopes, class); a JWT-SVID
/// counts once for each of its audiences, a WIT (no audience) not at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenUsage {
    /// Holder.
    pub sub: SpiffeId,
    /// Audience.
    pub aud: Audience,
    /// Scopes.
    pub scope: Scopes,
    /// Class.
    pub class: TokenClass,
    /// How many.
    pub count: u64,
    /// Longest lifetime among them (seconds).
    pub longest_life: u64,
    /// The newest one's `iat`.
    pub last_issued: u64,
}

/// An identity as the inventory knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityRecord {
    /// The workload.
    pub spiffe_id: SpiffeId,
    /// First SVID (or token) issued.
    pub first_seen: u64,
    /// Newest SVID issued, if any.
    pub last_svid_at: Option<u64>,
    /// When its newest SVID expires.
    pub svid_expires_at: Option<u64>,
    /// SVIDs issued.
    pub svids: u64,
    /// How the newest SVID was obtained.
    pub method: String,
    /// Newest token issued, if any.
    pub last_token_at: Option<u64>,
    /// Tokens issued (the inventory keeps them all).
    pub tokens: u64,
    /// Of which live now.
    pub live_tokens: u64,
    /// The pods holding its live SVIDs, as their ServiceAccount tokens
    /// named them (none for join tokens and admin-minted SVIDs).
    pub pods: Vec<crate::identity::k8s::Pod>,
}

impl IdentityRecord {
    /// Last attestation, renewal or token.
    pub fn last_seen(&self) -> u64 {
        self.last_svid_at
            .unwrap_or(0)
            .max(self.last_token_at.unwrap_or(0))
            .max(self.first_seen)
    }
}

/// One stored version of the trust policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVersion {
    /// From 1, in the order they were stored.
    pub version: u64,
    /// When (Unix seconds).
    pub created_at: u64,
    /// Who: an admin's SPIFFE ID, or `file:<path>`.
    pub author: String,
    /// How: `apply`, `rollback`, `file` or `seed`.
    pub source: String,
    /// Why, as the author said.
    pub comment: String,
    /// The document.
    pub yaml: String,
}

/// An inventory record written in the same transaction as its audit event.
#[derive(Debug, Clone)]
pub enum Write {
    /// A token was issued.
    Issued(IssuedToken),
    /// An X.509-SVID was issued.
    Svid(SvidRecord),
}
