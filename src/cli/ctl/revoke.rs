//! `tally ctl revoke`.

use super::connect::{BrokerConnection, admin_client, block_on, refused};
use super::output::{Output, print, unix_time, when, with_times};
use crate::cli::CliError;
use crate::proto::v1 as pb;
use std::process::ExitCode;

/// `tally ctl revoke`: exactly one target.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
pub struct RevokeArgs {
    /// One token, by its jti.
    #[arg(long, group = "target")]
    jti: Option<String>,
    /// One token, given whole, or `-` to read it from standard input (a
    /// leaked one): revoked only if this broker issued it (its id and
    /// keyed hash match the inventory), else exit 1 and nothing changes.
    #[arg(long, group = "target")]
    token: Option<String>,
    /// Every token of this SPIFFE ID issued until now.
    #[arg(long, group = "target")]
    sub: Option<String>,
    /// Every token bound to this key thumbprint issued until now (an
    /// access token's DPoP key, a WIT's `cnf.jwk`).
    #[arg(long, group = "target")]
    jkt: Option<String>,
    /// Every token in the trust domain issued at or before this time (Unix
    /// seconds or RFC 3339, e.g. 2026-11-22T16:00:00Z).
    #[arg(long, group = "target")]
    issued_before: Option<String>,
    /// Why, for the audit log.
    #[arg(long, default_value = "")]
    reason: String,
    /// `table` (default: text for people) or `json`.
    #[arg(long, default_value = "table")]
    output: Output,
}

pub(super) fn revoke(conn: &BrokerConnection, args: RevokeArgs) -> Result<ExitCode, CliError> {
    use pb::revoke_request::Target;
    let jti = match &args.token {
        Some(token) => match super::audit::lookup_token(conn, token)? {
            found if found.found => Some(found.jti),
            _ => {
                print(
                    args.output,
                    &serde_json::json!({"found": false, "revoked": false}),
                    || {
                        say!(
                            "not issued by this broker: no inventory record has this token's id and keyed hash; nothing revoked"
                        );
                    },
                );
                return Ok(ExitCode::from(1));
            }
        },
        None => args.jti,
    };
    let target = match (jti, args.sub, args.jkt, args.issued_before) {
        (Some(j), ..) => Target::Jti(j),
        (_, Some(s), ..) => Target::Subject(s),
        (_, _, Some(k), _) => Target::Jkt(k),
        (_, _, _, Some(t)) => Target::IssuedBefore(unix_time("--issued-before", &t)?),
        _ => {
            return Err(CliError::Usage(
                "give --jti, --sub, --jkt or --issued-before".into(),
            ));
        }
    };
    block_on(async {
        let mut admin = admin_client(conn).await?;
        let done = admin
            .revoke(pb::RevokeRequest {
                target: Some(target),
                reason: args.reason,
            })
            .await
            .map_err(refused)?
            .into_inner();
        print(
            args.output,
            &with_times(
                serde_json::json!({"sequence": done.sequence}),
                &[
                    ("issued_before", done.issued_before),
                    ("expires_at", done.expires_at),
                ],
            ),
            || {
                say!(
                    "revoked: covers tokens issued at or before {}; enforced until {} (watch sequence {})",
                    when(done.issued_before),
                    when(done.expires_at),
                    done.sequence
                );
            },
        );
        Ok(ExitCode::SUCCESS)
    })
}
