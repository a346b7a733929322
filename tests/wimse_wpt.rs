//! Hostile Workload Proof Tokens: one refusal per check, each failing at
//! the check that names it, against a valid WIT and `POST URL`.

mod support;

use serde_json::{Value, json};
use support::wimse::*;
use support::{NOW, URL};
use tally::dpop::{NormalizedUri, TokenHash};
use tally::jose::{Ed25519SigningKey, JwsError, SigningKey, b64};
use tally::wimse::wpt::{self, RESERVED_OTH_NAMES};
use tally::wimse::{VerifiedWit, VerifiedWpt, WptCheck, WptConfig, WptContext, WptError};

/// A request: its token, Txn-Token and headers.
#[derive(Default)]
struct Request<'a> {
    uri: Option<&'a str>,
    access_token: Option<&'a str>,
    txn_token: Option<&'a str>,
    headers: Vec<(&'a str, &'a str)>,
}

fn check(
    wit: &VerifiedWit,
    text: &str,
    request: &Request<'_>,
    config: &WptConfig,
) -> (Result<VerifiedWpt, WptError>, Vec<WptCheck>) {
    let uri = NormalizedUri::parse(request.uri.unwrap_or(URL)).unwrap();
    let ctx = WptContext {
        wit,
        uri: &uri,
        access_token: request.access_token,
        txn_token: request.txn_token,
        headers: &request.headers,
    };
    let mut passed = Vec::new();
    let result = wpt::verify(text, &ctx, NOW, config, &mut passed);
    (result, passed)
}

/// The fixture, its WIT text and the verified WIT.
fn setup() -> (WimseFixture, String, VerifiedWit) {
    let fx = WimseFixture::new();
    let wit_text = fx.wit();
    let wit = fx.verified(&wit_text);
    (fx, wit_text, wit)
}

fn refused(wit: &VerifiedWit, text: &str, request: &Request<'_>, at: WptCheck, want: WptError) {
    let (result, passed) = check(wit, text, request, &WptConfig::default());
    assert_eq!(result.unwrap_err(), want);
    assert_eq!(first_failed(&WptCheck::ALL, &passed), at);
}

fn accepted(wit: &VerifiedWit, text: &str, request: &Request<'_>) -> VerifiedWpt {
    let (result, passed) = check(wit, text, request, &WptConfig::default());
    assert_eq!(passed, WptCheck::ALL);
    result.unwrap()
}

fn edit(fx: &WimseFixture, wit_text: &str, f: impl FnOnce(&mut Value)) -> String {
    fx.wpt_with(wit_text, |_, claims| f(claims))
}

#[test]
fn typ_must_be_wpt_jwt() {
    let (fx, wit_text, wit) = setup();
    for typ in ["dpop+jwt", "wit+jwt", "jwt"] {
        let text = fx.wpt_with(&wit_text, |h, _| h["typ"] = json!(typ));
        refused(
            &wit,
            &text,
            &Request::default(),
            WptCheck::Typ,
            WptError::Typ {
                found: Some(typ.into()),
            },
        );
    }
    let text = fx.wpt_with(&wit_text, |h, _| h["typ"] = json!("application/wpt+jwt"));
    accepted(&wit, &text, &Request::default());
}

#[test]
fn alg_must_be_the_wits_cnf_alg_and_the_key_the_wits() {
    let (fx, wit_text, wit) = setup();
    // An EdDSA WPT for an ES256 WIT, whatever key made it.
    let ed = Ed25519SigningKey::generate().unwrap();
    let text = sign_with(
        &WimseFixture::wpt_header("EdDSA"),
        &WimseFixture::wpt_claims(&wit_text),
        &ed,
    );
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Alg,
        WptError::AlgMismatch {
            expected: "ES256",
            found: "EdDSA",
        },
    );
    // The right alg, another key.
    let other = SigningKey::generate().unwrap();
    let text = sign_with(
        &WimseFixture::wpt_header("ES256"),
        &WimseFixture::wpt_claims(&wit_text),
        &other,
    );
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Signature,
        WptError::BadSignature,
    );
    let text = fx.wpt_with(&wit_text, |h, _| h["alg"] = json!("none"));
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Syntax,
        WptError::Jws(JwsError::AlgNone),
    );
}

