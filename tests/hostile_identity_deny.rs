//! A compromised workload cut off with `identities deny`: its still-valid
//! SVID, a fresh join token, its tokens already out and its open Watch
//! stream all stop working — at the broker over real mTLS gRPC and HTTPS,
//! at every sidecar, and after the broker is killed and restarted — until
//! `identities allow`.

mod support;

use std::time::Duration;
use support::broker::{Spawned, channel_as, serve_broker, settings};
use support::mesh::{CHECKOUT, Mesh, PAYMENTS, POLICY, Parts, REPORTING, authorize, local, send};
use tally::proto::v1 as pb;
use tonic::transport::Channel;

const ADMIN: &str = "spiffe://example.org/admin";

fn csr() -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::default();
    params.serialize_request(&key).unwrap().der().to_vec()
}

async fn renew(channel: &Channel) -> Result<pb::SvidResponse, tonic::Status> {
    pb::identity_client::IdentityClient::new(channel.clone())
        .renew(pb::RenewRequest { csr_der: csr() })
        .await
        .map(tonic::Response::into_inner)
}

/// `Tokens.Issue` for payments:read, with a valid proof for `htu`.
async fn issue(channel: &Channel, htu: &str) -> Result<pb::IssueResponse, tonic::Status> {
    let now = tally::clock::Clock::now(&tally::clock::SystemClock);
    let proof = tally::dpop::ProofKey::generate().unwrap();
    pb::tokens_client::TokensClient::new(channel.clone())
        .issue(pb::IssueRequest {
            audience: PAYMENTS.into(),
            scopes: vec!["payments:read".into()],
            ttl_seconds: 0,
            dpop_proof: proof.mint("POST", htu, None, None, now).unwrap(),
        })
        .await
        .map(tonic::Response::into_inner)
}

async fn subscribe(channel: &Channel) -> Result<tonic::Streaming<pb::Update>, tonic::Status> {
    pb::watch_client::WatchClient::new(channel.clone())
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .map(tonic::Response::into_inner)
}

fn admin_client(served: &support::broker::ServedBroker) -> pb::admin_client::AdminClient<Channel> {
    pb::admin_client::AdminClient::new(channel_as(served, ADMIN))
}

/// The broker's refusal of a denied identity: PERMISSION_DENIED, marked
/// for sidecars, naming the identity but not the admin's reason.
fn assert_denied(status: &tonic::Status, what: &str) {
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{what}: {status:?}"
    );
    assert!(
        status.metadata().contains_key("tally-identity-denied"),
        "{what}: {status:?}"
    );
    assert!(status.message().contains(CHECKOUT), "{what}: {status:?}");
    assert!(
        !status.message().contains("pod compromised"),
        "{what}: {status:?}"
    );
}

