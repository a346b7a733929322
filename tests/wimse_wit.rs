//! Hostile Workload Identity Tokens: one refusal per check, each failing
//! at the check that names it (every earlier one passed).

mod support;

use serde_json::{Value, json};
use support::NOW;
use support::wimse::*;
use tally::identity::SpiffeIdError;
use tally::jose::{Ed25519SigningKey, JwkError, JwsError, JwsSigner, SigningKey, b64};
use tally::wimse::{WitCheck, WitConfig, WitError};

/// Verifies `text` with the default settings and checks it fails with
/// `want` at `check`.
fn refused(fx: &WimseFixture, text: &str, check: WitCheck, want: WitError) {
    refused_with(fx, text, &WitConfig::default(), check, want);
}

fn refused_with(
    fx: &WimseFixture,
    text: &str,
    config: &WitConfig,
    check: WitCheck,
    want: WitError,
) {
    let (result, passed) = fx.check_wit(text, config);
    assert_eq!(result.unwrap_err(), want);
    assert_eq!(first_failed(&WitCheck::ALL, &passed), check);
}

fn claims_with(fx: &WimseFixture, edit: impl FnOnce(&mut Value)) -> String {
    fx.wit_with(|_, claims| edit(claims))
}

#[test]
fn a_valid_wit_passes_every_check() {
    let fx = WimseFixture::new();
    let (result, passed) = fx.check_wit(&fx.wit(), &WitConfig::default());
    let wit = result.unwrap();
    assert_eq!(passed, WitCheck::ALL);
    assert_eq!(wit.jkt, fx.workload.thumbprint());
    assert!(wit.spiffe_id.is_some());
}

#[test]
fn oversized_and_misshapen_wits_are_refused_before_decoding() {
    let fx = WimseFixture::new();
    let huge = format!("{}.e30.AA", "A".repeat(9000));
    refused(
        &fx,
        &huge,
        WitCheck::Syntax,
        WitError::Jws(JwsError::TooLong {
            len: huge.len(),
            max: 8192,
        }),
    );
    let wit = fx.wit();
    let two = wit.rsplit_once('.').unwrap().0;
    refused(
        &fx,
        two,
        WitCheck::Syntax,
        WitError::Jws(JwsError::SegmentCount { found: 2 }),
    );
    refused(
        &fx,
        &format!("{wit}.x"),
        WitCheck::Syntax,
        WitError::Jws(JwsError::SegmentCount { found: 4 }),
    );
}

#[test]
fn none_hmac_and_rsa_algorithms_are_refused() {
    let fx = WimseFixture::new();
    for (alg, want) in [
        ("none", JwsError::AlgNone),
        ("HS256", JwsError::AlgHmac("HS256".into())),
        ("RS256", JwsError::AlgNotAllowed("RS256".into())),
        ("PS256", JwsError::AlgNotAllowed("PS256".into())),
        ("ES384", JwsError::AlgNotAllowed("ES384".into())),
    ] {
        let text = fx.wit_with(|header, _| header["alg"] = json!(alg));
        let (result, passed) = fx.check_wit(&text, &WitConfig::default());
        let err = result.unwrap_err();
        assert_eq!(err, WitError::Jws(want), "{alg}");
        assert_eq!(err.reason(), "wit_alg");
        assert!(passed.is_empty());
    }
}

#[test]
fn typ_must_be_wit_jwt() {
    let fx = WimseFixture::new();
    for typ in [json!("JWT"), json!("wpt+jwt"), json!("WIT+JWT"), json!(7)] {
        let text = fx.wit_with(|header, _| header["typ"] = typ.clone());
        let found = typ.as_str().map(str::to_owned);
        refused(&fx, &text, WitCheck::Typ, WitError::Typ { found });
    }
    let text = fx.wit_with(|header, _| {
        header.as_object_mut().unwrap().remove("typ");
    });
    refused(&fx, &text, WitCheck::Typ, WitError::Typ { found: None });
    let full = fx.wit_with(|header, _| header["typ"] = json!("application/wit+jwt"));
    assert!(fx.check_wit(&full, &WitConfig::default()).0.is_ok());
}

#[test]
fn kid_must_name_a_trusted_key() {
    let fx = WimseFixture::new();
    let text = fx.wit_with(|header, _| {
        header.as_object_mut().unwrap().remove("kid");
    });
    refused(&fx, &text, WitCheck::Kid, WitError::KidMissing);
    let text = fx.wit_with(|header, _| header["kid"] = json!("w2"));
    refused(&fx, &text, WitCheck::Kid, WitError::UnknownKid("w2".into()));
}

