//! `Tokens.IssueWit` on a real broker over mTLS gRPC: WIMSE Workload
//! Identity Tokens that name the caller, bind its client certificate's
//! key and verify with the broker's JWKS, granted by the `wit:` rules
//! (lifetimes capped by the rule and by the certificate), refused to
//! callers no rule names and to denied identities, recorded in the audit
//! log and the inventory before they are answered, and revocable.

mod support;

use support::broker::{ServedBroker, channel_as, channel_holding, serve_broker, settings};
use tally::clock::{Clock, SystemClock};
use tally::identity::denial::DENIED_METADATA;
use tally::proto::v1 as pb;
use tally::store::{AuditFilter, TokenFilter};
use tally::token::{RevocationTarget, TokenKind};
use tonic::Code;

const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const LIMITED: &str = "spiffe://example.org/ns/shop/sa/limited";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";

const POLICY: &str = "
trust_domain: example.org
issue:
  - from: spiffe://example.org/ns/shop/sa/checkout
    to: spiffe://example.org/ns/pay/sa/payments
    scopes: [payments:charge]
wit:
  - from: spiffe://example.org/ns/shop/sa/checkout
    ttl: 10m
  - from: spiffe://example.org/ns/pay/sa/*
";

async fn start(policy: &str) -> (tempfile::TempDir, ServedBroker) {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings(policy), "127.0.0.1:0").await;
    (dir, served)
}

async fn ask_over(
    channel: tonic::transport::Channel,
    ttl: u32,
) -> Result<pb::WitResponse, tonic::Status> {
    pb::tokens_client::TokensClient::new(channel)
        .issue_wit(pb::WitRequest { ttl_seconds: ttl })
        .await
        .map(tonic::Response::into_inner)
}

/// A credential for `id` living `ttl` seconds, and a channel presenting it.
fn holding(
    served: &ServedBroker,
    id: &str,
    ttl: u64,
) -> (tally::ca::Credential, tonic::transport::Channel) {
    let credential = served
        .broker
        .mint_credential(&id.parse().unwrap(), ttl)
        .unwrap();
    let channel = channel_holding(served, &credential, served.addr);
    (credential, channel)
}

fn thumbprint_of_key(key_pem: &str) -> tally::jose::Jkt {
    tally::jose::SigningKey::from_pkcs8_pem(key_pem.as_bytes())
        .unwrap()
        .thumbprint()
}

fn now() -> u64 {
    SystemClock.now()
}

/// The first certificate of a PEM chain, DER.
fn first_der(pem: &str) -> Vec<u8> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    block.contents
}

