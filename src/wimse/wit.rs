//! Workload Identity Tokens (draft-ietf-wimse-workload-creds §3.1, the
//! SPIFFE WIT-SVID profile): [`mint`]ed by the broker for a sidecar's own
//! key, and [`verify`]ed by `kid` against a [`WitKeys`] set.
//!
//! A minted WIT is ES256, `kid`, `typ: wit+jwt`, `sub` the SPIFFE ID,
//! `cnf.jwk` the sidecar's public key with its `alg`, `iat`, `nbf`,
//! `exp`, `jti`, no `aud` and no `iss`, so it satisfies both the WIMSE
//! draft and the SPIFFE WIT-SVID profile: `kid` present, `alg` ES256 (on
//! both profiles' lists), and no issuer a verifier could mistake for an
//! OpenID provider.
//!
//! Verification runs the checks of [`WitCheck`] in order: a size cap
//! before anything is decoded, the strict JWS rules of
//! [`crate::jose::jws`] with ES256 or EdDSA, `typ`, `kid`, the signature,
//! `sub` (an absolute URI; a SPIFFE ID when asked), `exp`/`nbf`/`iat`
//! against `now` with a bounded leeway, `cnf.jwk` (a public key with an
//! `alg` that fits it) and `jti`. `aud` and `iss` are not looked at. A WIT
//! is never enough alone: the caller verifies the WPT that came with it
//! ([`super::wpt::verify`]).

use super::error::WitError;
use super::keys::WitKeys;
use crate::dpop::TokenHash;
use crate::identity::{SpiffeId, SpiffeIdError};
use crate::jose::claims;
use crate::jose::jws::{self, ALG_ES256, ES256_OR_EDDSA, Jws, JwsError, Limits};
use crate::jose::key::SignError;
use crate::jose::{Alg, Jkt, Observer, PublicKey, VerifyingKey};
use crate::token::TokenSigner;
use serde_json::{Map, Value, json};
use std::fmt;
use zeroize::Zeroizing;

/// The `typ` of a WIT.
pub const WIT_TYP: &str = "wit+jwt";
/// The same media type in full, also accepted.
pub const WIT_MEDIA_TYPE: &str = "application/wit+jwt";
/// Longest `sub` accepted, in bytes (the SPIFFE ID limit).
pub const MAX_SUB_LEN: usize = 2048;
/// The largest clock leeway a [`WitConfig`] may ask for, in seconds.
pub const MAX_LEEWAY: u64 = 300;

/// A WIT string. Redacted in `Debug`, wiped on drop: with a proof from
/// its key it is a credential, and a captured one names its holder.
#[derive(Clone, PartialEq, Eq)]
pub struct Wit(Zeroizing<String>);

impl Wit {
    /// Wraps a WIT string (as a sidecar receives one from the broker).
    pub fn new(token: String) -> Self {
        Self(Zeroizing::new(token))
    }

    /// The token text, for the places that must send or hash it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Wit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Wit(<redacted, {} bytes>)", self.0.len())
    }
}

/// What a minted WIT says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitClaims {
    /// The workload it names.
    pub sub: SpiffeId,
    /// The thumbprint (RFC 7638) of its `cnf.jwk`: what revocations by
    /// key, and an access token's `cnf.jkt` sent with it, match.
    pub jkt: Jkt,
    /// Issued at (also its `nbf`).
    pub iat: u64,
    /// Expires at.
    pub exp: u64,
    /// Unique id (128 random bits in it).
    pub jti: String,
    /// The signing key's id.
    pub kid: String,
}

/// The `cnf.jwk` of a P-256 key: its RFC 7638 members and `alg: ES256`
/// (both drafts require `alg`: the proof must be made with it).
pub fn confirmation_jwk(key: &PublicKey) -> Value {
    // `to_jwk_json` writes a fixed-shape JSON object from two encoded
    // coordinates: it always parses.
    let mut jwk: serde_json::Map<String, Value> =
        serde_json::from_str(&key.to_jwk_json()).expect("a P-256 JWK is a JSON object");
    jwk.insert("alg".into(), Value::from(ALG_ES256));
    Value::Object(jwk)
}

