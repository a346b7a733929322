//! A whole sidecar from its settings: attest, keep the SVID (and with it
//! the DPoP key, and the WIT bound to it) renewed, follow the Watch
//! stream, and serve whichever of the local API, inbound proxy, outbound
//! proxy and admin port were given a listener. `tally sidecar` and `tally demo` both run this; tests start
//! it on sockets bound to port 0.

use super::admin::Parts;
use super::api::{LocalApi, ServiceMap};
use super::cache::{CacheConfig, TokenCache};
use super::ext_authz::{ExtAuthz, ExtAuthzConfig, ExtAuthzListener};
use super::gate::Gate;
use super::identity::{Attestation, IdentityClient, IdentityError, Svid, backoff, keep_renewed};
use super::inbound::{Inbound, InboundConfig};
use super::issuer::BrokerIssuer;
use super::jwt_svids::JwtSvids;
use super::mtls::MeshTls;
use super::outbound::{Outbound, OutboundConfig};
use super::watch::{MeshState, follow};
use super::wits::Wits;
use super::workload_api::{WorkloadApi, WorkloadParts};
use super::workload_svid::keep_workload_svid;
use crate::auth::{RequestVerifier, VerifierConfig};
use crate::clock::Clock;
use crate::dpop::ProofKey;
use crate::identity::SpiffeId;
use crate::token::TokenConfig;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What a sidecar does.
#[derive(Debug)]
pub struct SidecarSettings {
    /// The broker's gRPC URL (`https://host:port`).
    pub broker: String,
    /// Roots to verify the broker with on first contact, PEM.
    pub bundle_pem: String,
    /// How to prove who this workload is.
    pub attestation: Attestation,
    /// Host → audience, for `/v1/authorize` and the outbound proxy.
    pub services: ServiceMap,
    /// Only these peer uids may use the local socket, if set.
    pub allowed_uids: Option<Vec<u32>>,
    /// Token cache settings.
    pub cache: CacheConfig,
    /// Inbound proxy settings (used when an inbound listener is given).
    pub inbound: Option<InboundConfig>,
    /// Envoy ext_authz settings (used when an ext_authz listener is
    /// given).
    pub ext_authz: Option<ExtAuthzConfig>,
    /// Demand server nonces (`use_dpop_nonce`) from inbound callers.
    pub inbound_nonces: bool,
    /// Outbound proxy settings.
    pub outbound: OutboundConfig,
    /// Not ready once the Watch stream has been down this long (seconds):
    /// revocations could be missed.
    pub watch_staleness: u64,
    /// Timeouts and connection cap of every listener.
    pub limits: crate::http::Limits,
}

/// Where the sidecar serves; each part runs only if its listener is here.
#[derive(Debug, Default)]
pub struct Listeners {
    /// The local API (see [`super::api::bind`]).
    pub socket: Option<tokio::net::UnixListener>,
    /// The SPIFFE Workload API (bound like the local API).
    pub spiffe: Option<tokio::net::UnixListener>,
    /// The inbound verifying proxy.
    pub inbound: Option<tokio::net::TcpListener>,
    /// The outbound forward proxy.
    pub outbound: Option<tokio::net::TcpListener>,
    /// The admin port: `/healthz`, `/readyz`, `/metrics`.
    pub admin: Option<tokio::net::TcpListener>,
    /// Envoy's ext_authz service (gRPC, TCP or a Unix socket).
    pub ext_authz: Option<ExtAuthzListener>,
}

/// A running sidecar.
pub struct Sidecar {
    spiffe_id: SpiffeId,
    parts: Arc<Parts>,
    stop: watch::Sender<bool>,
    servers: Vec<(&'static str, JoinHandle<std::io::Result<()>>)>,
    /// Sends refusal summaries to the broker; flushes once at stop.
    reporter: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Sidecar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sidecar")
            .field("spiffe_id", &self.spiffe_id)
            .finish_non_exhaustive()
    }
}

