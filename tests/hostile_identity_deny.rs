//! A compromised workload cut off with `identities deny`: its still-valid
//! SVID, a fresh join token, its tokens already out and its open Watch
//! stream all stop working — at the broker over real mTLS gRPC and HTTPS,
//! at every sidecar, and after the broker is killed and restarted — until
//! `identities allow`.

mod support;

use std::time::Duration;
use support::broker::{ServedBroker, Spawned, channel_as, csr, renew, serve_broker, settings};
use support::mesh::{CHECKOUT, Mesh, PAYMENTS, POLICY, Parts, REPORTING, authorize, local, send};
use tally::identity::SpiffeId;
use tally::proto::v1 as pb;
use tally::sidecar::watch::MeshState;
use tonic::transport::Channel;

const ADMIN: &str = "spiffe://example.org/admin";

async fn broker() -> (tempfile::TempDir, ServedBroker) {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let mut config = settings(POLICY);
    config.token_endpoint_nonce = false;
    let served = serve_broker(dir.path(), &key, config, "127.0.0.1:0").await;
    (dir, served)
}

/// `Tokens.Issue` of payments:read.
async fn issue(channel: &Channel, htu: &str) -> Result<pb::IssueResponse, tonic::Status> {
    support::broker::issue(channel, htu, PAYMENTS, "payments:read").await
}

async fn subscribe(channel: &Channel) -> Result<tonic::Streaming<pb::Update>, tonic::Status> {
    pb::watch_client::WatchClient::new(channel.clone())
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .map(tonic::Response::into_inner)
}

fn admin_client(served: &ServedBroker) -> pb::admin_client::AdminClient<Channel> {
    pb::admin_client::AdminClient::new(channel_as(served, ADMIN))
}

async fn deny(served: &ServedBroker, id: &str) {
    let (id, admin) = (id.parse().unwrap(), ADMIN.parse().unwrap());
    let broker = &served.broker;
    broker
        .deny_identity(&id, "pod compromised", &admin)
        .await
        .unwrap();
}

/// The broker's refusal of a denied identity: PERMISSION_DENIED, marked
/// for sidecars, naming the identity but not the admin's reason.
fn assert_denied(status: &tonic::Status, what: &str) {
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{what}: {status:?}"
    );
    let marked = status.metadata().contains_key("tally-identity-denied");
    assert!(marked, "{what}: {status:?}");
    assert!(status.message().contains(CHECKOUT), "{what}: {status:?}");
    assert!(
        !status.message().contains("compromised"),
        "{what}: {status:?}"
    );
}

/// Audit records of `kind` (a kind or family), as JSON.
async fn audited(served: &ServedBroker, kind: &str) -> Vec<serde_json::Value> {
    let filter = tally::store::AuditFilter {
        kind: Some(kind.into()),
        ..Default::default()
    };
    let records = served.broker.query_audit(&filter, 1000).await.unwrap();
    records
        .iter()
        .map(|r| serde_json::from_str(&r.line).unwrap())
        .collect()
}

