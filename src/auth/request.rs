//! The full check of a DPoP-bound request: credentials from the headers,
//! the access token (from the verified-token cache when it can), the proof
//! against the request and the token, then the replay cache — last, so a
//! request that fails any check does not burn its proof.

use super::answer::HttpAnswer;
use super::credentials::{self, Credentials};
use super::error::{AuthError, RequestError};
use crate::dpop::ReplayKey;
use crate::dpop::proof::{self, NonceRule, ProofConfig, ProofContext, TokenHash, VerifiedProof};
use crate::dpop::{Nonces, NormalizedUri, ReplayCache, ReplayError};
use crate::jose::Jkt;
use crate::jose::KeyCache;
use crate::token::access::{self, TokenClaims, TokenConfig};
use crate::token::{Jwks, VerifiedTokens};
use crate::wimse::{WitConfig, WptConfig};
use std::sync::Arc;

/// How long a nonce stays valid when only the restart rule issues them
/// (per slot; a nonce is good for its slot and the next).
const DEFAULT_NONCE_SLOT: u64 = 30;

/// Verifier settings.
#[derive(Debug, Clone)]
pub struct VerifierConfig {
    /// Access-token checks.
    pub token: TokenConfig,
    /// Proof checks.
    pub proof: ProofConfig,
    /// WIMSE Workload Identity Token checks (`sub` must be a SPIFFE ID).
    pub wit: WitConfig,
    /// WIMSE Workload Proof Token checks.
    pub wpt: WptConfig,
    /// Most live proofs remembered for replay detection.
    pub replay_capacity: usize,
    /// Most verified tokens cached (0 turns the cache off).
    pub token_cache_capacity: usize,
    /// Most parsed DPoP proof keys kept (callers' keys live for hours).
    pub key_cache_capacity: usize,
    /// Demand server nonces in proofs, valid for this many seconds per slot.
    pub nonce_slot_secs: Option<u64>,
    /// A verifier whose replay cache starts empty (a new process) sets
    /// this to its start time plus the allowed clock skew: a proof whose
    /// `iat` is at or before it is accepted only with a nonce this
    /// verifier issued, so nothing the previous process accepted can be
    /// replayed to this one. `None`: no such rule (a verifier that lives
    /// as long as its callers' proofs, as in tests of the core).
    pub fresh_proofs_after: Option<u64>,
}

impl VerifierConfig {
    /// Defaults: 1M replay entries, 10k cached tokens, 4k cached proof
    /// keys, no nonces.
    pub fn new(token: TokenConfig) -> Self {
        Self {
            token,
            proof: ProofConfig::default(),
            wit: WitConfig {
                require_spiffe: true,
                ..WitConfig::default()
            },
            wpt: WptConfig::default(),
            replay_capacity: 1 << 20,
            token_cache_capacity: 10_000,
            key_cache_capacity: 4_096,
            nonce_slot_secs: None,
            fresh_proofs_after: None,
        }
    }
}

/// The parts of an HTTP request the check needs.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// Method, e.g. `GET`.
    pub method: &'a str,
    /// Absolute request URI as this server sees it (scheme, host, path).
    pub uri: &'a str,
    /// Every `Authorization` header value.
    pub authorization: &'a [&'a [u8]],
    /// Every `DPoP` header value.
    pub dpop: &'a [&'a [u8]],
}

/// A request whose target is already parsed ([`super::target`]): the
/// proof's `htu` is compared with `url` as it is, never re-parsed.
#[derive(Clone, Copy)]
pub struct ParsedRequest<'a> {
    /// Method, e.g. `GET`.
    pub method: &'a str,
    /// The request URL (scheme, authority, normalized path).
    pub url: &'a NormalizedUri,
    /// Every `Authorization` header value.
    pub authorization: &'a [&'a [u8]],
    /// Every `DPoP` header value.
    pub dpop: &'a [&'a [u8]],
}

/// A request that passed.
#[derive(Debug, Clone)]
pub struct Verified {
    /// The access token's claims.
    pub token: Arc<TokenClaims>,
    /// The proof.
    pub proof: VerifiedProof,
}

/// Verifies DPoP-bound requests. Share it between threads behind an `Arc`.
#[derive(Debug)]
pub struct RequestVerifier {
    config: VerifierConfig,
    replay: ReplayCache,
    tokens: Option<VerifiedTokens>,
    keys: KeyCache,
    nonces: Option<Nonces>,
    /// Whether every proof needs a nonce (else only those before
    /// `fresh_proofs_after`).
    nonces_always: bool,
}

impl RequestVerifier {
    /// Builds a verifier with its caches.
    ///
    /// # Errors
    /// If the system random source fails (salts and nonce keys).
    pub fn new(config: VerifierConfig) -> Result<Self, aws_lc_rs::error::Unspecified> {
        // One cache for DPoP proofs and WPTs: it must remember a `jti` as
        // long as either kind of proof may be valid.
        let window = (config.proof.max_age + config.proof.max_skew)
            .max(config.wpt.max_lifetime + 2 * config.wpt.effective_leeway());
        let replay = ReplayCache::new(config.replay_capacity, window)?;
        let tokens = (config.token_cache_capacity > 0)
            .then(|| VerifiedTokens::new(config.token_cache_capacity, config.token.leeway));
        // Nonces are issued when always demanded, and after a restart for
        // proofs that may predate this process.
        let slot = config
            .nonce_slot_secs
            .or(config.fresh_proofs_after.map(|_| DEFAULT_NONCE_SLOT));
        let nonces = slot.map(Nonces::random).transpose()?;
        Ok(Self {
            keys: KeyCache::new(config.key_cache_capacity),
            nonces_always: config.nonce_slot_secs.is_some(),
            config,
            replay,
            tokens,
            nonces,
        })
    }

