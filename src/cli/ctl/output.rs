//! How `tally ctl` prints: text tables for people, JSON for scripts, and
//! times both ways.

use crate::cli::CliError;

/// How a listing is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON document for scripts.
    Json,
}

pub(super) fn duration(flag: &str, text: &str) -> Result<u32, CliError> {
    humantime::parse_duration(text)
        .ok()
        .and_then(|d| u32::try_from(d.as_secs()).ok())
        .filter(|s| *s > 0 || flag == "--publish-lead")
        .ok_or_else(|| CliError::Usage(format!("{flag} {text:?} is not a duration like 10m")))
}

/// A time given as Unix seconds or RFC 3339.
pub(super) fn unix_time(flag: &str, text: &str) -> Result<i64, CliError> {
    if let Ok(secs) = text.parse::<i64>() {
        return Ok(secs);
    }
    humantime::parse_rfc3339_weak(text)
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .and_then(|d| i64::try_from(d.as_secs()).ok())
        .ok_or_else(|| {
            CliError::Usage(format!(
                "{flag} {text:?}: give Unix seconds or RFC 3339 (2026-11-22T16:00:00Z)"
            ))
        })
}

/// Unix seconds as RFC 3339 (UTC, whole seconds), or `-` for none: the
/// one way a time is written in tables and messages.
pub(crate) fn when(secs: i64) -> String {
    u64::try_from(secs).ok().filter(|s| *s > 0).map_or_else(
        || "-".to_owned(),
        |s| {
            // Clamped to 9999-12-31T23:59:59Z, the last time RFC 3339 can
            // write (a hostile token's `exp` can say anything).
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_secs(s.min(253_402_300_799)),
            )
            .to_string()
        },
    )
}

/// `json` (an object) with each of `times` (Unix seconds, 0 for none)
/// added twice, as every `--output json` carries a time: `NAME` in RFC
/// 3339 UTC (`"2026-12-01T16:00:00Z"`) for people and tools that parse
/// dates, and `NAME_unix` in seconds for arithmetic. Both are `null` for
/// none.
pub(crate) fn with_times(mut json: serde_json::Value, times: &[(&str, i64)]) -> serde_json::Value {
    if let Some(object) = json.as_object_mut() {
        for (name, secs) in times {
            let (text, unix) = match *secs {
                s if s > 0 => (serde_json::json!(when(s)), serde_json::json!(s)),
                _ => (serde_json::Value::Null, serde_json::Value::Null),
            };
            object.insert((*name).to_owned(), text);
            object.insert(format!("{name}_unix"), unix);
        }
    }
    json
}

/// `json` as one line with `--output json`, else what `text` prints.
pub(super) fn print(output: Output, json: &serde_json::Value, text: impl FnOnce()) {
    match output {
        Output::Json => say!("{json}"),
        Output::Table => text(),
    }
}

/// Rows under headers, each column as wide as its widest cell, two spaces
/// apart; the last column is not padded. No trailing newline.
pub(super) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut out = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == headers.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.trim_end().to_owned()
    };
    let mut lines = vec![line(&mut headers.iter().copied())];
    lines.extend(rows.iter().map(|r| line(&mut r.iter().map(String::as_str))));
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc_3339_utc_and_json_carries_unix_seconds_beside_them() {
        assert_eq!(when(1_796_140_800), "2026-12-01T16:00:00Z");
        assert_eq!(when(0), "-");
        assert_eq!(when(i64::MAX), "9999-12-31T23:59:59Z");
        let v = with_times(
            serde_json::json!({"kid": "k"}),
            &[("expires_at", 1_796_140_800), ("retired_at", 0)],
        );
        assert_eq!(
            v,
            serde_json::json!({
                "kid": "k",
                "expires_at": "2026-12-01T16:00:00Z", "expires_at_unix": 1_796_140_800,
                "retired_at": null, "retired_at_unix": null,
            })
        );
    }

    #[test]
    fn a_table_aligns_columns_to_the_widest_cell() {
        let t = table(
            &["A", "LONG HEADER", "LAST"],
            vec![
                vec!["wide cell".into(), "x".into(), "tail text".into()],
                vec!["y".into(), "".into(), "z".into()],
            ],
        );
        assert_eq!(
            t,
            "A          LONG HEADER  LAST\n\
             wide cell  x            tail text\n\
             y                       z"
        );
    }
}
