//! Kubernetes ServiceAccount token attestation: the offline verifier
//! against hostile tokens, and `Identity.Attest` over real mTLS gRPC.

mod support;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use serde_json::{Value, json};
use std::sync::Arc;
use support::broker::{ServedBroker, serve_broker, settings};
use tally::broker::cluster::ServiceAccounts;
use tally::clock::{Clock, SystemClock};
use tally::identity::k8s::{SaKeys, SaTokenConfig, SaTokenError, verify};
use tally::jose::{SigningKey, b64};
use tally::proto::v1 as pb;
use tally::store::Sealer;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

const NOW: u64 = 1_800_000_000;
const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "https://broker.tally.test";

struct Cluster {
    rsa: RsaKeyPair,
    ec: SigningKey,
}

impl Cluster {
    fn new() -> Self {
        Self {
            rsa: RsaKeyPair::generate(KeySize::Rsa2048).unwrap(),
            ec: SigningKey::generate().unwrap(),
        }
    }

    fn jwks(&self) -> Vec<u8> {
        let pk = PublicKeyComponents::<Vec<u8>>::from(self.rsa.public_key());
        let mut ec = serde_json::from_str::<Value>(&self.ec.public_key().to_jwk_json()).unwrap();
        ec["kid"] = "ec-1".into();
        ec["use"] = "sig".into();
        json!({"keys": [
            {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256", "n": b64::encode(&pk.n), "e": b64::encode(&pk.e)},
            ec,
            {"kty": "RSA", "kid": "enc-1", "use": "enc", "n": "AQAB", "e": "AQAB"},
        ]})
        .to_string()
        .into_bytes()
    }

    fn keys(&self) -> SaKeys {
        SaKeys::parse(&self.jwks()).unwrap()
    }

    fn sign_rs256(&self, header: &Value, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64::encode(header.to_string()),
            b64::encode(claims.to_string())
        );
        let mut sig = vec![0; self.rsa.public_modulus_len()];
        self.rsa
            .sign(
                &RSA_PKCS1_SHA256,
                &SystemRandom::new(),
                input.as_bytes(),
                &mut sig,
            )
            .unwrap();
        format!("{input}.{}", b64::encode(sig))
    }

    fn sign_es256(&self, header: &Value, claims: &Value) -> String {
        tally::jose::jws::sign_compact(
            &tally::jose::jws::encode_header(header),
            claims.to_string().as_bytes(),
            &self.ec,
        )
        .unwrap()
    }

    /// A token as the kubelet projects it, for `ns`/`name`.
    fn token(&self, ns: &str, name: &str) -> String {
        self.sign_rs256(&json!({"alg": "RS256", "kid": "rsa-1"}), &claims(ns, name))
    }
}

fn claims(ns: &str, name: &str) -> Value {
    json!({
        "aud": [AUDIENCE], "exp": NOW + 3600, "iat": NOW - 10, "nbf": NOW - 10,
        "iss": ISSUER, "sub": format!("system:serviceaccount:{ns}:{name}"),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": name, "uid": "u-1"},
                          "pod": {"name": "p-1", "uid": "p-uid"}},
    })
}

fn config() -> SaTokenConfig {
    SaTokenConfig {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
    }
}

#[test]
fn projected_tokens_signed_rs256_or_es256_name_their_service_account() {
    let c = Cluster::new();
    let keys = c.keys();
    assert_eq!(keys.len(), 2, "the encryption key is skipped");
    let account = verify(&c.token("shop", "checkout"), &keys, &config(), NOW).unwrap();
    assert_eq!(
        account.spiffe_id("example.org").unwrap().as_str(),
        "spiffe://example.org/ns/shop/sa/checkout"
    );
    let es = c.sign_es256(
        &json!({"alg": "ES256", "kid": "ec-1"}),
        &claims("pay", "payments"),
    );
    assert_eq!(verify(&es, &keys, &config(), NOW).unwrap().name, "payments");
}

