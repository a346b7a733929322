//! The `tally` command line. Thin: each command parses its arguments, calls
//! the library, and prints.

/// `println!` that does not panic when the reader has gone (`| head`).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout().lock(), $($arg)*);
    }};
}

mod bench;
mod broker;
mod checks;
mod client;
mod ctl;
mod demo;
mod dpop;
mod injector;
mod shell;
pub mod sidecar;
mod token;
mod wimse;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Exit code for "the answer is no": proofs that do not verify, policy
/// versions that differ, an audit chain that is broken, a refusal.
pub const EXIT_NO: u8 = 1;
/// Exit code for bad usage or configuration (sysexits.h `EX_USAGE`).
pub const EXIT_USAGE: u8 = 64;
/// Exit code for input that names data which is not there, such as a
/// policy version the store does not hold (sysexits.h `EX_DATAERR`).
pub const EXIT_DATAERR: u8 = 65;
/// Exit code for a sidecar or broker that cannot be reached, or is not
/// ready (sysexits.h `EX_UNAVAILABLE`): the same command may work once it
/// is up, so scripts may retry on it.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// Exit code for a command this build does not have (sysexits.h
/// `EX_SOFTWARE`). Not 69: "not built" never goes away by retrying, and a
/// script that retries on 69 must not wait forever for it. The limit is in
/// the software itself, which is what `EX_SOFTWARE` names.
pub const EXIT_NOT_BUILT: u8 = 70;

/// Where every exit code is listed, shown after `tally --help`.
const EXIT_CODES_HELP: &str = "Exit codes: 0 ok, 1 the answer is no (invalid, different, broken), \
64 bad usage or configuration, 65 no such thing (e.g. policy version), \
69 sidecar or broker unreachable, 70 not in this build.\n\
Every code, command by command: README.md, section \"Exit codes\".";

/// tally: DPoP-bound workload identity for service meshes.
#[derive(Debug, Parser)]
#[command(name = "tally", version, about, long_about = None, after_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// DPoP proofs: verify one step by step, sign one, make a key.
    #[command(subcommand)]
    Dpop(dpop::DpopCommand),
    /// Access tokens: inspect one.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// WIMSE Workload Identity and Proof Tokens: verify a pair step by
    /// step, sign a proof.
    #[command(subcommand)]
    Wimse(wimse::WimseCommand),
    /// Run the broker: identity CA and token issuer (mTLS gRPC, OAuth over
    /// HTTPS), with audit, inventory and an admin port.
    Broker(crate::broker::config::BrokerFlags),
    /// Run a sidecar (also built alone as `tally-sidecar`).
    #[command(about = sidecar::ABOUT, long_about = None)]
    Sidecar(sidecar::SidecarFlags),
    /// Ask the local sidecar for a token, request headers, or its identity.
    Client(client::ClientArgs),
    /// Run the Kubernetes admission webhook that injects the sidecar into
    /// pods (HTTPS `POST /inject`), or print one pod as it would inject it
    /// (`--print-pod FILE`).
    Injector(crate::injector::config::InjectorFlags),
    /// Administer: trust policy (check and explain offline; versions on the
    /// broker), join tokens, credentials, keys and CA, revocation, audit,
    /// inventory and access review (on a running broker, as an admin).
    Ctl(ctl::CtlArgs),
    /// Run the loopback demo: a broker, two sidecars and two apps, and a
    /// narrated tour of what DPoP-bound tokens stop.
    Demo(demo::DemoArgs),
    /// Load generators: token issuance, the sidecar's socket API and its
    /// inbound proxy, each against processes started for the run.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
    /// Print a shell completion script (bash, zsh, fish, elvish,
    /// powershell), e.g. `tally completions bash > /etc/bash_completion.d/tally`.
    Completions(shell::CompletionsArgs),
    /// Print a manual page (roff), e.g. `tally man | man -l -` or
    /// `tally man broker`.
    Man(shell::ManArgs),
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad arguments or input files.
    #[error("{0}")]
    Usage(String),
    /// The input names data that does not exist (a policy version the
    /// broker does not hold).
    #[error("{0}")]
    Data(String),
    /// The subcommand exists in the design but not in this build.
    #[error("`tally {0}` is not implemented in this build yet")]
    NotImplemented(&'static str),
    /// The sidecar or broker cannot be reached, or is not ready.
    #[error("{0}")]
    Unavailable(String),
    /// Anything else.
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            Self::Data(_) => EXIT_DATAERR,
            Self::NotImplemented(_) => EXIT_NOT_BUILT,
            Self::Unavailable(_) => EXIT_UNAVAILABLE,
            Self::Failed(_) => EXIT_NO,
        }
    }
}

