//! Getting JWT-SVIDs from the broker (`Tokens.IssueJwtSvid`) over the
//! sidecar's mTLS channel: the [`Fetch`] behind the Workload API's
//! `FetchJWTSVID`, so JWT-SVIDs are cached and refreshed ahead like access
//! tokens. A JWT-SVID is a bearer token (no `cnf`): it is never logged and
//! never shown by `Debug`.

use super::cache::{Expiring, Fetch, FetchError};
use super::issuer::{BrokerIssuer, CALL_TIMEOUT, fetch_error};
use crate::clock::Clock;
use crate::proto::v1 as pb;
use crate::token::Audience;
use crate::token::jwt_svid::JwtSvid;
use std::sync::Arc;
use std::time::Duration;

/// Most audiences one JWT-SVID may name (the broker has its own cap).
pub const MAX_AUDIENCES: usize = 16;

/// The audiences a JWT-SVID is asked for: sorted, without duplicates, at
/// least one, so the same set asked in any order is one cache entry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JwtAsk(Vec<Audience>);

/// Why a set of audiences cannot be asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwtAskError {
    /// No audience at all.
    #[error("at least one audience is required")]
    Empty,
    /// Too many.
    #[error("at most {MAX_AUDIENCES} audiences may be asked for at once, not {0}")]
    TooMany(usize),
    /// One is not a SPIFFE ID or URI.
    #[error("audience {audience:?}: {reason}")]
    Bad {
        /// The audience as given.
        audience: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl JwtAsk {
    /// Parses `audiences` (as a Workload API client sends them).
    ///
    /// # Errors
    /// [`JwtAskError`].
    pub fn parse<S: AsRef<str>>(audiences: &[S]) -> Result<Self, JwtAskError> {
        let mut parsed = audiences
            .iter()
            .map(|a| {
                let a = a.as_ref();
                a.parse::<Audience>().map_err(|e| JwtAskError::Bad {
                    audience: a.chars().take(200).collect(),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        parsed.sort();
        parsed.dedup();
        match parsed.len() {
            0 => Err(JwtAskError::Empty),
            n if n > MAX_AUDIENCES => Err(JwtAskError::TooMany(n)),
            _ => Ok(Self(parsed)),
        }
    }

    /// The audiences, sorted.
    pub fn audiences(&self) -> &[Audience] {
        &self.0
    }
}

/// A JWT-SVID as the broker returned it, with what the cache needs.
#[derive(Debug, Clone)]
pub struct FetchedJwtSvid {
    /// The token, compact JWS: a bearer secret (redacted in `Debug`).
    pub svid: Arc<JwtSvid>,
    /// How long it is valid from when it arrived.
    pub expires_in: Duration,
    /// Its `jti`.
    pub jti: String,
    /// The id of the key that signed it.
    pub kid: String,
    /// When it arrived (Unix seconds).
    pub issued_at: u64,
}

impl Expiring for FetchedJwtSvid {
    fn expires_in(&self) -> Duration {
        self.expires_in
    }
}

impl FetchedJwtSvid {
    /// Whether a revocation in `set` covers this JWT-SVID, held by
    /// `holder` (a JWT-SVID is bound to no key, so a revocation by DPoP
    /// key never covers it).
    pub fn revoked_by(
        &self,
        set: &crate::token::RevocationSet,
        holder: &crate::identity::SpiffeId,
    ) -> bool {
        set.covers(&crate::token::TokenRef {
            jti: &self.jti,
            sub: holder,
            jkt: None,
            kid: &self.kid,
            iat: self.issued_at,
        })
    }
}

/// Fetches JWT-SVIDs over the access-token issuer's current channel (the
/// one the SVID renewal replaces).
#[derive(Debug)]
pub struct JwtSvids {
    issuer: Arc<BrokerIssuer>,
    clock: Arc<dyn Clock>,
}

impl JwtSvids {
    /// A fetcher over `issuer`'s channel.
    pub fn new(issuer: Arc<BrokerIssuer>, clock: Arc<dyn Clock>) -> Self {
        Self { issuer, clock }
    }
}

impl Fetch for JwtSvids {
    type Ask = JwtAsk;
    type Got = FetchedJwtSvid;

    async fn fetch(&self, ask: &JwtAsk) -> Result<FetchedJwtSvid, FetchError> {
        let now = self.clock.now();
        let mut request = tonic::Request::new(pb::JwtSvidRequest {
            audience: ask.0.iter().map(ToString::to_string).collect(),
            ttl_seconds: 0,
        });
        request.set_timeout(CALL_TIMEOUT);
        let reply = pb::tokens_client::TokensClient::new(self.issuer.channel())
            .issue_jwt_svid(request)
            .await
            .map_err(fetch_error)?
            .into_inner();
        let expires_at = u64::try_from(reply.expires_at).unwrap_or(0);
        // Revocations by subject or time compare with the broker's `iat`,
        // not this sidecar's clock (which may run ahead of the broker's).
        let issued_at = broker_iat(&reply.svid).unwrap_or(now);
        Ok(FetchedJwtSvid {
            svid: Arc::new(JwtSvid::new(reply.svid)),
            expires_in: Duration::from_secs(expires_at.saturating_sub(self.clock.now())),
            jti: reply.jti,
            kid: reply.kid,
            issued_at,
        })
    }
}

/// The `iat` the broker wrote into a JWT-SVID it just issued (read, not
/// verified: it only places the token against revocations, and an
/// earlier value is the stricter one).
fn broker_iat(svid: &str) -> Option<u64> {
    let jws = crate::jose::Jws::parse(svid, &crate::jose::Limits::default()).ok()?;
    jws.payload().get("iat")?.as_u64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audiences_in_any_order_with_repeats_are_one_ask() {
        let a = JwtAsk::parse(&["spiffe://example.org/b", "spiffe://example.org/a"]).unwrap();
        let b = JwtAsk::parse(&[
            "spiffe://example.org/a",
            "spiffe://example.org/b",
            "spiffe://example.org/a",
        ])
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.audiences().len(), 2);
    }

    #[test]
    fn empty_too_many_and_bad_audiences_are_refused() {
        let none: [&str; 0] = [];
        assert_eq!(JwtAsk::parse(&none), Err(JwtAskError::Empty));
        let many: Vec<String> = (0..=MAX_AUDIENCES)
            .map(|i| format!("spiffe://example.org/{i}"))
            .collect();
        assert_eq!(
            JwtAsk::parse(&many),
            Err(JwtAskError::TooMany(MAX_AUDIENCES + 1))
        );
        assert!(matches!(
            JwtAsk::parse(&["not a uri"]),
            Err(JwtAskError::Bad { .. })
        ));
    }

    #[test]
    fn debug_hides_the_token() {
        let svid = FetchedJwtSvid {
            svid: Arc::new(JwtSvid::new("eyJhbGciOiJFUzI1NiJ9.secret.sig".into())),
            expires_in: Duration::from_secs(60),
            jti: "j1".into(),
            kid: "k1".into(),
            issued_at: 0,
        };
        assert!(!format!("{svid:?}").contains("secret"));
    }
}