#[test]
fn aud_must_be_the_request_uri_and_queries_are_ignored() {
    let (fx, wit_text, wit) = setup();
    let text = edit(&fx, &wit_text, |c| {
        c["aud"] = json!("https://payments.example.org/v1/refunds")
    });
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Audience,
        WptError::AudMismatch {
            expected: URL.into(),
            found: "https://payments.example.org/v1/refunds".into(),
        },
    );
    // The request's query is not part of the target; nor is one in aud.
    let text = fx.wpt_with(&wit_text, |_, _| {});
    let with_query = format!("{URL}?amount=5#frag");
    accepted(
        &wit,
        &text,
        &Request {
            uri: Some(&with_query),
            ..Request::default()
        },
    );
    let text = edit(&fx, &wit_text, |c| {
        c["aud"] = json!(format!("{URL}?amount=5"))
    });
    accepted(&wit, &text, &Request::default());
    // Normalized as htu: case of scheme and host, default port.
    let text = edit(&fx, &wit_text, |c| {
        c["aud"] = json!("HTTPS://Payments.Example.ORG:443/v1/charges")
    });
    accepted(&wit, &text, &Request::default());
    let text = edit(&fx, &wit_text, |c| c["aud"] = json!([URL]));
    accepted(&wit, &text, &Request::default());
    let text = edit(&fx, &wit_text, |c| c["aud"] = json!([URL, URL]));
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Audience,
        WptError::ClaimType {
            claim: "aud",
            expected: "a string (or an array of one string)",
        },
    );
    let text = edit(&fx, &wit_text, |c| {
        c["aud"] = json!("spiffe://example.org/ns/pay/sa/payments")
    });
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Audience,
        WptError::AudInvalid(tally::dpop::UriError::Scheme),
    );
    let text = edit(&fx, &wit_text, |c| {
        c.as_object_mut().unwrap().remove("aud");
    });
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Audience,
        WptError::MissingClaim("aud"),
    );
}

#[test]
fn exp_is_required_not_passed_and_not_too_far_ahead() {
    let (fx, wit_text, wit) = setup();
    let text = edit(&fx, &wit_text, |c| {
        c.as_object_mut().unwrap().remove("exp");
    });
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Expiry,
        WptError::MissingClaim("exp"),
    );
    let text = edit(&fx, &wit_text, |c| c["exp"] = json!(NOW - 31));
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Expiry,
        WptError::Expired {
            exp: NOW - 31,
            now: NOW,
            leeway: 30,
        },
    );
    // At most 300 s (plus 30 s leeway) ahead by default.
    let text = edit(&fx, &wit_text, |c| c["exp"] = json!(NOW + 330));
    accepted(&wit, &text, &Request::default());
    let text = edit(&fx, &wit_text, |c| c["exp"] = json!(NOW + 331));
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Expiry,
        WptError::TooLongLived {
            exp: NOW + 331,
            now: NOW,
            max_lifetime: 300,
        },
    );
    // The maximum is configurable.
    let config = WptConfig {
        max_lifetime: 3600,
        ..WptConfig::default()
    };
    assert!(check(&wit, &text, &Request::default(), &config).0.is_ok());
}

#[test]
fn an_iat_is_optional_but_never_ahead_of_now_beyond_leeway() {
    let (fx, wit_text, wit) = setup();
    let text = edit(&fx, &wit_text, |c| c["iat"] = json!(NOW + 30));
    assert_eq!(
        accepted(&wit, &text, &Request::default()).iat,
        Some(NOW + 30)
    );
    let text = edit(&fx, &wit_text, |c| c["iat"] = json!(NOW + 31));
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Expiry,
        WptError::IssuedInFuture {
            iat: NOW + 31,
            now: NOW,
        },
    );
    let text = edit(&fx, &wit_text, |c| c["iat"] = json!("soon"));
    let (result, _) = check(&wit, &text, &Request::default(), &WptConfig::default());
    assert!(result.is_err());
}

