//! The outbound proxy to a mesh destination: mutual TLS with the
//! sidecar's SVID, the server accepted only with an SVID for the SPIFFE ID
//! the service map names, HTTP/2 on one pooled connection, and tokens
//! bound to the connection's key sent without a per-request proof.
//!
//! The destination is a test server (tokio-rustls + hyper HTTP/2) with an
//! SVID from the mesh's real broker, recording every request's headers,
//! the client certificate it saw, the raw bytes it read and the TCP
//! connections it accepted.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::mesh::{CHECKOUT, Mesh, PAYMENTS, Parts, REPORTING, Started, local, send};
use tally::sidecar::api::ServiceMap;
use tally::sidecar::mtls::{InboundMtls, MeshCredentials};

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    uri: String,
    headers: http::HeaderMap,
    /// The client certificate of the connection it came on.
    client_cert: Option<Vec<u8>>,
    /// Which accepted connection (from 1).
    connection: usize,
}

/// How the server answers on its port.
enum Speaks {
    /// TLS 1.3 with these settings, then HTTP/2.
    Tls(Arc<rustls::ServerConfig>),
    /// Plain HTTP/1.1 (a plaintext listener at a mesh address).
    Plain,
}

/// What the server saw.
#[derive(Default)]
struct Record {
    accepts: AtomicUsize,
    closed: AtomicUsize,
    requests: Mutex<Vec<Seen>>,
    raw: Mutex<Vec<u8>>,
    in_flight: AtomicUsize,
    max_in_flight: AtomicUsize,
    /// Requests to `/together` wait here until all of them have arrived.
    together: Mutex<Option<Arc<tokio::sync::Barrier>>>,
    changed: tokio::sync::Notify,
}

struct Server {
    addr: std::net::SocketAddr,
    record: Arc<Record>,
}

impl Server {
    async fn start(speaks: Speaks) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Record::default());
        let speaks = Arc::new(speaks);
        let rec = Arc::clone(&record);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let n = rec.accepts.fetch_add(1, Ordering::SeqCst) + 1;
                let (rec, speaks) = (Arc::clone(&rec), Arc::clone(&speaks));
                tokio::spawn(async move {
                    connection(tcp, n, &speaks, &rec).await;
                    rec.closed.fetch_add(1, Ordering::SeqCst);
                    rec.changed.notify_waiters();
                });
            }
        });
        Self { addr, record }
    }

    fn requests(&self) -> Vec<Seen> {
        self.record.requests.lock().unwrap().clone()
    }

    fn accepts(&self) -> usize {
        self.record.accepts.load(Ordering::SeqCst)
    }

    fn raw(&self) -> String {
        String::from_utf8_lossy(&self.record.raw.lock().unwrap()).into_owned()
    }

    /// Waits until `n` connections have ended.
    async fn closed(&self, n: usize) {
        let waited = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let changed = self.record.changed.notified();
                if self.record.closed.load(Ordering::SeqCst) >= n {
                    return;
                }
                changed.await;
            }
        });
        waited.await.expect("the connection never ended");
    }
}

/// Serves one accepted connection, recording what it reads.
async fn connection(tcp: tokio::net::TcpStream, n: usize, speaks: &Speaks, rec: &Arc<Record>) {
    let io = Recorded {
        inner: tcp,
        record: Arc::clone(rec),
    };
    let goaway = Arc::new(tokio::sync::Notify::new());
    let (cert, io): (Option<Vec<u8>>, Box<dyn Io>) = match speaks {
        Speaks::Plain => (None, Box::new(io)),
        Speaks::Tls(config) => {
            let Ok(tls) = tokio_rustls::TlsAcceptor::from(Arc::clone(config))
                .accept(io)
                .await
            else {
                return;
            };
            let cert = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first().map(|c| c.to_vec()));
            (cert, Box::new(tls))
        }
    };
    let (rec, bye) = (Arc::clone(rec), Arc::clone(&goaway));
    let service = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let (rec, bye, cert) = (Arc::clone(&rec), Arc::clone(&bye), cert.clone());
        async move { answer(req, n, cert, &rec, &bye).await }
    });
    let io = hyper_util::rt::TokioIo::new(io);
    if matches!(speaks, Speaks::Plain) {
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(io, service)
            .await;
        return;
    }
    let conn = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .serve_connection(io, service);
    let mut conn = std::pin::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => return,
        () = goaway.notified() => conn.as_mut().graceful_shutdown(),
    }
    let _ = conn.await;
}

