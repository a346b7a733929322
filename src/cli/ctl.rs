//! `tally ctl`: administration. The policy tools work offline on a file;
//! commands that talk to a broker are not built yet and say so.

use super::{CliError, EXIT_UNAVAILABLE};
use crate::identity::SpiffeId;
use crate::policy::{AccessRequest, IssueRequest, Policy};
use crate::token::{Audience, Scopes};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Administration commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Trust policy: check a file, explain a decision.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Everything that talks to a running broker (join-token, svid, revoke,
    /// keys, audit, tokens, identities, review): not in this build yet.
    #[command(external_subcommand)]
    Other(Vec<String>),
}

/// Policy commands.
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Validate a policy file; every problem is reported with file:line:col.
    Check {
        /// The policy YAML.
        file: PathBuf,
    },
    /// Say which rule allows or denies a request, and why.
    Explain(ExplainArgs),
}

/// Arguments of `tally ctl policy explain`.
#[derive(Debug, Args)]
pub struct ExplainArgs {
    /// The policy YAML.
    #[arg(long)]
    policy: PathBuf,
    /// The caller's SPIFFE ID.
    #[arg(long)]
    from: String,
    /// The audience (for issuance) or the destination workload (for access).
    #[arg(long)]
    to: String,
    /// A requested scope (repeat for several).
    #[arg(long = "scope")]
    scopes: Vec<String>,
    /// Explain an inbound call instead of an issuance: its method…
    #[arg(long, requires = "path")]
    method: Option<String>,
    /// …and path.
    #[arg(long, requires = "method")]
    path: Option<String>,
}

pub(super) fn run(cmd: CtlCommand) -> Result<ExitCode, CliError> {
    match cmd {
        CtlCommand::Policy(PolicyCommand::Check { file }) => check(&file),
        CtlCommand::Policy(PolicyCommand::Explain(args)) => explain(&args),
        CtlCommand::Other(args) => {
            let name = args.first().map_or("", String::as_str);
            eprintln!(
                "tally: error: `tally ctl {name}` talks to a running broker, which this build cannot do yet"
            );
            Ok(ExitCode::from(EXIT_UNAVAILABLE))
        }
    }
}

fn load(path: &Path) -> Result<Policy, CliError> {
    let text = read_text(path)?;
    Policy::parse(&text)
        .map_err(|e| CliError::Usage(e.with_file(path.display().to_string()).to_string()))
}

fn read_text(path: &Path) -> Result<String, CliError> {
    let meta =
        std::fs::metadata(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    if meta.len() > crate::policy::yaml::MAX_LEN as u64 {
        return Err(CliError::Usage(format!(
            "{}: larger than {} bytes",
            path.display(),
            crate::policy::yaml::MAX_LEN
        )));
    }
    std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

fn check(path: &Path) -> Result<ExitCode, CliError> {
    let policy = load(path)?;
    say!(
        "{}: ok: trust domain {}, {} issue rules, {} access rules",
        path.display(),
        policy.trust_domain,
        policy.issue.len(),
        policy.access.len()
    );
    for (class, limits) in &policy.classes {
        say!(
            "  class {class}: default_ttl {}s, max_ttl {}s",
            limits.default_ttl,
            limits.max_ttl
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn explain(args: &ExplainArgs) -> Result<ExitCode, CliError> {
    let policy = load(&args.policy)?;
    let usage = |what: &str, e: &dyn std::fmt::Display| CliError::Usage(format!("{what}: {e}"));
    let from: SpiffeId = args.from.parse().map_err(|e| usage("--from", &e))?;
    let scopes = Scopes::new(
        args.scopes
            .iter()
            .map(|s| s.parse())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| usage("--scope", &e))?,
    )
    .map_err(|e| usage("--scope", &e))?;

    if let (Some(method), Some(path)) = (&args.method, &args.path) {
        let workload: SpiffeId = args.to.parse().map_err(|e| usage("--to", &e))?;
        let decision = policy.decide_access(&AccessRequest {
            workload: &workload,
            caller: &from,
            method,
            path,
            scopes: &scopes,
        });
        return Ok(match decision {
            Ok(grant) => {
                say!(
                    "ALLOW: the allow entry at line {} admits {method} {path} from {from}",
                    grant.pos.line
                );
                ExitCode::SUCCESS
            }
            Err(denial) => {
                say!("DENY: {denial}");
                ExitCode::from(1)
            }
        });
    }

    let audience: Audience = args.to.parse().map_err(|e| usage("--to", &e))?;
    let request = IssueRequest {
        from: &from,
        audience: &audience,
        scopes: &scopes,
        ttl: None,
    };
    for verdict in policy.explain_issue(&request) {
        say!("  {verdict}");
    }
    match policy.decide_issue(&request) {
        Ok(grant) => {
            say!(
                "ALLOW: rule at line {} issues scope \"{}\" as class {} for {}s{}",
                grant.pos.line,
                grant.scopes,
                grant.class,
                grant.ttl,
                grant
                    .rate
                    .map(|r| format!(", rate {}/{}s", r.count, r.per_secs))
                    .unwrap_or_default()
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(denial) => {
            say!("DENY: {denial}");
            Ok(ExitCode::from(1))
        }
    }
}
