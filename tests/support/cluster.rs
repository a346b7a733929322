//! A stand-in for a Kubernetes cluster's API server, which cannot run
//! here: a real HTTPS server (rustls, a certificate from a test CA the
//! broker is given with `--sa-ca-file`) speaking the wire formats the
//! broker uses — OpenID discovery, the JWKS, and TokenReview
//! (`authentication.k8s.io/v1`) — with what it answers set by the test,
//! and every request counted. Also the cluster's token signing keys
//! (RS256 and ES256), which mint projected ServiceAccount tokens.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::{KeyPair as RsaKeyPair, KeySize, PublicKeyComponents};
use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_SHA256};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tally::jose::{SigningKey, b64};

/// The cluster's signing keys, each under its `kid`.
pub struct Signer {
    pub kid: String,
    key: Key,
}

enum Key {
    Rsa(RsaKeyPair),
    Ec(SigningKey),
}

impl Signer {
    pub fn rsa(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            key: Key::Rsa(RsaKeyPair::generate(KeySize::Rsa2048).unwrap()),
        }
    }

    pub fn ec(kid: &str) -> Self {
        Self {
            kid: kid.into(),
            key: Key::Ec(SigningKey::generate().unwrap()),
        }
    }

    /// This key as a JWKS member.
    pub fn jwk(&self) -> Value {
        match &self.key {
            Key::Rsa(k) => {
                let pk = PublicKeyComponents::<Vec<u8>>::from(k.public_key());
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                       "n": b64::encode(&pk.n), "e": b64::encode(&pk.e)})
            }
            Key::Ec(k) => {
                let mut jwk: Value = serde_json::from_str(&k.public_key().to_jwk_json()).unwrap();
                jwk["kid"] = self.kid.clone().into();
                jwk["use"] = "sig".into();
                jwk
            }
        }
    }

    /// `claims` signed under this key's alg and `kid` (or `kid` given).
    pub fn sign(&self, claims: &Value, kid: Option<&str>) -> String {
        let kid = kid.unwrap_or(&self.kid);
        match &self.key {
            Key::Rsa(k) => {
                let header = json!({"alg": "RS256", "kid": kid});
                let input = format!(
                    "{}.{}",
                    b64::encode(header.to_string()),
                    b64::encode(claims.to_string())
                );
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    input.as_bytes(),
                    &mut sig,
                )
                .unwrap();
                format!("{input}.{}", b64::encode(sig))
            }
            Key::Ec(k) => tally::jose::jws::sign_compact(
                &tally::jose::jws::encode_header(&json!({"alg": "ES256", "kid": kid})),
                claims.to_string().as_bytes(),
                k,
            )
            .unwrap(),
        }
    }
}

/// A JWKS document of `signers`.
pub fn jwks(signers: &[&Signer]) -> Vec<u8> {
    json!({"keys": signers.iter().map(|s| s.jwk()).collect::<Vec<_>>()})
        .to_string()
        .into_bytes()
}

/// The claims the kubelet projects for a pod of `ns`/`sa`, valid ten
/// minutes from `now`.
pub fn pod_claims(
    issuer: &str,
    audience: &str,
    ns: &str,
    sa: &str,
    pod: (&str, &str),
    now: u64,
) -> Value {
    json!({
        "aud": [audience], "exp": now + 600, "iat": now, "nbf": now, "iss": issuer,
        "sub": format!("system:serviceaccount:{ns}:{sa}"),
        "kubernetes.io": {"namespace": ns, "serviceaccount": {"name": sa, "uid": "sa-uid-1"},
                          "pod": {"name": pod.0, "uid": pod.1}, "node": {"name": "worker-1", "uid": "n-1"}},
    })
}

/// How the stand-in answers a TokenReview body: status code and JSON.
pub type Review = dyn Fn(&Value) -> (u16, Value) + Send + Sync;

/// What the stand-in answers, set by the test; what it saw, for asserts.
#[derive(Default)]
pub struct Answers {
    /// The discovery document (default: issuer = this server, jwks_uri on it).
    pub discovery: Mutex<Option<Vec<u8>>>,
    /// The JWKS document.
    pub jwks: Mutex<Vec<u8>>,
    /// Answer the JWKS with 500.
    pub jwks_fails: AtomicBool,
    /// Accept connections and never answer.
    pub stall: AtomicBool,
    /// The TokenReview answer for a review body (status code and JSON).
    pub review: Mutex<Option<Box<Review>>>,
    pub discovery_fetches: AtomicUsize,
    pub jwks_fetches: AtomicUsize,
    /// Every TokenReview body received.
    pub reviews: Mutex<Vec<Value>>,
    /// Every Authorization header received.
    pub bearers: Mutex<Vec<String>>,
}

