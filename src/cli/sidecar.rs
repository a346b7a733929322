//! `tally sidecar`: attest, keep the SVID renewed, follow the Watch
//! stream, and serve the local API on a Unix socket until SIGTERM. The
//! inbound and outbound proxies and the admin port are not in this build
//! yet; asking for them is an error that says so.

use super::CliError;
use crate::clock::{Clock, SystemClock};
use crate::dpop::ProofKey;
use crate::sidecar::api::{self, LocalApi, ServiceMap};
use crate::sidecar::cache::{CacheConfig, TokenCache};
use crate::sidecar::identity::{Attestation, IdentityClient, IdentityError, backoff, keep_renewed};
use crate::sidecar::issuer::BrokerIssuer;
use crate::sidecar::watch::{MeshState, follow};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

/// Arguments of `tally sidecar` (`Debug` leaves the join token out).
#[derive(Debug, clap::Args)]
pub struct SidecarFlags {
    /// The broker's gRPC URL, e.g. https://broker:8443.
    #[arg(long, env = "TALLY_BROKER")]
    broker: String,
    /// Trust bundle (PEM) to verify the broker with on first contact.
    #[arg(long, env = "TALLY_TRUST_BUNDLE")]
    trust_bundle: PathBuf,
    /// One-time join token (or set TALLY_JOIN_TOKEN, which keeps it out of `ps`).
    #[arg(
        long,
        env = "TALLY_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "sa_token_file"
    )]
    join_token: Option<super::SecretArg>,
    /// Projected Kubernetes ServiceAccount token file.
    #[arg(long, env = "TALLY_SA_TOKEN_FILE")]
    sa_token_file: Option<PathBuf>,
    /// Unix socket for the local API [default: /run/tally/agent.sock as
    /// root, else $XDG_RUNTIME_DIR/tally/agent.sock or the temp dir].
    #[arg(long, env = "TALLY_SOCKET")]
    socket: Option<PathBuf>,
    /// Only these peer uids may use the socket (repeatable).
    #[arg(long = "allow-uid", value_delimiter = ',')]
    allow_uids: Vec<u32>,
    /// YAML mapping of host (or host:port) to audience, for /v1/authorize.
    #[arg(long, env = "TALLY_SERVICE_MAP")]
    service_map: Option<PathBuf>,
    /// Inbound verifying proxy address (not in this build yet).
    #[arg(long)]
    inbound_listen: Option<String>,
    /// The application behind the inbound proxy (not in this build yet).
    #[arg(long)]
    upstream: Option<String>,
    /// Outbound proxy address (not in this build yet).
    #[arg(long)]
    outbound_listen: Option<String>,
    /// Admin port address (not in this build yet).
    #[arg(long)]
    admin_listen: Option<String>,
}

pub(super) fn run(flags: SidecarFlags) -> Result<ExitCode, CliError> {
    for (given, what) in [
        (
            flags.inbound_listen.is_some() || flags.upstream.is_some(),
            "the inbound proxy (--inbound-listen, --upstream)",
        ),
        (
            flags.outbound_listen.is_some(),
            "the outbound proxy (--outbound-listen)",
        ),
        (
            flags.admin_listen.is_some(),
            "the admin port (--admin-listen)",
        ),
    ] {
        if given {
            return Err(CliError::Unavailable(format!(
                "{what} is not implemented in this build yet"
            )));
        }
    }
    let how = match (&flags.join_token, &flags.sa_token_file) {
        (Some(t), None) => Attestation::JoinToken(zeroize::Zeroizing::new(t.expose().to_owned())),
        (None, Some(f)) => Attestation::ServiceAccountTokenFile(f.clone()),
        _ => {
            return Err(CliError::Usage(
                "give --join-token (or TALLY_JOIN_TOKEN) or --sa-token-file".into(),
            ));
        }
    };
    let bundle = std::fs::read_to_string(&flags.trust_bundle).map_err(|e| {
        CliError::Usage(format!(
            "--trust-bundle {}: {e}",
            flags.trust_bundle.display()
        ))
    })?;
    let services = match &flags.service_map {
        Some(path) => service_map(path)?,
        None => ServiceMap::default(),
    };
    let socket = socket_path(flags.socket.clone())?;
    let allowed = (!flags.allow_uids.is_empty()).then(|| flags.allow_uids.clone());
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?
        .block_on(serve(flags.broker, bundle, how, services, socket, allowed))
}

