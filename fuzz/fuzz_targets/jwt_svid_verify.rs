//! The JWT-SVID verifier on arbitrary bytes: no panic, and nothing but a
//! JWT-SVID signed by the trusted key for the audience passes.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::jwt_svid_verify(data);
});
