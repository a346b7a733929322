//! The broker's HTTPS listener over real TLS on 127.0.0.1:0: the OAuth
//! token endpoint (mTLS client auth + DPoP), JWKS and RFC 8414 metadata,
//! with a real SQLite store; and the admin port.

use serde_json::Value;
use std::sync::Arc;
use tally::broker::{Broker, BrokerSettings};
use tally::ca::Credential;
use tally::clock::{Clock, SystemClock};
use tally::dpop::ProofKey;
use tally::store::{Sealer, Store};
use tally::token::{Jwks, TokenConfig, verify};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::oneshot;

const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
const POLICY: &str = include_str!("fixtures/policy.yaml");

struct Running {
    broker: Arc<Broker>,
    https: std::net::SocketAddr,
    admin: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    running: tally::broker::Running,
    dir: tempfile::TempDir,
}

impl Running {
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.running.wait().await.unwrap();
    }

    fn token_url(&self) -> String {
        format!("https://localhost:{}/oauth2/token", self.https.port())
    }
}

async fn start(nonce: bool) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let https = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (https_addr, admin_addr) = (https.local_addr().unwrap(), admin.local_addr().unwrap());
    let store = Store::open_sqlite(
        &dir.path().join("tally.db"),
        Sealer::from_key_material(Sealer::generate_key_text().unwrap().as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let mut settings = BrokerSettings::with_policy("example.org", POLICY).unwrap();
    settings.issuer = format!("https://localhost:{}", https_addr.port());
    settings.token_endpoint_nonce = nonce;
    settings.audit_file = Some(dir.path().join("audit.jsonl"));
    let (stop, stopped) = oneshot::channel::<()>();
    let listeners = tally::broker::Listeners {
        grpc: tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        https: Some(https),
        admin: Some(admin),
    };
    let parts = tally::broker::Parts::new(settings, store);
    let running = tally::broker::start(parts, listeners, async {
        let _ = stopped.await;
    })
    .await
    .unwrap();
    Running {
        broker: Arc::clone(&running.broker),
        https: https_addr,
        admin: admin_addr,
        stop: Some(stop),
        running,
        dir,
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug)]
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Reply {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Sends one HTTP/1.1 request (`Connection: close`) over TLS to the
/// broker, with `client` as the client certificate if given.
async fn https(
    r: &Running,
    client: Option<&Credential>,
    head: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Reply {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(r.broker.bundle_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match client {
        Some(c) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(c.cert_chain_pem.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let tcp = tokio::net::TcpStream::connect(r.https).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut request = format!(
        "{head} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        request.push_str(&format!("{n}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request.push_str(body);
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // The server may close without close_notify after answering.
    let _ = tls.read_to_end(&mut raw).await;
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("a whole response");
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
    Reply {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// A plain HTTP GET on the admin port.
async fn admin_get(r: &Running, path: &str) -> Reply {
    let mut tcp = tokio::net::TcpStream::connect(r.admin).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await.unwrap();
    parse_reply(&raw)
}

const FORM: &str = "application/x-www-form-urlencoded";

fn form(scope: &str) -> String {
    format!(
        "grant_type=client_credentials&audience={}&scope={}",
        PAYMENTS.replace(':', "%3A").replace('/', "%2F"),
        scope.replace(' ', "+").replace(':', "%3A")
    )
}

async fn post_token(r: &Running, client: Option<&Credential>, proof: &str, body: &str) -> Reply {
    https(
        r,
        client,
        "POST /oauth2/token",
        &[("Content-Type", FORM), ("DPoP", proof)],
        body,
    )
    .await
}

fn checkout(r: &Running) -> Credential {
    r.broker
        .mint_credential(&CHECKOUT.parse().unwrap(), 600)
        .unwrap()
}

#[tokio::test]
async fn a_dpop_client_with_an_svid_gets_a_bound_token_after_the_nonce_dance() {
    let r = start(true).await;
    let client = checkout(&r);
    let key = ProofKey::generate().unwrap();
    let now = SystemClock.now();

    // First try without a nonce: use_dpop_nonce and a nonce to use.
    let proof = key.mint("POST", &r.token_url(), None, None, now).unwrap();
    let first = post_token(&r, Some(&client), &proof, &form("payments:charge")).await;
    assert_eq!(first.status, 400, "{first:?}");
    assert_eq!(first.json()["error"], "use_dpop_nonce");
    let nonce = first
        .header("dpop-nonce")
        .expect("a DPoP-Nonce header")
        .to_owned();

    let proof = key
        .mint("POST", &r.token_url(), None, Some(&nonce), now)
        .unwrap();
    let ok = post_token(&r, Some(&client), &proof, &form("payments:charge")).await;
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.header("cache-control"), Some("no-store"));
    assert!(ok.header("dpop-nonce").is_some(), "a nonce for next time");
    let body = ok.json();
    assert_eq!(body["token_type"], "DPoP");
    assert_eq!(body["scope"], "payments:charge");
    let expires_in = body["expires_in"].as_u64().unwrap();
    assert!((295..=300).contains(&expires_in), "{expires_in}");

    // The token verifies against the published JWKS and is bound to the key.
    let jwks_reply = https(&r, None, "GET /.well-known/jwks.json", &[], "").await;
    assert_eq!(jwks_reply.status, 200);
    let jwks = Jwks::parse(jwks_reply.body.as_bytes()).unwrap();
    let config = TokenConfig::new(r.broker.issuer(), PAYMENTS.parse().unwrap());
    let access = body["access_token"].as_str().unwrap();
    let claims = verify(access, &jwks, &config, SystemClock.now(), &mut ()).unwrap();
    assert_eq!(claims.sub.as_str(), CHECKOUT);
    assert_eq!(claims.jkt, key.thumbprint());

    // Recorded in the inventory and the audit log, never as the token.
    let live = r.broker.store().live_tokens(now, 10).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].jti, claims.jti);
    let audit = std::fs::read_to_string(r.dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains(&claims.jti), "{audit}");
    assert!(audit.contains("\"via\":\"oauth\""), "{audit}");
    assert!(!audit.contains(access));
    r.stop().await;
}

#[tokio::test]
async fn metadata_and_jwks_need_no_client_certificate() {
    let r = start(true).await;
    let meta = https(
        &r,
        None,
        "GET /.well-known/oauth-authorization-server",
        &[],
        "",
    )
    .await;
    assert_eq!(meta.status, 200, "{meta:?}");
    let m = meta.json();
    assert_eq!(m["issuer"], r.broker.issuer());
    assert_eq!(m["token_endpoint"], r.token_url());
    assert_eq!(
        m["jwks_uri"],
        format!("{}/.well-known/jwks.json", r.broker.issuer())
    );
    assert_eq!(m["dpop_signing_alg_values_supported"][0], "ES256");
    assert_eq!(
        m["token_endpoint_auth_methods_supported"][0],
        "tls_client_auth"
    );
    assert_eq!(m["grant_types_supported"][0], "client_credentials");
    assert_eq!(m["tls_client_certificate_bound_access_tokens"], false);
    assert_eq!(m["tally_grpc_issue_htu"], r.broker.issue_uri());
    r.stop().await;
}

#[tokio::test]
async fn the_token_endpoint_answers_each_mistake_with_its_oauth_error() {
    let r = start(false).await;
    let client = checkout(&r);
    let key = ProofKey::generate().unwrap();
    let proof = || {
        key.mint("POST", &r.token_url(), None, None, SystemClock.now())
            .unwrap()
    };
    let expect = |reply: Reply, status: u16, code: &str| {
        assert_eq!(reply.status, status, "{reply:?}");
        assert_eq!(reply.json()["error"], code, "{reply:?}");
        reply
    };

    // No client certificate: invalid_client.
    let reply = post_token(&r, None, &proof(), &form("payments:charge")).await;
    expect(reply, 401, "invalid_client");
    // client_id naming someone else.
    let body = format!(
        "{}&client_id=spiffe%3A%2F%2Fexample.org%2Fother",
        form("payments:charge")
    );
    expect(
        post_token(&r, Some(&client), &proof(), &body).await,
        401,
        "invalid_client",
    );
    // Another grant type.
    let body = form("payments:charge").replace("client_credentials", "password");
    expect(
        post_token(&r, Some(&client), &proof(), &body).await,
        400,
        "unsupported_grant_type",
    );
    // A repeated parameter.
    let body = format!("{}&scope=payments%3Aread", form("payments:charge"));
    expect(
        post_token(&r, Some(&client), &proof(), &body).await,
        400,
        "invalid_request",
    );
    // No audience.
    expect(
        post_token(&r, Some(&client), &proof(), "grant_type=client_credentials").await,
        400,
        "invalid_request",
    );
    // A scope the policy does not grant: invalid_scope, naming it.
    let reply = expect(
        post_token(&r, Some(&client), &proof(), &form("payments:refund")).await,
        400,
        "invalid_scope",
    );
    assert!(
        reply.json()["error_description"]
            .as_str()
            .unwrap()
            .contains("payments:refund")
    );
    // An audience no rule covers: unauthorized_client.
    let body =
        "grant_type=client_credentials&audience=spiffe%3A%2F%2Fexample.org%2Fns%2Fx%2Fsa%2Fy";
    expect(
        post_token(&r, Some(&client), &proof(), body).await,
        400,
        "unauthorized_client",
    );
    // A proof for another URL, and no proof at all.
    let wrong = key
        .mint(
            "POST",
            "https://elsewhere.example/oauth2/token",
            None,
            None,
            SystemClock.now(),
        )
        .unwrap();
    expect(
        post_token(&r, Some(&client), &wrong, &form("payments:charge")).await,
        400,
        "invalid_dpop_proof",
    );
    let reply = https(
        &r,
        Some(&client),
        "POST /oauth2/token",
        &[("Content-Type", FORM)],
        &form("payments:charge"),
    )
    .await;
    expect(reply, 400, "invalid_dpop_proof");
    // A replayed proof: the first use works, the second does not.
    let once = proof();
    expect_ok(post_token(&r, Some(&client), &once, &form("payments:read")).await);
    expect(
        post_token(&r, Some(&client), &once, &form("payments:read")).await,
        400,
        "invalid_dpop_proof",
    );
    // Not a form.
    let reply = https(
        &r,
        Some(&client),
        "POST /oauth2/token",
        &[("Content-Type", "application/json"), ("DPoP", &proof())],
        "{}",
    )
    .await;
    expect(reply, 400, "invalid_request");
    // Too large a body.
    let big = format!("{}&pad={}", form("payments:charge"), "a".repeat(9000));
    expect(
        post_token(&r, Some(&client), &proof(), &big).await,
        400,
        "invalid_request",
    );
    // GET on the token endpoint.
    let reply = https(&r, Some(&client), "GET /oauth2/token", &[], "").await;
    assert_eq!(reply.status, 405);
    assert_eq!(reply.header("allow"), Some("POST"));

    // Every refusal that reached the policy is audited as denied.
    let records = r.broker.store().audit_after(0, 100).await.unwrap();
    let denied: Vec<Value> = records
        .iter()
        .map(|rec| serde_json::from_str::<Value>(&rec.line).unwrap())
        .filter(|v| v["kind"] == "token.issue" && v["outcome"] == "denied")
        .collect();
    let reasons: Vec<&str> = denied
        .iter()
        .map(|v| v["reason"].as_str().unwrap())
        .collect();
    assert!(reasons.contains(&"scope_not_granted"), "{reasons:?}");
    assert!(reasons.contains(&"no_rule"), "{reasons:?}");
    assert!(reasons.contains(&"dpop_replayed"), "{reasons:?}");
    assert!(reasons.contains(&"dpop_invalid"), "{reasons:?}");
    r.stop().await;
}

fn expect_ok(reply: Reply) {
    assert_eq!(reply.status, 200, "{reply:?}");
}

#[tokio::test]
async fn curl_with_an_svid_and_a_dpop_header_gets_a_token() {
    // curl is a stock TLS client: mTLS with the SVID, the DPoP header
    // made by `tally dpop sign` semantics (ProofKey::mint), no nonce.
    let r = start(false).await;
    let client = checkout(&r);
    std::fs::write(r.dir.path().join("cert.pem"), &client.cert_chain_pem).unwrap();
    std::fs::write(r.dir.path().join("key.pem"), client.key_pem.as_bytes()).unwrap();
    std::fs::write(r.dir.path().join("bundle.pem"), r.broker.bundle_pem()).unwrap();
    let key = ProofKey::generate().unwrap();
    let proof = key
        .mint("POST", &r.token_url(), None, None, SystemClock.now())
        .unwrap();
    let dir = r.dir.path().to_owned();
    let url = r.token_url();
    let port = r.https.port();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["--silent", "--show-error", "--fail-with-body"])
            .arg("--resolve")
            .arg(format!("localhost:{port}:127.0.0.1"))
            .arg("--cacert")
            .arg(dir.join("bundle.pem"))
            .arg("--cert")
            .arg(dir.join("cert.pem"))
            .arg("--key")
            .arg(dir.join("key.pem"))
            .args(["-H", &format!("DPoP: {proof}")])
            .args(["--data-urlencode", "grant_type=client_credentials"])
            .args(["--data-urlencode", &format!("audience={PAYMENTS}")])
            .args(["--data-urlencode", "scope=payments:read"])
            .arg(url)
            .output()
            .expect("curl is installed (.ci/run installs it)")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(body["token_type"], "DPoP");
    assert_eq!(body["scope"], "payments:read");
    r.stop().await;
}

#[tokio::test]
async fn the_admin_port_serves_health_readiness_and_metrics() {
    let r = start(false).await;
    let client = checkout(&r);
    let key = ProofKey::generate().unwrap();
    for scope in ["payments:read", "payments:refund"] {
        let proof = key
            .mint("POST", &r.token_url(), None, None, SystemClock.now())
            .unwrap();
        post_token(&r, Some(&client), &proof, &form(scope)).await;
    }
    assert_eq!(admin_get(&r, "/healthz").await.status, 200);
    let ready = admin_get(&r, "/readyz").await;
    assert_eq!(ready.status, 200, "{ready:?}");
    let metrics = admin_get(&r, "/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = &metrics.body;
    assert!(
        text.contains("tally_broker_issuance_total{result=\"issued\",class=\"service\"} 1\n"),
        "{text}"
    );
    assert!(
        text.contains(
            "tally_broker_issuance_total{result=\"scope_not_granted\",class=\"none\"} 1\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("tally_broker_issuance_duration_seconds_count 2\n"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE tally_broker_signing_key_age_seconds gauge"),
        "{text}"
    );
    assert!(text.contains("tally_broker_svids_live 0\n"), "{text}");
    // One token issued, to one holder.
    assert!(text.contains("tally_broker_live_tokens 1\n"), "{text}");
    assert!(
        text.contains("tally_broker_live_token_holders 1\n"),
        "{text}"
    );
    assert!(
        text.contains("tally_broker_live_tokens_max_per_holder 1\n"),
        "{text}"
    );
    assert_eq!(admin_get(&r, "/nope").await.status, 404);
    r.stop().await;
}

#[tokio::test]
async fn a_stock_oauth_client_discovers_the_broker_and_gets_a_dpop_token() {
    // oauth4webapi (tests/clients, pinned by its package-lock.json): RFC
    // 8414 discovery, tls_client_auth with the SVID, a DPoP proof of its
    // own, and the use_dpop_nonce retry.
    let clients = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/clients");
    if !std::path::Path::new(clients)
        .join("node_modules/oauth4webapi")
        .exists()
    {
        let status = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--prefix", clients])
            .status()
            .expect("npm is installed (.ci/run installs it)");
        assert!(status.success(), "npm ci in tests/clients failed");
    }
    let r = start(true).await;
    let client = checkout(&r);
    let dir = r.dir.path().to_owned();
    std::fs::write(dir.join("cert.pem"), &client.cert_chain_pem).unwrap();
    std::fs::write(dir.join("key.pem"), client.key_pem.as_bytes()).unwrap();
    std::fs::write(dir.join("bundle.pem"), r.broker.bundle_pem()).unwrap();
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/clients/oauth4webapi.mjs"
    );
    let issuer = r.broker.issuer().to_owned();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("node")
            .arg(script)
            .env("ISSUER", issuer)
            .env("CA", dir.join("bundle.pem"))
            .env("CERT", dir.join("cert.pem"))
            .env("KEY", dir.join("key.pem"))
            .env("CLIENT_ID", CHECKOUT)
            .env("AUDIENCE", PAYMENTS)
            .env("SCOPE", "payments:charge")
            .output()
            .expect("node is installed")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let body: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(body["token_type"], "dpop", "oauth4webapi lower-cases it");
    assert_eq!(body["scope"], "payments:charge");
    assert_eq!(
        body["nonce_retries"], 1,
        "the broker asked for a nonce once"
    );
    let jwks = Jwks::parse(r.broker.jwks().to_json().to_string().as_bytes()).unwrap();
    let config = TokenConfig::new(r.broker.issuer(), PAYMENTS.parse().unwrap());
    let claims = verify(
        body["access_token"].as_str().unwrap(),
        &jwks,
        &config,
        SystemClock.now(),
        &mut (),
    )
    .unwrap();
    assert_eq!(claims.sub.as_str(), CHECKOUT);
    r.stop().await;
}

/// `POST path` with `token=…` as `who`.
async fn ask(r: &Running, who: &Credential, path: &str, token: String) -> Reply {
    let body = format!("token={token}&token_type_hint=access_token");
    https(r, Some(who), path, &[("Content-Type", FORM)], &body).await
}

#[tokio::test]
async fn introspection_and_revocation_serve_the_holder_and_admins_only() {
    let r = start(false).await;
    let client = checkout(&r);
    let key = ProofKey::generate().unwrap();
    let proof = key
        .mint("POST", &r.token_url(), None, None, SystemClock.now())
        .unwrap();
    let issued = post_token(&r, Some(&client), &proof, &form("payments:charge")).await;
    assert_eq!(issued.status, 200, "{issued:?}");
    let token = issued.json()["access_token"].as_str().unwrap().to_owned();
    let stranger = r
        .broker
        .mint_credential(&PAYMENTS.parse().unwrap(), 600)
        .unwrap();
    let admin = r
        .broker
        .mint_credential(&"spiffe://example.org/admin".parse().unwrap(), 600)
        .unwrap();
    // The holder and an admin see the token; a stranger learns nothing.
    for who in [&client, &admin] {
        let seen = ask(&r, who, "POST /oauth2/introspect", token.clone()).await;
        assert_eq!(seen.status, 200, "{seen:?}");
        assert_eq!(seen.header("cache-control"), Some("no-store"));
        let v = seen.json();
        assert_eq!(v["active"], true, "{v}");
        assert_eq!(v["sub"], CHECKOUT);
        assert_eq!(v["client_id"], CHECKOUT);
        assert_eq!(v["aud"], PAYMENTS);
        assert_eq!(v["scope"], "payments:charge");
        assert_eq!(v["tcl"], "service");
        assert_eq!(v["cnf"]["jkt"], key.thumbprint().to_string());
        assert!(v["exp"].as_u64().unwrap() > v["iat"].as_u64().unwrap());
    }
    let hidden = ask(&r, &stranger, "POST /oauth2/introspect", token.clone()).await;
    assert_eq!(hidden.json(), serde_json::json!({"active": false}));
    // A forged token naming the real jti is not found.
    let mut forged = token.clone();
    forged.pop();
    forged.push(if token.ends_with('A') { 'B' } else { 'A' });
    let fake = ask(&r, &admin, "POST /oauth2/introspect", forged).await;
    assert_eq!(fake.json()["active"], false);
    let missing = https(
        &r,
        Some(&admin),
        "POST /oauth2/introspect",
        &[("Content-Type", FORM)],
        "",
    )
    .await;
    assert_eq!(missing.status, 400);

    // Revocation: a stranger's attempt changes nothing (and is answered as
    // for an invalid token, RFC 7009 §2.2); unknown tokens are fine; the
    // holder may, and then the token is inactive for everyone.
    let ignored = ask(&r, &stranger, "POST /oauth2/revoke", token.clone()).await;
    assert_eq!(ignored.status, 200);
    let still = ask(&r, &admin, "POST /oauth2/introspect", token.clone()).await;
    assert_eq!(still.json()["active"], true);
    let unknown = ask(&r, &client, "POST /oauth2/revoke", "not.a.token".into()).await;
    assert_eq!(unknown.status, 200);
    let done = ask(&r, &client, "POST /oauth2/revoke", token.clone()).await;
    assert_eq!(done.status, 200, "{done:?}");
    let after = ask(&r, &admin, "POST /oauth2/introspect", token.clone()).await;
    assert_eq!(after.json()["active"], false);
    let audit = std::fs::read_to_string(r.dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"kind\":\"token.revoke\""), "{audit}");
    assert!(!audit.contains(&token), "never the token itself");

    // The metadata names both endpoints.
    let meta = https(
        &r,
        None,
        "GET /.well-known/oauth-authorization-server",
        &[],
        "",
    )
    .await;
    let meta = meta.json();
    assert!(
        meta["introspection_endpoint"]
            .as_str()
            .unwrap()
            .ends_with("/oauth2/introspect")
    );
    assert!(
        meta["revocation_endpoint"]
            .as_str()
            .unwrap()
            .ends_with("/oauth2/revoke")
    );
    r.stop().await;
}

#[tokio::test]
async fn an_admin_revokes_a_workloads_token_through_the_revocation_endpoint() {
    let r = start(false).await;
    let client = checkout(&r);
    let key = ProofKey::generate().unwrap();
    let proof = key
        .mint("POST", &r.token_url(), None, None, SystemClock.now())
        .unwrap();
    let issued = post_token(&r, Some(&client), &proof, &form("payments:charge")).await;
    assert_eq!(issued.status, 200, "{issued:?}");
    let token = issued.json()["access_token"].as_str().unwrap().to_owned();
    let admin = r
        .broker
        .mint_credential(&"spiffe://example.org/admin".parse().unwrap(), 600)
        .unwrap();

    let done = ask(&r, &admin, "POST /oauth2/revoke", token.clone()).await;
    assert_eq!(done.status, 200, "{done:?}");
    // Inactive for everyone, the holder included.
    for who in [&admin, &client] {
        let seen = ask(&r, who, "POST /oauth2/introspect", token.clone()).await;
        assert_eq!(seen.json(), serde_json::json!({"active": false}));
    }
    // A revocation of that jti in the state every sidecar gets, audited as
    // the admin's, never with the token.
    let claims = verify(
        &token,
        &r.broker.jwks(),
        &TokenConfig::new(r.broker.issuer(), PAYMENTS.parse().unwrap()),
        SystemClock.now(),
        &mut (),
    )
    .unwrap();
    let state = r
        .broker
        .store()
        .current_state(SystemClock.now())
        .await
        .unwrap();
    let entries: Vec<_> = state
        .iter()
        .filter(|c| c.kind == "revocation")
        .map(|c| tally::token::Revocation::from_json(&c.body).unwrap())
        .collect();
    assert_eq!(entries.len(), 1);
    assert_eq!(
        entries[0].target,
        tally::token::RevocationTarget::Jti(claims.jti.clone())
    );
    let filter = tally::store::AuditFilter {
        kind: Some("token.revoke".into()),
        ..Default::default()
    };
    let audit = r.broker.store().audit_query(&filter, 10).await.unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let record: Value = serde_json::from_str(&audit[0].line).unwrap();
    assert_eq!(record["actor"], "spiffe://example.org/admin");
    assert_eq!(record["outcome"], "ok");
    assert_eq!(record["jti"], claims.jti.as_str());
    assert!(!audit[0].line.contains(&token));
    r.stop().await;
}
