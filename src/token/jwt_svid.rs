//! SPIFFE JWT-SVIDs: ES256 JWTs naming a workload (`sub`, a SPIFFE ID) for
//! one or more audiences, signed with the broker's token-signing keys.
//!
//! A JWT-SVID is a bearer token: it carries no `cnf`, no `scope`, no
//! `client_id`, and its `typ` is `JWT` (or absent), so it can never pass
//! as a tally access token (`at+jwt`, `cnf.jkt` required) nor an access
//! token as a JWT-SVID (`typ` refused, `cnf` refused). Verification takes
//! the key only from the [`Jwks`] it is given, by `kid`, and checks times
//! against the caller's `now` with a bounded leeway.

use super::access::TokenSigner;
use super::claims::Audience;
use super::jwks::Jwks;
use crate::identity::{SpiffeId, SpiffeIdError};
use crate::jose::claims::{self, ClaimError};
use crate::jose::jws::{self, Jws, JwsError, Limits};
use crate::jose::key::SignError;
use serde_json::{Map, Value, json};
use std::fmt;
use zeroize::Zeroizing;

/// The `typ` tally writes in a JWT-SVID header.
pub const JWT_SVID_TYP: &str = "JWT";
/// The largest leeway [`verify`] applies, whatever it is asked for.
pub const MAX_LEEWAY: u64 = 300;
/// Longest `jti` accepted.
const MAX_JTI_LEN: usize = 256;
/// Most audiences one JWT-SVID may name.
pub const MAX_AUDIENCES: usize = 16;

/// A JWT-SVID string. Redacted in `Debug`, wiped on drop.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtSvid(Zeroizing<String>);

impl JwtSvid {
    /// Wraps a JWT-SVID string (as a sidecar receives one from the broker).
    pub fn new(token: String) -> Self {
        Self(Zeroizing::new(token))
    }

    /// The token text, for the one place that must send it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for JwtSvid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JwtSvid(<redacted, {} bytes>)", self.0.len())
    }
}

/// What a minted JWT-SVID says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtSvidClaims {
    /// The workload it names.
    pub sub: SpiffeId,
    /// Its audiences, as asked for (deduplicated by the caller).
    pub aud: Vec<Audience>,
    /// Issued at.
    pub iat: u64,
    /// Expires at.
    pub exp: u64,
    /// Unique id (128 random bits in it).
    pub jti: String,
    /// The signing key's id.
    pub kid: String,
}

/// Mints a JWT-SVID for `sub` and `aud` with `signer`'s key, valid from
/// `now` for `ttl` seconds (at least one).
///
/// # Errors
/// Only if the crypto library or the random source fails.
pub fn mint(
    signer: &TokenSigner,
    sub: &SpiffeId,
    aud: &[Audience],
    ttl: u64,
    now: u64,
) -> Result<(JwtSvid, JwtSvidClaims), SignError> {
    let claims = JwtSvidClaims {
        sub: sub.clone(),
        aud: aud.to_vec(),
        iat: now,
        exp: now.saturating_add(ttl.max(1)),
        jti: signer.next_jti(now)?,
        kid: signer.kid().to_owned(),
    };
    let header = jws::encode_header(&json!({
        "typ": JWT_SVID_TYP,
        "alg": jws::ALG_ES256,
        "kid": claims.kid,
    }));
    // One audience is a string, several an array (RFC 7519 §4.1.3).
    let aud = match aud {
        [one] => json!(one.as_str()),
        many => json!(many.iter().map(Audience::as_str).collect::<Vec<_>>()),
    };
    let payload = json!({
        "sub": claims.sub.as_str(),
        "aud": aud,
        "iat": claims.iat,
        "exp": claims.exp,
        "jti": claims.jti,
    });
    let payload = serde_json::to_vec(&payload).map_err(|_| SignError)?;
    let token = jws::sign_compact(&header, &payload, signer.key())?;
    Ok((JwtSvid(Zeroizing::new(token)), claims))
}

