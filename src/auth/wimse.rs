//! The token core for WIMSE requests (draft-ietf-wimse-workload-creds,
//! draft-ietf-wimse-wpt): a Workload Identity Token, the Workload Proof
//! Token made with its key for this request, and the access token sent
//! with them, if any. The checks, in order:
//!
//! 1. the WIT, against the broker's keys ([`crate::wimse::wit::verify`]):
//!    its `sub` must be a SPIFFE ID, and on a mutual-TLS connection (or
//!    behind a proxy that names the sender) the peer's, whatever proof
//!    comes with it;
//! 2. the access token, when one came: verified as always (and cached),
//!    held by the WIT's `sub` and bound (`cnf.jkt`) to the WIT's key, so
//!    the WPT's signature is its proof of possession;
//! 3. the WPT against the request and the WIT ([`crate::wimse::wpt::verify`]):
//!    `aud` the URL this server received, `wth`, `ath` for the token,
//!    `tth` for a `Txn-Token`, `oth` for the headers it names;
//! 4. while this verifier may be younger than a WPT it is shown (its
//!    replay cache started empty), the WPT must carry an `iat` no earlier
//!    than the second the verifier started: a WPT made before could have
//!    been spent with the previous process;
//! 5. the WPT's `jti` in the replay cache (shared with DPoP proofs, keyed
//!    with the WIT's key), last, so a refused request spends nothing: the
//!    caller spends it ([`RequestVerifier::spend_wpt`]) only after the
//!    verdict admitted the request, so a workload no access rule admits
//!    cannot fill this verifier's cache with WPTs of its own.
//!
//! A WPT's `aud` is only as good as what it is compared with: the URL's
//! authority comes from the request (`Host`), so it names this server
//! only when this server was told its authorities (`--inbound-authority`),
//! or the sender is authenticated (the mutual-TLS peer, or the principal
//! a proxy in front names: the WIT must be theirs), or an access token
//! came along (its `aud` names this workload). Without any of these a WPT
//! made for another server could be replayed here with that server's
//! `Host`, so a WIT alone is refused ([`AuthError::WptAudUnpinned`]).
//!
//! What passes is a [`Caller::Wimse`], judged by the one verdict.

use super::credentials::WimseCredentials;
use super::error::{AuthError, RequestError};
use super::request::RequestVerifier;
use super::verdict::{Caller, WitHolder};
use crate::dpop::{NormalizedUri, ReplayError, ReplayKey, TokenHash};
use crate::identity::SpiffeId;
use crate::token::{Jwks, TokenClaims};
use crate::wimse::{self, RequestHeaders, VerifiedWit, WitKeys, WptContext};
use std::sync::Arc;

/// The parts of a request the WIMSE check needs besides its credentials.
#[derive(Clone, Copy)]
pub struct WimseRequest<'a> {
    /// The request URL (scheme, authority, normalized path): what the
    /// WPT's `aud` must name.
    pub url: &'a NormalizedUri,
    /// Every `Txn-Token` value.
    pub txn_token: &'a [&'a [u8]],
    /// Every header, for the WPT's `oth`.
    pub headers: &'a dyn RequestHeaders,
    /// Whether `url`'s authority was checked against the authorities this
    /// server is configured to serve (not only taken from `Host`).
    pub authority_configured: bool,
}

/// A WIMSE request that passed every check but replay, and the WPT to
/// spend once the verdict admits it ([`RequestVerifier::spend_wpt`]).
#[derive(Debug)]
pub struct VerifiedWimse {
    /// Who is calling, and with what.
    pub caller: Caller,
    /// The WPT's place in the replay cache.
    pub wpt: PendingWpt,
}

/// A verified WPT not yet recorded in the replay cache.
#[must_use = "a WPT must be spent before its request is admitted"]
pub struct PendingWpt {
    key: ReplayKey,
    expires_at: u64,
}

impl std::fmt::Debug for PendingWpt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingWpt")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for WimseRequest<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WimseRequest")
            .field("url", self.url)
            .finish_non_exhaustive()
    }
}

