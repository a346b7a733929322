//! The Kubernetes ServiceAccount token verifier and the JWKS parser on
//! arbitrary bytes: no panic. The first byte picks the target.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use tally::identity::k8s::{self, SaKeys, SaTokenConfig};

fn keys() -> &'static SaKeys {
    static KEYS: OnceLock<SaKeys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let key = tally::jose::SigningKey::generate().unwrap();
        let mut jwk: serde_json::Value =
            serde_json::from_str(&key.public_key().to_jwk_json()).unwrap();
        jwk["kid"] = "k1".into();
        SaKeys::parse(serde_json::json!({"keys": [jwk]}).to_string().as_bytes()).unwrap()
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((first, rest)) = data.split_first() else { return };
    if first % 2 == 0 {
        let _ = SaKeys::parse(rest);
        return;
    }
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let config = SaTokenConfig {
        issuer: "https://kubernetes.default.svc".into(),
        audience: "tally".into(),
    };
    let _ = k8s::verify(text, keys(), &config, 1_800_000_000);
});
