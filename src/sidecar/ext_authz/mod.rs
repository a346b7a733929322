//! Envoy's external authorization service on the sidecar
//! (`envoy.service.auth.v3.Authorization/Check`, gRPC): Envoy asks about
//! each request before it forwards it, and this sidecar answers with the
//! same admission verdict and the same answers as its inbound proxy (the
//! [`Gate`] both share). See docs/ENVOY.md.
//!
//! A check is read into the request it describes ([`check`]), its peer
//! claim checked ([`peer`]), judged by the gate, and answered ([`reply`]).
//! Every answer is a `CheckResponse`, never a gRPC error, for anything a
//! check says: Envoy's `failure_mode_allow: true` lets a request through
//! on an error, so an error must never be how a request is refused. Only
//! a caller that is not allowed on the Unix socket, or a message over
//! [`MAX_CHECK_BYTES`], gets a gRPC error (and Envoy, with
//! `failure_mode_allow: false`, refuses the request).
//!
//! Served through the loop every listener shares ([`crate::http::serve`]:
//! header and idle timeouts, connection cap, HTTP/2 stream limit), on TCP
//! or a Unix socket.

pub mod check;
pub mod peer;
pub mod reply;

use super::gate::{Gate, GateConfig, Head, Hop};
use super::identity::Svid;
use super::inbound::InboundMetrics;
use crate::auth::ConnectionTokens;
use crate::auth::target::Scheme;
use crate::auth::verdict::Refusal;
use crate::proto::envoy::service::auth::v3::authorization_server::{
    Authorization, AuthorizationServer,
};
use crate::proto::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use check::Described;
use peer::{PeerClaim, PeerVerifier};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::watch;

/// Largest `CheckRequest` decoded: the request head (at most
/// [`crate::http::MAX_HEADER_BYTES`] at this sidecar's own listeners)
/// and Envoy's attributes fit many times over. A filter that sends the
/// request body along (`with_request_body`) must keep it under this; the
/// body is never read.
pub const MAX_CHECK_BYTES: usize = 256 * 1024;

/// ext_authz settings. When the inbound proxy runs too, both judge with
/// one gate, and the check settings here must equal the inbound proxy's.
#[derive(Debug, Clone)]
pub struct ExtAuthzConfig {
    /// Let Envoy pass `Authorization` and `DPoP` on to the app (removed
    /// by default, as the inbound proxy does).
    pub pass_credentials: bool,
    /// Oldest DPoP proof accepted, seconds after its `iat`.
    pub proof_max_age: u64,
    /// Clock difference allowed between caller and this sidecar, seconds.
    pub clock_skew: u64,
    /// Staleness and served authorities.
    pub gate: GateConfig,
    /// How often refusals are summarized to the broker's audit log.
    pub report_every: std::time::Duration,
}

impl Default for ExtAuthzConfig {
    /// The inbound proxy's defaults ([`super::inbound::InboundConfig::new`]).
    fn default() -> Self {
        let inbound = super::inbound::InboundConfig::new("");
        Self {
            pass_credentials: inbound.pass_credentials,
            proof_max_age: inbound.proof_max_age,
            clock_skew: inbound.clock_skew,
            gate: inbound.gate(),
            report_every: inbound.report_every,
        }
    }
}

impl ExtAuthzConfig {
    /// The settings a shared gate must agree on: proof age, skew, and
    /// the gate's own.
    pub fn checks(&self) -> (u64, u64, GateConfig) {
        (self.proof_max_age, self.clock_skew, self.gate.clone())
    }
}

/// The service. Share it behind an `Arc`.
pub struct ExtAuthz {
    config: ExtAuthzConfig,
    gate: Arc<Gate>,
    svid: watch::Receiver<Arc<Svid>>,
    peers: PeerVerifier,
    metrics: InboundMetrics,
}

impl std::fmt::Debug for ExtAuthz {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExtAuthz")
            .field("config", &self.config)
            .field("gate", &self.gate)
            .finish_non_exhaustive()
    }
}

