//! Every DPoP proof check, each refused with its own error. Each case
//! starts from a proof that verifies and spoils one thing.

mod support;

use serde_json::{Value, json};
use support::*;
use tally::dpop::proof::{self, NonceRule, ProofConfig, ProofError, TokenHash};
use tally::dpop::{NonceError, Nonces, UriError};
use tally::jose::json::JsonError;
use tally::jose::jws::JwsError;
use tally::jose::{JwkError, SigningKey, b64};

struct Case {
    name: &'static str,
    proof: String,
    expect: fn(&ProofError) -> bool,
}

fn check(fx: &Fixture, token: &str, cases: Vec<Case>) {
    let uri = uri();
    let hash = TokenHash::of(token);
    let jkt = fx.client.thumbprint();
    let ctx = context(&uri, Some(&hash), Some(&jkt));
    assert!(cases.len() >= 10);
    for case in cases {
        let result = proof::verify(&case.proof, &ctx, &ProofConfig::default(), NOW, &mut ());
        match result {
            Err(ref e) if (case.expect)(e) => {}
            other => panic!("{}: unexpected {other:?}", case.name),
        }
    }
}

#[test]
fn the_baseline_proof_verifies() {
    let fx = Fixture::new();
    let token = fx.token();
    let uri = uri();
    let hash = TokenHash::of(token.expose());
    let jkt = fx.client.thumbprint();
    let ctx = context(&uri, Some(&hash), Some(&jkt));
    for p in [
        fx.proof(token.expose()),
        fx.proof_with(token.expose(), |_, _| {}),
    ] {
        proof::verify(&p, &ctx, &ProofConfig::default(), NOW, &mut ()).unwrap();
    }
}

