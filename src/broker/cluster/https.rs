//! The broker's HTTPS client to the cluster: the issuer's discovery
//! document and JWKS, and TokenReview at the API server. One request per
//! connection (these are rare: a few a minute), over TLS verified with
//! the cluster CA, with the broker's own ServiceAccount token as bearer
//! when configured (read from its file on every request: the kubelet
//! rotates it). No redirect is followed, answers are capped in size, and
//! connecting and the whole exchange are each bounded in time.

use crate::identity::k8s::discovery::HttpsUrl;
use bytes::Bytes;
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::pki_types::pem::PemObject as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Time to open the TCP connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Time for everything after: TLS, request, the whole answer.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest bearer token file read.
const MAX_BEARER_LEN: u64 = 16 * 1024;

/// Why a request to the cluster failed. None of these carries a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// The TCP connection failed or did not open in time.
    #[error("connecting to {url}: {why}")]
    Connect {
        /// What was asked for.
        url: String,
        /// Why.
        why: String,
    },
    /// TLS failed (an untrusted certificate, the wrong name…).
    #[error("TLS with {url}: {why}")]
    Tls {
        /// What was asked for.
        url: String,
        /// Why.
        why: String,
    },
    /// The HTTP exchange failed.
    #[error("HTTP with {url}: {why}")]
    Http {
        /// What was asked for.
        url: String,
        /// Why.
        why: String,
    },
    /// The server did not answer whole within [`EXCHANGE_TIMEOUT`].
    #[error("{url} did not answer within {}s", EXCHANGE_TIMEOUT.as_secs())]
    TimedOut {
        /// What was asked for.
        url: String,
    },
    /// A redirect, which is never followed (it could lead to plain HTTP or
    /// another host).
    #[error("{url} redirects ({status}); redirects are not followed")]
    Redirect {
        /// What was asked for.
        url: String,
        /// The status.
        status: u16,
    },
    /// Another status than 2xx.
    #[error("{url} answered {status}{hint}")]
    Status {
        /// What was asked for.
        url: String,
        /// The status.
        status: u16,
        /// What to check, for 401 and 403.
        hint: &'static str,
    },
    /// The answer is larger than allowed.
    #[error("the answer from {url} is larger than {limit} bytes")]
    TooLarge {
        /// What was asked for.
        url: String,
        /// The cap.
        limit: usize,
    },
    /// The bearer token file could not be read.
    #[error("the broker's ServiceAccount token {path}: {why}")]
    Bearer {
        /// The file.
        path: String,
        /// Why.
        why: String,
    },
}

/// An HTTPS client trusting one set of roots, with an optional bearer
/// token file.
pub struct ClusterHttps {
    tls: Arc<rustls::ClientConfig>,
    bearer: Option<PathBuf>,
}

impl std::fmt::Debug for ClusterHttps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHttps")
            .field("bearer_file", &self.bearer)
            .finish_non_exhaustive()
    }
}

impl ClusterHttps {
    /// A client trusting the certificates in `roots_pem` (one or more PEM
    /// certificates), sending the token in `bearer` when given.
    ///
    /// # Errors
    /// A message when `roots_pem` holds no usable certificate.
    pub fn new(roots_pem: &[u8], bearer: Option<PathBuf>) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(roots_pem) {
            let cert = cert.map_err(|e| format!("not PEM certificates: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("a certificate is not usable as a root: {e}"))?;
        }
        if roots.is_empty() {
            return Err("no certificate in it".into());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            tls: Arc::new(config),
            bearer,
        })
    }

    /// `GET url`, the answer's body (at most `limit` bytes).
    ///
    /// # Errors
    /// [`FetchError`].
    pub async fn get(&self, url: &HttpsUrl, limit: usize) -> Result<Bytes, FetchError> {
        self.send(Method::GET, url, Bytes::new(), limit).await
    }

    /// `POST url` with a JSON `body`, the answer's body (at most `limit`
    /// bytes).
    ///
    /// # Errors
    /// [`FetchError`].
    pub async fn post_json(
        &self,
        url: &HttpsUrl,
        body: Vec<u8>,
        limit: usize,
    ) -> Result<Bytes, FetchError> {
        self.send(Method::POST, url, Bytes::from(body), limit).await
    }