/// Records a request and answers `{"served": N}` (`/bye` also sends
/// GOAWAY; `/together` waits for the others of its batch).
async fn answer(
    req: http::Request<hyper::body::Incoming>,
    connection: usize,
    client_cert: Option<Vec<u8>>,
    rec: &Record,
    bye: &tokio::sync::Notify,
) -> Result<http::Response<http_body_util::Full<bytes::Bytes>>, std::convert::Infallible> {
    let seen = Seen {
        uri: req.uri().to_string(),
        headers: req.headers().clone(),
        client_cert,
        connection,
    };
    let path = req.uri().path().to_owned();
    // Read to the end before answering, as servers that take a body do: an
    // answer sent before the request's end, together with a GOAWAY, can be
    // lost by the HTTP/2 client (the connection closes as the stream is
    // reset with NO_ERROR), which is not what these tests are about.
    let _ = http_body_util::BodyExt::collect(req.into_body()).await;
    let served = {
        let mut requests = rec.requests.lock().unwrap();
        requests.push(seen);
        requests.len()
    };
    let now = rec.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    rec.max_in_flight.fetch_max(now, Ordering::SeqCst);
    let barrier = rec.together.lock().unwrap().clone();
    if let (Some(barrier), "/together") = (barrier, path.as_str()) {
        let _ = tokio::time::timeout(Duration::from_secs(10), barrier.wait()).await;
    }
    rec.in_flight.fetch_sub(1, Ordering::SeqCst);
    if path == "/bye" {
        bye.notify_one();
    }
    let body = serde_json::json!({ "served": served }).to_string();
    Ok(http::Response::new(http_body_util::Full::new(body.into())))
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A TCP stream that copies every byte read into the record.
struct Recorded {
    inner: tokio::net::TcpStream,
    record: Arc<Record>,
}

impl tokio::io::AsyncRead for Recorded {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let fresh = &buf.filled()[before..];
        self.record.raw.lock().unwrap().extend_from_slice(fresh);
        polled
    }
}

