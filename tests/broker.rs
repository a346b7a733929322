//! The broker's Identity service and TLS over real mTLS gRPC on
//! 127.0.0.1:0, with a real SQLite store: attestation, renewal, refused
//! certificates, and the CA and listener certificates renewing.

mod support;

use std::sync::Arc;
use support::grpc::{
    CHECKOUT, POLICY, channel, csr, issue_request, start, start_in, start_with_clock, workload,
};
use tally::broker::{Broker, BrokerSettings};
use tally::clock::{Clock, SystemClock};
use tally::dpop::ProofKey;
use tally::identity::SpiffeId;
use tally::proto::v1 as pb;
use tally::store::{Sealer, Store};
use tonic::Code;
use tonic::transport::Identity;

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
