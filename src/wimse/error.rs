//! Why a WIT or a WPT was refused: [`WitError`] and [`WptError`], one
//! variant per failed check, each with a fixed [`WitError::reason`] /
//! [`WptError::reason`] label for metrics and audit.
//!
//! # HTTP answers
//!
//! Every WIT and every WPT failure is answered `401 Unauthorized` with a
//! `WWW-Authenticate: WPT` challenge (draft-ietf-wimse-wpt-02 §2.1, "Error
//! Conditions": the WPT is an HTTP authentication scheme, so a refusal
//! related to it is 401 with a `WPT` challenge; the WIT is validated as
//! the first step of validating the WPT, so its failures are answered the
//! same way). A request whose shape is wrong before any token is read —
//! two `Workload-Identity-Token` headers, two WPTs (two
//! `Workload-Proof-Token` headers, or one beside `Authorization: WPT`) —
//! is `400 Bad Request`: it is not a credential failure. The mapping
//! itself lives in `auth::answer`, the one place that turns a refusal
//! into a status and headers.

use crate::dpop::UriError;
use crate::identity::SpiffeIdError;
use crate::jose::claims::ClaimError;
use crate::jose::{JwkError, JwsError};

/// Why a Workload Identity Token was refused. Answered 401 with
/// `WWW-Authenticate: WPT` (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WitError {
    /// The JWS itself is unacceptable: size, segments, encoding, JSON,
    /// `alg` outside ES256/EdDSA, `crit`/`b64`, signature encoding.
    #[error("{0}")]
    Jws(JwsError),
    /// `typ` is absent or not `wit+jwt`.
    #[error("typ is {found:?}, not wit+jwt")]
    Typ {
        /// The `typ` found, if it was a string.
        found: Option<String>,
    },
    /// No `kid` string in the header (SPIFFE WIT-SVID §2.1: required).
    #[error("header has no kid")]
    KidMissing,
    /// `kid` names no key we trust.
    #[error("kid {0:?} is not in the WIT key set")]
    UnknownKid(String),
    /// The `alg` does not fit the issuer key's type.
    #[error("alg {alg} does not fit the issuer's {key} key")]
    IssuerKeyMismatch {
        /// The WIT's `alg`.
        alg: &'static str,
        /// The key's type.
        key: &'static str,
    },
    /// The signature does not verify under the issuer key.
    #[error("signature does not verify with the issuer key")]
    BadSignature,
    /// A required claim (or member, named by its path) is absent.
    #[error("claim {0} is missing")]
    MissingClaim(&'static str),
    /// A claim has the wrong JSON type.
    #[error("claim {claim} is not {expected}")]
    ClaimType {
        /// The claim.
        claim: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
    /// `sub` is not an absolute URI.
    #[error("sub is not an absolute URI: {0}")]
    SubNotUri(&'static str),
    /// `sub` is not a SPIFFE ID, and one is required (or it is in the
    /// `spiffe` scheme but not a valid SPIFFE ID).
    #[error("sub is not a SPIFFE ID: {0}")]
    NotSpiffe(SpiffeIdError),
    /// Expired, even allowing for leeway.
    #[error("WIT expired at {exp} (now {now}, leeway {leeway}s)")]
    Expired {
        /// Expiry.
        exp: u64,
        /// Verifier's time.
        now: u64,
        /// The leeway allowed.
        leeway: u64,
    },
    /// `nbf` is in the future, beyond leeway.
    #[error("WIT not valid before {nbf} (now {now})")]
    NotYetValid {
        /// Not-before.
        nbf: u64,
        /// Verifier's time.
        now: u64,
    },
    /// `iat` is in the future, beyond leeway.
    #[error("WIT issued at {iat}, in the future (now {now})")]
    IssuedInFuture {
        /// Issued at.
        iat: u64,
        /// Verifier's time.
        now: u64,
    },
    /// `cnf.jwk` is not a public EC P-256 or OKP Ed25519 key.
    #[error("cnf.jwk: {0}")]
    CnfJwk(JwkError),
    /// `cnf.jwk.alg` is not one tally accepts for a proof.
    #[error("cnf.jwk.alg {0:?} is not allowed: tally accepts ES256 and EdDSA proofs")]
    CnfAlgNotAllowed(String),
    /// `cnf.jwk.alg` does not fit the key's type (ES256 needs EC P-256,
    /// EdDSA needs OKP Ed25519).
    #[error("cnf.jwk.alg {alg} does not fit its {key} key")]
    CnfAlgKeyMismatch {
        /// The `alg`.
        alg: &'static str,
        /// The key's type.
        key: &'static str,
    },
    /// `jti` is empty or too long.
    #[error("jti is {len} bytes (1 to {max} allowed)")]
    Jti {
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
}

impl WitError {
    /// The metrics label and audit reason: a fixed set, so a caller
    /// cannot create series.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Jws(JwsError::TooLong { .. } | JwsError::HeaderTooLong { .. }) => "wit_too_large",
            Self::Jws(
                JwsError::AlgMissing
                | JwsError::AlgNone
                | JwsError::AlgHmac(_)
                | JwsError::AlgNotAllowed(_),
            )
            | Self::IssuerKeyMismatch { .. } => "wit_alg",
            Self::Jws(_) => "wit_malformed",
            Self::Typ { .. } => "wit_typ",
            Self::KidMissing | Self::UnknownKid(_) => "wit_kid",
            Self::BadSignature => "wit_signature",
            Self::MissingClaim(name) | Self::ClaimType { claim: name, .. }
                if name.starts_with("cnf") =>
            {
                "wit_cnf"
            }
            Self::MissingClaim(_) | Self::ClaimType { .. } => "wit_claims",
            Self::SubNotUri(_) => "wit_sub",
            Self::NotSpiffe(_) => "wit_not_spiffe",
            Self::Expired { .. } => "wit_expired",
            Self::NotYetValid { .. } | Self::IssuedInFuture { .. } => "wit_not_yet_valid",
            Self::CnfJwk(_) | Self::CnfAlgNotAllowed(_) | Self::CnfAlgKeyMismatch { .. } => {
                "wit_cnf"
            }
            Self::Jti { .. } => "wit_jti",
        }
    }
}

impl From<ClaimError> for WitError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::Missing(name) => Self::MissingClaim(name),
            ClaimError::WrongType { claim, expected } => Self::ClaimType { claim, expected },
        }
    }
}

