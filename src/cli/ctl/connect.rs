//! The admin connection to a broker: mTLS gRPC with the admin credential.

use crate::cli::CliError;
use crate::proto::v1 as pb;
use clap::Args;
use std::path::{Path, PathBuf};

/// How `tally ctl` reaches the broker: its gRPC URL and an admin
/// credential (by default the one in the broker's data directory).
#[derive(Debug, Args)]
pub struct BrokerConnection {
    /// The broker's gRPC URL.
    #[arg(
        long,
        env = "TALLY_BROKER",
        default_value = "https://localhost:8443",
        global = true,
        help_heading = "Connection to the broker"
    )]
    broker: String,
    /// The broker's data directory: admin/cert.pem, admin/key.pem and
    /// bundle.pem in it are used unless given below.
    #[arg(
        long,
        env = "TALLY_DATA_DIR",
        default_value = "tally-data",
        global = true,
        help_heading = "Connection to the broker"
    )]
    data_dir: PathBuf,
    /// Admin certificate chain (PEM) [default: DATA_DIR/admin/cert.pem].
    #[arg(long, global = true, help_heading = "Connection to the broker")]
    cert: Option<PathBuf>,
    /// Admin private key (PEM) [default: DATA_DIR/admin/key.pem].
    #[arg(long, global = true, help_heading = "Connection to the broker")]
    key: Option<PathBuf>,
    /// Trust bundle (PEM) [default: DATA_DIR/bundle.pem].
    #[arg(long, global = true, help_heading = "Connection to the broker")]
    bundle: Option<PathBuf>,
}

pub(super) fn block_on<T, F: std::future::Future<Output = Result<T, CliError>>>(
    f: F,
) -> Result<T, CliError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?
        .block_on(f)
}

/// A refusal from the broker, as the broker worded it; a broker that went
/// away mid-call is unreachable, not a "no".
pub(super) fn refused(status: tonic::Status) -> CliError {
    let text = crate::rpc::refusal_text(&status);
    match status.code() {
        tonic::Code::Unavailable => CliError::Unavailable(format!("the broker is {text}")),
        _ => CliError::Failed(format!("the broker refused: {text}")),
    }
}

fn read_pem(path: &Path, what: &str) -> Result<String, CliError> {
    std::fs::read_to_string(path).map_err(|e| {
        CliError::Usage(format!(
            "{what} {}: {e} (use --data-dir, or --cert/--key/--bundle)",
            path.display()
        ))
    })
}

/// An Admin client over mTLS with the admin credential.
pub(super) async fn admin_client(
    conn: &BrokerConnection,
) -> Result<pb::admin_client::AdminClient<tonic::transport::Channel>, CliError> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
    let dir = &conn.data_dir;
    let cert = read_pem(
        conn.cert.as_deref().unwrap_or(&dir.join("admin/cert.pem")),
        "admin certificate",
    )?;
    let key = zeroize::Zeroizing::new(read_pem(
        conn.key.as_deref().unwrap_or(&dir.join("admin/key.pem")),
        "admin key",
    )?);
    let bundle_path = conn
        .bundle
        .clone()
        .unwrap_or_else(|| dir.join("bundle.pem"));
    let bundle = read_pem(&bundle_path, "trust bundle")?;
    if !conn.broker.starts_with("https://") {
        return Err(CliError::Usage(format!(
            "--broker {}: the broker speaks only https (mTLS gRPC); use https://HOST:PORT",
            conn.broker
        )));
    }
    let endpoint = Channel::from_shared(conn.broker.clone())
        .map_err(|e| CliError::Usage(format!("--broker {}: {e}", conn.broker)))?;
    let host = endpoint.uri().host().unwrap_or("localhost").to_owned();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle))
        .identity(Identity::from_pem(cert, key.as_bytes()))
        .domain_name(host);
    let channel = endpoint
        .tls_config(tls)
        .map_err(|e| CliError::Usage(format!("TLS settings: {e}")))?
        .connect()
        .await
        .map_err(|e| connect_failed(&conn.broker, &bundle_path, &e))?;
    Ok(pb::admin_client::AdminClient::new(channel))
}

/// A failed connect in words, with the exit code it deserves: a bundle
/// that is not this broker's is configuration (64), anything else is the
/// broker being unreachable (69).
fn connect_failed(
    broker: &str,
    bundle: &Path,
    error: &(dyn std::error::Error + 'static),
) -> CliError {
    use crate::rpc::ConnectFailure;
    match ConnectFailure::of(error) {
        why @ ConnectFailure::WrongBundle { .. } => CliError::Usage(format!(
            "trust bundle {} is not the bundle of the broker at {broker}: {why} (give this broker's with --bundle or --data-dir)",
            bundle.display()
        )),
        why @ ConnectFailure::WrongName { .. } => CliError::Usage(format!(
            "--broker {broker}: {why}; use a name its certificate holds"
        )),
        ConnectFailure::Unreachable(why) => CliError::Unavailable(format!(
            "cannot reach the broker at {broker}: {why} (is `tally broker` running? --broker)"
        )),
    }
}
