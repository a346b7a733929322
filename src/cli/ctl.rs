//! `tally ctl`: administration. `policy check|explain` work offline on a
//! file; everything else talks to a broker over mTLS gRPC as an admin
//! identity (by default the credential the broker wrote into its data
//! directory).

use super::CliError;
use crate::identity::SpiffeId;
use crate::policy::{AccessRequest, IssueRequest, Policy};
use crate::proto::v1 as pb;
use crate::token::{Audience, Scopes};
use clap::{Args, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// `tally ctl`: how to reach the broker, and the command.
#[derive(Debug, Args)]
pub struct CtlArgs {
    /// How to reach the broker.
    #[command(flatten)]
    broker: BrokerConnection,
    /// The command.
    #[command(subcommand)]
    command: CtlCommand,
}

/// How `tally ctl` reaches the broker: its gRPC URL and an admin
/// credential (by default the one in the broker's data directory).
#[derive(Debug, Args)]
pub struct BrokerConnection {
    /// The broker's gRPC URL.
    #[arg(
        long,
        env = "TALLY_BROKER",
        default_value = "https://localhost:8443",
        global = true
    )]
    broker: String,
    /// The broker's data directory: admin/cert.pem, admin/key.pem and
    /// bundle.pem in it are used unless given below.
    #[arg(
        long,
        env = "TALLY_DATA_DIR",
        default_value = "tally-data",
        global = true
    )]
    data_dir: PathBuf,
    /// Admin certificate chain (PEM) [default: DATA_DIR/admin/cert.pem].
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Admin private key (PEM) [default: DATA_DIR/admin/key.pem].
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    /// Trust bundle (PEM) [default: DATA_DIR/bundle.pem].
    #[arg(long, global = true)]
    bundle: Option<PathBuf>,
}

/// Administration commands.
#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Trust policy: check a file, explain a decision (offline); apply,
    /// history, diff, show, rollback (on the broker).
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// One-time join tokens for workloads without Kubernetes.
    #[command(subcommand)]
    JoinToken(JoinTokenCommand),
    /// Credentials for workloads that cannot run a sidecar.
    #[command(subcommand)]
    Svid(SvidCommand),
    /// Token-signing keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The identity CA.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Revoke tokens: one, a workload's, a DPoP key's, or everything issued
    /// before a time. Committed before this returns; every sidecar enforces
    /// it as soon as its Watch stream delivers it.
    Revoke(RevokeArgs),
    /// The audit log: check its hash chain, query it, look up a leaked
    /// token, archive its beginning.
    #[command(subcommand)]
    Audit(super::ctl_audit::AuditCommand),
    /// Live tokens in the inventory.
    #[command(subcommand)]
    Tokens(super::ctl_inventory::TokensCommand),
    /// Workloads the broker has issued credentials to; cut one off (deny)
    /// or let it back (allow).
    #[command(subcommand)]
    Identities(super::ctl_inventory::IdentitiesCommand),
    /// Access review: issue rules and scopes unused, identities dormant,
    /// token lifetimes above policy, over a window (default 30 days).
    Review(super::ctl_inventory::ReviewArgs),
}

/// How a listing is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document for scripts.
    Json,
}

