//! A small HTTP server loop (hyper, HTTP/1.1 and HTTP/2) over a TCP
//! listener, with or without TLS, or over a Unix socket; and the helpers
//! handlers share.
//!
//! [`serve`] takes a listener and a shutdown future, like every server in
//! tally: tests bind `127.0.0.1:0` and stop it cleanly. Handlers are plain
//! async functions from a request and the [`Peer`] to a response.

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use rustls_pki_types::CertificateDer;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The response body every handler returns.
pub type Body = Full<Bytes>;

/// How long a client may take for the TLS handshake or request headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The peer process's user id (Unix socket, from `SO_PEERCRED`).
    pub uid: Option<u32>,
    /// The client certificate chain, leaf first, if the client sent one
    /// (already verified by the TLS layer).
    pub certs: Option<Vec<CertificateDer<'static>>>,
}

/// Serves HTTP on `listener` (over TLS when `tls` is set) until `shutdown`
/// resolves; then stops accepting, lets requests in flight finish, and
/// returns once every connection has closed.
///
/// # Errors
/// If accepting a connection fails for a reason other than the client.
pub async fn serve<H, F, B>(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                // The client went away between SYN and accept: not ours.
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => return Err(e),
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let acceptor = acceptor.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let result = match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            tracing::debug!(%addr, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%addr, "TLS handshake timed out");
                            return;
                        }
                    };
                    let certs = tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .map(|c| c.iter().map(|c| c.clone().into_owned()).collect());
                    let peer = Peer {
                        addr: Some(addr),
                        uid: None,
                        certs,
                    };
                    serve_connection(tls, peer, handler, watcher).await
                }
                None => {
                    let peer = Peer {
                        addr: Some(addr),
                        uid: None,
                        certs: None,
                    };
                    serve_connection(stream, peer, handler, watcher).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%addr, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// Serves HTTP/1.1 on a Unix socket listener until `shutdown` resolves,
/// telling the handler each peer's uid (`SO_PEERCRED`).
///
/// # Errors
/// If accepting fails for a reason other than the client.
pub async fn serve_unix<H, F, B>(
    listener: tokio::net::UnixListener,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) if is_per_connection(&e) => continue,
                Err(e) => return Err(e),
            },
        };
        let peer = Peer {
            addr: None,
            uid: stream.peer_cred().ok().map(|c| c.uid()),
            certs: None,
        };
        let handler = handler.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            if let Err(e) = serve_connection(stream, peer, handler, watcher).await {
                tracing::debug!(error = %e, "local connection ended with an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// One connection: HTTP/1.1 or HTTP/2 (by preface), header read timeout,
/// watched for graceful shutdown.
async fn serve_connection<I, H, F, B>(
    io: I,
    peer: Peer,
    handler: H,
    watcher: hyper_util::server::graceful::Watcher,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<Incoming>, Arc<Peer>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<B>> + Send + 'static,
    B: ResponseBody,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .max_buf_size(MAX_HEADER_BYTES);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(MAX_HEADER_BYTES as u32);
    let peer = Arc::new(peer);
    let service = hyper::service::service_fn(move |req| {
        let response = handler(req, Arc::clone(&peer));
        async move { Ok::<_, std::convert::Infallible>(response.await) }
    });
    // With upgrades, so a CONNECT tunnel (the outbound proxy) can take
    // over the connection.
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    watcher.watch(conn.into_owned()).await
}

/// Accept errors that concern one connection, not the listener.
fn is_per_connection(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    )
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
}

/// Reads a whole request body, refusing more than `limit` bytes.
///
/// # Errors
/// [`BodyError`].
pub async fn read_body(body: Incoming, limit: usize) -> Result<Bytes, BodyError> {
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge { limit }),
        Err(_) => Err(BodyError::Read),
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
