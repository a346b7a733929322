//! `tally ctl join-token create` and `tally ctl svid mint`.

use super::connect::{BrokerConnection, admin_client, block_on, refused};
use super::output::{Output, duration, print, when, with_times};
use crate::cli::CliError;
use crate::proto::v1 as pb;
use clap::Subcommand;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `tally ctl join-token`.
#[derive(Debug, Subcommand)]
pub enum JoinTokenCommand {
    /// Make a join token; prints only the token.
    Create {
        /// The SPIFFE ID the token attests.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime (up to 24h).
        #[arg(long, default_value = "10m")]
        ttl: String,
        /// `table` (default: text for people) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
}

/// `tally ctl svid`.
#[derive(Debug, Subcommand)]
pub enum SvidCommand {
    /// Issue a certificate (cert.pem, key.pem, bundle.pem in --out). The key
    /// is made here; only a CSR goes to the broker.
    Mint {
        /// The SPIFFE ID it names.
        #[arg(long)]
        spiffe_id: String,
        /// Lifetime (up to 24h).
        #[arg(long, default_value = "1h")]
        ttl: String,
        /// Directory to write into (created 0700; existing files are never
        /// overwritten).
        #[arg(long)]
        out: PathBuf,
        /// `table` (default: text for people) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
}

/// `tally ctl join-token …`.
pub(super) fn join_token(
    conn: &BrokerConnection,
    command: JoinTokenCommand,
) -> Result<ExitCode, CliError> {
    let JoinTokenCommand::Create {
        spiffe_id,
        ttl,
        output,
    } = command;
    let ttl = duration("--ttl", &ttl)?;
    block_on(async {
        let mut admin = admin_client(conn).await?;
        let made = admin
            .create_join_token(pb::CreateJoinTokenRequest {
                spiffe_id,
                ttl_seconds: ttl,
            })
            .await
            .map_err(refused)?
            .into_inner();
        // Only the token on stdout, so `$(tally ctl join-token create …)` works.
        print(
            output,
            &with_times(
                serde_json::json!({"join_token": made.join_token}),
                &[("expires_at", made.expires_at)],
            ),
            || say!("{}", made.join_token),
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `tally ctl svid …`.
pub(super) fn svid(conn: &BrokerConnection, command: SvidCommand) -> Result<ExitCode, CliError> {
    let SvidCommand::Mint {
        spiffe_id,
        ttl,
        out,
        output,
    } = command;
    let ttl = duration("--ttl", &ttl)?;
    mint(conn, spiffe_id, ttl, &out, output)
}

/// `tally ctl svid mint`: key made here, CSR to the broker, three files out.
fn mint(
    conn: &BrokerConnection,
    spiffe_id: String,
    ttl: u32,
    out: &Path,
    output: Output,
) -> Result<ExitCode, CliError> {
    let files = ["cert.pem", "key.pem", "bundle.pem"].map(|f| out.join(f));
    if let Some(existing) = files.iter().find(|f| f.exists()) {
        return Err(CliError::Usage(format!(
            "{} already exists; choose an empty --out directory",
            existing.display()
        )));
    }
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| CliError::Failed(format!("generating a key: {e}")))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| CliError::Failed(format!("making the CSR: {e}")))?
        .der()
        .to_vec();
    let svid = block_on(async {
        let mut admin = admin_client(conn).await?;
        admin
            .mint_svid(pb::MintSvidRequest {
                spiffe_id,
                ttl_seconds: ttl,
                csr_der: csr,
            })
            .await
            .map_err(refused)
            .map(tonic::Response::into_inner)
    })?;
    std::fs::create_dir_all(out)
        .and_then(|()| {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(out, std::fs::Permissions::from_mode(0o700))
        })
        .map_err(|e| CliError::Failed(format!("creating {}: {e}", out.display())))?;
    let chain: String = std::iter::once(&svid.svid_der)
        .chain(&svid.chain_der)
        .map(|d| crate::ca::pem("CERTIFICATE", d))
        .collect();
    let bundle: String = svid
        .bundle_der
        .iter()
        .map(|d| crate::ca::pem("CERTIFICATE", d))
        .collect();
    let key_pem = zeroize::Zeroizing::new(key.serialize_pem());
    for (path, text, mode) in [
        (&files[1], key_pem.as_str(), 0o600),
        (&files[0], chain.as_str(), 0o644),
        (&files[2], bundle.as_str(), 0o644),
    ] {
        crate::cli::write_new_file(path, text.as_bytes(), mode)?;
    }
    print(
        output,
        &with_times(
            serde_json::json!({"dir": out.display().to_string(), "spiffe_id": svid.spiffe_id}),
            &[("expires_at", svid.expires_at)],
        ),
        || {
            say!(
                "{}: cert.pem, key.pem (0600), bundle.pem for {} (expires {})",
                out.display(),
                svid.spiffe_id,
                when(svid.expires_at)
            );
        },
    );
    Ok(ExitCode::SUCCESS)
}