impl ExtAuthz {
    /// The service, judging with `gate`; `svid` is this sidecar's (its
    /// intermediates help verify peer certificates).
    pub fn new(
        config: ExtAuthzConfig,
        gate: Arc<Gate>,
        svid: watch::Receiver<Arc<Svid>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            config,
            gate,
            svid,
            peers: PeerVerifier::default(),
            metrics: InboundMetrics::named([
                "tally_sidecar_ext_authz_requests_total",
                "tally_sidecar_ext_authz_check_seconds",
                "tally_sidecar_ext_authz_admitted_total",
            ]),
        })
    }

    /// Its metrics (the inbound proxy's, named `tally_sidecar_ext_authz_*`).
    pub fn metrics(&self) -> &InboundMetrics {
        &self.metrics
    }

    /// The gate it judges with.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Answers one check. `sender_known` says whether the check came from
    /// a caller the sidecar authenticated (its Unix socket, whose file mode
    /// and `--allow-uid` choose who may call): only then does a verified
    /// peer certificate stand for possession of its key. A certificate is
    /// public (every TLS handshake shows it), so from an unauthenticated
    /// caller it is read like a bare principal: it narrows what passes,
    /// and the proof is still required.
    pub fn check(&self, request: &CheckRequest, sender_known: bool) -> CheckResponse {
        let started = Instant::now();
        let now_ms = self.gate.clock().now_ms();
        let described = check::describe(request);
        let judged = described
            .as_ref()
            .map_err(|e| Refusal::Forwarded(e.clone()))
            .and_then(|d| self.judge(d, sender_known, now_ms));
        self.metrics.count(
            started.elapsed(),
            judged.as_ref().map(|(_, transport)| *transport),
        );
        match judged {
            Ok((ours, _)) => {
                let tally_headers = described
                    .as_ref()
                    .map(|d| d.tally_headers.as_slice())
                    .unwrap_or_default();
                reply::admitted(ours, tally_headers, self.config.pass_credentials)
            }
            Err(refusal) => {
                let (method, path, authorization, wit) = match &described {
                    Ok(d) => (
                        d.method.as_str(),
                        d.path.as_str(),
                        d.authorization.as_slice(),
                        d.wit.as_slice(),
                    ),
                    Err(_) => ("", "", &[][..], &[][..]),
                };
                let authorization: Vec<&[u8]> = authorization.iter().map(Vec::as_slice).collect();
                let wit: Vec<&[u8]> = wit.iter().map(Vec::as_slice).collect();
                let answer =
                    self.gate
                        .refuse(method, path, &authorization, &wit, &refusal, now_ms / 1000);
                tracing::debug!(
                    reason = refusal.reason(),
                    status = answer.status,
                    method,
                    path,
                    "ext_authz check refused"
                );
                reply::refused(&answer)
            }
        }
    }

    /// The gate's verdict on `d`, with the app's identity headers and the
    /// transport.
    fn judge(
        &self,
        d: &Described,
        sender_known: bool,
        now_ms: u64,
    ) -> Result<(reply::IdentityHeaders, &'static str), Refusal> {
        let now = now_ms / 1000;
        let claim = {
            // The bundle is only read to verify a certificate: no copy of
            // it per check otherwise.
            let bundle = match d.certificate {
                Some(_) => self.gate.mesh().borrow().bundle_der.clone(),
                None => Vec::new(),
            };
            let svid = Arc::clone(&self.svid.borrow());
            self.peers.check(
                d.principal.as_deref(),
                d.certificate.as_deref(),
                &bundle,
                &svid,
                now,
            )?
        };
        let claim = match claim {
            PeerClaim::Verified(peer) if !sender_known => PeerClaim::Claimed(peer.spiffe_id),
            other => other,
        };
        let tokens = ConnectionTokens::default();
        let (hop, transport) = match (&claim, d.scheme) {
            (PeerClaim::Verified(peer), _) => (
                Hop::Mesh {
                    peer,
                    tokens: &tokens,
                },
                "mtls",
            ),
            (PeerClaim::Claimed(id), _) => (Hop::Claimed(id), "tls"),
            (PeerClaim::None, Scheme::Https) => (Hop::Plain, "tls"),
            (PeerClaim::None, Scheme::Http) => (Hop::Plain, "plaintext"),
        };
        let authorization: Vec<&[u8]> = d.authorization.iter().map(Vec::as_slice).collect();
        let dpop: Vec<&[u8]> = d.dpop.iter().map(Vec::as_slice).collect();
        let wit: Vec<&[u8]> = d.wit.iter().map(Vec::as_slice).collect();
        let wpt: Vec<&[u8]> = d.wpt.iter().map(Vec::as_slice).collect();
        let txn_token: Vec<&[u8]> = d.txn_token.iter().map(Vec::as_slice).collect();
        let hosts = [d.host.as_bytes()];
        let passed = self.gate.check(
            &Head {
                scheme: d.scheme,
                target_authority: None,
                hosts: &hosts,
                path: &d.path,
                method: &d.method,
                authorization: &authorization,
                dpop: &dpop,
                wit: &wit,
                wpt: &wpt,
                txn_token: &txn_token,
                headers: d,
                hop,
                // Envoy forwards the request, with its path as it is.
                forwarded_as_sent: true,
            },
            now_ms,
        )?;
        Ok((
            reply::identity_headers(&passed.allowed, transport),
            transport,
        ))
    }
}

/// The gRPC face of [`ExtAuthz`].
struct Service {
    ext_authz: Arc<ExtAuthz>,
    /// On a Unix socket: whether a peer may call (the local API's uid
    /// check).
    uids: Option<Admit>,
}