/// Those that refused CHECKOUT as denied.
async fn denied_records(served: &ServedBroker, kind: &str) -> usize {
    let records = audited(served, kind).await;
    let denied = |v: &&serde_json::Value| {
        v["outcome"] == "denied" && v["reason"] == "identity_denied" && v["actor"] == CHECKOUT
    };
    records.iter().filter(denied).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_workloads_open_watch_ends_and_every_call_with_its_svid_is_refused() {
    let (_dir, served) = broker().await;
    let checkout = channel_as(&served, CHECKOUT);
    // Before: it renews, and its Watch stream delivers.
    renew(&checkout).await.unwrap();
    let mut watch = subscribe(&checkout).await.unwrap();
    assert!(watch.message().await.unwrap().is_some());

    let request = pb::DenyIdentityRequest {
        spiffe_id: CHECKOUT.into(),
        reason: "pod compromised".into(),
    };
    let denied = admin_client(&served).deny_identity(request).await.unwrap();
    let denied = denied.into_inner();
    assert!(denied.sequence > 0 && !denied.was_denied);

    // The stream open before the denial ends with it, promptly.
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            if let Err(status) = watch.message().await {
                return status;
            }
        }
    });
    let ended = ended
        .await
        .expect("the denied workload's Watch stayed open");
    assert_denied(&ended, "open Watch stream");
    // Its SVID is still valid, on a connection made before the denial.
    let htu = served.broker.issue_uri();
    assert_denied(&renew(&checkout).await.unwrap_err(), "Renew");
    assert_denied(&issue(&checkout, htu).await.unwrap_err(), "Issue");
    assert_denied(&subscribe(&checkout).await.unwrap_err(), "new Watch");
    let report = pb::reports_client::ReportsClient::new(checkout.clone())
        .verification_failures(pb::FailureReport::default())
        .await;
    assert_denied(&report.unwrap_err(), "Reports");
    // Another workload is served as before.
    let reporting = channel_as(&served, REPORTING);
    renew(&reporting).await.unwrap();
    issue(&reporting, htu).await.unwrap();
    // The denial is audited with its admin and reason.
    let record = &audited(&served, "identity.deny").await[0];
    assert_eq!(
        (&record["actor"], &record["spiffe_id"]),
        (&ADMIN.into(), &CHECKOUT.into())
    );
    assert_eq!(record["reason"], "pod compromised");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_svid_is_signed_for_a_denied_workload_and_its_refusals_are_audited_within_a_bound() {
    let (_dir, served) = broker().await;
    let broker = &served.broker;
    let checkout = channel_as(&served, CHECKOUT);
    deny(&served, CHECKOUT).await;
    // A fresh join token proves who it is, and gets it nothing.
    let id = CHECKOUT.parse().unwrap();
    let join = broker.create_join_token(&id, 600, None).await.unwrap();
    let request = pb::AttestRequest {
        credential: Some(pb::attest_request::Credential::JoinToken(
            join.expose().to_owned(),
        )),
        csr_der: csr(),
    };
    let attest = pb::identity_client::IdentityClient::new(channel_as(&served, REPORTING))
        .attest(request)
        .await;
    assert_denied(&attest.unwrap_err(), "Attest");
    // Nor can an admin mint it one.
    let request = pb::MintSvidRequest {
        spiffe_id: CHECKOUT.into(),
        ttl_seconds: 600,
        csr_der: csr(),
    };
    let mint = admin_client(&served).mint_svid(request).await.unwrap_err();
    assert_eq!(mint.code(), tonic::Code::FailedPrecondition, "{mint:?}");

    // Each refusal is audited as a denial under its call's kind.
    assert_denied(&renew(&checkout).await.unwrap_err(), "Renew");
    assert_denied(
        &issue(&checkout, broker.issue_uri()).await.unwrap_err(),
        "Issue",
    );
    assert_denied(&subscribe(&checkout).await.unwrap_err(), "Watch");
    for kind in [
        "identity.attest",
        "identity.renew",
        "token.issue",
        "call.refused",
    ] {
        assert_eq!(denied_records(&served, kind).await, 1, "{kind}");
    }
    // Retrying in a loop cannot flood the audit log: past a bound the
    // refusals are only counted.
    for _ in 0..30 {
        assert_denied(&renew(&checkout).await.unwrap_err(), "Renew again");
    }
    let renewals = denied_records(&served, "identity.renew").await;
    assert!((2..=20).contains(&renewals), "{renewals} refusals audited");
    let metrics = broker.render_metrics().await;
    let counted = r#"tally_broker_denied_identity_calls_total{call="renew"} 31"#;
    assert!(metrics.contains(counted), "{metrics}");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_admins_deny_or_allow_and_only_workloads_of_this_trust_domain() {
    let (_dir, served) = broker().await;
    let checkout = channel_as(&served, CHECKOUT);
    renew(&checkout).await.unwrap();
    let mut admin = admin_client(&served);
    let request = |id: &str| pb::DenyIdentityRequest {
        spiffe_id: id.into(),
        reason: String::new(),
    };
    // A workload can neither deny another nor allow itself.
    let mut own = pb::admin_client::AdminClient::new(checkout.clone());
    let refused = own.deny_identity(request(REPORTING)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let allow = pb::AllowIdentityRequest {
        spiffe_id: REPORTING.into(),
        reason: String::new(),
    };
    let refused = own.allow_identity(allow).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    let calls = audited(&served, "admin.call").await;
    let calls: Vec<_> = calls
        .iter()
        .map(|r| (r["call"].as_str(), r["actor"].as_str()))
        .collect();
    let refused = [Some("DenyIdentity"), Some("AllowIdentity")].map(|c| (c, Some(CHECKOUT)));
    assert_eq!(calls, refused);

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
        let status = admin.deny_identity(request(id)).await.unwrap_err();
        assert_eq!(status.code(), code, "{id}: {status:?}");
    }
    // An ID never seen may be denied ahead of time; both are listed.
    let ahead = "spiffe://example.org/ns/shop/sa/not-yet-deployed";
    admin.deny_identity(request(ahead)).await.unwrap();
    admin.deny_identity(request(CHECKOUT)).await.unwrap();
    let listed = admin.list_identities(pb::ListIdentitiesRequest {}).await;
    let listed = listed.unwrap().into_inner().identities;
    let state = |id: &str| {
        let info = listed.iter().find(|i| i.spiffe_id == id);
        info.map(|i| (i.denied, i.svids, i.denied_by.as_str()))
    };
    assert_eq!(state(CHECKOUT), Some((true, 1, ADMIN)));
    assert_eq!(state(ahead), Some((true, 0, ADMIN)));
    assert_eq!(state(REPORTING), None, "never seen, never denied");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_lets_the_workload_renew_get_tokens_and_follow_watch_again() {
    let (_dir, served) = broker().await;
    let checkout = channel_as(&served, CHECKOUT);
    deny(&served, CHECKOUT).await;
    assert_denied(&renew(&checkout).await.unwrap_err(), "Renew");
    let request = pb::AllowIdentityRequest {
        spiffe_id: CHECKOUT.into(),
        reason: "reimaged".into(),
    };
    let done = admin_client(&served).allow_identity(request).await.unwrap();
    assert!(done.into_inner().was_denied);
    renew(&checkout).await.unwrap();
    issue(&checkout, served.broker.issue_uri()).await.unwrap();
    subscribe(&checkout).await.unwrap();
    let record = &audited(&served, "identity.allow").await[0];
    assert_eq!(
        (&record["actor"], &record["reason"]),
        (&ADMIN.into(), &"reimaged".into())
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oauth_endpoints_refuse_a_denied_client_and_call_its_tokens_inactive() {
    let (_dir, served) = broker().await;
    let https = support::https::serve_https(&served).await;
    let broker = &served.broker;
    let mint = |id: &str| broker.mint_credential(&id.parse().unwrap(), 600).unwrap();
    let (checkout, admin) = (mint(CHECKOUT), mint(ADMIN));
    let audience = PAYMENTS.replace(':', "%3A").replace('/', "%2F");
    let form = format!("grant_type=client_credentials&scope=payments%3Aread&audience={audience}");
    let token = async |client| {
        let key = tally::dpop::ProofKey::generate().unwrap();
        let now = tally::clock::Clock::now(&tally::clock::SystemClock);
        let htu = format!("{}/oauth2/token", broker.issuer());
        let proof = key.mint("POST", &htu, None, None, now).unwrap();
        https
            .post(client, "/oauth2/token", &[("DPoP", &proof)], &form)
            .await
    };
    let (status, issued) = token(&checkout).await;
    assert_eq!(status, 200, "{issued}");
    let held = format!("token={}", issued["access_token"].as_str().unwrap());

    deny(&served, CHECKOUT).await;
    // RFC 6749 §5.2: client authentication failed, at every endpoint.
    let (status, refused) = token(&checkout).await;
    let invalid_client = (401, Some("invalid_client"));
    assert_eq!(
        (status, refused["error"].as_str()),
        invalid_client,
        "{refused}"
    );
    for path in ["/oauth2/introspect", "/oauth2/revoke"] {
        let (status, refused) = https.post(&checkout, path, &[], &held).await;
        assert_eq!(
            (status, refused["error"].as_str()),
            invalid_client,
            "{path}"
        );
    }
    // To an admin, a denied holder's token is not active: no sidecar takes it.
    let (status, seen) = https.post(&admin, "/oauth2/introspect", &[], &held).await;
    assert_eq!((status, seen), (200, serde_json::json!({"active": false})));
    https.stop().await;
    served.stop().await;
}

/// Waits (10 s at most) until `f` holds for a sidecar's mesh state.
async fn until(rx: &tokio::sync::watch::Receiver<MeshState>, f: impl FnMut(&MeshState) -> bool) {
    let mut rx = rx.clone();
    let waited = tokio::time::timeout(Duration::from_secs(10), rx.wait_for(f)).await;
    assert!(
        waited.is_ok_and(|r| r.is_ok()),
        "the sidecar never got there"
    );
}

/// `Authorization` and `DPoP` headers from the socket's answer.
fn credentials((authorization, dpop): &(String, String)) -> [(&str, &str); 2] {
    [("authorization", authorization), ("dpop", dpop)]
}

/// A sidecar for `id` with a socket, whose service map sends `inbound` to
/// payments.
async fn caller(mesh: &Mesh, id: &str, inbound: std::net::SocketAddr) -> support::mesh::Started {
    let started = socket_sidecar(mesh, id, inbound).await;
    // The freshly started inbound proxy asks for a nonce first.
    let scope = if id == CHECKOUT {
        "payments:charge"
    } else {
        "payments:read"
    };
    support::mesh::prime_nonce(started.socket.as_deref().unwrap(), inbound, scope).await;
    started
}

/// The same without calling `inbound` (nothing may listen there).
async fn socket_sidecar(
    mesh: &Mesh,
    id: &str,
    inbound: std::net::SocketAddr,
) -> support::mesh::Started {
    let services = vec![(inbound.to_string(), PAYMENTS.to_owned())];
    let parts = Parts {
        socket: true,
        services,
        ..Parts::default()
    };
    mesh.sidecar(id, parts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_sidecar_refuses_a_denied_workloads_token_still_valid_and_passes_the_others() {
    let mesh = Mesh::start().await;
    let app = support::mesh::App::start().await;
    let parts = Parts {
        inbound_to: Some(app.addr),
        ..Parts::default()
    };
    let payments = mesh.sidecar(PAYMENTS, parts).await;
    let inbound = payments.inbound.unwrap();
    let checkout = caller(&mesh, CHECKOUT, inbound).await;
    let reporting = caller(&mesh, REPORTING, inbound).await;
    // Headers made before the denial, for tokens valid for minutes.
    let (charge, read) = (
        format!("http://{inbound}/v1/charges"),
        format!("http://{inbound}/v1/b"),
    );
    let held = authorize(
        checkout.socket.as_ref().unwrap(),
        "POST",
        &charge,
        "payments:charge",
    );
    let held = held.await;
    let other = authorize(
        reporting.socket.as_ref().unwrap(),
        "GET",
        &read,
        "payments:read",
    );
    let other = other.await;

    deny(&mesh.broker, CHECKOUT).await;
    let id: SpiffeId = CHECKOUT.parse().unwrap();
    until(&payments.sidecar.parts().mesh, |m| m.denied.is_denied(&id)).await;
    let refused = send(inbound, "POST", "/v1/charges", &credentials(&held), "").await;
    assert_eq!(refused.status, 401);
    let challenge = refused.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("invalid_token") && challenge.contains("denied"),
        "{challenge}"
    );
    let passed = send(inbound, "GET", "/v1/b", &credentials(&other), "").await;
    assert_eq!(passed.status, 200, "another workload's token still passes");
    let mut metrics = String::new();
    payments
        .sidecar
        .parts()
        .inbound
        .as_ref()
        .unwrap()
        .metrics()
        .render(&mut metrics);
    assert!(
        metrics.contains(r#"result="identity_denied"} 1"#),
        "{metrics}"
    );
    for s in [checkout, reporting, payments] {
        s.sidecar.stop().await.unwrap();
    }
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denied_workloads_own_sidecar_says_so_instead_of_handing_out_its_cached_token() {
    let mesh = Mesh::start().await;
    let checkout = socket_sidecar(&mesh, CHECKOUT, "127.0.0.1:9".parse().unwrap()).await;
    let socket = checkout.socket.clone().unwrap();
    let ask = serde_json::json!({"method": "POST", "url": "http://127.0.0.1:9/v1/charges", "scope": "payments:charge"});
    // A token is cached before the denial.
    let (status, answer) = local(&socket, "POST", "/v1/authorize", Some(ask.clone())).await;
    assert_eq!(status, 200, "{answer}");

    deny(&mesh.broker, CHECKOUT).await;
    let parts = checkout.sidecar.parts();
    until(&parts.mesh, |m| m.own_identity_denied).await;
    let (status, answer) = local(&socket, "POST", "/v1/authorize", Some(ask.clone())).await;
    assert_eq!(status, 403, "{answer}");
    let said = answer["error_description"].as_str().unwrap();
    assert!(said.contains("denied"), "{answer}");
    let unready = tally::sidecar::admin::readiness(parts).unwrap_err();
    assert!(
        unready.iter().any(|why| why.contains("denied")),
        "{unready:?}"
    );

    // Allowed again: once the broker takes its Watch stream back (the
    // sidecar's reconnect backoff, seconds here), it hands out headers.
    let (id, admin) = (CHECKOUT.parse().unwrap(), ADMIN.parse().unwrap());
    mesh.broker
        .broker
        .allow_identity(&id, "", &admin)
        .await
        .unwrap();
    let mut rx = parts.mesh.clone();
    let back = tokio::time::timeout(
        Duration::from_secs(40),
        rx.wait_for(|m| !m.own_identity_denied),
    );
    back.await.unwrap().unwrap();
    let (status, answer) = local(&socket, "POST", "/v1/authorize", Some(ask)).await;
    assert_eq!(status, 200, "{answer}");
    checkout.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denial_made_with_ctl_holds_after_the_broker_is_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let (data, creds) = (dir.path().join("data"), dir.path().join("checkout"));
    let broker = Spawned::start(&data);
    let mint = ["svid", "mint", "--spiffe-id", CHECKOUT, "--out"];
    broker.ctl(&data, &[&mint[..], &[creds.to_str().unwrap()]].concat());
    renew(&broker.channel_with(&creds).await).await.unwrap();
    let deny = [
        "identities",
        "deny",
        CHECKOUT,
        "--reason",
        "pod compromised",
    ];
    let said = broker.ctl(&data, &deny);
    assert!(
        String::from_utf8_lossy(&said.stdout).starts_with("denied: "),
        "{said:?}"
    );
    // SIGKILL the moment ctl returns: what it acknowledged was durable.
    broker.kill();

    let broker = Spawned::start(&data);
    let checkout = broker.channel_with(&creds).await;
    let htu = format!("{}/tally.v1.Tokens/Issue", broker.issuer());
    assert_denied(&renew(&checkout).await.unwrap_err(), "Renew after restart");
    assert_denied(
        &issue(&checkout, &htu).await.unwrap_err(),
        "Issue after restart",
    );
    let listed = broker.ctl(&data, &["identities", "list", "--output", "json"]);
    let rows: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let rows = rows.as_array().unwrap();
    let row = rows.iter().find(|r| r["spiffe_id"] == CHECKOUT).unwrap();
    assert_eq!(
        (&row["denied"], &row["denied_reason"]),
        (&true.into(), &"pod compromised".into())
    );
    // The table says who denied it and why, as the runbook promises.
    let table = broker.ctl(&data, &["identities", "list"]);
    let table = String::from_utf8_lossy(&table.stdout);
    let line = table.lines().find(|l| l.starts_with(CHECKOUT)).unwrap();
    assert!(
        line.contains(" by spiffe://example.org/admin (\"pod compromised\")"),
        "{table}"
    );

    let said = broker.ctl(
        &data,
        &["identities", "allow", CHECKOUT, "--output", "json"],
    );
    let done: serde_json::Value = serde_json::from_slice(&said.stdout).unwrap();
    assert_eq!(done["was_denied"], true);
    renew(&checkout).await.unwrap();
    issue(&checkout, &htu).await.unwrap();
    broker.stop();
}
