//! WIMSE end to end in the library: the draft's example verifies (and
//! fails where its clock, lifetime and access token say it must), WITs
//! minted by tally and WPTs minted by `wpt::mint` round-trip with ES256
//! and EdDSA keys, the DPoP and access-token paths still refuse EdDSA,
//! and secrets stay out of `Debug`.

mod support;

use serde_json::{Value, json};
use support::wimse::*;
use support::{CALLER, Fixture, NOW, URL, context, sign_raw, uri};
use tally::dpop::NormalizedUri;
use tally::dpop::proof::{self, ProofConfig, ProofError, TokenHash};
use tally::identity::SpiffeId;
use tally::jose::{
    Alg, AnySigningKey, Ed25519SigningKey, JwkError, JwsError, JwsSigner, SigningKey,
};
use tally::token::{Jwks, TokenError, TokenSigner};
use tally::wimse::wpt::{self, WptInput};
use tally::wimse::{
    VerifiedWit, WitCheck, WitConfig, WitError, WitKeys, WptCheck, WptConfig, WptContext, WptError,
    wit,
};

/// The draft's WPT lives 1016 s past [`DRAFT_NOW`]: far more than
/// tally's default 300 s, so the example is checked with a wider window.
fn draft_wpt_config() -> WptConfig {
    WptConfig {
        max_lifetime: 1200,
        ..WptConfig::default()
    }
}

fn draft_wit(now: u64) -> VerifiedWit {
    wit::verify(
        &data("wit.jwt"),
        &draft_keys(),
        now,
        &WitConfig::default(),
        &mut (),
    )
    .unwrap()
}

fn verify_draft_wpt(
    now: u64,
    access_token: Option<&str>,
    config: &WptConfig,
) -> (Result<tally::wimse::VerifiedWpt, WptError>, Vec<WptCheck>) {
    let wit = draft_wit(DRAFT_NOW);
    let uri = NormalizedUri::parse(DRAFT_URL).unwrap();
    let headers: Vec<(&str, &str)> = Vec::new();
    let ctx = WptContext {
        wit: &wit,
        uri: &uri,
        access_token,
        txn_token: None,
        headers: &headers,
    };
    let mut passed = Vec::new();
    let result = wpt::verify(&data("wpt.jwt"), &ctx, now, config, &mut passed);
    (result, passed)
}

#[test]
fn the_draft_example_wit_and_wpt_verify_with_the_access_token() {
    let mut passed = Vec::new();
    let wit = wit::verify(
        &data("wit.jwt"),
        &draft_keys(),
        DRAFT_NOW,
        &WitConfig::default(),
        &mut passed,
    )
    .unwrap();
    assert_eq!(passed, WitCheck::ALL);
    assert_eq!(wit.sub, "wimse://example.com/specific-workload");
    assert_eq!(wit.spiffe_id, None);
    assert_eq!(wit.alg, Alg::EdDsa);
    assert_eq!(wit.kid, "June 5");
    assert_eq!(wit.jti.as_deref(), Some("x-_1CTL2cca3CSE4cwb_l"));
    assert_eq!(
        (wit.iat, wit.nbf, wit.exp),
        (Some(1_745_508_910), None, 1_745_512_510)
    );
    // The bound key is the draft's workload key.
    let workload = AnySigningKey::load(data("workload.jwk.json").as_bytes()).unwrap();
    assert_eq!(wit.jkt, workload.thumbprint());
    assert_eq!(wit.key, workload.verifying_key());

    let token = data("access_token.txt");
    let (result, passed) = verify_draft_wpt(DRAFT_NOW, Some(&token), &draft_wpt_config());
    let wpt = result.unwrap();
    assert_eq!(passed, WptCheck::ALL);
    assert_eq!(wpt.jti, "__bwc4ESC3acc2LTC1-_x");
    assert_eq!(wpt.exp, DRAFT_WPT_EXP);
    assert_eq!(wpt.aud.as_str(), DRAFT_URL);
}

#[test]
fn the_draft_wpt_is_refused_after_its_exp_by_the_expiry_check() {
    let token = data("access_token.txt");
    let config = draft_wpt_config();
    // The last second the leeway covers passes; the next does not.
    let last = DRAFT_WPT_EXP + config.leeway;
    assert!(verify_draft_wpt(last, Some(&token), &config).0.is_ok());
    let (result, passed) = verify_draft_wpt(last + 1, Some(&token), &config);
    assert_eq!(
        result.unwrap_err(),
        WptError::Expired {
            exp: DRAFT_WPT_EXP,
            now: last + 1,
            leeway: 30
        }
    );
    assert_eq!(first_failed(&WptCheck::ALL, &passed), WptCheck::Expiry);
}

