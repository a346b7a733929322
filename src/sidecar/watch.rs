//! Following the broker's Watch stream: the JWKS, trust bundle, access
//! rules, revocations and denied identities the sidecar verifies with,
//! kept current, resuming after the last sequence number on every
//! reconnect so no change is missed; how stale it all is (for `/readyz`
//! and metrics); and whether the broker has cut this sidecar's own
//! identity off.

use super::identity::backoff;
use super::jitter::random_unit;
use crate::auth::verdict::{MeshView, StaleRule};
use crate::clock::Clock;
use crate::identity::{Denial, DenialSet, SpiffeId};
use crate::policy::Policy;
use crate::proto::v1 as pb;
use crate::token::{Jwks, Revocation, RevocationSet, RevocationTarget};
use crate::wimse::WitKeys;
use std::sync::Arc;
use tonic::transport::Channel;

/// What the sidecar knows of the mesh, as of `sequence`.
#[derive(Debug, Clone, Default)]
pub struct MeshState {
    /// The broker's signing keys.
    pub jwks: Option<Arc<Jwks>>,
    /// The same keys as WIMSE WIT issuer keys (made once per JWKS, not
    /// per request).
    pub wit_keys: Option<Arc<WitKeys>>,
    /// Trust bundle roots, DER.
    pub bundle_der: Vec<Vec<u8>>,
    /// The access rules protecting this workload (a policy holding only
    /// those), and the version the broker gave them.
    pub access: Option<(u64, Arc<Policy>)>,
    /// Revocations in force.
    pub revocations: Arc<RevocationSet>,
    /// How many revocations have arrived (to tell new ones apart).
    pub revocations_seen: u64,
    /// Identities an admin has denied: their tokens are refused here (and
    /// their mesh TLS connections, once there are any).
    pub denied: Arc<DenialSet>,
    /// The broker refused this sidecar's own identity as denied (its
    /// Watch stream was refused or ended so): the local API says so
    /// instead of handing out tokens. Cleared by the next subscription
    /// the broker accepts.
    pub own_identity_denied: bool,
    /// The last change applied.
    pub sequence: u64,
    /// When that change was committed at the broker (Unix ms).
    pub committed_at_ms: u64,
    /// When it arrived here (Unix ms).
    pub received_at_ms: u64,
    /// Whether the stream is up right now.
    pub connected: bool,
    /// Since when the stream has been down (Unix ms; 0 while up or before
    /// the first connect).
    pub down_since_ms: u64,
}

impl MeshState {
    /// Whether the sidecar can verify: it has a JWKS and a bundle.
    pub fn ready(&self) -> bool {
        self.jwks.is_some() && !self.bundle_der.is_empty()
    }

    /// How long the last change took from the broker's commit to here.
    pub fn propagation_ms(&self) -> u64 {
        self.received_at_ms.saturating_sub(self.committed_at_ms)
    }

    /// What a request is judged with, held apart from the watch lock;
    /// `None` until the broker's keys and access rules have arrived.
    pub fn snapshot(&self) -> Option<Snapshot> {
        let (Some(jwks), Some(wit_keys), Some((version, access))) =
            (&self.jwks, &self.wit_keys, &self.access)
        else {
            return None;
        };
        Some(Snapshot {
            jwks: Arc::clone(jwks),
            wit_keys: Arc::clone(wit_keys),
            access: (*version, Arc::clone(access)),
            revocations: Arc::clone(&self.revocations),
            denied: Arc::clone(&self.denied),
            watch_down_since: (!self.connected && self.down_since_ms != 0)
                .then_some(self.down_since_ms / 1000),
        })
    }
}

