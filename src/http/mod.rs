//! The HTTP server loop every tally listener shares (hyper, HTTP/1.1 and
//! HTTP/2, over TCP with or without TLS, or over a Unix socket), and the
//! helpers handlers share.
//!
//! [`serve`] takes a listener, how to [`Listen`], and a shutdown future,
//! like every server in tally: tests bind `127.0.0.1:0` and stop it
//! cleanly. Handlers are plain async functions from a request and the
//! [`Peer`] to a response.
//!
//! - [`server`]: the accept loop and connection limits (timeouts, caps,
//!   back-pressure on `EMFILE`).
//! - [`listener`]: per-listener counters, readiness and metrics.
//! - [`peer_uid`]: the uid of a local TCP peer, from the socket table.

pub mod listener;
pub mod peer_uid;
pub mod server;
pub mod tunnel;

pub use listener::{ListenerStats, Listeners};
pub use server::{Close, Closer, Limits, Listen, TlsSource, serve, serve_unix};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rustls_pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::Arc;

/// The response body every handler returns.
pub type Body = Full<Bytes>;

/// The most header bytes a request may carry (HTTP/1.1 read buffer, HTTP/2
/// header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// What a handler's response body may be: the whole [`Body`] most handlers
/// send, or a stream (the inbound proxy's).
pub trait ResponseBody:
    hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> ResponseBody for B where
    B: hyper::body::Body<Data = Bytes, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// Who is on the other end of a connection.
#[derive(Debug)]
pub struct Peer {
    /// Remote address (TCP).
    pub addr: Option<SocketAddr>,
    /// The peer process's user id: from `SO_PEERCRED` on a Unix socket,
    /// from the socket table for a local TCP peer when the listener asks
    /// ([`Listen::peer_uid`]).
    pub uid: Option<u32>,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// The client certificate chain, leaf first, if the client sent one
    /// (already verified by the TLS layer).
    pub certs: Option<Vec<CertificateDer<'static>>>,
    /// The mesh identity in that certificate, if it is an SVID.
    pub identity: Option<crate::identity::PeerIdentity>,
    /// Tokens verified on this connection (see
    /// [`crate::auth::ConnectionTokens`]).
    pub tokens: crate::auth::ConnectionTokens,
    /// The connection's slot under its listener's limit and its idle
    /// bound: a tunnel that outlives the HTTP exchange keeps the `Peer`,
    /// and with it the slot.
    pub(crate) hold: Option<Arc<server::Hold>>,
}

impl Peer {
    /// A peer at `addr` (TCP) with `uid` (when known), before any TLS.
    pub fn new(addr: Option<SocketAddr>, uid: Option<u32>) -> Self {
        Self {
            addr,
            uid,
            tls: false,
            certs: None,
            identity: None,
            tokens: crate::auth::ConnectionTokens::default(),
            hold: None,
        }
    }

    /// How long a tunnel from this connection may stay silent.
    pub fn idle_timeout(&self) -> std::time::Duration {
        self.hold
            .as_ref()
            .map_or(Limits::default().idle_timeout, |h| h.idle_timeout)
    }
}

/// Why a request body was not read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// Larger than the limit.
    #[error("request body is larger than {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// The connection failed while reading.
    #[error("reading the request body failed")]
    Read,
    /// The client did not send it within [`BODY_TIMEOUT`].
    #[error("the request body did not arrive within {}s", BODY_TIMEOUT.as_secs())]
    TimedOut,
}

/// How long a client may take to send a body read whole (the small
/// bodies of the OAuth endpoints and the local API: a few KiB).
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Reads a whole request body (an [`Incoming`], or `&mut` one a handler
/// keeps, see [`AfterRequest`]), refusing more than `limit` bytes.
///
/// # Errors
/// [`BodyError`].
pub async fn read_body<B>(body: B, limit: usize) -> Result<Bytes, BodyError>
where
    B: hyper::body::Body<Data = Bytes, Error = hyper::Error>,
{
    // A body dripped a byte a minute would hold the connection (and its
    // slot) for ever: a request in flight is never idle.
    let collected = tokio::time::timeout(BODY_TIMEOUT, Limited::new(body, limit).collect())
        .await
        .map_err(|_| BodyError::TimedOut)?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge { limit }),
        Err(_) => Err(BodyError::Read),
    }
}

/// Reads and discards what is left of `body`, if that is at most `limit`
/// bytes and arrives within [`BODY_TIMEOUT`]; otherwise leaves it. A
/// request whose body was read to the end is a finished exchange for every
/// client; one answered early ends in a stream reset some clients report
/// as an error (see [`AfterRequest`]).
pub async fn drain(body: &mut Incoming, limit: usize) {
    use hyper::body::Body as _;
    if body.is_end_stream() || body.size_hint().lower() > limit as u64 {
        return;
    }
    let _ = read_body(body, limit).await;
}

/// A response body that keeps the request's body until the response has
/// been sent. An HTTP/2 server that drops a request body still arriving
/// resets the stream with `CANCEL` when the response is not out yet, and
/// the client loses the answer (curl: "Stream error in the HTTP/2 framing
/// layer"); dropped after the response's last frame, it is `NO_ERROR`,
/// which RFC 9113 §8.1 provides for a server that answers early. Nothing
/// more of the body is read.
#[derive(Debug)]
pub struct AfterRequest<B> {
    response: B,
    _request: Incoming,
}

impl<B> AfterRequest<B> {
    /// `response`, holding `request` until it is dropped.
    pub fn new(response: B, request: Incoming) -> Self {
        Self {
            response,
            _request: request,
        }
    }
}

impl<B: hyper::body::Body + Unpin> hyper::body::Body for AfterRequest<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.response).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.response.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.response.size_hint()
    }
}

/// A response with `body` and a content type.
pub fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// A JSON response.
pub fn json(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    respond(status, "application/json", value.to_string())
}

/// A response read whole.
#[derive(Debug)]
pub struct Answer {
    /// Status code.
    pub status: StatusCode,
    /// Headers.
    pub headers: http::HeaderMap,
    /// Body.
    pub body: Bytes,
}

/// Sends `request` on a new HTTP/1.1 connection to `addr` and reads the
/// answer whole (at most `limit` body bytes). The request target is sent
/// as written: a path, or an absolute URL when `addr` is a forward proxy.
///
/// # Errors
/// Connecting, the exchange, or a body over `limit`, as text.
pub async fn send(
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
    limit: usize,
) -> Result<Answer, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP with {addr}: {e}"))?;
    tokio::spawn(conn);
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP with {addr}: {e}"))?;
    let (parts, body) = response.into_parts();
    let body = Limited::new(body, limit)
        .collect()
        .await
        .map_err(|e| format!("reading the answer from {addr}: {e}"))?
        .to_bytes();
    Ok(Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}