/// First contact: attests, retrying with backoff while the broker is
/// unreachable (it may be starting too). A refusal is final, and so is a
/// broker whose certificate the trust bundle does not verify.
///
/// # Errors
/// [`IdentityError::Refused`], [`IdentityError::Untrusted`] or
/// [`IdentityError::Local`].
pub async fn attest(
    identity: &IdentityClient,
    how: &Attestation,
    clock: &dyn Clock,
) -> Result<Svid, IdentityError> {
    let mut attempt = 0;
    loop {
        match identity.attest(how, clock.now()).await {
            Err(IdentityError::Unreachable(why)) => {
                let wait = backoff(attempt, super::jitter::random_unit());
                attempt += 1;
                tracing::warn!(%why, retry_in = ?wait, "broker unreachable; retrying attestation");
                tokio::time::sleep(wait).await;
            }
            other => return other,
        }
    }
}

impl Sidecar {
    /// Attests (see [`attest`]), then starts SVID renewal, the Watch
    /// follower and a server on every listener given.
    ///
    /// # Errors
    /// If attestation is refused, or a key cannot be made.
    pub async fn start(
        settings: SidecarSettings,
        listeners: Listeners,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, IdentityError> {
        let identity = IdentityClient::new(settings.broker.clone(), settings.bundle_pem.clone());
        let svid = attest(&identity, &settings.attestation, clock.as_ref()).await?;
        let spiffe_id = svid.spiffe_id.clone();
        let key = Arc::new(svid_key(&svid)?);
        let issuer = Arc::new(BrokerIssuer::new(
            identity.channel(&svid)?,
            key,
            svid.issue_htu(),
            Arc::clone(&clock),
        ));
        let own_audience = spiffe_id
            .as_str()
            .parse()
            .map_err(|e| IdentityError::Local(format!("own SPIFFE ID: {e}")))?;
        let token_issuer = svid.issuer.clone();
        let inbound_nonces = settings.inbound_nonces;
        let started_at = clock.now();
        let verifier_config = move |proof_max_age: u64, clock_skew: u64| {
            let mut c = VerifierConfig::new(TokenConfig::new(token_issuer, own_audience));
            c.nonce_slot_secs = inbound_nonces.then_some(30);
            c.proof.max_age = proof_max_age;
            c.proof.max_skew = clock_skew;
            // The replay cache starts empty: a proof the previous process
            // (before a restart) could have accepted needs a nonce of ours.
            c.fresh_proofs_after = Some(started_at + clock_skew);
            c
        };
        let (stop, _) = watch::channel(false);
        let (svids, svid_rx) = watch::channel(Arc::new(svid));
        let (mesh, mesh_rx) = watch::channel(MeshState::default());
        let mesh_tls = MeshTls::new(svid_rx.clone(), Some(mesh_rx.clone()));
        // Only a ServiceAccount token can prove the identity again: a join
        // token is spent.
        let reattest = matches!(
            settings.attestation,
            Attestation::ServiceAccountTokenFile(_)
        )
        .then(|| settings.attestation.clone());
        tokio::spawn(keep_renewed(
            identity.clone(),
            Arc::clone(&clock),
            svids,
            reattest,
        ));
        tokio::spawn(follow_renewals(
            svid_rx.clone(),
            identity.clone(),
            Arc::clone(&issuer),
        ));
        let current = Arc::clone(&issuer);
        tokio::spawn(follow(move || current.channel(), Arc::clone(&clock), mesh));

        let reporter = Arc::clone(&issuer);
        // The Workload API's SVID and JWT-SVIDs are asked for only when it
        // is served.
        let workload = listeners.spiffe.is_some().then(|| {
            let (out, rx) = watch::channel(None);
            tokio::spawn(keep_workload_svid(
                identity.clone(),
                Arc::clone(&clock),
                svid_rx.clone(),
                out,
            ));
            let jwt = TokenCache::new(
                JwtSvids::new(Arc::clone(&issuer), Arc::clone(&clock)),
                settings.cache,
            );
            (rx, jwt)
        });
        // The WIT is asked for on first use (by the local API or the
        // outbound proxy), then kept like a token.
        let wits = TokenCache::new(
            Wits::new(
                Arc::clone(&issuer),
                mesh_rx.clone(),
                spiffe_id.clone(),
                Arc::clone(&clock),
            ),
            settings.cache,
        );
        let allowed_uids = settings.allowed_uids.clone();
        let cache = TokenCache::new(issuer, settings.cache);
        let api = LocalApi::new(
            cache,
            svid_rx.clone(),
            Some(mesh_rx.clone()),
            settings.services,
            settings.allowed_uids,
            Arc::clone(&clock),
            Some(Arc::clone(&wits)),
        );
        let inbound = match (&listeners.inbound, settings.inbound) {
            (Some(_), Some(config)) => Some(config),
            (Some(_), None) => {
                return Err(IdentityError::Local(
                    "an inbound listener needs an upstream (the app's address)".into(),
                ));
            }
            _ => None,
        };
        let ext_authz = listeners
            .ext_authz
            .as_ref()
            .map(|_| settings.ext_authz.unwrap_or_default());
        // One gate for both front ends (one replay cache, one rate limit
        // per caller), so they must check alike.
        let checks = match (&inbound, &ext_authz) {
            (Some(i), Some(e)) if (i.proof_max_age, i.clock_skew, i.gate()) != e.checks() => {
                return Err(IdentityError::Local(
                    "the inbound proxy and ext_authz share one check: give them the same proof, skew, staleness and authority settings".into(),
                ));
            }
            (Some(i), _) => Some(((i.proof_max_age, i.clock_skew, i.gate()), i.report_every)),
            (None, Some(e)) => Some((e.checks(), e.report_every)),
            (None, None) => None,
        };
        let gate = match &checks {
            Some(((proof_max_age, clock_skew, gate), _)) => {
                let verifier =
                    RequestVerifier::new(verifier_config(*proof_max_age, *clock_skew))
                        .map_err(|_| IdentityError::Local("the random source failed".into()))?;
                Some(Gate::new(
                    spiffe_id.clone(),
                    gate.clone(),
                    verifier,
                    mesh_rx.clone(),
                    Arc::clone(&clock),
                ))
            }
            None => None,
        };
        let reporter = gate.as_ref().zip(checks).map(|(gate, (_, every))| {
            tokio::spawn(super::failures::report(
                Arc::downgrade(gate.failures()),
                every,
                move || reporter.channel(),
                stop.subscribe(),
            ))
        });
        let inbound = inbound
            .zip(gate.clone())
            .map(|(config, gate)| Inbound::new(config, gate));
        let ext_authz = ext_authz
            .zip(gate)
            .map(|(config, gate)| ExtAuthz::new(config, gate, svid_rx.clone()));
        let outbound = Outbound::new(Arc::clone(&api), settings.outbound, Arc::clone(&mesh_tls));
        let revocation_lag = Arc::new(crate::metrics::Histogram::new(
            "tally_sidecar_revocation_lag_seconds",
            "From a revocation's commit at the broker to its arrival here.",
        ));
        tokio::spawn(enforce_revocations(
            mesh_rx.clone(),
            Cached {
                tokens: Arc::clone(api.cache()),
                jwt: workload.as_ref().map(|(_, jwt)| Arc::clone(jwt)),
                wits: Arc::clone(&wits),
            },
            spiffe_id.clone(),
            Arc::clone(&revocation_lag),
        ));
        let parts = Arc::new(Parts {
            svid: svid_rx,
            mesh: mesh_rx,
            api,
            inbound,
            ext_authz,
            outbound,
            wits,
            clock,
            revocation_lag,
            watch_staleness: settings.watch_staleness,
            listeners: crate::http::Listeners::default(),
        });
        let limits = settings.limits;
        let listen = |name: &'static str| {
            let listen = crate::http::Listen::new(name).limits(limits);
            parts.listeners.add(listen.stats());
            listen
        };

        let mut servers = Vec::new();
        let stopped = |rx: watch::Receiver<bool>| async move {
            let mut rx = rx;
            let _ = rx.wait_for(|s| *s).await;
        };
        if let Some(socket) = listeners.socket {
            let api = Arc::clone(&parts.api);
            let server =
                super::api::serve(api, socket, listen("socket"), stopped(stop.subscribe()));
            servers.push(("local API", tokio::spawn(server)));
        }
        if let (Some(socket), Some((svid, jwt))) = (listeners.spiffe, workload) {
            let api = WorkloadApi::new(WorkloadParts {
                own_id: spiffe_id.clone(),
                svid,
                mesh: parts.mesh.clone(),
                jwt,
                allowed_uids,
                clock: Arc::clone(&parts.clock),
                stop: stop.subscribe(),
            });
            let server = super::workload_api::serve(
                api,
                socket,
                listen("spiffe"),
                stopped(stop.subscribe()),
            );
            servers.push(("Workload API", tokio::spawn(server)));
        }
        if let (Some(listener), Some(inbound)) = (listeners.inbound, parts.inbound.clone()) {
            // TLS (mesh peers) and plaintext on one port, by first byte.
            let listen = listen("inbound")
                .tls_or_plaintext(super::mesh_conn::tls_source(
                    Arc::clone(&mesh_tls),
                    inbound.config().mtls,
                ))
                .close_when(super::mesh_conn::closer(
                    Arc::clone(&mesh_tls),
                    parts.mesh.clone(),
                    Arc::clone(&parts.clock),
                ));
            let server = crate::http::serve(
                listener,
                listen,
                move |req, peer| Arc::clone(&inbound).handle(req, peer),
                stopped(stop.subscribe()),
            );
            servers.push(("inbound proxy", tokio::spawn(server)));
        }
        if let Some(listener) = listeners.outbound {
            let outbound = Arc::clone(&parts.outbound);
            // The outbound proxy signs as this workload: only the uids the
            // socket serves may use it, so learn each local caller's uid.
            let listen = listen("outbound");
            let listen = if parts.api.restricts_uids() {
                listen.peer_uid()
            } else {
                listen
            };
            let server = crate::http::serve(
                listener,
                listen,
                move |req, peer| Arc::clone(&outbound).handle(req, peer),
                stopped(stop.subscribe()),
            );
            servers.push(("outbound proxy", tokio::spawn(server)));
        }
        if let (Some(listener), Some(ext_authz)) = (listeners.ext_authz, parts.ext_authz.clone()) {
            let api = Arc::clone(&parts.api);
            let admit: super::ext_authz::Admit = Arc::new(move |peer| {
                api.admit(peer, "ext_authz socket")
                    .map_err(|e| e.description)
            });
            let server = super::ext_authz::serve(
                ext_authz,
                admit,
                listener,
                listen("ext_authz"),
                stopped(stop.subscribe()),
            );
            servers.push(("ext_authz", tokio::spawn(server)));
        }
        if let Some(listener) = listeners.admin {
            let admin = Arc::clone(&parts);
            let server = crate::http::serve(
                listener,
                listen("admin"),
                move |req, _peer| super::admin::handle(Arc::clone(&admin), req),
                stopped(stop.subscribe()),
            );
            servers.push(("admin port", tokio::spawn(server)));
        }
        Ok(Self {
            spiffe_id,
            parts,
            stop,
            servers,
            reporter,
        })
    }

