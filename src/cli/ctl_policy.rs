//! `tally ctl policy apply|history|diff|show|rollback`: the broker's
//! stored policy versions.

use super::CliError;
use super::ctl::{
    BrokerConnection, Output, PolicyCommand, admin_client, block_on, read_text, refused, table,
    when,
};
use crate::proto::v1 as pb;
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
                    .map_err(refused)
                    .map(tonic::Response::into_inner)
            })?;
            print_change(&change, output);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::History { limit, output } => history(conn, limit, output),
        PolicyCommand::Show { version } => {
            let v = block_on(get(conn, version.unwrap_or(0)))?;
            emit(&v.yaml);
            Ok(ExitCode::SUCCESS)
        }
        PolicyCommand::Diff { from, to } => {
            let (old, new) = block_on(async {
                Ok((get(conn, from).await?, get(conn, to.unwrap_or(0)).await?))
            })?;
            let d = crate::policy::diff::diff(
                &old.yaml,
                &new.yaml,
                &format!("v{}", old.version),
                &format!("v{}", new.version),
            );
            emit(&d.text);
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

async fn get(conn: &BrokerConnection, version: u64) -> Result<pb::PolicyVersion, CliError> {
    admin_client(conn)
        .await?
        .get_policy(pb::GetPolicyRequest { version })
        .await
        .map_err(refused)
        .map(tonic::Response::into_inner)
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
                    serde_json::json!({
                        "version": v.version, "created_at": v.created_at,
                        "author": v.author, "source": v.source, "comment": v.comment,
                    })
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
