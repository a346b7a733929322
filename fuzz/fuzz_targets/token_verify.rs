//! The access-token verifier on arbitrary tokens against a fixed JWKS:
//! no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tally::jose::SigningKey;
use tally::token::{self, Jwks, TokenConfig};

fn jwks() -> &'static Jwks {
    static JWKS: OnceLock<Jwks> = OnceLock::new();
    JWKS.get_or_init(|| {
        let mut jwks = Jwks::default();
        jwks.insert("k1", SigningKey::generate().unwrap().public_key().clone());
        jwks
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let config = TokenConfig::new("https://broker.example", "spiffe://example.org/ns/pay/sa/payments".parse().unwrap());
    let _ = token::verify(text, jwks(), &config, 1_800_000_000, &mut ());
});
