//! Inputs that once crashed a fuzz target, replayed through every parser.

use std::path::Path;
use tally::dpop::NormalizedUri;
use tally::dpop::proof::{self, NonceRule, ProofConfig, ProofContext};
use tally::jose::{Jws, Limits};

#[test]
fn every_saved_crash_input_is_refused_without_panicking() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz_regressions");
    let mut seen = 0;
    let uri = NormalizedUri::parse("https://server.example.com/token").unwrap();
    for entry in std::fs::read_dir(dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(Jws::parse(&text, &Limits::default()).is_err());
        let ctx = ProofContext {
            method: "POST",
            uri: &uri,
            token_hash: None,
            expected_jkt: None,
            nonce: NonceRule::NotRequired,
            keys: None,
        };
        assert!(
            proof::verify(&text, &ctx, &ProofConfig::default(), 1_562_262_616, &mut ()).is_err()
        );
        seen += 1;
    }
    assert!(seen >= 1);
}
