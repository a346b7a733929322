//! Ratios to raw aws-lc-rs P-256 sign/verify, measured in alternating
//! rounds so that drift in machine speed (a shared VM's neighbours, CPU
//! frequency) hits the reference and the operation alike. Each round times
//! `BATCH` raw operations, then `BATCH` of the operation; the report is the
//! median of the per-round ratios, with the quartiles.
//!
//! The verify reference checks a *different* signature each time, as a
//! verifier does (every request brings a new proof): re-verifying one
//! signature in a loop runs 5–10% faster on warm caches and trained
//! branch predictors, which flatters the reference. That ratio is printed
//! too.
//!
//! Run: `cargo bench --bench paired` (prints a Markdown table).

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    ParsedPublicKey,
};
use std::hint::black_box;
use std::time::{Duration, Instant};
use tally::auth::{Request, RequestVerifier, VerifierConfig};
use tally::dpop::ReplayCache;
use tally::dpop::proof::ProofKey;
use tally::jose::SigningKey;
use tally::token::{Jwks, MintRequest, TokenClass, TokenConfig, TokenSigner};

const NOW: u64 = 1_800_000_000;
const ISSUER: &str = "https://broker.tally.test:8444";
const SERVICE: &str = "spiffe://example.org/ns/pay/sa/payments";
const URL: &str = "https://payments.example.org/v1/charges";
const ROUNDS: usize = 61;
const BATCH: usize = 200;

fn time(n: usize, mut f: impl FnMut(usize)) -> Duration {
    let start = Instant::now();
    for i in 0..n {
        f(i);
    }
    start.elapsed()
}

struct Row {
    name: &'static str,
    reference: &'static str,
    target: Option<f64>,
    ratios: Vec<f64>,
    nanos: Vec<f64>,
}