#[test]
fn the_draft_wpt_without_its_access_token_fails_on_ath() {
    let (result, passed) = verify_draft_wpt(DRAFT_NOW, None, &draft_wpt_config());
    assert_eq!(result.unwrap_err(), WptError::AthUnexpected);
    assert_eq!(first_failed(&WptCheck::ALL, &passed), WptCheck::Ath);
    let (result, _) = verify_draft_wpt(DRAFT_NOW, Some("another token"), &draft_wpt_config());
    assert_eq!(result.unwrap_err(), WptError::AthMismatch);
}

#[test]
fn the_draft_wpt_outlives_the_default_maximum_lifetime_until_close_to_its_exp() {
    let token = data("access_token.txt");
    let (result, passed) = verify_draft_wpt(DRAFT_NOW, Some(&token), &WptConfig::default());
    assert!(matches!(
        result.unwrap_err(),
        WptError::TooLongLived {
            max_lifetime: 300,
            ..
        }
    ));
    assert_eq!(first_failed(&WptCheck::ALL, &passed), WptCheck::Expiry);
    // 330 s (lifetime plus leeway) before exp, the default accepts it.
    let (result, _) = verify_draft_wpt(DRAFT_WPT_EXP - 330, Some(&token), &WptConfig::default());
    assert!(result.is_ok());
}

#[test]
fn the_draft_wit_is_no_spiffe_id_so_require_spiffe_refuses_it() {
    let config = WitConfig {
        require_spiffe: true,
        ..WitConfig::default()
    };
    let mut passed = Vec::new();
    let err = wit::verify(
        &data("wit.jwt"),
        &draft_keys(),
        DRAFT_NOW,
        &config,
        &mut passed,
    )
    .unwrap_err();
    assert!(matches!(err, WitError::NotSpiffe(_)), "{err:?}");
    assert_eq!(err.reason(), "wit_not_spiffe");
    assert_eq!(first_failed(&WitCheck::ALL, &passed), WitCheck::Subject);
}

#[test]
fn the_draft_workload_key_signs_new_wpts_that_verify() {
    let workload = AnySigningKey::load(data("workload.jwk.json").as_bytes()).unwrap();
    assert_eq!(workload.alg(), Alg::EdDsa);
    let wit_text = data("wit.jwt");
    let wit = draft_wit(DRAFT_NOW);
    let input = WptInput {
        aud: "https://workload.example.com/path?page=2",
        wit: &wit_text,
        access_token: None,
        txn_token: Some("txn"),
        other: &[("X-Tenant", " acme ")],
        lifetime: 60,
    };
    let text = wpt::mint(&workload, &input, DRAFT_NOW).unwrap();
    let uri = NormalizedUri::parse(DRAFT_URL).unwrap();
    let headers = vec![("x-tenant", "acme")];
    let ctx = WptContext {
        wit: &wit,
        uri: &uri,
        access_token: None,
        txn_token: Some("txn"),
        headers: &headers,
    };
    let wpt = wpt::verify(&text, &ctx, DRAFT_NOW, &WptConfig::default(), &mut ()).unwrap();
    assert_eq!(wpt.exp, DRAFT_NOW + 60);
    // The query never reaches aud.
    let claims = payload(&text);
    assert_eq!(claims["aud"], DRAFT_URL);
    assert_eq!(b64_len(claims["jti"].as_str().unwrap()), 16);
}

fn payload(jws: &str) -> Value {
    let part = jws.split('.').nth(1).unwrap();
    serde_json::from_slice(&tally::jose::b64::decode(part.as_bytes()).unwrap()).unwrap()
}

fn b64_len(text: &str) -> usize {
    tally::jose::b64::decode(text.as_bytes()).unwrap().len()
}

