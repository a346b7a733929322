//! The sidecar's X.509 identity: attest once (join token or Kubernetes
//! ServiceAccount token), then renew at half the SVID's life (±10% of the
//! life, jittered) with a new key each time, retrying with capped
//! exponential backoff while the broker is unreachable, and keeping the
//! current SVID until it expires.
//!
//! Keys are generated in memory and never written anywhere. The timing
//! maths ([`renew_at`], [`backoff`]) is pure and takes its randomness as an
//! argument.

use super::jitter::random_unit;
use crate::identity::SpiffeId;
use crate::proto::v1 as pb;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use zeroize::Zeroizing;

/// How the sidecar proves who it is the first time.
#[derive(Clone)]
pub enum Attestation {
    /// A one-time join token.
    JoinToken(Zeroizing<String>),
    /// A projected ServiceAccount token, read from this file at each
    /// attestation (the kubelet rotates it).
    ServiceAccountTokenFile(PathBuf),
}

impl std::fmt::Debug for Attestation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::JoinToken(_) => f.write_str("JoinToken(<redacted>)"),
            Self::ServiceAccountTokenFile(p) => {
                f.debug_tuple("ServiceAccountTokenFile").field(p).finish()
            }
        }
    }
}

/// An X.509-SVID with its key (the key never leaves the process).
#[derive(Clone)]
pub struct Svid {
    /// Whom it names.
    pub spiffe_id: SpiffeId,
    /// Leaf then intermediates, PEM.
    pub chain_pem: String,
    /// The private key, PEM.
    pub key_pem: Zeroizing<String>,
    /// The trust bundle that came with it, PEM.
    pub bundle_pem: String,
    /// When it was obtained (Unix seconds).
    pub issued_at: u64,
    /// When it expires (Unix seconds).
    pub expires_at: u64,
    /// The broker's token issuer URL (for the Tokens.Issue proof's htu).
    pub issuer: String,
}

impl Svid {
    /// The DPoP `htu` for `Tokens.Issue` at the broker that issued this.
    pub fn issue_htu(&self) -> String {
        format!(
            "{}/tally.v1.Tokens/Issue",
            self.issuer.trim_end_matches('/')
        )
    }
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("spiffe_id", &self.spiffe_id)
            .field("expires_at", &self.expires_at)
            .field("key_pem", &"<redacted>")
            .finish_non_exhaustive()
    }
}

/// Why attestation or renewal failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IdentityError {
    /// The broker could not be reached (retry).
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    /// The broker refused (a bad or used join token, a policy problem):
    /// retrying the same thing will not help.
    #[error("the broker refused: {0}")]
    Refused(String),
    /// The broker's certificate does not verify with the trust bundle, or
    /// is not for the host dialled: a configuration error, which retrying
    /// will not fix.
    #[error("{0}")]
    Untrusted(crate::rpc::ConnectFailure),
    /// Local trouble: key generation, a token file, a bad answer.
    #[error("{0}")]
    Local(String),
}

/// When to renew an SVID valid from `issued_at` to `expires_at`: at half
/// its life, moved by up to ±10% of the life (`unit` in [0, 1) picks
/// where).
pub fn renew_at(issued_at: u64, expires_at: u64, unit: f64) -> u64 {
    let life = expires_at.saturating_sub(issued_at);
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "a lifetime in seconds, far below 2^52; the result is clamped"
    )]
    let offset = (life as f64 * (0.5 + (unit.clamp(0.0, 1.0) * 2.0 - 1.0) * 0.1)).round() as u64;
    issued_at + offset.min(life)
}

/// The wait before retry `attempt` (0-based): 1 s doubling to a 30 s cap,
/// then scaled into [50%, 100%] by `unit` so retries spread out.
pub fn backoff(attempt: u32, unit: f64) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(5)).min(Duration::from_secs(30));
    base.mul_f64(0.5 + unit.clamp(0.0, 1.0) * 0.5)
}

/// Talks to the broker's Identity service.
#[derive(Debug, Clone)]
pub struct IdentityClient {
    broker: String,
    bundle_pem: String,
}

impl IdentityClient {
    /// A client for the broker at `broker` (`https://host:port`), trusting
    /// `bundle_pem` for the broker's certificate.
    pub fn new(broker: impl Into<String>, bundle_pem: impl Into<String>) -> Self {
        Self {
            broker: broker.into(),
            bundle_pem: bundle_pem.into(),
        }
    }

