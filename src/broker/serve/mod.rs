//! The broker's front ends: each maps one protocol onto the state's
//! operations ([`crate::broker::state`]) and runs on a listener until a
//! shutdown future resolves.
//!
//! [`grpc`] (Identity, Tokens, Watch) and [`admin_rpc`] and [`reports`]
//! on the mTLS gRPC listener ([`serve_grpc`]); [`oauth`] the OAuth
//! endpoints, JWKS and metadata on the HTTPS listener ([`serve_https`]);
//! [`admin_port`] metrics and health on plain HTTP ([`serve_admin`]);
//! [`tls`] the listeners' self-renewing certificate.

pub mod admin_port;
pub mod admin_rpc;
pub mod grpc;
pub mod identity;
pub mod oauth;
pub mod reports;
pub mod tls;

use crate::broker::Broker;
use std::sync::Arc;

/// Runs the gRPC server (Identity, Tokens, Watch, Admin, Reports) with
/// TLS on `listener` until `shutdown` resolves: then Watch streams end,
/// and in-flight calls finish before this returns. Connections are served
/// by the same loop as every other listener ([`crate::http::serve`]:
/// timeouts, connection cap, back-pressure), with the renewing
/// certificate; handlers find the client's certificates in the request's
/// [`crate::http::Peer`].
///
/// # Errors
/// If TLS cannot be set up.
pub async fn serve_grpc(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    certs: Arc<tls::ServerCerts>,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> std::io::Result<()> {
    use tower_service::Service as _;
    let config = tls::server_config(&broker, certs, &[b"h2"]).map_err(std::io::Error::other)?;
    let routes = tonic::service::Routes::builder()
        .add_service(identity::identity_server(Arc::clone(&broker)))
        .add_service(grpc::tokens_server(Arc::clone(&broker)))
        .add_service(grpc::watch_server(Arc::clone(&broker)))
        .add_service(admin_rpc::admin_server(Arc::clone(&broker)))
        .add_service(reports::reports_server(Arc::clone(&broker)))
        .clone()
        .routes()
        .prepare();
    let listen = broker.listen("grpc").tls(config).http2_only();
    let closing = Arc::clone(&broker);
    crate::http::serve(
        listener,
        listen,
        move |mut req, peer| {
            let mut routes = routes.clone();
            req.extensions_mut().insert(peer);
            async move {
                match routes.call(req).await {
                    Ok(response) => response,
                    Err(never) => match never {},
                }
            }
        },
        async move {
            shutdown.await;
            // Ends the Watch streams, so their connections can close.
            closing.close();
        },
    )
    .await
}

/// Runs the HTTPS listener (OAuth token endpoint, JWKS, metadata) on
/// `listener` until `shutdown` resolves, then lets requests in flight
/// finish.
///
/// # Errors
/// If TLS cannot be set up or accepting fails.
pub async fn serve_https(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    certs: Arc<tls::ServerCerts>,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    let tls =
        tls::server_config(&broker, certs, &[b"h2", b"http/1.1"]).map_err(std::io::Error::other)?;
    let oauth = Arc::new(oauth::OAuth::new(Arc::clone(&broker)).map_err(std::io::Error::other)?);
    crate::http::serve(
        listener,
        broker.listen("https").tls(tls),
        move |req, peer| oauth::handle(Arc::clone(&oauth), req, peer),
        shutdown,
    )
    .await
}

/// Runs the admin port (`/metrics`, `/healthz`, `/readyz`, plain HTTP) on
/// `listener` until `shutdown` resolves.
///
/// # Errors
/// If accepting fails.
pub async fn serve_admin(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    crate::http::serve(
        listener,
        broker.listen("admin"),
        move |req, peer| admin_port::handle(Arc::clone(&broker), req, peer),
        shutdown,
    )
    .await
}
