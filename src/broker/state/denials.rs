//! Who is calling, and identities an admin has cut off.
//!
//! [`Broker::caller`] is the one place every gRPC service and every OAuth
//! endpoint learns the caller from its client certificate; it refuses a
//! denied identity from an in-memory snapshot, so no call of a denied
//! workload reaches a service, over a connection opened before the denial
//! too. Attestation happens before there is a certificate: the SVID
//! issuer checks the identity being attested (see
//! `identity::issue_svid`).
//!
//! A denial is a `denial` entry in the change feed: committed before the
//! admin is answered, loaded into the snapshot at start, taken in from
//! other replicas as they commit (see [`super::replicas`]), and carried to
//! every sidecar by Watch. It never expires; a later `allow` entry for the
//! same identity lifts it.

/// SVID serials whose pod [`Broker::caller_pod`] keeps in memory.
const MAX_REMEMBERED_PODS: usize = 100_000;

use super::Broker;
use crate::audit::{AuditEvent, AuditKind, Outcome};
use crate::identity::{Denial, DenialSet, SpiffeId};
use crate::policy::Rate;
use crate::store::{Change, StoreError};

/// Refusals of one denied identity audited per minute; past that they are
/// only counted (`tally_broker_denied_identity_calls_total`), so a
/// cut-off workload retrying in a loop cannot flood the audit log.
const DENIED_AUDITS: Rate = Rate {
    count: 20,
    per_secs: 60,
};

/// Why a client certificate does not name a caller the broker serves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CallerError {
    /// The TLS handshake carried no client certificate.
    #[error("a client certificate (X.509-SVID) is required")]
    NoCertificate,
    /// The leaf does not name exactly one SPIFFE ID.
    #[error("client certificate: {0}")]
    Certificate(String),
    /// The SPIFFE ID is in another trust domain.
    #[error("{id} is not in trust domain {trust_domain}")]
    OtherTrustDomain {
        /// Whom the certificate names.
        id: SpiffeId,
        /// `spiffe://<this broker's trust domain>`.
        trust_domain: SpiffeId,
    },
    /// An admin denied this identity (`tally ctl identities deny`). The
    /// admin's reason is not told to the caller.
    #[error(
        "{id} is denied by this broker's admins: it is issued nothing until `tally ctl identities allow` lifts the denial"
    )]
    Denied {
        /// The denied identity.
        id: SpiffeId,
    },
}

/// The call a denied identity was refused, for the audit record and the
/// metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Call {
    /// `Identity.Attest` (join token or ServiceAccount token).
    Attest,
    /// `Identity.Renew`.
    Renew,
    /// `Tokens.Issue`.
    Issue,
    /// `Watch.Subscribe`, or an open stream ended by a denial.
    Watch,
    /// `Reports.VerificationFailures`.
    Reports,
    /// Any Admin RPC.
    Admin,
    /// `POST /oauth2/token`.
    OAuthToken,
    /// `POST /oauth2/introspect`.
    Introspect,
    /// `POST /oauth2/revoke`.
    OAuthRevoke,
    /// `Tokens.IssueJwtSvid`.
    IssueJwtSvid,
    /// `Identity.IssueWorkloadSvid`.
    WorkloadSvid,
    /// `Tokens.IssueWit`.
    IssueWit,
}

impl Call {
    /// The `call` field and metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Attest => "attest",
            Self::Renew => "renew",
            Self::Issue => "issue",
            Self::Watch => "watch",
            Self::Reports => "reports",
            Self::Admin => "admin",
            Self::OAuthToken => "oauth_token",
            Self::Introspect => "introspect",
            Self::OAuthRevoke => "oauth_revoke",
            Self::IssueJwtSvid => "issue_jwt_svid",
            Self::WorkloadSvid => "workload_svid",
            Self::IssueWit => "issue_wit",
        }
    }

    /// The audit kind a refusal of this call is recorded under: the
    /// call's own where it has one, so a query for issuances or renewals
    /// finds the refusals too.
    fn audit_kind(self) -> AuditKind {
        match self {
            Self::Attest => AuditKind::Attest,
            Self::Renew => AuditKind::Renew,
            Self::Issue | Self::OAuthToken => AuditKind::TokenIssue,
            Self::IssueJwtSvid => AuditKind::JwtSvidIssue,
            Self::WorkloadSvid => AuditKind::WorkloadSvid,
            Self::IssueWit => AuditKind::WitIssue,
            Self::Watch | Self::Reports | Self::Admin | Self::Introspect | Self::OAuthRevoke => {
                AuditKind::CallRefused
            }
        }
    }
}

