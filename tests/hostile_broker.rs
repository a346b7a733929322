//! The broker's input checks under attack, over real mTLS gRPC and HTTPS:
//! CSRs whose key is not what the SVID would say it is, a join token a
//! refused CSR must not burn, one caller spending everyone's issuance
//! budget under a wildcard rule, and `/oauth2/revoke` as an oracle for
//! which tokens exist.

mod support;

use std::sync::Arc;
use support::broker::{ServedBroker, channel_as, serve_broker, settings};
use tally::ca::{Authority, CaError, Lifetimes};
use tally::clock::{Clock as _, SystemClock};
use tally::dpop::ProofKey;
use tally::proto::v1 as pb;
use tally::store::Sealer;
use tonic::Code;
use x509_parser::num_bigint::BigUint;

const POLICY: &str = include_str!("fixtures/policy.yaml");
const ID: &str = "spiffe://example.org/ns/vm/sa/build";

// --- DER, by hand ---------------------------------------------------

fn der(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match content.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n < 0x100 => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend_from_slice(content);
    out
}

fn seq(parts: &[&[u8]]) -> Vec<u8> {
    der(0x30, &parts.concat())
}

fn bits(bytes: &[u8]) -> Vec<u8> {
    der(0x03, &[&[0u8][..], bytes].concat())
}

fn uint(n: &BigUint) -> Vec<u8> {
    let mut b = n.to_bytes_be();
    if b[0] & 0x80 != 0 {
        b.insert(0, 0);
    }
    der(0x02, &b)
}

const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_P384: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];
const OID_ECDSA_WITH_SHA256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02];

/// A PKCS#10 request with no subject and no attributes for an EC key
/// (`curve`, `point`), labelled ecdsa-with-SHA256 and signed by `sign`
/// (DER signature over the request info).
fn ec_csr(curve: &[u8], point: &[u8], sign: impl Fn(&[u8]) -> Vec<u8>) -> Vec<u8> {
    let spki = seq(&[&seq(&[OID_EC_PUBLIC_KEY, curve]), &bits(point)]);
    let info = seq(&[&[0x02, 0x01, 0x00], &seq(&[]), &spki, &[0xa0, 0x00]]);
    let signature = sign(&info);
    seq(&[&info, &seq(&[OID_ECDSA_WITH_SHA256]), &bits(&signature)])
}

// --- ECDSA P-384 with SHA-256, which no crypto library here signs ------

struct Curve {
    p: BigUint,
    n: BigUint,
    g: (BigUint, BigUint),
}

fn hex(s: &str) -> BigUint {
    BigUint::parse_bytes(s.as_bytes(), 16).unwrap()
}

fn p384() -> Curve {
    Curve {
        p: hex(
            "fffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffeffffffff0000000000000000ffffffff",
        ),
        n: hex(
            "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
        ),
        g: (
            hex(
                "aa87ca22be8b05378eb1c71ef320ad746e1d3b628ba79b9859f741e082542a385502f25dbf55296c3a545e3872760ab7",
            ),
            hex(
                "3617de4a96262c6f5d9e98bf9292dc29f8f41dbd289a147ce9da3113b5f0b8c00a60b1ce1d7e819d7a431d7c90ea0e5f",
            ),
        ),
    }
}

type Point = Option<(BigUint, BigUint)>;

impl Curve {
    fn sub(&self, a: &BigUint, b: &BigUint) -> BigUint {
        (a + &self.p - b) % &self.p
    }

    fn inv(&self, a: &BigUint) -> BigUint {
        a.modinv(&self.p).unwrap()
    }

    /// Affine addition on y² = x³ − 3x + b.
    fn add(&self, a: &Point, b: &Point) -> Point {
        let (Some((x1, y1)), Some((x2, y2))) = (a, b) else {
            return a.clone().or_else(|| b.clone());
        };
        let p = &self.p;
        let lambda = if x1 == x2 {
            if (y1 + y2) % p == BigUint::ZERO {
                return None;
            }
            let three_x2 = (BigUint::from(3u8) * x1 * x1) % p;
            self.sub(&three_x2, &BigUint::from(3u8)) * self.inv(&((BigUint::from(2u8) * y1) % p))
                % p
        } else {
            self.sub(y2, y1) * self.inv(&self.sub(x2, x1)) % p
        };
        let x3 = self.sub(&self.sub(&(&lambda * &lambda % p), x1), x2);
        let y3 = self.sub(&(&lambda * self.sub(x1, &x3) % p), y1);
        Some((x3, y3))
    }

    fn mul(&self, k: &BigUint) -> Point {
        let mut acc: Point = None;
        let g = Some(self.g.clone());
        for i in (0..k.bits()).rev() {
            acc = self.add(&acc, &acc);
            if k.bit(i) {
                acc = self.add(&acc, &g);
            }
        }
        acc
    }

