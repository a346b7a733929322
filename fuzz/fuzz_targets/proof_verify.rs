//! The DPoP proof verifier on arbitrary proofs, with a real token hash,
//! key binding and nonce rule: no panic, and nothing but a well-formed,
//! signed proof passes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::dpop::proof::{self, NonceRule, ProofConfig, ProofContext, TokenHash};
use tally::dpop::NormalizedUri;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let uri = NormalizedUri::parse("https://resource.example.org/protectedresource").unwrap();
    let hash = TokenHash::of("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU");
    for (token_hash, nonce) in [(None, NonceRule::NotRequired), (Some(&hash), NonceRule::Exact("n"))] {
        let ctx = ProofContext {
            method: "GET",
            uri: &uri,
            token_hash,
            expected_jkt: None,
            nonce,
            keys: None,
        };
        let _ = proof::verify(text, &ctx, &ProofConfig::default(), 1_562_262_618, &mut ());
    }
});