#[test]
fn a_wit_minted_by_tally_and_an_es256_wpt_round_trip() {
    let signer = TokenSigner::new(SigningKey::generate().unwrap(), "k1", "https://b");
    let mut jwks = Jwks::default();
    jwks.insert("k1", signer.key().public_key().clone());
    // The broker's published JWKS, as a relying party would read it.
    let keys = WitKeys::parse(jwks.to_json().to_string().as_bytes()).unwrap();
    assert_eq!(keys.len(), WitKeys::from_jwks(&jwks).len());
    let workload = SigningKey::generate().unwrap();
    let sub: SpiffeId = CALLER.parse().unwrap();
    let (minted, claims) = wit::mint(&signer, &sub, workload.public_key(), 3600, NOW).unwrap();
    let config = WitConfig {
        require_spiffe: true,
        ..WitConfig::default()
    };
    let wit = wit::verify(minted.expose(), &keys, NOW + 10, &config, &mut ()).unwrap();
    assert_eq!(wit.spiffe_id, Some(sub));
    assert_eq!(wit.jkt, claims.jkt);
    assert_eq!(wit.jti.as_deref(), Some(claims.jti.as_str()));
    assert_eq!(wit.alg, Alg::Es256);

    let token = "an-access-token";
    let input = WptInput {
        aud: URL,
        wit: minted.expose(),
        access_token: Some(token),
        txn_token: Some("a-txn-token"),
        other: &[("x-user-token", "u")],
        lifetime: 30,
    };
    // The sidecar signs with its key by reference: nothing is cloned.
    let text = wpt::mint(&workload, &input, NOW + 10).unwrap();
    let headers = vec![("X-User-Token", "u")];
    let uri = uri();
    let ctx = WptContext {
        wit: &wit,
        uri: &uri,
        access_token: Some(token),
        txn_token: Some("a-txn-token"),
        headers: &headers,
    };
    let mut passed = Vec::new();
    let wpt = wpt::verify(&text, &ctx, NOW + 10, &WptConfig::default(), &mut passed).unwrap();
    assert_eq!(passed, WptCheck::ALL);
    assert_eq!(wpt.exp, NOW + 40);
    assert_eq!(&wpt.aud, &uri);
    // Verifying twice passes twice: replay is the caller's cache's job.
    assert!(wpt::verify(&text, &ctx, NOW + 11, &WptConfig::default(), &mut ()).is_ok());
}

#[test]
fn an_eddsa_wpt_from_an_ed25519_workload_key_verifies() {
    let fx = WimseFixture::new();
    let workload = Ed25519SigningKey::generate().unwrap();
    let wit_text = fx.wit_with(|_, claims| {
        claims["cnf"]["jwk"] = cnf_jwk(&workload.verifying_key(), "EdDSA");
    });
    let wit = fx.verified(&wit_text);
    assert_eq!(wit.alg, Alg::EdDsa);
    assert_eq!(wit.jkt, workload.thumbprint());
    let input = WptInput {
        aud: URL,
        wit: &wit_text,
        access_token: None,
        txn_token: None,
        other: &[],
        lifetime: 60,
    };
    let text = wpt::mint(&workload, &input, NOW).unwrap();
    let headers: Vec<(&str, &str)> = Vec::new();
    let uri = uri();
    let ctx = WptContext {
        wit: &wit,
        uri: &uri,
        access_token: None,
        txn_token: None,
        headers: &headers,
    };
    wpt::verify(&text, &ctx, NOW, &WptConfig::default(), &mut ()).unwrap();
}

#[test]
fn a_wit_signed_eddsa_by_an_ed25519_issuer_verifies_through_a_spiffe_bundle() {
    let issuer = Ed25519SigningKey::generate().unwrap();
    let mut member: Value = serde_json::from_str(&issuer.public_key().to_jwk_json()).unwrap();
    member["kid"] = json!("ed1");
    member["use"] = json!("wit-svid");
    let jwt_svid_key: Value =
        serde_json::from_str(&SigningKey::generate().unwrap().public_key().to_jwk_json()).unwrap();
    let mut jwt_svid_key = jwt_svid_key;
    jwt_svid_key["kid"] = json!("j1");
    jwt_svid_key["use"] = json!("jwt-svid");
    let bundle = json!({"keys": [member, jwt_svid_key]});
    let keys = WitKeys::parse(bundle.to_string().as_bytes()).unwrap();
    assert!(
        keys.get("j1").is_none(),
        "a JWT-SVID key does not sign WITs"
    );

    let fx = WimseFixture::new();
    let text = sign_with(
        &json!({"typ":"wit+jwt","alg":"EdDSA","kid":"ed1"}),
        &fx.wit_claims(),
        &issuer,
    );
    let wit = wit::verify(&text, &keys, NOW, &WitConfig::default(), &mut ()).unwrap();
    assert_eq!(wit.kid, "ed1");
    // The same WIT under an ES256 header is refused at the signature check.
    let es = sign_with(
        &json!({"typ":"wit+jwt","alg":"ES256","kid":"ed1"}),
        &fx.wit_claims(),
        &fx.issuer,
    );
    assert_eq!(
        wit::verify(&es, &keys, NOW, &WitConfig::default(), &mut ()).unwrap_err(),
        WitError::IssuerKeyMismatch {
            alg: "ES256",
            key: "OKP Ed25519"
        }
    );
}

