//! What the step-by-step verifiers (`tally dpop verify`, `tally wimse
//! verify`) share: the check report, times as RFC 3339, and size-capped
//! file reads.

use super::CliError;
use std::fmt::Display;
use std::path::Path;

/// Prints one line per check in `all`: `ok` for those in `passed`, `FAIL`
/// with `error` for the first one that did not pass, `(not reached)` for
/// the rest.
pub(super) fn report<C: Copy + PartialEq + Display>(
    all: &[C],
    passed: &[C],
    error: Option<&impl Display>,
) {
    let mut failed_shown = false;
    for check in all {
        if passed.contains(check) {
            say!("  ok    {check}");
        } else if let (Some(e), false) = (error, failed_shown) {
            say!("  FAIL  {check}: {e}");
            failed_shown = true;
        } else {
            say!("  --    {check} (not reached)");
        }
    }
}

/// A claim's time (Unix seconds) as RFC 3339 UTC, as every CLI message
/// writes times.
pub(super) fn rfc3339(secs: u64) -> String {
    super::ctl::output::when(i64::try_from(secs).unwrap_or(i64::MAX))
}

/// Reads at most `max` bytes of `path`; an unreadable file is bad usage.
pub(super) fn read_limited(path: &Path, max: u64) -> Result<Vec<u8>, CliError> {
    use std::io::Read as _;
    let file = std::fs::File::open(path)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    let mut bytes = Vec::new();
    file.take(max)
        .read_to_end(&mut bytes)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    Ok(bytes)
}
