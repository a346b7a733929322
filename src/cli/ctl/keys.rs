//! `tally ctl keys list|rotate` and `tally ctl ca rotate`.

use super::connect::{BrokerConnection, admin_client, block_on, refused};
use super::output::{Output, duration, print, table, when, with_times};
use crate::cli::CliError;
use crate::proto::v1 as pb;
use clap::Subcommand;
use std::process::ExitCode;

/// `tally ctl keys`.
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// List the signing keys: which signs now, which is next, which are
    /// retired, and whether the JWKS still publishes each.
    List {
        /// `table` (default) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// Start a new signing key now (incident response); prints its kid.
    Rotate {
        /// Publish the new key this long before it signs (e.g. 5m).
        #[arg(long, default_value = "0s", conflicts_with = "revoke_old")]
        publish_lead: String,
        /// The old key leaked: withdraw it from the JWKS now and revoke
        /// every token it signed, whatever time they claim.
        #[arg(long)]
        revoke_old: bool,
        /// Why, for the audit log (with --revoke-old).
        #[arg(long, default_value = "", requires = "revoke_old")]
        reason: String,
        /// `table` (default: text for people) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
}

/// `tally ctl ca`.
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Replace the intermediate CA now. The root (the trust bundle) stays,
    /// so SVIDs issued under the old intermediate keep verifying until
    /// they expire; new SVIDs chain to the new one.
    Rotate {
        /// `table` (default: text for people) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
}

/// `tally ctl keys …`.
pub(super) fn keys(conn: &BrokerConnection, command: KeysCommand) -> Result<ExitCode, CliError> {
    match command {
        KeysCommand::List { output } => list_keys(conn, output),
        KeysCommand::Rotate {
            publish_lead,
            revoke_old,
            reason,
            output,
        } => {
            let lead = duration("--publish-lead", &publish_lead)?;
            block_on(async {
                let mut admin = admin_client(conn).await?;
                let rotated = admin
                    .rotate_signing_key(pb::RotateSigningKeyRequest {
                        publish_lead_seconds: lead,
                        revoke_old,
                        reason,
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                print(
                    output,
                    &with_times(
                        serde_json::json!({"kid": rotated.kid, "withdrawn": rotated.withdrawn}),
                        &[("signs_from", rotated.signs_from)],
                    ),
                    || {
                        say!("{} (signs from {})", rotated.kid, when(rotated.signs_from));
                        for old in &rotated.withdrawn {
                            say!(
                                "withdrawn: {old} (out of the JWKS; every token it signed is revoked)"
                            );
                        }
                    },
                );
                Ok(ExitCode::SUCCESS)
            })
        }
    }
}

/// `tally ctl ca …`.
pub(super) fn ca(conn: &BrokerConnection, command: CaCommand) -> Result<ExitCode, CliError> {
    let CaCommand::Rotate { output } = command;
    block_on(async {
        let rotated = admin_client(conn)
            .await?
            .rotate_intermediate(pb::RotateIntermediateRequest {})
            .await
            .map_err(refused)?
            .into_inner();
        print(
            output,
            &with_times(
                serde_json::json!({}),
                &[("intermediate_expires_at", rotated.intermediate_expires_at)],
            ),
            || {
                say!(
                    "intermediate CA replaced; the new one expires {}. The trust bundle is unchanged: existing SVIDs verify until they expire.",
                    when(rotated.intermediate_expires_at)
                )
            },
        );
        Ok(ExitCode::SUCCESS)
    })
}

fn list_keys(conn: &BrokerConnection, output: Output) -> Result<ExitCode, CliError> {
    block_on(async {
        let mut admin = admin_client(conn).await?;
        let keys = admin
            .list_signing_keys(pb::ListSigningKeysRequest {})
            .await
            .map_err(refused)?
            .into_inner()
            .keys;
        // The broker says what each key does by its own clock; a broker
        // from before it did leaves `state` empty.
        let state = |k: &pb::SigningKeyInfo| {
            if k.state.is_empty() {
                "unknown".to_owned()
            } else {
                k.state.clone()
            }
        };
        match output {
            Output::Json => {
                let rows: Vec<serde_json::Value> = keys
                    .iter()
                    .map(|k| {
                        with_times(
                            serde_json::json!({
                                "kid": k.kid,
                                "state": state(k),
                                "published": k.published,
                            }),
                            &[
                                ("created_at", k.created_at),
                                ("signs_from", k.signs_from),
                                ("retired_at", k.retired_at),
                                ("withdrawn_at", k.withdrawn_at),
                            ],
                        )
                    })
                    .collect();
                say!("{}", serde_json::Value::from(rows));
            }
            Output::Table => {
                let rows = keys
                    .iter()
                    .map(|k| {
                        vec![
                            k.kid.clone(),
                            state(k),
                            when(k.signs_from),
                            when(k.retired_at),
                            if k.published { "yes" } else { "no" }.to_owned(),
                        ]
                    })
                    .collect();
                say!(
                    "{}",
                    table(
                        &["KID", "STATE", "SIGNS FROM", "SIGNS UNTIL", "PUBLISHED"],
                        rows
                    )
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}
