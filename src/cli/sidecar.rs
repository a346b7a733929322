//! `tally sidecar`: attest, keep the SVID renewed, follow the Watch
//! stream, and serve the local API on a Unix socket, the inbound verifying
//! proxy and the outbound proxy when asked for, and the admin port, until
//! SIGTERM. Settings come from flags, `TALLY_*` variables and a YAML
//! `--config` file, in that order, resolved by
//! [`crate::sidecar::config`]; this shell reads the files, binds the
//! listeners and waits for the signal.

use super::CliError;
use crate::clock::{Clock, SystemClock};
use crate::rpc::ConnectFailure;
use crate::sidecar::api::{self, ServiceMap};
use crate::sidecar::config::{SidecarConfig, TrustBundle, service_map};
use crate::sidecar::ext_authz::{ExtAuthzAddr, ExtAuthzListener};
use crate::sidecar::identity::IdentityError;
use crate::sidecar::run::{Listeners, Sidecar};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub use crate::sidecar::config::SidecarFlags;
pub(super) use crate::sidecar::config::default_socket;

/// What `tally sidecar --help` and `tally-sidecar --help` say first.
pub const ABOUT: &str = "Run a sidecar: attest, keep the SVID renewed, follow the broker, \
serve tokens and request headers on a local Unix socket, verify inbound requests and sign \
outbound ones.";

/// The command line of `tally-sidecar`: the arguments of `tally sidecar`,
/// from the same definition.
#[derive(Debug, clap::Parser)]
#[command(name = "tally-sidecar", about = ABOUT, long_about = None)]
pub struct SidecarCli {
    /// The flags `tally sidecar` takes.
    #[command(flatten)]
    pub flags: SidecarFlags,
}

/// The whole of `tally-sidecar`: parse, start logging, [`run`], and map
/// the outcome to an exit code as `tally` does. A binary of its own so a
/// pod maps only the sidecar's code (no broker, store or SQLite).
pub fn main() -> ExitCode {
    use clap::Parser as _;
    let cli = match SidecarCli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help is not an error.
            let code = if err.use_stderr() {
                super::EXIT_USAGE
            } else {
                0
            };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    if let Err(err) = crate::logging::init("info") {
        eprintln!("tally-sidecar: error: {err}");
        return ExitCode::from(super::EXIT_USAGE);
    }
    match run(cli.flags) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tally-sidecar: error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}

/// Runs a sidecar until SIGTERM or SIGINT.
///
/// # Errors
/// [`CliError::Usage`] for bad settings or files, an address in use or a
/// broker that is not the trust bundle's; [`CliError::Failed`] for
/// attestation or serving that failed.
pub fn run(flags: SidecarFlags) -> Result<ExitCode, CliError> {
    let file_text = match &flags.config {
        Some(path) => Some((path.display().to_string(), read(path)?)),
        None => None,
    };
    let config = SidecarConfig::resolve(
        &flags,
        file_text.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
    )
    .map_err(usage)?;
    let bundle = match &config.trust_bundle {
        TrustBundle::File(path) => crate::config::read_text(path)
            .map_err(|e| CliError::Usage(format!("trust_bundle {e}")))?,
        TrustBundle::Pem(pem) => pem.clone(),
    };
    let services = match &config.service_map {
        Some(path) => service_map(&path.display().to_string(), &read(path)?).map_err(usage)?,
        None => ServiceMap::default(),
    };
    let socket = socket_path(config.socket.clone())?;
    runtime()?.block_on(serve(config, bundle, services, socket))
}

/// The sidecar's runtime: one worker thread per core it may use. Given a
/// single core (a pinned or one-CPU pod), a current-thread runtime does
/// the same work without cross-thread wake-ups or a second thread's
/// stack (`TOKIO_WORKER_THREADS` set keeps the multi-thread runtime, with
/// that many workers).
fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    let one_core = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let mut builder = if one_core && std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))
}

/// A settings file's text (at most 1 MiB); a file that cannot be read is
/// bad usage.
fn read(path: &Path) -> Result<String, CliError> {
    crate::config::read_text(path).map_err(|e| CliError::Usage(e.to_string()))
}

/// Every configuration problem, one per line.
fn usage(errors: Vec<String>) -> CliError {
    CliError::Usage(errors.join("\n  "))
}

