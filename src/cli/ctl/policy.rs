//! `tally ctl policy …`: `check` and `explain` offline on a file;
//! `apply|history|diff|show|rollback` on the broker's stored policy
//! versions.

use super::connect::{BrokerConnection, admin_client, block_on, refused};
use super::output::{Output, table, when, with_times};
use crate::cli::CliError;
use crate::identity::SpiffeId;
use crate::policy::{AccessRequest, IssueRequest, Policy};
use crate::proto::v1 as pb;
use crate::token::{Audience, Scopes};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

pub(super) fn run(conn: &BrokerConnection, command: PolicyCommand) -> Result<ExitCode, CliError> {
    match command {
        PolicyCommand::Apply {
            file,
            comment,
            output,
        } => {
            let yaml = read_text(&file)?;
            // Checked here first, so mistakes are reported with the file's
            // name and positions before anything is sent.
            crate::policy::Policy::parse(&yaml).map_err(|e| {
                CliError::Usage(e.with_file(file.display().to_string()).to_string())
            })?;
            let change = block_on(async {
                admin_client(conn)
                    .await?
                    .apply_policy(pb::ApplyPolicyRequest { yaml, comment })
                    .await
                    .map_err(refused)
                    .map(tonic::Response::into_inner)
            })?;
            print_change(&change, output);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Rollback {
            version,
            comment,
            output,
        } => {
            let change = block_on(async {
                admin_client(conn)
                    .await?
                    .rollback_policy(pb::RollbackPolicyRequest { version, comment })
                    .await
                    .map_err(missing_or_refused)
                    .map(tonic::Response::into_inner)
            })?;
            print_change(&change, output);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::History { limit, output } => history(conn, limit, output),
        PolicyCommand::Show { version, output } => {
            let v = block_on(get(conn, version.unwrap_or(0)))?;
            match output {
                Output::Json => say!(
                    "{}",
                    with_times(
                        serde_json::json!({
                            "version": v.version, "author": v.author, "source": v.source,
                            "comment": v.comment, "yaml": v.yaml,
                        }),
                        &[("created_at", v.created_at)],
                    )
                ),
                Output::Table => emit(&v.yaml),
            }
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Diff { from, to, output } => {
            let (old, new) = block_on(async {
                Ok((get(conn, from).await?, get(conn, to.unwrap_or(0)).await?))
            })?;
            let d = crate::policy::diff::diff(
                &old.yaml,
                &new.yaml,
                &format!("v{}", old.version),
                &format!("v{}", new.version),
            );
            match output {
                Output::Json => say!(
                    "{}",
                    serde_json::json!({
                        "from": old.version, "to": new.version, "changed": !d.is_empty(),
                        "added": d.added, "removed": d.removed, "diff": d.text,
                    })
                ),
                Output::Table => emit(&d.text),
            }
            // The exit code says the same with either output.
            Ok(if d.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        PolicyCommand::Check { .. } | PolicyCommand::Explain(_) => {
            unreachable!("offline commands are run by ctl::run")
        }
    }
}

/// A stored version (0: the newest). One the broker does not hold is bad
/// data ([`CliError::Data`], exit 65), not a failure nor, for `diff`, a
/// difference (1): a script running `policy diff 3 && …` tells them apart.
async fn get(conn: &BrokerConnection, version: u64) -> Result<pb::PolicyVersion, CliError> {
    admin_client(conn)
        .await?
        .get_policy(pb::GetPolicyRequest { version })
        .await
        .map_err(missing_or_refused)
        .map(tonic::Response::into_inner)
}

/// A version the broker does not hold is bad data (exit 65); any other
/// refusal is the broker's.
fn missing_or_refused(status: tonic::Status) -> CliError {
    match status.code() {
        tonic::Code::NotFound => CliError::Data(status.message().to_owned()),
        _ => refused(status),
    }
}

fn print_change(change: &pb::PolicyChangeResponse, output: Output) {
    if output == Output::Json {
        say!(
            "{}",
            serde_json::json!({
                "version": change.version, "changed": change.changed,
                "added": change.added, "removed": change.removed, "diff": change.diff,
            })
        );
        return;
    }
    if change.changed {
        say!(
            "policy version {} is served now (+{} -{} lines); sidecars receive its access rules on their Watch stream",
            change.version,
            change.added,
            change.removed
        );
        emit(&change.diff);
    } else {
        say!(
            "unchanged: version {} already says exactly this",
            change.version
        );
    }
}

fn history(conn: &BrokerConnection, limit: u32, output: Output) -> Result<ExitCode, CliError> {
    let history = block_on(async {
        admin_client(conn)
            .await?
            .policy_history(pb::PolicyHistoryRequest { limit })
            .await
            .map_err(refused)
            .map(tonic::Response::into_inner)
    })?;
    match output {
        Output::Json => {
            let versions: Vec<serde_json::Value> = history
                .versions
                .iter()
                .map(|v| {
                    with_times(
                        serde_json::json!({
                            "version": v.version, "author": v.author, "source": v.source,
                            "comment": v.comment,
                        }),
                        &[("created_at", v.created_at)],
                    )
                })
                .collect();
            say!(
                "{}",
                serde_json::json!({"policy_source": history.policy_source, "versions": versions})
            );
        }
        Output::Table => {
            say!("policy source: {}", history.policy_source);
            let rows = history
                .versions
                .iter()
                .map(|v| {
                    vec![
                        v.version.to_string(),
                        when(v.created_at),
                        v.source.clone(),
                        v.author.clone(),
                        v.comment.clone(),
                    ]
                })
                .collect();
            say!(
                "{}",
                table(&["VERSION", "TIME", "HOW", "AUTHOR", "COMMENT"], rows)
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Text as it is (no newline added), ignoring a closed pipe.
fn emit(text: &str) {
    use std::io::Write as _;
    let _ = std::io::stdout().lock().write_all(text.as_bytes());
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
    /// Store a policy file as the broker's new version and push it to every
    /// sidecar; prints the diff. Needs a broker whose policy source is the
    /// store.
    Apply {
        /// The policy YAML.
        file: PathBuf,
        /// Why, for the history and the audit log.
        #[arg(long, default_value = "")]
        comment: String,
        /// `table` (default: text for people) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// The stored versions, newest first: when, who, how, why.
    History {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// `table` (default) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// What changed from version V1 to V2 (a unified diff). Exit 0 if
    /// nothing did, 1 if anything did, 65 if the broker holds no such
    /// version.
    Diff {
        /// The older version.
        from: u64,
        /// The newer version [default: the newest].
        to: Option<u64>,
        /// `table` (default: the diff as text) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// Print a stored version's document [default: the newest]; exit 65
    /// if the broker holds no such version.
    Show {
        /// The version.
        version: Option<u64>,
        /// `table` (default: the YAML as stored) or `json` (with its
        /// history entry).
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// Serve an earlier version again (stored as a new version, pushed to
    /// every sidecar).
    Rollback {
        /// The version to go back to.
        version: u64,
        /// Why, for the history and the audit log.
        #[arg(long, default_value = "")]
        comment: String,
        /// `table` (default: text for people) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
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

fn load(path: &Path) -> Result<Policy, CliError> {
    let text = read_text(path)?;
    Policy::parse(&text)
        .map_err(|e| CliError::Usage(e.with_file(path.display().to_string()).to_string()))
}

pub(super) fn read_text(path: &Path) -> Result<String, CliError> {
    crate::config::read_text(path).map_err(|e| CliError::Usage(e.to_string()))
}

pub(super) fn check(path: &Path) -> Result<ExitCode, CliError> {
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
            "  class {class}: default_ttl {}, max_ttl {}",
            crate::clock::human_duration(limits.default_ttl),
            crate::clock::human_duration(limits.max_ttl)
        );
    }
    // Only a policy with WIT rules says so: one without grants no WIT.
    for rule in &policy.wit {
        say!(
            "  wit (line {}): {} for up to {}",
            rule.pos.line,
            rule.from,
            crate::clock::human_duration(rule.ttl)
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(super) fn explain(args: &ExplainArgs) -> Result<ExitCode, CliError> {
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
                "ALLOW: rule at line {} issues scope \"{}\" as class {} for {}{}",
                grant.pos.line,
                grant.scopes,
                grant.class,
                crate::clock::human_duration(grant.ttl),
                grant
                    .rate
                    .map(|r| format!(", rate {r}"))
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
