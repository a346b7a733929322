//! The WPT verifier on arbitrary input against a fixed, verified WIT and
//! request: no panic, and an accepted WPT verifies under the WIT's key
//! and names the request.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::wpt_verify(data);
});