    fn tls(&self, identity: Option<Identity>) -> Result<ClientTlsConfig, IdentityError> {
        let endpoint = tonic::transport::Endpoint::from_shared(self.broker.clone())
            .map_err(|e| IdentityError::Local(format!("broker URL {:?}: {e}", self.broker)))?;
        let host = endpoint.uri().host().unwrap_or("localhost").to_owned();
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.bundle_pem))
            .domain_name(host);
        if let Some(identity) = identity {
            tls = tls.identity(identity);
        }
        Ok(tls)
    }

    /// A channel to the broker authenticated with `svid` (connects on
    /// first use, reconnects as needed).
    ///
    /// # Errors
    /// [`IdentityError::Local`] for a bad URL or TLS settings.
    pub fn channel(&self, svid: &Svid) -> Result<Channel, IdentityError> {
        let identity = Identity::from_pem(&svid.chain_pem, svid.key_pem.as_bytes());
        Ok(Channel::from_shared(self.broker.clone())
            .map_err(|e| IdentityError::Local(format!("broker URL: {e}")))?
            .tls_config(self.tls(Some(identity))?)
            .map_err(|e| IdentityError::Local(format!("TLS settings: {e}")))?
            .connect_lazy())
    }

    async fn connect(&self, identity: Option<Identity>) -> Result<Channel, IdentityError> {
        Channel::from_shared(self.broker.clone())
            .map_err(|e| IdentityError::Local(format!("broker URL: {e}")))?
            .tls_config(self.tls(identity)?)
            .map_err(|e| IdentityError::Local(format!("TLS settings: {e}")))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| match crate::rpc::ConnectFailure::of(&e) {
                crate::rpc::ConnectFailure::Unreachable(why) => IdentityError::Unreachable(why),
                untrusted => IdentityError::Untrusted(untrusted),
            })
    }

    /// First contact: proves the identity with `how` and gets an SVID for a
    /// new key.
    ///
    /// # Errors
    /// [`IdentityError`].
    pub async fn attest(&self, how: &Attestation, now: u64) -> Result<Svid, IdentityError> {
        let credential = match how {
            Attestation::JoinToken(t) => pb::attest_request::Credential::JoinToken(t.to_string()),
            Attestation::ServiceAccountTokenFile(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    IdentityError::Local(format!("ServiceAccount token {}: {e}", path.display()))
                })?;
                pb::attest_request::Credential::ServiceAccountToken(text.trim().to_owned())
            }
        };
        let (key, csr) = new_key_and_csr()?;
        let mut client = pb::identity_client::IdentityClient::new(self.connect(None).await?);
        let reply = client
            .attest(pb::AttestRequest {
                credential: Some(credential),
                csr_der: csr,
            })
            .await
            .map_err(status_error)?
            .into_inner();
        svid_from(reply, key, now)
    }

    /// Renews `current` (mTLS with it) for a new key.
    ///
    /// # Errors
    /// [`IdentityError`].
    pub async fn renew(&self, current: &Svid, now: u64) -> Result<Svid, IdentityError> {
        let identity = Identity::from_pem(&current.chain_pem, current.key_pem.as_bytes());
        let (key, csr) = new_key_and_csr()?;
        let mut client =
            pb::identity_client::IdentityClient::new(self.connect(Some(identity)).await?);
        let reply = client
            .renew(pb::RenewRequest { csr_der: csr })
            .await
            .map_err(status_error)?
            .into_inner();
        svid_from(reply, key, now)
    }

    /// Gets an X.509-SVID for `current`'s identity (mTLS with it) to a new
    /// key made for the workload: what the SPIFFE Workload API hands out,
    /// so the sidecar's own key, which signs DPoP proofs, never leaves it.
    /// The broker caps it at `current`'s expiry.
    ///
    /// # Errors
    /// [`IdentityError`].
    pub async fn workload_svid(&self, current: &Svid, now: u64) -> Result<Svid, IdentityError> {
        let identity = Identity::from_pem(&current.chain_pem, current.key_pem.as_bytes());
        let (key, csr) = new_key_and_csr()?;
        let mut client =
            pb::identity_client::IdentityClient::new(self.connect(Some(identity)).await?);
        let reply = client
            .issue_workload_svid(pb::WorkloadSvidRequest { csr_der: csr })
            .await
            .map_err(status_error)?
            .into_inner();
        let svid = svid_from(reply, key, now)?;
        if svid.spiffe_id != current.spiffe_id {
            return Err(IdentityError::Local(format!(
                "the broker sent a workload SVID for {}, not {}",
                svid.spiffe_id, current.spiffe_id
            )));
        }
        Ok(svid)
    }
}

fn status_error(status: tonic::Status) -> IdentityError {
    let text = crate::rpc::refusal_text(&status);
    if crate::rpc::is_transient(status.code()) {
        IdentityError::Unreachable(text)
    } else {
        IdentityError::Refused(text)
    }
}