#[test]
fn jti_is_required_and_carries_at_least_128_bits() {
    let (fx, wit_text, wit) = setup();
    let text = edit(&fx, &wit_text, |c| {
        c.as_object_mut().unwrap().remove("jti");
    });
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Jti,
        WptError::MissingClaim("jti"),
    );
    // 20 base64url characters are 15 bytes.
    let text = edit(&fx, &wit_text, |c| c["jti"] = json!(b64::encode([7u8; 15])));
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Jti,
        WptError::JtiTooShort { len: 15, min: 16 },
    );
    let text = edit(&fx, &wit_text, |c| c["jti"] = json!("p-1"));
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Jti,
        WptError::JtiTooShort { len: 3, min: 16 },
    );
    let text = edit(&fx, &wit_text, |c| c["jti"] = json!("j".repeat(257)));
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Jti,
        WptError::JtiTooLong { len: 257, max: 256 },
    );
    let text = edit(&fx, &wit_text, |c| c["jti"] = json!(b64::encode([7u8; 16])));
    assert_eq!(accepted(&wit, &text, &Request::default()).jti.len(), 22);
}

#[test]
fn wth_must_be_the_hash_of_the_wit_sent() {
    let (fx, wit_text, wit) = setup();
    let text = edit(&fx, &wit_text, |c| {
        c.as_object_mut().unwrap().remove("wth");
    });
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Wth,
        WptError::MissingClaim("wth"),
    );
    // A proof for another WIT of the same key.
    let other_wit = fx.wit_with(|_, c| c["jti"] = json!("wit-2"));
    let text = fx.wpt_with(&other_wit, |_, _| {});
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Wth,
        WptError::WthMismatch,
    );
    let text = edit(&fx, &wit_text, |c| {
        c["wth"] = json!(format!("{}=", TokenHash::of(&wit_text).to_ath()))
    });
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Wth,
        WptError::WthMismatch,
    );
}

#[test]
fn ath_is_required_with_an_access_token_and_refused_without() {
    let (fx, wit_text, wit) = setup();
    let with_token = Request {
        access_token: Some("tok"),
        ..Request::default()
    };
    let text = fx.wpt_with(&wit_text, |_, _| {});
    refused(
        &wit,
        &text,
        &with_token,
        WptCheck::Ath,
        WptError::AthMissing,
    );
    let text = edit(&fx, &wit_text, |c| {
        c["ath"] = json!(TokenHash::of("tok").to_ath())
    });
    accepted(&wit, &text, &with_token);
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Ath,
        WptError::AthUnexpected,
    );
    refused(
        &wit,
        &text,
        &Request {
            access_token: Some("another"),
            ..Request::default()
        },
        WptCheck::Ath,
        WptError::AthMismatch,
    );
    // A padded spelling of the right hash is another string: refused.
    let padded = format!("{}=", TokenHash::of("tok").to_ath());
    let text = edit(&fx, &wit_text, |c| c["ath"] = json!(padded));
    refused(
        &wit,
        &text,
        &with_token,
        WptCheck::Ath,
        WptError::AthMismatch,
    );
    // Without a token any ath is unexpected, even a malformed one.
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Ath,
        WptError::AthUnexpected,
    );
    let text = edit(&fx, &wit_text, |c| c["ath"] = json!(7));
    refused(
        &wit,
        &text,
        &with_token,
        WptCheck::Ath,
        WptError::ClaimType {
            claim: "ath",
            expected: "a string",
        },
    );
}

#[test]
fn tth_is_required_with_a_txn_token_and_refused_without() {
    let (fx, wit_text, wit) = setup();
    let with_txn = Request {
        txn_token: Some("txn"),
        ..Request::default()
    };
    let text = fx.wpt_with(&wit_text, |_, _| {});
    refused(&wit, &text, &with_txn, WptCheck::Tth, WptError::TthMissing);
    let text = edit(&fx, &wit_text, |c| {
        c["tth"] = json!(TokenHash::of("txn").to_ath())
    });
    accepted(&wit, &text, &with_txn);
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Tth,
        WptError::TthUnexpected,
    );
    refused(
        &wit,
        &text,
        &Request {
            txn_token: Some("other"),
            ..Request::default()
        },
        WptCheck::Tth,
        WptError::TthMismatch,
    );
}

