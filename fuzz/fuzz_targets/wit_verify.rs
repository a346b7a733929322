//! The WIT verifier (and the WIT key-set parser) on arbitrary input
//! against a fixed issuer key: no panic, and an accepted WIT verifies
//! under that key with the thumbprint of its own cnf.jwk.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::wit_verify(data);
});