/// Why a deny or allow was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DenyError {
    /// The ID is in another trust domain, or names no workload.
    #[error("{id} is not a workload of trust domain {trust_domain}")]
    NotAWorkload {
        /// The ID given.
        id: SpiffeId,
        /// `spiffe://<this broker's trust domain>`.
        trust_domain: SpiffeId,
    },
    /// Denying an admin would lock the admins out of `allow`.
    #[error(
        "{0} is this broker's admin identity and cannot be denied (its credential is the data directory's admin/)"
    )]
    Admin(SpiffeId),
    /// The broker's own identity names its listeners, not a workload.
    #[error("{0} is the broker's own identity and cannot be denied")]
    Broker(SpiffeId),
    /// The store failed: nothing changed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A committed deny or allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenialChange {
    /// Its change-feed sequence number.
    pub sequence: u64,
    /// Whether the identity was denied before (as this replica knew it).
    pub was_denied: bool,
    /// When (Unix seconds).
    pub at: u64,
}

/// Takes a `denial` entry of the change feed into `set`; returns whether
/// it changed it. An entry that does not parse is logged and skipped.
pub(super) fn take_in(set: &mut DenialSet, change: &Change) -> bool {
    match Denial::from_json(&change.body) {
        Ok(entry) => set.apply(change.seq, entry),
        Err(e) => {
            tracing::error!(seq = change.seq, error = %e, "skipped a stored identity denial");
            false
        }
    }
}

