//! Where the binary's log lines go and how they look. `TALLY_LOG` picks
//! what is logged (a level, or `target=level` directives separated by
//! commas, e.g. `info,tally::http=debug`: `tracing_subscriber`'s
//! `Targets`, which needs no regular-expression engine in the sidecar); `TALLY_LOG_FORMAT` picks the shape: `text`
//! (the default, for people) or `json` (one object per line, for log
//! shippers). Lines go to standard error, coloured only when it is a
//! terminal and `NO_COLOR` is unset or empty.

use std::ffi::OsStr;
use std::io::IsTerminal as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The variable holding the filter directives.
pub const LOG_VAR: &str = "TALLY_LOG";
/// The variable holding the line format.
pub const FORMAT_VAR: &str = "TALLY_LOG_FORMAT";

/// The shape of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable text.
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`).
    Json,
}

/// Why logging could not be set up as asked.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum LogSetupError {
    /// `TALLY_LOG_FORMAT` is neither `text` nor `json`.
    #[error("{FORMAT_VAR} {0:?} must be text or json")]
    Format(String),
    /// `TALLY_LOG` is not a valid filter.
    #[error("{LOG_VAR} {value:?} is not a valid filter ({reason})")]
    Filter {
        /// The text given.
        value: String,
        /// What the filter parser said.
        reason: String,
    },
    /// A variable is not UTF-8.
    #[error("{0} is not UTF-8")]
    NotText(&'static str),
}

impl LogFormat {
    /// The format `value` (of `TALLY_LOG_FORMAT`) names; unset or empty is
    /// text.
    ///
    /// # Errors
    /// [`LogSetupError::Format`] for any other text: a shipper expecting
    /// JSON must not silently get text.
    pub fn parse(value: Option<&str>) -> Result<Self, LogSetupError> {
        match value.map(str::trim) {
            None | Some("" | "text") => Ok(Self::Text),
            Some("json") => Ok(Self::Json),
            Some(other) => Err(LogSetupError::Format(other.to_owned())),
        }
    }
}

/// Whether text lines get ANSI colour: only on a terminal, and never when
/// `NO_COLOR` is set to anything but the empty string (no-color.org).
pub fn colour(is_terminal: bool, no_color: Option<&OsStr>) -> bool {
    is_terminal && no_color.is_none_or(OsStr::is_empty)
}

/// The filter `value` (of `TALLY_LOG`) gives, or `default` when it is
/// unset or empty.
///
/// # Errors
/// [`LogSetupError::Filter`] for directives that do not parse (they used
/// to fall back to the default without a word).
pub fn filter(value: Option<&str>, default: &str) -> Result<Targets, LogSetupError> {
    let text = match value.map(str::trim) {
        None | Some("") => default,
        Some(text) => text,
    };
    text.parse().map_err(
        |e: tracing_subscriber::filter::ParseError| LogSetupError::Filter {
            value: text.to_owned(),
            reason: e.to_string(),
        },
    )
}

/// Installs the process's subscriber from `TALLY_LOG`, `TALLY_LOG_FORMAT`
/// and `NO_COLOR`; `default_filter` applies when `TALLY_LOG` is unset.
///
/// # Errors
/// [`LogSetupError`] when a variable says something this cannot do.
pub fn init(default_filter: &str) -> Result<(), LogSetupError> {
    let text = |name: &'static str| match std::env::var(name) {
        Ok(v) => Ok(Some(v)),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(_)) => Err(LogSetupError::NotText(name)),
    };
    let format = LogFormat::parse(text(FORMAT_VAR)?.as_deref())?;
    let filter = filter(text(LOG_VAR)?.as_deref(), default_filter)?;
    let layer = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let registry = tracing_subscriber::registry().with(filter);
    match format {
        LogFormat::Text => registry
            .with(layer.with_ansi(colour(
                std::io::stderr().is_terminal(),
                std::env::var_os("NO_COLOR").as_deref(),
            )))
            .init(),
        LogFormat::Json => registry
            .with(layer.json().with_ansi(false).with_current_span(false))
            .init(),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_anything_else_is_refused() {
        assert_eq!(LogFormat::parse(None), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("")), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("text")), Ok(LogFormat::Text));
        assert_eq!(LogFormat::parse(Some("json")), Ok(LogFormat::Json));
        assert_eq!(
            LogFormat::parse(Some("JSON-ish")),
            Err(LogSetupError::Format("JSON-ish".into()))
        );
    }

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(colour(true, None));
        assert!(colour(true, Some(OsStr::new(""))));
        assert!(!colour(true, Some(OsStr::new("1"))));
        assert!(!colour(false, None));
    }

    #[test]
    fn a_bad_filter_is_an_error_not_the_default() {
        assert!(filter(None, "info").is_ok());
        assert!(filter(Some("tally=debug,warn"), "info").is_ok());
        let err = filter(Some("tally=loud"), "info").unwrap_err();
        assert!(
            err.to_string().starts_with("TALLY_LOG \"tally=loud\""),
            "{err}"
        );
        // Span and field filters are not taken: refused, never ignored.
        assert!(filter(Some("[request{id=1}]=debug"), "info").is_err());
    }
}
