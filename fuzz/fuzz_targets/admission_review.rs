//! The AdmissionReview parser and the injector's decision on arbitrary
//! bytes: no panic; a patch always applies to the pod as it was sent, and
//! the patched pod, reviewed again, yields no patch.
#![no_main]

#[path = "../targets.rs"]
mod targets;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    targets::admission_review(data);
});
