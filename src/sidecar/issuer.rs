//! Getting tokens from the broker over mTLS gRPC (`Tokens.Issue`): the
//! [`Fetch`] the token cache uses. Each call carries a fresh DPoP proof
//! for the sidecar's key, so the token comes back bound to it.

use super::cache::{Fetch, FetchError, Fetched, TokenAsk};
use crate::clock::Clock;
use crate::dpop::ProofKey;
use crate::proto::v1 as pb;
use crate::token::{AccessToken, Scope, Scopes};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tonic::transport::Channel;

/// Longest wait for the broker on one call.
pub(super) const CALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the broker for tokens bound to this sidecar's DPoP key.
pub struct BrokerIssuer {
    /// The mTLS channel and the DPoP key, both replaced when the SVID is
    /// renewed (tokens already bound to the old key keep it alive).
    current: RwLock<(Channel, Arc<ProofKey>)>,
    issue_htu: String,
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for BrokerIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerIssuer")
            .field("issue_htu", &self.issue_htu)
            .finish_non_exhaustive()
    }
}

impl BrokerIssuer {
    /// An issuer over `channel` (mTLS with the sidecar's SVID), proving
    /// possession of `key` for `issue_htu` (the broker's
    /// `<issuer>/tally.v1.Tokens/Issue`).
    pub fn new(
        channel: Channel,
        key: Arc<ProofKey>,
        issue_htu: String,
        clock: Arc<dyn Clock>,
    ) -> Self {
        Self {
            current: RwLock::new((channel, key)),
            issue_htu,
            clock,
        }
    }

    /// The channel in use now.
    pub fn channel(&self) -> Channel {
        self.current().0
    }

    /// The channel and DPoP key in use now.
    pub fn current(&self) -> (Channel, Arc<ProofKey>) {
        self.current
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Uses `channel` and binds new tokens to `key` from now on (after an
    /// SVID renewal).
    pub fn set_identity(&self, channel: Channel, key: Arc<ProofKey>) {
        *self
            .current
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (channel, key);
    }
}

/// A broker's refusal as the cache sees it: wait, or pass it on.
pub(super) fn fetch_error(status: tonic::Status) -> FetchError {
    let text = crate::rpc::refusal_text(&status);
    if crate::rpc::is_transient(status.code()) {
        FetchError::Unreachable(text)
    } else {
        FetchError::Refused(text)
    }
}

impl Fetch for BrokerIssuer {
    type Ask = TokenAsk;
    type Got = Fetched;

    async fn fetch(&self, ask: &TokenAsk) -> Result<Fetched, FetchError> {
        let (audience, scopes) = (&ask.audience, &ask.scopes);
        let now = self.clock.now();
        let (channel, key) = self.current();
        let proof = key
            .mint("POST", &self.issue_htu, None, None, now)
            .map_err(|e| FetchError::Unreachable(format!("signing a DPoP proof: {e}")))?;
        let mut request = tonic::Request::new(pb::IssueRequest {
            audience: audience.to_string(),
            scopes: scopes.iter().map(ToString::to_string).collect(),
            ttl_seconds: 0,
            dpop_proof: proof,
        });
        request.set_timeout(CALL_TIMEOUT);
        let reply = pb::tokens_client::TokensClient::new(channel)
            .issue(request)
            .await
            .map_err(fetch_error)?
            .into_inner();
        let granted = reply
            .scopes
            .iter()
            .map(|s| s.parse::<Scope>())
            .collect::<Result<Vec<_>, _>>()
            .and_then(Scopes::new)
            .map_err(|e| FetchError::Unreachable(format!("the broker sent a bad scope: {e}")))?;
        let expires_at = u64::try_from(reply.expires_at).unwrap_or(0);
        Ok(Fetched {
            token: Arc::new(AccessToken::new(reply.access_token)),
            expires_in: Duration::from_secs(expires_at.saturating_sub(self.clock.now())),
            scopes: granted,
            jti: reply.jti,
            kid: reply.kid,
            issued_at: now,
            key,
        })
    }
}
