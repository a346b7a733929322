//! The access-token verifier on arbitrary tokens against a fixed JWKS: no
//! panic, and an accepted token verifies under the trusted key.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::token_verify(data);
});