#[tonic::async_trait]
impl Authorization for Service {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        if let Some(api) = &self.uids {
            let peer = request
                .extensions()
                .get::<Arc<crate::http::Peer>>()
                .ok_or_else(|| tonic::Status::permission_denied("unknown peer"))?;
            api(peer).map_err(tonic::Status::permission_denied)?;
        }
        Ok(tonic::Response::new(
            self.ext_authz.check(request.get_ref(), self.uids.is_some()),
        ))
    }
}

/// Where the service is to listen (`--ext-authz-listen`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtAuthzAddr {
    /// A TCP address.
    Tcp(std::net::SocketAddr),
    /// A Unix socket path (`unix:PATH`).
    Unix(std::path::PathBuf),
}

impl std::str::FromStr for ExtAuthzAddr {
    type Err = String;

    /// `HOST:PORT` (an IP address and port) or `unix:PATH`.
    fn from_str(text: &str) -> Result<Self, String> {
        match text.strip_prefix("unix:") {
            Some("") => Err("ext_authz_listen \"unix:\" names no socket path".into()),
            Some(path) => Ok(Self::Unix(path.into())),
            None => text
                .parse()
                .map(Self::Tcp)
                .map_err(|e| format!("ext_authz_listen {text:?}: {e} (give IP:PORT or unix:PATH)")),
        }
    }
}

/// Where the service listens.
#[derive(Debug)]
pub enum ExtAuthzListener {
    /// TCP (bind it to loopback: see docs/ENVOY.md).
    Tcp(tokio::net::TcpListener),
    /// A Unix socket; callers' uids are checked against `--allow-uid`.
    Unix(tokio::net::UnixListener),
}

/// Whether a local peer may call: the local API's uid check
/// ([`super::api::LocalApi::admit`]), its refusal as text.
pub type Admit = Arc<dyn Fn(&crate::http::Peer) -> Result<(), String> + Send + Sync>;

/// Serves `ext_authz` on `listener` as `listen` says (HTTP/2 only) until
/// `shutdown` resolves. On a Unix socket, `admit` decides which peers may
/// call.
///
/// # Errors
/// As [`crate::http::serve`].
pub async fn serve(
    ext_authz: Arc<ExtAuthz>,
    admit: Admit,
    listener: ExtAuthzListener,
    listen: crate::http::Listen,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use tower_service::Service as _;
    let unix = matches!(listener, ExtAuthzListener::Unix(_));
    let service = Service {
        ext_authz,
        uids: unix.then_some(admit),
    };
    let routes = tonic::service::Routes::builder()
        .add_service(AuthorizationServer::new(service).max_decoding_message_size(MAX_CHECK_BYTES))
        .clone()
        .routes()
        .prepare();
    let handler = move |mut req: http::Request<hyper::body::Incoming>, peer| {
        let mut routes = routes.clone();
        req.extensions_mut().insert(peer);
        async move {
            match routes.call(req).await {
                Ok(response) => response,
                Err(never) => match never {},
            }
        }
    };
    let listen = listen.http2_only();
    match listener {
        ExtAuthzListener::Tcp(l) => crate::http::serve(l, listen, handler, shutdown).await,
        ExtAuthzListener::Unix(l) => crate::http::serve_unix(l, listen, handler, shutdown).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sidecar::config::{SidecarConfig, SidecarFlags};

    fn flags(listen: &str) -> SidecarFlags {
        SidecarFlags {
            broker: Some("https://broker:8443".into()),
            trust_bundle: Some("bundle.pem".into()),
            sa_token_file: Some("/var/run/token".into()),
            ext_authz_listen: Some(listen.into()),
            pass_credentials: true,
            deny_when_stale: true,
            inbound_authorities: vec!["pay.svc:8080".into()],
            ..SidecarFlags::default()
        }
    }

    #[test]
    fn the_listener_is_an_ip_and_port_or_a_unix_socket_path() {
        assert_eq!(
            "127.0.0.1:15030".parse(),
            Ok(ExtAuthzAddr::Tcp("127.0.0.1:15030".parse().unwrap()))
        );
        assert_eq!(
            "unix:/run/tally/ext_authz.sock".parse(),
            Ok(ExtAuthzAddr::Unix("/run/tally/ext_authz.sock".into()))
        );
        assert!("unix:".parse::<ExtAuthzAddr>().is_err());
        let errors = SidecarConfig::resolve(&flags("localhost:15030"), None).unwrap_err();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("ext_authz_listen \"localhost:15030\""));
    }

    #[test]
    fn settings_carry_the_inbound_checks_to_ext_authz() {
        let settings = SidecarConfig::resolve(&flags("unix:/tmp/a.sock"), None)
            .unwrap()
            .settings("PEM".into(), crate::sidecar::api::ServiceMap::default());
        let c = settings.ext_authz.unwrap();
        assert!(c.pass_credentials && c.gate.deny_when_stale);
        assert_eq!(
            (c.proof_max_age, c.clock_skew, c.gate.stale_after),
            (30, 5, 30)
        );
        assert_eq!(c.gate.authorities.len(), 1);
        assert!(settings.inbound.is_none(), "no inbound proxy unless asked");
    }
}
