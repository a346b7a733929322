//! `tally ctl audit`: check the hash chain (on the broker's store, or a
//! JSON-lines file offline), query records, and look up a leaked token.

use super::connect::{BrokerConnection, admin_client, block_on, refused};
use super::output::{Output, print, table, unix_time, when, with_times};
use crate::audit::{ChainVerifier, MAX_LINE};
use crate::cli::CliError;
use crate::proto::v1 as pb;
use clap::{Args, Subcommand};
use serde_json::Value;
use std::io::{BufRead as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `tally ctl audit`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain: every record follows the one before it and
    /// carries its SHA-256, up to the head recorded with the last write.
    /// Names the first record edited, deleted or moved; exit 1 if any.
    Verify {
        /// Check this JSON-lines audit file here instead of asking the
        /// broker (the file may start mid-chain, e.g. after log rotation).
        #[arg(long)]
        file: Option<PathBuf>,
        /// `table` (default) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// Records matching every condition given, oldest first.
    Query(QueryArgs),
    /// Write the records up to --through to a new JSON-lines file (the
    /// archive), and print what `audit truncate` needs to remove them from
    /// the store.
    Export {
        /// The last record to export.
        #[arg(long)]
        through: u64,
        /// The archive file (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// `table` (default: text for people) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// Remove the records up to --through from the store, once archived:
    /// --sha256 is the hash of record --through as `audit export` printed
    /// it. The chain stays checkable from the first kept record.
    Truncate {
        /// The last record to remove.
        #[arg(long)]
        through: u64,
        /// The SHA-256 (hex) of that record's line, as `export` printed it.
        #[arg(long, required_unless_present = "archive", conflicts_with = "archive")]
        sha256: Option<String>,
        /// The archive `export` wrote: checked as `verify --file` does,
        /// it must end at record --through, and its last line's hash is
        /// the one the store's record must have.
        #[arg(long)]
        archive: Option<std::path::PathBuf>,
        /// Where the archive is kept (a path or URL), for the audit record:
        /// a later lookup or export of a removed record points there
        /// [default: the --archive file's path].
        #[arg(long)]
        stored_at: Option<String>,
        /// `table` (default: text for people) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// From a token string alone (a leaked one): whom it was issued to,
    /// when, for what, whether it is revoked, and every record naming it.
    Lookup {
        /// The token, or `-` to read it from standard input (keeps it out
        /// of shell history).
        #[arg(long)]
        token: String,
        /// `table` (default) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
}

/// `tally ctl audit query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Records whose actor, `spiffe_id` or `sub` is this SPIFFE ID.
    #[arg(long)]
    sub: Option<String>,
    /// Records naming this token id.
    #[arg(long)]
    jti: Option<String>,
    /// A kind (token.issue) or family (token).
    #[arg(long = "type")]
    kind: Option<String>,
    /// At or after this time (Unix seconds or RFC 3339).
    #[arg(long)]
    since: Option<String>,
    /// Before this time (Unix seconds or RFC 3339).
    #[arg(long)]
    until: Option<String>,
    /// At most this many records (pages of 1,000 are fetched as needed).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// `table` (default) or `json`.
    #[arg(long, default_value = "table")]
    output: Output,
}

pub(super) fn run(conn: &BrokerConnection, command: AuditCommand) -> Result<ExitCode, CliError> {
    match command {
        AuditCommand::Verify {
            file: Some(file),
            output,
        } => verify_file(&file, output),
        AuditCommand::Verify { file: None, output } => verify_store(conn, output),
        AuditCommand::Query(args) => query(conn, args),
        AuditCommand::Export {
            through,
            out,
            output,
        } => export(conn, through, &out, output),
        AuditCommand::Truncate {
            through,
            sha256,
            archive,
            stored_at,
            output,
        } => {
            let stored_at = stored_at
                .or_else(|| archive.as_ref().map(|a| a.display().to_string()))
                .unwrap_or_default();
            let sha256 = match (sha256, archive) {
                (Some(sha256), _) => sha256,
                (None, Some(archive)) => archive_head(&archive, through)?,
                (None, None) => {
                    return Err(CliError::Usage("give --sha256 or --archive".into()));
                }
            };
            truncate(conn, through, sha256, stored_at, output)
        }
        AuditCommand::Lookup { token, output } => lookup(conn, &token, output),
    }
}

/// The hash of the last record of the archive at `path`, which must be an
/// intact chain ending at record `through`.
fn archive_head(path: &Path, through: u64) -> Result<String, CliError> {
    let check = check_file(path)?;
    if let Some(problem) = check.problem {
        return Err(CliError::Failed(format!(
            "{}: the archive is broken ({problem}); nothing removed",
            path.display()
        )));
    }
    if check.head_seq != through {
        return Err(CliError::Usage(format!(
            "{} ends at record {}, not {through}; nothing removed",
            path.display(),
            check.head_seq
        )));
    }
    Ok(check.head_hash.to_string())
}

fn truncate(
    conn: &BrokerConnection,
    through: u64,
    sha256: String,
    archive: String,
    output: Output,
) -> Result<ExitCode, CliError> {
    block_on(async {
        let done = admin_client(conn)
            .await?
            .truncate_audit(pb::TruncateAuditRequest {
                through_seq: through,
                sha256,
                archive,
            })
            .await
            .map_err(refused)?
            .into_inner();
        print(
            output,
            &serde_json::json!({"removed": done.removed, "chain_from": done.chain_from}),
            || {
                say!(
                    "removed {} archived records; the store's log now starts at record {}",
                    done.removed,
                    done.chain_from
                );
            },
        );
        Ok(ExitCode::SUCCESS)
    })
}

fn verify_store(conn: &BrokerConnection, output: Output) -> Result<ExitCode, CliError> {
    let report = block_on(async {
        let mut admin = admin_client(conn).await?;
        admin
            .verify_audit(pb::VerifyAuditRequest {})
            .await
            .map_err(refused)
            .map(tonic::Response::into_inner)
    })?;
    let problem = Some(report.problem.clone()).filter(|p| !p.is_empty());
    verdict(
        output,
        &serde_json::json!({
            "intact": report.intact,
            "records_checked": report.records_checked,
            "chain_from": report.chain_from,
            "head_seq": report.head_seq,
            "head_sha256": report.head_sha256,
            "anchor_sha256": report.anchor_sha256,
            "problem": problem,
        }),
    )
}

/// `tally ctl audit export`: pages of records into a new file, checked as
/// they are written (a chain that does not hold is not archived).
fn export(
    conn: &BrokerConnection,
    through: u64,
    out: &Path,
    output: Output,
) -> Result<ExitCode, CliError> {
    use std::io::Write as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .map_err(|e| CliError::Usage(format!("{}: {e}", out.display())))?;
    let exported = block_on(async {
        let mut admin = admin_client(conn).await?;
        let mut verifier = ChainVerifier::from_first_record();
        let mut request = pb::QueryAuditRequest {
            limit: 1000,
            ..pb::QueryAuditRequest::default()
        };
        let mut first = None;
        'pages: loop {
            let page = admin
                .query_audit(request.clone())
                .await
                .map_err(refused)?
                .into_inner();
            for line in &page.records {
                let seq = verifier
                    .push(line)
                    .map_err(|e| CliError::Failed(format!("not exported: {e}")))?;
                if seq > through {
                    break 'pages;
                }
                first.get_or_insert(seq);
                writeln!(file, "{line}")
                    .map_err(|e| CliError::Failed(format!("{}: {e}", out.display())))?;
                if seq == through {
                    break 'pages;
                }
            }
            if page.next_after == 0 {
                break;
            }
            request.after = page.next_after;
        }
        file.sync_all()
            .map_err(|e| CliError::Failed(format!("{}: {e}", out.display())))?;
        let (last, hash) = verifier.head();
        if last != through {
            // Removed by `audit truncate`: say so, and where they went.
            if let Some(gone) = archived(&mut admin).await?
                && through <= gone.through
            {
                return Err(CliError::Failed(format!(
                    "record {through} is not in the store: {}; nothing exported",
                    gone.text()
                )));
            }
            return Err(CliError::Failed(format!(
                "the store's log has no record {through} (the last read was {last}); nothing exported"
            )));
        }
        Ok((first.unwrap_or(0), verifier.checked(), hash))
    });
    let (first, count, last_hash) = match exported {
        Ok(done) => done,
        Err(e) => {
            // No half archive left behind to be mistaken for a whole one.
            let _ = std::fs::remove_file(out);
            return Err(e);
        }
    };
    print(
        output,
        &serde_json::json!({
            "first": first, "through": through, "records": count,
            "file": out.display().to_string(), "sha256": last_hash.to_string(),
        }),
        || {
            say!(
                "exported records {first} to {through} ({count}) to {}; record {through} sha256 {last_hash}",
                out.display()
            );
            say!(
                "keep it safe, then: tally ctl audit truncate --through {through} --sha256 {last_hash} --archive WHERE-IT-IS-KEPT"
            );
        },
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints a verification report; exit 1 when the chain is broken.
fn verdict(output: Output, report: &Value) -> Result<ExitCode, CliError> {
    let intact = report["intact"].as_bool() == Some(true);
    match output {
        Output::Json => say!("{report}"),
        Output::Table => {
            if intact {
                say!(
                    "intact: {} records checked; head record {} sha256 {}",
                    report["records_checked"],
                    report["head_seq"],
                    report["head_sha256"].as_str().unwrap_or("")
                );
            } else {
                // The count includes the record a break is found at (an
                // altered record shows only when its successor is read), so
                // it is not a count of good records.
                say!(
                    "BROKEN: {}\n{} records read; every record before the first one named above chains intact",
                    report["problem"].as_str().unwrap_or(""),
                    report["records_checked"],
                );
            }
            if report["chain_from"].as_u64().is_some_and(|c| c > 1) {
                say!(
                    "records before {} are not covered by this check (archived, or written before the chain); the first record checked chains from {}",
                    report["chain_from"],
                    report["anchor_sha256"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(if intact {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// Checks a JSON-lines audit file here, line by line (each at most 64 KiB).
/// The broker's record of `token` (`-`: standard input, which keeps it
/// out of shell history): found only if its id and keyed hash both match.
pub(super) fn lookup_token(
    conn: &BrokerConnection,
    token: &str,
) -> Result<pb::LookupTokenResponse, CliError> {
    let token = zeroize::Zeroizing::new(crate::cli::arg_or_stdin(token)?);
    block_on(async {
        admin_client(conn)
            .await?
            .lookup_token(pb::LookupTokenRequest {
                token: token.trim().to_owned(),
            })
            .await
            .map_err(refused)
            .map(tonic::Response::into_inner)
    })
}

/// What reading a JSON-lines audit file found.
struct FileCheck {
    checked: u64,
    first: Option<u64>,
    head_seq: u64,
    head_hash: crate::audit::ChainHash,
    problem: Option<String>,
}

fn verify_file(path: &Path, output: Output) -> Result<ExitCode, CliError> {
    let check = check_file(path)?;
    verdict(
        output,
        &serde_json::json!({
            "intact": check.problem.is_none(),
            "records_checked": check.checked,
            "chain_from": check.first.unwrap_or(0),
            "head_seq": check.head_seq,
            "head_sha256": check.head_hash.to_string(),
            "problem": check.problem,
        }),
    )
}

/// Checks the chain of the audit file at `path`, up to its first break.
fn check_file(path: &Path) -> Result<FileCheck, CliError> {
    let file = std::fs::File::open(path)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let mut reader = std::io::BufReader::new(file);
    let mut verifier = ChainVerifier::from_first_record();
    let mut first = None;
    let mut problem = None;
    let mut line = Vec::new();
    loop {
        line.clear();
        // At most one byte past the limit, so a hostile file cannot make
        // this read a huge line into memory.
        let read = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)
            .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?;
        if read == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        let text = String::from_utf8_lossy(&line);
        match verifier.push(&text) {
            Ok(seq) => {
                first.get_or_insert(seq);
            }
            Err(e) => {
                problem = Some(e.to_string());
                break;
            }
        }
    }
    let (head_seq, head_hash) = verifier.head();
    Ok(FileCheck {
        checked: verifier.checked(),
        first,
        head_seq,
        head_hash,
        problem,
    })
}

fn query(conn: &BrokerConnection, args: QueryArgs) -> Result<ExitCode, CliError> {
    let time =
        |flag: &str, t: &Option<String>| t.as_deref().map(|t| unix_time(flag, t)).transpose();
    let mut request = pb::QueryAuditRequest {
        sub: args.sub.unwrap_or_default(),
        jti: args.jti.unwrap_or_default(),
        kind: args.kind.unwrap_or_default(),
        since: time("--since", &args.since)?.unwrap_or(0),
        until: time("--until", &args.until)?.unwrap_or(0),
        after: 0,
        limit: 0,
    };
    if args.limit == 0 {
        return Err(CliError::Usage("--limit must be at least 1".into()));
    }
    let records = block_on(async {
        let mut admin = admin_client(conn).await?;
        let mut records = Vec::new();
        loop {
            let want = args.limit - u32::try_from(records.len()).unwrap_or(u32::MAX);
            request.limit = want.min(1000);
            let page = admin
                .query_audit(request.clone())
                .await
                .map_err(refused)?
                .into_inner();
            records.extend(page.records);
            if page.next_after == 0 || records.len() >= args.limit as usize {
                break;
            }
            request.after = page.next_after;
        }
        Ok(records)
    })?;
    print_records(&records, args.output);
    Ok(ExitCode::SUCCESS)
}

/// Records as a table (fixed fields, then the details as key=value) or as
/// one JSON array.
fn print_records(lines: &[String], output: Output) {
    let records: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
        .collect();
    if output == Output::Json {
        say!("{}", Value::from(records));
        return;
    }
    const FIXED: [&str; 7] = ["seq", "prev", "at", "time", "kind", "outcome", "actor"];
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let rows = records
        .iter()
        .map(|r| {
            let details = r
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| !FIXED.contains(&k.as_str()))
                .map(|(k, v)| format!("{k}={}", text(v)))
                .collect::<Vec<_>>()
                .join(" ");
            vec![
                text(&r["seq"]),
                text(&r["time"]),
                text(&r["kind"]),
                text(&r["outcome"]),
                text(&r["actor"]),
                details,
            ]
        })
        .collect();
    say!(
        "{}",
        table(
            &["SEQ", "TIME", "KIND", "OUTCOME", "ACTOR", "DETAILS"],
            rows
        )
    );
}

fn lookup(conn: &BrokerConnection, token: &str, output: Output) -> Result<ExitCode, CliError> {
    let found = lookup_token(conn, token)?;
    let gone = block_on(async { archived(&mut admin_client(conn).await?).await })?;
    if !found.found {
        match (output, &gone) {
            (Output::Json, _) => say!(
                "{}",
                serde_json::json!({"found": false, "archived": gone.as_ref().map(Archived::json)})
            ),
            (Output::Table, None) => say!(
                "not issued by this broker: no inventory record has this token's id and keyed hash"
            ),
            // Pruned from the inventory with its issuance record archived:
            // not proof that the broker never issued it.
            (Output::Table, Some(gone)) => say!(
                "not found in the store: no inventory record or stored issuance record has this token's id and keyed hash; {}: look there for its jti",
                gone.text()
            ),
        }
        return Ok(ExitCode::from(1));
    }
    match output {
        Output::Json => {
            let records: Vec<Value> = found
                .records
                .iter()
                .map(|l| serde_json::from_str(l).unwrap_or(Value::Null))
                .collect();
            say!(
                "{}",
                with_times(
                    serde_json::json!({
                        "found": true, "jti": found.jti, "kind": found.kind, "sub": found.sub, "aud": found.aud,
                        "scope": found.scope, "class": found.class, "jkt": found.jkt,
                        "kid": found.kid, "revoked": found.revoked, "records": records,
                        "from_audit_log": found.from_audit_log,
                        "archived": gone.as_ref().map(Archived::json),
                    }),
                    &[("iat", found.iat), ("exp", found.exp)],
                )
            );
        }
        Output::Table => {
            let now = i64::try_from(crate::cli::wall_clock_now()).unwrap_or(i64::MAX);
            let state = match (found.revoked, found.exp > now) {
                (true, true) => "REVOKED (not yet expired)",
                (false, true) => "LIVE: revoke it with `tally ctl revoke --jti`",
                (_, false) => "expired",
            };
            say!("token    {} ({})", found.jti, found.kind);
            say!("holder   {}", found.sub);
            say!("audience {}", found.aud);
            say!("scope    {}", found.scope);
            say!("class    {}", found.class);
            say!("issued   {}", when(found.iat));
            say!("expires  {}", when(found.exp));
            if found.jkt.is_empty() {
                say!("dpop key none (a bearer JWT-SVID)");
            } else {
                say!("dpop key {} (jkt)", found.jkt);
            }
            say!("signed   {} (kid)", found.kid);
            say!("state    {state}");
            if found.from_audit_log {
                say!("         (expired and pruned from the inventory: from its issuance record)");
            }
            say!("records naming it: {}", found.records.len());
            if let Some(gone) = &gone
                && found.iat <= gone.at
            {
                say!("(earlier records may be archived: {})", gone.text());
            }
            print_records(&found.records, Output::Table);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The newest `audit truncate`: records up to `through` left the store.
struct Archived {
    through: u64,
    at: i64,
    actor: String,
    archive: Option<String>,
}

impl Archived {
    /// For people: which records, when, by whom, and where they are.
    fn text(&self) -> String {
        let where_ = match &self.archive {
            Some(archive) => format!("the archive is kept at {archive}"),
            None => "the archive `audit export` wrote holds them (truncate did not say where it is kept)".to_owned(),
        };
        format!(
            "records up to {} were archived and removed from the store at {} by {}; {where_}",
            self.through,
            when(self.at),
            self.actor
        )
    }

    fn json(&self) -> Value {
        with_times(
            serde_json::json!({"through": self.through, "by": self.actor, "archive": self.archive}),
            &[("at", self.at)],
        )
    }
}

/// The newest `audit.truncate` record, if the log's beginning was ever
/// archived (its record is written after the ones it removes, so it stays).
async fn archived(
    admin: &mut pb::admin_client::AdminClient<tonic::transport::Channel>,
) -> Result<Option<Archived>, CliError> {
    let page = admin
        .query_audit(pb::QueryAuditRequest {
            kind: "audit.truncate".into(),
            limit: 1000,
            ..pb::QueryAuditRequest::default()
        })
        .await
        .map_err(refused)?
        .into_inner();
    Ok(page.records.iter().rev().find_map(|line| {
        let r: Value = serde_json::from_str(line).ok()?;
        if r["outcome"] != "ok" {
            return None;
        }
        Some(Archived {
            through: r["through"].as_u64()?,
            at: r["at"].as_i64().unwrap_or(0),
            actor: r["actor"].as_str().unwrap_or("-").to_owned(),
            archive: r["archive"].as_str().map(str::to_owned),
        })
    }))
}
