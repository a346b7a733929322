//! The compact JWS parser, `htu` normalization (asserting it is
//! idempotent), request-path routability, the header reader, the strict
//! JSON reader and the JWKS parser on arbitrary input: no panic.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::jws_parse(data);
});
