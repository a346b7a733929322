//! `tally ctl tokens list`, `identities list|deny|allow` and `review`: the
//! broker's inventory and the identities cut off, for people (tables) and
//! scripts (`--output json`).

use super::connect::{BrokerConnection, admin_client, block_on, refused};
use super::output::{Output, print, table, when, with_times};
use crate::cli::CliError;
use crate::proto::v1 as pb;
use clap::{Args, Subcommand};
use serde_json::json;
use std::process::ExitCode;

/// `tally ctl tokens`.
#[derive(Debug, Subcommand)]
pub enum TokensCommand {
    /// Live tokens, soonest expiry first: kind (access token, JWT-SVID or
    /// WIT),
    /// holder, audience(s), scopes, class, expiry, and whether a revocation
    /// covers it. Never the token itself.
    List(ListTokensArgs),
}

/// `tally ctl tokens list`.
#[derive(Debug, Args)]
pub struct ListTokensArgs {
    /// Holder (SPIFFE ID).
    #[arg(long)]
    sub: Option<String>,
    /// Audience (any one of a JWT-SVID's).
    #[arg(long)]
    aud: Option<String>,
    /// Class (service, partner, admin, user).
    #[arg(long)]
    class: Option<String>,
    /// Kind: `access` (DPoP-bound access tokens), `jwt_svid` or `wit`
    /// (WIMSE Workload Identity Tokens).
    #[arg(long, value_parser = ["access", "jwt_svid", "wit"])]
    kind: Option<String>,
    /// Only tokens expiring within this long (e.g. 5m).
    #[arg(long)]
    expiring_within: Option<String>,
    /// At most this many (pages of 1,000 are fetched as needed).
    #[arg(long, default_value_t = 100)]
    limit: u32,
    /// `table` (default) or `json`.
    #[arg(long, default_value = "table")]
    output: Output,
}

/// `tally ctl identities`.
#[derive(Debug, Subcommand)]
pub enum IdentitiesCommand {
    /// Every workload the broker has issued an SVID or a token to: first
    /// and last seen, SVID expiry, how it attested, tokens issued and live,
    /// and whether it is denied (denied IDs never issued anything too).
    List {
        /// `table` (default) or `json`.
        #[arg(long, default_value = "table")]
        output: Output,
    },
    /// Cut a workload off: no attestation, renewal, token or Watch for it,
    /// its SVIDs refused at the broker, its tokens refused by every
    /// sidecar, until `identities allow`. Committed before this returns.
    /// Run `tally ctl revoke --sub ID` too, so the tokens it holds now stay
    /// refused after an allow.
    Deny(DenialArgs),
    /// Lift a denial: the workload may renew, attest and get tokens again.
    Allow(DenialArgs),
}

/// `tally ctl identities deny|allow`.
#[derive(Debug, Args)]
pub struct DenialArgs {
    /// The workload's SPIFFE ID, in the broker's trust domain (`deny`
    /// takes one never seen too, ahead of time).
    spiffe_id: String,
    /// Why, for the audit log and `identities list`.
    #[arg(long, default_value = "")]
    reason: String,
    /// `table` (default: text for people) or `json`.
    #[arg(long, default_value = "table")]
    output: Output,
}

/// `tally ctl review`.
#[derive(Debug, Args)]
pub struct ReviewArgs {
    /// The window: what was not used for this long is reported.
    #[arg(long, default_value = "30d")]
    unused_for: String,
    /// Classes allowing longer tokens than this are reported.
    #[arg(long, default_value = "1h")]
    ttl_ceiling: String,
    /// `table` (default: a report to attach to an access review) or `json`.
    #[arg(long, default_value = "table")]
    output: Output,
}

fn seconds(flag: &str, text: &str) -> Result<u64, CliError> {
    humantime::parse_duration(text)
        .ok()
        .map(|d| d.as_secs())
        .filter(|s| *s > 0)
        .ok_or_else(|| CliError::Usage(format!("{flag} {text:?} is not a duration like 30d")))
}

