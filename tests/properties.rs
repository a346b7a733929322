//! Property tests: mint → verify round trips, htu normalization is
//! idempotent, and any single-byte change to the header bytes a verifier
//! receives breaks the request, with the error class that change calls
//! for.

mod support;

use proptest::prelude::*;
use support::*;
use tally::auth::{AuthError, Request, RequestError, RequestVerifier, VerifierConfig};
use tally::dpop::NormalizedUri;
use tally::dpop::proof::{self, NonceRule, ProofConfig, ProofContext, TokenHash};
use tally::token::{MintRequest, Scope, Scopes, TokenClass, verify};

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("GET".to_owned()),
        Just("POST".to_owned()),
        Just("DELETE".to_owned()),
        "[A-Z]{1,10}",
    ]
}

fn url() -> impl Strategy<Value = String> {
    (
        prop_oneof![Just("http"), Just("https"), Just("HTTPS")],
        "[a-zA-Z0-9-]{1,12}(\\.[a-z0-9]{1,8}){0,3}",
        proptest::option::of(1u16..),
        proptest::collection::vec("[a-zA-Z0-9._~!$&'()*+,;=:@-]{0,8}|%[0-9a-fA-F]{2}", 0..6),
        proptest::option::of("[a-z0-9=&]{0,12}"),
    )
        .prop_map(|(scheme, host, port, segments, query)| {
            let mut u = format!("{scheme}://{host}");
            if let Some(p) = port {
                u.push_str(&format!(":{p}"));
            }
            for s in segments {
                u.push('/');
                u.push_str(&s);
            }
            if let Some(q) = query {
                u.push('?');
                u.push_str(&q);
            }
            u
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn minted_proofs_verify_for_their_request(method in method(), url in url(), token in "[A-Za-z0-9._~-]{1,200}", nonce in proptest::option::of("[A-Za-z0-9_-]{1,40}"), iat in 1_000_000u64..4_000_000_000) {
        let key = tally::dpop::ProofKey::generate().unwrap();
        let proof = key.mint(&method, &url, Some(&token), nonce.as_deref(), iat).unwrap();
        let uri = NormalizedUri::parse(&url).unwrap();
        let hash = TokenHash::of(&token);
        let jkt = key.thumbprint();
        let ctx = ProofContext {
            method: &method,
            uri: &uri,
            token_hash: Some(&hash),
            expected_jkt: Some(&jkt),
            nonce: nonce.as_deref().map_or(NonceRule::NotRequired, NonceRule::Exact),
            keys: None,
        };
        let verified = proof::verify(&proof, &ctx, &ProofConfig::default(), iat, &mut ()).unwrap();
        prop_assert_eq!(verified.iat, iat);
        prop_assert_eq!(verified.jkt, jkt);
    }

    #[test]
    fn minted_tokens_verify_with_their_claims(scopes in proptest::collection::vec("[a-z]{1,8}(:[a-z]{1,8})?", 0..8), ttl in 1u64..86_400, class in prop_oneof![Just(TokenClass::Service), Just(TokenClass::Partner), Just(TokenClass::Admin), Just(TokenClass::User)]) {
        let fx = Fixture::new();
        let scope = Scopes::new(scopes.iter().map(|s| s.parse::<Scope>().unwrap())).unwrap();
        let request = MintRequest {
            subject: &CALLER.parse().unwrap(),
            audience: &SERVICE.parse().unwrap(),
            scope: &scope,
            class,
            ttl,
            jkt: fx.client.thumbprint(),
        };
        let (token, minted) = fx.signer.mint(&request, NOW).unwrap();
        let claims = verify(token.expose(), &fx.jwks, &fx.token_config(), NOW, &mut ()).unwrap();
        prop_assert_eq!(&claims, &minted);
        prop_assert_eq!(claims.scope, scope);
        prop_assert_eq!(claims.class, class);
        prop_assert_eq!(claims.exp, NOW + ttl);
    }

    #[test]
    fn htu_normalization_is_idempotent(url in url()) {
        let once = NormalizedUri::parse(&url).unwrap();
        let twice = NormalizedUri::parse(once.as_str()).unwrap();
        prop_assert_eq!(once, twice);
    }

    #[test]
    fn htu_normalization_never_panics_and_is_idempotent_when_it_accepts(s in "\\PC{0,80}") {
        if let Ok(once) = NormalizedUri::parse(&s) {
            prop_assert_eq!(NormalizedUri::parse(once.as_str()).unwrap(), once);
        }
    }

    #[test]
    fn flipping_any_byte_of_the_dpop_header_breaks_the_request(index in any::<prop::sample::Index>(), flip in 1u8..) {
        let fx = Fixture::new();
        let token = fx.token();
        let authorization = format!("DPoP {}", token.expose());
        let valid = fx.proof(token.expose()).into_bytes();
        // The control: the headers as minted pass.
        check(&fx, authorization.as_bytes(), &valid).unwrap();

        let mut spoiled = valid;
        let i = index.index(spoiled.len());
        spoiled[i] ^= flip;
        let err = check(&fx, authorization.as_bytes(), &spoiled).unwrap_err();
        // A header value that is not printable ASCII is malformed; any
        // other change is a proof that fails its checks (the token is
        // untouched).
        if (0x20..0x7f).contains(&spoiled[i]) {
            prop_assert!(matches!(err, AuthError::Proof(_)), "{err:?}");
        } else {
            prop_assert_eq!(err, AuthError::Request(RequestError::Malformed));
        }
    }

    #[test]
    fn flipping_any_byte_of_the_access_token_breaks_the_request(index in any::<prop::sample::Index>(), flip in 1u8..) {
        let fx = Fixture::new();
        let token = fx.token();
        let proof = fx.proof(token.expose());
        let valid = format!("DPoP {}", token.expose()).into_bytes();
        check(&fx, &valid, proof.as_bytes()).unwrap();

        // Any byte of the token as the header carries it.
        let mut spoiled = valid;
        let i = "DPoP ".len() + index.index(spoiled.len() - "DPoP ".len());
        spoiled[i] ^= flip;
        let err = check(&fx, &spoiled, proof.as_bytes()).unwrap_err();
        // Outside the token68 alphabet the header is malformed; inside it
        // the token fails its own checks.
        if is_token68(&spoiled["DPoP ".len()..]) {
            prop_assert!(matches!(err, AuthError::Token(_)), "{err:?}");
        } else {
            prop_assert_eq!(err, AuthError::Request(RequestError::Malformed));
        }
    }
}

/// `POST URL` with these header values, as the inbound proxy hands them
/// to the verifier (bytes, not strings), on a fresh verifier at `NOW`.
fn check(fx: &Fixture, authorization: &[u8], dpop: &[u8]) -> Result<(), AuthError> {
    let verifier = RequestVerifier::new(VerifierConfig::new(fx.token_config())).unwrap();
    let request = Request {
        method: "POST",
        uri: URL,
        authorization: &[authorization],
        dpop: &[dpop],
    };
    verifier.verify(&request, &fx.jwks, NOW).map(|_| ())
}

/// RFC 7235 `token68`, over bytes.
fn is_token68(bytes: &[u8]) -> bool {
    let end = bytes.iter().rposition(|&b| b != b'=').map_or(0, |i| i + 1);
    end > 0
        && bytes[..end]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/".contains(b))
}
