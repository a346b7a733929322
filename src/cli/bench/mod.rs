//! `tally bench …`: load tools that start the real binaries and measure
//! them from the outside. A command a file: [`issue`], [`authorize`],
//! [`inbound`], [`revocation`]; [`common`] starts the broker and makes
//! clients, [`sidecar`] starts a sidecar.

mod authorize;
mod common;
mod envoy;
mod inbound;
mod issue;
mod mesh;
mod revocation;
mod sidecar;

use self::issue::IssueArgs;
use super::CliError;
use clap::Subcommand;
use std::process::ExitCode;

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Token issuance over mTLS gRPC against a broker started for the run.
    Issue(IssueArgs),
    /// `POST /v1/authorize` on a sidecar's socket (sidecar and broker
    /// started for the run).
    Authorize(authorize::AuthorizeArgs),
    /// wrk through a sidecar's inbound proxy vs. straight to a trivial
    /// upstream, every proxied request with a fresh DPoP proof (needs wrk).
    Inbound(inbound::InboundArgs),
    /// Revocation propagation: many Watch subscribers, revocations one at
    /// a time, time from the call to each subscriber's receipt.
    Revocation(revocation::RevocationArgs),
}

pub(super) fn run(cmd: BenchCommand) -> Result<ExitCode, CliError> {
    match cmd {
        BenchCommand::Authorize(args) => authorize::run_authorize(&args),
        BenchCommand::Inbound(args) => inbound::run_inbound(&args),
        BenchCommand::Revocation(args) => revocation::run(&args),
        BenchCommand::Issue(args) => issue::run(&args),
    }
}