#[tokio::test]
async fn a_wit_names_the_caller_binds_its_certificate_key_and_verifies_with_the_jwks() {
    let (_dir, served) = start(POLICY).await;
    let (credential, channel) = holding(&served, CHECKOUT, 3600);
    let got = ask_over(channel, 0).await.unwrap();
    let jws = tally::jose::Jws::parse(&got.wit, &tally::jose::Limits::default()).unwrap();
    let header = jws.header();
    assert_eq!(header["typ"], "wit+jwt");
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["kid"], got.kid.as_str());
    let jwks = served.broker.jwks();
    let key = jwks
        .get(&got.kid)
        .expect("the kid is in the published JWKS");
    jws.verify(key).expect("signed by the broker's token key");

    let claims = jws.payload();
    assert_eq!(claims["sub"], CHECKOUT);
    let jwk = &claims["cnf"]["jwk"];
    assert_eq!(jwk["alg"], "ES256");
    assert_eq!(jwk["kty"], "EC");
    assert_eq!(jwk["crv"], "P-256");
    assert!(jwk.get("d").is_none(), "a public key only");
    let bound = tally::jose::PublicKey::from_jwk(jwk).unwrap().thumbprint();
    assert_eq!(
        bound,
        thumbprint_of_key(&credential.key_pem),
        "the client certificate's key"
    );
    let (iat, nbf, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["nbf"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(nbf, iat);
    assert_eq!(exp - iat, 600, "the rule's ttl");
    assert!(iat.abs_diff(now()) <= 5, "{iat}");
    assert_eq!(claims["jti"], got.jti.as_str());
    assert!(got.jti.len() >= 22, "at least 128 random bits: {}", got.jti);
    for absent in ["aud", "iss", "scope", "client_id"] {
        assert!(!claims.contains_key(absent), "{absent} in {claims:?}");
    }
    let unix = |t: u64| i64::try_from(t).unwrap();
    assert_eq!((got.expires_at, got.issued_at), (unix(exp), unix(iat)));
    // Neither an access token nor a JWT-SVID.
    let config = tally::token::TokenConfig::new(served.broker.issuer(), PAYMENTS.parse().unwrap());
    assert!(tally::token::verify(&got.wit, &jwks, &config, now(), &mut ()).is_err());
    assert!(tally::token::jwt_svid::verify(&got.wit, &jwks, PAYMENTS, now(), 5).is_err());
    served.stop().await;
}

#[tokio::test]
async fn a_wit_is_recorded_and_audited_before_it_is_answered_and_never_written_down() {
    let (_dir, served) = start(POLICY).await;
    let (credential, channel) = holding(&served, CHECKOUT, 3600);
    let got = ask_over(channel, 0).await.unwrap();
    let broker = &served.broker;
    let jkt = thumbprint_of_key(&credential.key_pem);
    // Read at once, from the store: the answer came after the commit.
    let filter = TokenFilter {
        now: now(),
        kind: Some(TokenKind::Wit),
        ..TokenFilter::default()
    };
    let live = broker.store().find_live_tokens(&filter, 10).await.unwrap();
    assert_eq!(live.len(), 1, "{live:?}");
    let row = &live[0];
    assert_eq!(
        (row.jti.as_str(), row.sub.as_str(), row.kind),
        (got.jti.as_str(), CHECKOUT, TokenKind::Wit)
    );
    assert!(row.aud.is_empty() && row.scope.is_empty());
    assert_eq!(row.class, tally::token::TokenClass::Service);
    assert_eq!(row.jkt, Some(jkt));
    assert_eq!(
        (i64::try_from(row.exp).unwrap(), row.kid.as_str()),
        (got.expires_at, got.kid.as_str())
    );
    assert_eq!(row.token_hmac, broker.token_hmac(&got.wit));

    let records = broker
        .query_audit(
            &AuditFilter {
                jti: Some(got.jti.clone()),
                ..AuditFilter::default()
            },
            10,
        )
        .await
        .unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].kind, "wit.issue");
    let line: serde_json::Value = serde_json::from_str(&records[0].line).unwrap();
    assert_eq!(
        (line["outcome"].as_str(), line["actor"].as_str()),
        (Some("ok"), Some(CHECKOUT))
    );
    assert_eq!(line["jkt"], jkt.to_string());
    assert_eq!(
        (
            line["kid"].as_str(),
            line["exp"].as_i64(),
            line["via"].as_str()
        ),
        (Some(got.kid.as_str()), Some(got.expires_at), Some("grpc"))
    );
    assert_eq!(
        line["token_hmac"],
        tally::audit::hex(&broker.token_hmac(&got.wit))
    );
    assert!(!records[0].line.contains(&got.wit));
    let payload = got.wit.split('.').nth(1).unwrap();
    assert!(!records[0].line.contains(payload), "not even its payload");

    let lookup = broker.lookup_token(&got.wit).await.unwrap().unwrap();
    assert_eq!(lookup.token.kind, TokenKind::Wit);
    assert!(!lookup.revoked);
    let metrics = broker.render_metrics().await;
    assert!(
        metrics.contains(r#"tally_broker_wit_issuance_total{result="issued"} 1"#),
        "{metrics}"
    );
    served.stop().await;
}

#[tokio::test]
async fn a_caller_no_wit_rule_names_is_refused_and_the_refusal_is_audited_with_its_reason() {
    let (_dir, served) = start(POLICY).await;
    let e = ask_over(channel_as(&served, LIMITED), 0).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains("no wit rule"), "{}", e.message());
    assert!(e.message().contains(LIMITED), "{}", e.message());
    assert!(e.metadata().get(DENIED_METADATA).is_none(), "not a denial");
    let live = served.broker.store().live_tokens(now(), 10).await.unwrap();
    assert!(live.is_empty(), "{live:?}");
    let filter = AuditFilter {
        kind: Some("wit.issue".into()),
        ..AuditFilter::default()
    };
    let records = served.broker.query_audit(&filter, 10).await.unwrap();
    assert_eq!(records.len(), 1);
    let line: serde_json::Value = serde_json::from_str(&records[0].line).unwrap();
    assert_eq!(
        (
            line["outcome"].as_str(),
            line["reason"].as_str(),
            line["actor"].as_str()
        ),
        (Some("denied"), Some("no_rule"), Some(LIMITED))
    );
    let metrics = served.broker.render_metrics().await;
    assert!(
        metrics.contains(r#"tally_broker_wit_issuance_total{result="no_rule"} 1"#),
        "{metrics}"
    );
    served.stop().await;
}

