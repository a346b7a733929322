//! A small mesh on loopback for end-to-end tests: a real broker, sidecars
//! started from their settings (attested with join tokens), a trivial app
//! that reports what it received, and a raw HTTP client that can speak to
//! a forward proxy.

use super::broker::{ServedBroker, serve_broker, settings};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tally::clock::SystemClock;
use tally::sidecar::api::ServiceMap;
use tally::sidecar::cache::CacheConfig;
use tally::sidecar::identity::Attestation;
use tally::sidecar::inbound::InboundConfig;
use tally::sidecar::outbound::OutboundConfig;
use tally::sidecar::run::{Listeners, Sidecar, SidecarSettings};
use tally::store::Sealer;

pub const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
pub const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
pub const REPORTING: &str = "spiffe://example.org/ns/finance/sa/reporting";
pub const POLICY: &str = include_str!("../fixtures/policy.yaml");
/// [`POLICY`], and every workload may hold a WIMSE WIT.
pub const POLICY_WITH_WIT: &str = concat!(
    include_str!("../fixtures/policy.yaml"),
    "wit:\n  - from: spiffe://example.org/ns/*/sa/*\n"
);

/// An app that answers every request with JSON describing it (method,
/// path, the x-tally-* headers, whether credentials reached it, body
/// length) and counts the requests it saw.
pub struct App {
    pub addr: std::net::SocketAddr,
    pub seen: Arc<AtomicU64>,
    stop: tokio::sync::oneshot::Sender<()>,
}

impl App {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(AtomicU64::new(0));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let counter = Arc::clone(&seen);
        tokio::spawn(tally::http::serve(
            listener,
            tally::http::Listen::new("test app"),
            move |mut req: http::Request<hyper::body::Incoming>, _peer| {
                let counter = Arc::clone(&counter);
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    // A path with `/ws/` and an Upgrade: switch protocols and echo
                    // every byte back, with the caller the sidecar named
                    // first, so a test sees both the check and the tunnel.
                    if req.uri().path().contains("/ws/") && req.headers().contains_key("upgrade") {
                        let caller = req
                            .headers()
                            .get("x-tally-caller")
                            .map(|v| v.as_bytes().to_vec())
                            .unwrap_or_default();
                        let asked = req.headers().get("upgrade").cloned().unwrap();
                        let upgrade = hyper::upgrade::on(&mut req);
                        tokio::spawn(async move {
                            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
                            let Ok(io) = upgrade.await else { return };
                            let mut io = hyper_util::rt::TokioIo::new(io);
                            let _ = io.write_all(&caller).await;
                            let _ = io.write_all(b"\n").await;
                            let mut buf = [0u8; 1024];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        });
                        let mut switching = http::Response::new(http_body_util::Full::new(
                            hyper::body::Bytes::new(),
                        ));
                        *switching.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                        switching.headers_mut().insert("upgrade", asked);
                        switching
                            .headers_mut()
                            .insert("connection", http::HeaderValue::from_static("upgrade"));
                        return switching;
                    }
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .map(|v| v.to_str().unwrap_or("").to_owned())
                    };
                    let tally_headers: Vec<String> = req
                        .headers()
                        .keys()
                        .map(|k| k.as_str().to_owned())
                        .filter(|k| k.starts_with("x-tally-"))
                        .collect();
                    let description = serde_json::json!({
                        "method": req.method().as_str(),
                        "path": req.uri().path_and_query().map(|p| p.as_str()),
                        "host": header("host"),
                        "upgrade": header("upgrade"),
                        "caller": header("x-tally-caller"),
                        "scopes": header("x-tally-scopes"),
                        "token_id": header("x-tally-token-id"),
                        "transport": header("x-tally-transport"),
                        "tally_headers": tally_headers,
                        "authorization": header("authorization").is_some(),
                        "dpop": header("dpop").is_some(),
                        "wit": header("workload-identity-token").is_some(),
                        "wpt": header("workload-proof-token").is_some(),
                    });
                    let body = req.into_body().collect().await.unwrap().to_bytes();
                    let mut description = description;
                    description["body_len"] = body.len().into();
                    tally::http::json(http::StatusCode::OK, &description)
                }
            },
            async {
                let _ = stopped.await;
            },
        ));
        Self { addr, seen, stop }
    }

    pub fn stop(self) {
        let _ = self.stop.send(());
    }
}