/// Mints a WIT naming `sub` and binding `key`, signed by `signer`, valid
/// from `now` for `ttl` seconds (at least one).
///
/// # Errors
/// Only if the crypto library or the random source fails.
pub fn mint(
    signer: &TokenSigner,
    sub: &SpiffeId,
    key: &PublicKey,
    ttl: u64,
    now: u64,
) -> Result<(Wit, WitClaims), SignError> {
    let claims = WitClaims {
        sub: sub.clone(),
        jkt: key.thumbprint(),
        iat: now,
        exp: now.saturating_add(ttl.max(1)),
        jti: signer.next_jti(now)?,
        kid: signer.kid().to_owned(),
    };
    let header = jws::encode_header(&json!({
        "typ": WIT_TYP,
        "alg": ALG_ES256,
        "kid": claims.kid,
    }));
    let payload = json!({
        "sub": claims.sub.as_str(),
        "cnf": { "jwk": confirmation_jwk(key) },
        "iat": claims.iat,
        "nbf": claims.iat,
        "exp": claims.exp,
        "jti": claims.jti,
    });
    let payload = serde_json::to_vec(&payload).map_err(|_| SignError)?;
    let token = jws::sign_compact(&header, &payload, signer.key())?;
    Ok((Wit(Zeroizing::new(token)), claims))
}

/// WIT verification settings.
#[derive(Debug, Clone)]
pub struct WitConfig {
    /// Clock leeway for `exp`, `nbf` and `iat`, in seconds; at most
    /// [`MAX_LEEWAY`] is used, whatever is asked.
    pub leeway: u64,
    /// Refuse a WIT whose `sub` is not a SPIFFE ID (a `wimse:` or other
    /// URI is accepted otherwise).
    pub require_spiffe: bool,
    /// Longest accepted `jti`, in bytes.
    pub max_jti_len: usize,
    /// JWS size caps, checked before anything is decoded.
    pub limits: Limits,
}

impl Default for WitConfig {
    /// 30 s leeway, any absolute URI as `sub`, `jti` up to 256 bytes, the
    /// default JWS caps (8 KiB).
    fn default() -> Self {
        Self {
            leeway: 30,
            require_spiffe: false,
            max_jti_len: 256,
            limits: Limits::default(),
        }
    }
}

impl WitConfig {
    /// The leeway in force: [`WitConfig::leeway`] capped at
    /// [`MAX_LEEWAY`].
    pub fn effective_leeway(&self) -> u64 {
        self.leeway.min(MAX_LEEWAY)
    }
}

/// The checks of a WIT, in the order they run. Passed to an [`Observer`]
/// as each one passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WitCheck {
    /// Size caps, compact JWS syntax, alg ES256 or EdDSA, no crit/b64.
    Syntax,
    /// `typ` is `wit+jwt`.
    Typ,
    /// `kid` names a key of the WIT key set.
    Kid,
    /// The alg fits that key and the signature verifies with it.
    Signature,
    /// `sub` is an absolute URI (a SPIFFE ID when required).
    Subject,
    /// `exp`, `nbf`, `iat` against now with leeway.
    Times,
    /// `cnf.jwk` is a public key with an `alg` that fits it.
    Confirmation,
    /// `jti`, when present, within length.
    Jti,
}

impl WitCheck {
    /// Every check, in the order they run.
    pub const ALL: [Self; 8] = [
        Self::Syntax,
        Self::Typ,
        Self::Kid,
        Self::Signature,
        Self::Subject,
        Self::Times,
        Self::Confirmation,
        Self::Jti,
    ];
}

impl fmt::Display for WitCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Syntax => "compact JWS syntax, size limits, alg ES256 or EdDSA, no crit/b64",
            Self::Typ => "typ is wit+jwt",
            Self::Kid => "kid names a key in the WIT key set",
            Self::Signature => "signature verifies with that key",
            Self::Subject => "sub is an absolute URI (a SPIFFE ID when required)",
            Self::Times => "exp, nbf and iat are valid now (with leeway)",
            Self::Confirmation => "cnf.jwk is a public key with a fitting alg",
            Self::Jti => "jti, when present, within length",
        })
    }
}

/// A WIT that passed every check: who it names and the key its WPTs must
/// be signed with.
#[derive(Debug, Clone)]
pub struct VerifiedWit {
    /// The workload identifier, as in the token.
    pub sub: String,
    /// `sub` as a SPIFFE ID, when it is one.
    pub spiffe_id: Option<SpiffeId>,
    /// The workload's key (`cnf.jwk`).
    pub key: VerifyingKey,
    /// The algorithm its proofs must use (`cnf.jwk.alg`).
    pub alg: Alg,
    /// RFC 7638 thumbprint of `cnf.jwk`.
    pub jkt: Jkt,
    /// Unique id, when present.
    pub jti: Option<String>,
    /// Issued at, when present.
    pub iat: Option<u64>,
    /// Not before, when present.
    pub nbf: Option<u64>,
    /// Expires at.
    pub exp: u64,
    /// The issuer key's id.
    pub kid: String,
    /// SHA-256 of the WIT as received: what a WPT's `wth` must carry.
    pub wth: TokenHash,
}

