//! Inputs that once crashed a fuzz target, replayed through every fuzz
//! target's body (the same code, `fuzz/targets.rs`) on each test run; and
//! the targets' accepting paths reached with valid inputs, so their
//! oracles are known to run.

#[path = "../fuzz/targets.rs"]
mod targets;

use std::path::Path;

/// A target's body: whether a verifier accepted the input.
type Target = fn(&[u8]) -> bool;

/// Every target, by name.
const TARGETS: [(&str, Target); 8] = [
    ("jws_parse", targets::jws_parse),
    ("proof_verify", targets::proof_verify),
    ("token_verify", targets::token_verify),
    ("sa_token_verify", targets::sa_token_verify),
    ("admission_review", targets::admission_review),
    ("jwt_svid_verify", targets::jwt_svid_verify),
    ("wit_verify", targets::wit_verify),
    ("wpt_verify", targets::wpt_verify),
];

#[test]
fn every_saved_crash_input_goes_through_every_target_and_is_refused() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let bytes = std::fs::read(&path).unwrap();
        for (name, target) in TARGETS {
            // A panic (a parser's, or an oracle's) fails the test.
            assert!(!target(&bytes), "{name} accepted {}", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 1);
}

#[test]
fn a_valid_proof_and_a_valid_token_reach_the_oracles() {
    let key = tally::dpop::ProofKey::generate().unwrap();
    let proof = key
        .mint(
            targets::PROOF_METHOD,
            targets::PROOF_URL,
            None,
            None,
            targets::PROOF_NOW,
        )
        .unwrap();
    assert!(targets::proof_verify(proof.as_bytes()));
    // One byte off: refused, without a panic.
    let mut spoiled = proof.into_bytes();
    let last = spoiled.len() - 1;
    spoiled[last] = if spoiled[last] == b'A' { b'B' } else { b'A' };
    assert!(!targets::proof_verify(&spoiled));

    let request = tally::token::MintRequest {
        subject: &"spiffe://example.org/ns/shop/sa/checkout".parse().unwrap(),
        audience: &"spiffe://example.org/ns/pay/sa/payments".parse().unwrap(),
        scope: &"payments:read".parse().unwrap(),
        class: tally::token::TokenClass::Service,
        ttl: 300,
        jkt: key.thumbprint(),
    };
    let (token, _) = targets::token_signer()
        .mint(&request, 1_800_000_000)
        .unwrap();
    assert!(targets::token_verify(token.expose().as_bytes()));
    // An access token is no JWT-SVID, and the reverse.
    assert!(!targets::jwt_svid_verify(token.expose().as_bytes()));

    let audience = targets::JWT_SVID_AUDIENCE.parse().unwrap();
    let (svid, _) = tally::token::jwt_svid::mint(
        targets::token_signer(),
        &"spiffe://example.org/ns/shop/sa/checkout".parse().unwrap(),
        &[audience],
        300,
        1_800_000_000,
    )
    .unwrap();
    assert!(targets::jwt_svid_verify(svid.expose().as_bytes()));
    assert!(!targets::token_verify(svid.expose().as_bytes()));
}

#[test]
fn a_valid_wit_and_wpt_reach_the_wimse_oracles() {
    let wit = targets::wimse_wit();
    assert!(targets::wit_verify(wit.as_bytes()));
    // A WIT is no access token, and the reverse.
    assert!(!targets::token_verify(wit.as_bytes()));
    let other = tally::wimse::wpt::WptInput {
        aud: targets::WIMSE_URL,
        wit,
        access_token: None,
        txn_token: None,
        other: &[],
        lifetime: 60,
    };
    let wpt =
        tally::wimse::wpt::mint(targets::wimse_workload_key(), &other, targets::WIMSE_NOW).unwrap();
    assert!(targets::wpt_verify(wpt.as_bytes()));
    let bound = tally::wimse::wpt::WptInput {
        access_token: Some("tok"),
        other: &[targets::WIMSE_HEADER],
        ..other
    };
    let wpt =
        tally::wimse::wpt::mint(targets::wimse_workload_key(), &bound, targets::WIMSE_NOW).unwrap();
    assert!(targets::wpt_verify(wpt.as_bytes()));
    // A WPT is not a WIT, and one byte off is refused without a panic.
    assert!(!targets::wit_verify(wpt.as_bytes()));
    let mut spoiled = wpt.into_bytes();
    let last = spoiled.len() - 1;
    spoiled[last] = if spoiled[last] == b'A' { b'B' } else { b'A' };
    assert!(!targets::wpt_verify(&spoiled));
}

#[test]
fn a_pod_review_reaches_the_admission_oracle() {
    let review = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"u","kind":{"group":"","version":"v1","kind":"Pod"},"operation":"CREATE","namespace":"shop","object":{"metadata":{"annotations":{"a~/b":"c"}},"spec":{"initContainers":[],"containers":[{"name":"app","image":"x"}]}}}}"#;
    assert!(targets::admission_review(review));
    assert!(!targets::admission_review(b"{}"));
}
