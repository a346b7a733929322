//! The `tally` binary: parse the command line, start tracing, run, and map
//! the outcome to an exit code (64 for bad usage, as sysexits.h says).

use clap::Parser as _;
use std::process::ExitCode;
use tally::cli::{Cli, EXIT_USAGE};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version are not errors.
            let code = if err.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    // The demo narrates on stdout; its parts only speak up for trouble.
    let default_filter = match cli.command {
        tally::cli::Command::Demo(_) => "warn",
        _ => "info",
    };
    if let Err(err) = tally::logging::init(default_filter) {
        eprintln!("tally: error: {err}");
        return ExitCode::from(EXIT_USAGE);
    }
    match tally::cli::run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tally: error: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
