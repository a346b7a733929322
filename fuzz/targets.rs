//! The bodies of the fuzz targets, shared by the cargo-fuzz binaries
//! (`fuzz_targets/*.rs`) and `tests/fuzz_regressions.rs`, which replays
//! every saved input through every one of them on each test run. Each
//! panics on a bug: a panic inside a parser, or an oracle that fails.
//! Each returns whether a verifier accepted the input, so a test can show
//! that the accepting path (and its oracle) is reachable.

// Each fuzz binary uses one target.
#![allow(dead_code)]

use std::sync::OnceLock;
use tally::dpop::NormalizedUri;
use tally::dpop::proof::{self, NonceRule, ProofConfig, ProofContext, TokenHash};
use tally::jose::jws::ES256_OR_EDDSA;
use tally::jose::{Jws, Limits, PublicKey, SigningKey, VerifyingKey, b64};
use tally::token::{Jwks, TokenConfig, TokenSigner};
use tally::wimse::{VerifiedWit, WitConfig, WitKeys, WptConfig, WptContext};

/// The request `proof_verify` judges proofs for (RFC 9449's example).
pub const PROOF_METHOD: &str = "GET";
/// Its URL.
pub const PROOF_URL: &str = "https://resource.example.org/protectedresource";
/// Its time.
pub const PROOF_NOW: u64 = 1_562_262_618;

/// Whatever a verifier accepted is a compact JWS that re-encodes to the
/// input: three segments, each the canonical base64url of its bytes (no
/// second spelling of an accepted proof or token).
fn re_encodes(text: &str) {
    let segments: Vec<&str> = text.split('.').collect();
    assert_eq!(segments.len(), 3, "accepted input is not a compact JWS");
    for segment in segments {
        let bytes = b64::decode(segment.as_bytes()).expect("accepted segment decodes");
        assert_eq!(
            b64::encode(bytes),
            segment,
            "accepted segment is not canonical"
        );
    }
}

/// The compact JWS parser, `htu` normalization (idempotent), request
/// path routability, the `Authorization`/`DPoP` header reader, the strict
/// JSON reader and the JWKS parser.
pub fn jws_parse(data: &[u8]) -> bool {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(jws) = Jws::parse(text, &Limits::default()) {
            let _ = jws.typ();
        }
        if let Ok(uri) = NormalizedUri::parse(text) {
            let again = NormalizedUri::parse(uri.as_str()).expect("normalized URI reparses");
            assert_eq!(again, uri, "normalization is idempotent");
            let _ = tally::auth::path::check_routable(uri.path());
        }
        let _ = tally::auth::path::check_routable(text);
    }
    let _ = tally::auth::credentials::parse(&[data], &[data]);
    let _ = tally::jose::json::parse_object(data);
    let _ = Jwks::parse(data);
    false
}

/// The DPoP proof verifier, with and without a token hash and nonce rule.
/// Oracle: nothing but a well-formed proof signed by its own `jwk`
/// passes — it re-encodes to the input, its signature verifies under the
/// key in its header, and the thumbprint reported is that key's.
pub fn proof_verify(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let uri = NormalizedUri::parse(PROOF_URL).unwrap();
    let hash = TokenHash::of("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU");
    let mut accepted = false;
    for (token_hash, nonce) in [
        (None, NonceRule::NotRequired),
        (Some(&hash), NonceRule::Exact("n")),
    ] {
        let ctx = ProofContext {
            method: PROOF_METHOD,
            uri: &uri,
            token_hash,
            expected_jkt: None,
            nonce,
            keys: None,
        };
        let Ok(verified) = proof::verify(text, &ctx, &ProofConfig::default(), PROOF_NOW, &mut ())
        else {
            continue;
        };
        accepted = true;
        re_encodes(text);
        let jws = Jws::parse(text, &Limits::default()).expect("an accepted proof parses");
        assert_eq!(jws.typ(), Some("dpop+jwt"));
        let key = PublicKey::from_jwk(&jws.header()["jwk"]).expect("its jwk is a public key");
        jws.verify(&key).expect("it verifies under its own jwk");
        assert_eq!(verified.jkt, key.thumbprint(), "the jkt is its jwk's");
    }
    accepted
}

/// The broker `token_verify` trusts (key `k1`).
pub fn token_signer() -> &'static TokenSigner {
    static SIGNER: OnceLock<TokenSigner> = OnceLock::new();
    SIGNER.get_or_init(|| TokenSigner::new(SigningKey::generate().unwrap(), "k1", ISSUER))
}

/// Its issuer.
pub const ISSUER: &str = "https://broker.example";

