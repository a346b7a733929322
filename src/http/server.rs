//! The accept loop and connection handling every listener shares, built
//! for a hostile network:
//!
//! - an accept error that concerns the process (`EMFILE`, `ENFILE`,
//!   `ENOBUFS`, `ENOMEM`) is back-pressure: logged at most once a second,
//!   the loop backs off (5 ms doubling to 1 s) and keeps accepting, and the
//!   listener reports itself failing (metrics, `/readyz`) until an accept
//!   succeeds again; nothing ends the server but its shutdown future;
//! - at most [`Limits::max_connections`] connections at once; one more is
//!   accepted and closed at once (counted), so the kernel's backlog never
//!   fills with clients nobody will serve;
//! - a connection must finish its TLS handshake and its first request head
//!   within [`Limits::header_timeout`] of being accepted (this is the
//!   first-byte timeout too: a client that sends nothing, or only an
//!   HTTP/2 preface, is closed then); an HTTP/1.1 request head after the
//!   first has the same bound from its first byte;
//! - a connection with no request in flight for [`Limits::idle_timeout`]
//!   is closed gracefully (HTTP/2 `GOAWAY`), then dropped if it does not go.
//!   A request counts as in flight until its whole response has been sent,
//!   so a long response stream (the broker's Watch) keeps its connection;
//!   but a response whose data the peer does not take for the idle timeout
//!   (a zero HTTP/2 window, an unread socket) ends the connection too;
//!   HTTP/2 connections are pinged every 30 s while streams are open, and
//!   closed when a ping goes unanswered for 10 s.
//!
//! Upgraded connections (CONNECT tunnels, WebSockets) leave this loop's
//! care once upgraded: their owners bound them.

use super::listener::ListenerStats;
use super::{MAX_HEADER_BYTES, Peer, ResponseBody};
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::time::Instant;

/// What every connection on a listener is allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// From accept to the end of the first request head (TLS handshake
    /// included); also each later HTTP/1.1 request head.
    pub header_timeout: Duration,
    /// Longest time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Most connections open at once on this listener.
    pub max_connections: usize,
}

impl Default for Limits {
    /// 10 s for a request head, 60 s idle, 1,024 connections: a client
    /// on a mesh network sends its request head in milliseconds, keep-alive
    /// pools (hyper, Go, Envoy) reuse or drop idle connections well within
    /// a minute, and 1,024 leaves room under the usual 4,096+ descriptor
    /// limit of a pod for the upstream side of every connection.
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// The TLS settings of a port that serves TLS and plaintext side by side,
/// asked for each TLS connection (`None`: none can be made now, and the
/// connection is closed: failing closed).
pub type TlsSource = Arc<dyn Fn() -> Option<Arc<rustls::ServerConfig>> + Send + Sync>;

/// For a new connection, a future that resolves when it must end before
/// its time, and how (`None`: nothing ends it early).
pub type Closer =
    Arc<dyn Fn(&Peer) -> Option<Pin<Box<dyn Future<Output = Close> + Send>>> + Send + Sync>;

/// How a connection is ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// At once, requests in flight included (the peer lost its standing).
    Now,
    /// Like a shutdown: HTTP/2 `GOAWAY`, requests in flight finish (within
    /// the idle timeout), the peer reconnects (new credentials).
    Gracefully,
}

/// How a listener serves: TLS or not, its limits, where it counts, and
/// whether to learn the uid of a local TCP peer.
#[derive(Clone)]
pub struct Listen {
    tls: Option<tokio_rustls::TlsAcceptor>,
    sniff_tls: Option<TlsSource>,
    closer: Option<Closer>,
    limits: Limits,
    stats: Arc<ListenerStats>,
    peer_uid: bool,
    http2_only: bool,
}

impl std::fmt::Debug for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Listen")
            .field("listener", &self.stats.name())
            .field("tls", &self.tls.is_some())
            .field("tls_or_plaintext", &self.sniff_tls.is_some())
            .field("limits", &self.limits)
            .field("peer_uid", &self.peer_uid)
            .finish_non_exhaustive()
    }
}

impl Listen {
    /// Plain HTTP, default limits, counted as `name` (a metrics label).
    pub fn new(name: &'static str) -> Self {
        Self {
            tls: None,
            sniff_tls: None,
            closer: None,
            limits: Limits::default(),
            stats: Arc::new(ListenerStats::new(name)),
            peer_uid: false,
            http2_only: false,
        }
    }