    /// Whom this sidecar speaks for.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.spiffe_id
    }

    /// What the admin port reads (SVID, mesh state, proxies).
    pub fn parts(&self) -> &Arc<Parts> {
        &self.parts
    }

    /// The sidecar's WIMSE Workload Identity Token holder:
    /// `wits().get(&WitAsk)` gives the WIT for the sidecar's current key
    /// and that key (see [`super::wits`]).
    pub fn wits(&self) -> &Arc<TokenCache<Wits>> {
        &self.parts.wits
    }

    /// Waits until the sidecar can verify (keys, bundle and access rules
    /// from the broker), at most `limit`. Returns whether it got there.
    pub async fn ready(&self, limit: Duration) -> bool {
        let mut mesh = self.parts.mesh.clone();
        tokio::time::timeout(limit, mesh.wait_for(|m| m.ready() && m.access.is_some()))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops accepting, lets requests in flight finish, and waits for
    /// every server.
    ///
    /// # Errors
    /// The first server that failed, named.
    pub async fn stop(self) -> std::io::Result<()> {
        self.run_until(std::future::ready(())).await
    }

    /// Runs until `shutdown` resolves or a server fails, then stops.
    ///
    /// # Errors
    /// A server that failed.
    pub async fn run_until(
        mut self,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> std::io::Result<()> {
        let handles: Vec<_> = self.servers.drain(..).collect();
        let (names, handles): (Vec<_>, Vec<_>) = handles.into_iter().unzip();
        let mut set = tokio::task::JoinSet::new();
        for (name, handle) in names.into_iter().zip(handles) {
            set.spawn(async move {
                let result = handle
                    .await
                    .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())));
                (name, result)
            });
        }
        let early = tokio::select! {
            () = shutdown => None,
            Some(Ok((name, result))) = set.join_next() => Some((name, result)),
        };
        let _ = self.stop.send(true);
        let mut first = match early {
            Some((name, Err(e))) => Err(std::io::Error::new(e.kind(), format!("{name}: {e}"))),
            _ => Ok(()),
        };
        while let Some(joined) = set.join_next().await {
            if let Ok((name, Err(e))) = joined
                && first.is_ok()
            {
                first = Err(std::io::Error::new(e.kind(), format!("{name}: {e}")));
            }
        }
        // The last interval's refusals, once the servers have stopped
        // (bounded by the report's own timeout).
        if let Some(reporter) = self.reporter.take() {
            let _ = reporter.await;
        }
        first
    }
}