#[test]
fn a_wit_signed_by_another_key_or_another_algorithm_is_refused() {
    let fx = WimseFixture::new();
    let other = SigningKey::generate().unwrap();
    let text = sign_with(&WimseFixture::wit_header(), &fx.wit_claims(), &other);
    refused(&fx, &text, WitCheck::Signature, WitError::BadSignature);
    // Tampered claims under the real signature.
    let good = fx.wit();
    let parts: Vec<&str> = good.split('.').collect();
    let mut claims = fx.wit_claims();
    claims["sub"] = json!("spiffe://example.org/ns/admin/sa/root");
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        b64::encode(claims.to_string()),
        parts[2]
    );
    refused(&fx, &forged, WitCheck::Signature, WitError::BadSignature);
    // EdDSA under the issuer's P-256 kid.
    let ed = Ed25519SigningKey::generate().unwrap();
    let text = sign_with(
        &json!({"typ":"wit+jwt","alg":"EdDSA","kid":WIT_KID}),
        &fx.wit_claims(),
        &ed,
    );
    refused(
        &fx,
        &text,
        WitCheck::Signature,
        WitError::IssuerKeyMismatch {
            alg: "EdDSA",
            key: "EC P-256",
        },
    );
}

#[test]
fn sub_must_be_present_and_an_absolute_uri() {
    let fx = WimseFixture::new();
    let text = claims_with(&fx, |c| {
        c.as_object_mut().unwrap().remove("sub");
    });
    refused(&fx, &text, WitCheck::Subject, WitError::MissingClaim("sub"));
    let text = claims_with(&fx, |c| c["sub"] = json!(42));
    refused(
        &fx,
        &text,
        WitCheck::Subject,
        WitError::ClaimType {
            claim: "sub",
            expected: "a string",
        },
    );
    for (sub, why) in [
        ("checkout", "no scheme"),
        ("wimse://a b/c", "holds whitespace or a control character"),
        ("9p://x", "malformed scheme"),
    ] {
        let text = claims_with(&fx, |c| c["sub"] = json!(sub));
        refused(&fx, &text, WitCheck::Subject, WitError::SubNotUri(why));
    }
}

#[test]
fn a_non_spiffe_sub_passes_unless_a_spiffe_id_is_required() {
    let fx = WimseFixture::new();
    let text = claims_with(&fx, |c| c["sub"] = json!("wimse://example.org/checkout"));
    let wit = fx.check_wit(&text, &WitConfig::default()).0.unwrap();
    assert_eq!(wit.spiffe_id, None);
    let config = WitConfig {
        require_spiffe: true,
        ..WitConfig::default()
    };
    refused_with(
        &fx,
        &text,
        &config,
        WitCheck::Subject,
        WitError::NotSpiffe(SpiffeIdError::WrongScheme),
    );
    // A spiffe: sub that is no SPIFFE ID is refused either way.
    let text = claims_with(&fx, |c| c["sub"] = json!("spiffe://example.org/a//b"));
    refused(
        &fx,
        &text,
        WitCheck::Subject,
        WitError::NotSpiffe(SpiffeIdError::EmptySegment),
    );
}

#[test]
fn exp_is_required_and_checked_with_leeway() {
    let fx = WimseFixture::new();
    let text = claims_with(&fx, |c| {
        c.as_object_mut().unwrap().remove("exp");
    });
    refused(&fx, &text, WitCheck::Times, WitError::MissingClaim("exp"));
    // Expired 30 s ago: the leeway still covers it; 31 s ago it does not.
    let text = claims_with(&fx, |c| c["exp"] = json!(NOW - 30));
    assert!(fx.check_wit(&text, &WitConfig::default()).0.is_ok());
    let text = claims_with(&fx, |c| c["exp"] = json!(NOW - 31));
    refused(
        &fx,
        &text,
        WitCheck::Times,
        WitError::Expired {
            exp: NOW - 31,
            now: NOW,
            leeway: 30,
        },
    );
    let text = claims_with(&fx, |c| c["exp"] = json!(1.5e9));
    refused(
        &fx,
        &text,
        WitCheck::Times,
        WitError::ClaimType {
            claim: "exp",
            expected: "a non-negative integer",
        },
    );
}