fn new_key_and_csr() -> Result<(rcgen::KeyPair, Vec<u8>), IdentityError> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| IdentityError::Local(format!("generating a key: {e}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| IdentityError::Local(format!("making a CSR: {e}")))?
        .der()
        .to_vec();
    Ok((key, csr))
}

fn svid_from(
    reply: pb::SvidResponse,
    key: rcgen::KeyPair,
    now: u64,
) -> Result<Svid, IdentityError> {
    let spiffe_id = reply
        .spiffe_id
        .parse()
        .map_err(|e| IdentityError::Local(format!("the broker sent a bad SPIFFE ID: {e}")))?;
    let pem = |d: &Vec<u8>| crate::ca::pem("CERTIFICATE", d);
    Ok(Svid {
        spiffe_id,
        chain_pem: std::iter::once(&reply.svid_der)
            .chain(&reply.chain_der)
            .map(pem)
            .collect(),
        key_pem: Zeroizing::new(key.serialize_pem()),
        bundle_pem: reply.bundle_der.iter().map(pem).collect(),
        issued_at: now,
        expires_at: u64::try_from(reply.expires_at).unwrap_or(0),
        issuer: reply.issuer,
    })
}

/// Keeps an SVID current: renews at [`renew_at`], retries with
/// [`backoff`] while the broker is unreachable, publishes each new SVID on
/// the returned channel. If the SVID expires unrenewed (the broker was
/// away longer than its life), attests again with `reattest` when given (a
/// ServiceAccount token file, which the kubelet keeps fresh), retrying
/// with backoff; without it (a join token is single-use) it stops, and the
/// channel holds the expired SVID, which readiness checks see. Stops when
/// every receiver is gone.
pub async fn keep_renewed(
    client: IdentityClient,
    clock: Arc<dyn crate::clock::Clock>,
    updates: tokio::sync::watch::Sender<Arc<Svid>>,
    reattest: Option<Attestation>,
) {
    let mut attempt = 0;
    loop {
        let current = Arc::clone(&updates.borrow());
        let now = clock.now();
        let due = renew_at(current.issued_at, current.expires_at, random_unit());
        if due > now && attempt == 0 {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_secs(due - now)) => {}
                () = updates.closed() => return,
            }
        }
        let now = clock.now();
        let expired = now >= current.expires_at;
        if expired && reattest.is_none() {
            tracing::error!(spiffe_id = %current.spiffe_id, "the X.509-SVID expired before it could be renewed; restart the sidecar with a new join token");
            return;
        }
        // A ServiceAccount token proves the identity afresh at every
        // renewal (the kubelet keeps the file current), so a broker doing
        // TokenReview sees the pod still there each time; a join token is
        // spent, so its SVID is renewed by mTLS.
        let next = match &reattest {
            Some(how) => {
                if expired {
                    tracing::warn!(spiffe_id = %current.spiffe_id, "the X.509-SVID expired before it could be renewed; attesting again");
                }
                client.attest(how, now).await
            }
            None => client.renew(&current, now).await,
        };
        match next {
            Ok(next) => {
                attempt = 0;
                tracing::info!(spiffe_id = %next.spiffe_id, expires_at = next.expires_at, "renewed the X.509-SVID");
                if updates.send(Arc::new(next)).is_err() {
                    return;
                }
            }
            Err(e) => {
                // Before expiry, never wait past it; after, plain backoff.
                let left = current.expires_at.saturating_sub(now).max(1);
                let wait = if expired {
                    backoff(attempt, random_unit())
                } else {
                    backoff(attempt, random_unit()).min(Duration::from_secs(left))
                };
                attempt = attempt.saturating_add(1);
                tracing::warn!(error = %e, retry_in = ?wait, expires_at = current.expires_at, "renewing the X.509-SVID failed; keeping the current one");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = updates.closed() => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_falls_between_forty_and_sixty_percent_of_the_life() {
        assert_eq!(renew_at(1000, 4600, 0.5), 1000 + 1800);
        assert_eq!(renew_at(1000, 4600, 0.0), 1000 + 1440);
        assert_eq!(renew_at(1000, 4600, 0.999_999), 1000 + 2160);
        assert_eq!(renew_at(1000, 1000, 0.3), 1000, "no life: renew now");
    }

    #[test]
    fn backoff_doubles_to_a_cap_and_spreads() {
        assert_eq!(backoff(0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(0, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(3, 1.0), Duration::from_secs(8));
        assert_eq!(backoff(10, 1.0), Duration::from_secs(30));
        assert_eq!(backoff(u32::MAX, 0.0), Duration::from_secs(15));
    }

    #[test]
    fn debug_output_hides_keys_and_tokens() {
        let a = Attestation::JoinToken(Zeroizing::new("tally-jt-secret".into()));
        assert!(!format!("{a:?}").contains("secret"));
    }
}