#[tokio::test]
async fn a_policy_without_wit_rules_grants_no_wit_and_issues_tokens_as_before() {
    let without = "
trust_domain: example.org
issue:
  - from: spiffe://example.org/ns/shop/sa/checkout
    to: spiffe://example.org/ns/pay/sa/payments
    scopes: [payments:charge]
";
    let (_dir, served) = start(without).await;
    let channel = channel_as(&served, CHECKOUT);
    let e = ask_over(channel.clone(), 0).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let htu = format!("{}/tally.v1.Tokens/Issue", served.broker.issuer());
    support::broker::issue(&channel, &htu, PAYMENTS, "payments:charge")
        .await
        .unwrap();
    served.stop().await;
}

#[tokio::test]
async fn the_rules_ttl_caps_what_is_asked_and_no_wit_outlives_the_client_certificate() {
    let (_dir, served) = start(POLICY).await;
    let life = |got: &pb::WitResponse| got.expires_at - got.issued_at;
    let (_, channel) = holding(&served, CHECKOUT, 3600);
    for (asked, expected) in [(0, 600), (60, 60), (7200, 600)] {
        let got = ask_over(channel.clone(), asked).await.unwrap();
        assert_eq!(life(&got), expected, "asked {asked}");
    }
    // Another rule, the default ttl of an hour.
    let (_, channel) = holding(&served, PAYMENTS, 7200);
    assert_eq!(life(&ask_over(channel, 0).await.unwrap()), 3600);

    // A certificate with two minutes left: the WIT ends with it.
    let (credential, channel) = holding(&served, CHECKOUT, 120);
    let got = ask_over(channel, 0).await.unwrap();
    let leaf = first_der(&credential.cert_chain_pem);
    let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    let not_after = cert.validity().not_after.timestamp();
    assert!(
        got.expires_at <= not_after,
        "{} > {not_after}",
        got.expires_at
    );
    assert!(life(&got) <= 120 && life(&got) >= 115, "{}", life(&got));
    let lookup = served.broker.lookup_token(&got.wit).await.unwrap().unwrap();
    assert_eq!(i64::try_from(lookup.token.exp).unwrap(), got.expires_at);
    served.stop().await;
}

#[tokio::test]
async fn a_denied_identity_gets_no_wit() {
    let (_dir, served) = start(POLICY).await;
    let admin: tally::identity::SpiffeId = "spiffe://example.org/admin/ops".parse().unwrap();
    served
        .broker
        .deny_identity(&CHECKOUT.parse().unwrap(), "compromised", &admin)
        .await
        .unwrap();
    let e = ask_over(channel_as(&served, CHECKOUT), 0)
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.metadata().get(DENIED_METADATA).is_some());
    let filter = AuditFilter {
        kind: Some("wit.issue".into()),
        ..AuditFilter::default()
    };
    let records = served.broker.query_audit(&filter, 10).await.unwrap();
    assert_eq!(records.len(), 1, "recorded under the call's own kind");
    let metrics = served.broker.render_metrics().await;
    assert!(
        metrics.contains(r#"tally_broker_denied_identity_calls_total{call="issue_wit"} 1"#),
        "{metrics}"
    );
    let live = served.broker.store().live_tokens(now(), 10).await.unwrap();
    assert!(live.is_empty(), "{live:?}");
    served.stop().await;
}

