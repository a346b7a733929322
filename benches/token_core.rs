//! Token-core benchmarks on fixed inputs and a fixed `now`.
//!
//! The first two benches are the reference: raw aws-lc-rs P-256 ECDSA sign
//! and verify. Everything else is reported as a ratio to them, measured in
//! the same run (`scripts/bench-ratios` prints the table).

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    ParsedPublicKey,
};
use criterion::{Criterion, criterion_group, criterion_main};
use std::cell::Cell;
use std::hint::black_box;
use tally::auth::{Request, RequestVerifier, VerifierConfig};
use tally::dpop::proof::{self, NonceRule, ProofConfig, ProofContext, ProofKey, TokenHash};
use tally::dpop::{NormalizedUri, ReplayCache};
use tally::jose::SigningKey;
use tally::token::{self, Jwks, MintRequest, TokenClass, TokenConfig, TokenSigner};

const NOW: u64 = 1_800_000_000;
const ISSUER: &str = "https://broker.tally.test:8444";
const CALLER: &str = "spiffe://example.org/ns/shop/sa/checkout";
const SERVICE: &str = "spiffe://example.org/ns/pay/sa/payments";
const URL: &str = "https://payments.example.org/v1/charges";

struct Setup {
    signer: TokenSigner,
    jwks: Jwks,
    client: ProofKey,
    token: String,
}

fn setup() -> Setup {
    let signer = TokenSigner::new(SigningKey::generate().unwrap(), "k1", ISSUER);
    let mut jwks = Jwks::default();
    jwks.insert("k1", signer.key().public_key().clone());
    let client = ProofKey::generate().unwrap();
    let request = MintRequest {
        subject: &CALLER.parse().unwrap(),
        audience: &SERVICE.parse().unwrap(),
        scope: &"payments:charge payments:read".parse().unwrap(),
        class: TokenClass::Service,
        ttl: 300,
        jkt: client.thumbprint(),
    };
    let token = signer.mint(&request, NOW).unwrap().0.expose().to_owned();
    Setup {
        signer,
        jwks,
        client,
        token,
    }
}

fn token_config() -> TokenConfig {
    TokenConfig::new(ISSUER, SERVICE.parse().unwrap())
}

fn reference(c: &mut Criterion) {
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    // A message the size of a proof's signing input.
    let message = vec![b'e'; 420];
    let rng = SystemRandom::new();
    let signature = pair.sign(&rng, &message).unwrap();
    let public =
        ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref()).unwrap();
    c.bench_function("reference/p256_sign", |b| {
        b.iter(|| pair.sign(&rng, black_box(&message)).unwrap())
    });
    let sec1 = pair.public_key().as_ref().to_vec();
    c.bench_function("reference/p256_parse_key_and_verify", |b| {
        b.iter(|| {
            let key = ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, black_box(&sec1)).unwrap();
            key.verify_sig(black_box(&message), black_box(signature.as_ref()))
                .unwrap()
        })
    });
    c.bench_function("reference/p256_verify", |b| {
        b.iter(|| {
            public
                .verify_sig(black_box(&message), black_box(signature.as_ref()))
                .unwrap()
        })
    });
}

fn proofs(c: &mut Criterion) {
    let s = setup();
    c.bench_function("proof/mint", |b| {
        b.iter(|| {
            s.client
                .mint("POST", URL, Some(black_box(&s.token)), None, NOW)
                .unwrap()
        })
    });
    let p = s
        .client
        .mint("POST", URL, Some(&s.token), None, NOW)
        .unwrap();
    let uri = NormalizedUri::parse(URL).unwrap();
    let hash = TokenHash::of(&s.token);
    let jkt = s.client.thumbprint();
    let ctx = ProofContext {
        method: "POST",
        uri: &uri,
        token_hash: Some(&hash),
        expected_jkt: Some(&jkt),
        nonce: NonceRule::NotRequired,
        keys: None,
    };
    let config = ProofConfig::default();
    c.bench_function("proof/verify", |b| {
        b.iter(|| proof::verify(black_box(&p), &ctx, &config, NOW, &mut ()).unwrap())
    });
    // The same, with the caller's key already parsed (a verifier's steady
    // state: a caller's DPoP key lives for hours).
    let keys = tally::jose::KeyCache::new(16);
    let warm = ProofContext {
        keys: Some(&keys),
        ..ctx
    };
    c.bench_function("proof/verify_known_key", |b| {
        b.iter(|| proof::verify(black_box(&p), &warm, &config, NOW, &mut ()).unwrap())
    });
    let public = s.client.signing_key().public_key().clone();
    c.bench_function("jwk/thumbprint", |b| {
        b.iter(|| black_box(&public).thumbprint())
    });
    let jwk: serde_json::Value = serde_json::from_str(&public.to_jwk_json()).unwrap();
    c.bench_function("jwk/parse_and_validate", |b| {
        b.iter(|| tally::jose::PublicKey::from_jwk(black_box(&jwk)).unwrap())
    });
    let limits = tally::jose::Limits::default();
    c.bench_function("jws/parse", |b| {
        b.iter(|| tally::jose::Jws::parse(black_box(&p), &limits).unwrap())
    });
}

