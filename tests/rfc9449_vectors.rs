//! The examples of RFC 9449 itself. Proof strings are copied from the RFC
//! text: Figure 2 (§4.1, token request) and Figure 13 (§7.1, protected
//! resource request); the JWK and thumbprint from §6.1 (Figure 7); the
//! access token and `ath` from §7.1 (Figures 13 and 14).
//!
//! Their signatures are high-S: valid JWS that a verifier enforcing low-S
//! would wrongly reject.

use tally::dpop::NormalizedUri;
use tally::dpop::proof::{
    self, NonceRule, ProofCheck, ProofConfig, ProofContext, ProofError, TokenHash,
};

const FIGURE_2: &str = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiItQndDM0VTYzZhY2MybFRjIiwiaHRtIjoiUE9TVCIsImh0dSI6Imh0dHBzOi8vc2VydmVyLmV4YW1wbGUuY29tL3Rva2VuIiwiaWF0IjoxNTYyMjYyNjE2fQ.2-GxA6T8lP4vfrg8v-FdWP0A0zdrj8igiMLvqRMUvwnQg4PtFLbdLXiOSsX0x7NVY-FNyJK70nfbV37xRZT3Lg";
const FIGURE_13: &str = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA";
const JKT: &str = "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I";
const ACCESS_TOKEN: &str = "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU";
const ATH: &str = "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo";

fn verify_at(
    proof: &str,
    method: &str,
    url: &str,
    token: Option<&str>,
    jkt: Option<&str>,
    now: u64,
) -> Result<proof::VerifiedProof, ProofError> {
    let uri = NormalizedUri::parse(url).unwrap();
    let hash = token.map(TokenHash::of);
    let jkt = jkt.map(|j| j.parse().unwrap());
    let ctx = ProofContext {
        method,
        uri: &uri,
        token_hash: hash.as_ref(),
        expected_jkt: jkt.as_ref(),
        nonce: NonceRule::NotRequired,
        keys: None,
    };
    proof::verify(proof, &ctx, &ProofConfig::default(), now, &mut ())
}

#[test]
fn figure_2_token_request_proof_verifies() {
    let p = verify_at(
        FIGURE_2,
        "POST",
        "https://server.example.com/token",
        None,
        Some(JKT),
        1_562_262_616,
    )
    .unwrap();
    assert_eq!(p.jkt.to_string(), JKT);
    assert_eq!(p.jti, "-BwC3ESc6acc2lTc");
    assert_eq!(p.iat, 1_562_262_616);
}

#[test]
fn figure_13_resource_proof_verifies_with_its_access_token() {
    let uri = NormalizedUri::parse("https://resource.example.org/protectedresource").unwrap();
    let hash = TokenHash::of(ACCESS_TOKEN);
    let jkt = JKT.parse().unwrap();
    let ctx = ProofContext {
        method: "GET",
        uri: &uri,
        token_hash: Some(&hash),
        expected_jkt: Some(&jkt),
        nonce: NonceRule::NotRequired,
        keys: None,
    };
    let mut passed = Vec::new();
    let p = proof::verify(
        FIGURE_13,
        &ctx,
        &ProofConfig::default(),
        1_562_262_618,
        &mut passed,
    )
    .unwrap();
    assert_eq!(p.jti, "e1j3V_bKic8-LAEB");
    // Every check ran, including ath and the key binding.
    assert!(passed.contains(&ProofCheck::Ath));
    assert!(passed.contains(&ProofCheck::KeyBinding));
}

#[test]
fn access_token_hash_matches_the_rfc() {
    assert_eq!(TokenHash::of(ACCESS_TOKEN).to_ath(), ATH);
}

#[test]
fn figure_13_proof_is_refused_for_another_token_url_method_or_time() {
    let url = "https://resource.example.org/protectedresource";
    let at = 1_562_262_618;
    assert_eq!(
        verify_at(FIGURE_13, "GET", url, Some("another-token"), None, at).unwrap_err(),
        ProofError::AthMismatch
    );
    assert!(matches!(
        verify_at(
            FIGURE_13,
            "GET",
            "https://resource.example.org/other",
            Some(ACCESS_TOKEN),
            None,
            at
        ),
        Err(ProofError::HtuMismatch { .. })
    ));
    assert!(matches!(
        verify_at(FIGURE_13, "POST", url, Some(ACCESS_TOKEN), None, at),
        Err(ProofError::HtmMismatch { .. })
    ));
    assert!(matches!(
        verify_at(FIGURE_13, "GET", url, Some(ACCESS_TOKEN), None, at + 3600),
        Err(ProofError::IatTooOld { .. })
    ));
}

#[test]
fn figure_2_proof_matches_an_equivalent_url_after_normalization() {
    verify_at(
        FIGURE_2,
        "POST",
        "HTTPS://Server.Example.com:443/token?x=1#f",
        None,
        None,
        1_562_262_616,
    )
    .unwrap();
}