#[test]
fn hostile_headers_and_encodings_are_refused() {
    let fx = Fixture::new();
    let token = fx.token();
    let t = token.expose();
    let valid = fx.proof(t);
    let other = SigningKey::generate().unwrap();
    let hmac = {
        let header = b64::encode(
            json!({"typ":"dpop+jwt","alg":"HS256","jwk":fx.proof_header()["jwk"]}).to_string(),
        );
        let payload = b64::encode(fx.proof_claims(t).to_string());
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"secret");
        let tag = aws_lc_rs::hmac::sign(&key, format!("{header}.{payload}").as_bytes());
        format!("{header}.{payload}.{}", b64::encode(tag.as_ref()))
    };
    let unsigned = {
        let header = b64::encode(
            json!({"typ":"dpop+jwt","alg":"none","jwk":fx.proof_header()["jwk"]}).to_string(),
        );
        format!("{header}.{}.", b64::encode(fx.proof_claims(t).to_string()))
    };
    let sig_with = |bytes: [u8; 64]| with_segment(&valid, 2, &b64::encode(bytes));
    let mut r_is_n = [1u8; 64];
    r_is_n[..32].copy_from_slice(&hex32(
        "ffffffff00000000ffffffffffffffffbce6faada7179e84f3b9cac2fc632551",
    ));
    let trailing_bits = {
        let sig = valid.rsplit('.').next().unwrap();
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let last = *sig.as_bytes().last().unwrap();
        let idx = ALPHABET.iter().position(|&c| c == last).unwrap();
        let spoiled = format!("{}{}", &sig[..sig.len() - 1], ALPHABET[idx | 1] as char);
        with_segment(&valid, 2, &spoiled)
    };
    let payload = valid.split('.').nth(1).unwrap().to_owned();
    // Claims whose standard base64 must hold '+' or '/' (0x3f and 0x3e runs).
    let standard_payload = {
        use base64::Engine as _;
        let mut claims = fx.proof_claims(t);
        claims["x"] = json!("???>>>???>>>??>>");
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(claims.to_string())
    };
    assert!(standard_payload.contains(['+', '/']));

    check(
        &fx,
        t,
        vec![
            Case {
                name: "alg none",
                proof: unsigned,
                expect: |e| matches!(e, ProofError::Jws(JwsError::AlgNone)),
            },
            Case {
                name: "alg HS256",
                proof: hmac,
                expect: |e| matches!(e, ProofError::Jws(JwsError::AlgHmac(_))),
            },
            Case {
                name: "alg ES384 claimed",
                proof: fx.proof_with(t, |h, _| h["alg"] = json!("ES384")),
                expect: |e| matches!(e, ProofError::Jws(JwsError::AlgNotAllowed(_))),
            },
            Case {
                name: "alg missing",
                proof: fx.proof_with(t, |h, _| {
                    h.as_object_mut().unwrap().remove("alg");
                }),
                expect: |e| matches!(e, ProofError::Jws(JwsError::AlgMissing)),
            },
            Case {
                name: "typ missing",
                proof: fx.proof_with(t, |h, _| {
                    h.as_object_mut().unwrap().remove("typ");
                }),
                expect: |e| matches!(e, ProofError::Typ { found: None }),
            },
            Case {
                name: "typ jwt",
                proof: fx.proof_with(t, |h, _| h["typ"] = json!("JWT")),
                expect: |e| matches!(e, ProofError::Typ { found: Some(_) }),
            },
            Case {
                name: "typ at+jwt (a token posing as a proof)",
                proof: fx.proof_with(t, |h, _| h["typ"] = json!("at+jwt")),
                expect: |e| matches!(e, ProofError::Typ { .. }),
            },
            Case {
                name: "typ with trailing space",
                proof: fx.proof_with(t, |h, _| h["typ"] = json!("dpop+jwt ")),
                expect: |e| matches!(e, ProofError::Typ { .. }),
            },
            Case {
                name: "typ not a string",
                proof: fx.proof_with(t, |h, _| h["typ"] = json!(1)),
                expect: |e| matches!(e, ProofError::Typ { found: None }),
            },
            Case {
                name: "jwk missing",
                proof: fx.proof_with(t, |h, _| {
                    h.as_object_mut().unwrap().remove("jwk");
                }),
                expect: |e| matches!(e, ProofError::JwkMissing),
            },
            Case {
                name: "private jwk",
                proof: fx.proof_with(t, |h, _| h["jwk"]["d"] = json!(b64_of(32))),
                expect: |e| matches!(e, ProofError::Jwk(JwkError::PrivateKey("d"))),
            },
            Case {
                name: "symmetric jwk",
                proof: fx.proof_with(t, |h, _| h["jwk"] = json!({"kty":"oct","k":"c2VjcmV0"})),
                expect: |e| matches!(e, ProofError::Jwk(JwkError::SymmetricKey)),
            },
            Case {
                name: "off-curve jwk",
                proof: fx.proof_with(t, |h, _| h["jwk"]["y"] = json!(b64_of(32))),
                expect: |e| matches!(e, ProofError::Jwk(JwkError::NotOnCurve)),
            },
            Case {
                name: "short-coordinate jwk",
                proof: fx.proof_with(t, |h, _| h["jwk"]["x"] = json!(b64_of(31))),
                expect: |e| matches!(e, ProofError::Jwk(JwkError::BadCoordinate("x"))),
            },
            Case {
                name: "jwk on another curve",
                proof: fx.proof_with(t, |h, _| h["jwk"]["crv"] = json!("P-384")),
                expect: |e| matches!(e, ProofError::Jwk(JwkError::UnsupportedCurve(_))),
            },
            Case {
                name: "signed by another key",
                proof: {
                    let mut h = fx.proof_header();
                    let c = fx.proof_claims(t);
                    h["x"] = json!(1);
                    sign_raw(&h, &c, &other)
                },
                expect: |e| matches!(e, ProofError::Jws(JwsError::BadSignature)),
            },
            Case {
                name: "r = s = 0",
                proof: sig_with([0u8; 64]),
                expect: |e| matches!(e, ProofError::Jws(JwsError::SignatureScalar)),
            },
            Case {
                name: "r = n",
                proof: sig_with(r_is_n),
                expect: |e| matches!(e, ProofError::Jws(JwsError::SignatureScalar)),
            },
            Case {
                name: "DER signature",
                proof: with_segment(&valid, 2, &b64::encode([0x30u8; 70])),
                expect: |e| matches!(e, ProofError::Jws(JwsError::SignatureLength { len: 70 })),
            },
            Case {
                name: "truncated signature",
                proof: with_segment(&valid, 2, &b64::encode([1u8; 63])),
                expect: |e| matches!(e, ProofError::Jws(JwsError::SignatureLength { len: 63 })),
            },
            Case {
                name: "non-zero trailing bits",
                proof: trailing_bits,
                expect: |e| {
                    matches!(
                        e,
                        ProofError::Jws(JwsError::Encoding {
                            segment: "signature"
                        })
                    )
                },
            },
            Case {
                name: "padded payload",
                proof: with_segment(&valid, 1, &format!("{payload}==")),
                expect: |e| {
                    matches!(
                        e,
                        ProofError::Jws(JwsError::Encoding { segment: "payload" })
                    )
                },
            },
            Case {
                name: "standard alphabet",
                proof: with_segment(&valid, 1, &standard_payload),
                expect: |e| {
                    matches!(
                        e,
                        ProofError::Jws(JwsError::Encoding { segment: "payload" })
                    )
                },
            },
            Case {
                name: "whitespace in a segment",
                proof: with_segment(&valid, 1, &format!("{} {}", &payload[..4], &payload[4..])),
                expect: |e| {
                    matches!(
                        e,
                        ProofError::Jws(JwsError::Encoding { segment: "payload" })
                    )
                },
            },
            Case {
                name: "two segments",
                proof: valid.rsplit_once('.').unwrap().0.to_owned(),
                expect: |e| matches!(e, ProofError::Jws(JwsError::SegmentCount { found: 2 })),
            },
            Case {
                name: "five segments (JWE shape)",
                proof: format!("{valid}.a.b"),
                expect: |e| matches!(e, ProofError::Jws(JwsError::SegmentCount { found: 5 })),
            },
            Case {
                name: "huge header",
                proof: fx.proof_with(t, |h, _| h["pad"] = json!("x".repeat(5000))),
                expect: |e| matches!(e, ProofError::Jws(JwsError::HeaderTooLong { .. })),
            },
            Case {
                name: "huge proof",
                proof: fx.proof_with(t, |_, c| c["pad"] = json!("x".repeat(9000))),
                expect: |e| matches!(e, ProofError::Jws(JwsError::TooLong { .. })),
            },
            Case {
                name: "duplicate header member",
                proof: with_segment(
                    &valid,
                    0,
                    &b64::encode(r#"{"typ":"dpop+jwt","alg":"ES256","alg":"none"}"#),
                ),
                expect: |e| {
                    matches!(
                        e,
                        ProofError::Jws(JwsError::HeaderJson(JsonError::DuplicateMember(_)))
                    )
                },
            },
            Case {
                name: "duplicate claim",
                proof: with_segment(&valid, 1, &b64::encode(r#"{"htm":"POST","htm":"GET"}"#)),
                expect: |e| {
                    matches!(
                        e,
                        ProofError::Jws(JwsError::PayloadJson(JsonError::DuplicateMember(_)))
                    )
                },
            },
            Case {
                name: "payload is an array",
                proof: with_segment(&valid, 1, &b64::encode("[1,2]")),
                expect: |e| {
                    matches!(
                        e,
                        ProofError::Jws(JwsError::PayloadJson(JsonError::NotAnObject))
                    )
                },
            },
            Case {
                name: "payload is not JSON",
                proof: with_segment(&valid, 1, &b64::encode("hello")),
                expect: |e| {
                    matches!(
                        e,
                        ProofError::Jws(JwsError::PayloadJson(JsonError::Syntax(_)))
                    )
                },
            },
            Case {
                name: "header is not JSON",
                proof: with_segment(&valid, 0, &b64::encode("{\"alg\":")),
                expect: |e| {
                    matches!(
                        e,
                        ProofError::Jws(JwsError::HeaderJson(JsonError::Syntax(_)))
                    )
                },
            },
            Case {
                name: "crit",
                proof: fx.proof_with(t, |h, _| h["crit"] = json!(["exp"])),
                expect: |e| matches!(e, ProofError::Jws(JwsError::Crit)),
            },
            Case {
                name: "b64 false",
                proof: fx.proof_with(t, |h, _| h["b64"] = json!(false)),
                expect: |e| matches!(e, ProofError::Jws(JwsError::B64)),
            },
        ],
    );
}

#[test]
fn hostile_claims_are_refused() {
    let fx = Fixture::new();
    let token = fx.token();
    let t = token.expose();
    let thief = tally::dpop::ProofKey::generate().unwrap();
    let set = |name: &'static str, v: Value| move |_: &mut Value, c: &mut Value| c[name] = v;
    let drop = |name: &'static str| {
        move |_: &mut Value, c: &mut Value| {
            c.as_object_mut().unwrap().remove(name);
        }
    };
    check(
        &fx,
        t,
        vec![
            Case {
                name: "htm mismatch",
                proof: fx.proof_with(t, set("htm", json!("GET"))),
                expect: |e| matches!(e, ProofError::HtmMismatch { .. }),
            },
            Case {
                name: "htm lower case",
                proof: fx.proof_with(t, set("htm", json!("post"))),
                expect: |e| matches!(e, ProofError::HtmMismatch { .. }),
            },
            Case {
                name: "htm missing",
                proof: fx.proof_with(t, drop("htm")),
                expect: |e| matches!(e, ProofError::MissingClaim("htm")),
            },
            Case {
                name: "htu other host",
                proof: fx.proof_with(t, set("htu", json!("https://evil.example.org/v1/charges"))),
                expect: |e| matches!(e, ProofError::HtuMismatch { .. }),
            },
            Case {
                name: "htu other path",
                proof: fx.proof_with(
                    t,
                    set("htu", json!("https://payments.example.org/v1/refunds")),
                ),
                expect: |e| matches!(e, ProofError::HtuMismatch { .. }),
            },
            Case {
                name: "htu other scheme",
                proof: fx.proof_with(
                    t,
                    set("htu", json!("http://payments.example.org/v1/charges")),
                ),
                expect: |e| matches!(e, ProofError::HtuMismatch { .. }),
            },
            Case {
                name: "htu other port",
                proof: fx.proof_with(
                    t,
                    set("htu", json!("https://payments.example.org:8443/v1/charges")),
                ),
                expect: |e| matches!(e, ProofError::HtuMismatch { .. }),
            },
            Case {
                name: "htu relative",
                proof: fx.proof_with(t, set("htu", json!("/v1/charges"))),
                expect: |e| matches!(e, ProofError::HtuInvalid(UriError::Scheme)),
            },
            Case {
                name: "htu with user info",
                proof: fx.proof_with(
                    t,
                    set(
                        "htu",
                        json!("https://payments.example.org@evil.example/v1/charges"),
                    ),
                ),
                expect: |e| matches!(e, ProofError::HtuInvalid(UriError::UserInfo)),
            },
            Case {
                name: "htu not a string",
                proof: fx.proof_with(
                    t,
                    set("htu", json!(["https://payments.example.org/v1/charges"])),
                ),
                expect: |e| matches!(e, ProofError::ClaimType { claim: "htu", .. }),
            },
            Case {
                name: "iat as string",
                proof: fx.proof_with(t, set("iat", json!(NOW.to_string()))),
                expect: |e| matches!(e, ProofError::ClaimType { claim: "iat", .. }),
            },
            Case {
                name: "iat as float",
                proof: fx.proof_with(t, set("iat", json!(NOW as f64 + 0.5))),
                expect: |e| matches!(e, ProofError::ClaimType { claim: "iat", .. }),
            },
            Case {
                name: "iat negative",
                proof: fx.proof_with(t, set("iat", json!(-1))),
                expect: |e| matches!(e, ProofError::ClaimType { claim: "iat", .. }),
            },
            Case {
                name: "iat missing",
                proof: fx.proof_with(t, drop("iat")),
                expect: |e| matches!(e, ProofError::MissingClaim("iat")),
            },
            Case {
                name: "iat too old",
                proof: fx.proof_with(t, set("iat", json!(NOW - 61))),
                expect: |e| matches!(e, ProofError::IatTooOld { .. }),
            },
            Case {
                name: "iat in the future",
                proof: fx.proof_with(t, set("iat", json!(NOW + 61))),
                expect: |e| matches!(e, ProofError::IatInFuture { .. }),
            },
            Case {
                name: "jti missing",
                proof: fx.proof_with(t, drop("jti")),
                expect: |e| matches!(e, ProofError::MissingClaim("jti")),
            },
            Case {
                name: "jti empty",
                proof: fx.proof_with(t, set("jti", json!(""))),
                expect: |e| matches!(e, ProofError::JtiEmpty),
            },
            Case {
                name: "jti huge",
                proof: fx.proof_with(t, set("jti", json!("j".repeat(300)))),
                expect: |e| matches!(e, ProofError::JtiTooLong { len: 300, .. }),
            },
            Case {
                name: "jti a number",
                proof: fx.proof_with(t, set("jti", json!(12))),
                expect: |e| matches!(e, ProofError::ClaimType { claim: "jti", .. }),
            },
            Case {
                name: "ath missing",
                proof: fx.proof_with(t, drop("ath")),
                expect: |e| matches!(e, ProofError::AthMissing),
            },
            Case {
                name: "ath of another token",
                proof: fx.proof_with(t, set("ath", json!(TokenHash::of("other").to_ath()))),
                expect: |e| matches!(e, ProofError::AthMismatch),
            },
            Case {
                name: "ath padded",
                proof: fx.proof_with(
                    t,
                    set("ath", json!(format!("{}=", TokenHash::of(t).to_ath()))),
                ),
                expect: |e| matches!(e, ProofError::AthMismatch),
            },
            Case {
                name: "proof by a thief's key (cnf mismatch)",
                proof: thief.mint("POST", URL, Some(t), None, NOW).unwrap(),
                expect: |e| matches!(e, ProofError::KeyBindingMismatch { .. }),
            },
        ],
    );
}

#[test]
fn nonce_rules_are_enforced() {
    let fx = Fixture::new();
    let token = fx.token();
    let t = token.expose();
    let uri = uri();
    let hash = TokenHash::of(t);
    let nonces = Nonces::new(&[9u8; 32], 300);
    let mut ctx = context(&uri, Some(&hash), None);
    ctx.nonce = NonceRule::Issued(&nonces);
    let config = ProofConfig::default();

    let without = fx.proof(t);
    let err = proof::verify(&without, &ctx, &config, NOW, &mut ()).unwrap_err();
    assert_eq!(err, ProofError::NonceMissing);
    assert!(err.wants_nonce());

    let good = fx
        .client
        .mint("POST", URL, Some(t), Some(&nonces.issue(NOW)), NOW)
        .unwrap();
    proof::verify(&good, &ctx, &config, NOW, &mut ()).unwrap();

    let stale = fx
        .client
        .mint("POST", URL, Some(t), Some(&nonces.issue(NOW - 900)), NOW)
        .unwrap();
    assert_eq!(
        proof::verify(&stale, &ctx, &config, NOW, &mut ()).unwrap_err(),
        ProofError::NonceInvalid(NonceError::Stale)
    );
    let forged = fx
        .client
        .mint("POST", URL, Some(t), Some("made-up"), NOW)
        .unwrap();
    assert_eq!(
        proof::verify(&forged, &ctx, &config, NOW, &mut ()).unwrap_err(),
        ProofError::NonceInvalid(NonceError::Unknown)
    );
    ctx.nonce = NonceRule::Exact("abc");
    assert_eq!(
        proof::verify(&forged, &ctx, &config, NOW, &mut ()).unwrap_err(),
        ProofError::NonceInvalid(NonceError::Mismatch)
    );
}

#[test]
fn a_proof_never_passes_as_an_access_token() {
    let fx = Fixture::new();
    let t = fx.token();
    let p = fx.proof(t.expose());
    let err = tally::token::verify(&p, &fx.jwks, &fx.token_config(), NOW, &mut ()).unwrap_err();
    assert!(
        matches!(err, tally::token::TokenError::Typ { .. }),
        "{err:?}"
    );
}

fn hex32(s: &str) -> [u8; 32] {
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
    }
    out
}
