//! A real broker for integration tests, in process or as the binary
//! ([`Spawned`]): SQLite store in a directory, gRPC
//! over TLS on 127.0.0.1 (port 0 unless given), stopped on demand.

use super::process::{Lines, PATIENCE, terminate, wait_exit};
use std::process::{Command, Stdio};
use std::sync::Arc;
use tally::broker::{Broker, BrokerSettings};
use tally::clock::SystemClock;
use tally::store::{Sealer, Store};

/// A running broker, started the way `tally broker` starts one
/// ([`tally::broker::start`]: upkeep, replica following, self-renewing
/// certificate), gRPC only.
pub struct ServedBroker {
    pub broker: Arc<Broker>,
    pub addr: std::net::SocketAddr,
    pub certs: Arc<tally::broker::serve::tls::ServerCerts>,
    stop: tokio::sync::oneshot::Sender<()>,
    running: tally::broker::Running,
}

impl ServedBroker {
    /// Stops accepting, finishes calls, and waits for the server to end.
    pub async fn stop(self) {
        // An error means the server has already ended; awaiting it below
        // says how (a panic there fails the test).
        let _ = self.stop.send(());
        tokio::time::timeout(std::time::Duration::from_secs(20), self.running.wait())
            .await
            .expect("the broker did not stop within 20 s (its drain is 10 s)")
            .expect("the broker's servers failed");
    }

    /// `https://localhost:PORT`, as a client names it.
    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }
}

/// Settings for trust domain example.org with `policy` (YAML), which
/// the broker stores as a version when it opens (policy source: store).
pub fn settings(policy: &str) -> BrokerSettings {
    BrokerSettings::with_policy("example.org", policy).unwrap()
}

/// Opens a broker on the store in `dir` (sealed with `key`) and serves it
/// on `addr` (`127.0.0.1:0` for any free port).
pub async fn serve_broker(
    dir: &std::path::Path,
    key: &str,
    settings: BrokerSettings,
    addr: &str,
) -> ServedBroker {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    serve_broker_on(dir, key, settings, listener).await
}