    /// Serves TLS with `config`.
    #[must_use]
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(config));
        self
    }

    /// Serves TLS and plaintext on one port: a connection whose first byte
    /// is `0x16` (a TLS handshake record) gets TLS with the settings
    /// `source` gives then, any other plaintext HTTP. The handler tells
    /// them apart by [`Peer::tls`].
    #[must_use]
    pub fn tls_or_plaintext(mut self, source: TlsSource) -> Self {
        self.sniff_tls = Some(source);
        self
    }

    /// Ends a connection early when the future `closer` gives for its peer
    /// resolves (a revoked peer, a renewed certificate).
    #[must_use]
    pub fn close_when(mut self, closer: Closer) -> Self {
        self.closer = Some(closer);
        self
    }

    /// With these limits.
    #[must_use]
    pub fn limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// Looks up each TCP peer's uid in the kernel's socket table
    /// ([`super::peer_uid`]); it is found only for peers on this host.
    #[must_use]
    pub fn peer_uid(mut self) -> Self {
        self.peer_uid = true;
        self
    }

    /// Speaks only HTTP/2 (gRPC).
    #[must_use]
    pub fn http2_only(mut self) -> Self {
        self.http2_only = true;
        self
    }

    /// Where this listener counts connections and accept failures.
    pub fn stats(&self) -> &Arc<ListenerStats> {
        &self.stats
    }
}

/// Serves HTTP on a TCP `listener` as `listen` says until `shutdown`
/// resolves; then stops accepting, lets requests in flight finish, and
/// returns once every connection has closed.
///
/// # Errors
/// None today: accept failures are back-pressure, not the end. The
/// `Result` leaves room for a listener that truly cannot go on.
pub async fn serve<H, F, B>(
    listener: tokio::net::TcpListener,
    listen: Listen,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let listen_for_conn = listen.clone();
    let open = move |stream: tokio::net::TcpStream, addr: std::net::SocketAddr| {
        let listen = listen_for_conn.clone();
        async move {
            // Without TCP_NODELAY a response's last bytes wait for the
            // client's delayed ACK (about 40 ms).
            let _ = stream.set_nodelay(true);
            // The connection's own local address: a listener bound to
            // 0.0.0.0 or [::] has no single one. The table is read off the
            // runtime's threads.
            let uid = match (listen.peer_uid, stream.local_addr()) {
                (true, Ok(local)) => {
                    tokio::task::spawn_blocking(move || super::peer_uid::lookup(addr, local))
                        .await
                        .ok()
                        .flatten()
                }
                _ => None,
            };
            let mut peer = Peer::new(Some(addr), uid);
            let acceptor = match (&listen.tls, &listen.sniff_tls) {
                (Some(acceptor), _) => acceptor.clone(),
                (None, Some(source)) => {
                    // The handshake's first record is a TLS handshake
                    // (content type 22); HTTP starts with a letter. Peeking
                    // waits under the header timeout like any first byte.
                    let mut first = [0u8; 1];
                    match stream.peek(&mut first).await {
                        Ok(1) if first[0] == 0x16 => {}
                        Ok(1) => return Some((Box::new(stream) as Box<dyn Io>, peer)),
                        _ => return None,
                    }
                    tokio_rustls::TlsAcceptor::from(source()?)
                }
                (None, None) => return Some((Box::new(stream) as Box<dyn Io>, peer)),
            };
            match acceptor.accept(stream).await {
                Ok(tls) => {
                    peer.tls = true;
                    peer.certs = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
                    // Verified by the TLS layer against the trust bundle;
                    // a certificate that names no SPIFFE ID names no peer.
                    peer.identity = peer
                        .certs
                        .as_ref()
                        .and_then(|c| c.first())
                        .and_then(|leaf| crate::identity::PeerIdentity::of(leaf).ok());
                    Some((Box::new(tls) as Box<dyn Io>, peer))
                }
                Err(e) => {
                    tracing::debug!(%addr, error = %e, "TLS handshake failed");
                    None
                }
            }
        }
    };
    run(&listener, open, listen, handler, shutdown).await
}

