//! RFC 9068 access tokens: ES256 JWTs with `typ: at+jwt`, bound to a DPoP
//! key by `cnf.jkt` (RFC 9449 §6).
//!
//! Verification takes the signing key only from the [`Jwks`] it is given,
//! by `kid`; `jwk`, `jku`, `x5u` and `x5c` in a token header are never
//! looked at. Times are checked against the caller's `now` with an explicit
//! leeway.

use super::claims::{Audience, ClaimValueError, Scopes, TokenClass};
use super::jwks::Jwks;
use crate::identity::{SpiffeId, SpiffeIdError};
use crate::jose::claims::{self, ClaimError};
use crate::jose::jws::{self, Jws, JwsError, Limits};
use crate::jose::key::SignError;
use crate::jose::{Jkt, Observer, SigningKey, b64};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use serde_json::{Map, Value, json};
use std::fmt;
use zeroize::Zeroizing;

/// The `typ` of an access token (RFC 9068 §2.1).
pub const AT_TYP: &str = "at+jwt";

/// An access token string. Redacted in `Debug`, wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Zeroizing<String>);

impl AccessToken {
    /// Wraps a token string.
    pub fn new(token: String) -> Self {
        Self(Zeroizing::new(token))
    }

    /// The token text, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AccessToken(<redacted, {} bytes>)", self.0.len())
    }
}

/// The claims of a tally access token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClaims {
    /// Issuer URL.
    pub iss: String,
    /// The caller's SPIFFE ID (also `client_id`).
    pub sub: SpiffeId,
    /// Audiences (tally mints exactly one).
    pub aud: Vec<Audience>,
    /// Granted scopes.
    pub scope: Scopes,
    /// Issued at.
    pub iat: u64,
    /// Not before.
    pub nbf: Option<u64>,
    /// Expires at.
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
    /// Thumbprint of the DPoP key the token is bound to.
    pub jkt: Jkt,
    /// Token class.
    pub class: TokenClass,
    /// The signing key's id.
    pub kid: String,
}

/// Verification settings.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Expected `iss`.
    pub issuer: String,
    /// This workload: must be among the token's `aud`.
    pub audience: Audience,
    /// Clock leeway for `exp`, `nbf` and `iat`, in seconds.
    pub leeway: u64,
    /// Longest accepted `jti`.
    pub max_jti_len: usize,
    /// JWS size caps.
    pub limits: Limits,
}

impl TokenConfig {
    /// Defaults (30 s leeway) for an issuer and audience.
    pub fn new(issuer: impl Into<String>, audience: Audience) -> Self {
        Self {
            issuer: issuer.into(),
            audience,
            leeway: 30,
            max_jti_len: 256,
            limits: Limits::default(),
        }
    }
}

/// The checks of an access token, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum TokenCheck {
    /// Compact JWS syntax, size limits, alg ES256, no crit/b64.
    Syntax,
    /// `typ` is `at+jwt`.
    Typ,
    /// `kid` names a key of the trusted JWKS.
    Kid,
    /// The signature verifies with that key.
    Signature,
    /// `iss` is the expected issuer.
    Issuer,
    /// `aud` includes this workload.
    Audience,
    /// `sub` is a SPIFFE ID and `client_id` equals it.
    Subject,
    /// `exp`, `nbf`, `iat` against now with leeway.
    Times,
    /// `jti` present and within length.
    Jti,
    /// `cnf.jkt` is a thumbprint.
    Confirmation,
    /// `scope` and `tcl` well-formed.
    ScopeAndClass,
}

impl TokenCheck {
    /// Every check, in the order they run.
    pub const ALL: [Self; 11] = [
        Self::Syntax,
        Self::Typ,
        Self::Kid,
        Self::Signature,
        Self::Issuer,
        Self::Audience,
        Self::Subject,
        Self::Times,
        Self::Jti,
        Self::Confirmation,
        Self::ScopeAndClass,
    ];
}

impl fmt::Display for TokenCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Syntax => "compact JWS syntax, size limits, alg ES256, no crit/b64",
            Self::Typ => "typ is at+jwt",
            Self::Kid => "kid names a key in the trusted JWKS",
            Self::Signature => "signature verifies with that key",
            Self::Issuer => "iss is the expected issuer",
            Self::Audience => "aud includes the expected audience",
            Self::Subject => "sub is a SPIFFE ID and client_id equals it",
            Self::Times => "exp, nbf and iat are valid now (with leeway)",
            Self::Jti => "jti present and within length",
            Self::Confirmation => "cnf.jkt holds a key thumbprint",
            Self::ScopeAndClass => "scope and tcl are well-formed",
        })
    }
}

