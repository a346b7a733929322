//! The broker over real mTLS gRPC on 127.0.0.1:0, with a real SQLite store.

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, SanType};
use std::sync::Arc;
use tally::broker::{Broker, BrokerSettings};
use tally::clock::{Clock, SystemClock};
use tally::dpop::ProofKey;
use tally::identity::SpiffeId;
use tally::proto::v1 as pb;
use tally::store::{Sealer, Store};
use tally::token::{TokenConfig, verify};
use tokio::sync::oneshot;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
const POLICY: &str = include_str!("fixtures/policy.yaml");

struct Running {
    broker: Arc<Broker>,
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    running: tally::broker::Running,
    _dir: Option<tempfile::TempDir>,
}

impl Running {
    /// Stops the server and waits for it to end: a panic in it (at stop
    /// or before) fails the test, and so does a server that does not end
    /// within its 10 s drain plus a margin.
    async fn stop(mut self) {
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

async fn start_in(dir: &std::path::Path, key: &str, policy: &str) -> Running {
    start_with_clock(dir, key, policy, Arc::new(SystemClock)).await
}

/// A broker on the store in `dir` reading `clock`, started as `tally
/// broker` starts one, gRPC only.
async fn start_with_clock(
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

async fn start(policy: &str) -> Running {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let mut running = start_in(dir.path(), &key, policy).await;
    running._dir = Some(dir);
    running
}

async fn channel(
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

fn csr(sans: &[&str]) -> (KeyPair, Vec<u8>) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    (key, der)
}

fn pem(label: &str, der: &[u8]) -> String {
    tally::ca::pem(label, der)
}

/// Attests `id` with a fresh join token and returns an mTLS identity.
async fn workload(r: &Running, id: &str) -> Identity {
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
async fn tokens_as(r: &Running, id: &str) -> pb::tokens_client::TokensClient<Channel> {
    let identity = workload(r, id).await;
    pb::tokens_client::TokensClient::new(channel(r, Some(identity)).await.unwrap())
}

fn issue_request(r: &Running, key: &ProofKey, scopes: &[&str], ttl: u32) -> pb::IssueRequest {
    pb::IssueRequest {
        audience: PAYMENTS.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ttl_seconds: ttl,
        dpop_proof: key
            .mint("POST", r.broker.issue_uri(), None, None, SystemClock.now())
            .unwrap(),
    }
}

#[tokio::test]
async fn attest_with_a_join_token_gives_an_svid_once() {
    let r = start(POLICY).await;
    let id: SpiffeId = "spiffe://example.org/vm/build-1".parse().unwrap();
    let token = r.broker.create_join_token(&id, 600, None).await.unwrap();
    let mut client = pb::identity_client::IdentityClient::new(channel(&r, None).await.unwrap());
    let attest = |t: &str| pb::AttestRequest {
        credential: Some(pb::attest_request::Credential::JoinToken(t.into())),
        csr_der: csr(&[]).1,
    };
    let svid = client
        .attest(attest(token.expose()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(svid.spiffe_id, id.to_string());
    assert_eq!(tally::ca::spiffe_id_of(&svid.svid_der).unwrap(), id);
    let ttl = svid.expires_at - SystemClock.now() as i64;
    assert!((3590..=3600).contains(&ttl), "ttl {ttl}");
    assert!(!svid.bundle_der.is_empty());

    let again = client.attest(attest(token.expose())).await.unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied);
    let unknown = client.attest(attest("tally-jt-nope")).await.unwrap_err();
    assert_eq!(unknown.code(), Code::PermissionDenied);

    // Audited: the attestation, then both refusals with their reasons;
    // the join token itself appears nowhere.
    let lines: Vec<serde_json::Value> = r
        .broker
        .store()
        .audit_after(0, 10)
        .await
        .unwrap()
        .iter()
        .map(|a| serde_json::from_str::<serde_json::Value>(&a.line).unwrap())
        .filter(|l| l["kind"] == "identity.attest")
        .collect();
    let summary: Vec<(&str, &str, &str)> = lines
        .iter()
        .map(|l| {
            (
                l["kind"].as_str().unwrap(),
                l["outcome"].as_str().unwrap(),
                l["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("identity.attest", "ok", ""),
            ("identity.attest", "denied", "join token already used"),
            ("identity.attest", "denied", "unknown join token"),
        ]
    );
    assert_eq!(lines[0]["actor"], id.as_str());
    assert!(
        lines
            .iter()
            .all(|l| !l.to_string().contains(token.expose()))
    );
    r.stop().await;
}

#[tokio::test]
async fn a_csr_for_another_identity_is_refused() {
    let r = start(POLICY).await;
    let token = r
        .broker
        .create_join_token(&"spiffe://example.org/vm/a".parse().unwrap(), 600, None)
        .await
        .unwrap();
    let mut client = pb::identity_client::IdentityClient::new(channel(&r, None).await.unwrap());
    let err = client
        .attest(pb::AttestRequest {
            credential: Some(pb::attest_request::Credential::JoinToken(
                token.expose().into(),
            )),
            csr_der: csr(&[CHECKOUT]).1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains(CHECKOUT), "{}", err.message());
    r.stop().await;
}

#[tokio::test]
async fn renew_needs_the_current_svid_and_keeps_the_identity() {
    let r = start(POLICY).await;
    let identity = workload(&r, CHECKOUT).await;
    let mut client =
        pb::identity_client::IdentityClient::new(channel(&r, Some(identity)).await.unwrap());
    let renewed = client
        .renew(pb::RenewRequest {
            csr_der: csr(&[]).1,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(renewed.spiffe_id, CHECKOUT);

    let mut anonymous = pb::identity_client::IdentityClient::new(channel(&r, None).await.unwrap());
    let err = anonymous
        .renew(pb::RenewRequest {
            csr_der: csr(&[]).1,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    r.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_in_the_handshake() {
    let r = start(POLICY).await;
    let other = start(POLICY).await;
    let issue_as = |identity: Identity| async {
        let mut client = pb::tokens_client::TokensClient::new(
            channel(&r, Some(identity))
                .await
                .map_err(|e| e.to_string())?,
        );
        let key = ProofKey::generate().unwrap();
        client
            .issue(issue_request(&r, &key, &["payments:read"], 0))
            .await
            .map(tonic::Response::into_inner)
            .map_err(|e| e.to_string())
    };
    // The control: a credential from this broker gets its token.
    let issued = issue_as(workload(&r, CHECKOUT).await).await.unwrap();
    assert_eq!(issued.token_type, "DPoP");

    // The same call with the same identity certified by another broker's
    // CA (same trust domain, same names, another key): the server ends
    // the TLS handshake with a fatal alert (the chain's signature does not
    // verify under its root), before any RPC is heard.
    let refused = issue_as(workload(&other, CHECKOUT).await)
        .await
        .unwrap_err();
    assert!(
        refused.contains("transport error")
            && refused.contains("received fatal alert: DecryptError"),
        "{refused}"
    );
    assert_eq!(
        r.broker.store().count_issued().await.unwrap(),
        1,
        "only the control's token was issued"
    );
    r.stop().await;
    other.stop().await;
}

#[tokio::test]
async fn an_allowed_request_gets_a_bound_verifiable_recorded_token() {
    let r = start(POLICY).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    let issued = client
        .issue(issue_request(&r, &key, &["payments:charge"], 0))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(issued.token_type, "DPoP");
    assert_eq!(issued.scopes, vec!["payments:charge".to_owned()]);

    let config = TokenConfig::new("https://localhost:8444", PAYMENTS.parse().unwrap());
    let now = SystemClock.now();
    let claims = verify(
        &issued.access_token,
        &r.broker.jwks(),
        &config,
        now,
        &mut (),
    )
    .unwrap();
    assert_eq!(claims.sub.as_str(), CHECKOUT);
    assert_eq!(claims.jkt, key.thumbprint());
    assert_eq!(claims.exp - claims.iat, 300);
    assert_eq!(claims.jti, issued.jti);

    let live = r.broker.store().live_tokens(now, 10).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].jti, issued.jti);

    // Once retention prunes it from the inventory, the leaked-token lookup
    // still finds it, from its issuance record, and still not a forgery.
    let found = r
        .broker
        .lookup_token(&issued.access_token)
        .await
        .unwrap()
        .unwrap();
    assert!(!found.from_audit);
    let pruned = r
        .broker
        .store()
        .prune_inventory(claims.exp + 1, 100)
        .await
        .unwrap();
    assert!(pruned >= 1);
    assert!(
        r.broker
            .store()
            .live_tokens(now, 10)
            .await
            .unwrap()
            .is_empty()
    );
    let again = r
        .broker
        .lookup_token(&issued.access_token)
        .await
        .unwrap()
        .unwrap();
    assert!(again.from_audit);
    assert_eq!(
        (
            again.token.jti.as_str(),
            again.token.sub.as_str(),
            again.token.exp
        ),
        (issued.jti.as_str(), CHECKOUT, claims.exp)
    );
    assert_eq!(again.token.scope.to_string(), "payments:charge");
    assert_eq!(again.token.jkt.to_string(), key.thumbprint().to_string());
    let forged = format!("{}A", issued.access_token);
    assert!(r.broker.lookup_token(&forged).await.unwrap().is_none());
    r.stop().await;
}

#[tokio::test]
async fn policy_scope_and_ttl_limits_are_enforced() {
    let r = start(POLICY).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    let err = client
        .issue(issue_request(&r, &key, &["payments:refund"], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("payments:refund"));

    let long = client
        .issue(issue_request(&r, &key, &["payments:read"], 86_400))
        .await
        .unwrap()
        .into_inner();
    let ttl = long.expires_at - SystemClock.now() as i64;
    assert!((890..=900).contains(&ttl), "ttl {ttl}");

    let mut other = pb::tokens_client::TokensClient::new(
        channel(
            &r,
            Some(workload(&r, "spiffe://example.org/ns/shop/sa/cart").await),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        other
            .issue(issue_request(&r, &key, &["payments:read"], 0))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    r.stop().await;
}

#[tokio::test]
async fn bad_or_replayed_proofs_are_refused() {
    let r = start(POLICY).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    let mut wrong_uri = issue_request(&r, &key, &["payments:read"], 0);
    wrong_uri.dpop_proof = key
        .mint(
            "POST",
            "https://localhost:8444/elsewhere",
            None,
            None,
            SystemClock.now(),
        )
        .unwrap();
    let err = client.issue(wrong_uri).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("htu"), "{}", err.message());

    let once = issue_request(&r, &key, &["payments:read"], 0);
    client.issue(once.clone()).await.unwrap();
    let err = client.issue(once).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert!(err.message().contains("already used"));
    r.stop().await;
}

#[tokio::test]
async fn rule_rate_limits_answer_resource_exhausted_with_retry_after() {
    let policy = POLICY.replace("rate: 50/s", "rate: 2/m");
    let r = start(&policy).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap();
    client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap();
    let err = client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    let retry: u64 = err
        .metadata()
        .get("retry-after")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    r.stop().await;
}

#[tokio::test]
async fn a_restart_keeps_the_ca_and_keys_so_old_tokens_still_verify() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let r = start_in(dir.path(), &key, POLICY).await;
    let bundle = r.broker.bundle_pem();
    let mut client = tokens_as(&r, CHECKOUT).await;
    let proof_key = ProofKey::generate().unwrap();
    let issued = client
        .issue(issue_request(&r, &proof_key, &["payments:read"], 0))
        .await
        .unwrap()
        .into_inner();
    r.stop().await;

    let again = start_in(dir.path(), &key, POLICY).await;
    assert_eq!(again.broker.bundle_pem(), bundle);
    let config = TokenConfig::new("https://localhost:8444", PAYMENTS.parse().unwrap());
    verify(
        &issued.access_token,
        &again.broker.jwks(),
        &config,
        SystemClock.now(),
        &mut (),
    )
    .unwrap();
    // The token is in the inventory, and nowhere on disk as a string.
    assert_eq!(
        again
            .broker
            .store()
            .live_tokens(SystemClock.now(), 10)
            .await
            .unwrap()
            .len(),
        1
    );
    // The audit log names it by jti.
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(
        audit.contains(&format!("\"jti\":\"{}\"", issued.jti)),
        "{audit}"
    );
    let mut disk = std::fs::read(dir.path().join("tally.db")).unwrap();
    disk.extend(std::fs::read(dir.path().join("tally.db-wal")).unwrap_or_default());
    disk.extend(audit.as_bytes());
    let needle = issued.access_token.split('.').nth(2).unwrap().as_bytes();
    assert!(!disk.windows(needle.len()).any(|w| w == needle));
    again.stop().await;
}

#[tokio::test]
async fn tokens_signed_before_a_rotation_verify_after_it() {
    let r = start(POLICY).await;
    let mut client = tokens_as(&r, CHECKOUT).await;
    let key = ProofKey::generate().unwrap();
    let before = client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap()
        .into_inner();
    let (new_kid, _) = r.broker.rotate_signing_key(0, None).await.unwrap();
    let after = client
        .issue(issue_request(&r, &key, &["payments:read"], 0))
        .await
        .unwrap()
        .into_inner();
    let config = TokenConfig::new("https://localhost:8444", PAYMENTS.parse().unwrap());
    let jwks = r.broker.jwks();
    assert_eq!(jwks.len(), 2);
    let now = SystemClock.now();
    let old = verify(&before.access_token, &jwks, &config, now, &mut ()).unwrap();
    let new = verify(&after.access_token, &jwks, &config, now, &mut ()).unwrap();
    assert_ne!(old.kid, new.kid);
    assert_eq!(new.kid, new_kid);
    r.stop().await;
}

#[tokio::test]
async fn watch_sends_the_state_then_every_change_and_resumes_where_it_left_off() {
    let r = start(POLICY).await;
    let identity = workload(&r, CHECKOUT).await;
    let mut client = pb::watch_client::WatchClient::new(channel(&r, Some(identity)).await.unwrap());
    let mut stream = client
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let keys_in = |u: &pb::Update| match &u.kind {
        Some(pb::update::Kind::Jwks(jwks)) => tally::token::Jwks::parse(jwks.json.as_bytes())
            .unwrap()
            .len(),
        other => panic!("expected a JWKS, got {other:?}"),
    };
    let first = stream.message().await.unwrap().unwrap();
    assert_eq!(keys_in(&first), 1);
    let second = stream.message().await.unwrap().unwrap();
    assert!(matches!(second.kind, Some(pb::update::Kind::Bundle(_))));
    assert!(second.sequence > first.sequence);
    // The access rules: only those protecting the subscriber.
    let policy = stream.message().await.unwrap().unwrap();
    let Some(pb::update::Kind::Policy(access)) = &policy.kind else {
        panic!("expected the access policy, got {:?}", policy.kind);
    };
    let access = tally::policy::Policy::parse(&access.yaml).unwrap();
    assert_eq!(access.access.len(), 1);
    assert_eq!(access.access[0].workload.to_string(), CHECKOUT);
    assert!(policy.sequence > second.sequence);

    // A rotation reaches the open stream as the next update.
    r.broker.rotate_signing_key(300, None).await.unwrap();
    let third = stream.message().await.unwrap().unwrap();
    assert_eq!(
        keys_in(&third),
        2,
        "the next key is published before it signs"
    );
    assert!(third.sequence > policy.sequence);
    drop(stream);

    // Reconnecting after the policy gets exactly the rotation again...
    let mut resumed = client
        .subscribe(pb::SubscribeRequest {
            after_sequence: policy.sequence,
        })
        .await
        .unwrap()
        .into_inner();
    let again = resumed.message().await.unwrap().unwrap();
    assert_eq!(again.sequence, third.sequence);
    // ...and a fresh start gets the current state: bundle, policy, then
    // the new JWKS.
    let mut fresh = client
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .unwrap()
        .into_inner();
    let a = fresh.message().await.unwrap().unwrap();
    let p = fresh.message().await.unwrap().unwrap();
    let b = fresh.message().await.unwrap().unwrap();
    assert_eq!(
        (a.sequence, p.sequence, b.sequence),
        (second.sequence, policy.sequence, third.sequence)
    );
    assert_eq!(keys_in(&b), 2);
    r.stop().await;
}

#[tokio::test]
async fn keys_rotate_on_schedule_and_no_token_is_ever_unverifiable() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let start = 1_800_000_000;
    let clock = Arc::new(tally::clock::ManualClock::new(start));
    let store = Store::open_sqlite(
        &dir.path().join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let mut settings = BrokerSettings::with_policy("example.org", POLICY).unwrap();
    settings.key_rotation = 3600;
    settings.key_publish_lead = 600;
    let broker = Broker::open(settings, store, clock.clone()).await.unwrap();
    let config = TokenConfig::new("https://localhost:8444", PAYMENTS.parse().unwrap());
    let proof_key = ProofKey::generate().unwrap();
    let caller: SpiffeId = CHECKOUT.parse().unwrap();
    let audience = PAYMENTS.parse().unwrap();
    let issue = |ttl: u64| {
        let broker = &broker;
        let proof_key = &proof_key;
        let caller = &caller;
        let audience = &audience;
        let clock = clock.clone();
        async move {
            let proof = proof_key
                .mint("POST", broker.issue_uri(), None, None, clock.now())
                .unwrap();
            let scopes: tally::token::Scopes = "payments:read".parse().unwrap();
            broker
                .issue(&tally::broker::issue::IssueInput {
                    caller,
                    audience,
                    scopes: &scopes,
                    ttl: Some(ttl),
                    proof: &proof,
                    htu: &tally::dpop::NormalizedUri::parse(broker.issue_uri()).unwrap(),
                    require_nonce: false,
                    via: "test",
                })
                .await
                .unwrap()
        }
    };
    let first_kid = broker.jwks().to_json()["keys"][0]["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(broker.maintain().await.unwrap(), None, "not due yet");

    clock.advance(3600);
    let before = issue(900).await;
    let next_kid = broker.maintain().await.unwrap().expect("due after an hour");
    assert_eq!(broker.jwks().len(), 2, "published before it signs");
    let again = broker.maintain().await.unwrap();
    assert_eq!(again, None, "one rotation at a time");
    clock.advance(599);
    let during = issue(900).await;
    assert_eq!(
        during.claims.kid, first_kid,
        "the old key signs during the lead"
    );

    clock.advance(1);
    let after = issue(900).await;
    assert_eq!(after.claims.kid, next_kid);
    let check = |t: &tally::broker::issue::Issued, now: u64| {
        verify(t.token.expose(), &broker.jwks(), &config, now, &mut ()).unwrap();
    };
    for t in [&before, &during, &after] {
        check(t, clock.now());
    }
    // The last token the old key signed still verifies at its very end.
    clock.advance(899);
    broker.maintain().await.unwrap();
    check(&during, clock.now());
    clock.set(start + 4200);
    // The old key stays published until its last token (max_ttl 15 m +
    // leeway) is over, then the feed drops it.
    clock.advance(900);
    broker.maintain().await.unwrap();
    assert_eq!(broker.jwks().len(), 2);
    clock.advance(31);
    broker.maintain().await.unwrap();
    assert_eq!(broker.jwks().len(), 1);
    let latest = broker.store().latest_changes().await.unwrap();
    let jwks = latest.iter().find(|c| c.kind == "jwks").unwrap();
    assert!(!jwks.body.contains(&first_kid), "the feed has the new JWKS");
    // Rotations are audited.
    let audit = broker.store().audit_after(0, 50).await.unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.kind == "keys.rotate" && a.line.contains("\"by\":\"schedule\""))
    );
}

#[tokio::test]
async fn an_expired_client_certificate_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let r = start_in(dir.path(), &key, POLICY).await;
    // The same CA, opened with a clock two days back, mints a one-hour
    // credential that expired long ago.
    let past = Arc::new(tally::clock::ManualClock::new(
        SystemClock.now() - 2 * 86_400,
    ));
    let store = Store::open_sqlite(
        &dir.path().join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).unwrap(),
    )
    .await
    .unwrap();
    let settings = BrokerSettings::with_policy("example.org", POLICY).unwrap();
    let then = Broker::open(settings, store, past).await.unwrap();
    let expired = then
        .mint_credential(&CHECKOUT.parse().unwrap(), 3600)
        .unwrap();
    assert!(expired.expires_at < SystemClock.now());

    let result = async {
        let identity = Identity::from_pem(&expired.cert_chain_pem, expired.key_pem.as_bytes());
        let mut client =
            pb::identity_client::IdentityClient::new(channel(&r, Some(identity)).await?);
        client
            .renew(pb::RenewRequest {
                csr_der: csr(&[]).1,
            })
            .await
            .map_err(|e| e.to_string())?;
        Ok::<_, Box<dyn std::error::Error>>(())
    }
    .await;
    // Refused in the handshake, for expiry.
    let refused = result.unwrap_err().to_string();
    assert!(
        refused.contains("received fatal alert: CertificateExpired"),
        "an expired certificate was accepted or refused for another reason: {refused}"
    );

    // The same identity with a current certificate is fine, so the refusal
    // was about expiry.
    let current = r
        .broker
        .mint_credential(&CHECKOUT.parse().unwrap(), 3600)
        .unwrap();
    let identity = Identity::from_pem(&current.cert_chain_pem, current.key_pem.as_bytes());
    let mut client =
        pb::identity_client::IdentityClient::new(channel(&r, Some(identity)).await.unwrap());
    client
        .renew(pb::RenewRequest {
            csr_der: csr(&[]).1,
        })
        .await
        .unwrap();
    r.stop().await;
}

#[tokio::test]
async fn the_intermediate_rotates_before_it_runs_out_and_a_foreign_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let start = 1_800_000_000;
    let clock = Arc::new(tally::clock::ManualClock::new(start));
    let open = |clock: Arc<tally::clock::ManualClock>, root: Option<tally::ca::SuppliedRoot>| {
        let path = dir.path().join("tally.db");
        let key = key.clone();
        async move {
            let store =
                Store::open_sqlite(&path, Sealer::from_key_material(key.as_bytes()).unwrap())
                    .await
                    .unwrap();
            let mut settings = BrokerSettings::with_policy("example.org", POLICY).unwrap();
            settings.ca_lifetimes.intermediate_secs = 3 * 86_400;
            settings.ca_root = root;
            Broker::open(settings, store, clock).await
        }
    };
    let broker = open(clock.clone(), None).await.unwrap();
    let bundle = broker.bundle_pem();
    let id: SpiffeId = CHECKOUT.parse().unwrap();
    let chain_of = |b: &Broker| {
        let c = b.mint_credential(&id, 600).unwrap();
        c.cert_chain_pem
            .split("-----END CERTIFICATE-----")
            .nth(1)
            .unwrap()
            .to_owned()
    };
    let first_chain = chain_of(&broker);
    broker.maintain().await.unwrap();
    assert_eq!(
        chain_of(&broker),
        first_chain,
        "two thirds of its life left"
    );

    clock.advance(2 * 86_400 + 1);
    broker.maintain().await.unwrap();
    assert_ne!(chain_of(&broker), first_chain, "a new intermediate");
    assert_eq!(broker.bundle_pem(), bundle, "under the same root");
    let audit = broker.store().audit_after(0, 20).await.unwrap();
    assert!(audit.iter().any(|a| a.kind == "ca.rotate_intermediate"));
    drop(broker);

    // Reopened, it keeps the rotated CA; with another root, it refuses.
    let again = open(clock.clone(), None).await.unwrap();
    assert_ne!(chain_of(&again), first_chain);
    drop(again);
    let other = tally::ca::Authority::generate(
        &"spiffe://example.org".parse().unwrap(),
        tally::ca::Lifetimes::default(),
        start,
    )
    .unwrap()
    .1;
    let foreign = tally::ca::SuppliedRoot {
        cert_pem: other.root_cert_pem.clone(),
        key_pem: other.root_key_pem.clone().unwrap(),
    };
    let err = open(clock, Some(foreign)).await.unwrap_err();
    assert!(err.to_string().contains("--ca-cert"), "{err}");
}

#[tokio::test]
async fn the_listeners_certificate_is_renewed_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemClock.now();
    let clock = Arc::new(tally::clock::ManualClock::new(now));
    let key = Sealer::generate_key_text().unwrap();
    let running = start_with_clock(dir.path(), &key, POLICY, clock.clone()).await;
    let certs = &running.running.certs;
    let first = certs.expires_at();
    assert_eq!(first, now + tally::broker::serve::tls::SERVER_CERT_TTL);
    running.running.upkeep().await.unwrap();
    assert_eq!(certs.expires_at(), first, "more than half its life left");
    clock.advance(tally::broker::serve::tls::SERVER_CERT_TTL / 2 + 1);
    running.running.upkeep().await.unwrap();
    assert!(certs.expires_at() > first, "renewed");

    // The listener serves the renewed certificate: it starts half a week
    // ahead of the wall clock the client checks it with (the broker's
    // clock was moved), so the client refuses it as not yet valid.
    let err = channel(&running, None).await.unwrap_err();
    let text = format!("{err:?}");
    assert!(text.contains("NotValidYet"), "{text}");
    running.stop().await;
}
