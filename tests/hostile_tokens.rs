//! Every access-token check, each refused with its own error.

mod support;

use serde_json::{Value, json};
use support::*;
use tally::identity::SpiffeIdError;
use tally::jose::json::JsonError;
use tally::jose::jws::JwsError;
use tally::jose::{SigningKey, b64};
use tally::token::{ClaimValueError, TokenCheck, TokenError, verify};

/// A named hostile token and the error it must get.
type Case = (&'static str, String, fn(&TokenError) -> bool);

fn refused(fx: &Fixture, token: &str) -> TokenError {
    verify(token, &fx.jwks, &fx.token_config(), NOW, &mut ()).unwrap_err()
}

#[test]
fn a_minted_token_verifies_with_every_check() {
    let fx = Fixture::new();
    let token = fx.token();
    let mut passed = Vec::new();
    let claims = verify(
        token.expose(),
        &fx.jwks,
        &fx.token_config(),
        NOW,
        &mut passed,
    )
    .unwrap();
    assert_eq!(claims.sub.as_str(), CALLER);
    assert_eq!(claims.scope.to_string(), "payments:charge payments:read");
    assert_eq!(claims.jkt, fx.client.thumbprint());
    assert_eq!(claims.exp, NOW + 300);
    assert_eq!(claims.kid, KID);
    assert_eq!(passed.len(), 11);
    assert_eq!(passed.last(), Some(&TokenCheck::ScopeAndClass));
    // jti carries 128 random bits after its 15-hex-digit ordering prefix.
    assert_eq!(b64::decode(&claims.jti.as_bytes()[15..]).unwrap().len(), 16);
}

#[test]
fn token_times_are_checked_against_now_with_leeway() {
    let fx = Fixture::new();
    let config = fx.token_config();
    let token = fx.token_at(NOW - 300, 300); // exp == NOW
    // Inside the 30 s leeway: still accepted.
    verify(token.expose(), &fx.jwks, &config, NOW + 29, &mut ()).unwrap();
    assert!(matches!(
        verify(token.expose(), &fx.jwks, &config, NOW + 30, &mut ()),
        Err(TokenError::Expired { .. })
    ));
    let future = fx.token_with(|c| c["nbf"] = json!(NOW + 31));
    assert!(matches!(
        refused(&fx, &future),
        TokenError::NotYetValid { .. }
    ));
    let issued_later = fx.token_with(|c| c["iat"] = json!(NOW + 31));
    assert!(matches!(
        refused(&fx, &issued_later),
        TokenError::IssuedInFuture { .. }
    ));
    let inverted = fx.token_with(|c| {
        c["iat"] = json!(NOW);
        c["exp"] = json!(NOW);
        c["nbf"] = json!(NOW);
    });
    assert!(matches!(
        verify(&inverted, &fx.jwks, &config, NOW - 10, &mut ()),
        Err(TokenError::LifetimeInverted { .. })
    ));
}

#[test]
fn hostile_tokens_are_refused() {
    let fx = Fixture::new();
    let attacker = SigningKey::generate().unwrap();
    let claims = fx.token_claims();
    let with = |edit: fn(&mut Value)| fx.token_with(edit);
    let header_with = |edit: fn(&mut Value), key: &SigningKey| {
        let mut h = Fixture::token_header();
        edit(&mut h);
        sign_raw(&h, &claims, key)
    };
    // HMAC key confusion: HS256 keyed with the JWKS public key's bytes.
    let confused = {
        let header = b64::encode(r#"{"typ":"at+jwt","alg":"HS256","kid":"k1"}"#);
        let payload = b64::encode(claims.to_string());
        let public = fx.signer.key().public_key().to_jwk_json();
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, public.as_bytes());
        let tag = aws_lc_rs::hmac::sign(&key, format!("{header}.{payload}").as_bytes());
        format!("{header}.{payload}.{}", b64::encode(tag.as_ref()))
    };
    let attacker_jwk: Value = serde_json::from_str(&attacker.public_key().to_jwk_json()).unwrap();
    let injected_jwk = {
        let h = json!({"typ":"at+jwt","alg":"ES256","kid":KID,"jwk":attacker_jwk});
        sign_raw(&h, &claims, &attacker)
    };
    let injected_unknown_kid = {
        let h = json!({"typ":"at+jwt","alg":"ES256","kid":"attacker","jwk":attacker_jwk,"jku":"https://evil.example/jwks"});
        sign_raw(&h, &claims, &attacker)
    };

    let cases: Vec<Case> = vec![
        (
            "expired",
            with(|c| {
                c["iat"] = json!(NOW - 1000);
                c["nbf"] = json!(NOW - 1000);
                c["exp"] = json!(NOW - 600);
            }),
            |e| matches!(e, TokenError::Expired { .. }),
        ),
        (
            "unknown kid",
            header_with(|h| h["kid"] = json!("k9"), fx.signer.key()),
            |e| matches!(e, TokenError::UnknownKid(_)),
        ),
        (
            "kid missing",
            header_with(
                |h| {
                    h.as_object_mut().unwrap().remove("kid");
                },
                fx.signer.key(),
            ),
            |e| matches!(e, TokenError::KidMissing),
        ),
        (
            "signed by an unknown key under a known kid",
            header_with(|_| {}, &attacker),
            |e| matches!(e, TokenError::Jws(JwsError::BadSignature)),
        ),
        ("HS256 with the public key as secret", confused, |e| {
            matches!(e, TokenError::Jws(JwsError::AlgHmac(_)))
        }),
        ("embedded jwk under a known kid", injected_jwk, |e| {
            matches!(e, TokenError::Jws(JwsError::BadSignature))
        }),
        (
            "embedded jwk and jku under an unknown kid",
            injected_unknown_kid,
            |e| matches!(e, TokenError::UnknownKid(_)),
        ),
        (
            "typ missing",
            header_with(
                |h| {
                    h.as_object_mut().unwrap().remove("typ");
                },
                fx.signer.key(),
            ),
            |e| matches!(e, TokenError::Typ { found: None }),
        ),
        (
            "typ dpop+jwt",
            header_with(|h| h["typ"] = json!("dpop+jwt"), fx.signer.key()),
            |e| matches!(e, TokenError::Typ { .. }),
        ),
        (
            "typ JWT",
            header_with(|h| h["typ"] = json!("JWT"), fx.signer.key()),
            |e| matches!(e, TokenError::Typ { .. }),
        ),
        (
            "wrong iss",
            with(|c| c["iss"] = json!("https://evil.example")),
            |e| matches!(e, TokenError::IssuerMismatch { .. }),
        ),
        (
            "iss missing",
            with(|c| {
                c.as_object_mut().unwrap().remove("iss");
            }),
            |e| matches!(e, TokenError::MissingClaim("iss")),
        ),
        (
            "wrong aud",
            with(|c| c["aud"] = json!("spiffe://example.org/ns/other/sa/x")),
            |e| matches!(e, TokenError::AudienceMismatch { .. }),
        ),
        ("aud a number", with(|c| c["aud"] = json!(5)), |e| {
            matches!(e, TokenError::ClaimType { claim: "aud", .. })
        }),
        (
            "aud missing",
            with(|c| {
                c.as_object_mut().unwrap().remove("aud");
            }),
            |e| matches!(e, TokenError::MissingClaim("aud")),
        ),
        (
            "sub not a SPIFFE ID",
            with(|c| {
                c["sub"] = json!("checkout");
                c["client_id"] = json!("checkout");
            }),
            |e| matches!(e, TokenError::Subject(SpiffeIdError::WrongScheme)),
        ),
        (
            "client_id differs from sub",
            with(|c| c["client_id"] = json!("spiffe://example.org/ns/x/sa/y")),
            |e| matches!(e, TokenError::ClientIdMismatch),
        ),
        (
            "exp missing",
            with(|c| {
                c.as_object_mut().unwrap().remove("exp");
            }),
            |e| matches!(e, TokenError::MissingClaim("exp")),
        ),
        (
            "exp as string",
            with(|c| c["exp"] = json!((NOW + 300).to_string())),
            |e| matches!(e, TokenError::ClaimType { claim: "exp", .. }),
        ),
        (
            "exp as float",
            with(|c| c["exp"] = json!((NOW + 300) as f64 + 0.5)),
            |e| matches!(e, TokenError::ClaimType { claim: "exp", .. }),
        ),
        (
            "iat missing",
            with(|c| {
                c.as_object_mut().unwrap().remove("iat");
            }),
            |e| matches!(e, TokenError::MissingClaim("iat")),
        ),
        (
            "jti missing",
            with(|c| {
                c.as_object_mut().unwrap().remove("jti");
            }),
            |e| matches!(e, TokenError::MissingClaim("jti")),
        ),
        ("jti empty", with(|c| c["jti"] = json!("")), |e| {
            matches!(e, TokenError::Jti { .. })
        }),
        (
            "cnf missing",
            with(|c| {
                c.as_object_mut().unwrap().remove("cnf");
            }),
            |e| matches!(e, TokenError::MissingClaim("cnf")),
        ),
        ("cnf a string", with(|c| c["cnf"] = json!("abc")), |e| {
            matches!(e, TokenError::ClaimType { claim: "cnf", .. })
        }),
        (
            "cnf without jkt",
            with(|c| c["cnf"] = json!({"x5t#S256": "abc"})),
            |e| matches!(e, TokenError::MissingClaim("cnf.jkt")),
        ),
        (
            "cnf.jkt malformed",
            with(|c| c["cnf"] = json!({"jkt": "not-a-thumbprint"})),
            |e| matches!(e, TokenError::Confirmation),
        ),
        (
            "scope malformed",
            with(|c| c["scope"] = json!("a  b")),
            |e| matches!(e, TokenError::ClaimValue(ClaimValueError::Scope(_))),
        ),
        (
            "scope missing",
            with(|c| {
                c.as_object_mut().unwrap().remove("scope");
            }),
            |e| matches!(e, TokenError::MissingClaim("scope")),
        ),
        ("unknown class", with(|c| c["tcl"] = json!("root")), |e| {
            matches!(e, TokenError::ClaimValue(ClaimValueError::Class(_)))
        }),
        (
            "duplicate claim",
            {
                let t = fx.token_with(|_| {});
                let payload = b64::encode(format!(
                    r#"{{"aud":"{SERVICE}",{}"#,
                    &claims.to_string()[1..]
                ));
                with_segment(&t, 1, &payload)
            },
            |e| matches!(e, TokenError::Jws(JwsError::PayloadJson(JsonError::DuplicateMember(m))) if m == "aud"),
        ),
    ];
    assert!(cases.len() >= 30);
    for (name, token, expect) in cases {
        let err = refused(&fx, &token);
        assert!(expect(&err), "{name}: unexpected {err:?}");
    }
}

#[test]
fn audience_may_be_an_array_holding_ours() {
    let fx = Fixture::new();
    let token = fx.token_with(|c| c["aud"] = json!(["https://other.example", SERVICE]));
    verify(&token, &fx.jwks, &fx.token_config(), NOW, &mut ()).unwrap();
}

#[test]
fn unverified_header_keys_are_never_used() {
    // jku/x5u/x5c in a token signed by the real key change nothing.
    let fx = Fixture::new();
    let h = json!({"typ":"at+jwt","alg":"ES256","kid":KID,"jku":"https://evil.example/jwks","x5u":"https://evil.example/c","x5c":["MIIB"]});
    let token = sign_raw(&h, &fx.token_claims(), fx.signer.key());
    verify(&token, &fx.jwks, &fx.token_config(), NOW, &mut ()).unwrap();
}

#[test]
fn access_token_debug_is_redacted() {
    let fx = Fixture::new();
    let token = fx.token();
    let debug = format!("{token:?}");
    assert!(debug.contains("redacted"));
    assert!(!debug.contains(token.expose().split('.').nth(1).unwrap()));
}
