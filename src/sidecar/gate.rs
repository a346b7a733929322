//! The admission check every front end of this sidecar shares (the
//! inbound proxy, the Envoy ext_authz service): a request's head, in
//! whatever form the front end received it, judged in the order
//! [`crate::auth`] gives: target → credentials and token core
//! ([`RequestVerifier`]) → verdict ([`verdict::judge`]). Refusals are
//! counted for the broker's audit log here and answered through the one
//! mapping ([`auth::refusal_answer`]).
//!
//! When both front ends run they share one gate: one replay cache (a
//! proof spent at one is spent at the other) and one rate limit per
//! caller.

use super::failures::{Failure, FailureLog};
use super::watch::MeshState;
use crate::auth::credentials;
use crate::auth::target::{Authority, RequestTarget, Scheme, request_target};
use crate::auth::verdict::{
    self, Allowed, Caller, CallerLimits, Refusal, StaleRule, VerifiedRequest,
};
use crate::auth::wimse::WimseRequest;
use crate::auth::{
    self, ConnectionTokens, ForwardedError, HttpAnswer, ParsedRequest, RequestVerifier,
};
use crate::clock::Clock;
use crate::identity::{PeerIdentity, SpiffeId};
use crate::wimse::RequestHeaders;
use std::sync::Arc;

/// What the gate needs to know besides the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateConfig {
    /// When the Watch stream has been down longer than this (seconds),
    /// revocations may be missing here.
    pub stale_after: u64,
    /// Then refuse every request (503), not only `admin`-class tokens.
    pub deny_when_stale: bool,
    /// When not empty, the only authorities requests may address.
    pub authorities: Vec<Authority>,
}

/// Who the request's hop came from, as far as the front end knows.
#[derive(Debug, Clone, Copy)]
pub enum Hop<'a> {
    /// No verified peer identity: every request carries its proof.
    Plain,
    /// A peer whose SVID was verified against the trust bundle (the
    /// inbound port's TLS handshake, or a certificate the ext_authz
    /// service checked): a token bound to its key needs no proof, and a
    /// token that is not its own is refused ([`crate::auth::bound`]).
    Mesh {
        /// The peer's verified SVID.
        peer: &'a PeerIdentity,
        /// Tokens already verified on the peer's connection.
        tokens: &'a ConnectionTokens,
    },
    /// A peer identity someone else says it verified, without its
    /// certificate (Envoy's `source.principal`): a token whose `sub` is
    /// not that identity is refused, and possession is still proven per
    /// request. Naming a principal can only narrow what passes.
    Claimed(&'a SpiffeId),
}

/// A request head as a front end received it.
#[derive(Clone, Copy)]
pub struct Head<'a> {
    /// `http` or `https`: what a proof's `htu` names.
    pub scheme: Scheme,
    /// The target's own authority (absolute-form, HTTP/2 `:authority`).
    pub target_authority: Option<&'a str>,
    /// Every `Host` value.
    pub hosts: &'a [&'a [u8]],
    /// The path, without the query.
    pub path: &'a str,
    /// The method.
    pub method: &'a str,
    /// Every `Authorization` value.
    pub authorization: &'a [&'a [u8]],
    /// Every `DPoP` value.
    pub dpop: &'a [&'a [u8]],
    /// Every `Workload-Identity-Token` value (WIMSE).
    pub wit: &'a [&'a [u8]],
    /// Every `Workload-Proof-Token` value (WIMSE draft -01; draft -02
    /// sends `Authorization: WPT`).
    pub wpt: &'a [&'a [u8]],
    /// Every `Txn-Token` value (a WPT's `tth` must bind it).
    pub txn_token: &'a [&'a [u8]],
    /// Every header, for a WPT's `oth`.
    pub headers: &'a dyn RequestHeaders,
    /// Who sent it.
    pub hop: Hop<'a>,
    /// The app receives `path` as sent, not from this sidecar (a proxy in
    /// front forwards the request): it must then be in normal form
    /// already, or the app would route a path other than the one judged.
    pub forwarded_as_sent: bool,
}

impl std::fmt::Debug for Head<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Counts only: the values are credentials.
        f.debug_struct("Head")
            .field("scheme", &self.scheme)
            .field("path", &self.path)
            .field("method", &self.method)
            .field("authorization", &self.authorization.len())
            .field("dpop", &self.dpop.len())
            .field("wit", &self.wit.len())
            .field("wpt", &self.wpt.len())
            .field("hop", &self.hop)
            .finish_non_exhaustive()
    }
}

/// A request the gate admitted.
#[derive(Debug)]
pub struct Passed {
    /// The verdict.
    pub allowed: Allowed,
    /// What it addressed.
    pub target: RequestTarget,
}

/// The shared check. Share it behind an `Arc`.
pub struct Gate {
    workload: SpiffeId,
    config: GateConfig,
    verifier: RequestVerifier,
    mesh: tokio::sync::watch::Receiver<MeshState>,
    /// Per (policy version, caller, allow entry).
    limits: CallerLimits,
    clock: Arc<dyn Clock>,
    failures: Arc<FailureLog>,
}

