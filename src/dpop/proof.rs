//! RFC 9449 DPoP proofs: minting, and verification with every check of
//! §4.3 (and §7.1 when an access token is presented).
//!
//! Verification is pure: the caller passes the request's method and URI,
//! the access token's hash, the expected key binding, the nonce rule and
//! `now`. Replay detection is a separate step ([`super::replay`]) that the
//! caller runs last, so a proof that fails any check does not burn its
//! `jti`.

use super::htu::{NormalizedUri, UriError, strip_query_and_fragment};
use super::nonce::{NonceError, Nonces};
use crate::jose::claims::{self, ClaimError};
use crate::jose::jws::{self, Jws, JwsError, Limits};
use crate::jose::key::SignError;
use crate::jose::{Jkt, JwkError, KeyCache, Observer, PublicKey, SigningKey, b64};
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use serde_json::{Map, Value, json};
use std::fmt;

/// The `typ` of a DPoP proof.
pub const DPOP_TYP: &str = "dpop+jwt";

/// Verification settings.
#[derive(Debug, Clone)]
pub struct ProofConfig {
    /// How far in the past `iat` may be, in seconds.
    pub max_age: u64,
    /// How far in the future `iat` may be (clock skew), in seconds.
    pub max_skew: u64,
    /// Longest accepted `jti`, in bytes.
    pub max_jti_len: usize,
    /// JWS size caps.
    pub limits: Limits,
}

impl Default for ProofConfig {
    fn default() -> Self {
        Self {
            max_age: 60,
            max_skew: 60,
            max_jti_len: 256,
            limits: Limits::default(),
        }
    }
}

/// How the `nonce` claim is checked.
#[derive(Debug, Clone, Copy, Default)]
pub enum NonceRule<'a> {
    /// No nonce is required (one that is present is ignored).
    #[default]
    NotRequired,
    /// A nonce issued by these [`Nonces`] for the current or previous slot
    /// is required.
    Issued(&'a Nonces),
    /// Exactly this nonce is required.
    Exact(&'a str),
    /// A nonce issued by these [`Nonces`] is required of a proof whose
    /// `iat` is at or before `iat_through`; a later proof needs none. A
    /// verifier that has just started sets `iat_through` to its start plus
    /// the allowed clock skew: every proof the previous process could have
    /// accepted (and so could have had replayed to it) is at or before
    /// that, and its replay cache is gone.
    IssuedThrough {
        /// Who issued the nonce.
        nonces: &'a Nonces,
        /// The latest `iat` that needs one.
        iat_through: u64,
    },
}

/// SHA-256 of an access token: the `ath` claim's content, and the key of
/// the verified-token cache. Computed once per request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TokenHash([u8; 32]);

impl TokenHash {
    /// Hashes an access token as presented.
    pub fn of(token: &str) -> Self {
        Self::of_bytes(token.as_bytes())
    }

    /// SHA-256 of any bytes (a WIMSE `oth` header value).
    pub fn of_bytes(bytes: &[u8]) -> Self {
        let hash = digest::digest(&digest::SHA256, bytes);
        let mut out = [0u8; 32];
        out.copy_from_slice(hash.as_ref());
        Self(out)
    }

    /// The digest bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The base64url form used in `ath`.
    pub fn to_ath(&self) -> String {
        b64::encode(self.0)
    }
}

impl fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenHash({})", self.to_ath())
    }
}

/// What the request that carried the proof looked like.
#[derive(Debug, Clone, Copy)]
pub struct ProofContext<'a> {
    /// The request method, compared exactly (case-sensitive).
    pub method: &'a str,
    /// The request URI (normalized once by the caller).
    pub uri: &'a NormalizedUri,
    /// Hash of the access token presented with the proof, if any; when
    /// present, `ath` is required and must match.
    pub token_hash: Option<&'a TokenHash>,
    /// The thumbprint the access token is bound to (`cnf.jkt`), if any.
    pub expected_jkt: Option<&'a Jkt>,
    /// The nonce rule.
    pub nonce: NonceRule<'a>,
    /// Parsed proof keys seen before, if the verifier keeps them.
    pub keys: Option<&'a KeyCache>,
}

