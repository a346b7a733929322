//! The token core on a mutual-TLS connection between sidecars.
//!
//! A sidecar's DPoP key is its SVID key, so when the TLS peer's verified
//! SVID has the key a token's `cnf.jkt` names, the handshake has already
//! proven possession: `Authorization: DPoP <token>` needs no `DPoP` proof
//! on that connection (RFC 9449's proof is one way to show the key; the
//! handshake's `CertificateVerify` over the transcript is another, fresh
//! for this connection and bound to it, as in RFC 8705). The rules:
//!
//! - the token is verified as always (signature once, then from the
//!   connection's cache: [`ConnectionTokens`]), and its `sub` must be the
//!   peer's SPIFFE ID, whatever proof comes with it: one workload's
//!   sidecar cannot relay another's token ([`AuthError::NotThePeer`]);
//! - bound to the peer's key: no proof needed (one sent anyway is
//!   checked, never ignored);
//! - bound to another key (the peer's previous SVID): a per-request proof
//!   for that key, checked as on plaintext;
//! - everything after (revocations, denials, access rules, rate limits)
//!   is the admission verdict's, as for any request.

use super::credentials::{self, Credentials};
use super::error::{AuthError, RequestError};
use super::request::{ParsedRequest, RequestVerifier, Verified};
use crate::dpop::TokenHash;
use crate::dpop::proof::VerifiedProof;
use crate::identity::{PeerIdentity, SpiffeId};
use crate::token::{Jwks, TokenClaims};
use std::sync::{Arc, Mutex, PoisonError};

/// The token last verified on one connection, so the next request with
/// the same token costs a string comparison: a client's pooled connection
/// carries one token until it is refreshed. Expiry and the signing key's
/// trust are checked again on every use; revocation is the verdict's.
#[derive(Debug, Default)]
pub struct ConnectionTokens(Mutex<Option<(Box<str>, Arc<TokenClaims>)>>);

impl ConnectionTokens {
    fn get(&self, token: &str) -> Option<Arc<TokenClaims>> {
        let slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        slot.as_ref()
            .filter(|(t, _)| **t == *token)
            .map(|(_, c)| Arc::clone(c))
    }

    fn put(&self, token: &str, claims: &Arc<TokenClaims>) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((token.into(), Arc::clone(claims)));
    }
}

/// How a request on an mTLS connection proved possession of its token's
/// key.
#[derive(Debug, Clone)]
pub enum Possession {
    /// The TLS handshake: the token is bound to the peer's SVID key.
    Handshake,
    /// A per-request DPoP proof (the token is bound to another key).
    Proof(VerifiedProof),
}

/// A request on an mTLS connection that passed the token core.
#[derive(Debug, Clone)]
pub struct VerifiedOnConnection {
    /// The access token's claims.
    pub token: Arc<TokenClaims>,
    /// How possession was shown.
    pub possession: Possession,
}

impl RequestVerifier {
    /// Checks one request whose sender a proxy in front named `holder`
    /// without proving it (Envoy's `source.principal` alone): the token's
    /// `sub` must be `holder`, checked before the proof so a refused
    /// request does not spend it, and the proof is demanded as on
    /// plaintext. A claim can only narrow what passes.
    ///
    /// # Errors
    /// The [`AuthError`] to answer with.
    pub fn verify_claimed(
        &self,
        request: &ParsedRequest<'_>,
        holder: &SpiffeId,
        jwks: &Jwks,
        now: u64,
    ) -> Result<Verified, AuthError> {
        let Credentials { token, proof } = credentials::parse(request.authorization, request.dpop)?;
        let hash = TokenHash::of(token);
        let claims = self.token(token, &hash, jwks, now)?;
        if claims.sub != *holder {
            return Err(AuthError::NotThePeer);
        }
        let proof = self.proof(proof, &claims, &hash, request.method, request.url, now)?;
        Ok(Verified {
            token: claims,
            proof,
        })
    }

    /// Checks one request that arrived on a TLS connection whose verified
    /// client SVID is `peer` (see the module doc), against the trusted
    /// `jwks` at `now`. `tokens` is the connection's cache.
    ///
    /// # Errors
    /// The [`AuthError`] to answer with.
    pub fn verify_on_connection(
        &self,
        request: &ParsedRequest<'_>,
        peer: &PeerIdentity,
        tokens: &ConnectionTokens,
        jwks: &Jwks,
        now: u64,
    ) -> Result<VerifiedOnConnection, AuthError> {
        let (token, proof) = if request.dpop.is_empty() {
            (credentials::token_alone(request.authorization)?, None)
        } else {
            let Credentials { token, proof } =
                credentials::parse(request.authorization, request.dpop)?;
            (token, Some(proof))
        };
        let mut hash = None;
        let claims = match tokens.get(token).filter(|c| self.still_valid(c, jwks, now)) {
            Some(claims) => claims,
            None => {
                let h = TokenHash::of(token);
                let claims = self.token(token, &h, jwks, now)?;
                tokens.put(token, &claims);
                hash = Some(h);
                claims
            }
        };
        if claims.sub != peer.spiffe_id {
            return Err(AuthError::NotThePeer);
        }
        let possession = match proof {
            None if claims.jkt == peer.jkt => Possession::Handshake,
            None => return Err(RequestError::MissingProof.into()),
            Some(proof) => {
                let hash = hash.unwrap_or_else(|| TokenHash::of(token));
                Possession::Proof(self.proof(
                    proof,
                    &claims,
                    &hash,
                    request.method,
                    request.url,
                    now,
                )?)
            }
        };
        Ok(VerifiedOnConnection {
            token: claims,
            possession,
        })
    }
}