/// `tally ctl revoke`: exactly one target.
#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("target").required(true).multiple(false)))]
pub struct RevokeArgs {
    /// One token, by its jti.
    #[arg(long, group = "target")]
    jti: Option<String>,
    /// Every token of this SPIFFE ID issued until now.
    #[arg(long, group = "target")]
    sub: Option<String>,
    /// Every token bound to this DPoP key thumbprint issued until now.
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
    /// What changed from version V1 to V2 (a unified diff); exit 1 if
    /// anything did.
    Diff {
        /// The older version.
        from: u64,
        /// The newer version [default: the newest].
        to: Option<u64>,
    },
    /// Print a stored version's document [default: the newest].
    Show {
        /// The version.
        version: Option<u64>,
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

pub(super) fn run(args: CtlArgs) -> Result<ExitCode, CliError> {
    let conn = args.broker;
    match args.command {
        CtlCommand::Policy(PolicyCommand::Check { file }) => check(&file),
        CtlCommand::Policy(PolicyCommand::Explain(args)) => explain(&args),
        CtlCommand::Policy(command) => super::ctl_policy::run(&conn, command),
        CtlCommand::JoinToken(JoinTokenCommand::Create {
            spiffe_id,
            ttl,
            output,
        }) => {
            let ttl = duration("--ttl", &ttl)?;
            block_on(async {
                let mut admin = admin_client(&conn).await?;
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
                    &serde_json::json!({"join_token": made.join_token, "expires_at": made.expires_at}),
                    || say!("{}", made.join_token),
                );
                Ok(ExitCode::SUCCESS)
            })
        }
        CtlCommand::Svid(SvidCommand::Mint {
            spiffe_id,
            ttl,
            out,
            output,
        }) => {
            let ttl = duration("--ttl", &ttl)?;
            mint(&conn, spiffe_id, ttl, &out, output)
        }
        CtlCommand::Keys(KeysCommand::Rotate {
            publish_lead,
            revoke_old,
            reason,
            output,
        }) => {
            let lead = duration("--publish-lead", &publish_lead)?;
            block_on(async {
                let mut admin = admin_client(&conn).await?;
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
                    &serde_json::json!({
                        "kid": rotated.kid, "signs_from": rotated.signs_from,
                        "withdrawn": rotated.withdrawn,
                    }),
                    || {
                        say!("{} (signs from {})", rotated.kid, rotated.signs_from);
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
        CtlCommand::Revoke(args) => revoke(&conn, args),
        CtlCommand::Ca(CaCommand::Rotate { output }) => block_on(async {
            let rotated = admin_client(&conn)
                .await?
                .rotate_intermediate(pb::RotateIntermediateRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            print(
                output,
                &serde_json::json!({"intermediate_expires_at": rotated.intermediate_expires_at}),
                || {
                    say!(
                        "intermediate CA replaced; the new one expires {}. The trust bundle is unchanged: existing SVIDs verify until they expire.",
                        when(rotated.intermediate_expires_at)
                    )
                },
            );
            Ok(ExitCode::SUCCESS)
        }),
        CtlCommand::Audit(command) => super::ctl_audit::run(&conn, command),
        CtlCommand::Keys(KeysCommand::List { output }) => list_keys(&conn, output),
        CtlCommand::Tokens(command) => super::ctl_inventory::tokens(&conn, command),
        CtlCommand::Identities(command) => super::ctl_inventory::identities(&conn, command),
        CtlCommand::Review(args) => super::ctl_inventory::review(&conn, args),
    }
}

fn duration(flag: &str, text: &str) -> Result<u32, CliError> {
    humantime::parse_duration(text)
        .ok()
        .and_then(|d| u32::try_from(d.as_secs()).ok())
        .filter(|s| *s > 0 || flag == "--publish-lead")
        .ok_or_else(|| CliError::Usage(format!("{flag} {text:?} is not a duration like 10m")))
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

/// A refusal from the broker, as the broker worded it.
pub(super) fn refused(status: tonic::Status) -> CliError {
    CliError::Failed(format!(
        "the broker refused: {}: {}",
        status.code(),
        status.message()
    ))
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
    let bundle = read_pem(
        conn.bundle.as_deref().unwrap_or(&dir.join("bundle.pem")),
        "trust bundle",
    )?;
    let endpoint = Channel::from_shared(conn.broker.clone())
        .map_err(|e| CliError::Usage(format!("--broker {:?}: {e}", conn.broker)))?;
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
        .map_err(|e| {
            CliError::Failed(format!(
                "cannot reach the broker at {}: {e}{}",
                conn.broker,
                std::error::Error::source(&e)
                    .map(|s| format!(" ({s})"))
                    .unwrap_or_default()
            ))
        })?;
    Ok(pb::admin_client::AdminClient::new(channel))
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
        super::write_new_file(path, text.as_bytes(), mode)?;
    }
    print(
        output,
        &serde_json::json!({
            "dir": out.display().to_string(), "spiffe_id": svid.spiffe_id,
            "expires_at": svid.expires_at,
        }),
        || {
            say!(
                "{}: cert.pem, key.pem (0600), bundle.pem for {} (expires {})",
                out.display(),
                svid.spiffe_id,
                svid.expires_at
            );
        },
    );
    Ok(ExitCode::SUCCESS)
}

fn load(path: &Path) -> Result<Policy, CliError> {
    let text = read_text(path)?;
    Policy::parse(&text)
        .map_err(|e| CliError::Usage(e.with_file(path.display().to_string()).to_string()))
}

pub(super) fn read_text(path: &Path) -> Result<String, CliError> {
    crate::config::read_text(path).map_err(|e| CliError::Usage(e.to_string()))
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

/// A time given as Unix seconds or RFC 3339.
pub(super) fn unix_time(flag: &str, text: &str) -> Result<i64, CliError> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs);
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{flag} {text:?}: give Unix seconds or RFC 3339 (2026-11-22T16:00:00Z)"
            ))
        })
}

fn revoke(conn: &BrokerConnection, args: RevokeArgs) -> Result<ExitCode, CliError> {
    use pb::revoke_request::Target;
    let target = match (args.jti, args.sub, args.jkt, args.issued_before) {
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
            &serde_json::json!({
                "sequence": done.sequence, "issued_before": done.issued_before,
                "expires_at": done.expires_at,
            }),
            || {
                say!(
                    "revoked: covers tokens issued at or before {}; enforced until {} (watch sequence {})",
                    done.issued_before,
                    done.expires_at,
                    done.sequence
                );
            },
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// Unix seconds as RFC 3339 (UTC), or `-` for none.
pub(super) fn when(secs: i64) -> String {
    u64::try_from(secs).ok().filter(|s| *s > 0).map_or_else(
        || "-".to_owned(),
        |s| {
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s),
            )
            .to_string()
        },
    )
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
        let now = i64::try_from(super::wall_clock_now()).unwrap_or(i64::MAX);
        let state = |k: &pb::SigningKeyInfo| {
            if k.withdrawn_at > 0 {
                "withdrawn"
            } else if k.retired_at > 0 {
                "retired"
            } else if k.signs_from > now {
                "next"
            } else {
                "signing"
            }
        };
        match output {
            Output::Json => {
                let rows: Vec<serde_json::Value> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "kid": k.kid,
                            "state": state(k),
                            "created_at": k.created_at,
                            "signs_from": k.signs_from,
                            "retired_at": (k.retired_at > 0).then_some(k.retired_at),
                            "published": k.published,
                        })
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
                            state(k).to_owned(),
                            when(k.signs_from),
                            when(k.retired_at),
                            if k.published { "yes" } else { "no" }.to_owned(),
                        ]
                    })
                    .collect();
                say!(
                    "{}",
                    table(
                        &["KID", "STATE", "SIGNS FROM", "RETIRED", "PUBLISHED"],
                        rows
                    )
                );
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `json` as one line with `--output json`, else what `text` prints.
pub(super) fn print(output: Output, json: &serde_json::Value, text: impl FnOnce()) {
    match output {
        Output::Json => say!("{json}"),
        Output::Table => text(),
    }
}

/// Rows under headers, each column as wide as its widest cell, two spaces
/// apart; the last column is not padded. No trailing newline.
pub(super) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == headers.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned()
    };
    let mut lines = vec![line(&mut headers.iter().copied())];
    lines.extend(rows.iter().map(|r| line(&mut r.iter().map(String::as_str))));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_columns_to_the_widest_cell() {
        let t = table(
            &["A", "LONG HEADER", "LAST"],
            vec![
                vec!["wide cell".into(), "x".into(), "tail text".into()],
                vec!["y".into(), "".into(), "z".into()],
            ],
        );
        assert_eq!(
            t,
            "A          LONG HEADER  LAST\n\
             wide cell  x            tail text\n\
             y                       z"
        );
    }
}
