//! `tally completions SHELL` and `tally man [COMMAND…]`: shell completion
//! scripts and roff manual pages, both made from the same clap definition
//! the binary parses with, so they never name a flag it lacks.

use super::{Cli, CliError};
use clap::CommandFactory as _;
use std::process::ExitCode;

/// Arguments of `tally completions`.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Arguments of `tally man`.
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// The (sub)command whose page to print, e.g. `broker` or `ctl policy`
    /// [default: the page for `tally` itself].
    pub command: Vec<String>,
}

/// Prints the completion script for `args.shell` on standard output.
///
/// # Errors
/// None today; the signature matches the other commands.
pub fn completions(args: &CompletionsArgs) -> Result<ExitCode, CliError> {
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut Cli::command(), "tally", &mut script);
    emit(&script);
    Ok(ExitCode::SUCCESS)
}

/// Prints the manual page for `args.command` (roff) on standard output.
///
/// # Errors
/// [`CliError::Usage`] for a command `tally` does not have.
pub fn man(args: &ManArgs) -> Result<ExitCode, CliError> {
    let mut command = Cli::command();
    // Building fills in each subcommand's display name (`tally-broker`),
    // which the page is titled with.
    command.build();
    for name in &args.command {
        command = command.find_subcommand(name).cloned().ok_or_else(|| {
            CliError::Usage(format!(
                "tally man: no such command {name:?} (see `tally --help`)"
            ))
        })?;
    }
    if command.get_version().is_none() {
        command = command.version(env!("CARGO_PKG_VERSION"));
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(command)
        .render(&mut page)
        .map_err(|e| CliError::Failed(format!("rendering the manual page: {e}")))?;
    emit(&page);
    Ok(ExitCode::SUCCESS)
}

/// Writes `bytes` to standard output; a reader that went away (`| head`)
/// is not an error.
fn emit(bytes: &[u8]) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(bytes).and_then(|()| out.flush());
}