/// A JWT-SVID that passed [`verify`].
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedJwtSvid {
    /// The workload it names.
    pub sub: SpiffeId,
    /// Its audiences, as received.
    pub aud: Vec<String>,
    /// Expires at.
    pub exp: u64,
    /// Issued at, if it says.
    pub iat: Option<u64>,
    /// Its id, if it has one.
    pub jti: Option<String>,
    /// The key that signed it.
    pub kid: String,
    /// Every claim as received (the Workload API hands them back).
    pub claims: Map<String, Value>,
}

/// Why a JWT-SVID was refused. No variant holds the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtSvidError {
    /// The JWS itself is unacceptable (size, syntax, alg, signature).
    #[error("{0}")]
    Jws(#[from] JwsError),
    /// `typ` is present and not `JWT` or `JOSE` (an access token, a DPoP
    /// proof, a workload identity token…).
    #[error("typ is {found:?}, not JWT or JOSE")]
    Typ {
        /// The `typ` found, if it was a string.
        found: Option<String>,
    },
    /// No `kid` string in the header.
    #[error("header has no kid")]
    KidMissing,
    /// `kid` names no key of the bundle.
    #[error("kid {0:?} is not in the JWT bundle")]
    UnknownKid(String),
    /// A `cnf` claim: a token bound to a key is not a JWT-SVID.
    #[error("claim cnf is present: a key-bound token is not a JWT-SVID")]
    Confirmation,
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
    /// `sub` is not a SPIFFE ID.
    #[error("sub is not a SPIFFE ID: {0}")]
    Subject(SpiffeIdError),
    /// `aud` does not include the expected audience.
    #[error("aud does not include {expected:?}")]
    AudienceMismatch {
        /// The audience asked for.
        expected: String,
    },
    /// Expired, even allowing for leeway.
    #[error("JWT-SVID expired at {exp} (now {now})")]
    Expired {
        /// Expiry.
        exp: u64,
        /// Verifier's time.
        now: u64,
    },
    /// Not valid yet (`nbf`), even allowing for leeway.
    #[error("JWT-SVID not valid before {nbf} (now {now})")]
    NotYetValid {
        /// Not-before.
        nbf: u64,
        /// Verifier's time.
        now: u64,
    },
    /// Issued in the future, beyond leeway.
    #[error("JWT-SVID issued at {iat}, in the future (now {now})")]
    IssuedInFuture {
        /// Issued at.
        iat: u64,
        /// Verifier's time.
        now: u64,
    },
    /// `jti` is empty or too long.
    #[error("jti is empty or longer than {MAX_JTI_LEN} bytes")]
    Jti,
}

impl From<ClaimError> for JwtSvidError {
    fn from(e: ClaimError) -> Self {
        match e {
            ClaimError::Missing(name) => Self::MissingClaim(name),
            ClaimError::WrongType { claim, expected } => Self::ClaimType { claim, expected },
        }
    }
}

