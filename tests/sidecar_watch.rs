//! The sidecar following the broker's Watch stream over mTLS: the state
//! at once, live changes, and a broker restart survived by resuming after
//! the last sequence number.

use std::sync::Arc;
use std::time::Duration;
use tally::broker::{Broker, BrokerSettings};
use tally::clock::SystemClock;
use tally::policy::Policy;
use tally::sidecar::watch::{MeshState, follow};
use tally::store::{Sealer, Store};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Served {
    broker: Arc<Broker>,
    stop: tokio::sync::oneshot::Sender<()>,
    server: tokio::task::JoinHandle<()>,
}

async fn serve_on(dir: &std::path::Path, key: &str, addr: &str) -> (Served, std::net::SocketAddr) {
    let store = Store::open_sqlite(
        &dir.join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let settings = BrokerSettings::new(
        "example.org",
        Policy::parse("trust_domain: example.org\n").unwrap(),
    )
    .unwrap();
    let broker = Arc::new(
        Broker::open(settings, store, Arc::new(SystemClock))
            .await
            .unwrap(),
    );
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let bound = listener.local_addr().unwrap();
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
    (
        Served {
            broker,
            stop,
            server,
        },
        bound,
    )
}

async fn until(
    rx: &mut tokio::sync::watch::Receiver<MeshState>,
    what: &str,
    f: impl Fn(&MeshState) -> bool,
) -> MeshState {
    tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|s| f(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_follows_changes_and_resumes_after_a_broker_restart() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let (served, addr) = serve_on(dir.path(), &key, "127.0.0.1:0").await;
    let svid = served
        .broker
        .mint_credential(
            &"spiffe://example.org/ns/shop/sa/checkout".parse().unwrap(),
            600,
        )
        .unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(served.broker.bundle_pem()))
        .identity(Identity::from_pem(
            &svid.cert_chain_pem,
            svid.key_pem.as_bytes(),
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    let (state, mut rx) = tokio::sync::watch::channel(MeshState::default());
    let follower = tokio::spawn(follow(channel, Arc::new(SystemClock), state));

    let first = until(&mut rx, "the initial state", MeshState::ready).await;
    assert_eq!(first.jwks.as_ref().unwrap().len(), 1);
    assert!(first.connected);

    // A rotation arrives live, with a higher sequence number.
    served.broker.rotate_signing_key(300, None).await.unwrap();
    let rotated = until(&mut rx, "the rotation", |s| {
        s.jwks.as_ref().is_some_and(|j| j.len() == 2)
    })
    .await;
    assert!(rotated.sequence > first.sequence);

    // The broker goes away: the follower notices, keeps what it knows.
    let _ = served.stop.send(());
    served.server.await.unwrap();
    let down = until(&mut rx, "the disconnect", |s| !s.connected).await;
    assert_eq!(down.sequence, rotated.sequence);
    assert!(down.ready(), "verification keeps working on the last state");

    // Back on the same address and store, with a change made meanwhile:
    // the follower resumes after its last sequence and gets just that.
    let (again, _) = serve_on(dir.path(), &key, &addr.to_string()).await;
    again.broker.rotate_signing_key(300, None).await.unwrap();
    let resumed = until(&mut rx, "the change made while away", |s| {
        s.connected && s.jwks.as_ref().is_some_and(|j| j.len() == 3)
    })
    .await;
    assert!(resumed.sequence > rotated.sequence);

    drop(rx);
    let _ = again.stop.send(());
    again.server.await.unwrap();
    follower.await.unwrap();
}
