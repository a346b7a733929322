//! `tally ctl`: administration. `policy check|explain` work offline on a
//! file; everything else talks to a broker over mTLS gRPC as an admin
//! identity (by default the credential the broker wrote into its data
//! directory).
//!
//! A command a file: [`policy`], [`credentials`] (join tokens, SVIDs),
//! [`keys`] (signing keys, the intermediate CA), [`revoke`], [`audit`],
//! [`inventory`] (tokens, identities, access review); [`connect`] is the
//! admin connection, [`output`] tables, JSON and times.

mod audit;
mod connect;
mod credentials;
mod inventory;
mod keys;
pub(super) mod output;
mod policy;
mod revoke;

pub use connect::BrokerConnection;

use self::credentials::{JoinTokenCommand, SvidCommand, join_token, svid};
use self::keys::{CaCommand, KeysCommand, ca, keys};
use self::policy::{PolicyCommand, check, explain};
use self::revoke::{RevokeArgs, revoke};
use super::CliError;
use clap::{Args, Subcommand};
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
    Audit(audit::AuditCommand),
    /// Live tokens in the inventory.
    #[command(subcommand)]
    Tokens(inventory::TokensCommand),
    /// Workloads the broker has issued credentials to; cut one off (deny)
    /// or let it back (allow).
    #[command(subcommand)]
    Identities(inventory::IdentitiesCommand),
    /// Access review: issue rules and scopes unused, identities dormant,
    /// token lifetimes above policy, over a window (default 30 days).
    Review(inventory::ReviewArgs),
}

pub(super) fn run(args: CtlArgs) -> Result<ExitCode, CliError> {
    let conn = args.broker;
    match args.command {
        CtlCommand::Policy(PolicyCommand::Check { file }) => check(&file),
        CtlCommand::Policy(PolicyCommand::Explain(args)) => explain(&args),
        CtlCommand::Policy(command) => policy::run(&conn, command),
        CtlCommand::JoinToken(command) => join_token(&conn, command),
        CtlCommand::Svid(command) => svid(&conn, command),
        CtlCommand::Keys(command) => keys(&conn, command),
        CtlCommand::Revoke(args) => revoke(&conn, args),
        CtlCommand::Ca(command) => ca(&conn, command),
        CtlCommand::Audit(command) => audit::run(&conn, command),
        CtlCommand::Tokens(command) => inventory::tokens(&conn, command),
        CtlCommand::Identities(command) => inventory::identities(&conn, command),
        CtlCommand::Review(args) => inventory::review(&conn, args),
    }
}
