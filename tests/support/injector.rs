//! `tally injector` as the API server meets it: the real binary on
//! 127.0.0.1:0 with a serving certificate made here (rcgen), an HTTPS
//! client, AdmissionReview v1 bodies, the returned JSON Patch applied by
//! a JSON Patch library, and the result checked against the Kubernetes
//! 1.33 schema (typed, and by `kubernetes-validate` when it is installed).
//! Included by the injector test files only (`#[path]`): the typed
//! Kubernetes model is heavy to build into every test binary.

#![allow(dead_code)]

use crate::support::process::{Lines, PATIENCE, terminate, wait_exit};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Settings every test webhook gets.
pub const IMAGE: &str = "ghcr.io/tally-dev/tally:0.1.0";
pub const AUDIENCE: &str = "tally-broker";

/// A CA and a serving certificate for `localhost` and 127.0.0.1 signed by
/// it, written as `tls.crt`/`tls.key` in `dir`; the CA's PEM.
pub fn write_serving_pair(dir: &Path, cn: &str) -> String {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{cn} CA"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, cn);
    let cert = params.signed_by(&key, &ca).unwrap();
    // Written beside and renamed over, as a Secret volume's symlink swap
    // replaces the file whole.
    for (name, text) in [("tls.crt", cert.pem()), ("tls.key", key.serialize_pem())] {
        let tmp = dir.join(format!(".{name}.new"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(name)).unwrap();
    }
    ca.pem()
}

/// A running webhook.
pub struct Webhook {
    child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub dir: tempfile::TempDir,
    pub ca_pem: String,
    pub stdout: Lines,
}

impl Webhook {
    /// Starts `tally injector` with the test settings and `extra` flags.
    pub fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca_pem = write_serving_pair(dir.path(), "injector one");
        // Any PEM certificate stands for the broker's bundle here.
        std::fs::write(dir.path().join("bundle.pem"), &ca_pem).unwrap();
        let path = |n: &str| dir.path().join(n).display().to_string();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([
                "injector",
                "--listen",
                "127.0.0.1:0",
                "--header-timeout",
                "2s",
            ])
            .args([
                "--tls-cert",
                &path("tls.crt"),
                "--tls-key",
                &path("tls.key"),
            ])
            .args(["--trust-bundle", &path("bundle.pem"), "--image", IMAGE])
            .args(["--sa-audience", AUDIENCE])
            .args(extra)
            .env("TALLY_LOG", "info")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = Lines::of(child.stdout.take().unwrap());
        let line = stdout.wait_for("listening on https://", PATIENCE);
        let addr = line
            .split("https://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        Self {
            child,
            addr,
            dir,
            ca_pem,
            stdout,
        }
    }

    /// A TLS connection (no HTTP yet) trusting `ca_pem`.
    pub async fn tls_trusting(
        &self,
        ca_pem: &str,
    ) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap()
    }

    /// A new HTTPS connection trusting `ca_pem`.
    pub async fn connect_trusting(&self, ca_pem: &str) -> Conn {
        let tls = self.tls_trusting(ca_pem).await;
        let server_cert = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        Conn {
            sender,
            server_cert,
        }
    }

    /// A new HTTPS connection trusting the first CA.
    pub async fn connect(&self) -> Conn {
        self.connect_trusting(&self.ca_pem.clone()).await
    }

    /// One `POST /inject` on a new connection: (status, body).
    pub async fn post(&self, body: impl Into<Bytes>) -> (u16, Bytes) {
        self.connect()
            .await
            .request("POST", "/inject", body.into())
            .await
    }

    /// Reviews `pod` (a Pod CREATE in `namespace`) and returns the response.
    pub async fn review(&self, pod: &Value, namespace: &str) -> Value {
        let (status, body) = self
            .post(review_body(pod, namespace, "CREATE", "Pod"))
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).unwrap()
    }

    /// Stops it with SIGTERM and waits.
    pub fn stop(mut self) {
        terminate(&self.child);
        assert!(wait_exit(&mut self.child, PATIENCE).success());
    }
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One client connection.
pub struct Conn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    /// The certificate the server presented (DER).
    pub server_cert: Vec<u8>,
}

impl Conn {
    /// One request on this connection: (status, body).
    pub async fn request(&mut self, method: &str, path: &str, body: Bytes) -> (u16, Bytes) {
        let request = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost")
            .header("content-type", "application/json")
            .body(Full::new(body))
            .unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        (
            status,
            response.into_body().collect().await.unwrap().to_bytes(),
        )
    }
}

/// An AdmissionReview v1 request body.
pub fn review_body(object: &Value, namespace: &str, operation: &str, kind: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0df28fbd-5f5f-11e8-bc74-36e6bb280816",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": operation,
            "namespace": namespace,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": object,
            "dryRun": false
        }
    }))
    .unwrap()
}

/// A fixture pod from `tests/fixtures/kubernetes/pods/NAME.yaml`, as JSON.
pub fn fixture(name: &str) -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/kubernetes/pods")
        .join(format!("{name}.yaml"));
    tally::injector::yaml::read(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The JSON Patch in a review response (empty when there is none).
pub fn patch_of(response: &Value) -> Vec<Value> {
    let r = &response["response"];
    assert_eq!(r["uid"], "0df28fbd-5f5f-11e8-bc74-36e6bb280816", "{r}");
    assert_eq!(r["allowed"], true, "{r}");
    let Some(patch) = r.get("patch") else {
        assert!(r.get("patchType").is_none(), "{r}");
        return Vec::new();
    };
    assert_eq!(r["patchType"], "JSONPatch", "{r}");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(patch.as_str().unwrap())
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// The warnings in a review response.
pub fn warnings_of(response: &Value) -> Vec<String> {
    response["response"]["warnings"]
        .as_array()
        .map(|w| w.iter().map(|w| w.as_str().unwrap().to_owned()).collect())
        .unwrap_or_default()
}

/// `pod` with `ops` applied by the JSON Patch library, checked to be a
/// Kubernetes 1.33 Pod whose every field the typed model knows (a field
/// it does not know would be lost on the round trip).
pub fn apply(pod: &Value, ops: &[Value]) -> Value {
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops.to_vec())).unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap_or_else(|e| panic!("{e}: {ops:#?}"));
    let typed: k8s_openapi::api::core::v1::Pod = serde_json::from_value(patched.clone()).unwrap();
    let back = serde_json::to_value(&typed).unwrap();
    assert_eq!(
        back, patched,
        "a field of the patched pod is not in the Kubernetes 1.33 Pod"
    );
    patched
}

/// Runs `kubernetes-validate --strict` for Kubernetes 1.33 on each file
/// of `dir`; without the tool, fails if `TALLY_REQUIRE_KUBERNETES_VALIDATE=1`
/// and otherwise says it skipped.
pub fn validate_all(dir: &Path) {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    let ran = std::process::Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.33.0"])
        .args(&files)
        .output();
    match ran {
        Ok(o) => assert!(
            o.status.success(),
            "kubernetes-validate failed:\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) if std::env::var("TALLY_REQUIRE_KUBERNETES_VALIDATE").as_deref() == Ok("1") => {
            panic!("kubernetes-validate is required (TALLY_REQUIRE_KUBERNETES_VALIDATE=1): {e}")
        }
        Err(e) => eprintln!(
            "skipped kubernetes-validate (not installed: {e}); pip install kubernetes-validate"
        ),
    }
}
