//! How long a TLS connection to the inbound port lives.
//!
//! - A mesh peer (a verified client SVID) whose identity an admin denies,
//!   or whose tokens a revocation covers by holder, key or "everything"
//!   as of the connection's opening, is cut off at once: the connection
//!   is closed with whatever is in flight (its requests would be refused
//!   anyway, and a tunnel it opened goes with it).
//! - When this sidecar's SVID is renewed, or the peer's SVID expires, the
//!   connection is closed gracefully (HTTP/2 `GOAWAY`): requests in
//!   flight finish, and the peer reconnects with what is current.
//!
//! Plaintext connections are left to the listener's timeouts.

use super::mtls::{InboundMtls, MeshTls};
use super::watch::MeshState;
use crate::clock::Clock;
use crate::http::{Close, Closer, Peer, TlsSource};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// The inbound port's TLS settings, current at each handshake; none (the
/// TLS connection is closed) when the SVID or bundle do not load.
pub fn tls_source(tls: Arc<MeshTls>, mode: InboundMtls) -> TlsSource {
    Arc::new(move || match tls.current() {
        Ok(credentials) => Some(credentials.server_config(mode)),
        Err(e) => {
            tracing::error!(error = %e, "cannot serve mutual TLS on the inbound port");
            None
        }
    })
}

/// Ends TLS connections as the module doc says.
pub fn closer(
    tls: Arc<MeshTls>,
    mesh: watch::Receiver<MeshState>,
    clock: Arc<dyn Clock>,
) -> Closer {
    Arc::new(move |peer: &Peer| {
        if !peer.tls {
            return None;
        }
        let mut own = tls.svid_updates();
        own.borrow_and_update();
        let mut mesh = mesh.clone();
        let identity = peer.identity.clone();
        let opened = clock.now();
        let expires_in = identity
            .as_ref()
            .map(|p| Duration::from_secs(p.expires_at.saturating_sub(opened)));
        Some(Box::pin(async move {
            let expired = async {
                match expires_in {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expired);
            loop {
                if let Some(p) = &identity {
                    let m = mesh.borrow_and_update();
                    let why = if m.denied.is_denied(&p.spiffe_id) {
                        Some("its identity was denied")
                    } else if m.revocations.covers_holder(&p.spiffe_id, &p.jkt, opened) {
                        Some("a revocation covers its holder")
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        tracing::info!(peer = %p.spiffe_id, why, "closed a mesh connection");
                        return Close::Now;
                    }
                }
                tokio::select! {
                    changed = mesh.changed() => if changed.is_err() {
                        return std::future::pending().await;
                    },
                    changed = own.changed() => {
                        if changed.is_ok() {
                            tracing::debug!("this sidecar's SVID was renewed: closing a TLS connection gracefully");
                            return Close::Gracefully;
                        }
                        return std::future::pending().await;
                    }
                    () = &mut expired => {
                        tracing::debug!("the peer's SVID expired: closing its connection gracefully");
                        return Close::Gracefully;
                    }
                }
            }
        })
            as std::pin::Pin<
                Box<dyn std::future::Future<Output = Close> + Send>,
            >)
    })
}