impl Broker {
    /// The caller's SPIFFE ID from the leaf of its client certificate
    /// chain. The TLS layer has already verified the chain to our bundle
    /// and its validity; what remains is the identity it names, which must
    /// be in this trust domain and not denied.
    ///
    /// # Errors
    /// [`CallerError`]: no certificate, no single SPIFFE ID, another trust
    /// domain, or a denied identity.
    pub fn caller(
        &self,
        certs: Option<&[rustls_pki_types::CertificateDer<'_>]>,
    ) -> Result<SpiffeId, CallerError> {
        let leaf = certs
            .and_then(<[_]>::first)
            .ok_or(CallerError::NoCertificate)?;
        let id = crate::ca::spiffe_id_of(leaf).map_err(CallerError::Certificate)?;
        if id.trust_domain() != self.settings.trust_domain.trust_domain() {
            return Err(CallerError::OtherTrustDomain {
                id,
                trust_domain: self.settings.trust_domain.clone(),
            });
        }
        if self.is_denied(&id) {
            return Err(CallerError::Denied { id });
        }
        Ok(id)
    }

    /// The pod whose ServiceAccount token attested the caller's SVID (the
    /// leaf of `certs`), for the audit records of what it does: remembered
    /// by serial, read from the store's SVID row the first time (another
    /// replica, or before a restart, may have issued it). `None` for
    /// SVIDs not attested by a pod, and when the store cannot say.
    pub async fn caller_pod(
        &self,
        certs: Option<&[rustls_pki_types::CertificateDer<'_>]>,
    ) -> Option<crate::identity::k8s::Pod> {
        let leaf = certs.and_then(<[_]>::first)?;
        let serial = crate::ca::serial_of(leaf).ok()?;
        if let Some(known) = self.pods().get(&serial) {
            return known.clone();
        }
        let pod = match self.store.svid_pod(&serial).await {
            Ok(pod) => pod,
            Err(e) => {
                tracing::warn!(error = %e, %serial, "reading the pod of an SVID");
                return None;
            }
        };
        self.note_svid_pod(serial, pod.clone());
        pod
    }

    /// Remembers the pod of the SVID with `serial` (hex).
    pub fn note_svid_pod(&self, serial: String, pod: Option<crate::identity::k8s::Pod>) {
        let mut pods = self.pods();
        // Bounded: live SVIDs are re-read after a clear, one query each.
        if pods.len() >= MAX_REMEMBERED_PODS {
            pods.clear();
        }
        pods.insert(serial, pod);
    }

    fn pods(
        &self,
    ) -> std::sync::MutexGuard<
        '_,
        std::collections::HashMap<String, Option<crate::identity::k8s::Pod>>,
    > {
        self.svid_pods
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether an admin has denied `id` (as this replica knows now).
    pub fn is_denied(&self, id: &SpiffeId) -> bool {
        self.denials
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_denied(id)
    }

    /// Every denial in force.
    pub fn denials(&self) -> Vec<Denial> {
        self.denials
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .denied()
            .cloned()
            .collect()
    }

    /// Takes a `denial` entry of the change feed into the snapshot (one
    /// this replica wrote, or one another replica committed).
    pub(super) fn take_in_denial(&self, change: &Change) {
        let mut set = self
            .denials
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if take_in(&mut set, change) {
            tracing::info!(seq = change.seq, "identity denials updated");
        }
    }

    /// Counts a call refused because `id` is denied, and audits it (as a
    /// denial with reason `identity_denied`) within [`DENIED_AUDITS`].
    pub async fn refuse_denied(&self, id: &SpiffeId, call: Call) {
        self.metrics.denied_calls.inc(&[call.as_str()]);
        tracing::warn!(caller = %id, call = call.as_str(), "refused a denied identity");
        if self
            .denied_audits
            .take(id, DENIED_AUDITS, self.clock.now_ms())
            .is_err()
        {
            return;
        }
        self.audit(
            AuditEvent::new(call.audit_kind(), Outcome::Denied, self.clock.now())
                .actor(id)
                .field("spiffe_id", id.as_str())
                .field("call", call.as_str())
                .field("reason", "identity_denied"),
        )
        .await;
    }

    /// Denies `id` (see [`super::denials`]): committed to the change feed
    /// before this returns, in force on this replica at once, then
    /// audited (`identity.deny`) with `actor` and `reason`. A repeated
    /// deny is recorded again (another replica may have allowed it
    /// meanwhile: the feed's order decides).
    ///
    /// # Errors
    /// [`DenyError`].
    pub async fn deny_identity(
        &self,
        id: &SpiffeId,
        reason: &str,
        actor: &SpiffeId,
    ) -> Result<DenialChange, DenyError> {
        if self.is_admin(id) {
            return Err(DenyError::Admin(id.clone()));
        }
        if id.path() == super::BROKER_PATH {
            return Err(DenyError::Broker(id.clone()));
        }
        self.record_denial(id, true, reason, actor).await
    }

    /// Lifts a denial of `id`, the same way (`identity.allow`). Allowing
    /// an identity that is not denied records that too, harmlessly.
    ///
    /// # Errors
    /// [`DenyError`].
    pub async fn allow_identity(
        &self,
        id: &SpiffeId,
        reason: &str,
        actor: &SpiffeId,
    ) -> Result<DenialChange, DenyError> {
        self.record_denial(id, false, reason, actor).await
    }

    async fn record_denial(
        &self,
        id: &SpiffeId,
        denied: bool,
        reason: &str,
        actor: &SpiffeId,
    ) -> Result<DenialChange, DenyError> {
        if id.trust_domain() != self.settings.trust_domain.trust_domain() || id.path().is_empty() {
            return Err(DenyError::NotAWorkload {
                id: id.clone(),
                trust_domain: self.settings.trust_domain.clone(),
            });
        }
        let now = self.clock.now();
        let entry = Denial {
            spiffe_id: id.clone(),
            denied,
            reason: crate::auth::answer::safe_description(reason)
                .chars()
                .take(crate::identity::denial::MAX_REASON)
                .collect(),
            actor: actor.to_string(),
            at: now,
        };
        let was_denied = self.is_denied(id);
        let body = entry.to_json();
        let seq = self
            .store
            .append_change("denial", &body, now.saturating_mul(1000))
            .await?;
        // In force here before Watch streams wake: the denied workload's
        // own stream sees it and ends.
        self.take_in_denial(&Change {
            seq,
            at_ms: now.saturating_mul(1000),
            kind: "denial".into(),
            body,
        });
        self.feed_advanced(seq);
        let kind = if denied {
            AuditKind::IdentityDeny
        } else {
            AuditKind::IdentityAllow
        };
        self.audit(
            AuditEvent::new(kind, Outcome::Ok, now)
                .actor(actor)
                .field("spiffe_id", id.as_str())
                .field("reason", entry.reason.as_str())
                .field("was_denied", was_denied)
                .field("sequence", seq),
        )
        .await;
        if denied {
            tracing::warn!(spiffe_id = %id, admin = %actor, sequence = seq, "identity denied");
        } else {
            tracing::info!(spiffe_id = %id, admin = %actor, sequence = seq, "identity allowed again");
        }
        Ok(DenialChange {
            sequence: seq,
            was_denied,
            at: now,
        })
    }
}