/// The parts of [`MeshState`] a request is judged with (see
/// [`crate::auth::verdict`]), as of one moment.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// The broker's signing keys.
    pub jwks: Arc<Jwks>,
    /// The same keys, as WIT issuer keys.
    pub wit_keys: Arc<WitKeys>,
    /// The access rules for this workload and their version.
    pub access: (u64, Arc<Policy>),
    /// Revocations in force.
    pub revocations: Arc<RevocationSet>,
    /// Denied identities.
    pub denied: Arc<DenialSet>,
    /// Since when (Unix seconds) the stream has been down, if it is now.
    pub watch_down_since: Option<u64>,
}

impl Snapshot {
    /// The verdict's view of it, for `workload` with `stale`.
    pub fn view<'a>(&'a self, workload: &'a SpiffeId, stale: StaleRule) -> MeshView<'a> {
        MeshView {
            workload,
            access: (self.access.0, &self.access.1),
            revocations: &self.revocations,
            denied: &self.denied,
            watch_down_since: self.watch_down_since,
            stale,
        }
    }
}

/// A revocation from the wire, checked.
fn revocation_from(r: pb::Revocation) -> Result<Revocation, String> {
    let time = |v: i64, what: &str| u64::try_from(v).map_err(|_| format!("revocation {what} {v}"));
    let target = match r.target {
        Some(pb::revocation::Target::Jti(j)) if !j.is_empty() => RevocationTarget::Jti(j),
        Some(pb::revocation::Target::Subject(s)) => {
            RevocationTarget::Subject(s.parse().map_err(|e| format!("revocation subject: {e}"))?)
        }
        Some(pb::revocation::Target::Jkt(k)) => RevocationTarget::Jkt(
            k.parse()
                .map_err(|_| "revocation jkt is not a thumbprint".to_owned())?,
        ),
        Some(pb::revocation::Target::Everything(true)) => RevocationTarget::Everything,
        Some(pb::revocation::Target::Kid(k)) if !k.is_empty() && k.len() <= 256 => {
            RevocationTarget::Kid(k)
        }
        _ => return Err("a revocation without a target".into()),
    };
    Ok(Revocation {
        target,
        issued_before: time(r.issued_before, "issued_before")?,
        expires_at: time(r.expires_at, "expires_at")?,
        reason: r.reason.chars().take(200).collect(),
    })
}

/// A denial from the wire, checked.
fn denial_from(d: pb::IdentityDenial) -> Result<Denial, String> {
    Ok(Denial {
        spiffe_id: d
            .spiffe_id
            .parse()
            .map_err(|e| format!("denied identity: {e}"))?,
        denied: d.denied,
        reason: d
            .reason
            .chars()
            .take(crate::identity::denial::MAX_REASON)
            .collect(),
        actor: String::new(),
        at: u64::try_from(d.at).map_err(|_| format!("denial time {}", d.at))?,
    })
}

/// Applies one update; `Err` names what was wrong with it (the update is
/// skipped, the stream goes on).
fn apply(state: &mut MeshState, update: pb::Update, now_ms: u64) -> Result<(), String> {
    match update.kind {
        Some(pb::update::Kind::Jwks(jwks)) => {
            let parsed = Jwks::parse(jwks.json.as_bytes()).map_err(|e| format!("JWKS: {e}"))?;
            state.wit_keys = Some(Arc::new(WitKeys::from_jwks(&parsed)));
            state.jwks = Some(Arc::new(parsed));
        }
        Some(pb::update::Kind::Bundle(bundle)) => {
            if bundle.roots_der.is_empty() {
                return Err("an empty trust bundle".into());
            }
            state.bundle_der = bundle.roots_der;
        }
        Some(pb::update::Kind::Policy(policy)) => {
            let parsed = Policy::parse(&policy.yaml).map_err(|e| format!("access policy: {e}"))?;
            tracing::info!(
                version = policy.version,
                rules = parsed.access.len(),
                "access policy updated"
            );
            state.access = Some((policy.version, Arc::new(parsed)));
        }
        Some(pb::update::Kind::Revocation(r)) => {
            let revocation = revocation_from(r)?;
            tracing::info!(sequence = update.sequence, target = %revocation.target, "revocation received");
            let mut set = (*state.revocations).clone();
            set.insert(revocation, now_ms / 1000);
            state.revocations = Arc::new(set);
            state.revocations_seen += 1;
        }
        Some(pb::update::Kind::Denial(d)) => {
            let denial = denial_from(d)?;
            tracing::info!(sequence = update.sequence, spiffe_id = %denial.spiffe_id, denied = denial.denied, "identity denial received");
            let mut set = (*state.denied).clone();
            set.apply(update.sequence, denial);
            state.denied = Arc::new(set);
        }
        None => return Err("an update without a kind".into()),
    }
    // The initial state sends revocations and denials before the kinds
    // that make a sidecar ready, so numbers may come out of order there.
    state.sequence = state.sequence.max(update.sequence);
    state.committed_at_ms = u64::try_from(update.committed_at_ms).unwrap_or(0);
    state.received_at_ms = now_ms;
    Ok(())
}