/// Verifies a JWT-SVID for `audience` against the JWT bundle `jwks` at
/// `now`, with `leeway` seconds (at most [`MAX_LEEWAY`]) for `exp`, `nbf`
/// and `iat`.
///
/// # Errors
/// The first [`JwtSvidError`] found: size and syntax (caps before any
/// decoding), alg ES256 only, typ, kid, signature, no `cnf`, sub, aud,
/// times, jti.
pub fn verify(
    jwt: &str,
    jwks: &Jwks,
    audience: &str,
    now: u64,
    leeway: u64,
) -> Result<VerifiedJwtSvid, JwtSvidError> {
    let leeway = leeway.min(MAX_LEEWAY);
    let jws = Jws::parse(jwt, &Limits::default())?;

    match jws.header().get("typ") {
        None => {}
        Some(Value::String(_)) if jws.typ_is(JWT_SVID_TYP) || jws.typ_is("JOSE") => {}
        Some(_) => {
            return Err(JwtSvidError::Typ {
                found: jws.typ().map(jws::truncate),
            });
        }
    }

    let kid = jws
        .header()
        .get("kid")
        .and_then(Value::as_str)
        .ok_or(JwtSvidError::KidMissing)?;
    let key = jwks
        .get(kid)
        .ok_or_else(|| JwtSvidError::UnknownKid(jws::truncate(kid)))?;
    jws.verify(key)?;

    let claims = jws.payload();
    if claims.contains_key("cnf") {
        return Err(JwtSvidError::Confirmation);
    }

    let sub: SpiffeId = claims::string(claims, "sub")?
        .parse()
        .map_err(JwtSvidError::Subject)?;

    let aud = audiences(claims)?;
    if !aud.iter().any(|a| a == audience) {
        return Err(JwtSvidError::AudienceMismatch {
            expected: jws::truncate(audience),
        });
    }

    let exp = claims::integer(claims, "exp")?;
    if now >= exp.saturating_add(leeway) {
        return Err(JwtSvidError::Expired { exp, now });
    }
    if let Some(nbf) = claims::optional_integer(claims, "nbf")?
        && nbf > now.saturating_add(leeway)
    {
        return Err(JwtSvidError::NotYetValid { nbf, now });
    }
    let iat = claims::optional_integer(claims, "iat")?;
    if let Some(iat) = iat
        && iat > now.saturating_add(leeway)
    {
        return Err(JwtSvidError::IssuedInFuture { iat, now });
    }

    let jti = claims::optional_string(claims, "jti")?;
    if jti.is_some_and(|j| j.is_empty() || j.len() > MAX_JTI_LEN) {
        return Err(JwtSvidError::Jti);
    }

    Ok(VerifiedJwtSvid {
        sub,
        aud,
        exp,
        iat,
        jti: jti.map(str::to_owned),
        kid: kid.to_owned(),
        claims: claims.clone(),
    })
}

