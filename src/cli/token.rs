//! `tally token inspect`.

use super::{CliError, arg_or_stdin, wall_clock_now};
use crate::jose::{b64, json};
use clap::Subcommand;
use serde_json::{Map, Value};
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

/// Access-token commands.
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Print a token's header and claims, UNVERIFIED, with readable times.
    Inspect {
        /// The token, or `-` to read it from standard input.
        token: super::SecretArg,
    },
}

pub(super) fn run(cmd: TokenCommand) -> Result<ExitCode, CliError> {
    match cmd {
        TokenCommand::Inspect { token } => inspect(&arg_or_stdin(token.expose())?),
    }
}

fn inspect(token: &str) -> Result<ExitCode, CliError> {
    if token.len() > 64 * 1024 {
        return Err(CliError::Usage("token is larger than 64 KiB".into()));
    }
    let parts: Vec<&str> = token.split('.').collect();
    if parts.len() != 3 {
        return Err(CliError::Usage(format!(
            "not a compact JWS: {} segments, expected 3",
            parts.len()
        )));
    }
    let decode = |segment: &str, name: &str| -> Result<Map<String, Value>, CliError> {
        let bytes =
            b64::decode(segment.as_bytes()).map_err(|e| CliError::Usage(format!("{name}: {e}")))?;
        json::parse_object(&bytes).map_err(|e| CliError::Usage(format!("{name}: {e}")))
    };
    let header = decode(parts[0], "header")?;
    let claims = decode(parts[1], "payload")?;
    let pretty = |m: &Map<String, Value>| serde_json::to_string_pretty(m).unwrap_or_default();

    say!("UNVERIFIED: the signature, issuer and audience have NOT been checked.");
    say!("header:\n{}", pretty(&header));
    say!("claims:\n{}", pretty(&claims));
    let now = wall_clock_now();
    let mut times = Vec::new();
    for name in ["iat", "nbf", "exp"] {
        if let Some(secs) = claims.get(name).and_then(Value::as_u64) {
            times.push(format!("  {name} {}", describe_time(secs, now)));
        }
    }
    if !times.is_empty() {
        say!("times:\n{}", times.join("\n"));
    }
    Ok(ExitCode::SUCCESS)
}

fn describe_time(secs: u64, now: u64) -> String {
    let stamp = humantime::format_rfc3339_seconds(
        UNIX_EPOCH + Duration::from_secs(secs.min(253_402_300_799)),
    );
    let relative = if secs >= now {
        format!(
            "in {}",
            humantime::format_duration(Duration::from_secs(secs - now))
        )
    } else {
        format!(
            "{} ago",
            humantime::format_duration(Duration::from_secs(now - secs))
        )
    };
    format!("{secs} = {stamp} ({relative})")
}