/// Verifies a WIT against the issuer keys `keys` at `now`.
///
/// # Errors
/// The first [`WitError`] found; checks run in [`WitCheck`] order.
pub fn verify(
    text: &str,
    keys: &WitKeys,
    now: u64,
    config: &WitConfig,
    observer: &mut impl Observer<WitCheck>,
) -> Result<VerifiedWit, WitError> {
    let jws = Jws::parse_with(text, &config.limits, ES256_OR_EDDSA).map_err(WitError::Jws)?;
    observer.passed(WitCheck::Syntax);

    match jws.typ() {
        Some(WIT_TYP | WIT_MEDIA_TYPE) => {}
        other => {
            return Err(WitError::Typ {
                found: other.map(jws::truncate),
            });
        }
    }
    observer.passed(WitCheck::Typ);

    let kid = jws
        .header()
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(WitError::KidMissing)?;
    let issuer = keys
        .get(kid)
        .ok_or_else(|| WitError::UnknownKid(jws::truncate(kid)))?;
    observer.passed(WitCheck::Kid);

    jws.verify_with(issuer).map_err(|e| match e {
        JwsError::AlgKeyMismatch { alg, key } => WitError::IssuerKeyMismatch { alg, key },
        _ => WitError::BadSignature,
    })?;
    observer.passed(WitCheck::Signature);

    let claims = jws.payload();
    let sub = claims::string(claims, "sub")?;
    let spiffe_id = subject(sub, config.require_spiffe)?;
    observer.passed(WitCheck::Subject);

    let leeway = config.effective_leeway();
    let exp = claims::integer(claims, "exp")?;
    let nbf = claims::optional_integer(claims, "nbf")?;
    let iat = claims::optional_integer(claims, "iat")?;
    if now > exp.saturating_add(leeway) {
        return Err(WitError::Expired { exp, now, leeway });
    }
    if let Some(nbf) = nbf
        && nbf > now.saturating_add(leeway)
    {
        return Err(WitError::NotYetValid { nbf, now });
    }
    if let Some(iat) = iat
        && iat > now.saturating_add(leeway)
    {
        return Err(WitError::IssuedInFuture { iat, now });
    }
    observer.passed(WitCheck::Times);

    let (key, alg) = confirmation(claims)?;
    observer.passed(WitCheck::Confirmation);

    let jti = claims::optional_string(claims, "jti")?;
    if let Some(jti) = jti
        && (jti.is_empty() || jti.len() > config.max_jti_len)
    {
        return Err(WitError::Jti {
            len: jti.len(),
            max: config.max_jti_len,
        });
    }
    observer.passed(WitCheck::Jti);

    Ok(VerifiedWit {
        sub: sub.to_owned(),
        spiffe_id,
        jkt: key.thumbprint(),
        key,
        alg,
        jti: jti.map(str::to_owned),
        iat,
        nbf,
        exp,
        kid: kid.to_owned(),
        wth: TokenHash::of(text),
    })
}

/// Checks `sub` is an absolute URI (RFC 3986 `scheme ":" …`, ASCII, no
/// whitespace or control characters, at most [`MAX_SUB_LEN`] bytes) and
/// returns it as a SPIFFE ID when it is one. A `sub` in the `spiffe`
/// scheme must be a valid SPIFFE ID whatever `require_spiffe` says, so no
/// consumer ever meets a `spiffe:` string that is not one.
fn subject(sub: &str, require_spiffe: bool) -> Result<Option<SpiffeId>, WitError> {
    if sub.len() > MAX_SUB_LEN {
        return Err(WitError::SubNotUri("longer than 2048 bytes"));
    }
    if !sub.is_ascii() {
        return Err(WitError::SubNotUri("not ASCII"));
    }
    if sub.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(WitError::SubNotUri(
            "holds whitespace or a control character",
        ));
    }
    let Some((scheme, rest)) = sub.split_once(':') else {
        return Err(WitError::SubNotUri("no scheme"));
    };
    let mut chars = scheme.bytes();
    let scheme_ok = chars.next().is_some_and(|b| b.is_ascii_alphabetic())
        && chars.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    if !scheme_ok {
        return Err(WitError::SubNotUri("malformed scheme"));
    }
    if rest.is_empty() {
        return Err(WitError::SubNotUri("nothing after the scheme"));
    }
    if scheme.eq_ignore_ascii_case("spiffe") {
        return sub.parse().map(Some).map_err(WitError::NotSpiffe);
    }
    if require_spiffe {
        return Err(WitError::NotSpiffe(SpiffeIdError::WrongScheme));
    }
    Ok(None)
}