impl tokio::io::AsyncWrite for Recorded {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// TLS settings for an SVID of `id` from the mesh's broker.
async fn mesh_server_config(mesh: &Mesh, id: &str) -> Arc<rustls::ServerConfig> {
    let svid = Arc::new(mesh.svid(id).await);
    use rustls::pki_types::pem::PemObject as _;
    let bundle = rustls::pki_types::CertificateDer::pem_slice_iter(svid.bundle_pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect();
    MeshCredentials::new(svid, bundle)
        .unwrap()
        .server_config(InboundMtls::Optional)
}

/// The checkout sidecar with an outbound proxy and a socket, whose map
/// says `addr` is payments, over mTLS or not.
async fn checkout(mesh: &Mesh, addr: std::net::SocketAddr, mtls: bool) -> Started {
    let map =
        ServiceMap::with_transport([(addr.to_string(), PAYMENTS.parse().unwrap(), Some(mtls))])
            .unwrap();
    mesh.sidecar(
        CHECKOUT,
        Parts {
            outbound: true,
            socket: true,
            service_map: Some(map),
            ..Parts::default()
        },
    )
    .await
}

/// `POST http://addr/path` through the outbound proxy.
async fn charge(client: &Started, addr: std::net::SocketAddr, path: &str) -> support::mesh::Answer {
    let url = format!("http://{addr}{path}");
    let scope = [("x-tally-scope", "payments:charge")];
    send(client.outbound.unwrap(), "POST", &url, &scope, "{}").await
}

/// The token the checkout sidecar holds for payments.
async fn token_of(client: &Started) -> String {
    let target = format!("/v1/token?audience={PAYMENTS}&scope=payments:charge");
    let (status, body) = local(client.socket.as_ref().unwrap(), "GET", &target, None).await;
    assert_eq!(status, 200, "{body}");
    body["access_token"].as_str().unwrap().to_owned()
}

fn claims_of(authorization: &str) -> serde_json::Value {
    support::proxy::claims_of(authorization)
}

/// The `(header, claims)` of a DPoP proof.
fn proof_parts(proof: &str) -> (serde_json::Value, serde_json::Value) {
    let part = |i: usize| {
        let segment = proof.split('.').nth(i).unwrap();
        serde_json::from_slice(&tally::jose::b64::decode(segment.as_bytes()).unwrap()).unwrap()
    };
    (part(0), part(1))
}

fn jkt_of_cert(der: &[u8]) -> String {
    tally::identity::PeerIdentity::of(der)
        .unwrap()
        .jkt
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_destination_gets_the_token_without_a_proof_over_mtls_bound_to_the_client_cert() {
    let mesh = Mesh::start().await;
    let server = Server::start(Speaks::Tls(mesh_server_config(&mesh, PAYMENTS).await)).await;
    let client = checkout(&mesh, server.addr, true).await;

    let answer = charge(&client, server.addr, "/v1/charges?x=1").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        answer.json()["served"],
        1,
        "the app got the server's answer"
    );

    let seen = server.requests();
    assert_eq!(seen.len(), 1);
    let seen = &seen[0];
    assert_eq!(seen.uri, format!("https://{}/v1/charges?x=1", server.addr));
    assert!(!seen.headers.contains_key("dpop"), "{:?}", seen.headers);
    assert!(!seen.headers.contains_key("x-tally-scope"));
    let authorization = seen.headers["authorization"].to_str().unwrap();
    assert!(authorization.starts_with("DPoP "), "{authorization}");
    let claims = claims_of(authorization);
    let cert = seen
        .client_cert
        .as_deref()
        .expect("the client showed its SVID");
    assert_eq!(claims["cnf"]["jkt"], jkt_of_cert(cert));
    assert_eq!(claims["sub"], CHECKOUT);
    assert_eq!(claims["aud"], PAYMENTS);
    let peer = tally::identity::PeerIdentity::of(cert).unwrap();
    assert_eq!(peer.spiffe_id.as_str(), CHECKOUT);
    // The token never crossed in clear.
    assert!(!server.raw().contains(&token_of(&client).await));
}

/// Sends one request at an impostor `server` and checks it got nothing.
async fn nothing_reaches(server: &Server, client: &Started) {
    let answer = charge(client, server.addr, "/v1/charges").await;
    assert_eq!(answer.status, 502, "{:?}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"], "upstream_unavailable");
    let description = body["error_description"].as_str().unwrap();
    assert!(
        description.contains(&format!("did not prove it is {PAYMENTS}")),
        "{description}"
    );
    assert!(server.requests().is_empty(), "{:?}", server.requests());
    let token = token_of(client).await;
    assert!(!description.contains(&token));
    let raw = server.raw();
    assert!(!raw.contains(&token), "the impostor read the token");
    assert!(!raw.contains("charges"), "the impostor read the request");
    let metrics = render_metrics(client);
    assert!(
        metrics.contains("tally_sidecar_outbound_requests_total{result=\"mtls_refused\"} 1"),
        "{metrics}"
    );
}

fn render_metrics(client: &Started) -> String {
    let mut out = String::new();
    client.sidecar.parts().outbound.render_metrics(&mut out);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_workload_of_the_mesh_at_the_address_gets_no_request_and_no_token() {
    let mesh = Mesh::start().await;
    let server = Server::start(Speaks::Tls(mesh_server_config(&mesh, REPORTING).await)).await;
    let client = checkout(&mesh, server.addr, true).await;
    nothing_reaches(&server, &client).await;
    assert_eq!(server.accepts(), 1, "it was dialled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_signed_certificate_naming_the_workload_gets_no_request_and_no_token() {
    let mesh = Mesh::start().await;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.subject_alt_names = vec![rcgen::SanType::URI(PAYMENTS.try_into().unwrap())];
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    let server = Server::start(Speaks::Tls(Arc::new(config))).await;
    let client = checkout(&mesh, server.addr, true).await;
    nothing_reaches(&server, &client).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_listener_at_a_mesh_address_gets_no_request_and_no_token() {
    let mesh = Mesh::start().await;
    let server = Server::start(Speaks::Plain).await;
    let client = checkout(&mesh, server.addr, true).await;
    nothing_reaches(&server, &client).await;
    // It was dialled, and read nothing but a TLS ClientHello.
    assert_eq!(server.accepts(), 1);
    assert_eq!(server.record.raw.lock().unwrap().first(), Some(&0x16));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_share_one_http2_connection() {
    let mesh = Mesh::start().await;
    let server = Server::start(Speaks::Tls(mesh_server_config(&mesh, PAYMENTS).await)).await;
    let client = Arc::new(checkout(&mesh, server.addr, true).await);
    const N: usize = 20;
    *server.record.together.lock().unwrap() = Some(Arc::new(tokio::sync::Barrier::new(N)));
    let mut all = tokio::task::JoinSet::new();
    for _ in 0..N {
        let (client, addr) = (Arc::clone(&client), server.addr);
        all.spawn(async move { charge(&client, addr, "/together").await.status });
    }
    while let Some(status) = all.join_next().await {
        assert_eq!(status.unwrap(), 200);
    }
    assert_eq!(server.accepts(), 1, "one TCP connection for all of them");
    assert_eq!(
        server.record.max_in_flight.load(Ordering::SeqCst),
        N,
        "all {N} were in flight at once on it"
    );
    assert!(server.requests().iter().all(|s| s.connection == 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_goaway_the_next_request_reconnects_and_succeeds() {
    let mesh = Mesh::start().await;
    let server = Server::start(Speaks::Tls(mesh_server_config(&mesh, PAYMENTS).await)).await;
    let client = checkout(&mesh, server.addr, true).await;
    assert_eq!(charge(&client, server.addr, "/bye").await.status, 200);
    server.closed(1).await;
    let answer = charge(&client, server.addr, "/v1/charges").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(server.accepts(), 2);
    assert_eq!(
        server.requests()[1].connection,
        2,
        "{:?}",
        server
            .requests()
            .iter()
            .map(|r| (r.uri.clone(), r.connection))
            .collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_after_the_pool_idle_time() {
    let mesh = Mesh::start().await;
    let server = Server::start(Speaks::Tls(mesh_server_config(&mesh, PAYMENTS).await)).await;
    let map =
        ServiceMap::with_transport([(server.addr.to_string(), PAYMENTS.parse().unwrap(), None)])
            .unwrap();
    let client = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                outbound: true,
                service_map: Some(map),
                outbound_config: Some(tally::sidecar::outbound::OutboundConfig {
                    pool_idle: Duration::from_millis(200),
                    ..Default::default()
                }),
                ..Parts::default()
            },
        )
        .await;
    assert_eq!(
        charge(&client, server.addr, "/v1/charges").await.status,
        200
    );
    // The pool closes it; the server sees the connection end.
    server.closed(1).await;
    assert_eq!(
        charge(&client, server.addr, "/v1/charges").await.status,
        200
    );
    assert_eq!(server.accepts(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_entry_sends_a_per_request_proof_in_clear_as_before() {
    let mesh = Mesh::start().await;
    let server = Server::start(Speaks::Plain).await;
    let client = checkout(&mesh, server.addr, false).await;
    let answer = charge(&client, server.addr, "/v1/charges").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let seen = &server.requests()[0];
    assert_eq!(seen.uri, "/v1/charges");
    let (header, claims) = proof_parts(seen.headers["dpop"].to_str().unwrap());
    assert_eq!(header["typ"], "dpop+jwt");
    assert_eq!(claims["htu"], format!("http://{}/v1/charges", server.addr));
    let token = claims_of(seen.headers["authorization"].to_str().unwrap());
    let key = tally::jose::PublicKey::from_jwk(&header["jwk"]).unwrap();
    assert_eq!(token["cnf"]["jkt"], key.thumbprint().to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_its_svid_renews_the_sidecar_redials_and_an_older_token_carries_a_proof() {
    let mut settings = support::broker::settings(support::mesh::POLICY);
    // Renewal at 40–60% of the life: within seconds.
    settings.svid_ttl = 12;
    let mesh = Mesh::start_with_settings(settings).await;
    let server = Server::start(Speaks::Tls(mesh_server_config(&mesh, PAYMENTS).await)).await;
    let client = checkout(&mesh, server.addr, true).await;
    assert_eq!(charge(&client, server.addr, "/one").await.status, 200);

    let mut svid = client.sidecar.parts().svid.clone();
    drop(svid.borrow_and_update());
    tokio::time::timeout(Duration::from_secs(15), svid.changed())
        .await
        .expect("the SVID was not renewed")
        .unwrap();
    let answer = charge(&client, server.addr, "/two").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);

    let seen = server.requests();
    assert_eq!(server.accepts(), 2, "a new connection for the new SVID");
    let (first, second) = (&seen[0], &seen[1]);
    assert_eq!((first.connection, second.connection), (1, 2));
    let (old_cert, new_cert) = (
        first.client_cert.as_deref().unwrap(),
        second.client_cert.as_deref().unwrap(),
    );
    assert_ne!(
        jkt_of_cert(old_cert),
        jkt_of_cert(new_cert),
        "the new certificate"
    );
    // The token cached before the renewal, still bound to the old key:
    // it proves possession per request, with that key, for https://.
    assert_eq!(
        first.headers["authorization"],
        second.headers["authorization"]
    );
    let token = claims_of(second.headers["authorization"].to_str().unwrap());
    assert_eq!(token["cnf"]["jkt"], jkt_of_cert(old_cert));
    let (header, claims) = proof_parts(second.headers["dpop"].to_str().unwrap());
    let key = tally::jose::PublicKey::from_jwk(&header["jwk"]).unwrap();
    assert_eq!(key.thumbprint().to_string(), jkt_of_cert(old_cert));
    assert_eq!(claims["htu"], format!("https://{}/two", server.addr));
    assert_eq!(claims["htm"], "POST");
    assert!(claims["ath"].is_string());
}

#[test]
fn a_service_map_asking_mtls_of_a_destination_outside_the_mesh_stops_the_sidecar() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("services.yaml");
    let text = "\
partner.example:443: {audience: https://api.partner.example, mtls: true}
pay.svc:80: {audience: spiffe://example.org/ns/pay/sa/payments, tls: yes}
";
    std::fs::write(&map, text).unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, "").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "sidecar",
            "--broker",
            "https://127.0.0.1:1",
            "--join-token",
            "x",
        ])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--service-map")
        .arg(&map)
        .args(["--admin-listen", "off"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Both faults at once, each naming its entry.
    assert!(
        stderr.contains("\"partner.example:443\" asks for mtls but its audience https://api.partner.example is not a workload's SPIFFE ID"),
        "{stderr}"
    );
    assert!(
        stderr.contains(":2:65: pay.svc:80: unknown key \"tls\""),
        "{stderr}"
    );
}
