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
