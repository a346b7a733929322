//! The outbound proxy's connections to mesh destinations: mutual TLS with
//! this sidecar's SVID, HTTP/2, one pooled connection per (address,
//! workload) that every concurrent request to it shares.
//!
//! A connection is made again when
//! - it closed or failed, or the server sent GOAWAY (hyper marks it
//!   closed once the connection ends);
//! - [`MeshTls::current`] returns other credentials than the ones it was
//!   made with: this sidecar's SVID was renewed (or the bundle changed),
//!   and the destination should see the new certificate;
//! - it has been idle for the pool's idle time (it is dropped then, and
//!   closes once its last request is done).
//!
//! Dialling holds the destination's slot, so requests arriving together
//! wait for the one handshake instead of each making their own. A server
//! that does not prove the expected SPIFFE ID fails the handshake
//! ([`DialError::NotProven`]) before a single byte of a request is
//! written: nothing leaves for an impostor.

use super::mtls::{MeshCredentials, MeshTls, MtlsError};
use super::proxy::ProxyBody;
use crate::identity::SpiffeId;
use crate::jose::Jkt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{TrySendError, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::time::Instant;

/// Why no connection to a mesh destination could be had.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// This sidecar's own TLS settings cannot be made (its SVID or the
    /// bundle does not load): nothing can be dialled.
    #[error("this sidecar's TLS settings: {0}")]
    Credentials(#[from] MtlsError),
    /// No TCP connection to the address.
    #[error("connecting to {authority}: {reason}")]
    Unreachable {
        /// `host:port` dialled.
        authority: String,
        /// The socket error.
        reason: String,
    },
    /// The TLS handshake failed: whatever answers at the address did not
    /// prove it is the workload (another workload's SVID, a foreign CA, a
    /// self-signed certificate, a plaintext listener…).
    #[error("the destination at {authority} did not prove it is {expected}: {reason}")]
    NotProven {
        /// `host:port` dialled.
        authority: String,
        /// The SPIFFE ID it had to prove.
        expected: SpiffeId,
        /// The handshake's error.
        reason: String,
    },
    /// TLS succeeded but HTTP/2 did not start.
    #[error("HTTP/2 with {authority}: {reason}")]
    Http2 {
        /// `host:port` dialled.
        authority: String,
        /// hyper's error.
        reason: String,
    },
    /// Connecting and the handshake took longer than the timeout.
    #[error("connecting to {authority} took longer than {timeout:?}")]
    Timeout {
        /// `host:port` dialled.
        authority: String,
        /// The limit.
        timeout: Duration,
    },
}

/// Where a pooled connection goes: the address, and the workload that
/// must answer there.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    authority: String,
    server: SpiffeId,
}

/// One pooled connection.
struct Conn {
    id: u64,
    sender: http2::SendRequest<ProxyBody>,
    credentials: Arc<MeshCredentials>,
    last_used: Arc<Mutex<Instant>>,
}

type Slot = Arc<tokio::sync::Mutex<Option<Conn>>>;

/// The pool of mesh connections. Share it behind an `Arc`.
pub struct MeshClient {
    tls: Arc<MeshTls>,
    connect_timeout: Duration,
    idle: Duration,
    slots: Mutex<HashMap<Key, Slot>>,
    next_id: AtomicU64,
    /// Connections made (for the admin port and tests).
    dialled: AtomicU64,
}

impl std::fmt::Debug for MeshClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshClient")
            .field("idle", &self.idle)
            .finish_non_exhaustive()
    }
}

/// A pooled connection lent for one request, with the credentials it was
/// made with.
pub struct Lease {
    sender: http2::SendRequest<ProxyBody>,
    credentials: Arc<MeshCredentials>,
    last_used: Arc<Mutex<Instant>>,
    fresh: bool,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("credentials", &self.credentials)
            .field("fresh", &self.fresh)
            .finish_non_exhaustive()
    }
}