/// Serves HTTP/1.1 and HTTP/2 on a Unix socket `listener` until
/// `shutdown` resolves, telling the handler each peer's uid
/// (`SO_PEERCRED`). TLS and `peer_uid` in `listen` do not apply.
///
/// # Errors
/// None today, as for [`serve`].
pub async fn serve_unix<H, F, B>(
    listener: tokio::net::UnixListener,
    listen: Listen,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let open = |stream: tokio::net::UnixStream, _: tokio::net::unix::SocketAddr| async move {
        let peer = Peer::new(None, stream.peer_cred().ok().map(|c| c.uid()));
        Some((Box::new(stream) as Box<dyn Io>, peer))
    };
    run(&listener, open, listen, handler, shutdown).await
}

/// A listener the loop can take connections from.
trait Acceptor {
    type Stream: Send + 'static;
    type Addr: Send + 'static;
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<(Self::Stream, Self::Addr)>>;
}

impl Acceptor for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    type Addr = std::net::SocketAddr;
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<(Self::Stream, Self::Addr)>> {
        tokio::net::TcpListener::poll_accept(self, cx)
    }
}

impl Acceptor for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    type Addr = tokio::net::unix::SocketAddr;
    fn poll_accept(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<(Self::Stream, Self::Addr)>> {
        tokio::net::UnixListener::poll_accept(self, cx)
    }
}

/// A connection's byte stream, whatever carries it.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T> Io for T where T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}

/// The accept loop: takes the next connection from `listener`; `open`
/// turns it into a byte stream and its [`Peer`] (TLS handshake, uid), or
/// `None` to drop it.
async fn run<L, O, OF, H, F, B>(
    listener: &L,
    open: O,
    listen: Listen,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    L: Acceptor,
    O: Fn(L::Stream, L::Addr) -> OF + Clone + Send + 'static,
    OF: Future<Output = Option<(Box<dyn Io>, Peer)>> + Send + 'static,
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let stats = Arc::clone(&listen.stats);
    let limits = listen.limits;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    // Every connection task holds a clone; when all are gone, every
    // connection has closed.
    let (open_conns, mut all_closed) = mpsc::channel::<()>(1);
    let (stopping, stop_rx) = watch::channel(false);
    let mut backoff = Duration::ZERO;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = std::future::poll_fn(|cx| listener.poll_accept(cx)) => accepted,
        };
        let (stream, extra) = match accepted {
            Ok(pair) => {
                backoff = Duration::ZERO;
                stats.accepting();
                pair
            }
            // The client went away between SYN and accept: not ours.
            Err(e) if is_per_connection(&e) => continue,
            Err(e) => {
                // Out of descriptors or memory: wait for some to free up,
                // and say so. Never a reason to stop serving.
                stats.accept_failed(&e);
                backoff = (backoff * 2).clamp(Duration::from_millis(5), Duration::from_secs(1));
                tokio::select! {
                    () = &mut shutdown => break,
                    () = tokio::time::sleep(backoff) => continue,
                }
            }
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            stats.refused_at_capacity(limits.max_connections);
            drop(stream);
            continue;
        };
        let open = open.clone();
        let handler = handler.clone();
        let listen = listen.clone();
        let stop_rx = stop_rx.clone();
        let open_conns = open_conns.clone();
        tokio::spawn(async move {
            let _closed_when_dropped = open_conns;
            let opened_at = Instant::now();
            let opened = tokio::time::timeout(limits.header_timeout, open(stream, extra)).await;
            let (io, peer) = match opened {
                Ok(Some(opened)) => opened,
                Ok(None) => return,
                // Silent past the header timeout before its first byte (or
                // in a TLS handshake): idle, as the same silence is after.
                Err(_) => {
                    listen.stats.closed_idle();
                    return;
                }
            };
            connection(io, peer, handler, &listen, opened_at, slot, stop_rx).await;
        });
    }
    let _ = stopping.send(true);
    drop(open_conns);
    let _ = all_closed.recv().await;
    Ok(())
}

