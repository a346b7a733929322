//! The broker served in process over real mTLS gRPC on 127.0.0.1:0, with
//! a real SQLite store, and the clients the broker tests call it with (and a
//! channel to a gRPC server on a Unix socket).

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use std::sync::Arc;
use tally::broker::{Broker, BrokerSettings};
use tally::clock::{Clock, SystemClock};
use tally::dpop::ProofKey;
use tally::proto::v1 as pb;
use tally::store::{Sealer, Store};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

pub const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
pub const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
pub const POLICY: &str = include_str!("../fixtures/policy.yaml");

/// A broker served in process on 127.0.0.1:0, its store in a directory.
pub struct Running {
    pub broker: Arc<Broker>,
    pub addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    pub running: tally::broker::Running,
    _dir: Option<tempfile::TempDir>,
}

impl Running {
    /// Stops the server and waits for it to end: a panic in it (at stop
    /// or before) fails the test, and so does a server that does not end
    /// within its 10 s drain plus a margin.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            // An error means the server has already ended; awaiting it
            // below says how.
            let _ = stop.send(());
        }
        tokio::time::timeout(std::time::Duration::from_secs(20), self.running.wait())
            .await
            .expect("the broker did not stop within 20 s")
            .expect("the broker's servers failed");
    }
}

/// A broker on the store in `dir`, sealed with `key`, serving `policy`.
pub async fn start_in(dir: &std::path::Path, key: &str, policy: &str) -> Running {
    start_with_clock(dir, key, policy, Arc::new(SystemClock)).await
}

/// A broker on the store in `dir` reading `clock`, started as `tally
/// broker` starts one, gRPC only.
pub async fn start_with_clock(
    dir: &std::path::Path,
    key: &str,
    policy: &str,
    clock: Arc<dyn Clock>,
) -> Running {
    let store = Store::open_sqlite(
        &dir.join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let mut settings = BrokerSettings::with_policy("example.org", policy).unwrap();
    settings.audit_file = Some(dir.join("audit.jsonl"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = tally::broker::Listeners {
        grpc: listener,
        https: None,
        admin: None,
    };
    let parts = tally::broker::Parts::new(settings, store).clock(clock);
    let running = tally::broker::start(parts, listeners, async {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    Running {
        broker: Arc::clone(&running.broker),
        addr,
        stop: Some(stop),
        running,
        _dir: None,
    }
}

/// The same in a fresh temporary directory (removed with the broker).
pub async fn start(policy: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let mut running = start_in(dir.path(), &key, policy).await;
    running._dir = Some(dir);
    running
}

/// A TLS channel to `r` trusting its bundle, with `identity` for mTLS.
pub async fn channel(
    r: &Running,
    identity: Option<Identity>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(r.broker.bundle_pem()))
        .domain_name("localhost");
    if let Some(id) = identity {
        tls = tls.identity(id);
    }
    Channel::from_shared(format!("https://127.0.0.1:{}", r.addr.port()))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

/// A CSR for a new P-256 key with these URI SANs, and the key.
pub fn csr(sans: &[&str]) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    (key, der)
}

/// `der` as PEM under `label`.
pub fn pem(label: &str, der: &[u8]) -> String {
    tally::ca::pem(label, der)
}

/// Attests `id` with a fresh join token and returns an mTLS identity.
pub async fn workload(r: &Running, id: &str) -> Identity {
    let token = r
        .broker
        .create_join_token(&id.parse().unwrap(), 600, None)
        .await
        .unwrap();
    let mut client = pb::identity_client::IdentityClient::new(channel(r, None).await.unwrap());
    let (key, der) = csr(&[]);
    let svid = client
        .attest(pb::AttestRequest {
            credential: Some(pb::attest_request::Credential::JoinToken(
                token.expose().into(),
            )),
            csr_der: der,
        })
        .await
        .unwrap()
        .into_inner();
    let chain: String = std::iter::once(&svid.svid_der)
        .chain(&svid.chain_der)
        .map(|d| pem("CERTIFICATE", d))
        .collect();
    Identity::from_pem(chain, key.serialize_pem())
}

/// A Tokens client authenticated as a freshly attested `id`.
pub async fn tokens_as(r: &Running, id: &str) -> pb::tokens_client::TokensClient<Channel> {
    let identity = workload(r, id).await;
    pb::tokens_client::TokensClient::new(channel(r, Some(identity)).await.unwrap())
}

/// An Issue request for PAYMENTS with a fresh proof by `key`.
pub fn issue_request(r: &Running, key: &ProofKey, scopes: &[&str], ttl: u32) -> pb::IssueRequest {
    pb::IssueRequest {
        audience: PAYMENTS.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ttl_seconds: ttl,
        dpop_proof: key
            .mint("POST", r.broker.issue_uri(), None, None, SystemClock.now())
            .unwrap(),
    }
}

/// A gRPC channel to a server on the Unix socket at `path`.
pub async fn unix_channel(path: &std::path::Path) -> tonic::transport::Channel {
    let path = path.to_owned();
    tonic::transport::Endpoint::from_static("http://unix.socket")
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        }))
        .await
        .unwrap()
}
