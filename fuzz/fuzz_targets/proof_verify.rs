//! The DPoP proof verifier on arbitrary proofs, with a real token hash and
//! nonce rule: no panic, and nothing but a well-formed proof signed by its
//! own key passes (the oracle in `targets::proof_verify`).
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::proof_verify(data);
});
