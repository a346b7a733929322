//! The request-head judgement every front end shares (authority from the
//! target or `Host`, the served list, the URL, the path rule) on
//! arbitrary input: no panic; whatever passes names a path that passes
//! again, is already normalized, and has the same segments after one more
//! percent-decoding (no new `/`, `\`, NUL or dot segment).
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally::auth::path::check_routable;
use tally::auth::target::{Authority, Scheme, request_target};
use tally::dpop::NormalizedUri;

fuzz_target!(|data: &[u8]| {
    // target authority | path | host | host …, split on 0xFF.
    let mut parts = data.split(|&b| b == 0xff);
    let target = parts.next().and_then(|p| std::str::from_utf8(p).ok());
    let target = target.filter(|t| !t.is_empty());
    let Some(path) = parts.next().and_then(|p| std::str::from_utf8(p).ok()) else {
        return;
    };
    let hosts: Vec<&[u8]> = parts.collect();
    let served = [Authority::parse("svc:8080").unwrap()];
    for list in [&served[..], &[]] {
        if let Ok(t) = request_target(Scheme::Http, target, path, &hosts, list) {
            let path = t.path();
            assert!(check_routable(path).is_ok());
            let again = NormalizedUri::parse(t.url.as_str()).expect("reparses");
            assert_eq!(again.path(), path, "normalized once is normalized");
            assert!(path.starts_with('/'));
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = check_routable(text);
    }
});
