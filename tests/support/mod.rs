//! Shared test fixtures: a broker signing key and its JWKS, a client DPoP
//! key, and helpers to sign arbitrary (hostile) JWS by hand. Everything is
//! generated per test against a fixed `NOW`.
#![allow(dead_code)]

pub mod broker;
pub mod cluster;
pub mod ctl;
pub mod envoy;
pub mod ext_authz;
pub mod grpc;
pub mod https;
pub mod inventory;
pub mod mesh;
pub mod mtls;
pub mod partition;
pub mod postgres;
pub mod process;
pub mod proxy;
pub mod reference;
pub mod wimse;

use serde_json::{Value, json};
use tally::dpop::NormalizedUri;
use tally::dpop::proof::{NonceRule, ProofContext, ProofKey, TokenHash};
use tally::jose::jws::{encode_header, sign_compact};
use tally::jose::{SigningKey, b64};
use tally::token::{AccessToken, Jwks, MintRequest, TokenClass, TokenConfig, TokenSigner};

/// A fixed "now" (2027-01-15) for every check.
pub const NOW: u64 = 1_800_000_000;
pub const ISSUER: &str = "https://broker.tally.test:8444";
pub const CALLER: &str = "spiffe://example.org/ns/shop/sa/checkout";
pub const SERVICE: &str = "spiffe://example.org/ns/pay/sa/payments";
pub const URL: &str = "https://payments.example.org/v1/charges";
pub const KID: &str = "k1";

/// Signs `claims` under `header`, exactly as given.
pub fn sign_raw(header: &Value, claims: &Value, key: &SigningKey) -> String {
    sign_compact(&encode_header(header), claims.to_string().as_bytes(), key).unwrap()
}

/// Replaces segment `i` of a compact JWS.
pub fn with_segment(jws: &str, i: usize, segment: &str) -> String {
    let mut parts: Vec<&str> = jws.split('.').collect();
    parts[i] = segment;
    parts.join(".")
}

pub struct Fixture {
    pub signer: TokenSigner,
    pub jwks: Jwks,
    pub client: ProofKey,
}

impl Fixture {
    pub fn new() -> Self {
        let signer = TokenSigner::new(SigningKey::generate().unwrap(), KID, ISSUER);
        let mut jwks = Jwks::default();
        jwks.insert(KID, signer.key().public_key().clone());
        Self {
            signer,
            jwks,
            client: ProofKey::generate().unwrap(),
        }
    }

    pub fn token_config(&self) -> TokenConfig {
        TokenConfig::new(ISSUER, SERVICE.parse().unwrap())
    }

    /// A valid token for the client key, 300 s from `NOW`.
    pub fn token(&self) -> AccessToken {
        self.token_at(NOW, 300)
    }

    pub fn token_at(&self, now: u64, ttl: u64) -> AccessToken {
        let request = MintRequest {
            subject: &CALLER.parse().unwrap(),
            audience: &SERVICE.parse().unwrap(),
            scope: &"payments:charge payments:read".parse().unwrap(),
            class: TokenClass::Service,
            ttl,
            jkt: self.client.thumbprint(),
        };
        self.signer.mint(&request, now).unwrap().0
    }

    /// The claims of a valid token, as JSON, for tests to spoil.
    pub fn token_claims(&self) -> Value {
        json!({
            "iss": ISSUER, "sub": CALLER, "client_id": CALLER, "aud": SERVICE,
            "scope": "payments:charge", "iat": NOW, "nbf": NOW, "exp": NOW + 300,
            "jti": "t-1", "cnf": {"jkt": self.client.thumbprint().to_string()}, "tcl": "service",
        })
    }

    pub fn token_header() -> Value {
        json!({"typ": "at+jwt", "alg": "ES256", "kid": KID})
    }

    /// A token with claims edited by `edit`, signed by the broker key.
    pub fn token_with(&self, edit: impl FnOnce(&mut Value)) -> String {
        let mut claims = self.token_claims();
        edit(&mut claims);
        sign_raw(&Self::token_header(), &claims, self.signer.key())
    }

    /// A valid proof for `POST URL` carrying `token`.
    pub fn proof(&self, token: &str) -> String {
        self.client
            .mint("POST", URL, Some(token), None, NOW)
            .unwrap()
    }

    pub fn proof_header(&self) -> Value {
        let jwk: Value =
            serde_json::from_str(&self.client.signing_key().public_key().to_jwk_json()).unwrap();
        json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk})
    }

    pub fn proof_claims(&self, token: &str) -> Value {
        json!({"jti": "p-1", "htm": "POST", "htu": URL, "iat": NOW, "ath": TokenHash::of(token).to_ath()})
    }

    /// A proof with header and claims edited, signed by the client key.
    pub fn proof_with(&self, token: &str, edit: impl FnOnce(&mut Value, &mut Value)) -> String {
        let mut header = self.proof_header();
        let mut claims = self.proof_claims(token);
        edit(&mut header, &mut claims);
        sign_raw(&header, &claims, self.client.signing_key())
    }
}

/// The request URI of every test, normalized.
pub fn uri() -> NormalizedUri {
    NormalizedUri::parse(URL).unwrap()
}

/// The context a resource server builds for `POST URL` with `hash`.
pub fn context<'a>(
    uri: &'a NormalizedUri,
    hash: Option<&'a TokenHash>,
    jkt: Option<&'a tally::jose::Jkt>,
) -> ProofContext<'a> {
    ProofContext {
        method: "POST",
        uri,
        token_hash: hash,
        expected_jkt: jkt,
        nonce: NonceRule::NotRequired,
        keys: None,
    }
}

/// A string of `n` bytes of base64url.
pub fn b64_of(n: usize) -> String {
    b64::encode(vec![7u8; n])
}
