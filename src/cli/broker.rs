//! `tally broker`: configuration, then the broker
//! ([`crate::broker::start`]) until SIGTERM or SIGINT.

use super::CliError;
use crate::broker::config::{BrokerConfig, BrokerFlags};
use crate::broker::run::{Listeners, StartError};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

pub(super) fn run(flags: BrokerFlags) -> Result<ExitCode, CliError> {
    let file = match &flags.config {
        Some(path) => Some((path.display().to_string(), read_text(path)?)),
        None => None,
    };
    let config =
        BrokerConfig::resolve(&flags, file.as_ref().map(|(n, t)| (n.as_str(), t.as_str())))
            .map_err(|errors| {
                CliError::Usage(format!("bad configuration:\n  {}", errors.join("\n  ")))
            })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?;
    runtime.block_on(serve(config))
}

fn read_text(path: &Path) -> Result<String, CliError> {
    crate::config::read_text(path).map_err(|e| CliError::Usage(e.to_string()))
}

async fn bind(
    addr: std::net::SocketAddr,
    flag: &'static str,
) -> Result<tokio::net::TcpListener, CliError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| bind_error(flag, &addr, &e))
}

/// A listener that could not be bound, named by the flag that sets its
/// address (`--grpc-listen 127.0.0.1:8443: address already in use`). A
/// port in use or an address not on this host is configuration (64); the
/// rest (out of descriptors, …) is a failure.
pub(super) fn bind_error(flag: &str, addr: &dyn std::fmt::Display, e: &std::io::Error) -> CliError {
    use std::io::ErrorKind as K;
    let why = match e.kind() {
        K::AddrInUse => {
            "address already in use (another process listens there; pick another)".to_owned()
        }
        K::AddrNotAvailable => "address not available on this host".to_owned(),
        K::PermissionDenied => "permission denied (ports below 1024 need privileges)".to_owned(),
        _ => e.to_string(),
    };
    let text = format!("{flag} {addr}: {why}");
    match e.kind() {
        K::AddrInUse | K::AddrNotAvailable | K::PermissionDenied => CliError::Usage(text),
        _ => CliError::Failed(text),
    }
}

async fn serve(config: BrokerConfig) -> Result<ExitCode, CliError> {
    let cli = |e: StartError| match e {
        StartError::Config(why) => CliError::Usage(why),
        other => CliError::Failed(other.to_string()),
    };
    // Bind first: a port in use fails fast, and port 0 gets its real
    // number before the issuer URL and certificates are made.
    let grpc = bind(config.grpc_listen, "--grpc-listen").await?;
    let https = bind(config.http_listen, "--http-listen").await?;
    let admin = bind(config.admin_listen, "--admin-listen").await?;
    let https_addr = https
        .local_addr()
        .map_err(|e| CliError::Failed(format!("reading the bound address: {e}")))?;
    let parts = config.parts(https_addr).await.map_err(cli)?;
    let (stop, mut stopped) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        // An error means the sender is gone, which also means stop.
        let _ = stopped.wait_for(|s| *s).await;
    };
    let listeners = Listeners {
        grpc,
        https: Some(https),
        admin: Some(admin),
    };
    let running = crate::broker::start(parts, listeners, shutdown)
        .await
        .map_err(cli)?;
    // Before the lines that say it is ready: a SIGTERM after them stops it
    // cleanly.
    let signal = super::shutdown_signal();
    // Scripts and tests wait for these lines instead of sleeping.
    say!(
        "tally broker: trust domain {}, gRPC (mTLS) listening on {}",
        config.trust_domain,
        running.grpc
    );
    say!(
        "tally broker: HTTPS (OAuth token endpoint, JWKS) listening on {https_addr}, issuer {}",
        running.broker.issuer()
    );
    if let Some(admin) = running.admin {
        say!("tally broker: admin (/metrics, /healthz, /readyz) listening on {admin}");
    }
    say!(
        "tally broker: data in {}; admin credential in {}; audit log {}",
        config.data_dir.display(),
        config.data_dir.join("admin").display(),
        config.audit_file.display()
    );
    // In-flight calls get DRAIN to finish; a client that never lets go of
    // its connection does not keep the broker from exiting.
    let signal_then_drain = async {
        signal.await;
        stop.send_replace(true);
        tokio::time::sleep(DRAIN).await;
    };
    tokio::select! {
        result = running.wait() => result.map_err(cli)?,
        () = signal_then_drain => tracing::warn!("connections still open {} s after the shutdown signal; exiting anyway", DRAIN.as_secs()),
    }
    say!("tally broker: stopped");
    Ok(ExitCode::SUCCESS)
}

/// How long shutdown waits for connections to finish.
const DRAIN: Duration = Duration::from_secs(10);