impl Lease {
    /// The thumbprint of the key this connection's client certificate
    /// holds: a token bound to it needs no per-request proof here.
    pub fn jkt(&self) -> &Jkt {
        self.credentials.jkt()
    }

    /// Whether the connection was made for this request (not reused).
    pub fn fresh(&self) -> bool {
        self.fresh
    }

    /// Sends `request` (its URI absolute, `https://authority/path`).
    ///
    /// # Errors
    /// hyper's, with the request handed back when it was never written
    /// (the connection had closed meanwhile): it may be sent again.
    pub async fn send(
        &mut self,
        request: Request<ProxyBody>,
    ) -> Result<Response<Incoming>, TrySendError<Request<ProxyBody>>> {
        self.sender.try_send_request(request).await
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        *lock(&self.last_used) = Instant::now();
    }
}

impl MeshClient {
    /// A pool dialling with `tls`'s current credentials, each dial
    /// (TCP and handshake) within `connect_timeout`, dropping connections
    /// idle for `idle`.
    pub fn new(tls: Arc<MeshTls>, connect_timeout: Duration, idle: Duration) -> Arc<Self> {
        Arc::new(Self {
            tls,
            connect_timeout,
            idle,
            slots: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(0),
            dialled: AtomicU64::new(0),
        })
    }

    /// How many connections this pool has made.
    pub fn dialled(&self) -> u64 {
        self.dialled.load(Ordering::Relaxed)
    }

    /// A connection to the workload `server` at `authority` (`host:port`):
    /// the pooled one while it is open and made with the current
    /// credentials, else a new one.
    ///
    /// # Errors
    /// [`DialError`]; nothing was sent.
    pub async fn lease(
        self: &Arc<Self>,
        authority: &str,
        server: &SpiffeId,
    ) -> Result<Lease, DialError> {
        let key = Key {
            authority: authority.to_owned(),
            server: server.clone(),
        };
        let slot = Arc::clone(
            lock(&self.slots)
                .entry(key.clone())
                .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(None))),
        );
        let mut held = slot.lock().await;
        let credentials = self.tls.current()?;
        if let Some(conn) = held.as_ref()
            && !conn.sender.is_closed()
            && Arc::ptr_eq(&conn.credentials, &credentials)
        {
            return Ok(Lease {
                sender: conn.sender.clone(),
                credentials,
                last_used: Arc::clone(&conn.last_used),
                fresh: false,
            });
        }
        // Closed, or made with an SVID that has been renewed since: the
        // old connection ends once its requests in flight are done.
        *held = None;
        let (sender, connection) =
            tokio::time::timeout(self.connect_timeout, self.dial(&key, &credentials))
                .await
                .map_err(|_| DialError::Timeout {
                    authority: key.authority.clone(),
                    timeout: self.connect_timeout,
                })??;
        self.dialled.fetch_add(1, Ordering::Relaxed);
        let conn = Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            sender,
            credentials,
            last_used: Arc::new(Mutex::new(Instant::now())),
        };
        tokio::spawn(drive(
            connection,
            Arc::downgrade(self),
            key,
            Arc::downgrade(&slot),
            conn.id,
            Arc::clone(&conn.last_used),
        ));
        let lease = Lease {
            sender: conn.sender.clone(),
            credentials: Arc::clone(&conn.credentials),
            last_used: Arc::clone(&conn.last_used),
            fresh: true,
        };
        *held = Some(conn);
        Ok(lease)
    }

    /// TCP, TLS accepting only `key.server`, then HTTP/2.
    async fn dial(
        &self,
        key: &Key,
        credentials: &MeshCredentials,
    ) -> Result<(http2::SendRequest<ProxyBody>, Driver), DialError> {
        let config = credentials.client_config(&key.server)?;
        let tcp = tokio::net::TcpStream::connect(&key.authority)
            .await
            .map_err(|e| DialError::Unreachable {
                authority: key.authority.clone(),
                reason: e.to_string(),
            })?;
        let _ = tcp.set_nodelay(true);
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(server_name(&key.authority), tcp)
            .await
            .map_err(|e| DialError::NotProven {
                authority: key.authority.clone(),
                expected: key.server.clone(),
                reason: e.to_string(),
            })?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|e| DialError::Http2 {
                authority: key.authority.clone(),
                reason: e.to_string(),
            })?;
        Ok((sender, connection))
    }

    /// Empties `slot` if it still holds connection `id`, and forgets the
    /// slot when no request is using it.
    async fn release(&self, key: &Key, slot: &Weak<tokio::sync::Mutex<Option<Conn>>>, id: u64) {
        let Some(slot) = slot.upgrade() else { return };
        {
            let mut held = slot.lock().await;
            if held.as_ref().is_some_and(|c| c.id == id) {
                *held = None;
            }
        }
        let mut slots = lock(&self.slots);
        let unused = slots
            .get(key)
            .is_some_and(|s| Arc::ptr_eq(s, &slot) && Arc::strong_count(s) == 2);
        if unused && slot.try_lock().is_ok_and(|held| held.is_none()) {
            slots.remove(key);
        }
    }
}

