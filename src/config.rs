//! Settings files: one YAML mapping of setting name to text (or a list of
//! texts), read the same way for every command that takes `--config`.
//! Flags and `TALLY_*` variables win over the file; the caller merges.

use crate::policy::yaml::{self, Value};
use std::collections::HashMap;

/// The settings a file gave, by name.
#[derive(Debug, Default)]
pub struct FileSettings {
    values: HashMap<&'static str, Vec<String>>,
}

impl FileSettings {
    /// Reads `file` (its name and text), accepting only `keys`; every
    /// problem is appended to `errors`, with its line and column.
    pub fn read(
        file: Option<(&str, &str)>,
        keys: &'static [&'static str],
        errors: &mut Vec<String>,
    ) -> Self {
        let mut values = HashMap::new();
        let Some((name, text)) = file else {
            return Self { values };
        };
        let doc = match yaml::parse(text) {
            Ok(doc) => doc,
            Err(e) => {
                errors.push(format!("{name}:{}: {}", e.pos, e.message));
                return Self { values };
            }
        };
        let entries = match doc.value {
            Value::Map(entries) => entries,
            Value::Null => Vec::new(),
            _ => {
                errors.push(format!(
                    "{name}:{}: the config file must be a mapping",
                    doc.pos
                ));
                Vec::new()
            }
        };
        for (key, pos, node) in entries {
            let Some(known) = keys.iter().copied().find(|k| *k == key) else {
                errors.push(format!(
                    "{name}:{pos}: unknown key {key:?} (expected one of: {})",
                    keys.join(", ")
                ));
                continue;
            };
            let texts = match node.value {
                Value::Str(s) => vec![s],
                Value::Seq(items) => items
                    .into_iter()
                    .filter_map(|i| match i.value {
                        Value::Str(s) => Some(s),
                        _ => {
                            errors.push(format!("{name}:{}: {key} items must be text", i.pos));
                            None
                        }
                    })
                    .collect(),
                _ => {
                    errors.push(format!("{name}:{}: {key} must be text", node.pos));
                    continue;
                }
            };
            values.insert(known, texts);
        }
        Self { values }
    }

    /// The first value of `key`, if the file set it.
    pub fn one(&self, key: &str) -> Option<String> {
        self.values.get(key).and_then(|v| v.first().cloned())
    }

    /// Every value of `key` (empty if unset).
    pub fn all(&self, key: &str) -> Vec<String> {
        self.values.get(key).cloned().unwrap_or_default()
    }
}

/// What a setting is when neither a flag, its `TALLY_*` variable nor the
/// `--config` file gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultValue {
    /// This text, read exactly as if it had been given.
    Text(&'static str),
    /// Worked out from other settings or the machine; the text says how.
    Derived(&'static str),
}

impl DefaultValue {
    /// The text `--help` and the configuration reference show.
    pub fn shown(self) -> &'static str {
        match self {
            Self::Text(t) | Self::Derived(t) => t,
        }
    }
}

/// One command's defaults, by setting name (the YAML key; the flag is the
/// same with `-` for `_`). `resolve` reads them from here, `--help` shows
/// them (see [`Defaults::annotate`]) and `docs/CONFIGURATION.md` is made
/// from them, so the three cannot disagree.
#[derive(Debug)]
pub struct Defaults(pub &'static [(&'static str, DefaultValue)]);

impl Defaults {
    /// The default of `key`, if it has one.
    pub fn get(&self, key: &str) -> Option<DefaultValue> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The text default of `key`, as `resolve` reads it.
    ///
    /// # Panics
    /// When `key` has no text default: a typo in `resolve`, which every
    /// config's `defaults_work_with_nothing_given` test (resolving with
    /// nothing given, so asking for every default) finds first.
    pub fn text(&self, key: &str) -> String {
        match self.get(key) {
            Some(DefaultValue::Text(t)) => t.to_owned(),
            other => panic!("no text default for {key:?} ({other:?})"),
        }
    }

    /// A function for `Command::mut_args` that appends `[default: X]` to
    /// the help of each argument whose id has a default here.
    pub fn annotate(&'static self) -> impl FnMut(clap::Arg) -> clap::Arg {
        move |arg| {
            let Some(default) = self.get(arg.get_id().as_str()) else {
                return arg;
            };
            let suffix = format!("[default: {}]", default.shown());
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            let long = arg.get_long_help().map(ToString::to_string);
            let arg = arg.help(format!("{help} {suffix}"));
            match long {
                Some(long) => arg.long_help(format!("{long}\n\n{suffix}")),
                None => arg,
            }
        }
    }
}