#[tokio::test]
async fn a_wit_is_revoked_by_jti_holder_or_key_and_the_revocation_outlives_it() {
    let (_dir, served) = start(POLICY).await;
    let admin: tally::identity::SpiffeId = "spiffe://example.org/admin/ops".parse().unwrap();
    let (credential, channel) = holding(&served, CHECKOUT, 3600);
    let jkt = thumbprint_of_key(&credential.key_pem);
    let targets = [
        RevocationTarget::Jti(String::new()),
        RevocationTarget::Subject(CHECKOUT.parse().unwrap()),
        RevocationTarget::Jkt(jkt),
    ];
    for target in targets {
        let got = ask_over(channel.clone(), 0).await.unwrap();
        let before = served.broker.lookup_token(&got.wit).await.unwrap().unwrap();
        assert!(!before.revoked, "{target:?}: issued after the last entry");
        let target = match target {
            RevocationTarget::Jti(_) => RevocationTarget::Jti(got.jti.clone()),
            other => other,
        };
        let (_, revocation) = served
            .broker
            .revoke(target.clone(), None, "leaked", &admin)
            .await
            .unwrap();
        assert!(
            revocation.expires_at >= u64::try_from(got.expires_at).unwrap(),
            "{target:?}: the entry lasts as long as the WIT"
        );
        let lookup = served.broker.lookup_token(&got.wit).await.unwrap().unwrap();
        assert!(lookup.revoked, "{target:?}");
        // The next second's WIT is not covered by a holder or key entry
        // (they cover what was issued up to their second).
        tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    }

    // The revocations are on the Watch stream for every sidecar.
    let mut stream = pb::watch_client::WatchClient::new(channel_as(&served, PAYMENTS))
        .subscribe(pb::SubscribeRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while kinds.len() < 3 {
        let update = tokio::time::timeout(std::time::Duration::from_secs(10), stream.message())
            .await
            .expect("the current state arrives")
            .unwrap()
            .expect("the stream stays open");
        if let Some(pb::update::Kind::Revocation(r)) = update.kind {
            kinds.push(match r.target.unwrap() {
                pb::revocation::Target::Jti(_) => "jti",
                pb::revocation::Target::Subject(_) => "subject",
                pb::revocation::Target::Jkt(_) => "jkt",
                _ => "other",
            });
        }
    }
    kinds.sort_unstable();
    assert_eq!(kinds, ["jkt", "jti", "subject"]);
    served.stop().await;
}

#[tokio::test]
async fn a_workload_svid_gets_a_wit_for_its_own_key_that_ends_with_it() {
    let (_dir, served) = start(POLICY).await;
    let (sidecar, channel) = holding(&served, CHECKOUT, 600);
    let app_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&app_key)
        .unwrap()
        .der()
        .to_vec();
    let svid = pb::identity_client::IdentityClient::new(channel)
        .issue_workload_svid(pb::WorkloadSvidRequest { csr_der: csr })
        .await
        .unwrap()
        .into_inner();
    let pem = |der: &[u8]| tally::ca::pem("CERTIFICATE", der);
    let workload = tally::ca::Credential {
        cert_chain_pem: std::iter::once(&svid.svid_der)
            .chain(&svid.chain_der)
            .map(|d| pem(d))
            .collect(),
        key_pem: app_key.serialize_pem().into(),
        expires_at: u64::try_from(svid.expires_at).unwrap(),
        serial: String::new(),
    };
    // The application dials the broker with its workload SVID, as it
    // may for Tokens.Issue: its WIT binds the application's key.
    let as_app = channel_holding(&served, &workload, served.addr);
    let got = ask_over(as_app, 0).await.unwrap();
    let jws = tally::jose::Jws::parse(&got.wit, &tally::jose::Limits::default()).unwrap();
    let bound = tally::jose::PublicKey::from_jwk(&jws.payload()["cnf"]["jwk"])
        .unwrap()
        .thumbprint();
    assert_eq!(bound, thumbprint_of_key(&workload.key_pem));
    assert_ne!(bound, thumbprint_of_key(&sidecar.key_pem));
    assert!(
        got.expires_at <= svid.expires_at,
        "never past the workload SVID"
    );
    served.stop().await;
}