/// Reads the service map: a YAML mapping of host (or host:port) to
/// audience.
fn service_map(path: &Path) -> Result<ServiceMap, CliError> {
    use crate::policy::yaml::{self, Value};
    let name = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("{name}: {e}")))?;
    let doc = yaml::parse(&text)
        .map_err(|e| CliError::Usage(format!("{name}:{}: {}", e.pos, e.message)))?;
    let Value::Map(entries) = doc.value else {
        return Err(CliError::Usage(format!(
            "{name}: expected a mapping of host to audience"
        )));
    };
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (host, pos, node) in entries {
        match &node.value {
            Value::Str(a) => match a.parse() {
                Ok(audience) => out.push((host, audience)),
                Err(e) => errors.push(format!("{name}:{}: audience for {host}: {e}", node.pos)),
            },
            _ => errors.push(format!(
                "{name}:{pos}: the audience for {host} must be text"
            )),
        }
    }
    if errors.is_empty() {
        Ok(ServiceMap::new(out))
    } else {
        Err(CliError::Usage(errors.join("\n  ")))
    }
}

/// The socket path: as given, else /run/tally as root, else the user's
/// runtime dir or the temp dir (and says so).
fn socket_path(given: Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(path) = given {
        return Ok(path);
    }
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let dir = if root {
        PathBuf::from("/run/tally")
    } else {
        let base =
            std::env::var_os("XDG_RUNTIME_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
        let dir = base.join("tally");
        eprintln!(
            "tally sidecar: not root, so the socket goes to {} (set --socket to choose)",
            dir.display()
        );
        dir
    };
    std::fs::create_dir_all(&dir)
        .map_err(|e| CliError::Failed(format!("creating {}: {e}", dir.display())))?;
    Ok(dir.join("agent.sock"))
}

async fn serve(
    broker: String,
    bundle: String,
    how: Attestation,
    services: ServiceMap,
    socket: PathBuf,
    allowed: Option<Vec<u32>>,
) -> Result<ExitCode, CliError> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let identity = IdentityClient::new(broker, bundle);
    // First contact: retry while the broker is unreachable (it may be
    // starting too); a refusal is final.
    let mut attempt = 0;
    let svid = loop {
        match identity.attest(&how, clock.now()).await {
            Ok(svid) => break svid,
            Err(IdentityError::Unreachable(why)) => {
                let wait = backoff(attempt, crate::sidecar::random_unit());
                attempt += 1;
                tracing::warn!(%why, retry_in = ?wait, "broker unreachable; retrying attestation");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = super::broker::shutdown_signal() => return Ok(ExitCode::SUCCESS),
                }
            }
            Err(e) => return Err(CliError::Failed(format!("attestation failed: {e}"))),
        }
    };
    let key = Arc::new(ProofKey::generate().map_err(|e| CliError::Failed(e.to_string()))?);
    let channel = identity
        .channel(&svid)
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let issuer = Arc::new(BrokerIssuer::new(
        channel,
        Arc::clone(&key),
        svid.issue_htu(),
        Arc::clone(&clock),
    ));
    let cache = TokenCache::new(Arc::clone(&issuer), CacheConfig::default());
    let spiffe_id = svid.spiffe_id.clone();
    let (svids, svid_rx) = tokio::sync::watch::channel(Arc::new(svid));
    tokio::spawn(keep_renewed(identity.clone(), Arc::clone(&clock), svids));
    // A renewed SVID means a new mTLS identity for every broker call.
    let mut renewed = svid_rx.clone();
    let (issuer_for_renewals, identity_for_renewals) = (Arc::clone(&issuer), identity.clone());
    tokio::spawn(async move {
        while renewed.changed().await.is_ok() {
            let svid = Arc::clone(&renewed.borrow_and_update());
            match identity_for_renewals.channel(&svid) {
                Ok(channel) => issuer_for_renewals.set_channel(channel),
                Err(e) => tracing::error!(error = %e, "cannot use the renewed SVID"),
            }
        }
    });
    let (mesh, _mesh_rx) = tokio::sync::watch::channel(MeshState::default());
    // Reconnects use the current channel, so a renewed SVID is picked up.
    let current = Arc::clone(&issuer);
    tokio::spawn(follow(move || current.channel(), Arc::clone(&clock), mesh));

    let listener = api::bind(&socket)
        .map_err(|e| CliError::Failed(format!("binding {}: {e}", socket.display())))?;
    let local = LocalApi::new(cache, key, svid_rx, services, allowed, clock);
    say!(
        "tally sidecar: {spiffe_id}; local API on {}",
        socket.display()
    );
    api::serve(local, listener, super::broker::shutdown_signal())
        .await
        .map_err(|e| CliError::Failed(format!("local API: {e}")))?;
    let _ = std::fs::remove_file(&socket);
    say!("tally sidecar: stopped");
    Ok(ExitCode::SUCCESS)
}