/// Why an access token was refused. Every variant maps to `invalid_token`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The JWS itself is unacceptable (syntax, size, alg, signature).
    #[error("{0}")]
    Jws(#[from] JwsError),
    /// `typ` is absent or not `at+jwt`.
    #[error("typ is {found:?}, not at+jwt")]
    Typ {
        /// The `typ` found, if it was a string.
        found: Option<String>,
    },
    /// No `kid` string in the header.
    #[error("header has no kid")]
    KidMissing,
    /// `kid` names no key we trust.
    #[error("kid {0:?} is not in the trusted key set")]
    UnknownKid(String),
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
    /// `iss` is another issuer.
    #[error("iss {found:?} is not the expected issuer {expected:?}")]
    IssuerMismatch {
        /// Expected issuer.
        expected: String,
        /// Issuer in the token.
        found: String,
    },
    /// `aud` does not include us.
    #[error("aud does not include {expected:?}")]
    AudienceMismatch {
        /// This workload.
        expected: String,
    },
    /// `sub` is not a SPIFFE ID.
    #[error("sub is not a SPIFFE ID: {0}")]
    Subject(SpiffeIdError),
    /// `client_id` differs from `sub`.
    #[error("client_id is not the same as sub")]
    ClientIdMismatch,
    /// Expired, even allowing for leeway.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// Expiry.
        exp: u64,
        /// Verifier's time.
        now: u64,
    },
    /// Not valid yet, even allowing for leeway.
    #[error("token not valid before {nbf} (now {now})")]
    NotYetValid {
        /// Not-before.
        nbf: u64,
        /// Verifier's time.
        now: u64,
    },
    /// Issued in the future, beyond leeway.
    #[error("token issued at {iat}, in the future (now {now})")]
    IssuedInFuture {
        /// Issued at.
        iat: u64,
        /// Verifier's time.
        now: u64,
    },
    /// `exp` is not after `iat`.
    #[error("token exp {exp} is not after iat {iat}")]
    LifetimeInverted {
        /// Issued at.
        iat: u64,
        /// Expiry.
        exp: u64,
    },
    /// `jti` is empty or too long.
    #[error("jti is empty or longer than {max} bytes")]
    Jti {
        /// The cap.
        max: usize,
    },
    /// `cnf.jkt` is not a base64url SHA-256 thumbprint.
    #[error("cnf.jkt is not a JWK SHA-256 thumbprint")]
    Confirmation,
    /// `scope`, `aud` or `tcl` is malformed.
    #[error("{0}")]
    ClaimValue(#[from] ClaimValueError),
}