/// A secret given on the command line or in a `TALLY_*` variable (a
/// token): `Debug` shows only that it is there, and the text is wiped on
/// drop.
#[derive(Clone)]
pub struct SecretArg(zeroize::Zeroizing<String>);

impl std::str::FromStr for SecretArg {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(zeroize::Zeroizing::new(s.to_owned())))
    }
}

impl SecretArg {
    /// The text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretArg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// `true`/`false` (also `yes`/`no`, `on`/`off`, `1`/`0`) for a boolean
/// setting, or an error naming it.
///
/// # Errors
/// A message naming `key` and the text.
pub fn boolean(key: &str, text: &str) -> Result<bool, String> {
    match text.to_ascii_lowercase().as_str() {
        "true" | "yes" | "on" | "1" => Ok(true),
        "false" | "no" | "off" | "0" => Ok(false),
        _ => Err(format!("{key} {text:?} must be true or false")),
    }
}

/// Listener limits from their three settings (`header_timeout`,
/// `idle_timeout`, `max_connections`; each its text in `table` when
/// `None`), every fault pushed to `errors`.
pub fn listener_limits(
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<String>,
    table: &Defaults,
    errors: &mut Vec<String>,
) -> crate::http::Limits {
    let defaults = crate::http::Limits::default();
    let mut seconds = |text: Option<String>, key: &str, default: std::time::Duration, max: u64| {
        let text = text.unwrap_or_else(|| table.text(key));
        match humantime::parse_duration(&text) {
            Ok(d) if (1..=max).contains(&d.as_secs()) && d.subsec_nanos() == 0 => d,
            _ => {
                errors.push(format!(
                    "{key} {text:?} must be whole seconds from 1s to {max}s"
                ));
                default
            }
        }
    };
    let header_timeout = seconds(
        header_timeout,
        "header_timeout",
        defaults.header_timeout,
        300,
    );
    let idle_timeout = seconds(idle_timeout, "idle_timeout", defaults.idle_timeout, 86_400);
    let text = max_connections.unwrap_or_else(|| table.text("max_connections"));
    let max_connections = match text.parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => n,
        _ => {
            errors.push(format!(
                "max_connections {text:?} must be a number from 1 to 1000000"
            ));
            defaults.max_connections
        }
    };
    crate::http::Limits {
        header_timeout,
        idle_timeout,
        max_connections,
    }
}

#[cfg(test)]
mod limits_tests {
    use super::{DefaultValue, Defaults, listener_limits};

    static LIMITS: Defaults = Defaults(&[
        ("header_timeout", DefaultValue::Text("10s")),
        ("idle_timeout", DefaultValue::Text("60s")),
        ("max_connections", DefaultValue::Text("1024")),
    ]);

    #[test]
    fn listener_limits_default_and_report_every_fault() {
        let mut errors = Vec::new();
        let l = listener_limits(None, None, None, &LIMITS, &mut errors);
        assert_eq!(l, crate::http::Limits::default());
        assert!(errors.is_empty());
        let l = listener_limits(
            Some("5s".into()),
            Some("2m".into()),
            Some("10".into()),
            &LIMITS,
            &mut errors,
        );
        assert_eq!(l.header_timeout.as_secs(), 5);
        assert_eq!(l.idle_timeout.as_secs(), 120);
        assert_eq!(l.max_connections, 10);
        listener_limits(
            Some("0s".into()),
            Some("1.5s".into()),
            Some("0".into()),
            &LIMITS,
            &mut errors,
        );
        assert_eq!(errors.len(), 3, "{errors:?}");
        assert!(errors[0].starts_with("header_timeout \"0s\""), "{errors:?}");
        assert!(errors[2].starts_with("max_connections \"0\""), "{errors:?}");
    }
}

/// Largest settings or policy file read (the policy parser's own limit).
pub const MAX_FILE: u64 = crate::policy::yaml::MAX_LEN as u64;

/// A settings or policy file that could not be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// Opening, reading or decoding it failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// What failed.
        error: std::io::Error,
    },
    /// It is larger than [`MAX_FILE`].
    #[error("{path}: larger than 1 MiB ({MAX_FILE} bytes)")]
    TooLarge {
        /// The file.
        path: String,
    },
}

/// Reads a settings or policy file as UTF-8, refusing one larger than
/// [`MAX_FILE`] before reading it.
///
/// # Errors
/// [`ReadError`], naming the file.
pub fn read_text(path: &std::path::Path) -> Result<String, ReadError> {
    let io = |error| ReadError::Io {
        path: path.display().to_string(),
        error,
    };
    if std::fs::metadata(path).map_err(io)?.len() > MAX_FILE {
        return Err(ReadError::TooLarge {
            path: path.display().to_string(),
        });
    }
    std::fs::read_to_string(path).map_err(io)
}