/// One connection: HTTP/1.1 or HTTP/2 (by preface, or HTTP/2 only), until
/// it ends, idles past its limits, or the server stops.
async fn connection<H, F, B>(
    io: Box<dyn Io>,
    mut peer: Peer,
    handler: H,
    listen: &Listen,
    opened_at: Instant,
    slot: OwnedSemaphorePermit,
    mut stopping: watch::Receiver<bool>,
) where
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let limits = listen.limits;
    peer.hold = Some(Arc::new(Hold {
        _open: listen.stats.opened(slot),
        idle_timeout: limits.idle_timeout,
    }));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if listen.http2_only {
        builder = builder.http2_only();
    }
    // The header timeout is kept here ([`idle`]), not by hyper, whose
    // HTTP/1 timer also runs on an idle keep-alive connection and would
    // make the idle timeout the header timeout.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(10))
        .max_concurrent_streams(256)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let (activity, activity_rx) = watch::channel(Activity {
        in_flight: 0,
        since: opened_at,
        served: false,
        head_since: None,
        waiting: 0,
        progress_at: opened_at,
    });
    let activity = Arc::new(activity);
    let io = Watched {
        io,
        activity: Arc::clone(&activity),
        protocol: Protocol::Unknown,
    };
    let closing = listen.closer.as_ref().and_then(|closer| closer(&peer));
    let peer = Arc::new(peer);
    let service = hyper::service::service_fn(move |req| {
        let response = handler(req, Arc::clone(&peer));
        let guard = InFlight::start(Arc::clone(&activity));
        async move {
            let (parts, body) = response.await.into_parts();
            Ok::<_, std::convert::Infallible>(Response::from_parts(
                parts,
                Tracked::new(body, guard),
            ))
        }
    });
    // With upgrades, so a CONNECT tunnel or a WebSocket can take over.
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let why = tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(listener = listen.stats.name(), error = %e, "connection ended with an error");
            }
            return;
        }
        () = idle(activity_rx, limits) => "idle",
        _ = stopping.wait_for(|s| *s) => "stopping",
        how = async move {
            match closing {
                Some(closing) => closing.await,
                None => std::future::pending().await,
            }
        } => match how {
            Close::Now => {
                tracing::debug!(listener = listen.stats.name(), "closed a connection at once");
                return;
            }
            Close::Gracefully => "renewing",
        },
    };
    if why == "idle" {
        listen.stats.closed_idle();
    }
    tracing::debug!(listener = listen.stats.name(), why, "closing a connection");
    conn.as_mut().graceful_shutdown();
    // An idle connection goes at once; a stopping one may finish what is
    // in flight. A peer that holds on past that is dropped.
    let grace = match why {
        "idle" => limits.header_timeout,
        "renewing" => limits.idle_timeout,
        _ => Duration::from_secs(3600),
    };
    let _ = tokio::time::timeout(grace, conn).await;
}

/// A connection's slot under the limit, held by its [`Peer`] (and so by a
/// tunnel that outlives the exchange), and its idle bound.
#[derive(Debug)]
pub struct Hold {
    _open: super::listener::OpenGuard,
    pub(crate) idle_timeout: Duration,
}

/// What a connection is doing, for the idle rule.
#[derive(Debug, Clone, Copy)]
struct Activity {
    /// Requests whose responses are not yet sent.
    in_flight: usize,
    /// When `in_flight` last became 0 (or the connection opened).
    since: Instant,
    /// Whether a request head has arrived yet.
    served: bool,
    /// When the first byte of the next HTTP/1.1 request head arrived, while
    /// nothing was in flight.
    head_since: Option<Instant>,
    /// Responses with data ready that the peer has not taken (sent a frame,
    /// or never polled): the peer's receive window or socket is closed.
    waiting: usize,
    /// When a response body was last polled (not notified: read when a
    /// deadline passes).
    progress_at: Instant,
}

/// When the connection is due to close if nothing changes: with nothing
/// in flight, the header timeout before its first request (or from the
/// first byte of a later HTTP/1.1 head) and the idle timeout otherwise;
/// with responses the peer does not take (a closed HTTP/2 window, an
/// unread socket), the idle timeout after the last progress. `None`:
/// requests in flight that are working (a quiet Watch stream waits on its
/// source, not on the peer).
fn deadline(a: &Activity, limits: Limits) -> Option<Instant> {
    if a.in_flight == 0 {
        return Some(match (a.served, a.head_since) {
            (false, _) => a.since + limits.header_timeout,
            (true, Some(head)) => head + limits.header_timeout,
            (true, None) => a.since + limits.idle_timeout,
        });
    }
    (a.waiting > 0).then(|| a.progress_at + limits.idle_timeout)
}