/// The DPoP key of an SVID: its own key, so a token bound to it is bound
/// to the TLS identity too (a mesh peer proves possession in the
/// handshake).
fn svid_key(svid: &Svid) -> Result<ProofKey, IdentityError> {
    crate::jose::SigningKey::from_pkcs8_pem(svid.key_pem.as_bytes())
        .map(ProofKey::new)
        .map_err(|e| IdentityError::Local(format!("the SVID's key: {e}")))
}

/// On every renewed SVID: a new mTLS channel, and its key as the DPoP key
/// for new tokens (cached tokens keep the key they are bound to until they
/// expire).
async fn follow_renewals(
    mut svids: watch::Receiver<Arc<Svid>>,
    identity: IdentityClient,
    issuer: Arc<BrokerIssuer>,
) {
    while svids.changed().await.is_ok() {
        let svid = Arc::clone(&svids.borrow_and_update());
        let channel = match identity.channel(&svid) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the renewed SVID");
                continue;
            }
        };
        match svid_key(&svid) {
            Ok(key) => issuer.set_identity(channel, Arc::new(key)),
            Err(e) => {
                tracing::error!(error = %e, "cannot use the renewed SVID's key for DPoP; keeping the current one");
                let (_, key) = issuer.current();
                issuer.set_identity(channel, key);
            }
        }
    }
}

