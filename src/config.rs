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
/// `idle_timeout`, `max_connections`; each the default when `None`),
/// every fault pushed to `errors`.
pub fn listener_limits(
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    max_connections: Option<String>,
    errors: &mut Vec<String>,
) -> crate::http::Limits {
    let defaults = crate::http::Limits::default();
    let mut seconds = |text: Option<String>, key: &str, default: std::time::Duration, max: u64| {
        let Some(text) = text else { return default };
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
    let max_connections = match max_connections {
        None => defaults.max_connections,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=1_000_000).contains(&n) => n,
            _ => {
                errors.push(format!(
                    "max_connections {text:?} must be a number from 1 to 1000000"
                ));
                defaults.max_connections
            }
        },
    };
    crate::http::Limits {
        header_timeout,
        idle_timeout,
        max_connections,
    }
}

#[cfg(test)]
mod limits_tests {
    use super::listener_limits;

    #[test]
    fn listener_limits_default_and_report_every_fault() {
        let mut errors = Vec::new();
        let l = listener_limits(None, None, None, &mut errors);
        assert_eq!(l, crate::http::Limits::default());
        assert!(errors.is_empty());
        let l = listener_limits(
            Some("5s".into()),
            Some("2m".into()),
            Some("10".into()),
            &mut errors,
        );
        assert_eq!(l.header_timeout.as_secs(), 5);
        assert_eq!(l.idle_timeout.as_secs(), 120);
        assert_eq!(l.max_connections, 10);
        listener_limits(
            Some("0s".into()),
            Some("1.5s".into()),
            Some("0".into()),
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