/// Resolves when the connection is idle or stalled past its bound (see
/// [`deadline`]).
async fn idle(mut activity: watch::Receiver<Activity>, limits: Limits) {
    loop {
        let due = deadline(&activity.borrow_and_update(), limits);
        let Some(due) = due else {
            if activity.changed().await.is_err() {
                return std::future::pending().await;
            }
            continue;
        };
        tokio::select! {
            () = tokio::time::sleep_until(due) => {
                // Progress is recorded without a wake-up: look again.
                let now = deadline(&activity.borrow(), limits);
                if now.is_some_and(|d| d <= Instant::now()) {
                    return;
                }
            }
            changed = activity.changed() => if changed.is_err() {
                return std::future::pending().await;
            },
        }
    }
}

/// Counts one request as in flight until dropped (with its response
/// body).
struct InFlight(Arc<watch::Sender<Activity>>);

impl InFlight {
    fn start(activity: Arc<watch::Sender<Activity>>) -> Self {
        activity.send_modify(|a| {
            a.in_flight += 1;
            a.served = true;
            a.head_since = None;
        });
        Self(activity)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.send_modify(|a| {
            a.in_flight = a.in_flight.saturating_sub(1);
            if a.in_flight == 0 {
                a.since = Instant::now();
            }
        });
    }
}

/// Which protocol a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    Unknown,
    Http1,
    Http2,
}

/// The connection's byte stream, noting when an HTTP/1.1 request head
/// starts while nothing is in flight, so a slow head is held to the
/// header timeout and an idle keep-alive connection to the idle timeout.
/// (HTTP/2 sends frames with no request open, pings and window updates;
/// its request heads are bounded by the header list size.)
struct Watched<I> {
    io: I,
    activity: Arc<watch::Sender<Activity>>,
    protocol: Protocol,
}

impl<I: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Watched<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = &buf.filled()[before..];
        if read.is_empty() {
            return result;
        }
        if self.protocol == Protocol::Unknown {
            self.protocol = if read.starts_with(b"PRI ") {
                Protocol::Http2
            } else {
                Protocol::Http1
            };
        }
        if self.protocol == Protocol::Http1 {
            let starts_head = {
                let a = self.activity.borrow();
                a.served && a.in_flight == 0 && a.head_since.is_none()
            };
            if starts_head {
                self.activity.send_modify(|a| {
                    if a.in_flight == 0 && a.head_since.is_none() {
                        a.head_since = Some(Instant::now());
                    }
                });
            }
        }
        result
    }
}

impl<I: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Watched<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// A response body that keeps its request in flight until it is sent
/// (or dropped), and tells the connection whether it waits on the peer.
struct Tracked<B> {
    body: Pin<Box<B>>,
    guard: InFlight,
    /// Data is ready and the peer has not taken it yet.
    waiting: bool,
}

impl<B> Tracked<B> {
    /// Counts as waiting from the start: until hyper polls it, the peer
    /// has taken nothing.
    fn new(body: B, guard: InFlight) -> Self {
        let mut tracked = Self {
            body: Box::pin(body),
            guard,
            waiting: false,
        };
        tracked.update(true);
        tracked
    }

    /// Records a poll, and whether the body now waits on the peer;
    /// wakes the idle watch only when "some response waits" changes.
    fn update(&mut self, waiting: bool) {
        let was = std::mem::replace(&mut self.waiting, waiting);
        self.guard.0.send_if_modified(|a| {
            a.progress_at = Instant::now();
            let before = a.waiting > 0;
            match (was, waiting) {
                (false, true) => a.waiting += 1,
                (true, false) => a.waiting = a.waiting.saturating_sub(1),
                _ => {}
            }
            before != (a.waiting > 0)
        });
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        if self.waiting {
            self.guard
                .0
                .send_modify(|a| a.waiting = a.waiting.saturating_sub(1));
        }
    }
}

impl<B: ResponseBody> hyper::body::Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = self.body.as_mut().poll_frame(cx);
        // A frame handed out: the next poll comes when the peer takes it.
        // Pending: the body waits on its own source, not on the peer.
        let waiting = matches!(polled, Poll::Ready(Some(Ok(_))));
        self.update(waiting);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Accept errors that concern one connection, not the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    // accept(2): on Linux, network errors pending on the new socket are
    // passed on by accept and should be treated like EAGAIN: EPROTO,
    // ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETDOWN,
    // ENETUNREACH.
    const RETRY: [i32; 8] = [71, 92, 112, 64, 113, 95, 100, 101];
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) || e.raw_os_error().is_some_and(|code| RETRY.contains(&code))
}
