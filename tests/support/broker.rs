//! A real broker for integration tests: SQLite store in a directory, gRPC
//! over TLS on 127.0.0.1 (port 0 unless given), stopped on demand.

use std::sync::Arc;
use tally::broker::{Broker, BrokerSettings};
use tally::clock::SystemClock;
use tally::policy::Policy;
use tally::store::{Sealer, Store};

/// A running broker.
pub struct ServedBroker {
    pub broker: Arc<Broker>,
    pub addr: std::net::SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

impl ServedBroker {
    /// Stops accepting, finishes calls, and waits for the server to end.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.server.await.unwrap();
    }

    /// `https://localhost:PORT`, as a client names it.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

/// Settings for trust domain example.org with `policy` (YAML).
pub fn settings(policy: &str) -> BrokerSettings {
    BrokerSettings::new("example.org", Policy::parse(policy).unwrap()).unwrap()
}

/// Opens a broker on the store in `dir` (sealed with `key`) and serves it
/// on `addr` (`127.0.0.1:0` for any free port).
pub async fn serve_broker(
    dir: &std::path::Path,
    key: &str,
    settings: BrokerSettings,
    addr: &str,
) -> ServedBroker {
    let store = Store::open_sqlite(
        &dir.join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let broker = Arc::new(
        Broker::open(settings, store, Arc::new(SystemClock))
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let certs = broker
        .server_certs(&["localhost".into()], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let b = Arc::clone(&broker);
    let server = tokio::spawn(async move {
        tally::broker::serve(b, listener, certs, async {
            let _ = stopped.await;
        })
        .await
        .unwrap();
    });
    ServedBroker {
        broker,
        addr,
        stop,
        server,
    }
}

/// An mTLS channel to `served` as a freshly minted credential for `id`.
pub fn channel_as(served: &ServedBroker, id: &str) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let svid = served
        .broker
        .mint_credential(&id.parse().unwrap(), 600)
        .unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(served.broker.bundle_pem()))
        .identity(Identity::from_pem(
            &svid.cert_chain_pem,
            svid.key_pem.as_bytes(),
        ))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{}", served.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}