/// What the sidecar holds from the broker, which revocations may cover.
struct Cached {
    tokens: Arc<TokenCache<Arc<BrokerIssuer>>>,
    jwt: Option<Arc<TokenCache<JwtSvids>>>,
    wits: Arc<TokenCache<Wits>>,
}

/// On every revocation that arrives: records its lag from the broker's
/// commit, and drops this workload's cached tokens, JWT-SVIDs and WIT it
/// covers so callers get new ones (the inbound check enforces it for
/// tokens presented here).
async fn enforce_revocations(
    mut mesh: watch::Receiver<MeshState>,
    cached: Cached,
    own_id: SpiffeId,
    lag: Arc<crate::metrics::Histogram>,
) {
    let Cached { tokens, jwt, wits } = cached;
    let mut seen = mesh.borrow().revocations_seen;
    while mesh.changed().await.is_ok() {
        let (set, count, committed_ms, received_ms) = {
            let m = mesh.borrow_and_update();
            (
                Arc::clone(&m.revocations),
                m.revocations_seen,
                m.committed_at_ms,
                m.received_at_ms,
            )
        };
        if count == seen {
            continue;
        }
        seen = count;
        lag.observe(Duration::from_millis(
            received_ms.saturating_sub(committed_ms),
        ));
        let dropped = tokens.forget_where(|f| f.revoked_by(&set, &own_id))
            + jwt
                .as_ref()
                .map_or(0, |jwt| jwt.forget_where(|j| j.revoked_by(&set, &own_id)))
            + wits.forget_where(|w| w.revoked_by(&set, &own_id));
        if dropped > 0 {
            tracing::info!(dropped, "dropped cached tokens a revocation covers");
        }
    }
}