#[test]
fn dpop_proofs_access_tokens_and_jwt_svids_still_refuse_eddsa() {
    let fx = Fixture::new();
    let token = fx.token();
    let ed = Ed25519SigningKey::generate().unwrap();
    let ed_jwk: Value = serde_json::from_str(&ed.public_key().to_jwk_json()).unwrap();
    let hash = TokenHash::of(token.expose());
    let uri = uri();

    // A DPoP proof signed EdDSA with its Ed25519 key in the header.
    let mut claims = fx.proof_claims(token.expose());
    claims["jti"] = json!("p-eddsa");
    let proof_text = sign_with(
        &json!({"typ":"dpop+jwt","alg":"EdDSA","jwk":ed_jwk}),
        &claims,
        &ed,
    );
    let ctx = context(&uri, Some(&hash), None);
    assert_eq!(
        proof::verify(&proof_text, &ctx, &ProofConfig::default(), NOW, &mut ()).unwrap_err(),
        ProofError::Jws(JwsError::AlgNotAllowed("EdDSA".into()))
    );
    // An Ed25519 jwk under an ES256 header is no DPoP key either.
    let proof_text = sign_raw(
        &json!({"typ":"dpop+jwt","alg":"ES256","jwk":ed_jwk}),
        &claims,
        fx.client.signing_key(),
    );
    assert_eq!(
        proof::verify(&proof_text, &ctx, &ProofConfig::default(), NOW, &mut ()).unwrap_err(),
        ProofError::Jwk(JwkError::UnsupportedKeyType("OKP".into()))
    );

    // An access token signed EdDSA.
    let at = sign_with(
        &json!({"typ":"at+jwt","alg":"EdDSA","kid":support::KID}),
        &fx.token_claims(),
        &ed,
    );
    assert_eq!(
        tally::token::verify(&at, &fx.jwks, &fx.token_config(), NOW, &mut ()).unwrap_err(),
        TokenError::Jws(JwsError::AlgNotAllowed("EdDSA".into()))
    );

    // A JWT-SVID signed EdDSA.
    let svid = sign_with(
        &json!({"typ":"JWT","alg":"EdDSA","kid":support::KID}),
        &json!({"sub": CALLER, "aud": support::SERVICE, "exp": NOW + 60, "iat": NOW}),
        &ed,
    );
    assert!(matches!(
        tally::token::jwt_svid::verify(&svid, &fx.jwks, support::SERVICE, NOW, 30),
        Err(tally::token::JwtSvidError::Jws(JwsError::AlgNotAllowed(_)))
    ));
}

#[test]
fn debug_output_of_wimse_secrets_is_redacted() {
    let ed = Ed25519SigningKey::generate().unwrap();
    let pem = ed.to_pkcs8_pem().unwrap();
    let body = pem.lines().nth(1).unwrap().to_owned();
    for debug in [
        format!("{ed:?}"),
        format!("{:?}", AnySigningKey::EdDsa(ed)),
        format!(
            "{:?}",
            AnySigningKey::load(data("workload.jwk.json").as_bytes()).unwrap()
        ),
    ] {
        assert!(debug.contains("<redacted>"), "{debug}");
        assert!(!debug.contains(&body[..16]), "{debug}");
        assert!(!debug.contains("sdLX8yCYKqo"), "{debug}");
    }
    let wit = tally::wimse::Wit::new(data("wit.jwt"));
    assert!(!format!("{wit:?}").contains("eyJ"));

    let verified = draft_wit(DRAFT_NOW);
    let uri = NormalizedUri::parse(DRAFT_URL).unwrap();
    let token = data("access_token.txt");
    let headers: Vec<(&str, &str)> = Vec::new();
    let ctx = WptContext {
        wit: &verified,
        uri: &uri,
        access_token: Some(&token),
        txn_token: Some("secret-txn"),
        headers: &headers,
    };
    let debug = format!("{ctx:?}");
    assert!(!debug.contains(&token), "{debug}");
    assert!(!debug.contains("secret-txn"), "{debug}");
    // A verified WIT carries its hash, never the token.
    assert!(!format!("{verified:?}").contains("eyJ"));
}

#[test]
fn every_wit_and_wpt_refusal_has_a_fixed_reason() {
    let fx = WimseFixture::new();
    let wit_text = fx.wit_with(|_, claims| claims["exp"] = json!(NOW - 1000));
    let (result, _) = fx.check_wit(&wit_text, &WitConfig::default());
    assert_eq!(result.unwrap_err().reason(), "wit_expired");
    let wit_text = fx.wit();
    let wit = fx.verified(&wit_text);
    let wpt_text = fx.wpt_with(&wit_text, |_, claims| {
        claims["aud"] = json!("https://elsewhere/")
    });
    let headers: Vec<(&str, &str)> = Vec::new();
    let uri = uri();
    let ctx = WptContext {
        wit: &wit,
        uri: &uri,
        access_token: None,
        txn_token: None,
        headers: &headers,
    };
    let err = wpt::verify(&wpt_text, &ctx, NOW, &WptConfig::default(), &mut ()).unwrap_err();
    assert_eq!(err.reason(), "wpt_aud");
}