fn quartiles(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    let q = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    (q(0.25), q(0.5), q(0.75))
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // Reference: one key pair, one message the size of a proof.
    let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let rng = SystemRandom::new();
    let message = vec![b'e'; 420];
    let signature = pair.sign(&rng, &message).unwrap();
    let public =
        ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, pair.public_key().as_ref()).unwrap();
    let signed: Vec<(Vec<u8>, aws_lc_rs::signature::Signature)> = (0..BATCH)
        .map(|i| {
            let mut m = message.clone();
            m[..8].copy_from_slice(&(i as u64).to_le_bytes());
            let sig = pair.sign(&rng, &m).unwrap();
            (m, sig)
        })
        .collect();

    // A broker key, a client key and one token.
    let signer = TokenSigner::new(SigningKey::generate().unwrap(), "k1", ISSUER);
    let mut jwks = Jwks::default();
    jwks.insert("k1", signer.key().public_key().clone());
    let client = ProofKey::generate().unwrap();
    let request = MintRequest {
        subject: &"spiffe://example.org/ns/shop/sa/checkout".parse().unwrap(),
        audience: &SERVICE.parse().unwrap(),
        scope: &"payments:charge payments:read".parse().unwrap(),
        class: TokenClass::Service,
        ttl: 300,
        jkt: client.thumbprint(),
    };
    let token = signer.mint(&request, NOW).unwrap().0.expose().to_owned();
    let auth = format!("DPoP {token}");
    let verifier = |cache| {
        let mut config = VerifierConfig::new(TokenConfig::new(ISSUER, SERVICE.parse().unwrap()));
        config.token_cache_capacity = cache;
        RequestVerifier::new(config).unwrap()
    };
    let cached = verifier(10_000);
    let uncached = verifier(0);
    let check = |v: &RequestVerifier, proof: &str| {
        let authorization = [auth.as_bytes()];
        let dpop = [proof.as_bytes()];
        let req = Request {
            method: "POST",
            uri: URL,
            authorization: &authorization,
            dpop: &dpop,
        };
        black_box(v.verify(&req, &jwks, NOW).unwrap());
    };
    let replay = ReplayCache::new(4 << 20, 120).unwrap();
    let jkt = client.thumbprint();
    let mut replay_counter = 0u64;

    let mut rows = vec![
        Row {
            name: "proof mint",
            reference: "sign",
            target: Some(1.30),
            ratios: vec![],
            nanos: vec![],
        },
        Row {
            name: "full request check, token cached",
            reference: "verify",
            target: Some(1.15),
            ratios: vec![],
            nanos: vec![],
        },
        Row {
            name: "full request check, token uncached",
            reference: "2 verify",
            target: Some(1.15),
            ratios: vec![],
            nanos: vec![],
        },
        Row {
            name: "full request check, token cached, vs re-verifying one signature",
            reference: "verify (same signature)",
            target: None,
            ratios: vec![],
            nanos: vec![],
        },
    ];
    let mut reference_ns: [Vec<f64>; 3] = [vec![], vec![], vec![]];
    let mut replay_ns = Vec::new();
    // Warm up: fill caches, settle the clock.
    for _ in 0..2 {
        let proofs: Vec<String> = (0..BATCH)
            .map(|_| client.mint("POST", URL, Some(&token), None, NOW).unwrap())
            .collect();
        for p in &proofs {
            check(&cached, p);
        }
    }
    for _ in 0..ROUNDS {
        let sign = time(BATCH, |_| {
            black_box(pair.sign(&rng, black_box(&message)).unwrap());
        });
        let mint = time(BATCH, |_| {
            black_box(
                client
                    .mint("POST", URL, Some(black_box(&token)), None, NOW)
                    .unwrap(),
            );
        });
        rows[0].ratios.push(mint.as_secs_f64() / sign.as_secs_f64());
        rows[0].nanos.push(mint.as_nanos() as f64 / BATCH as f64);

        let proofs: Vec<String> = (0..2 * BATCH)
            .map(|_| client.mint("POST", URL, Some(&token), None, NOW).unwrap())
            .collect();
        let verify = time(BATCH, |_| {
            public
                .verify_sig(black_box(&message), black_box(signature.as_ref()))
                .unwrap();
        });
        let verify_distinct = time(BATCH, |i| {
            let (m, sig) = &signed[i];
            public
                .verify_sig(black_box(m), black_box(sig.as_ref()))
                .unwrap();
        });

        let full_cached = time(BATCH, |i| check(&cached, &proofs[i]));
        let full_uncached = time(BATCH, |i| check(&uncached, &proofs[BATCH + i]));
        rows[1]
            .ratios
            .push(full_cached.as_secs_f64() / verify_distinct.as_secs_f64());
        rows[1]
            .nanos
            .push(full_cached.as_nanos() as f64 / BATCH as f64);
        rows[2]
            .ratios
            .push(full_uncached.as_secs_f64() / (2.0 * verify_distinct.as_secs_f64()));
        rows[2]
            .nanos
            .push(full_uncached.as_nanos() as f64 / BATCH as f64);
        rows[3]
            .ratios
            .push(full_cached.as_secs_f64() / verify.as_secs_f64());
        rows[3]
            .nanos
            .push(full_cached.as_nanos() as f64 / BATCH as f64);
        reference_ns[0].push(sign.as_nanos() as f64 / BATCH as f64);
        reference_ns[1].push(verify_distinct.as_nanos() as f64 / BATCH as f64);
        reference_ns[2].push(verify.as_nanos() as f64 / BATCH as f64);

        let insert = time(BATCH * 50, |_| {
            replay_counter += 1;
            let key = replay.key(&jkt, &replay_counter.to_string());
            replay.check_and_insert(key, NOW + 60, NOW).unwrap();
        });
        replay_ns.push(insert.as_nanos() as f64 / (BATCH * 50) as f64);
    }
    let names = [
        "reference: aws-lc-rs P-256 sign",
        "reference: aws-lc-rs P-256 verify, a different signature each time",
        "reference: aws-lc-rs P-256 verify, one signature again and again",
    ];
    println!("| operation | median time | median ratio (quartiles) | target |");
    println!("|---|---:|---:|---|");
    for (name, v) in names.iter().zip(reference_ns.iter_mut()) {
        let (_, ns, _) = quartiles(v);
        println!("| {name} | {:.2} µs | — | |", ns / 1000.0);
    }
    for row in &mut rows {
        let (q1, med, q3) = quartiles(&mut row.ratios);
        let (_, ns, _) = quartiles(&mut row.nanos);
        let target = row.target.map_or(String::new(), |t| {
            format!(
                "≤ {t}× {} {}",
                row.reference,
                if med <= t { "✓" } else { "✗" }
            )
        });
        println!(
            "| {} | {:.2} µs | {med:.3}× {} ({q1:.3}–{q3:.3}) | {target} |",
            row.name,
            ns / 1000.0,
            row.reference
        );
    }
    let (_, ns, _) = quartiles(&mut replay_ns);
    println!(
        "| replay check-and-insert ({} live entries) | {ns:.0} ns | — | ≤ 1 µs {} |",
        replay.stats().entries,
        if ns <= 1000.0 { "✓" } else { "✗" }
    );
}