impl RequestVerifier {
    /// Checks WIMSE `creds` on `request` at `now`: the WIT against
    /// `wit_keys`, the access token (if any) against `jwks`. `holder`,
    /// when a mutual-TLS handshake or a proxy in front named the sender,
    /// is who the WIT must name.
    ///
    /// # Errors
    /// The [`AuthError`] to answer with.
    pub fn verify_wimse(
        &self,
        creds: &WimseCredentials<'_>,
        request: &WimseRequest<'_>,
        holder: Option<&SpiffeId>,
        jwks: &Jwks,
        wit_keys: &WitKeys,
        now: u64,
    ) -> Result<VerifiedWimse, AuthError> {
        let config = self.config();
        let wit = wimse::wit::verify(creds.wit, wit_keys, now, &config.wit, &mut ())?;
        // The mesh judges SPIFFE IDs: a WIT naming anything else is
        // refused as the WIT's fault, whatever `require_spiffe` says.
        let sub = wit
            .spiffe_id
            .clone()
            .ok_or(wimse::WitError::SubNotUri("not a SPIFFE ID"))?;
        if holder.is_some_and(|h| *h != sub) {
            return Err(AuthError::NotThePeer);
        }
        let token = match creds.token {
            Some(token) => Some(self.token_for_wit(token, &wit, &sub, jwks, now)?),
            None => None,
        };
        if token.is_none() && holder.is_none() && !request.authority_configured {
            return Err(AuthError::WptAudUnpinned);
        }
        let txn_token = match request.txn_token {
            [] => None,
            [one] => Some(
                std::str::from_utf8(one)
                    .map_err(|_| AuthError::Request(RequestError::Malformed))?,
            ),
            _ => return Err(RequestError::MultipleTxnTokens.into()),
        };
        let ctx = WptContext {
            wit: &wit,
            uri: request.url,
            access_token: creds.token,
            txn_token,
            headers: request.headers,
        };
        let wpt = wimse::wpt::verify(creds.wpt, &ctx, now, &config.wpt, &mut ())?;
        if let Some(started) = self.started_at() {
            // A WPT whose `exp` is within a lifetime of this start may
            // have been made before it: only its `iat` can say it was not.
            // It may be shown until `exp + leeway`, and `exp` may be up to
            // a lifetime and a leeway after the moment it was accepted.
            let young = now
                <= started
                    .saturating_add(config.wpt.max_lifetime)
                    .saturating_add(2 * config.wpt.effective_leeway());
            // The second it started counts as after: a restart takes
            // longer than that, and a sender's clock a second behind
            // would otherwise be refused for a whole lifetime.
            if young && wpt.iat.is_none_or(|iat| iat < started) {
                return Err(AuthError::WptBeforeRestart { started });
            }
        }
        let pending = PendingWpt {
            key: self.replay_key(&wit.jkt, &wpt.jti),
            expires_at: wpt.exp.saturating_add(config.wpt.effective_leeway()),
        };
        // Seen already: refused now, before the verdict spends a rate.
        if self.replay().contains(pending.key, now) {
            return Err(AuthError::WptReplayed);
        }
        let caller = Caller::Wimse {
            wit: Arc::new(WitHolder {
                sub,
                jti: wit.jti.clone().unwrap_or_default(),
                jkt: wit.jkt,
                kid: wit.kid.clone(),
                iat: wit.iat.unwrap_or(0),
                exp: wit.exp,
            }),
            token,
        };
        Ok(VerifiedWimse {
            caller,
            wpt: pending,
        })
    }

    /// Records a verified WPT's `jti` in the replay cache at `now`: once
    /// per WPT, whatever came before.
    ///
    /// # Errors
    /// [`AuthError::WptReplayed`] if it was spent already (two requests
    /// with one WPT at once), [`AuthError::Overloaded`] if the cache is
    /// full.
    pub fn spend_wpt(&self, wpt: PendingWpt, now: u64) -> Result<(), AuthError> {
        match self.replay().check_and_insert(wpt.key, wpt.expires_at, now) {
            Ok(()) => Ok(()),
            Err(ReplayError::Replayed) => Err(AuthError::WptReplayed),
            Err(ReplayError::Full) => Err(AuthError::Overloaded),
        }
    }

    /// The access token sent with a WIT: verified (or from the cache),
    /// held by the WIT's subject and bound to the WIT's key.
    fn token_for_wit(
        &self,
        token: &str,
        wit: &VerifiedWit,
        sub: &SpiffeId,
        jwks: &Jwks,
        now: u64,
    ) -> Result<Arc<TokenClaims>, AuthError> {
        let claims = self.token(token, &TokenHash::of(token), jwks, now)?;
        if claims.sub != *sub || claims.jkt != wit.jkt {
            return Err(AuthError::TokenNotForWit);
        }
        Ok(claims)
    }
}
