//! The sidecar's WIMSE Workload Identity Token (`Tokens.IssueWit`) over
//! its mTLS channel to the broker: the [`Fetch`] behind the one WIT the
//! sidecar holds, so it is cached and refreshed ahead like access tokens.
//!
//! A WIT binds the key of the client certificate it was asked for with,
//! which is the sidecar's SVID key and so its DPoP key: [`FetchedWit`]
//! keeps that key (a Workload Proof Token for the WIT is signed with
//! exactly it). After an SVID renewal brings a new key, the WIT for the
//! old one is outdated ([`Fetch::outdated`]): the next `get` fetches one
//! for the new key, and the old one serves only while the broker cannot
//! be reached (it is still valid, and its key still signs). A WIT a
//! revocation already covers when it arrives is not kept. A WIT is never
//! logged and never shown by `Debug`.

use super::cache::{Expiring, Fetch, FetchError};
use super::issuer::{BrokerIssuer, CALL_TIMEOUT, fetch_error};
use super::watch::MeshState;
use crate::clock::Clock;
use crate::dpop::ProofKey;
use crate::identity::SpiffeId;
use crate::jose::{Jkt, PublicKey};
use crate::proto::v1 as pb;
use crate::wimse::Wit;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// What is asked for: the sidecar's own WIT (there is one; it names no
/// audience).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct WitAsk;

/// A WIT as the broker returned it, with what the cache and a proof need.
#[derive(Debug, Clone)]
pub struct FetchedWit {
    /// The token, compact JWS (redacted in `Debug`).
    pub wit: Arc<Wit>,
    /// How long it is valid from when it arrived.
    pub expires_in: Duration,
    /// Its `jti`.
    pub jti: String,
    /// The id of the key that signed it.
    pub kid: String,
    /// Its `iat`, by the broker's clock (Unix seconds): what revocations
    /// by holder, key or time compare with.
    pub iat: u64,
    /// Its `exp` (Unix seconds).
    pub exp: u64,
    /// The thumbprint of its `cnf.jwk`: [`FetchedWit::key`]'s.
    pub jkt: Jkt,
    /// The key it is bound to, which signs its proofs: the sidecar's key
    /// when it was fetched (kept alive as long as the WIT is cached).
    pub key: Arc<ProofKey>,
}

impl Expiring for FetchedWit {
    fn expires_in(&self) -> Duration {
        self.expires_in
    }
}

impl FetchedWit {
    /// Whether a revocation in `set` covers this WIT, held by `holder`:
    /// by its `jti`, its holder, its key, its signing key, or issue time.
    pub fn revoked_by(
        &self,
        set: &crate::token::RevocationSet,
        holder: &crate::identity::SpiffeId,
    ) -> bool {
        set.covers(&crate::token::TokenRef {
            jti: &self.jti,
            sub: holder,
            jkt: Some(&self.jkt),
            kid: &self.kid,
            iat: self.iat,
        })
    }
}

/// Fetches WITs over the access-token issuer's current channel and key
/// (both replaced together when the SVID is renewed).
#[derive(Debug)]
pub struct Wits {
    issuer: Arc<BrokerIssuer>,
    mesh: watch::Receiver<MeshState>,
    own_id: SpiffeId,
    clock: Arc<dyn Clock>,
}

impl Wits {
    /// A fetcher over `issuer`'s channel for the sidecar of `own_id`,
    /// checking what it fetches against the revocations in `mesh` (the
    /// Watch stream's state).
    pub fn new(
        issuer: Arc<BrokerIssuer>,
        mesh: watch::Receiver<MeshState>,
        own_id: SpiffeId,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            issuer,
            mesh,
            own_id,
            clock,
        }
    }
}

impl Fetch for Wits {
    type Ask = WitAsk;
    type Got = FetchedWit;

