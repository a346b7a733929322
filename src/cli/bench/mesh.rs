//! `tally bench inbound --mtls`: the in-mesh hop as another sidecar makes
//! it. The tool attests a bench client identity with a join token (an
//! X.509-SVID whose key is its DPoP key, as a sidecar's is), gets a token
//! bound to that key, and drives the sidecar's inbound port over TLS 1.3
//! and HTTP/2 with the SVID as client certificate: N connections, M
//! streams in flight on each, `Authorization: DPoP <token>` and no `DPoP`
//! header (the handshake proved possession).

use super::common::{AUDIENCE, CLIENT, failed, percentile};
use super::sidecar::join_token;
use crate::cli::CliError;
use crate::clock::{Clock, SystemClock};
use crate::dpop::ProofKey;
use crate::identity::SpiffeId;
use crate::jose::SigningKey;
use crate::sidecar::identity::{Attestation, IdentityClient, Svid};
use crate::sidecar::mtls::MeshCredentials;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use rustls::pki_types::pem::PemObject as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The bench client as a mesh peer: its SVID and a token bound to its key.
pub(super) struct Peer {
    tls: Arc<rustls::ClientConfig>,
    authorization: http::HeaderValue,
}

impl Peer {
    /// Attests [`CLIENT`] at the broker on `addr` and gets a token for
    /// [`AUDIENCE`] bound to the SVID key.
    pub(super) async fn attest(addr: &str, data: &Path) -> Result<Self, CliError> {
        let join = join_token(addr, data, CLIENT).await?;
        let bundle = std::fs::read_to_string(data.join("bundle.pem"))
            .map_err(|e| failed("bundle.pem", e))?;
        let port = addr.rsplit(':').next().unwrap_or_default();
        let broker = IdentityClient::new(format!("https://localhost:{port}"), bundle.clone());
        let svid = broker
            .attest(&Attestation::JoinToken(join.into()), SystemClock.now())
            .await
            .map_err(|e| failed("attesting the bench client", e))?;
        let key = ProofKey::new(
            SigningKey::from_pkcs8_pem(svid.key_pem.as_bytes())
                .map_err(|e| failed("the SVID key", e))?,
        );
        let token = token_for(&broker, &svid, &key).await?;
        let roots = rustls::pki_types::CertificateDer::pem_slice_iter(bundle.as_bytes())
            .map(|c| c.map(|c| c.to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| failed("bundle.pem", e))?;
        let server: SpiffeId = AUDIENCE
            .parse()
            .map_err(|e| failed("the bench audience", e))?;
        let tls = MeshCredentials::new(Arc::new(svid), roots)
            .and_then(|c| c.client_config(&server))
            .map_err(|e| failed("mesh TLS settings", e))?;
        let authorization = http::HeaderValue::try_from(format!("DPoP {token}"))
            .map_err(|e| failed("the token", e))?;
        Ok(Self { tls, authorization })
    }

    /// One HTTP/2 connection to the inbound port at `addr`.
    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<hyper::client::conn::http2::SendRequest<Empty<Bytes>>, CliError> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| failed("connecting to the inbound port", e))?;
        let _ = tcp.set_nodelay(true);
        // The server is checked by its SPIFFE ID, not a DNS name.
        let name = rustls::pki_types::ServerName::try_from("mesh.invalid")
            .map_err(|e| failed("server name", e))?;
        let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
            .connect(name, tcp)
            .await
            .map_err(|e| failed("the mTLS handshake with the sidecar", e))?;
        let (sender, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .map_err(|e| failed("HTTP/2 with the sidecar", e))?;
        tokio::spawn(conn);
        Ok(sender)
    }
}

/// A token for [`AUDIENCE`], bound to `key` (the SVID's).
async fn token_for(
    broker: &IdentityClient,
    svid: &Svid,
    key: &ProofKey,
) -> Result<String, CliError> {
    let channel = broker
        .channel(svid)
        .map_err(|e| failed("a channel to the broker", e))?;
    super::sidecar::issue_bench_token(channel, &svid.issue_htu(), key).await
}

/// What one mTLS load run saw.
#[derive(Debug, Default)]
pub(super) struct MeshRun {
    /// Answers with status 200.
    pub(super) ok: u64,
    /// Other answers and stream errors.
    pub(super) refused: u64,
    /// The first refusal's status or error, for the report.
    pub(super) first_refusal: Option<String>,
    /// Latency of each answered request, microseconds, sorted.
    latencies: Vec<u32>,
    /// How long the run lasted.
    pub(super) took: Duration,
}

impl MeshRun {
    /// Answered requests per second.
    pub(super) fn rate(&self) -> f64 {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let answered = (self.ok + self.refused) as f64;
        answered / self.took.as_secs_f64().max(1e-9)
    }

    /// Latency at `p` (0–1), milliseconds.
    pub(super) fn ms(&self, p: f64) -> f64 {
        percentile(&self.latencies, p)
    }
}

/// `connections` × `streams` requests in flight to `url` for `duration`.
pub(super) async fn drive(
    peer: &Peer,
    addr: SocketAddr,
    url: &str,
    connections: usize,
    streams: usize,
    duration: Duration,
) -> Result<MeshRun, CliError> {
    let uri: http::Uri = url.parse().map_err(|e| failed("the bench URL", e))?;
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        senders.push(peer.connect(addr).await?);
    }
    let started = Instant::now();
    let end = started + duration;
    let mut tasks = tokio::task::JoinSet::new();
    for sender in &senders {
        for _ in 0..streams {
            let (mut sender, uri) = (sender.clone(), uri.clone());
            let authorization = peer.authorization.clone();
            tasks.spawn(async move {
                let mut run = MeshRun::default();
                while Instant::now() < end {
                    let mut request = http::Request::new(Empty::<Bytes>::new());
                    *request.uri_mut() = uri.clone();
                    request
                        .headers_mut()
                        .insert(http::header::AUTHORIZATION, authorization.clone());
                    let sent = Instant::now();
                    if sender.ready().await.is_err() {
                        run.note_refusal("the connection closed".into());
                        break;
                    }
                    let answer = match sender.send_request(request).await {
                        Ok(response) => {
                            let status = response.status();
                            response
                                .into_body()
                                .collect()
                                .await
                                .map(|_| status)
                                .map_err(|e| e.to_string())
                        }
                        Err(e) => Err(e.to_string()),
                    };
                    match answer {
                        Ok(http::StatusCode::OK) => {
                            run.ok += 1;
                            let micros = sent.elapsed().as_micros();
                            run.latencies
                                .push(u32::try_from(micros).unwrap_or(u32::MAX));
                        }
                        Ok(status) => run.note_refusal(status.to_string()),
                        Err(e) => run.note_refusal(e),
                    }
                }
                run
            });
        }
    }
    let mut all = MeshRun::default();
    while let Some(done) = tasks.join_next().await {
        let run = done.map_err(|e| failed("a load task", e))?;
        all.ok += run.ok;
        all.refused += run.refused;
        all.first_refusal = all.first_refusal.or(run.first_refusal);
        all.latencies.extend(run.latencies);
    }
    all.took = started.elapsed();
    all.latencies.sort_unstable();
    Ok(all)
}

impl MeshRun {
    fn note_refusal(&mut self, what: String) {
        self.refused += 1;
        self.first_refusal.get_or_insert(what);
    }
}