/// The broker and a store directory.
pub struct Mesh {
    pub dir: tempfile::TempDir,
    pub broker: ServedBroker,
}

/// What to run for one sidecar.
#[derive(Default)]
pub struct Parts {
    pub socket: bool,
    /// Serve the SPIFFE Workload API on a socket of its own.
    pub spiffe: bool,
    pub inbound_to: Option<std::net::SocketAddr>,
    pub outbound: bool,
    pub admin: bool,
    pub nonces: bool,
    pub strict: bool,
    pub services: Vec<(String, String)>,
    /// Refuse inbound requests when the Watch stream is stale.
    pub deny_when_stale: bool,
    /// The sidecar's clock (the system clock when unset).
    pub clock: Option<Arc<dyn tally::clock::Clock>>,
    /// How often refusals are reported (100 ms when unset).
    pub report_every: Option<std::time::Duration>,
    /// Only these uids may use the socket and the outbound proxy.
    pub allowed_uids: Option<Vec<u32>>,
    /// Listener limits (the defaults when unset).
    pub limits: Option<tally::http::Limits>,
    /// `--inbound-authority` values.
    pub authorities: Vec<String>,
    /// Bind the inbound proxy here (a restarted sidecar takes its
    /// predecessor's port); port 0 when unset.
    pub inbound_at: Option<std::net::SocketAddr>,
    /// `--inbound-mtls required` (else optional).
    pub mtls_required: bool,
    /// The whole service map (mTLS entries included), instead of the
    /// plaintext `services`.
    pub service_map: Option<ServiceMap>,
    /// Outbound proxy settings (`strict` still comes from `strict`).
    pub outbound_config: Option<OutboundConfig>,
    /// Serve Envoy's ext_authz on 127.0.0.1:0 (with the inbound proxy's
    /// check settings above).
    pub ext_authz: bool,
    /// Serve Envoy's ext_authz on a Unix socket in the mesh's directory
    /// instead (peer uids checked against `allowed_uids`).
    pub ext_authz_socket: bool,
    /// Let credentials through to the app (`--pass-credentials`).
    pub pass_credentials: bool,
}

/// A started sidecar and where it listens.
pub struct Started {
    pub sidecar: Sidecar,
    pub socket: Option<std::path::PathBuf>,
    pub spiffe: Option<std::path::PathBuf>,
    pub inbound: Option<std::net::SocketAddr>,
    pub outbound: Option<std::net::SocketAddr>,
    pub admin: Option<std::net::SocketAddr>,
    pub ext_authz: Option<std::net::SocketAddr>,
    pub ext_authz_socket: Option<std::path::PathBuf>,
}