/// The access-token verifier against a JWKS holding [`token_signer`]'s
/// key as `k1`. Oracle: an accepted token re-encodes to the input and
/// verifies under that key.
pub fn token_verify(data: &[u8]) -> bool {
    static JWKS: OnceLock<Jwks> = OnceLock::new();
    let jwks = JWKS.get_or_init(|| {
        let mut jwks = Jwks::default();
        jwks.insert("k1", token_signer().key().public_key().clone());
        jwks
    });
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let config = TokenConfig::new(
        ISSUER,
        "spiffe://example.org/ns/pay/sa/payments".parse().unwrap(),
    );
    let Ok(claims) = tally::token::verify(text, jwks, &config, 1_800_000_000, &mut ()) else {
        return false;
    };
    re_encodes(text);
    assert_eq!(claims.kid, "k1");
    let jws = Jws::parse(text, &Limits::default()).expect("an accepted token parses");
    jws.verify(token_signer().key().public_key())
        .expect("it verifies under the trusted key");
    true
}

/// The audience `jwt_svid_verify` checks JWT-SVIDs for.
pub const JWT_SVID_AUDIENCE: &str = "spiffe://example.org/ns/pay/sa/payments";

/// The JWT-SVID verifier against a JWKS holding [`token_signer`]'s key as
/// `k1`. Oracle: an accepted JWT-SVID re-encodes to the input, verifies
/// under that key, carries no `cnf` and names the audience.
pub fn jwt_svid_verify(data: &[u8]) -> bool {
    static JWKS: OnceLock<Jwks> = OnceLock::new();
    let jwks = JWKS.get_or_init(|| {
        let mut jwks = Jwks::default();
        jwks.insert("k1", token_signer().key().public_key().clone());
        jwks
    });
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let Ok(svid) = tally::token::jwt_svid::verify(text, jwks, JWT_SVID_AUDIENCE, 1_800_000_000, 30)
    else {
        return false;
    };
    re_encodes(text);
    assert_eq!(svid.kid, "k1");
    assert!(!svid.claims.contains_key("cnf"), "a bound token passed");
    assert!(svid.aud.iter().any(|a| a == JWT_SVID_AUDIENCE));
    let jws = Jws::parse(text, &Limits::default()).expect("an accepted JWT-SVID parses");
    jws.verify(token_signer().key().public_key())
        .expect("it verifies under the trusted key");
    true
}

/// The Kubernetes ServiceAccount token verifier and the cluster JWKS
/// parser (the first byte picks which).
pub fn sa_token_verify(data: &[u8]) -> bool {
    use tally::identity::k8s::{self, SaKeys, SaTokenConfig};
    static KEYS: OnceLock<SaKeys> = OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        let key = SigningKey::generate().unwrap();
        let mut jwk: serde_json::Value =
            serde_json::from_str(&key.public_key().to_jwk_json()).unwrap();
        jwk["kid"] = "k1".into();
        SaKeys::parse(serde_json::json!({"keys": [jwk]}).to_string().as_bytes()).unwrap()
    });
    let Some((first, rest)) = data.split_first() else {
        return false;
    };
    if first % 2 == 0 {
        let _ = SaKeys::parse(rest);
        return false;
    }
    let Ok(text) = std::str::from_utf8(rest) else {
        return false;
    };
    let config = SaTokenConfig {
        issuer: "https://kubernetes.default.svc".into(),
        audience: "tally".into(),
    };
    let accepted = k8s::verify(text, keys, &config, 1_800_000_000).is_ok();
    if accepted {
        re_encodes(text);
    }
    accepted
}

/// The injector's settings the `admission_review` target injects with.
fn injector_template() -> tally::injector::template::Template {
    tally::injector::template::Template {
        image: "ghcr.io/tally-dev/tally:0.1.0".into(),
        broker: "https://tally-broker.tally-system.svc:8443".into(),
        bundle_pem: "PEM".into(),
        sa_audience: "tally-broker".into(),
        sa_token_expiration: 600,
        skip_namespaces: vec!["kube-system".into()],
        resources: tally::injector::template::Resources {
            cpu: "10m".parse().unwrap(),
            memory: "16Mi".parse().unwrap(),
            memory_limit: "64Mi".parse().unwrap(),
        },
        uid: 1337,
        version: "0.1.0".into(),
    }
}

/// The AdmissionReview parser and the injection decision: a patch always
/// applies to the pod as sent, and a second pass on the result yields no
/// patch. Returns whether a pod was injected.
pub fn admission_review(data: &[u8]) -> bool {
    use tally::injector::{apply, pod, review};
    let t = injector_template();
    let Ok(request) = review::parse(data) else {
        return false;
    };
    let answer = review::response(&request.uid, &[], &[]);
    assert_eq!(answer["response"]["uid"], request.uid.as_str());
    let namespace = request
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let outcome = pod::inject(&t, &namespace, request.object.as_ref());
    if outcome.patch.is_empty() {
        return false;
    }
    let mut patched = request.object.clone().expect("a patch needs a pod");
    apply::apply(&mut patched, &outcome.patch).expect("the patch applies to the pod as sent");
    let again = pod::inject(&t, &namespace, Some(&patched));
    assert!(again.patch.is_empty(), "a second pass changed the pod");
    true
}