/// `cnf.jwk`: a public EC P-256 or OKP Ed25519 key whose required `alg`
/// is ES256 or EdDSA to match.
fn confirmation(claims: &Map<String, Value>) -> Result<(VerifyingKey, Alg), WitError> {
    let cnf = object(claims.get("cnf"), "cnf")?;
    let jwk_map = object(cnf.get("jwk"), "cnf.jwk")?;
    let jwk = &cnf["jwk"];
    let key = VerifyingKey::from_jwk(jwk).map_err(WitError::CnfJwk)?;
    let alg = match jwk_map.get("alg") {
        None => return Err(WitError::MissingClaim("cnf.jwk.alg")),
        Some(Value::String(alg)) => alg,
        Some(_) => {
            return Err(WitError::ClaimType {
                claim: "cnf.jwk.alg",
                expected: "a string",
            });
        }
    };
    let alg = Alg::from_name(alg).ok_or_else(|| WitError::CnfAlgNotAllowed(jws::truncate(alg)))?;
    if alg != key.alg() {
        return Err(WitError::CnfAlgKeyMismatch {
            alg: alg.as_str(),
            key: key.key_type(),
        });
    }
    Ok((key, alg))
}

/// A member that must be a JSON object, named by its path in errors.
fn object<'a>(
    value: Option<&'a Value>,
    name: &'static str,
) -> Result<&'a Map<String, Value>, WitError> {
    match value {
        None => Err(WitError::MissingClaim(name)),
        Some(Value::Object(map)) => Ok(map),
        Some(_) => Err(WitError::ClaimType {
            claim: name,
            expected: "an object",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_uris_pass_and_others_are_named() {
        assert_eq!(
            subject("wimse://example.com/specific-workload", false),
            Ok(None)
        );
        assert_eq!(subject("urn:example:w", false), Ok(None));
        for (sub, why) in [
            ("", "no scheme"),
            ("example.com/w", "no scheme"),
            ("1x://a", "malformed scheme"),
            (":x", "malformed scheme"),
            ("wimse:", "nothing after the scheme"),
            ("wimse://a b", "holds whitespace or a control character"),
            ("wimse://a\tb", "holds whitespace or a control character"),
            ("wimse://a\u{7f}", "holds whitespace or a control character"),
            ("wimse://caf\u{e9}", "not ASCII"),
        ] {
            assert_eq!(
                subject(sub, false),
                Err(WitError::SubNotUri(why)),
                "{sub:?}"
            );
        }
        let long = format!("wimse://a/{}", "b".repeat(MAX_SUB_LEN));
        assert_eq!(
            subject(&long, false),
            Err(WitError::SubNotUri("longer than 2048 bytes"))
        );
    }

    #[test]
    fn spiffe_ids_are_exposed_and_required_when_asked() {
        let id = subject("spiffe://example.org/ns/a/sa/b", true)
            .unwrap()
            .unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(
            subject("wimse://example.com/w", true),
            Err(WitError::NotSpiffe(SpiffeIdError::WrongScheme))
        );
        // In the spiffe scheme it must be a SPIFFE ID even when not required.
        assert!(matches!(
            subject("spiffe://Example.org/x", false),
            Err(WitError::NotSpiffe(_))
        ));
        assert!(matches!(
            subject("SPIFFE://example.org/x", false),
            Err(WitError::NotSpiffe(SpiffeIdError::WrongScheme))
        ));
    }

    #[test]
    fn the_leeway_is_capped() {
        let config = WitConfig {
            leeway: 86_400,
            ..WitConfig::default()
        };
        assert_eq!(config.effective_leeway(), MAX_LEEWAY);
        assert_eq!(WitConfig::default().effective_leeway(), 30);
    }

    #[test]
    fn a_minted_wit_debugs_redacted() {
        let wit = Wit::new("eyJhbGciOiJFUzI1NiJ9.e30.sig".into());
        let debug = format!("{wit:?}");
        assert!(!debug.contains("eyJ"), "{debug}");
        assert!(debug.contains("redacted"), "{debug}");
    }
}
