//! Strict JSON for untrusted review bodies: one value, nothing after it,
//! no duplicate object keys (two parsers could each believe a different
//! one), nesting capped below serde_json's own recursion limit. The reader
//! is JOSE's ([`crate::jose::json::parse_strict`]); this keeps the line and
//! column for the webhook's 400 answers.

use serde_json::Value;

/// Deepest nesting accepted. A pod is about a dozen levels deep; this
/// leaves room for any real one and bounds the work on a hostile one.
pub const MAX_DEPTH: usize = 64;

/// Why a body is not strict JSON.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// Not JSON at all, or JSON with something after it.
    #[error("not JSON: {reason} at line {line} column {column}")]
    Syntax {
        /// What the parser found wrong.
        reason: String,
        /// Line, from 1.
        line: usize,
        /// Column, from 1.
        column: usize,
    },
}

/// Parses `bytes` as one strict JSON value (the crate's one strict
/// reader, [`crate::jose::json::parse_strict`]).
///
/// # Errors
/// [`JsonError::Syntax`] for bad JSON, trailing bytes, a duplicate key or
/// nesting deeper than [`MAX_DEPTH`].
pub fn parse(bytes: &[u8]) -> Result<Value, JsonError> {
    crate::jose::json::parse_strict(bytes, MAX_DEPTH).map_err(|e| JsonError::Syntax {
        reason: strip_position(&e.to_string()),
        line: e.line(),
        column: e.column(),
    })
}

/// serde_json appends " at line L column C"; the error carries both.
fn strip_position(text: &str) -> String {
    match text.rfind(" at line ") {
        Some(at) => text[..at].to_owned(),
        None => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_value_parses_and_trailing_bytes_do_not() {
        assert_eq!(parse(br#"{"a":[1,true,null]}"#).unwrap()["a"][1], true);
        let e = parse(br#"{"a":1} x"#).unwrap_err();
        assert!(e.to_string().contains("trailing characters"), "{e}");
    }

    #[test]
    fn a_duplicate_key_is_refused() {
        let e = parse(br#"{"uid":"a","uid":"b"}"#).unwrap_err();
        assert!(e.to_string().contains("duplicate member uid"), "{e}");
    }

    #[test]
    fn nesting_is_capped() {
        let ok = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(parse(ok.as_bytes()).is_ok());
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let e = parse(deep.as_bytes()).unwrap_err();
        assert!(e.to_string().contains("nesting deeper"), "{e}");
    }
}
