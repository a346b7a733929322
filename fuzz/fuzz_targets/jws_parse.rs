//! The compact JWS parser, the strict JSON reader and `htu` normalization
//! on arbitrary input: no panic, and normalization is idempotent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::dpop::NormalizedUri;
use tally::jose::{Jws, Limits};

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(jws) = Jws::parse(text, &Limits::default()) {
            let _ = jws.typ();
        }
        if let Ok(uri) = NormalizedUri::parse(text) {
            let again = NormalizedUri::parse(uri.as_str()).expect("normalized URI reparses");
            assert_eq!(again, uri, "normalization is idempotent");
        }
        let _ = tally::auth::credentials::parse(&[data], &[data]);
    }
    let _ = tally::jose::json::parse_object(data);
    let _ = tally::token::Jwks::parse(data);
});
