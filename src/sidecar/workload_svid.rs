//! The X.509-SVID the sidecar hands its workload through the SPIFFE
//! Workload API. It names the same SPIFFE ID as the sidecar's own SVID but
//! has a key made for the workload: the sidecar's own key signs DPoP
//! proofs and is the mesh TLS identity, and never leaves the sidecar.
//!
//! It is asked for over mTLS with the sidecar's own SVID
//! (`Identity.IssueWorkloadSvid`), again whenever that SVID is renewed
//! (the broker caps the workload SVID at the sidecar's expiry, so each
//! renewal also extends the workload's) and at half its own life, retrying
//! with backoff while the broker is away.

use super::identity::{IdentityClient, Svid, backoff, renew_at};
use super::jitter::random_unit;
use crate::clock::Clock;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// Keeps `out` holding a current workload SVID for the identity in
/// `own`, until every receiver of `out` is gone.
pub async fn keep_workload_svid(
    client: IdentityClient,
    clock: Arc<dyn Clock>,
    mut own: watch::Receiver<Arc<Svid>>,
    out: watch::Sender<Option<Arc<Svid>>>,
) {
    let mut attempt: u32 = 0;
    loop {
        let current = Arc::clone(&own.borrow_and_update());
        let now = clock.now();
        let wait = if now >= current.expires_at {
            // Nothing to ask with until the sidecar's own SVID is renewed.
            None
        } else {
            match client.workload_svid(&current, now).await {
                Ok(svid) => {
                    attempt = 0;
                    tracing::info!(spiffe_id = %svid.spiffe_id, expires_at = svid.expires_at, "obtained the workload's X.509-SVID");
                    let due = renew_at(svid.issued_at, svid.expires_at, random_unit());
                    if out.send(Some(Arc::new(svid))).is_err() {
                        return;
                    }
                    Some(Duration::from_secs(due.saturating_sub(now).max(1)))
                }
                Err(e) => {
                    let wait = backoff(attempt, random_unit());
                    attempt = attempt.saturating_add(1);
                    tracing::warn!(error = %e, retry_in = ?wait, "getting the workload's X.509-SVID failed");
                    Some(wait)
                }
            }
        };
        let sleep = async {
            match wait {
                Some(wait) => tokio::time::sleep(wait).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => {}
            changed = own.changed() => {
                if changed.is_err() {
                    return;
                }
                attempt = 0;
            }
            () = out.closed() => return,
        }
    }
}