/// The HTTP/2 connection future hyper hands back.
type Driver = http2::Connection<
    TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
    ProxyBody,
    TokioExecutor,
>;

/// Runs a connection until it ends, or until it has been idle for the
/// pool's idle time (then it leaves the pool and ends when its last
/// request is done: hyper closes an HTTP/2 connection whose senders are
/// all gone).
async fn drive(
    connection: Driver,
    pool: Weak<MeshClient>,
    key: Key,
    slot: Weak<tokio::sync::Mutex<Option<Conn>>>,
    id: u64,
    last_used: Arc<Mutex<Instant>>,
) {
    let mut connection = std::pin::pin!(connection);
    let idle = pool.upgrade().map_or(Duration::ZERO, |p| p.idle);
    loop {
        let deadline = *lock(&last_used) + idle;
        tokio::select! {
            ended = &mut connection => {
                if let Err(e) = ended {
                    tracing::debug!(authority = %key.authority, error = %e, "mesh connection failed");
                }
                if let Some(pool) = pool.upgrade() {
                    pool.release(&key, &slot, id).await;
                }
                return;
            }
            () = tokio::time::sleep_until(deadline) => {
                if *lock(&last_used) + idle <= Instant::now() {
                    break;
                }
            }
        }
    }
    tracing::debug!(authority = %key.authority, "closing an idle mesh connection");
    if let Some(pool) = pool.upgrade() {
        pool.release(&key, &slot, id).await;
    }
    if let Err(e) = connection.await {
        tracing::debug!(authority = %key.authority, error = %e, "mesh connection failed");
    }
}

/// The name sent as SNI: the host dialled (the server is checked by its
/// SVID, not by this name). An address is sent as no name at all.
fn server_name(authority: &str) -> ServerName<'static> {
    let host = authority
        .rsplit_once(':')
        .map_or(authority, |(host, _)| host)
        .trim_start_matches('[')
        .trim_end_matches(']');
    ServerName::try_from(host.to_owned()).unwrap_or_else(|_| {
        // Not a name rustls takes (too long a label, say): a
        // fixed name, since SNI only helps a server pick a certificate.
        ServerName::try_from("tally.mesh").unwrap_or_else(|_| unreachable!("a valid DNS name"))
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sni_name_is_the_host_dialled() {
        let dns = |a: &str| match server_name(a) {
            ServerName::DnsName(name) => name.as_ref().to_owned(),
            other => panic!("{other:?}"),
        };
        assert_eq!(dns("payments.svc:8080"), "payments.svc");
        assert_eq!(dns("under_score:80"), "under_score");
        let ip = |a: &str| match server_name(a) {
            ServerName::IpAddress(ip) => std::net::IpAddr::from(ip),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            ip("127.0.0.1:15006"),
            std::net::IpAddr::from([127, 0, 0, 1])
        );
        assert_eq!(
            ip("[::1]:15006"),
            "::1".parse::<std::net::IpAddr>().unwrap()
        );
    }
}