/// Why a Workload Proof Token was refused (the WIT it came with having
/// passed). Answered 401 with `WWW-Authenticate: WPT` (see the
/// [module docs](self)).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WptError {
    /// The JWS itself is unacceptable: size, segments, encoding, JSON,
    /// `alg` outside ES256/EdDSA, `crit`/`b64`, signature encoding.
    #[error("{0}")]
    Jws(JwsError),
    /// `typ` is absent or not `wpt+jwt`.
    #[error("typ is {found:?}, not wpt+jwt")]
    Typ {
        /// The `typ` found, if it was a string.
        found: Option<String>,
    },
    /// `alg` is not the WIT's `cnf.jwk.alg`.
    #[error("alg {found} is not the WIT's cnf.jwk.alg {expected}")]
    AlgMismatch {
        /// The WIT's `cnf.jwk.alg`.
        expected: &'static str,
        /// The WPT's `alg`.
        found: &'static str,
    },
    /// The signature does not verify under the WIT's `cnf.jwk`.
    #[error("signature does not verify with the WIT's cnf.jwk")]
    BadSignature,
    /// A required claim is absent.
    #[error("claim {0} is missing")]
    MissingClaim(&'static str),
    /// A claim has the wrong JSON type.
    #[error("claim {claim} is not {expected}")]
    ClaimType {
        /// The claim.
        claim: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
    /// `aud` is not an absolute HTTP(S) URI.
    #[error("aud is not a valid http(s) URI: {0}")]
    AudInvalid(UriError),
    /// `aud` names another target.
    #[error("aud {found} does not match the request URI {expected}")]
    AudMismatch {
        /// Normalized request URI.
        expected: String,
        /// Normalized claim.
        found: String,
    },
    /// Expired, even allowing for leeway.
    #[error("WPT expired at {exp} (now {now}, leeway {leeway}s)")]
    Expired {
        /// Expiry.
        exp: u64,
        /// Verifier's time.
        now: u64,
        /// The leeway allowed.
        leeway: u64,
    },
    /// `exp` is further ahead than a WPT may live.
    #[error("WPT exp {exp} is more than {max_lifetime}s (plus leeway) after now {now}")]
    TooLongLived {
        /// Expiry.
        exp: u64,
        /// Verifier's time.
        now: u64,
        /// The longest lifetime accepted.
        max_lifetime: u64,
    },
    /// `jti` carries too little to be unique (under 16 bytes).
    #[error("jti is {len} bytes, fewer than {min} (128 bits)")]
    JtiTooShort {
        /// Its length (decoded, when it is base64url).
        len: usize,
        /// The floor.
        min: usize,
    },
    /// `jti` is longer than allowed.
    #[error("jti is {len} bytes, more than {max}")]
    JtiTooLong {
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// `wth` is not the hash of the WIT sent with it.
    #[error("wth does not match the WIT")]
    WthMismatch,
    /// An access token was sent but the WPT has no `ath`.
    #[error("ath is missing although an access token was sent")]
    AthMissing,
    /// `ath` is not the hash of the access token sent.
    #[error("ath does not match the access token")]
    AthMismatch,
    /// `ath` is present but no access token was sent.
    #[error("ath is present but no access token was sent")]
    AthUnexpected,
    /// A `Txn-Token` was sent but the WPT has no `tth`.
    #[error("tth is missing although a Txn-Token was sent")]
    TthMissing,
    /// `tth` is not the hash of the `Txn-Token` sent.
    #[error("tth does not match the Txn-Token")]
    TthMismatch,
    /// `tth` is present but no `Txn-Token` was sent.
    #[error("tth is present but no Txn-Token was sent")]
    TthUnexpected,
    /// `oth` has more entries than accepted.
    #[error("oth has {count} entries, more than {max}")]
    OthTooMany {
        /// Entries found.
        count: usize,
        /// The cap.
        max: usize,
    },
    /// An `oth` key is not a lower-case header field name.
    #[error("oth key {0:?} is not a lower-case header field name")]
    OthName(String),
    /// An `oth` key names a header the WPT may not bind (a credential the
    /// protocol itself carries, or `host`).
    #[error("oth key {0:?} names a header that oth may not bind")]
    OthReserved(String),
    /// An `oth` key names a header the request does not have.
    #[error("oth names header {0:?}, which the request does not carry")]
    OthHeaderMissing(String),
    /// An `oth` key names a header the request carries more than once
    /// (not supported by default, draft-ietf-wimse-wpt §2).
    #[error("oth names header {0:?}, which the request carries more than once")]
    OthHeaderRepeated(String),
    /// An `oth` value is not a string.
    #[error("oth value for {0:?} is not a string")]
    OthValueType(String),
    /// `iat` is in the future, beyond leeway.
    #[error("WPT issued at {iat}, in the future (now {now})")]
    IssuedInFuture {
        /// Issued at.
        iat: u64,
        /// Verifier's time.
        now: u64,
    },
    /// An `oth` value is not the hash of its header's value.
    #[error("oth value for {0:?} does not match the header's value")]
    OthMismatch(String),
}

impl WptError {
    /// The metrics label and audit reason: a fixed set, so a caller
    /// cannot create series.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Jws(JwsError::TooLong { .. } | JwsError::HeaderTooLong { .. }) => "wpt_too_large",
            Self::Jws(
                JwsError::AlgMissing
                | JwsError::AlgNone
                | JwsError::AlgHmac(_)
                | JwsError::AlgNotAllowed(_),
            )
            | Self::AlgMismatch { .. } => "wpt_alg",
            Self::Jws(_) => "wpt_malformed",
            Self::Typ { .. } => "wpt_typ",
            Self::BadSignature => "wpt_signature",
            Self::MissingClaim("aud") | Self::ClaimType { claim: "aud", .. } => "wpt_aud",
            Self::MissingClaim("exp") | Self::ClaimType { claim: "exp", .. } => "wpt_expired",
            Self::MissingClaim("jti") | Self::ClaimType { claim: "jti", .. } => "wpt_jti",
            Self::MissingClaim("wth") | Self::ClaimType { claim: "wth", .. } => "wpt_wth",
            Self::ClaimType { claim: "ath", .. } => "wpt_ath",
            Self::ClaimType { claim: "tth", .. } => "wpt_tth",
            Self::ClaimType { claim: "oth", .. } => "wpt_oth",
            Self::MissingClaim(_) | Self::ClaimType { .. } => "wpt_claims",
            Self::AudInvalid(_) | Self::AudMismatch { .. } => "wpt_aud",
            Self::Expired { .. } => "wpt_expired",
            Self::TooLongLived { .. } => "wpt_lifetime",
            Self::IssuedInFuture { .. } => "wpt_iat",
            Self::JtiTooShort { .. } | Self::JtiTooLong { .. } => "wpt_jti",
            Self::WthMismatch => "wpt_wth",
            Self::AthMissing | Self::AthMismatch | Self::AthUnexpected => "wpt_ath",
            Self::TthMissing | Self::TthMismatch | Self::TthUnexpected => "wpt_tth",
            Self::OthTooMany { .. }
            | Self::OthName(_)
            | Self::OthReserved(_)
            | Self::OthHeaderMissing(_)
            | Self::OthHeaderRepeated(_)
            | Self::OthValueType(_)
            | Self::OthMismatch(_) => "wpt_oth",
        }
    }
}

impl From<ClaimError> for WptError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::Missing(name) => Self::MissingClaim(name),
            ClaimError::WrongType { claim, expected } => Self::ClaimType { claim, expected },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_are_fixed_labels_per_check() {
        assert_eq!(WitError::Jws(JwsError::AlgNone).reason(), "wit_alg");
        assert_eq!(
            WitError::Jws(JwsError::SegmentCount { found: 2 }).reason(),
            "wit_malformed"
        );
        assert_eq!(WitError::MissingClaim("cnf.jwk").reason(), "wit_cnf");
        assert_eq!(WitError::MissingClaim("sub").reason(), "wit_claims");
        assert_eq!(WptError::MissingClaim("wth").reason(), "wpt_wth");
        assert_eq!(
            WptError::ClaimType {
                claim: "oth",
                expected: "an object"
            }
            .reason(),
            "wpt_oth"
        );
        assert_eq!(WptError::AthUnexpected.reason(), "wpt_ath");
        assert_eq!(
            WptError::Jws(JwsError::TooLong { len: 9, max: 8 }).reason(),
            "wpt_too_large"
        );
    }
}