/// A proof that passed every check but replay.
#[derive(Debug, Clone)]
pub struct VerifiedProof {
    /// Thumbprint of the proof's key.
    pub jkt: Jkt,
    /// The proof's unique id.
    pub jti: String,
    /// When the client made it.
    pub iat: u64,
}

/// The checks of a proof, in the order they run. Passed to an
/// [`Observer`] as each one passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProofCheck {
    /// Compact JWS syntax, size, alg allow-list, no crit/b64.
    Syntax,
    /// `typ` is `dpop+jwt`.
    Typ,
    /// `jwk` is a public P-256 key on the curve.
    Jwk,
    /// The signature verifies under `jwk`.
    Signature,
    /// `jti` present, non-empty, not too long.
    Jti,
    /// `htm` equals the request method.
    Htm,
    /// `htu` equals the request URI after normalization.
    Htu,
    /// `iat` inside the window.
    Iat,
    /// `ath` equals the hash of the presented token.
    Ath,
    /// The proof key's thumbprint equals the token's `cnf.jkt`.
    KeyBinding,
    /// `nonce` accepted.
    Nonce,
}

impl ProofCheck {
    /// Every check, in the order they run.
    pub const ALL: [Self; 11] = [
        Self::Syntax,
        Self::Typ,
        Self::Jwk,
        Self::Signature,
        Self::Jti,
        Self::Htm,
        Self::Htu,
        Self::Iat,
        Self::Ath,
        Self::KeyBinding,
        Self::Nonce,
    ];
}

impl fmt::Display for ProofCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Syntax => "compact JWS syntax, size limits, alg ES256, no crit/b64",
            Self::Typ => "typ is dpop+jwt",
            Self::Jwk => "jwk is a public P-256 key on the curve",
            Self::Signature => "signature verifies with the jwk",
            Self::Jti => "jti present and within length",
            Self::Htm => "htm matches the request method",
            Self::Htu => "htu matches the request URI",
            Self::Iat => "iat inside the accepted window",
            Self::Ath => "ath matches the access token",
            Self::KeyBinding => "proof key thumbprint matches the token's cnf.jkt",
            Self::Nonce => "nonce accepted",
        })
    }
}