/// The running stand-in.
pub struct StandIn {
    /// `https://127.0.0.1:PORT`: the issuer, the JWKS and the API server.
    pub url: String,
    pub answers: Arc<Answers>,
    /// The test CA's certificate, PEM (for `--sa-ca-file`).
    pub ca_pem: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl StandIn {
    /// Starts on 127.0.0.1:0 with a certificate for 127.0.0.1 from a new
    /// test CA.
    pub async fn start() -> Self {
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test cluster CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
                .unwrap()
                .signed_by(&leaf_key, &rcgen::Issuer::from_params(&ca_params, &ca_key))
                .unwrap();
        let config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        let answers = Arc::new(Answers::default());
        let (served, base) = (Arc::clone(&answers), url.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let (acceptor, answers, base) =
                    (acceptor.clone(), Arc::clone(&served), base.clone());
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        let (answers, base) = (Arc::clone(&answers), base.clone());
                        async move {
                            Ok::<_, std::convert::Infallible>(answer(&answers, &base, req).await)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            url,
            answers,
            ca_pem: ca.pem(),
            task,
        }
    }

    /// Answers TokenReviews with `f`.
    pub fn review_with(&self, f: impl Fn(&Value) -> (u16, Value) + Send + Sync + 'static) {
        *self.answers.review.lock().unwrap() = Some(Box::new(f));
    }
}

/// A TokenReview answer: `authenticated`, as `user`, for pod `uid`, for
/// the audiences asked.
pub fn review_answer(request: &Value, authenticated: bool, user: &str, uid: &str) -> Value {
    json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
        "spec": request["spec"],
        "status": {"authenticated": authenticated, "audiences": request["spec"]["audiences"],
            "user": {"username": user, "uid": "sa-uid-1",
                "groups": ["system:serviceaccounts", "system:authenticated"],
                "extra": {"authentication.kubernetes.io/pod-name": ["checkout-7d9f"],
                          "authentication.kubernetes.io/pod-uid": [uid]}}},
    })
}

async fn answer(
    answers: &Answers,
    base: &str,
    req: hyper::Request<Incoming>,
) -> hyper::Response<Full<Bytes>> {
    if answers.stall.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    if let Some(auth) = req.headers().get("authorization") {
        answers
            .bearers
            .lock()
            .unwrap()
            .push(auth.to_str().unwrap().to_owned());
    }
    let respond = |status: u16, body: Vec<u8>| {
        hyper::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap()
    };
    match (req.method().as_str(), req.uri().path()) {
        ("GET", "/.well-known/openid-configuration") => {
            answers.discovery_fetches.fetch_add(1, Ordering::SeqCst);
            let doc = answers.discovery.lock().unwrap().clone().unwrap_or_else(|| {
                json!({"issuer": base, "jwks_uri": format!("{base}/openid/v1/jwks"),
                       "response_types_supported": ["id_token"], "subject_types_supported": ["public"],
                       "id_token_signing_alg_values_supported": ["RS256", "ES256"]})
                .to_string()
                .into_bytes()
            });
            respond(200, doc)
        }
        ("GET", "/openid/v1/jwks") => {
            answers.jwks_fetches.fetch_add(1, Ordering::SeqCst);
            if answers.jwks_fails.load(Ordering::SeqCst) {
                return respond(500, b"{}".to_vec());
            }
            respond(200, answers.jwks.lock().unwrap().clone())
        }
        ("POST", "/apis/authentication.k8s.io/v1/tokenreviews") => {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let review: Value = serde_json::from_slice(&body).unwrap();
            answers.reviews.lock().unwrap().push(review.clone());
            let (status, answer) = match &*answers.review.lock().unwrap() {
                Some(f) => f(&review),
                None => (404, json!({})),
            };
            respond(status, answer.to_string().into_bytes())
        }
        _ => respond(404, b"{}".to_vec()),
    }
}

/// Rows written before the pod columns (schema 9) still read, and an
/// SVID's pod is kept, listed with its identity while live, and found by
/// serial: on `store`, taken back to schema 9 by [`BEFORE_PODS`] (one old
/// SVID row, serial `old`) and opened again, which migrated it.
pub async fn pods_survive_the_migration(store: &tally::store::Store) {
    use tally::audit::{AuditEvent, AuditKind, Outcome};
    use tally::identity::k8s::Pod;
    use tally::store::{SvidRecord, Write};
    const NOW: u64 = 1_800_000_000;
    assert_eq!(store.schema_version().await.unwrap(), 11);
    let ids = store.identities(NOW).await.unwrap();
    assert_eq!(ids.len(), 1, "the old row still reads");
    assert!(ids[0].pods.is_empty());
    assert_eq!(store.svid_pod("old").await.unwrap(), None);
    let pod = Pod {
        name: "checkout-7d9f".into(),
        uid: "3f1c9a52-1b7e-4c1d-9a2e-6d0b8f4e2a11".into(),
    };
    let id: tally::identity::SpiffeId = "spiffe://example.org/ns/shop/sa/checkout".parse().unwrap();
    for (serial, pod) in [("new", Some(pod.clone())), ("joined", None)] {
        let event = AuditEvent::new(AuditKind::Attest, Outcome::Ok, NOW).actor(&id);
        let record = SvidRecord {
            serial: serial.into(),
            spiffe_id: id.clone(),
            method: "k8s_sa",
            issued_at: NOW,
            expires_at: NOW + 3600,
            pod,
        };
        store
            .record(Some(Write::Svid(record)), event)
            .await
            .unwrap();
    }
    assert_eq!(store.svid_pod("new").await.unwrap(), Some(pod.clone()));
    assert_eq!(store.svid_pod("joined").await.unwrap(), None);
    assert_eq!(store.identities(NOW).await.unwrap()[0].pods, vec![pod]);
    assert!(
        store.identities(NOW + 3600).await.unwrap()[0]
            .pods
            .is_empty(),
        "expired: no pod holds it"
    );
}

/// SQL that takes a schema-11 store back to 9 with one old SVID row.
pub const BEFORE_PODS: [&str; 5] = [
    "ALTER TABLE svids DROP COLUMN pod_name",
    "ALTER TABLE svids DROP COLUMN pod_uid",
    "ALTER TABLE issued_tokens DROP COLUMN kind",
    "DELETE FROM schema_version WHERE version >= 10",
    "INSERT INTO svids (serial, spiffe_id, method, issued_at, expires_at) VALUES ('old', 'spiffe://example.org/ns/shop/sa/checkout', 'join_token', 1799999000, 1800003600)",
];