/// Runs a parsed command line.
///
/// # Errors
/// [`CliError`], whose [`CliError::exit_code`] the binary exits with.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    match cli.command {
        Command::Dpop(cmd) => dpop::run(cmd),
        Command::Token(cmd) => token::run(cmd),
        Command::Wimse(cmd) => wimse::run(cmd),
        Command::Broker(flags) => broker::run(flags),
        Command::Sidecar(flags) => sidecar::run(flags),
        Command::Client(args) => client::run(args),
        Command::Injector(flags) => injector::run(flags),
        Command::Ctl(cmd) => ctl::run(cmd),
        Command::Demo(args) => demo::run(args),
        Command::Bench(cmd) => bench::run(cmd),
        Command::Completions(args) => shell::completions(&args),
        Command::Man(args) => shell::man(&args),
    }
}

/// Resolves on SIGTERM or SIGINT. The handlers are in place when this
/// returns, not when the future is first polled: a signal that arrives
/// after a process has said it is ready (but before it awaits this) must
/// stop it cleanly, not kill it (no handler yet) or be lost.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM or SIGINT; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down: no new connections, finishing calls in flight");
    }
}

/// Seconds since the Unix epoch from the wall clock: only the CLI shell
/// reads it; the core is always handed `now`.
pub(crate) fn wall_clock_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub use crate::config::SecretArg;

/// Reads a value given on the command line, or standard input for `-`
/// (keeps tokens out of shell history and `ps`).
pub(crate) fn arg_or_stdin(value: &str) -> Result<String, CliError> {
    if value != "-" {
        return Ok(value.to_owned());
    }
    let mut text = String::new();
    std::io::Read::read_to_string(
        &mut std::io::Read::take(std::io::stdin(), 64 * 1024),
        &mut text,
    )
    .map_err(|e| CliError::Usage(format!("reading standard input: {e}")))?;
    Ok(text.trim().to_owned())
}

/// As [`arg_or_stdin`], and `@FILE` reads the value from FILE (at most
/// 64 KiB, surrounding whitespace trimmed): a WIT is too long to type.
pub(crate) fn arg_file_or_stdin(value: &str) -> Result<String, CliError> {
    let Some(path) = value.strip_prefix('@') else {
        return arg_or_stdin(value);
    };
    let bytes = checks::read_limited(std::path::Path::new(path), 64 * 1024)?;
    let text =
        String::from_utf8(bytes).map_err(|_| CliError::Usage(format!("{path}: not UTF-8 text")))?;
    Ok(text.trim().to_owned())
}

/// Writes `bytes` to a file that must not exist yet, with `mode`, and
/// syncs it: secrets are never written over something else.
pub(crate) fn write_new_file(
    path: &std::path::Path,
    bytes: &[u8],
    mode: u32,
) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))
}

/// A private scratch directory (0700) under the temp dir, removed when
/// dropped.
pub(crate) struct ScratchDir(std::path::PathBuf, bool);

impl ScratchDir {
    /// `path`, created 0700 (it must not exist), and left in place.
    pub(crate) fn keep(path: &std::path::Path) -> Result<Self, CliError> {
        use std::os::unix::fs::DirBuilderExt as _;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(path)
            .map_err(|e| CliError::Usage(format!("creating {}: {e}", path.display())))?;
        Ok(Self(path.to_owned(), true))
    }

    /// `tally-<purpose>-<pid>-<nanos>`.
    pub(crate) fn new(purpose: &str) -> Result<Self, CliError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("tally-{purpose}-{}-{nanos}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| CliError::Failed(format!("creating {}: {e}", path.display())))?;
        Ok(Self(path, false))
    }

    /// Its path.
    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::Parser as _;

    #[test]
    fn debug_output_of_arguments_leaves_tokens_out() {
        for args in [
            &[
                "tally",
                "sidecar",
                "--broker",
                "https://b:8443",
                "--trust-bundle",
                "b.pem",
                "--join-token",
                "very-secret",
            ][..],
            &["tally", "token", "inspect", "very-secret"],
            &[
                "tally",
                "dpop",
                "sign",
                "--key",
                "k.pem",
                "--method",
                "GET",
                "--url",
                "https://a/",
                "--token",
                "very-secret",
            ],
            &[
                "tally",
                "dpop",
                "verify",
                "--proof",
                "p",
                "--method",
                "GET",
                "--url",
                "https://a/",
                "--token",
                "very-secret",
            ],
            &[
                "tally",
                "wimse",
                "verify",
                "--wit",
                "very-secret",
                "--wpt",
                "very-secret",
                "--url",
                "https://a/",
                "--jwks",
                "j.json",
                "--access-token",
                "very-secret",
                "--txn-token",
                "very-secret",
            ],
            &[
                "tally",
                "wimse",
                "sign",
                "--key",
                "k.pem",
                "--wit",
                "very-secret",
                "--url",
                "https://a/",
                "--access-token",
                "very-secret",
            ],
        ] {
            let cli = Cli::try_parse_from(args).unwrap();
            let text = format!("{cli:?}");
            assert!(!text.contains("very-secret"), "{text}");
            assert!(text.contains("<redacted>"), "{text}");
        }
    }
}