    async fn send(
        &self,
        method: Method,
        url: &HttpsUrl,
        body: Bytes,
        limit: usize,
    ) -> Result<Bytes, FetchError> {
        let bearer = match &self.bearer {
            Some(path) => Some(read_bearer(path)?),
            None => None,
        };
        let named = url.to_string();
        let connect = |why: String| FetchError::Connect {
            url: named.clone(),
            why,
        };
        let tcp = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((url.host(), url.port())),
        )
        .await
        .map_err(|_| {
            connect(format!(
                "no connection within {}s",
                CONNECT_TIMEOUT.as_secs()
            ))
        })?
        .map_err(|e| connect(e.to_string()))?;
        let _ = tcp.set_nodelay(true);
        let exchange = async {
            let name =
                ServerName::try_from(url.host().to_owned()).map_err(|e| FetchError::Tls {
                    url: named.clone(),
                    why: e.to_string(),
                })?;
            let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
                .connect(name, tcp)
                .await
                .map_err(|e| FetchError::Tls {
                    url: named.clone(),
                    why: e.to_string(),
                })?;
            let http = |e: hyper::Error| FetchError::Http {
                url: named.clone(),
                why: e.to_string(),
            };
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .map_err(http)?;
            tokio::spawn(conn);
            let mut request = Request::builder()
                .method(method)
                .uri(url.path())
                .header(header::HOST, url.authority())
                .header(header::ACCEPT, "application/json");
            if !body.is_empty() {
                request = request.header(header::CONTENT_TYPE, "application/json");
            }
            let mut request = request
                .body(Full::new(body))
                .map_err(|e| FetchError::Http {
                    url: named.clone(),
                    why: e.to_string(),
                })?;
            if let Some(bearer) = &bearer {
                let mut value = http::HeaderValue::from_str(&format!("Bearer {}", bearer.as_str()))
                    .map_err(|_| FetchError::Bearer {
                        path: self.bearer_name(),
                        why: "not a token (characters a header cannot carry)".into(),
                    })?;
                value.set_sensitive(true);
                request.headers_mut().insert(header::AUTHORIZATION, value);
            }
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status();
            if status.is_redirection() {
                return Err(FetchError::Redirect {
                    url: named.clone(),
                    status: status.as_u16(),
                });
            }
            if !status.is_success() {
                return Err(FetchError::Status {
                    url: named.clone(),
                    status: status.as_u16(),
                    hint: match status {
                        StatusCode::UNAUTHORIZED => {
                            " (the broker's ServiceAccount token was not accepted: --sa-api-token-file)"
                        }
                        StatusCode::FORBIDDEN => {
                            " (the broker's ServiceAccount lacks the RBAC for this: see docs/KUBERNETES.md, \"How pods are attested\")"
                        }
                        _ => "",
                    },
                });
            }
            match Limited::new(response.into_body(), limit).collect().await {
                Ok(collected) => Ok(collected.to_bytes()),
                Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(FetchError::TooLarge {
                    url: named.clone(),
                    limit,
                }),
                Err(e) => Err(FetchError::Http {
                    url: named.clone(),
                    why: e.to_string(),
                }),
            }
        };
        tokio::time::timeout(EXCHANGE_TIMEOUT, exchange)
            .await
            .map_err(|_| FetchError::TimedOut { url: named.clone() })?
    }

    fn bearer_name(&self) -> String {
        self.bearer
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }
}

/// The broker's own token, as the kubelet last wrote it.
fn read_bearer(path: &Path) -> Result<zeroize::Zeroizing<String>, FetchError> {
    use std::io::Read as _;
    let bad = |why: String| FetchError::Bearer {
        path: path.display().to_string(),
        why,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let mut text = zeroize::Zeroizing::new(String::new());
    file.take(MAX_BEARER_LEN + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(e.to_string()))?;
    if text.len() as u64 > MAX_BEARER_LEN {
        return Err(bad(format!("larger than {MAX_BEARER_LEN} bytes")));
    }
    let token = zeroize::Zeroizing::new(text.trim().to_owned());
    if token.is_empty() {
        return Err(bad("empty".into()));
    }
    Ok(token)
}