/// Why a DPoP proof was refused. Every variant but the `Nonce*` ones maps to
/// `invalid_dpop_proof`; those map to `use_dpop_nonce`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProofError {
    /// The JWS itself is unacceptable (syntax, size, alg, signature).
    #[error("{0}")]
    Jws(#[from] JwsError),
    /// `typ` is absent or not `dpop+jwt`.
    #[error("typ is {found:?}, not dpop+jwt")]
    Typ {
        /// The `typ` found, if it was a string.
        found: Option<String>,
    },
    /// The header has no `jwk`.
    #[error("header has no jwk")]
    JwkMissing,
    /// The `jwk` is unacceptable.
    #[error("jwk: {0}")]
    Jwk(#[from] JwkError),
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
    /// `jti` is the empty string.
    #[error("jti is empty")]
    JtiEmpty,
    /// `jti` is longer than allowed.
    #[error("jti is {len} bytes, more than {max}")]
    JtiTooLong {
        /// Its length.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// `htm` is not the request method.
    #[error("htm {found:?} does not match the request method {expected:?}")]
    HtmMismatch {
        /// Request method.
        expected: String,
        /// Claimed method.
        found: String,
    },
    /// `htu` is not a valid HTTP(S) URI.
    #[error("htu is not a valid http(s) URI: {0}")]
    HtuInvalid(UriError),
    /// `htu` names another URI.
    #[error("htu {found} does not match the request URI {expected}")]
    HtuMismatch {
        /// Normalized request URI.
        expected: String,
        /// Normalized claim.
        found: String,
    },
    /// `iat` is older than the window allows.
    #[error("iat {iat} is more than {max_age}s before now {now}")]
    IatTooOld {
        /// The claim.
        iat: u64,
        /// The verifier's time.
        now: u64,
        /// The window.
        max_age: u64,
    },
    /// `iat` is further in the future than the skew allows.
    #[error("iat {iat} is more than {max_skew}s after now {now}")]
    IatInFuture {
        /// The claim.
        iat: u64,
        /// The verifier's time.
        now: u64,
        /// The allowed skew.
        max_skew: u64,
    },
    /// An access token was presented but the proof has no `ath`.
    #[error("ath is missing although an access token was presented")]
    AthMissing,
    /// `ath` is not the hash of the presented token.
    #[error("ath does not match the presented access token")]
    AthMismatch,
    /// The proof key is not the one the token is bound to.
    #[error("proof key {found} is not the key {expected} the token is bound to")]
    KeyBindingMismatch {
        /// The token's `cnf.jkt`.
        expected: Jkt,
        /// The proof key's thumbprint.
        found: Jkt,
    },
    /// A nonce is required and the proof has none.
    #[error("a nonce is required")]
    NonceMissing,
    /// The nonce is not one we issued recently (or not the one required).
    #[error("nonce is not valid: {0}")]
    NonceInvalid(#[from] NonceError),
    /// The same proof (`jti` for this key) was seen inside its window.
    #[error("proof was already used (jti replayed)")]
    Replayed,
}

impl ProofError {
    /// Whether the right answer is `use_dpop_nonce` with a fresh nonce.
    pub fn wants_nonce(&self) -> bool {
        matches!(self, Self::NonceMissing | Self::NonceInvalid(_))
    }
}

/// Verifies a DPoP proof against the request it came with.
///
/// # Errors
/// The first [`ProofError`] found; checks run in [`ProofCheck`] order.
pub fn verify(
    proof: &str,
    ctx: &ProofContext<'_>,
    config: &ProofConfig,
    now: u64,
    observer: &mut impl Observer<ProofCheck>,
) -> Result<VerifiedProof, ProofError> {
    let jws = Jws::parse(proof, &config.limits)?;
    observer.passed(ProofCheck::Syntax);

    if !jws.typ_is(DPOP_TYP) {
        return Err(ProofError::Typ {
            found: jws.typ().map(jws::truncate),
        });
    }
    observer.passed(ProofCheck::Typ);

    let jwk = jws.header().get("jwk").ok_or(ProofError::JwkMissing)?;
    let (key, jkt) = match ctx.keys {
        Some(cache) => PublicKey::from_jwk_cached(jwk, cache)?,
        None => {
            let key = PublicKey::from_jwk(jwk)?;
            let jkt = key.thumbprint();
            (key, jkt)
        }
    };
    observer.passed(ProofCheck::Jwk);

    jws.verify(&key)?;
    observer.passed(ProofCheck::Signature);

    let claims = jws.payload();
    let jti = claims::string(claims, "jti")?;
    if jti.is_empty() {
        return Err(ProofError::JtiEmpty);
    }
    if jti.len() > config.max_jti_len {
        return Err(ProofError::JtiTooLong {
            len: jti.len(),
            max: config.max_jti_len,
        });
    }
    observer.passed(ProofCheck::Jti);

    let htm = claims::string(claims, "htm")?;
    if htm != ctx.method {
        return Err(ProofError::HtmMismatch {
            expected: jws::truncate(ctx.method),
            found: jws::truncate(htm),
        });
    }
    observer.passed(ProofCheck::Htm);

    let htu =
        NormalizedUri::parse(claims::string(claims, "htu")?).map_err(ProofError::HtuInvalid)?;
    if &htu != ctx.uri {
        return Err(ProofError::HtuMismatch {
            expected: jws::truncate(ctx.uri.as_str()),
            found: jws::truncate(htu.as_str()),
        });
    }
    observer.passed(ProofCheck::Htu);

    let iat = claims::integer(claims, "iat")?;
    if iat.saturating_add(config.max_age) < now {
        return Err(ProofError::IatTooOld {
            iat,
            now,
            max_age: config.max_age,
        });
    }
    if iat > now.saturating_add(config.max_skew) {
        return Err(ProofError::IatInFuture {
            iat,
            now,
            max_skew: config.max_skew,
        });
    }
    observer.passed(ProofCheck::Iat);

    if let Some(expected) = ctx.token_hash {
        let ath = claims::optional_string(claims, "ath")?.ok_or(ProofError::AthMissing)?;
        // Compare digests, not strings: one canonical encoding only.
        let found = b64::decode_array::<32>(ath.as_bytes()).map_err(|_| ProofError::AthMismatch)?;
        if found != expected.0 {
            return Err(ProofError::AthMismatch);
        }
        observer.passed(ProofCheck::Ath);
    }

    if let Some(expected) = ctx.expected_jkt {
        if *expected != jkt {
            return Err(ProofError::KeyBindingMismatch {
                expected: *expected,
                found: jkt,
            });
        }
        observer.passed(ProofCheck::KeyBinding);
    }

    match ctx.nonce {
        NonceRule::NotRequired => {}
        NonceRule::Issued(nonces) => {
            let nonce = nonce_claim(claims)?;
            nonces.check(nonce, now)?;
            observer.passed(ProofCheck::Nonce);
        }
        NonceRule::Exact(expected) => {
            if nonce_claim(claims)? != expected {
                return Err(ProofError::NonceInvalid(NonceError::Mismatch));
            }
            observer.passed(ProofCheck::Nonce);
        }
        NonceRule::IssuedThrough {
            nonces,
            iat_through,
        } => {
            if iat <= iat_through {
                let nonce = nonce_claim(claims)?;
                nonces.check(nonce, now)?;
                observer.passed(ProofCheck::Nonce);
            }
        }
    }

    Ok(VerifiedProof {
        jkt,
        jti: jti.to_owned(),
        iat,
    })
}

fn nonce_claim(claims: &Map<String, Value>) -> Result<&str, ProofError> {
    claims::optional_string(claims, "nonce")?.ok_or(ProofError::NonceMissing)
}

impl From<ClaimError> for ProofError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::Missing(name) => Self::MissingClaim(name),
            ClaimError::WrongType { claim, expected } => Self::ClaimType { claim, expected },
        }
    }
}