pub(super) fn tokens(
    conn: &BrokerConnection,
    command: TokensCommand,
) -> Result<ExitCode, CliError> {
    let TokensCommand::List(args) = command;
    if args.limit == 0 {
        return Err(CliError::Usage("--limit must be at least 1".into()));
    }
    let within = args
        .expiring_within
        .as_deref()
        .map(|t| seconds("--expiring-within", t))
        .transpose()?
        .unwrap_or(0);
    let mut request = pb::ListTokensRequest {
        sub: args.sub.unwrap_or_default(),
        aud: args.aud.unwrap_or_default(),
        class: args.class.unwrap_or_default(),
        kind: args.kind.unwrap_or_default(),
        expiring_within_seconds: within,
        ..pb::ListTokensRequest::default()
    };
    let found = block_on(async {
        let mut admin = admin_client(conn).await?;
        let mut all = Vec::new();
        loop {
            let want = args.limit as usize - all.len();
            request.limit = u32::try_from(want.min(1000)).unwrap_or(1000);
            let page = admin
                .list_tokens(request.clone())
                .await
                .map_err(refused)?
                .into_inner();
            all.extend(page.tokens);
            if page.next_after_jti.is_empty() || all.len() >= args.limit as usize {
                break;
            }
            request.after_exp = page.next_after_exp;
            request.after_jti = page.next_after_jti;
        }
        Ok(all)
    })?;
    match args.output {
        Output::Json => {
            let rows: Vec<_> = found
                .iter()
                .map(|t| {
                    with_times(
                        json!({
                            "jti": t.jti, "kind": t.kind, "sub": t.sub, "aud": t.aud, "scope": t.scope,
                            "class": t.class, "jkt": t.jkt, "kid": t.kid, "revoked": t.revoked,
                        }),
                        &[("iat", t.iat), ("exp", t.exp)],
                    )
                })
                .collect();
            say!("{}", serde_json::Value::from(rows));
        }
        Output::Table => {
            let rows = found
                .iter()
                .map(|t| {
                    vec![
                        t.jti.clone(),
                        t.kind.clone(),
                        t.sub.clone(),
                        t.aud.clone(),
                        t.scope.clone(),
                        t.class.clone(),
                        when(t.exp),
                        if t.revoked { "revoked" } else { "live" }.to_owned(),
                    ]
                })
                .collect();
            say!(
                "{}",
                table(
                    &[
                        "JTI", "KIND", "HOLDER", "AUDIENCE", "SCOPES", "CLASS", "EXPIRES", "STATE"
                    ],
                    rows
                )
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The pods column: `name (uid)` for each, `-` for none. Names and UIDs
/// were checked when the token was verified (DNS names, UUID characters),
/// so nothing here can break the table.
fn pods_cell(pods: &[pb::PodRef]) -> String {
    if pods.is_empty() {
        return "-".into();
    }
    pods.iter()
        .map(|p| format!("{} ({})", p.name, p.uid))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(super) fn identities(
    conn: &BrokerConnection,
    command: IdentitiesCommand,
) -> Result<ExitCode, CliError> {
    let output = match command {
        IdentitiesCommand::List { output } => output,
        IdentitiesCommand::Deny(args) => return change_denial(conn, true, args),
        IdentitiesCommand::Allow(args) => return change_denial(conn, false, args),
    };
    let found = block_on(async {
        admin_client(conn)
            .await?
            .list_identities(pb::ListIdentitiesRequest {})
            .await
            .map_err(refused)
            .map(|r| r.into_inner().identities)
    })?;
    match output {
        Output::Json => {
            let rows: Vec<_> = found
                .iter()
                .map(|i| {
                    with_times(
                        json!({
                            "spiffe_id": i.spiffe_id,
                            "method": i.method, "svids": i.svids, "tokens": i.tokens,
                            "live_tokens": i.live_tokens, "denied": i.denied,
                            "pods": i.pods.iter().map(|p| json!({"name": p.name, "uid": p.uid})).collect::<Vec<_>>(),
                            "denied_reason": i.denied.then_some(&i.denied_reason),
                            "denied_by": i.denied.then_some(&i.denied_by),
                        }),
                        &[
                            ("first_seen", i.first_seen),
                            ("last_seen", i.last_seen),
                            ("svid_expires_at", i.svid_expires_at),
                            ("denied_at", if i.denied { i.denied_at } else { 0 }),
                        ],
                    )
                })
                .collect();
            say!("{}", serde_json::Value::from(rows));
        }
        Output::Table => {
            let rows = found
                .iter()
                .map(|i| {
                    vec![
                        i.spiffe_id.clone(),
                        when(i.first_seen),
                        when(i.last_seen),
                        when(i.svid_expires_at),
                        if i.method.is_empty() {
                            "-".into()
                        } else {
                            i.method.clone()
                        },
                        i.tokens.to_string(),
                        i.live_tokens.to_string(),
                        pods_cell(&i.pods),
                        // Last column, so its length cannot skew the
                        // others; the reason is quoted (control
                        // characters escaped).
                        if i.denied {
                            format!(
                                "denied {} by {} ({:?})",
                                when(i.denied_at),
                                i.denied_by,
                                i.denied_reason
                            )
                        } else {
                            "allowed".into()
                        },
                    ]
                })
                .collect();
            say!(
                "{}",
                table(
                    &[
                        "SPIFFE ID",
                        "FIRST SEEN",
                        "LAST SEEN",
                        "SVID EXPIRES",
                        "METHOD",
                        "TOKENS",
                        "LIVE",
                        "PODS",
                        "STATE"
                    ],
                    rows
                )
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `identities deny` (`deny`) or `identities allow`.
fn change_denial(
    conn: &BrokerConnection,
    deny: bool,
    args: DenialArgs,
) -> Result<ExitCode, CliError> {
    let DenialArgs {
        spiffe_id,
        reason,
        output,
    } = args;
    let done = block_on(async {
        let mut admin = admin_client(conn).await?;
        let answer = if deny {
            admin
                .deny_identity(pb::DenyIdentityRequest {
                    spiffe_id: spiffe_id.clone(),
                    reason,
                })
                .await
        } else {
            admin
                .allow_identity(pb::AllowIdentityRequest {
                    spiffe_id: spiffe_id.clone(),
                    reason,
                })
                .await
        };
        answer.map_err(refused).map(tonic::Response::into_inner)
    })?;
    print(
        output,
        &with_times(
            json!({
                "spiffe_id": spiffe_id, "denied": deny, "was_denied": done.was_denied,
                "sequence": done.sequence,
            }),
            &[("at", done.at)],
        ),
        || {
            if deny {
                say!(
                    "denied: {spiffe_id} gets no SVID, token or Watch from now on, and every sidecar refuses its tokens (watch sequence {}); `tally ctl revoke --sub {spiffe_id}` keeps the tokens it already holds refused after an allow",
                    done.sequence
                );
            } else {
                say!(
                    "allowed: {spiffe_id} may attest, renew and get tokens again (watch sequence {}){}",
                    done.sequence,
                    if done.was_denied {
                        ""
                    } else {
                        "; it was not denied"
                    }
                );
            }
        },
    );
    Ok(ExitCode::SUCCESS)
}

pub(super) fn review(conn: &BrokerConnection, args: ReviewArgs) -> Result<ExitCode, CliError> {
    let unused_for = seconds("--unused-for", &args.unused_for)?;
    let ceiling = seconds("--ttl-ceiling", &args.ttl_ceiling)?;
    let r = block_on(async {
        admin_client(conn)
            .await?
            .review(pb::ReviewRequest {
                unused_for_seconds: unused_for,
                ttl_ceiling_seconds: ceiling,
            })
            .await
            .map_err(refused)
            .map(tonic::Response::into_inner)
    })?;
    let rule = |r: &pb::ReviewRule| json!({"line": r.line, "col": r.col, "from": r.from, "to": r.to, "scopes": r.scopes});
    if args.output == Output::Json {
        say!(
            "{}",
            with_times(
                json!({
                    "policy_version": r.policy_version,
                    "tokens_considered": r.tokens_considered,
                    "tokens_outside_policy": r.tokens_outside_policy,
                    "unused_rules": r.unused_rules.iter().map(rule).collect::<Vec<_>>(),
                    "unused_scopes": r.unused_scopes.iter().map(rule).collect::<Vec<_>>(),
                    "dormant_identities": r.dormant_identities.iter()
                        .map(|d| with_times(
                            json!({"spiffe_id": d.spiffe_id}),
                            &[("last_seen", d.last_seen)],
                        ))
                        .collect::<Vec<_>>(),
                    "ttl_findings": r.ttl_findings,
                }),
                &[
                    ("window_start", r.window_start),
                    ("window_end", r.window_end)
                ]
            )
        );
        return Ok(ExitCode::SUCCESS);
    }
    let policy = match r.policy_version {
        0 => "the policy served now".to_owned(),
        v => format!("policy version {v}"),
    };
    say!(
        "Access review, {} to {}, against {policy}; {} tokens issued in the window.",
        when(r.window_start),
        when(r.window_end),
        r.tokens_considered
    );
    let section = |title: &str, lines: Vec<String>| {
        say!("\n{title}: {}", if lines.is_empty() { "none" } else { "" });
        for line in lines {
            say!("  - {line}");
        }
    };
    section(
        "Issue rules no token needed",
        r.unused_rules
            .iter()
            .map(|u| format!("line {}: {} -> {}", u.line, u.from, u.to))
            .collect(),
    );
    section(
        "Scopes granted but never carried",
        r.unused_scopes
            .iter()
            .map(|u| {
                format!(
                    "line {}: {} -> {}: {}",
                    u.line,
                    u.from,
                    u.to,
                    u.scopes.join(" ")
                )
            })
            .collect(),
    );
    section(
        "Dormant identities",
        r.dormant_identities
            .iter()
            .map(|d| format!("{} (last seen {})", d.spiffe_id, when(d.last_seen)))
            .collect(),
    );
    section("Token lifetimes", r.ttl_findings.clone());
    if r.tokens_outside_policy > 0 {
        say!(
            "\n{} tokens in the window would not be issued by the policy served now (granted under an earlier one).",
            r.tokens_outside_policy
        );
    }
    Ok(ExitCode::SUCCESS)
}