/// Verifies an access token.
///
/// # Errors
/// The first [`TokenError`] found; checks run in [`TokenCheck`] order.
pub fn verify(
    token: &str,
    jwks: &Jwks,
    config: &TokenConfig,
    now: u64,
    observer: &mut impl Observer<TokenCheck>,
) -> Result<TokenClaims, TokenError> {
    let jws = Jws::parse(token, &config.limits)?;
    observer.passed(TokenCheck::Syntax);

    if !jws.typ_is(AT_TYP) {
        return Err(TokenError::Typ {
            found: jws.typ().map(jws::truncate),
        });
    }
    observer.passed(TokenCheck::Typ);

    let kid = jws
        .header()
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(TokenError::KidMissing)?;
    let key = jwks
        .get(kid)
        .ok_or_else(|| TokenError::UnknownKid(jws::truncate(kid)))?;
    observer.passed(TokenCheck::Kid);

    jws.verify(key)?;
    observer.passed(TokenCheck::Signature);

    let claims = jws.payload();
    let iss = claims::string(claims, "iss")?;
    if iss != config.issuer {
        return Err(TokenError::IssuerMismatch {
            expected: config.issuer.clone(),
            found: jws::truncate(iss),
        });
    }
    observer.passed(TokenCheck::Issuer);

    let aud = audiences(claims)?;
    if !aud.contains(&config.audience) {
        return Err(TokenError::AudienceMismatch {
            expected: config.audience.to_string(),
        });
    }
    observer.passed(TokenCheck::Audience);

    let sub_text = claims::string(claims, "sub")?;
    let sub: SpiffeId = sub_text.parse().map_err(TokenError::Subject)?;
    if claims::string(claims, "client_id")? != sub_text {
        return Err(TokenError::ClientIdMismatch);
    }
    observer.passed(TokenCheck::Subject);

    let exp = claims::integer(claims, "exp")?;
    let iat = claims::integer(claims, "iat")?;
    let nbf = claims::optional_integer(claims, "nbf")?;
    if now >= exp.saturating_add(config.leeway) {
        return Err(TokenError::Expired { exp, now });
    }
    if let Some(nbf) = nbf
        && nbf > now.saturating_add(config.leeway)
    {
        return Err(TokenError::NotYetValid { nbf, now });
    }
    if iat > now.saturating_add(config.leeway) {
        return Err(TokenError::IssuedInFuture { iat, now });
    }
    if exp <= iat {
        return Err(TokenError::LifetimeInverted { iat, exp });
    }
    observer.passed(TokenCheck::Times);

    let jti = claims::string(claims, "jti")?;
    if jti.is_empty() || jti.len() > config.max_jti_len {
        return Err(TokenError::Jti {
            max: config.max_jti_len,
        });
    }
    observer.passed(TokenCheck::Jti);

    let cnf = match claims.get("cnf") {
        None => return Err(TokenError::MissingClaim("cnf")),
        Some(Value::Object(cnf)) => cnf,
        Some(_) => {
            return Err(TokenError::ClaimType {
                claim: "cnf",
                expected: "an object",
            });
        }
    };
    // Errors name the claim by its full path, cnf.jkt.
    let jkt: Jkt = match claims::string(cnf, "jkt") {
        Ok(text) => text.parse().map_err(|_| TokenError::Confirmation)?,
        Err(ClaimError::Missing(_)) => return Err(TokenError::MissingClaim("cnf.jkt")),
        Err(ClaimError::WrongType { expected, .. }) => {
            return Err(TokenError::ClaimType {
                claim: "cnf.jkt",
                expected,
            });
        }
    };
    observer.passed(TokenCheck::Confirmation);

    let scope: Scopes = claims::string(claims, "scope")?.parse()?;
    let class: TokenClass = claims::string(claims, "tcl")?.parse()?;
    observer.passed(TokenCheck::ScopeAndClass);

    Ok(TokenClaims {
        iss: iss.to_owned(),
        sub,
        aud,
        scope,
        iat,
        nbf,
        exp,
        jti: jti.to_owned(),
        jkt,
        class,
        kid: kid.to_owned(),
    })
}

fn audiences(claims: &Map<String, Value>) -> Result<Vec<Audience>, TokenError> {
    const EXPECTED: &str = "a string or an array of strings";
    match claims.get("aud") {
        None => Err(TokenError::MissingClaim("aud")),
        Some(Value::String(s)) => Ok(vec![s.parse()?]),
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= 16 => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.parse()?),
                _ => Err(TokenError::ClaimType {
                    claim: "aud",
                    expected: EXPECTED,
                }),
            })
            .collect(),
        Some(_) => Err(TokenError::ClaimType {
            claim: "aud",
            expected: EXPECTED,
        }),
    }
}

impl From<ClaimError> for TokenError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::Missing(name) => Self::MissingClaim(name),
            ClaimError::WrongType { claim, expected } => Self::ClaimType { claim, expected },
        }
    }
}

/// What a token is minted for.
#[derive(Debug, Clone)]
pub struct MintRequest<'a> {
    /// The caller (`sub` and `client_id`).
    pub subject: &'a SpiffeId,
    /// The audience.
    pub audience: &'a Audience,
    /// Granted scopes.
    pub scope: &'a Scopes,
    /// Token class.
    pub class: TokenClass,
    /// Lifetime in seconds.
    pub ttl: u64,
    /// The DPoP key to bind to.
    pub jkt: Jkt,
}

/// Signs access tokens with one key. The header is encoded once.
pub struct TokenSigner {
    key: SigningKey,
    kid: String,
    issuer: String,
    header_b64: String,
    /// Orders tokens minted in the same second (see [`TokenSigner::mint`]).
    sequence: std::sync::atomic::AtomicU32,
}

