//! Envoy ext_authz against a real sidecar: checkout's socket hands out
//! credentials, payments' sidecar answers `Authorization/Check` (over a
//! tonic client here, or a real Envoy in tests/envoy_ext_authz.rs), and
//! the helpers to build checks and read their answers.

use super::mesh::{CHECKOUT, Mesh, PAYMENTS, Parts, Started};
use tally::proto::envoy::config::core::v3::HeaderMap;
use tally::proto::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use tally::proto::envoy::service::auth::v3::check_response::HttpResponse;
use tally::proto::envoy::service::auth::v3::{
    AttributeContext, CheckRequest, CheckResponse, attribute_context,
};
use tonic::transport::Channel;

/// The authority checks name (what the caller addressed at Envoy).
pub const HOST: &str = "pay.svc:8080";

/// A broker, payments' sidecar serving ext_authz (and its admin port),
/// checkout's sidecar with a socket.
pub struct Scene {
    pub mesh: Mesh,
    pub payments: Started,
    pub checkout: Started,
    /// A gRPC client for the TCP listener (none on a Unix socket).
    pub client: Option<AuthorizationClient<Channel>>,
}

impl Scene {
    pub async fn start() -> Self {
        Self::start_with(Parts::default()).await
    }

    /// With `payments` settings beyond ext_authz and the admin port.
    pub async fn start_with(payments: Parts) -> Self {
        // Checkout may hold a WIT: checks may carry WIMSE credentials.
        let mesh =
            Mesh::start_with_settings(super::broker::settings(super::mesh::POLICY_WITH_WIT)).await;
        let payments = mesh
            .sidecar(
                PAYMENTS,
                Parts {
                    ext_authz: !payments.ext_authz_socket,
                    admin: true,
                    ..payments
                },
            )
            .await;
        let checkout = mesh
            .sidecar(
                CHECKOUT,
                Parts {
                    socket: true,
                    services: vec![(HOST.to_owned(), PAYMENTS.to_owned())],
                    ..Parts::default()
                },
            )
            .await;
        let client = match payments.ext_authz {
            Some(at) => Some(client(at).await),
            None => None,
        };
        let scene = Self {
            mesh,
            payments,
            checkout,
            client,
        };
        if scene.client.is_some() {
            scene.prime(&scene.checkout, "payments:charge").await;
        }
        scene
    }

    /// Gives `caller`'s sidecar the server nonce a freshly started gate
    /// demands of proofs that may predate it.
    pub async fn prime(&self, caller: &Started, scope: &str) {
        let url = format!("http://{HOST}/nonce");
        let socket = caller.socket.as_deref().unwrap();
        let (authorization, dpop) = super::mesh::authorize(socket, "GET", &url, scope).await;
        let answer = self
            .check(http(
                "GET",
                "/nonce",
                &[("authorization", &authorization), ("dpop", &dpop)],
            ))
            .await;
        if let Some(nonce) = header(&answer, "dpop-nonce") {
            super::mesh::authorize_with_nonce(socket, "GET", &url, scope, Some(&nonce)).await;
        }
    }

    /// Checkout's `Authorization` and `DPoP` for `method` on `path`.
    pub async fn credentials(&self, method: &str, path: &str) -> (String, String) {
        let url = format!("http://{HOST}{path}");
        super::mesh::authorize(
            self.checkout.socket.as_deref().unwrap(),
            method,
            &url,
            "payments:charge",
        )
        .await
    }

    pub async fn check(&self, request: CheckRequest) -> CheckResponse {
        self.client
            .clone()
            .expect("a TCP ext_authz listener")
            .check(request)
            .await
            .expect("a check is answered with a CheckResponse")
            .into_inner()
    }

    pub async fn stop(self) {
        self.checkout.sidecar.stop().await.unwrap();
        self.payments.sidecar.stop().await.unwrap();
        self.mesh.broker.stop().await;
    }
}

/// A tonic client for the ext_authz service at `addr`.
pub async fn client(addr: std::net::SocketAddr) -> AuthorizationClient<Channel> {
    AuthorizationClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
}

/// A check of `method` `path` at [`HOST`] over plain HTTP with `headers`
/// (joined, as Envoy sends them without `encode_raw_headers`).
pub fn http(method: &str, path: &str, headers: &[(&str, &str)]) -> CheckRequest {
    request(attribute_context::HttpRequest {
        method: method.into(),
        scheme: "http".into(),
        host: HOST.into(),
        path: path.into(),
        headers: headers
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect(),
        ..Default::default()
    })
}

/// The same with headers only in `header_map`, one entry a line.
pub fn raw(method: &str, path: &str, lines: &[(&str, &str)]) -> CheckRequest {
    request(attribute_context::HttpRequest {
        method: method.into(),
        scheme: "http".into(),
        host: HOST.into(),
        path: path.into(),
        header_map: Some(HeaderMap {
            headers: lines
                .iter()
                .map(
                    |(k, v)| tally::proto::envoy::config::core::v3::HeaderValue {
                        key: (*k).into(),
                        raw_value: v.as_bytes().to_vec(),
                        ..Default::default()
                    },
                )
                .collect(),
        }),
        ..Default::default()
    })
}

pub fn request(http: attribute_context::HttpRequest) -> CheckRequest {
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(attribute_context::Request {
                http: Some(http),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// `request` as if Envoy had terminated mTLS with a peer: `principal`
/// and, when given, `certificate_pem` URL-encoded.
pub fn from_peer(
    mut request: CheckRequest,
    principal: &str,
    certificate_pem: Option<&str>,
) -> CheckRequest {
    let attributes = request.attributes.as_mut().unwrap();
    attributes.source = Some(attribute_context::Peer {
        principal: principal.into(),
        certificate: certificate_pem.map(url_encode).unwrap_or_default(),
        ..Default::default()
    });
    request
}

/// Percent-encodes everything but letters and digits, as Envoy encodes
/// the peer certificate.
pub fn url_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The HTTP status of an answer: 200 for an admission.
pub fn status(answer: &CheckResponse) -> u16 {
    match &answer.http_response {
        Some(HttpResponse::OkResponse(_)) => {
            assert_eq!(answer.status.as_ref().unwrap().code, 0);
            200
        }
        Some(HttpResponse::DeniedResponse(denied)) => {
            let code = answer.status.as_ref().unwrap().code;
            assert_ne!(code, 0, "a denial must carry a non-OK status");
            u16::try_from(denied.status.unwrap().code).unwrap()
        }
        other => panic!("no OK or denied response in {other:?}"),
    }
}

/// A header of a denial, or one an admission sets.
pub fn header(answer: &CheckResponse, name: &str) -> Option<String> {
    let headers = match &answer.http_response {
        Some(HttpResponse::OkResponse(ok)) => &ok.headers,
        Some(HttpResponse::DeniedResponse(denied)) => &denied.headers,
        _ => return None,
    };
    headers
        .iter()
        .filter_map(|h| h.header.as_ref())
        .find(|h| h.key == name)
        .map(|h| h.value.clone())
}

/// The headers an admission removes.
pub fn removed(answer: &CheckResponse) -> Vec<String> {
    match &answer.http_response {
        Some(HttpResponse::OkResponse(ok)) => ok.headers_to_remove.clone(),
        _ => Vec::new(),
    }
}

/// The JSON `error` of a denial.
pub fn error(answer: &CheckResponse) -> String {
    match &answer.http_response {
        Some(HttpResponse::DeniedResponse(denied)) => {
            let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
            body["error"].as_str().unwrap().to_owned()
        }
        _ => String::new(),
    }
}