fn with_oth(fx: &WimseFixture, wit_text: &str, oth: Value) -> String {
    edit(fx, wit_text, |c| c["oth"] = oth)
}

fn user_header<'a>(headers: Vec<(&'a str, &'a str)>) -> Request<'a> {
    Request {
        headers,
        ..Request::default()
    }
}

#[test]
fn oth_binds_headers_by_their_trimmed_value() {
    let (fx, wit_text, wit) = setup();
    let hash = TokenHash::of("alice").to_ath();
    let text = with_oth(&fx, &wit_text, json!({"x-user-token": hash}));
    accepted(
        &wit,
        &text,
        &user_header(vec![("X-User-Token", "  alice\t")]),
    );
    refused(
        &wit,
        &text,
        &user_header(vec![("x-user-token", "mallory")]),
        WptCheck::Oth,
        WptError::OthMismatch("x-user-token".into()),
    );
}

#[test]
fn oth_entries_for_missing_repeated_or_reserved_headers_are_refused() {
    let (fx, wit_text, wit) = setup();
    let hash = TokenHash::of("alice").to_ath();
    let text = with_oth(&fx, &wit_text, json!({"x-user-token": hash}));
    refused(
        &wit,
        &text,
        &Request::default(),
        WptCheck::Oth,
        WptError::OthHeaderMissing("x-user-token".into()),
    );
    refused(
        &wit,
        &text,
        &user_header(vec![("x-user-token", "alice"), ("X-User-Token", "alice")]),
        WptCheck::Oth,
        WptError::OthHeaderRepeated("x-user-token".into()),
    );
    for name in RESERVED_OTH_NAMES {
        let text = with_oth(&fx, &wit_text, json!({name: hash}));
        refused(
            &wit,
            &text,
            &user_header(vec![(name, "alice")]),
            WptCheck::Oth,
            WptError::OthReserved(name.into()),
        );
    }
}

#[test]
fn malformed_oth_is_refused() {
    let (fx, wit_text, wit) = setup();
    let hash = TokenHash::of("alice").to_ath();
    let request = user_header(vec![("x-user-token", "alice")]);
    let text = with_oth(&fx, &wit_text, json!({"X-User-Token": hash}));
    refused(
        &wit,
        &text,
        &request,
        WptCheck::Oth,
        WptError::OthName("X-User-Token".into()),
    );
    let text = with_oth(&fx, &wit_text, json!([hash]));
    refused(
        &wit,
        &text,
        &request,
        WptCheck::Oth,
        WptError::ClaimType {
            claim: "oth",
            expected: "an object",
        },
    );
    let text = with_oth(&fx, &wit_text, json!({"x-user-token": 5}));
    refused(
        &wit,
        &text,
        &request,
        WptCheck::Oth,
        WptError::OthValueType("x-user-token".into()),
    );
    let many: serde_json::Map<String, Value> =
        (0..17).map(|i| (format!("x-h{i}"), json!(hash))).collect();
    let text = with_oth(&fx, &wit_text, Value::Object(many));
    refused(
        &wit,
        &text,
        &request,
        WptCheck::Oth,
        WptError::OthTooMany { count: 17, max: 16 },
    );
}

#[test]
fn a_minted_wpt_with_every_binding_verifies_and_each_binding_matters() {
    let (fx, wit_text, wit) = setup();
    let input = wpt::WptInput {
        aud: URL,
        wit: &wit_text,
        access_token: Some("tok"),
        txn_token: Some("txn"),
        other: &[("X-User-Token", "alice")],
        lifetime: 60,
    };
    let text = wpt::mint(&fx.workload, &input, NOW).unwrap();
    let full = Request {
        uri: None,
        access_token: Some("tok"),
        txn_token: Some("txn"),
        headers: vec![("x-user-token", "alice")],
    };
    accepted(&wit, &text, &full);
    let no_header = Request {
        headers: vec![],
        ..full
    };
    refused(
        &wit,
        &text,
        &no_header,
        WptCheck::Oth,
        WptError::OthHeaderMissing("x-user-token".into()),
    );
}