/// The same on a listener the caller bound (and may have used already).
pub async fn serve_broker_on(
    dir: &std::path::Path,
    key: &str,
    settings: BrokerSettings,
    listener: tokio::net::TcpListener,
) -> ServedBroker {
    let store = Store::open_sqlite(
        &dir.join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    serve_store(store, settings, listener).await
}

/// A broker on `store` (SQLite or PostgreSQL), served on `listener`.
pub async fn serve_store(
    store: Store,
    settings: BrokerSettings,
    listener: tokio::net::TcpListener,
) -> ServedBroker {
    serve_store_with_clock(store, settings, listener, Arc::new(SystemClock)).await
}

/// The same with the broker reading `clock`.
pub async fn serve_store_with_clock(
    store: Store,
    settings: BrokerSettings,
    listener: tokio::net::TcpListener,
    clock: Arc<dyn tally::clock::Clock>,
) -> ServedBroker {
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let parts = tally::broker::Parts::new(settings, store).clock(clock);
    let listeners = tally::broker::Listeners {
        grpc: listener,
        https: None,
        admin: None,
    };
    let running = tally::broker::start(parts, listeners, async {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    ServedBroker {
        broker: Arc::clone(&running.broker),
        addr,
        certs: Arc::clone(&running.certs),
        stop,
        running,
    }
}

/// An mTLS channel to `served` as a freshly minted credential for `id`.
pub fn channel_as(served: &ServedBroker, id: &str) -> tonic::transport::Channel {
    channel_via(served, id, served.addr)
}

/// The same, connecting to `addr` (a proxy in front of the broker).
pub fn channel_via(
    served: &ServedBroker,
    id: &str,
    addr: std::net::SocketAddr,
) -> tonic::transport::Channel {
    let svid = served
        .broker
        .mint_credential(&id.parse().unwrap(), 600)
        .unwrap();
    channel_holding(served, &svid, addr)
}

/// An mTLS channel to `addr` presenting `svid` (a credential the broker
/// minted: its key and certificate are known to the test).
pub fn channel_holding(
    served: &ServedBroker,
    svid: &tally::ca::Credential,
    addr: std::net::SocketAddr,
) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(served.broker.bundle_pem()))
        .identity(Identity::from_pem(
            &svid.cert_chain_pem,
            svid.key_pem.as_bytes(),
        ))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

/// A CSR for a new P-256 key (the key is dropped: the SVID is for
/// checking what the broker answers, not for use).
pub fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::default();
    params.serialize_request(&key).unwrap().der().to_vec()
}

/// `Identity.Renew` over `channel` (mTLS as the identity to renew).
pub async fn renew(
    channel: &tonic::transport::Channel,
) -> Result<tally::proto::v1::SvidResponse, tonic::Status> {
    tally::proto::v1::identity_client::IdentityClient::new(channel.clone())
        .renew(tally::proto::v1::RenewRequest { csr_der: csr() })
        .await
        .map(tonic::Response::into_inner)
}

/// `Tokens.Issue` of `scope` for `audience` over `channel`, with a valid
/// DPoP proof for `htu` (the broker's `<issuer>/tally.v1.Tokens/Issue`).
pub async fn issue(
    channel: &tonic::transport::Channel,
    htu: &str,
    audience: &str,
    scope: &str,
) -> Result<tally::proto::v1::IssueResponse, tonic::Status> {
    let now = tally::clock::Clock::now(&SystemClock);
    let key = tally::dpop::ProofKey::generate().unwrap();
    tally::proto::v1::tokens_client::TokensClient::new(channel.clone())
        .issue(tally::proto::v1::IssueRequest {
            audience: audience.into(),
            scopes: vec![scope.into()],
            ttl_seconds: 0,
            dpop_proof: key.mint("POST", htu, None, None, now).unwrap(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The test policy file.
pub const POLICY_FILE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/policy.yaml");

/// Every listener on an ephemeral port, so tests never collide.
pub const EPHEMERAL_PORTS: [&str; 6] = [
    "--grpc-listen",
    "127.0.0.1:0",
    "--http-listen",
    "127.0.0.1:0",
    "--admin-listen",
    "127.0.0.1:0",
];

/// A broker binary on ephemeral ports, and where it listens. Killed when
/// dropped, so a failing test leaves no broker behind.
pub struct Spawned {
    child: std::process::Child,
    out: Lines,
    pub grpc: String,
    pub https_line: String,
    pub admin: String,
}

impl Spawned {
    /// Starts `tally broker` for example.org with the test policy on `data`.
    pub fn start(data: &std::path::Path) -> Self {
        Self::start_with(data, &["--policy", POLICY_FILE])
    }

    /// `tally broker` with these policy arguments (and the usual others).
    pub fn start_with(data: &std::path::Path, policy_args: &[&str]) -> Self {
        // Appended to, so a restarted broker's log follows its predecessor's.
        let log_path = data.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["broker", "--trust-domain", "example.org"])
            .args(policy_args)
            .args(EPHEMERAL_PORTS)
            .arg("--data-dir")
            .arg(data)
            .env_remove("TALLY_STORE_KEY")
            // Everything it logs, for tests that search the log for secrets.
            .env("TALLY_LOG", "debug")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        // The broker prints its addresses once it listens: no sleeping, and
        // no waiting past the bound either.
        let mut out = Lines::of(child.stdout.take().unwrap());
        let mut next_line = || {
            out.try_next_within(PATIENCE).unwrap_or_else(|e| {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = &lines[lines.len().saturating_sub(20)..];
                panic!("the broker printed no address ({e}); its log ends:\n{tail:#?}")
            })
        };
        let (grpc, https_line, admin) = (next_line(), next_line(), next_line());
        assert!(
            grpc.contains("gRPC (mTLS) listening on 127.0.0.1:"),
            "{grpc}"
        );
        let after = |line: &str| {
            line.split("listening on ")
                .nth(1)
                .unwrap()
                .split([',', '\n'])
                .next()
                .unwrap()
                .trim()
                .to_owned()
        };
        Self {
            grpc: after(&grpc),
            admin: after(&admin),
            https_line,
            child,
            out,
        }
    }

    /// `tally ctl ARGS` against this broker as the admin in `data`, bounded
    /// ([`super::ctl::ctl`]); must succeed.
    pub fn ctl(&self, data: &std::path::Path, args: &[&str]) -> std::process::Output {
        let out = super::ctl::ctl(self, data, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "ctl {args:?}: {err}");
        out
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The issuer URL it printed (`https://localhost:PORT`).
    pub fn issuer(&self) -> String {
        let after = self.https_line.split("issuer ").nth(1).unwrap();
        after.trim().to_owned()
    }

    /// An mTLS channel to it with the credential in `dir` (cert.pem,
    /// key.pem, bundle.pem, as `ctl svid mint` writes them).
    pub async fn channel_with(&self, dir: &std::path::Path) -> tonic::transport::Channel {
        use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("bundle.pem")))
            .identity(Identity::from_pem(read("cert.pem"), read("key.pem")))
            .domain_name("localhost");
        Channel::from_shared(format!("https://{}", self.grpc))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// SIGKILL: no goodbye, nothing flushed that was not already durable.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        wait_exit(&mut self.child, PATIENCE);
    }

    /// SIGTERM, then the exit code and the rest of stdout.
    pub fn stop(mut self) -> (Option<i32>, Vec<String>) {
        terminate(&self.child);
        let status = wait_exit(&mut self.child, PATIENCE);
        (status.code(), self.out.rest(PATIENCE))
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        // Already gone after `kill` or `stop`; otherwise a test failed.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