    async fn fetch(&self, _: &WitAsk) -> Result<FetchedWit, FetchError> {
        // The channel's client certificate holds this key: the broker
        // binds the WIT to the certificate's key.
        let (channel, key) = self.issuer.current();
        let mut request = tonic::Request::new(pb::WitRequest { ttl_seconds: 0 });
        request.set_timeout(CALL_TIMEOUT);
        let reply = pb::tokens_client::TokensClient::new(channel)
            .issue_wit(request)
            .await
            .map_err(fetch_error)?
            .into_inner();
        let jkt = key.thumbprint();
        // A WIT for another key than the one its proofs would be signed
        // with is useless: say so rather than cache it.
        match confirmation_jkt(&reply.wit) {
            Some(bound) if bound == jkt => {}
            Some(_) => {
                return Err(FetchError::Unreachable(
                    "the broker bound the WIT to another key than this sidecar's; retrying".into(),
                ));
            }
            None => {
                return Err(FetchError::Unreachable(
                    "the broker sent a WIT without a readable cnf.jwk".into(),
                ));
            }
        }
        let exp = u64::try_from(reply.expires_at).unwrap_or(0);
        let iat = u64::try_from(reply.issued_at).unwrap_or(0);
        let got = FetchedWit {
            wit: Arc::new(Wit::new(reply.wit)),
            expires_in: Duration::from_secs(exp.saturating_sub(self.clock.now())),
            jti: reply.jti,
            kid: reply.kid,
            iat,
            exp,
            jkt,
            key,
        };
        // A revocation of this holder or key covers what was issued up to
        // its second: a WIT issued in that second, after the cache dropped
        // the one revoked, is covered too. Never cache it; the next try,
        // a second later, gets one that is not.
        if got.revoked_by(&self.mesh.borrow().revocations, &self.own_id) {
            return Err(FetchError::Unreachable(
                "the WIT the broker issued is covered by a revocation (issued in its second); retry shortly".into(),
            ));
        }
        Ok(got)
    }

    /// A WIT for another key than the sidecar's current one (it was
    /// renewed since) is replaced.
    fn outdated(&self, got: &FetchedWit) -> bool {
        got.jkt != self.issuer.current().1.thumbprint()
    }
}

/// The thumbprint of the `cnf.jwk` in a WIT the broker just issued (read,
/// not verified: it only checks the broker bound the key this sidecar
/// holds).
fn confirmation_jkt(wit: &str) -> Option<Jkt> {
    let jws = crate::jose::Jws::parse(wit, &crate::jose::Limits::default()).ok()?;
    let jwk = jws.payload().get("cnf")?.get("jwk")?;
    PublicKey::from_jwk(jwk).ok().map(|k| k.thumbprint())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<ProofKey> {
        Arc::new(ProofKey::generate().unwrap())
    }

    #[test]
    fn debug_hides_the_token() {
        let key = key();
        let wit = FetchedWit {
            wit: Arc::new(Wit::new("eyJhbGciOiJFUzI1NiJ9.secret.sig".into())),
            expires_in: Duration::from_secs(60),
            jti: "j1".into(),
            kid: "k1".into(),
            iat: 0,
            exp: 60,
            jkt: key.thumbprint(),
            key,
        };
        assert!(!format!("{wit:?}").contains("secret"));
    }

    #[test]
    fn the_bound_key_is_read_from_cnf_jwk() {
        let key = key();
        let jwk = crate::wimse::wit::confirmation_jwk(key.signing_key().public_key());
        let payload = serde_json::json!({ "cnf": { "jwk": jwk } });
        let header = crate::jose::jws::encode_header(
            &serde_json::json!({ "alg": "ES256", "typ": "wit+jwt" }),
        );
        let wit = crate::jose::jws::sign_compact(
            &header,
            payload.to_string().as_bytes(),
            key.signing_key(),
        )
        .unwrap();
        assert_eq!(confirmation_jkt(&wit), Some(key.thumbprint()));
        assert_eq!(confirmation_jkt("not.a.wit"), None);
    }
}
