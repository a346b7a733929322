//! The broker's HTTPS listener (OAuth endpoints) beside a served broker,
//! on 127.0.0.1:0, and a one-shot HTTPS client presenting a client
//! certificate.

use super::broker::ServedBroker;
use std::sync::Arc;

/// A running HTTPS listener.
pub struct ServedHttps {
    pub addr: std::net::SocketAddr,
    bundle_pem: String,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
}

/// Serves `served`'s broker on a new HTTPS listener.
pub async fn serve_https(served: &ServedBroker) -> ServedHttps {
    let broker = Arc::clone(&served.broker);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let certs = Arc::clone(&served.certs);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let bundle_pem = broker.bundle_pem();
    let server = tokio::spawn(tally::broker::serve::serve_https(
        broker,
        listener,
        certs,
        async {
            let _ = stopped.await;
        },
    ));
    ServedHttps {
        addr,
        bundle_pem,
        stop,
        server,
    }
}

impl ServedHttps {
    /// Stops accepting and waits for the listener to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap().unwrap();
    }

    /// One form `POST` (`Connection: close`) as `client`; (status, JSON
    /// body, or null).
    pub async fn post(
        &self,
        client: &tally::ca::Credential,
        path: &str,
        headers: &[(&str, &str)],
        form: &str,
    ) -> (u16, serde_json::Value) {
        use rustls_pki_types::pem::PemObject as _;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(self.bundle_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(client.cert_chain_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(client.key_pem.as_bytes()).unwrap(),
            )
            .unwrap();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            form.len()
        );
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        let request = format!("{head}\r\n{form}");
        tls.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        // The server may close without close_notify after answering.
        let _ = tls.read_to_end(&mut raw).await;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
        let status = head.split(' ').nth(1).unwrap().parse().unwrap();
        (status, serde_json::from_str(body).unwrap_or_default())
    }
}