impl Mesh {
    pub async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = Sealer::generate_key_text().unwrap();
        let broker = serve_broker(dir.path(), &key, settings(POLICY), "127.0.0.1:0").await;
        Self { dir, broker }
    }

    /// A mesh whose broker runs with `settings` (e.g. a short SVID TTL).
    pub async fn start_with_settings(settings: tally::broker::BrokerSettings) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = Sealer::generate_key_text().unwrap();
        let broker = serve_broker(dir.path(), &key, settings, "127.0.0.1:0").await;
        Self { dir, broker }
    }

    /// An X.509-SVID for `id` from this mesh's broker, attested with a
    /// fresh join token (a test server can present it).
    pub async fn svid(&self, id: &str) -> tally::sidecar::identity::Svid {
        let join = self
            .broker
            .broker
            .create_join_token(&id.parse().unwrap(), 600, None)
            .await
            .unwrap();
        let client = tally::sidecar::identity::IdentityClient::new(
            self.broker.url(),
            self.broker.broker.bundle_pem(),
        );
        let how = Attestation::JoinToken(join.expose().to_owned().into());
        client
            .attest(&how, tally::clock::Clock::now(&SystemClock))
            .await
            .unwrap()
    }

    /// A mesh whose broker serves `policy` and reads `clock`.
    pub async fn start_with(policy: &str, clock: Arc<dyn tally::clock::Clock>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let key = Sealer::generate_key_text().unwrap();
        let store = tally::store::Store::open_sqlite(
            &dir.path().join("tally.db"),
            Sealer::from_key_material(key.as_bytes()).unwrap(),
        )
        .await
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let broker =
            super::broker::serve_store_with_clock(store, settings(policy), listener, clock).await;
        Self { dir, broker }
    }

    /// A sidecar for `id`, attested with a fresh join token, ready (keys,
    /// bundle and access rules in hand) when this returns.
    pub async fn sidecar(&self, id: &str, parts: Parts) -> Started {
        let join = self
            .broker
            .broker
            .create_join_token(&id.parse().unwrap(), 600, None)
            .await
            .unwrap();
        let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
        let socket_path = parts.socket.then(|| {
            self.dir
                .path()
                .join(format!("{}.sock", id.rsplit('/').next().unwrap()))
        });
        let spiffe_path = parts.spiffe.then(|| {
            self.dir
                .path()
                .join(format!("{}.spiffe.sock", id.rsplit('/').next().unwrap()))
        });
        let mut listeners = Listeners {
            socket: socket_path
                .as_ref()
                .map(|p| tally::sidecar::api::bind(p).unwrap()),
            spiffe: spiffe_path
                .as_ref()
                .map(|p| tally::sidecar::api::bind(p).unwrap()),
            ..Listeners::default()
        };
        if parts.inbound_to.is_some() {
            listeners.inbound = Some(match parts.inbound_at {
                Some(at) => tokio::net::TcpListener::bind(at).await.unwrap(),
                None => bind().await,
            });
        }
        if parts.outbound {
            listeners.outbound = Some(bind().await);
        }
        if parts.admin {
            listeners.admin = Some(bind().await);
        }
        let mut ext_authz = None;
        if parts.ext_authz {
            let listener = bind().await;
            ext_authz = Some(listener.local_addr().unwrap());
            listeners.ext_authz = Some(tally::sidecar::ext_authz::ExtAuthzListener::Tcp(listener));
        }
        let ext_authz_socket = parts.ext_authz_socket.then(|| {
            let path = self
                .dir
                .path()
                .join(format!("{}-authz.sock", id.rsplit('/').next().unwrap()));
            listeners.ext_authz = Some(tally::sidecar::ext_authz::ExtAuthzListener::Unix(
                tally::sidecar::api::bind(&path).unwrap(),
            ));
            path
        });
        let report_every = parts
            .report_every
            .unwrap_or(std::time::Duration::from_millis(100));
        let authorities: Vec<_> = parts
            .authorities
            .iter()
            .map(|a| tally::auth::target::Authority::parse(a).unwrap())
            .collect();
        let addr =
            |l: &Option<tokio::net::TcpListener>| l.as_ref().map(|l| l.local_addr().unwrap());
        let (inbound, outbound, admin) = (
            addr(&listeners.inbound),
            addr(&listeners.outbound),
            addr(&listeners.admin),
        );
        let settings = SidecarSettings {
            broker: self.broker.url(),
            bundle_pem: self.broker.broker.bundle_pem(),
            attestation: Attestation::JoinToken(join.expose().to_owned().into()),
            services: parts.service_map.clone().unwrap_or_else(|| {
                ServiceMap::new(
                    parts
                        .services
                        .iter()
                        .map(|(h, a)| (h.clone(), a.parse().unwrap())),
                )
                .unwrap()
            }),
            allowed_uids: parts.allowed_uids.clone(),
            cache: CacheConfig::default(),
            inbound: parts.inbound_to.map(|up| {
                let mut c = InboundConfig::new(up.to_string());
                c.deny_when_stale = parts.deny_when_stale;
                c.pass_credentials = parts.pass_credentials;
                // Refusals reach the broker's audit log quickly.
                c.report_every = report_every;
                c.authorities = authorities.clone();
                if parts.mtls_required {
                    c.mtls = tally::sidecar::mtls::InboundMtls::Required;
                }
                c
            }),
            ext_authz: (parts.ext_authz || parts.ext_authz_socket).then(|| {
                let mut c = tally::sidecar::ext_authz::ExtAuthzConfig {
                    pass_credentials: parts.pass_credentials,
                    report_every,
                    ..Default::default()
                };
                c.gate.deny_when_stale = parts.deny_when_stale;
                c.gate.authorities = authorities.clone();
                c
            }),
            inbound_nonces: parts.nonces,
            outbound: OutboundConfig {
                strict: parts.strict,
                ..parts.outbound_config.clone().unwrap_or_default()
            },
            watch_staleness: 30,
            limits: parts.limits.unwrap_or_default(),
        };
        let clock = parts.clock.clone().unwrap_or_else(|| Arc::new(SystemClock));
        let sidecar = Sidecar::start(settings, listeners, clock).await.unwrap();
        assert!(
            sidecar.ready(Duration::from_secs(10)).await,
            "the sidecar never became ready"
        );
        Started {
            sidecar,
            socket: socket_path,
            spiffe: spiffe_path,
            inbound,
            outbound,
            admin,
            ext_authz,
            ext_authz_socket,
        }
    }
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