    fn scalar(&self) -> BigUint {
        let mut b = [0u8; 48];
        aws_lc_rs::rand::fill(&mut b).unwrap();
        BigUint::from_bytes_be(&b) % &self.n
    }
}

/// A P-384 key pair: its uncompressed point, and a signer making
/// ecdsa-with-SHA256 signatures with it.
fn p384_sha256_signer() -> (Vec<u8>, impl Fn(&[u8]) -> Vec<u8>) {
    let curve = p384();
    let d = curve.scalar();
    let (x, y) = curve.mul(&d).unwrap();
    let fixed = |n: &BigUint| {
        let b = n.to_bytes_be();
        [vec![0u8; 48 - b.len()], b].concat()
    };
    let point = [vec![0x04], fixed(&x), fixed(&y)].concat();
    let sign = move |message: &[u8]| {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, message);
        let e = BigUint::from_bytes_be(digest.as_ref());
        let k = curve.scalar();
        let (rx, _) = curve.mul(&k).unwrap();
        let r = rx % &curve.n;
        let s = k.modinv(&curve.n).unwrap() * (e + &r * &d) % &curve.n;
        seq(&[&uint(&r), &uint(&s)])
    };
    (point, sign)
}

fn rcgen_csr(key: &rcgen::KeyPair) -> Vec<u8> {
    rcgen::CertificateParams::default()
        .serialize_request(key)
        .unwrap()
        .der()
        .to_vec()
}

fn good_csr() -> Vec<u8> {
    rcgen_csr(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap())
}

/// Every kind of key the SVID must not certify as P-256.
fn bad_key_csrs() -> Vec<(&'static str, Vec<u8>, &'static str)> {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};
    let (p384_point, p384_sign) = p384_sha256_signer();
    let p384_sha256 = ec_csr(OID_P384, &p384_point, p384_sign);
    // The signature really verifies: this request is well formed, and
    // only its key is wrong.
    {
        use x509_parser::prelude::FromDer as _;
        let (_, csr) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&p384_sha256)
                .unwrap();
        csr.verify_signature().unwrap();
    }
    let p256 = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_ASN1_SIGNING).unwrap();
    let full = p256.public_key().as_ref();
    let compressed = [&[0x02 | (full[64] & 1)][..], &full[1..33]].concat();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let compressed = ec_csr(OID_P256, &compressed, |m| {
        p256.sign(&rng, m).unwrap().as_ref().to_vec()
    });
    let rsa = rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
        .unwrap();
    vec![
        ("P-384 signed ecdsa-with-SHA256", p384_sha256, "a P-384 key"),
        (
            "P-384 signed ecdsa-with-SHA384",
            rcgen_csr(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap()),
            "a P-384 key",
        ),
        (
            "compressed P-256",
            compressed,
            "a P-256 key that is not a 65-byte uncompressed point (33 bytes)",
        ),
        (
            "Ed25519",
            rcgen_csr(&rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap()),
            "an Ed25519 key",
        ),
        ("RSA", rcgen_csr(&rsa), "an RSA key"),
    ]
}

#[test]
fn a_csr_is_certified_only_for_an_uncompressed_p256_key_whatever_its_signature_algorithm_says() {
    let now = 1_800_000_000;
    let (ca, _) = Authority::generate(
        &"spiffe://example.org".parse().unwrap(),
        Lifetimes::default(),
        now,
    )
    .unwrap();
    let id = ID.parse().unwrap();
    for (what, csr, found) in bad_key_csrs() {
        assert_eq!(
            ca.issue_svid(&csr, &id, 3600, now),
            Err(CaError::CsrKeyType {
                found: found.into()
            }),
            "{what}"
        );
    }
    assert!(ca.issue_svid(&good_csr(), &id, 3600, now).is_ok());
}

// --- Join tokens ------------------------------------------------------

/// A gRPC channel to the broker with no client certificate (attestation
/// comes before any SVID).
fn anonymous(
    served: &ServedBroker,
) -> pb::identity_client::IdentityClient<tonic::transport::Channel> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(served.broker.bundle_pem()))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", served.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    pb::identity_client::IdentityClient::new(channel)
}

fn attest(token: &str, csr: Vec<u8>) -> pb::AttestRequest {
    pb::AttestRequest {
        credential: Some(pb::attest_request::Credential::JoinToken(token.into())),
        csr_der: csr,
    }
}