/// The time the WIMSE targets judge at.
pub const WIMSE_NOW: u64 = 1_800_000_000;
/// The request `wpt_verify` judges WPTs for.
pub const WIMSE_URL: &str = "https://payments.example.org/v1/charges";
/// The header `wpt_verify`'s request carries, for `oth`.
pub const WIMSE_HEADER: (&str, &str) = ("x-user-token", "alice");

/// The WIT issuers `wit_verify` trusts: [`token_signer`]'s key as `k1`.
fn wit_keys() -> &'static WitKeys {
    static KEYS: OnceLock<WitKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut keys = WitKeys::default();
        keys.insert(
            "k1",
            VerifyingKey::P256(token_signer().key().public_key().clone()),
        );
        keys
    })
}

/// The workload key of the WIT `wpt_verify` checks WPTs against.
pub fn wimse_workload_key() -> &'static SigningKey {
    static KEY: OnceLock<SigningKey> = OnceLock::new();
    KEY.get_or_init(|| SigningKey::generate().unwrap())
}

/// That WIT (for [`wimse_workload_key`], by [`token_signer`]), as text.
pub fn wimse_wit() -> &'static str {
    static WIT: OnceLock<String> = OnceLock::new();
    WIT.get_or_init(|| {
        let sub = "spiffe://example.org/ns/shop/sa/checkout".parse().unwrap();
        let (wit, _) = tally::wimse::wit::mint(
            token_signer(),
            &sub,
            wimse_workload_key().public_key(),
            3600,
            WIMSE_NOW - 60,
        )
        .unwrap();
        wit.expose().to_owned()
    })
}

/// The WIT verifier against [`wit_keys`], and the WIT key-set parser.
/// Oracle: an accepted WIT re-encodes to the input, verifies under the
/// trusted key, names a URI, and its `jkt` is its `cnf.jwk`'s.
pub fn wit_verify(data: &[u8]) -> bool {
    let _ = WitKeys::parse(data);
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let mut accepted = false;
    for require_spiffe in [false, true] {
        let config = WitConfig {
            require_spiffe,
            ..WitConfig::default()
        };
        let Ok(wit) = tally::wimse::wit::verify(text, wit_keys(), WIMSE_NOW, &config, &mut ())
        else {
            continue;
        };
        accepted = true;
        re_encodes(text);
        assert_eq!(wit.kid, "k1");
        let jws = Jws::parse_with(text, &Limits::default(), ES256_OR_EDDSA)
            .expect("an accepted WIT parses");
        jws.verify(token_signer().key().public_key())
            .expect("it verifies under the trusted key");
        let jwk = &jws.payload()["cnf"]["jwk"];
        let key = VerifyingKey::from_jwk(jwk).expect("its cnf.jwk is a public key");
        assert_eq!(wit.jkt, key.thumbprint(), "the jkt is its cnf.jwk's");
        assert_eq!(wit.alg, key.alg(), "the proof alg fits the key");
        assert!(wit.sub.contains(':'), "sub is a URI");
        if require_spiffe {
            assert_eq!(
                wit.spiffe_id.as_ref().map(|id| id.as_str()),
                Some(wit.sub.as_str()),
                "a required SPIFFE ID is the sub"
            );
        }
    }
    accepted
}

/// [`wimse_wit`], verified once.
fn verified_wit() -> &'static VerifiedWit {
    static WIT: OnceLock<VerifiedWit> = OnceLock::new();
    WIT.get_or_init(|| {
        tally::wimse::wit::verify(
            wimse_wit(),
            wit_keys(),
            WIMSE_NOW,
            &WitConfig::default(),
            &mut (),
        )
        .expect("the fixed WIT verifies")
    })
}

/// The WPT verifier for [`WIMSE_URL`], with and without an access token
/// and the [`WIMSE_HEADER`]. Oracle: an accepted WPT re-encodes to the
/// input, verifies under the WIT's key, names the request URI, and lives
/// inside the window.
pub fn wpt_verify(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false;
    };
    let uri = NormalizedUri::parse(WIMSE_URL).unwrap();
    let config = WptConfig::default();
    let mut accepted = false;
    for (access_token, headers) in [(None, vec![]), (Some("tok"), vec![WIMSE_HEADER])] {
        let ctx = WptContext {
            wit: verified_wit(),
            uri: &uri,
            access_token,
            txn_token: None,
            headers: &headers,
        };
        let Ok(wpt) = tally::wimse::wpt::verify(text, &ctx, WIMSE_NOW, &config, &mut ()) else {
            continue;
        };
        accepted = true;
        re_encodes(text);
        let jws = Jws::parse_with(text, &Limits::default(), ES256_OR_EDDSA)
            .expect("an accepted WPT parses");
        jws.verify(wimse_workload_key().public_key())
            .expect("it verifies under the WIT's key");
        assert_eq!(wpt.aud, uri, "aud is the request URI");
        assert!(wpt.exp + 30 >= WIMSE_NOW, "not expired");
        assert!(wpt.exp <= WIMSE_NOW + 330, "not too long-lived");
        assert!(wpt.jti.len() >= 16, "jti long enough");
    }
    accepted
}
