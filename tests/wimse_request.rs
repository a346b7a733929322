//! The token core's WIMSE request check (`RequestVerifier::verify_wimse`)
//! with WITs minted by a broker signer and WPTs by the caller's key: the
//! access token's binding to the WIT, the holder a handshake names,
//! `Txn-Token`, replay, and the rule for a verifier that has just
//! restarted.

mod support;

use support::*;
use tally::auth::credentials::WimseCredentials;
use tally::auth::verdict::Caller;
use tally::auth::wimse::WimseRequest;
use tally::auth::{AuthError, RequestError, RequestVerifier, VerifierConfig, answer};
use tally::dpop::NormalizedUri;
use tally::wimse::{WitKeys, WptError, WptInput, wit, wpt};

struct Scene {
    fx: Fixture,
    wit_keys: WitKeys,
    wit: String,
    url: NormalizedUri,
}

impl Scene {
    fn new() -> Self {
        let fx = Fixture::new();
        let wit_keys = WitKeys::from_jwks(&fx.jwks);
        let (wit, _) = wit::mint(
            &fx.signer,
            &CALLER.parse().unwrap(),
            fx.client.signing_key().public_key(),
            3_600,
            NOW,
        )
        .unwrap();
        Self {
            fx,
            wit_keys,
            wit: wit.expose().to_owned(),
            url: NormalizedUri::parse(URL).unwrap(),
        }
    }

    /// A WPT for `URL` by the caller's key, made at `at`.
    fn wpt(&self, token: Option<&str>, txn: Option<&str>, at: u64) -> String {
        wpt::mint(
            self.fx.client.signing_key(),
            &WptInput {
                aud: URL,
                wit: &self.wit,
                access_token: token,
                txn_token: txn,
                other: &[],
                lifetime: 60,
            },
            at,
        )
        .unwrap()
    }

    /// The check as the gate runs it for a server that knows its
    /// authorities: verified, then the WPT spent.
    fn check(
        &self,
        v: &RequestVerifier,
        wpt: &str,
        token: Option<&str>,
        txn: &[&str],
        holder: Option<&str>,
        now: u64,
    ) -> Result<Caller, AuthError> {
        self.check_with(v, wpt, token, txn, holder, true, now)
    }

    #[allow(clippy::too_many_arguments)]
    fn check_with(
        &self,
        v: &RequestVerifier,
        wpt: &str,
        token: Option<&str>,
        txn: &[&str],
        holder: Option<&str>,
        authority_configured: bool,
        now: u64,
    ) -> Result<Caller, AuthError> {
        let txn: Vec<&[u8]> = txn.iter().map(|t| t.as_bytes()).collect();
        let headers: [(&str, &str); 0] = [];
        let holder: Option<tally::identity::SpiffeId> = holder.map(|h| h.parse().unwrap());
        v.verify_wimse(
            &WimseCredentials {
                wit: &self.wit,
                wpt,
                token,
            },
            &WimseRequest {
                url: &self.url,
                txn_token: &txn,
                headers: &headers,
                authority_configured,
            },
            holder.as_ref(),
            &self.fx.jwks,
            &self.wit_keys,
            now,
        )
        .and_then(|verified| {
            v.spend_wpt(verified.wpt, now)?;
            Ok(verified.caller)
        })
    }
}

fn verifier(fx: &Fixture) -> RequestVerifier {
    RequestVerifier::new(VerifierConfig::new(fx.token_config())).unwrap()
}

#[test]
fn a_wit_and_its_wpt_name_the_caller_once() {
    let s = Scene::new();
    let v = verifier(&s.fx);
    let wpt = s.wpt(None, None, NOW);
    let caller = s.check(&v, &wpt, None, &[], None, NOW).unwrap();
    assert_eq!(caller.sub().as_str(), CALLER);
    assert!(caller.token().is_none());
    assert!(caller.scopes().is_empty());
    let again = s.check(&v, &wpt, None, &[], None, NOW + 1).unwrap_err();
    assert_eq!(again, AuthError::WptReplayed);
    let a = answer(&again, None);
    assert_eq!((a.status, a.error), (401, "invalid_wpt"));
    assert_eq!(a.www_authenticate.as_deref(), Some("WPT"));
}