/// Audit records of `kind` that refused CHECKOUT as denied.
async fn denied_records(broker: &tally::broker::Broker, kind: &str) -> Vec<serde_json::Value> {
    let filter = tally::store::AuditFilter {
        kind: Some(kind.into()),
        ..Default::default()
    };
    let records = broker.query_audit(&filter, 1000).await.unwrap();
    records
        .iter()
        .map(|r| serde_json::from_str::<serde_json::Value>(&r.line).unwrap())
        .filter(|v| v["outcome"] == "denied" && v["reason"] == "identity_denied")
        .filter(|v| v["actor"] == CHECKOUT)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_identity_is_refused_every_broker_call_and_its_open_watch_ends() {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings(POLICY), "127.0.0.1:0").await;
    let broker = &served.broker;
    let checkout = channel_as(&served, CHECKOUT);
    // Before: it renews, and its Watch stream delivers.
    renew(&checkout).await.unwrap();
    let mut watch = subscribe(&checkout).await.unwrap();
    assert!(watch.message().await.unwrap().is_some());

    let denied = admin_client(&served)
        .deny_identity(pb::DenyIdentityRequest {
            spiffe_id: CHECKOUT.into(),
            reason: "pod compromised".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(denied.sequence > 0 && !denied.was_denied);

    // The stream open before the denial ends with it, promptly.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Err(status) = watch.message().await {
                return status;
            }
        }
    })
    .await
    .expect("the denied workload's Watch stream stayed open");
    assert_denied(&ended, "open Watch stream");
    // Its SVID is still valid, on a connection made before the denial.
    assert_denied(&renew(&checkout).await.unwrap_err(), "Renew");
    assert_denied(
        &issue(&checkout, broker.issue_uri()).await.unwrap_err(),
        "Issue",
    );
    assert_denied(&subscribe(&checkout).await.unwrap_err(), "new Watch");
    let report = pb::reports_client::ReportsClient::new(checkout.clone())
        .verification_failures(pb::FailureReport::default())
        .await;
    assert_denied(&report.unwrap_err(), "Reports");
    // A fresh join token for it proves who it is, and gets nothing.
    let join = broker
        .create_join_token(&CHECKOUT.parse().unwrap(), 600, None)
        .await
        .unwrap();
    let attest = pb::identity_client::IdentityClient::new(channel_as(&served, REPORTING))
        .attest(pb::AttestRequest {
            credential: Some(pb::attest_request::Credential::JoinToken(
                join.expose().to_owned(),
            )),
            csr_der: csr(),
        })
        .await;
    assert_denied(&attest.unwrap_err(), "Attest");
    // Nor can an admin mint it one.
    let mint = admin_client(&served)
        .mint_svid(pb::MintSvidRequest {
            spiffe_id: CHECKOUT.into(),
            ttl_seconds: 600,
            csr_der: csr(),
        })
        .await
        .unwrap_err();
    assert_eq!(mint.code(), tonic::Code::FailedPrecondition, "{mint:?}");
    // Another workload is served as before.
    renew(&channel_as(&served, REPORTING)).await.unwrap();
    issue(&channel_as(&served, REPORTING), broker.issue_uri())
        .await
        .unwrap();

    // Each refusal is audited as a denial, the denial itself with its reason.
    for kind in [
        "identity.renew",
        "token.issue",
        "identity.attest",
        "call.refused",
    ] {
        assert!(!denied_records(broker, kind).await.is_empty(), "{kind}");
    }
    let deny = tally::store::AuditFilter {
        kind: Some("identity.deny".into()),
        ..Default::default()
    };
    let line = &broker.query_audit(&deny, 10).await.unwrap()[0].line;
    assert!(
        line.contains(r#""actor":"spiffe://example.org/admin""#),
        "{line}"
    );
    assert!(line.contains(r#""reason":"pod compromised""#), "{line}");
    let metrics = broker.render_metrics().await;
    assert!(
        metrics.contains(r#"tally_broker_denied_identity_calls_total{call="renew"} 1"#),
        "{metrics}"
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_lifts_the_denial_and_only_admins_decide_for_workloads_of_this_domain() {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings(POLICY), "127.0.0.1:0").await;
    let broker = &served.broker;
    let checkout = channel_as(&served, CHECKOUT);
    renew(&checkout).await.unwrap();
    let mut admin = admin_client(&served);
    let deny = |id: &str| pb::DenyIdentityRequest {
        spiffe_id: id.into(),
        reason: String::new(),
    };

    // A workload cannot deny, nor allow itself.
    let mut own = pb::admin_client::AdminClient::new(checkout.clone());
    let refused = own.deny_identity(deny(REPORTING)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    admin.deny_identity(deny(CHECKOUT)).await.unwrap();
    assert_denied(&renew(&checkout).await.unwrap_err(), "Renew");
    let allow = pb::AllowIdentityRequest {
        spiffe_id: CHECKOUT.into(),
        reason: "reimaged".into(),
    };
    let refused = own.allow_identity(allow.clone()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let calls = tally::store::AuditFilter {
        kind: Some("admin.call".into()),
        ..Default::default()
    };
    let refusals = broker.query_audit(&calls, 10).await.unwrap();
    assert!(
        refusals[0].line.contains(r#""call":"DenyIdentity""#),
        "{refusals:?}"
    );

    // IDs that do not name a workload here are refused, and so are the
    // admins and the broker itself (denying an admin would lock out allow).
    for (id, code) in [
        ("not a spiffe id", tonic::Code::InvalidArgument),
        (
            "spiffe://other.org/ns/shop/sa/checkout",
            tonic::Code::InvalidArgument,
        ),
        ("spiffe://example.org", tonic::Code::InvalidArgument),
        (ADMIN, tonic::Code::FailedPrecondition),
        (
            "spiffe://example.org/tally/broker",
            tonic::Code::FailedPrecondition,
        ),
    ] {
        let status = admin.deny_identity(deny(id)).await.unwrap_err();
        assert_eq!(status.code(), code, "{id}: {status:?}");
    }
    // An ID never seen may be denied ahead of time; both are listed.
    let ahead = "spiffe://example.org/ns/shop/sa/not-yet-deployed";
    admin.deny_identity(deny(ahead)).await.unwrap();
    let listed = admin
        .list_identities(pb::ListIdentitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .identities;
    let state = |id: &str| {
        listed
            .iter()
            .find(|i| i.spiffe_id == id)
            .map(|i| (i.denied, i.svids))
    };
    assert_eq!(state(CHECKOUT), Some((true, 1)));
    assert_eq!(state(ahead), Some((true, 0)));

    // Allowed again: it renews, gets tokens and follows Watch.
    let done = admin.allow_identity(allow).await.unwrap().into_inner();
    assert!(done.was_denied);
    renew(&checkout).await.unwrap();
    issue(&checkout, broker.issue_uri()).await.unwrap();
    subscribe(&checkout).await.unwrap();
    let allowed = tally::store::AuditFilter {
        kind: Some("identity.allow".into()),
        ..Default::default()
    };
    let line = &broker.query_audit(&allowed, 10).await.unwrap()[0].line;
    assert!(line.contains(r#""reason":"reimaged""#), "{line}");
    served.stop().await;
}

/// One HTTPS request to the broker's OAuth listener with `client` as the
/// client certificate; (status, JSON body).
async fn oauth(
    addr: std::net::SocketAddr,
    bundle_pem: &str,
    client: &tally::ca::Credential,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, serde_json::Value) {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
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
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\nContent-Type: application/x-www-form-urlencoded\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    tls.write_all(format!("{head}\r\n{body}").as_bytes())
        .await
        .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (status, serde_json::from_str(body).unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oauth_endpoints_refuse_a_denied_client_and_call_its_tokens_inactive() {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let mut config = settings(POLICY);
    config.token_endpoint_nonce = false;
    let served = serve_broker(dir.path(), &key, config, "127.0.0.1:0").await;
    let broker = std::sync::Arc::clone(&served.broker);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https = listener.local_addr().unwrap();
    let certs = broker
        .server_certs(&["localhost".into()], &["127.0.0.1".parse().unwrap()])
        .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tally::broker::serve_https(
        std::sync::Arc::clone(&broker),
        listener,
        certs,
        async {
            let _ = stopped.await;
        },
    ));
    let bundle = broker.bundle_pem();
    let mint = |id: &str| broker.mint_credential(&id.parse().unwrap(), 600).unwrap();
    let (checkout, admin) = (mint(CHECKOUT), mint(ADMIN));
    let form = format!(
        "grant_type=client_credentials&scope=payments%3Aread&audience={}",
        PAYMENTS.replace(':', "%3A").replace('/', "%2F")
    );
    let token = |client| {
        let key = tally::dpop::ProofKey::generate().unwrap();
        let now = tally::clock::Clock::now(&tally::clock::SystemClock);
        let htu = format!("{}/oauth2/token", broker.issuer());
        let proof = key.mint("POST", &htu, None, None, now).unwrap();
        let (bundle, form) = (bundle.clone(), form.clone());
        async move {
            oauth(
                https,
                &bundle,
                client,
                "/oauth2/token",
                &[("DPoP", &proof)],
                &form,
            )
            .await
        }
    };
    let (status, issued) = token(&checkout).await;
    assert_eq!(status, 200, "{issued}");
    let held = format!("token={}", issued["access_token"].as_str().unwrap());

    broker
        .deny_identity(
            &CHECKOUT.parse().unwrap(),
            "pod compromised",
            &ADMIN.parse().unwrap(),
        )
        .await
        .unwrap();
    // RFC 6749 §5.2: client authentication failed.
    let (status, refused) = token(&checkout).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (401, Some("invalid_client")),
        "{refused}"
    );
    for path in ["/oauth2/introspect", "/oauth2/revoke"] {
        let (status, refused) = oauth(https, &bundle, &checkout, path, &[], &held).await;
        assert_eq!(
            (status, refused["error"].as_str()),
            (401, Some("invalid_client")),
            "{path}"
        );
    }
    // To an admin, a denied holder's token is not active: no sidecar takes it.
    let (status, seen) = oauth(https, &bundle, &admin, "/oauth2/introspect", &[], &held).await;
    assert_eq!(
        (status, &seen),
        (200, &serde_json::json!({"active": false}))
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_refuse_a_denied_workloads_tokens_and_its_own_sidecar_says_so() {
    let mesh = Mesh::start().await;
    let app = support::mesh::App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let caller = |id| {
        let services = vec![(inbound.to_string(), PAYMENTS.to_owned())];
        mesh.sidecar(
            id,
            Parts {
                socket: true,
                services,
                ..Parts::default()
            },
        )
    };
    let (checkout, reporting) = (caller(CHECKOUT).await, caller(REPORTING).await);
    let (checkout_socket, reporting_socket) = (
        checkout.socket.clone().unwrap(),
        reporting.socket.clone().unwrap(),
    );
    let charge = format!("http://{inbound}/v1/charges");
    let read = format!("http://{inbound}/v1/balance");
    // Headers made before the denial, for a token still valid for minutes.
    let held = authorize(&checkout_socket, "POST", &charge, "payments:charge").await;
    let other = authorize(&reporting_socket, "GET", &read, "payments:read").await;

    let id: tally::identity::SpiffeId = CHECKOUT.parse().unwrap();
    let admin = ADMIN.parse().unwrap();
    mesh.broker
        .broker
        .deny_identity(&id, "pod compromised", &admin)
        .await
        .unwrap();
    let wait = |rx: &tokio::sync::watch::Receiver<tally::sidecar::watch::MeshState>,
                f: fn(&tally::sidecar::watch::MeshState) -> bool| {
        let mut rx = rx.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f))
                .await
                .unwrap()
                .unwrap();
        }
    };
    wait(&payments.sidecar.parts().mesh, |m| m.denied.len() == 1).await;
    let refused = send(
        inbound,
        "POST",
        "/v1/charges",
        &[("authorization", &held.0), ("dpop", &held.1)],
        "",
    )
    .await;
    assert_eq!(refused.status, 401);
    let challenge = refused.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("invalid_token") && challenge.contains("denied"),
        "{challenge}"
    );
    let passed = send(
        inbound,
        "GET",
        "/v1/balance",
        &[("authorization", &other.0), ("dpop", &other.1)],
        "",
    )
    .await;
    assert_eq!(passed.status, 200, "another workload's token still passes");
    let metrics = {
        let mut out = String::new();
        payments
            .sidecar
            .parts()
            .inbound
            .as_ref()
            .unwrap()
            .metrics()
            .render(&mut out);
        out
    };
    assert!(
        metrics.contains(r#"result="identity_denied"} 1"#),
        "{metrics}"
    );

    // The denied workload's own sidecar: its Watch stream was ended, and
    // its socket says why instead of handing out the cached token.
    wait(&checkout.sidecar.parts().mesh, |m| m.own_identity_denied).await;
    let ask = serde_json::json!({"method": "POST", "url": charge, "scope": "payments:charge"});
    let (status, answer) =
        local(&checkout_socket, "POST", "/v1/authorize", Some(ask.clone())).await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer["error_description"]
            .as_str()
            .unwrap()
            .contains("denied"),
        "{answer}"
    );

    // Allowed again: it follows Watch again and gets headers.
    mesh.broker
        .broker
        .allow_identity(&id, "", &admin)
        .await
        .unwrap();
    let mut rx = checkout.sidecar.parts().mesh.clone();
    tokio::time::timeout(
        Duration::from_secs(40),
        rx.wait_for(|m| !m.own_identity_denied),
    )
    .await
    .unwrap()
    .unwrap();
    let (status, answer) = local(&checkout_socket, "POST", "/v1/authorize", Some(ask)).await;
    assert_eq!(status, 200, "{answer}");
    for s in [checkout, reporting, payments] {
        s.sidecar.stop().await.unwrap();
    }
    mesh.broker.stop().await;
}

/// `tally ctl ARGS` against `broker` as the admin in `data`.
fn ctl(broker: &Spawned, data: &std::path::Path, args: &[&str]) -> std::process::Output {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("ctl")
        .args(args)
        .arg("--broker")
        .arg(format!(
            "https://{}",
            broker.grpc.replace("127.0.0.1", "localhost")
        ))
        .arg("--data-dir")
        .arg(data)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// An mTLS channel to `broker` with the credential `ctl svid mint` wrote.
async fn channel_from(broker: &Spawned, dir: &std::path::Path) -> Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("bundle.pem")))
        .identity(Identity::from_pem(read("cert.pem"), read("key.pem")))
        .domain_name("localhost");
    Channel::from_shared(format!("https://{}", broker.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_made_with_ctl_holds_after_the_broker_is_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let creds = dir.path().join("checkout");
    let broker = Spawned::start(&data);
    let out = creds.to_str().unwrap();
    ctl(
        &broker,
        &data,
        &["svid", "mint", "--spiffe-id", CHECKOUT, "--out", out],
    );
    renew(&channel_from(&broker, &creds).await).await.unwrap();
    let said = ctl(
        &broker,
        &data,
        &[
            "identities",
            "deny",
            CHECKOUT,
            "--reason",
            "pod compromised",
        ],
    );
    assert!(
        String::from_utf8_lossy(&said.stdout).starts_with("denied: "),
        "{said:?}"
    );
    // SIGKILL the moment ctl returns: what it acknowledged was durable.
    broker.kill();

    let broker = Spawned::start(&data);
    let checkout = channel_from(&broker, &creds).await;
    assert_denied(&renew(&checkout).await.unwrap_err(), "Renew after restart");
    let issuer = broker
        .https_line
        .split("issuer ")
        .nth(1)
        .unwrap()
        .trim()
        .to_owned();
    let htu = format!("{issuer}/tally.v1.Tokens/Issue");
    assert_denied(
        &issue(&checkout, &htu).await.unwrap_err(),
        "Issue after restart",
    );
    let listed = ctl(&broker, &data, &["identities", "list", "--output", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["spiffe_id"] == CHECKOUT)
        .unwrap();
    assert_eq!(
        (&row["denied"], &row["denied_reason"]),
        (&true.into(), &"pod compromised".into())
    );

    let said = ctl(
        &broker,
        &data,
        &["identities", "allow", CHECKOUT, "--output", "json"],
    );
    let done: serde_json::Value = serde_json::from_slice(&said.stdout).unwrap();
    assert_eq!(done["was_denied"], true);
    renew(&checkout).await.unwrap();
    issue(&checkout, &htu).await.unwrap();
    broker.stop();
}