/// A DPoP key pair held by a client (a sidecar): signs proofs. The
/// protected header never changes for a key, so it is encoded once.
pub struct ProofKey {
    key: SigningKey,
    header_b64: String,
}

impl ProofKey {
    /// Wraps a signing key.
    pub fn new(key: SigningKey) -> Self {
        let jwk: Value = serde_json::from_str(&key.public_key().to_jwk_json())
            .unwrap_or_else(|_| unreachable!("to_jwk_json emits a JSON object"));
        let header_b64 = jws::encode_header(&json!({
            "typ": DPOP_TYP,
            "alg": jws::ALG_ES256,
            "jwk": jwk,
        }));
        Self { key, header_b64 }
    }

    /// Generates a fresh key.
    ///
    /// # Errors
    /// If the system random source fails.
    pub fn generate() -> Result<Self, crate::jose::KeyError> {
        SigningKey::generate().map(Self::new)
    }

    /// The thumbprint that tokens for this key carry in `cnf.jkt`.
    pub fn thumbprint(&self) -> Jkt {
        self.key.thumbprint()
    }

    /// The underlying signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// Mints a proof for one request.
    ///
    /// `uri`'s query and fragment are dropped for `htu`; `access_token`
    /// adds `ath`; `nonce` adds the server's nonce.
    ///
    /// # Errors
    /// Only if the crypto library fails.
    pub fn mint(
        &self,
        method: &str,
        uri: &str,
        access_token: Option<&str>,
        nonce: Option<&str>,
        now: u64,
    ) -> Result<String, SignError> {
        let mut jti = [0u8; 16];
        SystemRandom::new().fill(&mut jti).map_err(|_| SignError)?;
        let mut claims = Map::with_capacity(6);
        claims.insert("jti".into(), Value::String(b64::encode(jti)));
        claims.insert("htm".into(), Value::String(method.to_owned()));
        claims.insert(
            "htu".into(),
            Value::String(strip_query_and_fragment(uri).to_owned()),
        );
        claims.insert("iat".into(), Value::from(now));
        if let Some(token) = access_token {
            claims.insert("ath".into(), Value::String(TokenHash::of(token).to_ath()));
        }
        if let Some(nonce) = nonce {
            claims.insert("nonce".into(), Value::String(nonce.to_owned()));
        }
        let payload = serde_json::to_vec(&claims).map_err(|_| SignError)?;
        jws::sign_compact(&self.header_b64, &payload, &self.key)
    }
}

impl fmt::Debug for ProofKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProofKey").field("key", &self.key).finish()
    }
}