#[test]
fn nbf_and_iat_in_the_future_are_refused() {
    let fx = WimseFixture::new();
    let text = claims_with(&fx, |c| c["nbf"] = json!(NOW + 31));
    refused(
        &fx,
        &text,
        WitCheck::Times,
        WitError::NotYetValid {
            nbf: NOW + 31,
            now: NOW,
        },
    );
    let text = claims_with(&fx, |c| c["iat"] = json!(NOW + 31));
    refused(
        &fx,
        &text,
        WitCheck::Times,
        WitError::IssuedInFuture {
            iat: NOW + 31,
            now: NOW,
        },
    );
    // Absent nbf and iat are fine (the draft's own example has no nbf).
    let text = claims_with(&fx, |c| {
        let map = c.as_object_mut().unwrap();
        map.remove("nbf");
        map.remove("iat");
    });
    let wit = fx.check_wit(&text, &WitConfig::default()).0.unwrap();
    assert_eq!((wit.iat, wit.nbf), (None, None));
}

#[test]
fn cnf_jwk_is_required_and_must_be_public() {
    let fx = WimseFixture::new();
    let text = claims_with(&fx, |c| {
        c.as_object_mut().unwrap().remove("cnf");
    });
    refused(
        &fx,
        &text,
        WitCheck::Confirmation,
        WitError::MissingClaim("cnf"),
    );
    let text = claims_with(&fx, |c| {
        c["cnf"] = json!({"jkt": fx.workload.thumbprint().to_string()})
    });
    refused(
        &fx,
        &text,
        WitCheck::Confirmation,
        WitError::MissingClaim("cnf.jwk"),
    );
    let text = claims_with(&fx, |c| c["cnf"]["jwk"] = json!("key"));
    refused(
        &fx,
        &text,
        WitCheck::Confirmation,
        WitError::ClaimType {
            claim: "cnf.jwk",
            expected: "an object",
        },
    );
    let text = claims_with(&fx, |c| {
        c["cnf"]["jwk"]["d"] = json!(b64::encode([3u8; 32]))
    });
    refused(
        &fx,
        &text,
        WitCheck::Confirmation,
        WitError::CnfJwk(JwkError::PrivateKey("d")),
    );
    let text = claims_with(&fx, |c| {
        c["cnf"]["jwk"] = json!({"kty":"oct","k":"c2VjcmV0","alg":"HS256"})
    });
    refused(
        &fx,
        &text,
        WitCheck::Confirmation,
        WitError::CnfJwk(JwkError::SymmetricKey),
    );
}

#[test]
fn cnf_jwk_alg_is_required_allowed_and_must_fit_the_key() {
    let fx = WimseFixture::new();
    let text = claims_with(&fx, |c| {
        c["cnf"]["jwk"].as_object_mut().unwrap().remove("alg");
    });
    refused(
        &fx,
        &text,
        WitCheck::Confirmation,
        WitError::MissingClaim("cnf.jwk.alg"),
    );
    for alg in ["RS256", "none", "HS256", "es256"] {
        let text = claims_with(&fx, |c| c["cnf"]["jwk"]["alg"] = json!(alg));
        refused(
            &fx,
            &text,
            WitCheck::Confirmation,
            WitError::CnfAlgNotAllowed(alg.into()),
        );
    }
    let text = claims_with(&fx, |c| c["cnf"]["jwk"]["alg"] = json!("EdDSA"));
    refused(
        &fx,
        &text,
        WitCheck::Confirmation,
        WitError::CnfAlgKeyMismatch {
            alg: "EdDSA",
            key: "EC P-256",
        },
    );
    let ed = Ed25519SigningKey::generate().unwrap();
    let text = claims_with(&fx, |c| {
        c["cnf"]["jwk"] = cnf_jwk(&ed.verifying_key(), "ES256");
    });
    refused(
        &fx,
        &text,
        WitCheck::Confirmation,
        WitError::CnfAlgKeyMismatch {
            alg: "ES256",
            key: "OKP Ed25519",
        },
    );
}

#[test]
fn jti_is_optional_but_bounded() {
    let fx = WimseFixture::new();
    let text = claims_with(&fx, |c| {
        c.as_object_mut().unwrap().remove("jti");
    });
    assert_eq!(
        fx.check_wit(&text, &WitConfig::default()).0.unwrap().jti,
        None
    );
    for (jti, len) in [(String::new(), 0), ("j".repeat(257), 257)] {
        let text = claims_with(&fx, |c| c["jti"] = json!(jti));
        refused(&fx, &text, WitCheck::Jti, WitError::Jti { len, max: 256 });
    }
}

#[test]
fn aud_and_iss_are_not_looked_at() {
    let fx = WimseFixture::new();
    let text = claims_with(&fx, |c| {
        c["aud"] = json!(["anything", 5]);
        c["iss"] = json!("https://somewhere.example");
    });
    assert!(fx.check_wit(&text, &WitConfig::default()).0.is_ok());
}