impl TokenSigner {
    /// A signer for `issuer` using `key` published as `kid`.
    pub fn new(key: SigningKey, kid: impl Into<String>, issuer: impl Into<String>) -> Self {
        let kid = kid.into();
        let header_b64 = jws::encode_header(&json!({
            "typ": AT_TYP,
            "alg": jws::ALG_ES256,
            "kid": kid,
        }));
        Self {
            key,
            kid,
            issuer: issuer.into(),
            header_b64,
            sequence: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// The key id.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The signing key (its public half goes into the JWKS).
    pub fn key(&self) -> &SigningKey {
        &self.key
    }

    /// A fresh `jti` for a token this signer mints at `now`.
    ///
    /// jti = issue second (9 hex digits) ‖ this signer's sequence number
    /// (6 hex digits) ‖ 128 random bits (base64url). The randomness makes
    /// it unguessable; the prefix sorts in issue order, so the broker's
    /// inventory (keyed by jti) appends instead of dirtying a random page
    /// per token. Access tokens and JWT-SVIDs share it: one inventory.
    ///
    /// # Errors
    /// Only if the system random source fails.
    pub(crate) fn next_jti(&self, now: u64) -> Result<String, SignError> {
        let mut random = [0u8; 16];
        SystemRandom::new()
            .fill(&mut random)
            .map_err(|_| SignError)?;
        let sequence = self
            .sequence
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            & 0xff_ffff;
        Ok(format!(
            "{:09x}{sequence:06x}{}",
            now & 0xf_ffff_ffff,
            b64::encode(random)
        ))
    }

    /// Mints a token valid from `now` for `request.ttl` seconds.
    ///
    /// # Errors
    /// Only if the crypto library fails.
    pub fn mint(
        &self,
        request: &MintRequest<'_>,
        now: u64,
    ) -> Result<(AccessToken, TokenClaims), SignError> {
        let jti = self.next_jti(now)?;
        let claims = TokenClaims {
            iss: self.issuer.clone(),
            sub: request.subject.clone(),
            aud: vec![request.audience.clone()],
            scope: request.scope.clone(),
            iat: now,
            nbf: Some(now),
            exp: now.saturating_add(request.ttl.max(1)),
            jti,
            jkt: request.jkt,
            class: request.class,
            kid: self.kid.clone(),
        };
        let payload = json!({
            "iss": claims.iss,
            "sub": claims.sub.as_str(),
            "client_id": claims.sub.as_str(),
            "aud": request.audience.as_str(),
            "scope": claims.scope.to_string(),
            "iat": claims.iat,
            "nbf": now,
            "exp": claims.exp,
            "jti": claims.jti,
            "cnf": { "jkt": claims.jkt.to_string() },
            "tcl": claims.class.as_str(),
        });
        let payload = serde_json::to_vec(&payload).map_err(|_| SignError)?;
        let token = jws::sign_compact(&self.header_b64, &payload, &self.key)?;
        Ok((AccessToken::new(token), claims))
    }
}

impl fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSigner")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .field("key", &self.key)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenClass;

    #[test]
    fn jtis_sort_in_issue_order_and_carry_128_random_bits() {
        let signer = TokenSigner::new(SigningKey::generate().unwrap(), "k", "https://i");
        let key = SigningKey::generate().unwrap();
        let request = MintRequest {
            subject: &"spiffe://td/a".parse().unwrap(),
            audience: &"spiffe://td/b".parse().unwrap(),
            scope: &"s".parse().unwrap(),
            class: TokenClass::Service,
            ttl: 60,
            jkt: key.thumbprint(),
        };
        let jtis: Vec<String> = [1_800_000_000, 1_800_000_000, 1_800_000_001, 1_800_000_001]
            .iter()
            .map(|now| signer.mint(&request, *now).unwrap().1.jti)
            .collect();
        let mut sorted = jtis.clone();
        sorted.sort();
        assert_eq!(sorted, jtis, "issue order is sort order");
        for jti in &jtis {
            // 9 + 6 hex digits, then 16 random bytes as 22 base64url chars.
            assert_eq!(jti.len(), 9 + 6 + 22, "{jti}");
            assert!(jti[..15].bytes().all(|b| b.is_ascii_hexdigit()), "{jti}");
            assert_eq!(b64::decode(&jti.as_bytes()[15..]).unwrap().len(), 16);
        }
        assert_ne!(jtis[0][15..], jtis[1][15..]);
    }
}
