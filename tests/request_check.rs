//! The whole DPoP-bound request check and its HTTP answers.

mod support;

use support::*;
use tally::auth::{AuthError, Request, RequestError, RequestVerifier, VerifierConfig, answer};
use tally::dpop::ProofError;
use tally::token::{Jwks, TokenError};

fn verifier(fx: &Fixture) -> RequestVerifier {
    RequestVerifier::new(VerifierConfig::new(fx.token_config())).unwrap()
}

fn send(
    v: &RequestVerifier,
    jwks: &Jwks,
    auth: &[&str],
    dpop: &[&str],
    now: u64,
) -> Result<tally::auth::Verified, AuthError> {
    let a: Vec<&[u8]> = auth.iter().map(|s| s.as_bytes()).collect();
    let d: Vec<&[u8]> = dpop.iter().map(|s| s.as_bytes()).collect();
    v.verify(
        &Request {
            method: "POST",
            uri: URL,
            authorization: &a,
            dpop: &d,
        },
        jwks,
        now,
    )
}

#[test]
fn a_bound_request_passes_and_names_the_caller() {
    let fx = Fixture::new();
    let v = verifier(&fx);
    let token = fx.token();
    let auth = format!("DPoP {}", token.expose());
    let ok = send(&v, &fx.jwks, &[&auth], &[&fx.proof(token.expose())], NOW).unwrap();
    assert_eq!(ok.token.sub.as_str(), CALLER);
    assert_eq!(ok.proof.jkt, fx.client.thumbprint());
}

#[test]
fn a_replayed_proof_is_refused() {
    let fx = Fixture::new();
    let v = verifier(&fx);
    let token = fx.token();
    let auth = format!("DPoP {}", token.expose());
    let proof = fx.proof(token.expose());
    send(&v, &fx.jwks, &[&auth], &[&proof], NOW).unwrap();
    let err = send(&v, &fx.jwks, &[&auth], &[&proof], NOW + 1).unwrap_err();
    assert_eq!(err, AuthError::Proof(ProofError::Replayed));
    assert_eq!(answer(&err, None).status, 401);
}

#[test]
fn a_failed_request_does_not_burn_its_proof() {
    let fx = Fixture::new();
    let v = verifier(&fx);
    let token = fx.token();
    let proof = fx.proof(token.expose());
    // Same proof, sent with a token it does not match: refused...
    let other = fx.token();
    let bad = send(
        &v,
        &fx.jwks,
        &[&format!("DPoP {}", other.expose())],
        &[&proof],
        NOW,
    )
    .unwrap_err();
    assert_eq!(bad, AuthError::Proof(ProofError::AthMismatch));
    // ...and still good with its own token.
    send(
        &v,
        &fx.jwks,
        &[&format!("DPoP {}", token.expose())],
        &[&proof],
        NOW,
    )
    .unwrap();
}

#[test]
fn a_stolen_token_is_useless_without_the_key() {
    let fx = Fixture::new();
    let v = verifier(&fx);
    let token = fx.token();
    let auth = format!("DPoP {}", token.expose());
    // The thief has no proof at all...
    let err = send(&v, &fx.jwks, &[&auth], &[], NOW).unwrap_err();
    assert_eq!(err, AuthError::Request(RequestError::MissingProof));
    assert_eq!(answer(&err, None).status, 401);
    // ...or signs one with a key of their own.
    let thief = tally::dpop::ProofKey::generate().unwrap();
    let forged = thief
        .mint("POST", URL, Some(token.expose()), None, NOW)
        .unwrap();
    let err = send(&v, &fx.jwks, &[&auth], &[&forged], NOW).unwrap_err();
    assert!(matches!(
        err,
        AuthError::Proof(ProofError::KeyBindingMismatch { .. })
    ));
    let a = answer(&err, None);
    assert_eq!(a.status, 401);
    assert!(
        a.www_authenticate
            .unwrap()
            .starts_with("DPoP error=\"invalid_dpop_proof\"")
    );
    // ...or downgrades to Bearer.
    let err = send(
        &v,
        &fx.jwks,
        &[&format!("Bearer {}", token.expose())],
        &[],
        NOW,
    )
    .unwrap_err();
    assert_eq!(err, AuthError::Request(RequestError::BoundTokenAsBearer));
    let a = answer(&err, None);
    assert_eq!(a.status, 401);
    assert!(
        a.www_authenticate
            .unwrap()
            .starts_with("DPoP error=\"invalid_token\"")
    );
}