/// A root CA for a broker to be supplied with (as `--ca-cert/--ca-key`),
/// and an rcgen issuer for it, so the test can sign a leaf the broker's
/// own CA never would.
fn supplied_root() -> (
    tally::ca::SuppliedRoot,
    rcgen::Issuer<'static, rcgen::KeyPair>,
) {
    let (_, generated) = tally::ca::Authority::generate(
        &"spiffe://example.org".parse().unwrap(),
        tally::ca::Lifetimes::default(),
        now(),
    )
    .unwrap();
    let root_key_pem = generated.root_key_pem.clone().unwrap();
    let key = rcgen::KeyPair::from_pem(&root_key_pem).unwrap();
    let der = first_der(&generated.root_cert_pem);
    let issuer = rcgen::Issuer::from_ca_cert_der(&der.into(), key).unwrap();
    let root = tally::ca::SuppliedRoot {
        cert_pem: generated.root_cert_pem.clone(),
        key_pem: root_key_pem,
    };
    (root, issuer)
}

#[tokio::test]
async fn a_client_certificate_whose_key_is_not_p256_is_refused_as_an_invalid_argument() {
    let (root, issuer) = supplied_root();
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let mut settings = settings(POLICY);
    settings.ca_root = Some(root);
    let served = serve_broker(dir.path(), &key, settings, "127.0.0.1:0").await;
    // A P-384 leaf for checkout, straight from the root.
    let leaf_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(CHECKOUT.try_into().unwrap())];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2100, 1, 1);
    let leaf = params.signed_by(&leaf_key, &issuer).unwrap();
    let credential = tally::ca::Credential {
        cert_chain_pem: leaf.pem(),
        key_pem: leaf_key.serialize_pem().into(),
        expires_at: 0,
        serial: String::new(),
    };
    let channel = channel_holding(&served, &credential, served.addr);
    let e = ask_over(channel, 0).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("not a P-256 key"), "{}", e.message());
    let records = served
        .broker
        .query_audit(
            &AuditFilter {
                kind: Some("wit.issue".into()),
                ..AuditFilter::default()
            },
            10,
        )
        .await
        .unwrap();
    let line: serde_json::Value = serde_json::from_str(&records[0].line).unwrap();
    assert_eq!(line["reason"], "key_not_p256");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tally_ctl_lists_wits_by_their_kind_and_revokes_one_by_jti() {
    use support::ctl::{mint_svid, text};
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    let fixture = std::fs::read_to_string(support::broker::POLICY_FILE).unwrap();
    std::fs::write(
        &policy,
        format!("{fixture}wit:\n  - from: spiffe://example.org/ns/*/sa/*\n"),
    )
    .unwrap();
    let data = dir.path().join("data");
    let broker =
        support::broker::Spawned::start_with(&data, &["--policy", policy.to_str().unwrap()]);
    let checkout = dir.path().join("checkout");
    mint_svid(&broker, &data, CHECKOUT, &checkout);
    let got = ask_over(broker.channel_with(&checkout).await, 0)
        .await
        .unwrap();
    support::ctl::issue_with(&broker, &checkout).await.unwrap();

    let all = text(&broker.ctl(&data, &["tokens", "list"]));
    let row = all
        .lines()
        .find(|l| l.contains(&got.jti))
        .unwrap_or_else(|| panic!("{all}"));
    assert!(row.contains(" wit "), "{row}");
    let only = text(&broker.ctl(
        &data,
        &["tokens", "list", "--kind", "wit", "--output", "json"],
    ));
    let rows: serde_json::Value = serde_json::from_str(&only).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 1, "{only}");
    assert_eq!(rows[0]["kind"], "wit");
    assert_eq!(rows[0]["jti"], got.jti.as_str());
    assert_eq!(rows[0]["aud"], "");
    let jkt = rows[0]["jkt"].as_str().unwrap();
    assert_eq!(jkt.len(), 43, "a thumbprint: {jkt}");

    let lookup = text(&broker.ctl(&data, &["audit", "lookup", "--token", &got.wit]));
    assert!(lookup.contains(&format!("{} (wit)", got.jti)), "{lookup}");
    assert!(lookup.contains("wit.issue"), "{lookup}");
    assert!(
        !lookup.contains(&got.wit),
        "the token is never printed back"
    );
    broker.ctl(&data, &["revoke", "--jti", &got.jti, "--reason", "leaked"]);
    let after = text(&broker.ctl(&data, &["tokens", "list", "--kind", "wit"]));
    assert!(after.contains("revoked"), "{after}");
    broker.stop();
}