/// `aud`: a string, or a non-empty array of at most [`MAX_AUDIENCES`]
/// strings.
fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, JwtSvidError> {
    const EXPECTED: &str = "a string or an array of 1 to 16 strings";
    let wrong = JwtSvidError::ClaimType {
        claim: "aud",
        expected: EXPECTED,
    };
    match claims.get("aud") {
        None => Err(JwtSvidError::MissingClaim("aud")),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) if !items.is_empty() && items.len() <= MAX_AUDIENCES => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or_else(|| wrong.clone()))
            .collect(),
        Some(_) => Err(wrong),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::SigningKey;
    use crate::token::{MintRequest, TokenClass, TokenConfig, TokenError};

    const NOW: u64 = 1_800_000_000;
    const AUD: &str = "spiffe://td/ns/pay/sa/payments";

    fn signer() -> TokenSigner {
        TokenSigner::new(SigningKey::generate().unwrap(), "k1", "https://broker")
    }

    fn jwks(signer: &TokenSigner) -> Jwks {
        let mut jwks = Jwks::default();
        jwks.insert("k1", signer.key().public_key().clone());
        jwks
    }

    fn sub() -> SpiffeId {
        "spiffe://td/ns/shop/sa/checkout".parse().unwrap()
    }

    /// A JWS signed by `signer` with any header and payload.
    fn forge(signer: &TokenSigner, header: Value, payload: Value) -> String {
        jws::sign_compact(
            &jws::encode_header(&header),
            payload.to_string().as_bytes(),
            signer.key(),
        )
        .unwrap()
    }

    fn good_claims() -> Value {
        json!({"sub": sub().as_str(), "aud": AUD, "exp": NOW + 60, "iat": NOW})
    }

    fn header() -> Value {
        json!({"alg": "ES256", "kid": "k1", "typ": "JWT"})
    }

    #[test]
    fn a_minted_jwt_svid_verifies_with_its_claims() {
        let s = signer();
        let aud: Audience = AUD.parse().unwrap();
        let (svid, minted) = mint(&s, &sub(), std::slice::from_ref(&aud), 300, NOW).unwrap();
        let v = verify(svid.expose(), &jwks(&s), AUD, NOW, 30).unwrap();
        assert_eq!(v.sub, sub());
        assert_eq!(v.aud, vec![AUD.to_owned()]);
        assert_eq!((v.exp, v.iat), (NOW + 300, Some(NOW)));
        assert_eq!(v.jti.as_deref(), Some(minted.jti.as_str()));
        assert_eq!(v.kid, "k1");
        // One audience is a string; no binding, scope or client id.
        assert_eq!(v.claims["aud"], json!(AUD));
        for absent in ["cnf", "scope", "client_id", "tcl"] {
            assert!(!v.claims.contains_key(absent), "{absent}");
        }
        let jws = Jws::parse(svid.expose(), &Limits::default()).unwrap();
        assert_eq!(jws.typ(), Some("JWT"));
        assert_eq!(jws.header()["alg"], "ES256");
        assert!(!format!("{svid:?}").contains(svid.expose()));
    }

    #[test]
    fn several_audiences_are_an_array_and_each_verifies() {
        let s = signer();
        let auds: Vec<Audience> = [AUD, "https://api.example"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let (svid, _) = mint(&s, &sub(), &auds, 60, NOW).unwrap();
        for aud in [AUD, "https://api.example"] {
            let v = verify(svid.expose(), &jwks(&s), aud, NOW, 0).unwrap();
            assert_eq!(v.claims["aud"], json!([AUD, "https://api.example"]));
        }
        assert_eq!(
            verify(svid.expose(), &jwks(&s), "https://other", NOW, 0),
            Err(JwtSvidError::AudienceMismatch {
                expected: "https://other".into()
            })
        );
    }

    #[test]
    fn an_access_token_is_not_a_jwt_svid() {
        let s = signer();
        let key = SigningKey::generate().unwrap();
        let (token, _) = s
            .mint(
                &MintRequest {
                    subject: &sub(),
                    audience: &AUD.parse().unwrap(),
                    scope: &"pay".parse().unwrap(),
                    class: TokenClass::Service,
                    ttl: 60,
                    jkt: key.thumbprint(),
                },
                NOW,
            )
            .unwrap();
        assert_eq!(
            verify(token.expose(), &jwks(&s), AUD, NOW, 0),
            Err(JwtSvidError::Typ {
                found: Some("at+jwt".into())
            })
        );
        // Nor with its typ dressed as a JWT: it carries cnf.
        let mut claims = good_claims();
        claims["cnf"] = json!({"jkt": key.thumbprint().to_string()});
        let bound = forge(&s, header(), claims);
        assert_eq!(
            verify(&bound, &jwks(&s), AUD, NOW, 0),
            Err(JwtSvidError::Confirmation)
        );
    }

    #[test]
    fn a_jwt_svid_is_not_an_access_token() {
        let s = signer();
        let aud: Audience = AUD.parse().unwrap();
        let (svid, _) = mint(&s, &sub(), std::slice::from_ref(&aud), 60, NOW).unwrap();
        let config = TokenConfig::new("https://broker", aud);
        assert_eq!(
            crate::token::verify(svid.expose(), &jwks(&s), &config, NOW, &mut ()),
            Err(TokenError::Typ {
                found: Some("JWT".into())
            })
        );
    }

    #[test]
    fn other_token_types_are_refused_and_jwt_jose_or_none_accepted() {
        let s = signer();
        for typ in ["at+jwt", "dpop+jwt", "wit+jwt", "application/at+jwt", ""] {
            let mut h = header();
            h["typ"] = json!(typ);
            let err = verify(&forge(&s, h, good_claims()), &jwks(&s), AUD, NOW, 0);
            assert!(
                matches!(err, Err(JwtSvidError::Typ { .. })),
                "{typ}: {err:?}"
            );
        }
        let mut h = header();
        h["typ"] = json!(1);
        assert_eq!(
            verify(&forge(&s, h, good_claims()), &jwks(&s), AUD, NOW, 0),
            Err(JwtSvidError::Typ { found: None })
        );
        for typ in [Some("JWT"), Some("jwt"), Some("JOSE"), None] {
            let mut h = header();
            match typ {
                Some(t) => h["typ"] = json!(t),
                None => {
                    h.as_object_mut().unwrap().remove("typ");
                }
            }
            verify(&forge(&s, h, good_claims()), &jwks(&s), AUD, NOW, 0).unwrap();
        }
    }

    #[test]
    fn alg_none_hmac_and_foreign_keys_are_refused() {
        let s = signer();
        let mut h = header();
        h["alg"] = json!("HS256");
        assert!(matches!(
            verify(&forge(&s, h, good_claims()), &jwks(&s), AUD, NOW, 0),
            Err(JwtSvidError::Jws(JwsError::AlgHmac(_)))
        ));
        let unsigned = format!(
            "{}.{}.",
            crate::jose::b64::encode(r#"{"alg":"none","kid":"k1"}"#),
            crate::jose::b64::encode(good_claims().to_string())
        );
        assert!(matches!(
            verify(&unsigned, &jwks(&s), AUD, NOW, 0),
            Err(JwtSvidError::Jws(_))
        ));
        let mut h = header();
        h.as_object_mut().unwrap().remove("kid");
        assert_eq!(
            verify(&forge(&s, h, good_claims()), &jwks(&s), AUD, NOW, 0),
            Err(JwtSvidError::KidMissing)
        );
        let mut h = header();
        h["kid"] = json!("k2");
        assert_eq!(
            verify(&forge(&s, h, good_claims()), &jwks(&s), AUD, NOW, 0),
            Err(JwtSvidError::UnknownKid("k2".into()))
        );
        let other = signer();
        assert_eq!(
            verify(
                &forge(&other, header(), good_claims()),
                &jwks(&s),
                AUD,
                NOW,
                0
            ),
            Err(JwtSvidError::Jws(JwsError::BadSignature))
        );
        let huge = "a".repeat(9000);
        assert!(matches!(
            verify(&huge, &jwks(&s), AUD, NOW, 0),
            Err(JwtSvidError::Jws(JwsError::TooLong { .. }))
        ));
    }

    #[test]
    fn claims_are_checked_one_by_one() {
        let s = signer();
        let check = |edit: &dyn Fn(&mut Map<String, Value>)| {
            let mut claims = good_claims();
            edit(claims.as_object_mut().unwrap());
            verify(&forge(&s, header(), claims), &jwks(&s), AUD, NOW, 30)
        };
        assert_eq!(
            check(&|c| {
                c.remove("sub");
            }),
            Err(JwtSvidError::MissingClaim("sub"))
        );
        assert!(matches!(
            check(&|c| {
                c.insert("sub".into(), json!("https://not-spiffe"));
            }),
            Err(JwtSvidError::Subject(_))
        ));
        assert_eq!(
            check(&|c| {
                c.remove("aud");
            }),
            Err(JwtSvidError::MissingClaim("aud"))
        );
        assert!(matches!(
            check(&|c| {
                c.insert("aud".into(), json!([]));
            }),
            Err(JwtSvidError::ClaimType { claim: "aud", .. })
        ));
        assert_eq!(
            check(&|c| {
                c.remove("exp");
            }),
            Err(JwtSvidError::MissingClaim("exp"))
        );
        assert_eq!(
            check(&|c| {
                c.insert("exp".into(), json!(NOW - 30));
            }),
            Err(JwtSvidError::Expired {
                exp: NOW - 30,
                now: NOW
            })
        );
        // Within leeway: still good.
        check(&|c| {
            c.insert("exp".into(), json!(NOW - 29));
        })
        .unwrap();
        assert_eq!(
            check(&|c| {
                c.insert("iat".into(), json!(NOW + 31));
            }),
            Err(JwtSvidError::IssuedInFuture {
                iat: NOW + 31,
                now: NOW
            })
        );
        assert_eq!(
            check(&|c| {
                c.insert("nbf".into(), json!(NOW + 31));
            }),
            Err(JwtSvidError::NotYetValid {
                nbf: NOW + 31,
                now: NOW
            })
        );
        assert_eq!(
            check(&|c| {
                c.insert("jti".into(), json!(""));
            }),
            Err(JwtSvidError::Jti)
        );
        // iat and jti are optional.
        let v = check(&|c| {
            c.remove("iat");
        })
        .unwrap();
        assert_eq!((v.iat, v.jti), (None, None));
    }

    #[test]
    fn the_leeway_is_bounded() {
        let s = signer();
        let mut claims = good_claims();
        claims["exp"] = json!(NOW - MAX_LEEWAY);
        assert!(matches!(
            verify(&forge(&s, header(), claims), &jwks(&s), AUD, NOW, u64::MAX),
            Err(JwtSvidError::Expired { .. })
        ));
    }
}