/// Sends one HTTP/1.1 request to `addr` on a new connection. `target` is
/// the request target as written: a path, or an absolute URL for a proxy.
pub async fn send(
    addr: std::net::SocketAddr,
    method: &str,
    target: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Answer {
    let mut request = http::Request::builder().method(method).uri(target);
    let mut has_host = false;
    for (name, value) in headers {
        has_host |= name.eq_ignore_ascii_case("host");
        request = request.header(*name, *value);
    }
    if !has_host {
        request = request.header("host", addr.to_string());
    }
    let answer = tally::http::send(addr, request.body(Full::new(body.into())).unwrap(), 1 << 24)
        .await
        .unwrap();
    Answer {
        status: answer.status.as_u16(),
        headers: answer.headers,
        body: answer.body,
    }
}

/// One request to the local API over its Unix socket; (status, JSON).
pub async fn local(
    socket: &std::path::Path,
    method: &str,
    target: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = http::Request::builder()
        .method(method)
        .uri(target)
        .header("host", "tally")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&body).unwrap())
}

/// `Authorization` and `DPoP` values from the local API for one request.
pub async fn authorize(
    socket: &std::path::Path,
    method: &str,
    url: &str,
    scope: &str,
) -> (String, String) {
    authorize_with_nonce(socket, method, url, scope, None).await
}

/// Primes `socket`'s sidecar with a server nonce from the inbound proxy
/// at `inbound`, as a client does after its first `use_dpop_nonce`: a
/// freshly started inbound proxy demands one (it cannot know which proofs
/// its predecessor saw), and the sidecar puts the last nonce it was given
/// for an origin into every later proof for it.
pub async fn prime_nonce(socket: &std::path::Path, inbound: std::net::SocketAddr, scope: &str) {
    let url = format!("http://{inbound}/nonce");
    let (authorization, dpop) = authorize(socket, "GET", &url, scope).await;
    let answer = send(
        inbound,
        "GET",
        "/nonce",
        &[("authorization", &authorization), ("dpop", &dpop)],
        "",
    )
    .await;
    if let Some(nonce) = answer.header("dpop-nonce") {
        assert_eq!(answer.status, 401);
        authorize_with_nonce(socket, "GET", &url, scope, Some(nonce)).await;
    }
}

/// The same, with the `DPoP-Nonce` a server asked for.
pub async fn authorize_with_nonce(
    socket: &std::path::Path,
    method: &str,
    url: &str,
    scope: &str,
    nonce: Option<&str>,
) -> (String, String) {
    let mut ask = serde_json::json!({"method": method, "url": url, "scope": scope});
    if let Some(nonce) = nonce {
        ask["nonce"] = nonce.into();
    }
    let (status, headers) = local(socket, "POST", "/v1/authorize", Some(ask)).await;
    assert_eq!(status, 200, "{headers}");
    (
        headers["authorization"].as_str().unwrap().to_owned(),
        headers["dpop"].as_str().unwrap().to_owned(),
    )
}