#[test]
fn hostile_service_account_tokens_are_refused_with_their_reason() {
    let c = Cluster::new();
    let keys = c.keys();
    let good = claims("shop", "checkout");
    let with = |f: &dyn Fn(&mut Value)| {
        let mut v = good.clone();
        f(&mut v);
        c.sign_rs256(&json!({"alg": "RS256", "kid": "rsa-1"}), &v)
    };
    let check = |token: &str| verify(token, &keys, &config(), NOW).unwrap_err();

    assert!(matches!(
        check(&with(&|v| v["iss"] = "https://evil".into())),
        SaTokenError::Issuer { .. }
    ));
    assert!(matches!(
        check(&with(&|v| v["aud"] = json!(["other"]))),
        SaTokenError::Audience { .. }
    ));
    assert!(matches!(
        check(&with(&|v| v["exp"] = (NOW - 31).into())),
        SaTokenError::Expired { .. }
    ));
    assert!(matches!(
        check(&with(&|v| v["nbf"] = (NOW + 31).into())),
        SaTokenError::NotYetValid { .. }
    ));
    // Three different subject faults, each named.
    let subject = |edit: &dyn Fn(&mut Value)| match check(&with(edit)) {
        SaTokenError::Subject(why) => why,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        subject(&|v| v["sub"] = "system:node:worker-1".into()),
        "not system:serviceaccount:NAMESPACE:NAME"
    );
    assert_eq!(
        subject(&|v| v["sub"] = "system:serviceaccount:Shop:x".into()),
        "namespace or ServiceAccount name is not a valid Kubernetes name"
    );
    assert_eq!(
        subject(&|v| v["kubernetes.io"]["namespace"] = "kube-system".into()),
        "kubernetes.io claim names another ServiceAccount than sub"
    );
    assert!(matches!(
        check(&with(&|v| {
            v.as_object_mut().unwrap().remove("exp");
        })),
        SaTokenError::Malformed(_)
    ));

    let token = c.token("shop", "checkout");
    // A flipped signature byte, an unknown kid, alg none, HMAC, alg/key mismatch.
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut sig = b64::decode(parts[2].as_bytes()).unwrap();
    sig[10] ^= 1;
    parts[2] = b64::encode(sig);
    assert_eq!(check(&parts.join(".")), SaTokenError::BadSignature);
    let unknown = c.sign_rs256(&json!({"alg": "RS256", "kid": "nope"}), &good);
    assert!(matches!(check(&unknown), SaTokenError::UnknownKid(_)));
    for alg in ["none", "HS256", "PS256"] {
        let t = c.sign_rs256(&json!({"alg": alg, "kid": "rsa-1"}), &good);
        assert!(matches!(check(&t), SaTokenError::Alg(_)), "{alg}");
    }
    let mismatch = c.sign_rs256(&json!({"alg": "ES256", "kid": "rsa-1"}), &good);
    assert_eq!(check(&mismatch), SaTokenError::KeyMismatch);
    // Shape and size.
    assert!(matches!(check("a.b"), SaTokenError::Malformed(_)));
    assert!(matches!(check("a.b.c.d"), SaTokenError::Malformed(_)));
    assert_eq!(check(&"a".repeat(20_000)), SaTokenError::TooLarge);
    let dup = format!(
        "{}.{}.{}",
        b64::encode(r#"{"alg":"RS256","kid":"rsa-1","kid":"x"}"#),
        b64::encode("{}"),
        b64::encode("s")
    );
    assert!(matches!(check(&dup), SaTokenError::Malformed(_)));
}

#[test]
fn bad_jwks_documents_are_refused() {
    for (doc, needle) in [
        (r#"{"keys": 1}"#, "keys"),
        (r#"{"keys": []}"#, "no RSA or P-256"),
        (
            r#"{"keys": [{"kty":"RSA","n":"AQAB","e":"AQAB"}]}"#,
            "no kid",
        ),
        (
            r#"{"keys": [{"kty":"RSA","kid":"a","n":"AQAB","e":"AQAB"}]}"#,
            "2048 to 8192",
        ),
    ] {
        let e = SaKeys::parse(doc.as_bytes()).unwrap_err().to_string();
        assert!(e.contains(needle), "{doc}: {e}");
    }
    let c = Cluster::new();
    let mut doc: Value = serde_json::from_slice(&c.jwks()).unwrap();
    let first = doc["keys"][0].clone();
    doc["keys"].as_array_mut().unwrap().push(first);
    let e = SaKeys::parse(doc.to_string().as_bytes())
        .unwrap_err()
        .to_string();
    assert!(e.contains("appears twice"), "{e}");
}

/// A broker with SA attestation as given, and a channel to it without a
/// client certificate (Attest needs none).
async fn served(
    service_accounts: Option<(SaKeys, SaTokenConfig)>,
) -> (tempfile::TempDir, ServedBroker, Channel) {
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings("trust_domain: example.org\n");
    settings.service_accounts =
        service_accounts.map(|(keys, config)| Arc::new(ServiceAccounts::offline(keys, config)));
    let key = Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings, "127.0.0.1:0").await;
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(served.broker.bundle_pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", served.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    (dir, served, channel)
}

#[tokio::test]
async fn the_broker_attests_a_pod_by_its_service_account_token() {
    let c = Cluster::new();
    let (_dir, served, channel) = served(Some((c.keys(), config()))).await;
    let broker = Arc::clone(&served.broker);
    let mut client = pb::identity_client::IdentityClient::new(channel);
    let csr = || {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        rcgen::CertificateParams::default()
            .serialize_request(&key)
            .unwrap()
            .der()
            .to_vec()
    };
    // The real clock: tokens made for now.
    let now = SystemClock.now();
    let mut claims = claims("shop", "checkout");
    claims["iat"] = now.into();
    claims["nbf"] = now.into();
    claims["exp"] = (now + 600).into();
    let token = c.sign_rs256(&json!({"alg": "RS256", "kid": "rsa-1"}), &claims);
    let attest = |t: String| pb::AttestRequest {
        credential: Some(pb::attest_request::Credential::ServiceAccountToken(t)),
        csr_der: csr(),
    };
    let svid = client.attest(attest(token)).await.unwrap().into_inner();
    assert_eq!(svid.spiffe_id, "spiffe://example.org/ns/shop/sa/checkout");
    assert_eq!(
        tally::ca::spiffe_id_of(&svid.svid_der).unwrap().as_str(),
        svid.spiffe_id
    );

    // Expired: refused, with the reason, and audited.
    claims["exp"] = (now - 100).into();
    let expired = c.sign_rs256(&json!({"alg": "RS256", "kid": "rsa-1"}), &claims);
    let err = client.attest(attest(expired)).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("expired"), "{}", err.message());
    let audit: Vec<Value> = broker
        .store()
        .audit_after(0, 10)
        .await
        .unwrap()
        .iter()
        .map(|a| serde_json::from_str(&a.line).unwrap())
        .collect();
    assert_eq!(audit[0]["method"], "k8s_sa");
    assert_eq!(audit[0]["outcome"], "ok");
    assert_eq!(audit[1]["outcome"], "denied");
    served.stop().await;
}

#[tokio::test]
async fn without_a_configured_jwks_sa_tokens_are_refused_as_a_precondition() {
    let (_dir, served, channel) = served(None).await;
    let err = pb::identity_client::IdentityClient::new(channel)
        .attest(pb::AttestRequest {
            credential: Some(pb::attest_request::Credential::ServiceAccountToken(
                "x.y.z".into(),
            )),
            csr_der: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("--sa-issuer"), "{}", err.message());
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_whose_svid_expired_while_the_broker_was_away_attests_again() {
    use tally::sidecar::identity::{Attestation, IdentityClient, keep_renewed};
    let c = Cluster::new();
    let dir = tempfile::tempdir().unwrap();
    let mut settings = settings("trust_domain: example.org\n");
    settings.service_accounts = Some(Arc::new(ServiceAccounts::offline(c.keys(), config())));
    settings.svid_ttl = 60;
    let key = Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings, "127.0.0.1:0").await;
    let front = support::partition::Partition::start(served.addr).await;

    // The kubelet's projected token, valid for ten minutes of real time.
    let now = SystemClock.now();
    let mut claims = claims("shop", "checkout");
    claims["iat"] = now.into();
    claims["nbf"] = now.into();
    claims["exp"] = (now + 600).into();
    let token_file = dir.path().join("sa-token");
    std::fs::write(
        &token_file,
        c.sign_rs256(&json!({"alg": "RS256", "kid": "rsa-1"}), &claims),
    )
    .unwrap();
    let how = Attestation::ServiceAccountTokenFile(token_file);
    let client = IdentityClient::new(
        format!("https://localhost:{}", front.addr.port()),
        served.broker.bundle_pem(),
    );
    let first = client.attest(&how, now).await.unwrap();

    // The broker is unreachable, and the sidecar's clock says the SVID
    // expired meanwhile (a manual clock: no waiting for a real expiry).
    front.cut();
    let (updates, mut rx) = tokio::sync::watch::channel(Arc::new(first.clone()));
    let renewer = tokio::spawn(keep_renewed(
        client,
        Arc::new(tally::clock::ManualClock::new(first.expires_at + 1)),
        updates,
        Some(how),
    ));
    // It tries (and fails) while cut off: bounded by its first attempt's
    // connect, well under the 10 s given.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while front.dropped.load(std::sync::atomic::Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "it never tried");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        rx.borrow().chain_pem,
        first.chain_pem,
        "nothing renewed while cut off"
    );
    front.heal();

    // Back: a new SVID for the same workload, by attesting again.
    let next = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        rx.wait_for(|s| s.chain_pem != first.chain_pem),
    )
    .await
    .expect("attested again after the broker came back")
    .unwrap()
    .clone();
    assert_eq!(next.spiffe_id, first.spiffe_id);
    let attests = served
        .broker
        .store()
        .audit_after(0, 100)
        .await
        .unwrap()
        .iter()
        .filter(|r| {
            r.line.contains("\"method\":\"k8s_sa\"") && r.line.contains("\"outcome\":\"ok\"")
        })
        .count();
    assert!(
        attests >= 2,
        "the first attestation and the one after expiry"
    );
    drop(rx);
    renewer.abort();
    served.stop().await;
}