impl std::fmt::Debug for Gate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gate")
            .field("workload", &self.workload)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Gate {
    /// The gate for `workload` (tokens must name it in `aud`; the
    /// verifier's config says so), judging with what `mesh` holds.
    pub fn new(
        workload: SpiffeId,
        config: GateConfig,
        verifier: RequestVerifier,
        mesh: tokio::sync::watch::Receiver<MeshState>,
        clock: Arc<dyn Clock>,
    ) -> Arc<Self> {
        Arc::new(Self {
            workload,
            config,
            verifier,
            mesh,
            limits: CallerLimits::new(),
            clock,
            failures: Arc::default(),
        })
    }

    /// The refusals of the current interval, for the broker's audit log.
    pub fn failures(&self) -> &Arc<FailureLog> {
        &self.failures
    }

    /// The clock requests are judged by.
    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// The mesh state it judges with.
    pub fn mesh(&self) -> &tokio::sync::watch::Receiver<MeshState> {
        &self.mesh
    }

    /// Every check of `head` at `now_ms` (Unix milliseconds): the
    /// target, the token core, then the verdict.
    ///
    /// # Errors
    /// The [`Refusal`] to answer with.
    pub fn check(&self, head: &Head<'_>, now_ms: u64) -> Result<Passed, Refusal> {
        let now = now_ms / 1000;
        let target = request_target(
            head.scheme,
            head.target_authority,
            head.path,
            head.hosts,
            &self.config.authorities,
        )?;
        if head.forwarded_as_sent && target.path() != head.path {
            return Err(ForwardedError::NotNormalized.into());
        }
        let mesh = self.mesh.borrow().snapshot().ok_or(Refusal::NotReady)?;
        let request = ParsedRequest {
            method: head.method,
            url: &target.url,
            authorization: head.authorization,
            dpop: head.dpop,
        };
        let (caller, wpt) =
            match credentials::wimse(head.authorization, head.dpop, head.wit, head.wpt)? {
                Some(creds) => {
                    let holder = match head.hop {
                        Hop::Mesh { peer, .. } => Some(&peer.spiffe_id),
                        Hop::Claimed(principal) => Some(principal),
                        Hop::Plain => None,
                    };
                    let request = WimseRequest {
                        url: &target.url,
                        txn_token: head.txn_token,
                        headers: head.headers,
                        authority_configured: !self.config.authorities.is_empty(),
                    };
                    let verified = self.verifier.verify_wimse(
                        &creds,
                        &request,
                        holder,
                        &mesh.jwks,
                        &mesh.wit_keys,
                        now,
                    )?;
                    (verified.caller, Some(verified.wpt))
                }
                None => (
                    Caller::Token(match head.hop {
                        Hop::Mesh { peer, tokens } => {
                            self.verifier
                                .verify_on_connection(&request, peer, tokens, &mesh.jwks, now)?
                                .token
                        }
                        Hop::Claimed(principal) => {
                            self.verifier
                                .verify_claimed(&request, principal, &mesh.jwks, now)?
                                .token
                        }
                        Hop::Plain => {
                            self.verifier
                                .verify_parsed(&request, &mesh.jwks, now)?
                                .token
                        }
                    }),
                    None,
                ),
            };
        let stale = StaleRule {
            after: self.config.stale_after,
            deny_all: self.config.deny_when_stale,
        };
        let allowed = verdict::judge(
            &VerifiedRequest {
                caller: &caller,
                method: head.method,
                path: target.path(),
            },
            &mesh.view(&self.workload, stale),
            &self.limits,
            now_ms,
        )?;
        // A WPT is spent only for a request the verdict admits: a caller
        // no rule admits fills no replay cache here.
        if let Some(wpt) = wpt {
            self.verifier.spend_wpt(wpt, now)?;
        }
        Ok(Passed { allowed, target })
    }

    /// Notes `refusal` of a request (`method`, `path` as sent, its
    /// `Authorization` and `Workload-Identity-Token` values) for the audit
    /// log when it is the caller's failure, and gives its answer at `now`
    /// (Unix seconds), through the one mapping in
    /// [`mod@crate::auth::answer`].
    pub fn refuse(
        &self,
        method: &str,
        path: &str,
        authorization: &[&[u8]],
        wit: &[&[u8]],
        refusal: &Refusal,
        now: u64,
    ) -> HttpAnswer {
        if refusal.is_callers_failure() {
            // Only the claims a token names are kept (see `Failure`): the
            // WIT's for a WIMSE request, else the access token's (never a
            // WPT's, which names no holder).
            fn text<'a>(v: &&'a [u8]) -> Option<&'a str> {
                std::str::from_utf8(v).ok()
            }
            let token = wit.first().and_then(text).or_else(|| {
                authorization
                    .first()
                    .and_then(text)
                    .and_then(|v| v.split_once(' '))
                    .filter(|(scheme, _)| {
                        scheme.eq_ignore_ascii_case("DPoP") || scheme.eq_ignore_ascii_case("Bearer")
                    })
                    .map(|(_, t)| t.trim())
            });
            self.failures
                .note(Failure::new(refusal.reason(), method, path, token), now);
        }
        auth::refusal_answer(refusal, self.verifier.fresh_nonce(now))
    }
}