/// Follows the Watch stream for good, publishing the state on `state`
/// after every change and every connect or disconnect. Each (re)connect
/// uses the channel `channel` gives then, so a renewed SVID is picked up.
/// Stops when every receiver of `state` is gone.
pub async fn follow(
    channel: impl Fn() -> Channel + Send + 'static,
    clock: Arc<dyn Clock>,
    state: tokio::sync::watch::Sender<MeshState>,
) {
    let mut attempt = 0u32;
    loop {
        let after = state.borrow().sequence;
        let mut client = pb::watch_client::WatchClient::new(channel());
        let stream = client
            .subscribe(pb::SubscribeRequest {
                after_sequence: after,
            })
            .await;
        match stream {
            Ok(stream) => {
                attempt = 0;
                state.send_modify(|s| {
                    s.connected = true;
                    s.down_since_ms = 0;
                    s.own_identity_denied = false;
                });
                let mut stream = stream.into_inner();
                loop {
                    let message = tokio::select! {
                        m = stream.message() => m,
                        () = state.closed() => return,
                    };
                    match message {
                        Ok(Some(update)) => {
                            let now_ms = clock.now().saturating_mul(1000);
                            let sequence = update.sequence;
                            let mut next = state.borrow().clone();
                            match apply(&mut next, update, now_ms) {
                                Ok(()) => {
                                    state.send_replace(next);
                                }
                                Err(why) => {
                                    tracing::warn!(sequence, %why, "skipped a watch update")
                                }
                            }
                        }
                        Ok(None) => {
                            tracing::info!("the broker ended the watch stream; reconnecting");
                            break;
                        }
                        Err(status) => {
                            tracing::warn!(code = ?status.code(), message = status.message(), "watch stream broke; reconnecting");
                            note_denied(&state, &status);
                            break;
                        }
                    }
                }
                let now_ms = clock.now().saturating_mul(1000);
                state.send_modify(|s| {
                    s.connected = false;
                    s.down_since_ms = now_ms;
                });
            }
            Err(status) => {
                tracing::warn!(code = ?status.code(), message = status.message(), after, "cannot subscribe to the watch stream");
                note_denied(&state, &status);
            }
        }
        let wait = backoff(attempt, random_unit());
        attempt = attempt.saturating_add(1);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = state.closed() => return,
        }
    }
}

/// Marks this sidecar's own identity denied when `status` is the broker's
/// refusal of a denied identity.
fn note_denied(state: &tokio::sync::watch::Sender<MeshState>, status: &tonic::Status) {
    let denied = status.code() == tonic::Code::PermissionDenied
        && status
            .metadata()
            .contains_key(crate::identity::denial::DENIED_METADATA);
    if denied {
        tracing::error!(
            "the broker denies this workload's identity: no tokens until an admin allows it (tally ctl identities allow)"
        );
        state.send_if_modified(|s| !std::mem::replace(&mut s.own_identity_denied, true));
    }
}