#[test]
fn the_token_cache_skips_reverification_but_not_key_removal() {
    let fx = Fixture::new();
    let v = verifier(&fx);
    let token = fx.token();
    let auth = format!("DPoP {}", token.expose());
    send(&v, &fx.jwks, &[&auth], &[&fx.proof(token.expose())], NOW).unwrap();
    // A second request (new proof) passes from the cache.
    let p2 = fx
        .client
        .mint("POST", URL, Some(token.expose()), None, NOW + 1)
        .unwrap();
    send(&v, &fx.jwks, &[&auth], &[&p2], NOW + 1).unwrap();
    // Once the signing key leaves the trusted set, the cached token is
    // verified afresh, and fails.
    let p3 = fx
        .client
        .mint("POST", URL, Some(token.expose()), None, NOW + 2)
        .unwrap();
    let err = send(&v, &Jwks::default(), &[&auth], &[&p3], NOW + 2).unwrap_err();
    assert!(matches!(err, AuthError::Token(TokenError::UnknownKid(_))));
    // And an expired token is not served from the cache.
    let p4 = fx
        .client
        .mint("POST", URL, Some(token.expose()), None, NOW + 400)
        .unwrap();
    let err = send(&v, &fx.jwks, &[&auth], &[&p4], NOW + 400).unwrap_err();
    assert!(matches!(err, AuthError::Token(TokenError::Expired { .. })));
}

#[test]
fn nonce_flow_asks_then_accepts() {
    let fx = Fixture::new();
    let mut config = VerifierConfig::new(fx.token_config());
    config.nonce_slot_secs = Some(60);
    let v = RequestVerifier::new(config).unwrap();
    let token = fx.token();
    let auth = format!("DPoP {}", token.expose());
    let err = send(&v, &fx.jwks, &[&auth], &[&fx.proof(token.expose())], NOW).unwrap_err();
    let a = v.answer(&err, NOW);
    assert_eq!(a.status, 401);
    assert!(
        a.www_authenticate
            .unwrap()
            .starts_with("DPoP error=\"use_dpop_nonce\"")
    );
    let nonce = a.dpop_nonce.expect("a fresh DPoP-Nonce");
    let retry = fx
        .client
        .mint("POST", URL, Some(token.expose()), Some(&nonce), NOW)
        .unwrap();
    send(&v, &fx.jwks, &[&auth], &[&retry], NOW).unwrap();
}

#[test]
fn no_credentials_get_the_bare_challenge() {
    let fx = Fixture::new();
    let v = verifier(&fx);
    let err = send(&v, &fx.jwks, &[], &[], NOW).unwrap_err();
    let a = answer(&err, None);
    assert_eq!(
        (a.status, a.www_authenticate.as_deref()),
        (401, Some("DPoP algs=\"ES256\", WPT"))
    );
}

#[test]
fn malformed_requests_get_400_and_doubled_proofs_401() {
    let fx = Fixture::new();
    let v = verifier(&fx);
    let token = fx.token();
    let auth = format!("DPoP {}", token.expose());
    let p = fx.proof(token.expose());
    for (a, d, want, status, code) in [
        (
            vec![auth.as_str()],
            vec![p.as_str(), p.as_str()],
            RequestError::MultipleProofs,
            401,
            "invalid_dpop_proof",
        ),
        (
            vec![auth.as_str(), auth.as_str()],
            vec![p.as_str()],
            RequestError::MultipleAuthorization,
            400,
            "invalid_request",
        ),
    ] {
        let err = send(&v, &fx.jwks, &a, &d, NOW).unwrap_err();
        assert_eq!(err, AuthError::Request(want));
        let ans = answer(&err, None);
        assert_eq!(ans.status, status);
        assert!(
            ans.www_authenticate
                .unwrap()
                .starts_with(&format!("DPoP error=\"{code}\""))
        );
    }
}