#[test]
fn the_access_token_must_be_the_wit_holders_and_bound_to_the_wits_key() {
    let s = Scene::new();
    let v = verifier(&s.fx);
    let token = s.fx.token();
    let wpt = s.wpt(Some(token.expose()), None, NOW);
    let caller = s
        .check(&v, &wpt, Some(token.expose()), &[], None, NOW)
        .unwrap();
    assert_eq!(caller.scopes().to_string(), "payments:charge payments:read");

    // A token of the same holder bound to another key: the WPT is no
    // proof for it.
    let other_key = tally::dpop::ProofKey::generate().unwrap();
    let foreign = s.fx.token_with(|c| {
        c["jti"] = "t-other-key".into();
        c["cnf"]["jkt"] = other_key.thumbprint().to_string().into();
    });
    let wpt = s.wpt(Some(&foreign), None, NOW);
    let err = s
        .check(&v, &wpt, Some(&foreign), &[], None, NOW)
        .unwrap_err();
    assert_eq!(err, AuthError::TokenNotForWit);
    assert_eq!(answer(&err, None).error, "invalid_token");
    // Another holder's token on the WIT's key.
    let stranger = s.fx.token_with(|c| {
        c["jti"] = "t-stranger".into();
        c["sub"] = "spiffe://example.org/ns/x/sa/stranger".into();
        c["client_id"] = "spiffe://example.org/ns/x/sa/stranger".into();
    });
    let wpt = s.wpt(Some(&stranger), None, NOW);
    assert_eq!(
        s.check(&v, &wpt, Some(&stranger), &[], None, NOW)
            .unwrap_err(),
        AuthError::TokenNotForWit
    );
    // A token the WPT does not hash.
    let wpt = s.wpt(None, None, NOW);
    assert!(matches!(
        s.check(&v, &wpt, Some(token.expose()), &[], None, NOW),
        Err(AuthError::Wpt(WptError::AthMissing))
    ));
}

#[test]
fn on_a_mesh_connection_the_wit_must_name_the_peer() {
    let s = Scene::new();
    let v = verifier(&s.fx);
    let wpt = s.wpt(None, None, NOW);
    let err = s
        .check(
            &v,
            &wpt,
            None,
            &[],
            Some("spiffe://example.org/ns/x/sa/relay"),
            NOW,
        )
        .unwrap_err();
    assert_eq!(err, AuthError::NotThePeer);
    // Refused before the WPT was looked at: it is still good.
    assert!(s.check(&v, &wpt, None, &[], Some(CALLER), NOW).is_ok());
}

#[test]
fn a_txn_token_must_be_bound_by_the_wpt_and_sent_once() {
    let s = Scene::new();
    let v = verifier(&s.fx);
    let bound = s.wpt(None, Some("txn-1"), NOW);
    assert!(matches!(
        s.check(&v, &bound, None, &["txn-2"], None, NOW),
        Err(AuthError::Wpt(WptError::TthMismatch))
    ));
    assert_eq!(
        s.check(&v, &bound, None, &["txn-1", "txn-1"], None, NOW)
            .unwrap_err(),
        AuthError::Request(RequestError::MultipleTxnTokens)
    );
    let unbound = s.wpt(None, None, NOW);
    assert!(matches!(
        s.check(&v, &unbound, None, &["txn-1"], None, NOW),
        Err(AuthError::Wpt(WptError::TthMissing))
    ));
    assert!(s.check(&v, &bound, None, &["txn-1"], None, NOW).is_ok());
}