    /// Checks one request against the trusted `jwks` at `now`.
    ///
    /// # Errors
    /// The [`AuthError`] to answer with (see [`super::answer()`]).
    pub fn verify(
        &self,
        request: &Request<'_>,
        jwks: &Jwks,
        now: u64,
    ) -> Result<Verified, AuthError> {
        let creds = credentials::parse(request.authorization, request.dpop)?;
        let uri = NormalizedUri::parse(request.uri).map_err(|_| RequestError::Malformed)?;
        self.check(creds, request.method, &uri, jwks, now)
    }

    /// Checks one request whose URL was parsed once by the front end
    /// (see [`super::target::request_target`]).
    ///
    /// # Errors
    /// The [`AuthError`] to answer with (see [`super::answer()`]).
    pub fn verify_parsed(
        &self,
        request: &ParsedRequest<'_>,
        jwks: &Jwks,
        now: u64,
    ) -> Result<Verified, AuthError> {
        let creds = credentials::parse(request.authorization, request.dpop)?;
        self.check(creds, request.method, request.url, jwks, now)
    }

    /// Token, proof, then replay.
    fn check(
        &self,
        creds: Credentials<'_>,
        method: &str,
        uri: &NormalizedUri,
        jwks: &Jwks,
        now: u64,
    ) -> Result<Verified, AuthError> {
        let hash = TokenHash::of(creds.token);
        let token = self.token(creds.token, &hash, jwks, now)?;
        let proof = self.proof(creds.proof, &token, &hash, method, uri, now)?;
        Ok(Verified { token, proof })
    }

    /// The access token's claims: from the verified-token cache, or
    /// verified (and cached).
    pub(super) fn token(
        &self,
        token: &str,
        hash: &TokenHash,
        jwks: &Jwks,
        now: u64,
    ) -> Result<Arc<TokenClaims>, AuthError> {
        if let Some(claims) = self.cached(hash, jwks, now) {
            return Ok(claims);
        }
        let claims = Arc::new(access::verify(
            token,
            jwks,
            &self.config.token,
            now,
            &mut (),
        )?);
        if let Some(cache) = &self.tokens {
            cache.insert(*hash, Arc::clone(&claims), now);
        }
        Ok(claims)
    }

    /// The proof for `token` (whose hash is `hash`) against the request,
    /// then the replay cache: last, so a proof that fails a check is not
    /// burnt.
    pub(super) fn proof(
        &self,
        proof: &str,
        token: &TokenClaims,
        hash: &TokenHash,
        method: &str,
        uri: &NormalizedUri,
        now: u64,
    ) -> Result<VerifiedProof, AuthError> {
        let ctx = ProofContext {
            method,
            uri,
            token_hash: Some(hash),
            expected_jkt: Some(&token.jkt),
            nonce: match (&self.nonces, self.config.fresh_proofs_after) {
                (Some(nonces), _) if self.nonces_always => NonceRule::Issued(nonces),
                (Some(nonces), Some(iat_through)) => NonceRule::IssuedThrough {
                    nonces,
                    iat_through,
                },
                _ => NonceRule::NotRequired,
            },
            keys: Some(&self.keys),
        };
        let proof = proof::verify(proof, &ctx, &self.config.proof, now, &mut ())?;

        let key = self.replay.key(&proof.jkt, &proof.jti);
        let expires_at = proof.iat.saturating_add(self.config.proof.max_age);
        match self.replay.check_and_insert(key, expires_at, now) {
            Ok(()) => Ok(proof),
            Err(ReplayError::Replayed) => Err(proof::ProofError::Replayed.into()),
            Err(ReplayError::Full) => Err(AuthError::Overloaded),
        }
    }

    /// The settings it verifies with.
    pub(super) fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// When this verifier started, if its replay cache is younger than
    /// the proofs it may be shown (see [`VerifierConfig::fresh_proofs_after`]).
    pub(super) fn started_at(&self) -> Option<u64> {
        self.config
            .fresh_proofs_after
            .map(|after| after.saturating_sub(self.config.proof.max_skew))
    }

    /// The replay cache (DPoP proofs and WPTs).
    pub(super) fn replay(&self) -> &ReplayCache {
        &self.replay
    }

    /// The replay-cache key of a proof by the key `jkt` with `jti`.
    pub(super) fn replay_key(&self, jkt: &Jkt, jti: &str) -> ReplayKey {
        self.replay.key(jkt, jti)
    }

    /// Whether verified `claims` are still live at `now` (the token
    /// checks' leeway) and their signing key still trusted.
    pub(super) fn still_valid(&self, claims: &TokenClaims, jwks: &Jwks, now: u64) -> bool {
        now < claims.exp.saturating_add(self.config.token.leeway) && jwks.get(&claims.kid).is_some()
    }

    /// A cached token, if its signing key is still trusted.
    fn cached(&self, hash: &TokenHash, jwks: &Jwks, now: u64) -> Option<Arc<TokenClaims>> {
        let claims = self.tokens.as_ref()?.get(hash, now)?;
        // A key dropped from the JWKS (rotation past overlap, compromise)
        // invalidates what it signed, cached or not.
        jwks.get(&claims.kid).is_some().then_some(claims)
    }

    /// The HTTP answer for `error`, with a fresh nonce when one is asked for.
    pub fn answer(&self, error: &AuthError, now: u64) -> HttpAnswer {
        super::answer::answer(error, self.fresh_nonce(now))
    }

    /// A nonce for a `DPoP-Nonce` header at `now`, if this verifier
    /// issues them.
    pub fn fresh_nonce(&self, now: u64) -> Option<String> {
        self.nonces.as_ref().map(|n| n.issue(now))
    }
}
