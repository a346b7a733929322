//! `tally demo`: a broker, two sidecars and two tiny apps on loopback, and
//! a narrated tour of what DPoP-bound tokens stop. Each step checks its
//! outcome; the demo exits 0 only if every check went as the narration
//! says, so it doubles as a smoke test of the whole system.
//!
//! [`mesh`] starts the parts (steps 1 to 3), [`tour`] walks the steps
//! (4 to 10), [`app`] is the payments app and the HTTP helpers.

mod app;
mod mesh;
mod tour;

use crate::cli::CliError;
use std::process::ExitCode;

/// Arguments of `tally demo`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct DemoArgs {
    /// Run one part of the demo on its own instead of the tour.
    #[command(subcommand)]
    part: Option<DemoPart>,
    /// Stay up after the tour and print commands to try (Ctrl-C ends it).
    #[arg(long)]
    keep_running: bool,
    /// Keep the broker's store and audit log in this directory (created;
    /// it must not exist yet) instead of a scratch directory removed at
    /// the end.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

/// A part of the demo that runs on its own.
#[derive(Debug, clap::Subcommand)]
enum DemoPart {
    /// Only the payments app (POST /v1/charges, GET /v1/charges/ID; it
    /// answers with the caller the inbound proxy named), for a sidecar's
    /// --upstream in the README walk-through. Runs until SIGTERM or Ctrl-C.
    App {
        /// Where it listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
    },
}

const TRUST_DOMAIN: &str = "demo.tally";
const CHECKOUT: &str = "spiffe://demo.tally/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://demo.tally/ns/pay/sa/payments";
const POLICY: &str = "\
trust_domain: demo.tally
issue:
  - from: spiffe://demo.tally/ns/shop/sa/checkout
    to: spiffe://demo.tally/ns/pay/sa/payments
    scopes: [payments:charge, payments:read]
    class: service
    rate: 100/s
access:
  - workload: spiffe://demo.tally/ns/pay/sa/payments
    allow:
      - from: spiffe://demo.tally/ns/shop/sa/checkout
        methods: [POST]
        paths: [/v1/charges]
        scopes: [payments:charge]
      - from: spiffe://demo.tally/ns/shop/sa/checkout
        methods: [GET]
        paths: [/v1/charges/*]
        scopes: [payments:read]
";

/// Largest answer the demo reads.
const MAX_ANSWER: usize = 64 * 1024;

pub(super) fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?
        .block_on(demo(args))
}

fn failed(what: &str, e: &dyn std::fmt::Display) -> CliError {
    CliError::Failed(format!("{what}: {e}"))
}

async fn demo(args: DemoArgs) -> Result<ExitCode, CliError> {
    if let Some(DemoPart::App { listen }) = args.part {
        return app_alone(listen).await;
    }
    let scratch = match &args.data_dir {
        Some(dir) => crate::cli::ScratchDir::keep(dir)?,
        None => crate::cli::ScratchDir::new("demo")?,
    };
    let mesh = mesh::Mesh::start(scratch.path()).await?;
    let (outbound_addr, payments_admin_addr) = (mesh.outbound_addr, mesh.payments_admin_addr);
    let (socket, charges) = (
        mesh.socket.clone(),
        format!("http://{}/v1/charges", mesh.inbound_addr),
    );
    let mut tour = tour::Tour::new(&mesh);
    tour.run().await?;
    let outcome = if tour.tally.failed.is_empty() {
        say!(
            "Summary: all {} checks went as described. A stolen token was useless without the sidecar's key.",
            tour.tally.passed
        );
        ExitCode::SUCCESS
    } else {
        say!(
            "Summary: {} checks went as described; these did not: {}",
            tour.tally.passed,
            tour.tally.failed.join("; ")
        );
        ExitCode::FAILURE
    };

    if args.keep_running {
        say!("\nStill running; try (Ctrl-C to stop):");
        say!(
            "  curl -x http://{outbound_addr} -H 'x-tally-scope: payments:charge' -d '{{\"amount\": 5}}' {charges}"
        );
        say!(
            "  tally client --socket {} authorize --method POST --url {charges} --scope payments:charge",
            socket.display()
        );
        say!("  curl http://{payments_admin_addr}/metrics");
        say!("  curl http://{payments_admin_addr}/readyz");
        crate::cli::shutdown_signal().await;
    }

    mesh.stop().await?;
    drop(scratch);
    Ok(outcome)
}

/// `tally demo app`: the payments app, until a shutdown signal.
async fn app_alone(listen: std::net::SocketAddr) -> Result<ExitCode, CliError> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| CliError::Usage(format!("--listen {listen}: {e}")))?;
    let (addr, stop) = app::payments_app(listener)?;
    say!("tally demo app: the payments app on {addr} (POST /v1/charges, GET /v1/charges/ID)");
    crate::cli::shutdown_signal().await;
    let _ = stop.send(());
    Ok(ExitCode::SUCCESS)
}