fn tokens(c: &mut Criterion) {
    let s = setup();
    let config = token_config();
    c.bench_function("token/verify", |b| {
        b.iter(|| token::verify(black_box(&s.token), &s.jwks, &config, NOW, &mut ()).unwrap())
    });
    let _ = &s.signer;
}

fn full_request(c: &mut Criterion, name: &str, token_cache_capacity: usize) {
    let s = setup();
    let mut config = VerifierConfig::new(token_config());
    config.token_cache_capacity = token_cache_capacity;
    config.replay_capacity = 64 << 20;
    let verifier = RequestVerifier::new(config).unwrap();
    let auth = format!("DPoP {}", s.token);
    c.bench_function(name, |b| {
        // Every request needs a fresh proof (replay protection). Proofs are
        // minted before the clock starts; only the checks are timed.
        b.iter_custom(|iters| {
            let proofs: Vec<String> = (0..iters)
                .map(|_| {
                    s.client
                        .mint("POST", URL, Some(&s.token), None, NOW)
                        .unwrap()
                })
                .collect();
            let start = std::time::Instant::now();
            for proof in &proofs {
                let authorization = [auth.as_bytes()];
                let dpop = [proof.as_bytes()];
                let request = Request {
                    method: "POST",
                    uri: URL,
                    authorization: &authorization,
                    dpop: &dpop,
                };
                black_box(verifier.verify(&request, &s.jwks, NOW).unwrap());
            }
            start.elapsed()
        })
    });
}

fn requests(c: &mut Criterion) {
    full_request(c, "request/full_check_token_cached", 10_000);
    full_request(c, "request/full_check_token_uncached", 0);
}

/// Check-and-insert at a steady state of about 1M live entries: simulated
/// time advances so that inserts and expiries balance (16,667 proofs per
/// simulated second, each remembered for the 60 s proof age), and the cost
/// of expiry is included.
fn replay(c: &mut Criterion) {
    const RATE: u64 = 16_667;
    const WINDOW: u64 = 120;
    let cache = ReplayCache::new(4 << 20, WINDOW).unwrap();
    let jkt = ProofKey::generate().unwrap().thumbprint();
    let counter = Cell::new(0u64);
    let step = |cache: &ReplayCache| {
        let i = counter.get();
        counter.set(i + 1);
        let now = NOW + i / RATE;
        let key = cache.key(&jkt, &i.to_string());
        cache.check_and_insert(key, now + 60, now).unwrap();
    };
    for _ in 0..RATE * 70 {
        step(&cache);
    }
    let stats = cache.stats();
    eprintln!(
        "replay cache after prefill: {} live entries, {} heap bytes, {:.1} bytes/entry",
        stats.entries,
        stats.heap_bytes,
        stats.heap_bytes as f64 / stats.entries as f64
    );
    c.bench_function("replay/check_and_insert_1M_live", |b| {
        b.iter(|| step(&cache))
    });
    let stats = cache.stats();
    eprintln!(
        "replay cache after bench: {} live entries, {:.1} bytes/entry",
        stats.entries,
        stats.heap_bytes as f64 / stats.entries as f64
    );
}

/// The WIMSE request check (WIT, optional bound token, WPT, replay) on the
/// same inputs as `request/*`: a WIT alone, and a WIT with the access
/// token (cached), each with a fresh WPT per request.
fn wimse(c: &mut Criterion) {
    use tally::auth::credentials::WimseCredentials;
    use tally::auth::wimse::WimseRequest;
    use tally::wimse::{WitKeys, WptInput, wit, wpt};
    let s = setup();
    let mut config = VerifierConfig::new(token_config());
    config.replay_capacity = 64 << 20;
    let verifier = RequestVerifier::new(config).unwrap();
    let wit_keys = WitKeys::from_jwks(&s.jwks);
    let (minted, _) = wit::mint(
        &s.signer,
        &CALLER.parse().unwrap(),
        s.client.signing_key().public_key(),
        3_600,
        NOW,
    )
    .unwrap();
    let wit_text = minted.expose().to_owned();
    let url = NormalizedUri::parse(URL).unwrap();
    for (name, token) in [
        ("wimse/full_check_wit_alone", None),
        (
            "wimse/full_check_wit_and_token_cached",
            Some(s.token.as_str()),
        ),
    ] {
        c.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let wpts: Vec<String> = (0..iters)
                    .map(|_| {
                        let input = WptInput {
                            aud: URL,
                            wit: &wit_text,
                            access_token: token,
                            txn_token: None,
                            other: &[],
                            lifetime: 60,
                        };
                        wpt::mint(s.client.signing_key(), &input, NOW).unwrap()
                    })
                    .collect();
                let headers: [(&str, &str); 0] = [];
                let start = std::time::Instant::now();
                for text in &wpts {
                    let verified = verifier
                        .verify_wimse(
                            &WimseCredentials {
                                wit: &wit_text,
                                wpt: text,
                                token,
                            },
                            &WimseRequest {
                                url: &url,
                                txn_token: &[],
                                headers: &headers,
                                authority_configured: true,
                            },
                            None,
                            &s.jwks,
                            &wit_keys,
                            NOW,
                        )
                        .unwrap();
                    verifier.spend_wpt(verified.wpt, NOW).unwrap();
                    black_box(verified.caller);
                }
                start.elapsed()
            })
        });
    }
}

criterion_group!(benches, reference, proofs, tokens, requests, replay, wimse);
criterion_main!(benches);
