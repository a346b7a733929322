//! A mesh peer by hand: HTTP/2 over mutual TLS to a sidecar's inbound
//! port with a sidecar's own X.509-SVID (whose key is its DPoP key), so a
//! test can send exactly the headers it wants on one connection.

use super::mesh::{Answer, Started};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use std::sync::Arc;
use tally::sidecar::identity::Svid;
use tally::sidecar::mtls::MeshCredentials;

/// The SVID a running sidecar holds now.
pub fn svid_of(started: &Started) -> Arc<Svid> {
    Arc::clone(&started.sidecar.parts().svid.borrow())
}

/// TLS settings for `svid` (bundle from its sidecar) dialling `server`.
pub fn client_config(svid: &Arc<Svid>, server: &str) -> Arc<rustls::ClientConfig> {
    let bundle = rustls_pki_types::pem::PemObject::pem_slice_iter(svid.bundle_pem.as_bytes())
        .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.unwrap().to_vec())
        .collect();
    MeshCredentials::new(Arc::clone(svid), bundle)
        .unwrap()
        .client_config(&server.parse().unwrap())
        .unwrap()
}

/// One HTTP/2 connection over TLS.
pub struct Connection {
    pub sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    /// Ends when the connection does (with its error, if any).
    pub ended: tokio::task::JoinHandle<Result<(), hyper::Error>>,
    pub authority: String,
    /// The server's leaf certificate (DER).
    pub server_cert: Vec<u8>,
}

/// Connects to `addr` with `config` (TLS 1.3, ALPN h2).
///
/// # Errors
/// The TLS handshake's, as text.
pub async fn connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> Result<Connection, String> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("mesh.invalid").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
    Ok(Connection {
        sender,
        ended: tokio::spawn(conn),
        authority: addr.to_string(),
        server_cert,
    })
}

impl Connection {
    /// One request on this connection with `headers`; the answer, or the
    /// stream's error as text.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Answer, String> {
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("https://{}{path}", self.authority));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.sender.ready().await.map_err(|e| e.to_string())?;
        let response = self
            .sender
            .send_request(request.body(Full::new(Bytes::new())).unwrap())
            .await
            .map_err(|e| e.to_string())?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok(Answer {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body,
        })
    }
}

/// A token for `audience` from a sidecar's socket (bound to its SVID key).
pub async fn token_from(started: &Started, audience: &str, scope: &str) -> String {
    let socket = started.socket.as_deref().unwrap();
    let (status, body) = super::mesh::local(
        socket,
        "GET",
        &format!("/v1/token?audience={audience}&scope={scope}"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

/// Waits (bounded) until a running sidecar holds an SVID other than
/// `than`, and returns it.
pub async fn renewed(started: &Started, than: &Arc<Svid>) -> Arc<Svid> {
    let mut svids = started.sidecar.parts().svid.clone();
    let next = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        svids.wait_for(|s| !Arc::ptr_eq(s, than)),
    )
    .await
    .expect("the SVID was never renewed")
    .unwrap();
    Arc::clone(&next)
}