async fn broker(policy: &str) -> (tempfile::TempDir, ServedBroker) {
    let dir = tempfile::tempdir().unwrap();
    let key = Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings(policy), "127.0.0.1:0").await;
    (dir, served)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_csr_leaves_the_join_token_usable_once() {
    let (_dir, served) = broker(POLICY).await;
    let mut client = anonymous(&served);
    let token = served
        .broker
        .create_join_token(&ID.parse().unwrap(), 600, None)
        .await
        .unwrap();
    let token = token.expose();

    // Refused CSRs: a wrong key, garbage, another identity.
    let (_, wrong_key, _) = bad_key_csrs().remove(0);
    let refused = client.attest(attest(token, wrong_key)).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("P-384"), "{refused:?}");
    let refused = client
        .attest(attest(token, b"not a csr".to_vec()))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/ns/prod/sa/admin".try_into().unwrap(),
    )];
    let other_id = params.serialize_request(&key).unwrap().der().to_vec();
    let refused = client.attest(attest(token, other_id)).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");
    assert!(
        refused.message().contains("CSR asks for identity"),
        "{refused:?}"
    );

    // The token still works, once.
    let svid = client
        .attest(attest(token, good_csr()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(svid.spiffe_id, ID);
    let again = client.attest(attest(token, good_csr())).await.unwrap_err();
    assert_eq!(again.code(), Code::PermissionDenied, "{again:?}");
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn of_concurrent_attestations_with_one_join_token_exactly_one_gets_an_svid() {
    let (_dir, served) = broker(POLICY).await;
    let token = served
        .broker
        .create_join_token(&ID.parse().unwrap(), 600, None)
        .await
        .unwrap();
    let mut tries = tokio::task::JoinSet::new();
    for _ in 0..12 {
        let mut client = anonymous(&served);
        let request = attest(token.expose(), good_csr());
        tries.spawn(async move { client.attest(request).await });
    }
    let (mut won, mut refused) = (0, 0);
    while let Some(outcome) = tries.join_next().await {
        match outcome.unwrap() {
            Ok(_) => won += 1,
            Err(e) => {
                assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
                refused += 1;
            }
        }
    }
    assert_eq!((won, refused), (1, 11));
    // One SVID in the inventory and in the audit log.
    let issued = served
        .broker
        .store()
        .audit_after(0, 1000)
        .await
        .unwrap()
        .iter()
        .filter(|r| r.kind == "identity.attest" && r.line.contains("\"outcome\":\"ok\""))
        .count();
    assert_eq!(issued, 1);
    served.stop().await;
}

// --- Issue-rule rate limits ---------------------------------------------

/// Any workload may get payments:read tokens, twice a minute each.
const WILDCARD: &str = "trust_domain: example.org
issue:
  - from: spiffe://example.org/ns/*/sa/*
    to: spiffe://example.org/ns/pay/sa/payments
    scopes: [payments:read]
    rate: 2/m
";

const ALICE: &str = "spiffe://example.org/ns/a/sa/alice";
const BOB: &str = "spiffe://example.org/ns/b/sa/bob";

async fn ask_token(served: &ServedBroker, caller: &str) -> Result<(), tonic::Status> {
    let key = ProofKey::generate().unwrap();
    let proof = key
        .mint(
            "POST",
            served.broker.issue_uri(),
            None,
            None,
            SystemClock.now(),
        )
        .unwrap();
    let mut client = pb::tokens_client::TokensClient::new(channel_as(served, caller));
    client
        .issue(pb::IssueRequest {
            audience: "spiffe://example.org/ns/pay/sa/payments".into(),
            scopes: vec!["payments:read".into()],
            ttl_seconds: 0,
            dpop_proof: proof,
        })
        .await
        .map(|_| ())
}

fn assert_throttled(result: Result<(), tonic::Status>) {
    let status = result.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let retry: u64 = status
        .metadata()
        .get("retry-after")
        .expect("retry-after")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_caller_under_a_wildcard_rule_cannot_spend_another_callers_budget() {
    let (_dir, served) = broker(WILDCARD).await;
    ask_token(&served, ALICE).await.unwrap();
    ask_token(&served, ALICE).await.unwrap();
    assert_throttled(ask_token(&served, ALICE).await);
    // Bob has his own two.
    ask_token(&served, BOB).await.unwrap();
    ask_token(&served, BOB).await.unwrap();
    assert_throttled(ask_token(&served, BOB).await);
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_reload_keeps_the_budgets_of_unchanged_rules_and_resets_changed_ones() {
    let (_dir, served) = broker(WILDCARD).await;
    let admin = "spiffe://example.org/admin".parse().unwrap();
    ask_token(&served, ALICE).await.unwrap();
    ask_token(&served, ALICE).await.unwrap();
    assert_throttled(ask_token(&served, ALICE).await);

    // A rule added in front moves Alice's rule, unchanged: still spent.
    let moved = WILDCARD.replace(
        "issue:\n",
        "issue:\n  - from: spiffe://example.org/ns/c/sa/carol\n    to: spiffe://example.org/ns/pay/sa/payments\n    scopes: [payments:read]\n    rate: 5/m\n",
    );
    served
        .broker
        .apply_policy(&moved, &admin, "carol")
        .await
        .unwrap();
    assert_throttled(ask_token(&served, ALICE).await);

    // The rule itself changes (a new rate): a new budget under it.
    let changed = moved.replace("rate: 2/m", "rate: 3/m");
    served
        .broker
        .apply_policy(&changed, &admin, "more")
        .await
        .unwrap();
    for _ in 0..3 {
        ask_token(&served, ALICE).await.unwrap();
    }
    assert_throttled(ask_token(&served, ALICE).await);
    served.stop().await;
}

// --- /oauth2/revoke -------------------------------------------------------

/// One HTTP/1.1 request over TLS as `client`; the raw response.
async fn https_raw(
    served: &ServedBroker,
    addr: std::net::SocketAddr,
    client: &tally::ca::Credential,
    head: &str,
    body: &str,
) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(served.broker.bundle_pem().as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
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
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    let request = format!(
        "{head} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    tls.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    // The server may close without close_notify after answering.
    let _ = tls.read_to_end(&mut raw).await;
    raw
}

/// A response without its `date` header, which is the only part allowed
/// to differ between two answers.
fn without_date(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw)
        .split("\r\n")
        .filter(|line| !line.to_ascii_lowercase().starts_with("date:"))
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_revoking_a_live_token_hears_what_it_would_for_no_token_and_changes_nothing() {
    let (_dir, served) = broker(POLICY).await;
    let https = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let https_addr = https.local_addr().unwrap();
    let certs = Arc::clone(&served.certs);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(tally::broker::serve::serve_https(
        Arc::clone(&served.broker),
        https,
        certs,
        async {
            let _ = stopped.await;
        },
    ));

    // Checkout's live token.
    let checkout = "spiffe://example.org/ns/shop/sa/checkout";
    let key = ProofKey::generate().unwrap();
    let proof = key
        .mint(
            "POST",
            served.broker.issue_uri(),
            None,
            None,
            SystemClock.now(),
        )
        .unwrap();
    let live = pb::tokens_client::TokensClient::new(channel_as(&served, checkout))
        .issue(pb::IssueRequest {
            audience: "spiffe://example.org/ns/pay/sa/payments".into(),
            scopes: vec!["payments:charge".into()],
            ttl_seconds: 0,
            dpop_proof: proof,
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    // A well-formed token naming a jti the broker never issued.
    let mut parts: Vec<String> = live.split('.').map(str::to_owned).collect();
    let mut claims: serde_json::Value =
        serde_json::from_slice(&tally::jose::b64::decode(parts[1].as_bytes()).unwrap()).unwrap();
    claims["jti"] = "06b0e97ca0000005never-issued-here".into();
    parts[1] = tally::jose::b64::encode(claims.to_string().as_bytes());
    let unknown = parts.join(".");

    let stranger = served
        .broker
        .mint_credential(
            &"spiffe://example.org/ns/x/sa/stranger".parse().unwrap(),
            600,
        )
        .unwrap();
    let revoke = |token: String| {
        let stranger = &stranger;
        let served = &served;
        async move {
            let body = format!("token={token}&token_type_hint=access_token");
            let raw = https_raw(served, https_addr, stranger, "POST /oauth2/revoke", &body).await;
            without_date(&raw)
        }
    };
    let answers = [
        revoke(live.clone()).await,
        revoke(unknown).await,
        revoke("not.a.token".into()).await,
    ];
    assert!(answers[0].starts_with("HTTP/1.1 200 "), "{}", answers[0]);
    assert_eq!(answers[0], answers[1], "live (someone else's) vs unknown");
    assert_eq!(answers[1], answers[2], "unknown vs garbage");

    // Nothing was revoked: the token is live for its holder, and no
    // revocation reached the feed.
    let (found, revoked) = served.broker.find_token(&live).await.unwrap().unwrap();
    assert_eq!(found.sub.as_str(), checkout);
    assert!(!revoked);
    assert!(
        served
            .broker
            .revocations_in_force()
            .await
            .unwrap()
            .is_empty()
    );
    let holder = served
        .broker
        .mint_credential(&checkout.parse().unwrap(), 600)
        .unwrap();
    let seen = https_raw(
        &served,
        https_addr,
        &holder,
        "POST /oauth2/introspect",
        &format!("token={live}"),
    )
    .await;
    assert!(String::from_utf8_lossy(&seen).contains("\"active\":true"));

    let _ = stop.send(());
    server.await.unwrap().unwrap();
    served.stop().await;
}
