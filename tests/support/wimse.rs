//! WIMSE fixtures: the draft's example vectors (tests/data/wimse), and a
//! WIT issuer and workload generated per test, with helpers to sign
//! WITs and WPTs with any header and claims (hostile ones included).

use super::{CALLER, NOW, URL};
use serde_json::{Value, json};
use tally::dpop::{NormalizedUri, TokenHash};
use tally::jose::jws::{encode_header, sign_compact};
use tally::jose::{JwsSigner, SigningKey, VerifyingKey};
use tally::wimse::{VerifiedWit, WitCheck, WitConfig, WitError, WitKeys, wit};

/// Inside both of the draft example's lifetimes (WIT iat 1745508910, WPT
/// exp 1745510016).
pub const DRAFT_NOW: u64 = 1_745_509_000;
/// The draft example WPT's `exp`.
pub const DRAFT_WPT_EXP: u64 = 1_745_510_016;
/// The draft example's request URI (its WPT's `aud`).
pub const DRAFT_URL: &str = "https://workload.example.com/path";
/// The issuer `kid` of the generated fixture.
pub const WIT_KID: &str = "w1";

/// A file of tests/data/wimse, surrounding whitespace trimmed.
pub fn data(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/wimse")
        .join(name);
    std::fs::read_to_string(path).unwrap().trim().to_owned()
}

/// The path of a file of tests/data/wimse, for the CLI.
pub fn data_path(name: &str) -> String {
    format!("{}/tests/data/wimse/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The draft issuer's key set (`June 5`).
pub fn draft_keys() -> WitKeys {
    WitKeys::parse(data("issuer.jwks.json").as_bytes()).unwrap()
}

/// Signs `claims` under `header` with `key`, exactly as given.
pub fn sign_with(header: &Value, claims: &Value, key: &impl JwsSigner) -> String {
    sign_compact(&encode_header(header), claims.to_string().as_bytes(), key).unwrap()
}

/// The public JWK of `key` with `alg`: what a WIT's `cnf.jwk` holds.
pub fn cnf_jwk(key: &VerifyingKey, alg: &str) -> Value {
    let mut jwk: Value = serde_json::from_str(&key.to_jwk_json()).unwrap();
    jwk["alg"] = json!(alg);
    jwk
}

/// A WIT issuer (ES256, `kid` [`WIT_KID`]) and a workload (ES256) with
/// the WIT it holds, at [`NOW`].
pub struct WimseFixture {
    pub issuer: SigningKey,
    pub keys: WitKeys,
    pub workload: SigningKey,
}

impl WimseFixture {
    pub fn new() -> Self {
        let issuer = SigningKey::generate().unwrap();
        let mut keys = WitKeys::default();
        keys.insert(WIT_KID, VerifyingKey::P256(issuer.public_key().clone()));
        Self {
            issuer,
            keys,
            workload: SigningKey::generate().unwrap(),
        }
    }

    pub fn wit_header() -> Value {
        json!({"typ": "wit+jwt", "alg": "ES256", "kid": WIT_KID})
    }

    /// The claims of a valid WIT for the workload key, as JSON.
    pub fn wit_claims(&self) -> Value {
        json!({
            "sub": CALLER,
            "cnf": {"jwk": cnf_jwk(&self.workload.verifying_key(), "ES256")},
            "iat": NOW - 60, "nbf": NOW - 60, "exp": NOW + 3600,
            "jti": "wit-1",
        })
    }

    /// A WIT with header and claims edited by `edit`, signed by the issuer.
    pub fn wit_with(&self, edit: impl FnOnce(&mut Value, &mut Value)) -> String {
        let mut header = Self::wit_header();
        let mut claims = self.wit_claims();
        edit(&mut header, &mut claims);
        sign_with(&header, &claims, &self.issuer)
    }

    /// A valid WIT.
    pub fn wit(&self) -> String {
        self.wit_with(|_, _| {})
    }

    /// Verifies `text` at [`NOW`] with `config`, returning the result and
    /// the checks that passed.
    pub fn check_wit(
        &self,
        text: &str,
        config: &WitConfig,
    ) -> (Result<VerifiedWit, WitError>, Vec<WitCheck>) {
        let mut passed = Vec::new();
        let result = wit::verify(text, &self.keys, NOW, config, &mut passed);
        (result, passed)
    }

    /// The valid WIT, verified.
    pub fn verified(&self, wit_text: &str) -> VerifiedWit {
        self.check_wit(wit_text, &WitConfig::default()).0.unwrap()
    }

    pub fn wpt_header(alg: &str) -> Value {
        json!({"typ": "wpt+jwt", "alg": alg})
    }

    /// The claims of a valid WPT for `POST URL` with `wit_text`, as JSON.
    pub fn wpt_claims(wit_text: &str) -> Value {
        json!({
            "aud": URL,
            "exp": NOW + 60,
            "jti": "9wLJmdEqGr3UrSSaQ2aZpw",
            "wth": TokenHash::of(wit_text).to_ath(),
        })
    }

    /// A WPT with header and claims edited, signed by the workload key.
    pub fn wpt_with(&self, wit_text: &str, edit: impl FnOnce(&mut Value, &mut Value)) -> String {
        let mut header = Self::wpt_header("ES256");
        let mut claims = Self::wpt_claims(wit_text);
        edit(&mut header, &mut claims);
        sign_with(&header, &claims, &self.workload)
    }
}

/// Which check failed: the first of `all` that is not in `passed`, with
/// every one before it passed.
pub fn first_failed<C: Copy + PartialEq + std::fmt::Debug>(all: &[C], passed: &[C]) -> C {
    let at = passed.len();
    assert_eq!(passed, &all[..at], "checks ran out of order");
    all[at]
}

/// The request URI of every fixture WPT, normalized.
pub fn uri() -> NormalizedUri {
    NormalizedUri::parse(URL).unwrap()
}