#[test]
fn a_verifier_that_just_started_takes_only_wpts_made_since() {
    let s = Scene::new();
    let started = NOW;
    let mut config = VerifierConfig::new(s.fx.token_config());
    config.fresh_proofs_after = Some(started + config.proof.max_skew);
    let v = RequestVerifier::new(config).unwrap();
    // Made ten seconds before the start: its predecessor may have seen it.
    let before = s.wpt(None, None, started - 10);
    let err = s
        .check(&v, &before, None, &[], None, started + 5)
        .unwrap_err();
    assert_eq!(err, AuthError::WptBeforeRestart { started });
    assert_eq!(answer(&err, None).error, "invalid_wpt");
    // A WPT without iat (the drafts define none) cannot say either.
    let no_iat = tally::jose::jws::sign_compact(
        &tally::jose::b64::encode(r#"{"typ":"wpt+jwt","alg":"ES256"}"#),
        serde_json::json!({
            "aud": URL, "exp": started + 60, "jti": "AAAAAAAAAAAAAAAAAAAAAA",
            "wth": tally::dpop::TokenHash::of(&s.wit).to_ath(),
        })
        .to_string()
        .as_bytes(),
        s.fx.client.signing_key(),
    )
    .unwrap();
    assert_eq!(
        s.check(&v, &no_iat, None, &[], None, started + 5)
            .unwrap_err(),
        AuthError::WptBeforeRestart { started }
    );
    // Made in the start's second or after: accepted.
    let since = s.wpt(None, None, started);
    assert!(s.check(&v, &since, None, &[], None, started + 5).is_ok());
    // Once a whole lifetime (and leeway) has passed, no iat is needed.
    // (a lifetime and two leeways: a WPT accepted just before the start
    // may be shown until its `exp` plus leeway).
    let later = started + 300 + 2 * 30 + 1;
    let no_iat_later = tally::jose::jws::sign_compact(
        &tally::jose::b64::encode(r#"{"typ":"wpt+jwt","alg":"ES256"}"#),
        serde_json::json!({
            "aud": URL, "exp": later + 60, "jti": "BBBBBBBBBBBBBBBBBBBBBB",
            "wth": tally::dpop::TokenHash::of(&s.wit).to_ath(),
        })
        .to_string()
        .as_bytes(),
        s.fx.client.signing_key(),
    )
    .unwrap();
    let wit_ok_later = s.check(&v, &no_iat_later, None, &[], None, later);
    assert!(wit_ok_later.is_ok(), "{wit_ok_later:?}");
}

#[test]
fn the_replay_cache_remembers_a_wpt_for_its_whole_lifetime() {
    let s = Scene::new();
    let v = verifier(&s.fx);
    let long = wpt::mint(
        s.fx.client.signing_key(),
        &WptInput {
            aud: URL,
            wit: &s.wit,
            access_token: None,
            txn_token: None,
            other: &[],
            lifetime: 290,
        },
        NOW,
    )
    .unwrap();
    s.check(&v, &long, None, &[], None, NOW).unwrap();
    // Past a DPoP proof's 120 s window, inside the WPT's life.
    assert_eq!(
        s.check(&v, &long, None, &[], None, NOW + 250).unwrap_err(),
        AuthError::WptReplayed
    );
}

#[test]
fn a_wit_alone_needs_something_that_pins_the_wpts_aud_to_this_server() {
    let s = Scene::new();
    let v = verifier(&s.fx);
    // No configured authority, no authenticated sender, no token: the
    // URL's authority is only what `Host` said, so the WPT may have been
    // made for another server.
    let wpt = s.wpt(None, None, NOW);
    assert_eq!(
        s.check_with(&v, &wpt, None, &[], None, false, NOW)
            .unwrap_err(),
        AuthError::WptAudUnpinned
    );
    assert_eq!(
        answer(&AuthError::WptAudUnpinned, None).error,
        "invalid_wpt"
    );
    // Refused before it was spent: a mesh peer may still use it...
    assert!(
        s.check_with(&v, &wpt, None, &[], Some(CALLER), false, NOW)
            .is_ok()
    );
    // ...and an access token (whose aud names this workload) pins it too.
    let token = s.fx.token();
    let wpt = s.wpt(Some(token.expose()), None, NOW);
    assert!(
        s.check_with(&v, &wpt, Some(token.expose()), &[], None, false, NOW)
            .is_ok()
    );
}

#[test]
fn a_wpt_refused_by_a_later_check_is_not_spent() {
    let s = Scene::new();
    let v = verifier(&s.fx);
    let wpt = s.wpt(None, None, NOW);
    // Verified but never spent (the verdict refused the request).
    let txn: [&[u8]; 0] = [];
    let headers: [(&str, &str); 0] = [];
    let verified = v
        .verify_wimse(
            &WimseCredentials {
                wit: &s.wit,
                wpt: &wpt,
                token: None,
            },
            &WimseRequest {
                url: &s.url,
                txn_token: &txn,
                headers: &headers,
                authority_configured: true,
            },
            None,
            &s.fx.jwks,
            &s.wit_keys,
            NOW,
        )
        .unwrap();
    drop(verified);
    assert!(s.check(&v, &wpt, None, &[], None, NOW).is_ok());
    assert_eq!(
        s.check(&v, &wpt, None, &[], None, NOW).unwrap_err(),
        AuthError::WptReplayed
    );
}