/// The socket path: as given, else [`default_socket`] (saying so when it
/// is not the system location), its directory created.
fn socket_path(given: Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(path) = given {
        return Ok(path);
    }
    let path = default_socket();
    let dir = path.parent().unwrap_or(Path::new("."));
    if !path.starts_with("/run/tally") {
        eprintln!(
            "tally sidecar: not root, so the socket goes to {} (set --socket to choose)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Failed(format!("creating {}: {e}", dir.display())))?;
    Ok(path)
}

/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

async fn serve(
    config: SidecarConfig,
    bundle: String,
    services: ServiceMap,
    socket: PathBuf,
) -> Result<ExitCode, CliError> {
    let bind = |addr: SocketAddr, flag: &'static str| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| super::broker::bind_error(flag, &addr, &e))
    };
    let mut listeners = Listeners {
        socket: Some(
            api::bind_with_mode(&socket, config.socket_mode)
                .map_err(|e| super::broker::bind_error("--socket", &socket.display(), &e))?,
        ),
        ..Listeners::default()
    };
    if let Some(path) = &config.spiffe_socket {
        listeners.spiffe = Some(
            api::bind_with_mode(path, config.socket_mode)
                .map_err(|e| super::broker::bind_error("--spiffe-socket", &path.display(), &e))?,
        );
    }
    if let Some((addr, _)) = &config.inbound {
        listeners.inbound = Some(bind(*addr, "--inbound-listen").await?);
    }
    if let Some(addr) = config.outbound_listen {
        listeners.outbound = Some(bind(addr, "--outbound-listen").await?);
    }
    if let Some(addr) = config.admin_listen {
        listeners.admin = Some(bind(addr, "--admin-listen").await?);
    }
    let ext_authz_at = match &config.ext_authz_listen {
        Some(ExtAuthzAddr::Tcp(addr)) => {
            let listener = bind(*addr, "--ext-authz-listen").await?;
            let at = listener.local_addr().map(|a| a.to_string()).ok();
            listeners.ext_authz = Some(ExtAuthzListener::Tcp(listener));
            at
        }
        Some(ExtAuthzAddr::Unix(path)) => {
            let listener = api::bind_with_mode(path, config.socket_mode).map_err(|e| {
                super::broker::bind_error("--ext-authz-listen", &path.display(), &e)
            })?;
            listeners.ext_authz = Some(ExtAuthzListener::Unix(listener));
            Some(format!("unix:{}", path.display()))
        }
        None => None,
    };
    let ext_authz_socket = match &config.ext_authz_listen {
        Some(ExtAuthzAddr::Unix(path)) => Some(path.clone()),
        _ => None,
    };
    let local = |l: &Option<tokio::net::TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let (inbound_at, outbound_at, admin_at) = (
        local(&listeners.inbound),
        local(&listeners.outbound),
        local(&listeners.admin),
    );
    let (bundle_path, broker) = (config.trust_bundle.clone(), config.broker.clone());
    let settings = config.settings(bundle, services);
    let upstream = settings.inbound.as_ref().map(|c| c.upstream.clone());
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // First contact retries while the broker is unreachable; SIGTERM
    // meanwhile ends it cleanly.
    let sidecar = tokio::select! {
        started = Sidecar::start(settings, listeners, clock) => {
            started.map_err(|e| match e {
                // Retrying would never help: say which file to change.
                IdentityError::Untrusted(why @ ConnectFailure::WrongBundle { .. }) => {
                    let given = match &bundle_path {
                        TrustBundle::File(path) => format!("--trust-bundle {}", path.display()),
                        TrustBundle::Pem(_) => "--trust-bundle-pem".to_owned(),
                    };
                    CliError::Usage(format!(
                        "{given} is not the bundle of the broker at {broker}: {why}"
                    ))
                }
                IdentityError::Untrusted(why) => {
                    CliError::Usage(format!("--broker {broker}: {why}"))
                }
                other => CliError::Failed(format!("attestation failed: {other}")),
            })?
        }
        () = super::shutdown_signal() => {
            let _ = std::fs::remove_file(&socket);
            if let Some(path) = &ext_authz_socket {
                let _ = std::fs::remove_file(path);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    // Watched from before the lines that say it is ready, so a SIGTERM
    // after them is never lost.
    let (signal, drain_signal) = (super::shutdown_signal(), super::shutdown_signal());
    // The lines below tell scripts it is ready: keys, bundle and access
    // rules in hand (or a warning after a while, and it keeps trying).
    if !sidecar.ready(Duration::from_secs(15)).await {
        tracing::warn!("no keys or access rules from the broker yet; serving anyway (see /readyz)");
    }
    say!(
        "tally sidecar: {}; local API on {}",
        sidecar.spiffe_id(),
        socket.display()
    );
    if let (Some(at), Some(up)) = (inbound_at, &upstream) {
        say!("tally sidecar: inbound proxy listening on {at}, forwarding to {up}");
    }
    if let Some(at) = outbound_at {
        say!("tally sidecar: outbound proxy listening on {at}");
    }
    if let Some(at) = admin_at {
        say!("tally sidecar: admin listening on {at}");
    }
    if let Some(at) = ext_authz_at {
        say!("tally sidecar: ext_authz listening on {at}");
    }
    // In-flight requests get DRAIN to finish after the signal; a client
    // that never lets go does not keep the sidecar from exiting.
    let signal_then_drain = async {
        drain_signal.await;
        tokio::time::sleep(DRAIN).await;
    };
    let result = tokio::select! {
        result = sidecar.run_until(signal) => result,
        () = signal_then_drain => {
            tracing::warn!("requests still open {} s after the shutdown signal; exiting anyway", DRAIN.as_secs());
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&socket);
    if let Some(path) = ext_authz_socket {
        let _ = std::fs::remove_file(path);
    }
    result.map_err(|e| CliError::Failed(e.to_string()))?;
    say!("tally sidecar: stopped");
    Ok(ExitCode::SUCCESS)
}
