//! The Kubernetes ServiceAccount token verifier and the JWKS parser on
//! arbitrary bytes: no panic. The first byte picks the target.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::sa_token_verify(data);
});
