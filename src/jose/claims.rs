//! Typed reads of JWT claims (or JOSE header members) from a parsed JSON
//! object. Each domain turns [`ClaimError`] into its own error type.

use serde_json::{Map, Value};

/// A claim is absent or has the wrong JSON type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimError {
    /// The claim is absent.
    Missing(&'static str),
    /// The claim has the wrong JSON type.
    WrongType {
        /// The claim.
        claim: &'static str,
        /// What it should have been.
        expected: &'static str,
    },
}

const STRING: &str = "a string";
const INTEGER: &str = "a non-negative integer";

/// A required string claim.
///
/// # Errors
/// [`ClaimError`] if absent or not a string.
pub fn string<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, ClaimError> {
    optional_string(claims, name)?.ok_or(ClaimError::Missing(name))
}

/// An optional string claim.
///
/// # Errors
/// [`ClaimError::WrongType`] if present and not a string.
pub fn optional_string<'a>(
    claims: &'a Map<String, Value>,
    name: &'static str,
) -> Result<Option<&'a str>, ClaimError> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(ClaimError::WrongType {
            claim: name,
            expected: STRING,
        }),
    }
}

/// A required NumericDate-style claim: a non-negative integer (floats,
/// strings and negative numbers are refused).
///
/// # Errors
/// [`ClaimError`] if absent or not a non-negative integer.
pub fn integer(claims: &Map<String, Value>, name: &'static str) -> Result<u64, ClaimError> {
    optional_integer(claims, name)?.ok_or(ClaimError::Missing(name))
}

/// An optional non-negative integer claim.
///
/// # Errors
/// [`ClaimError::WrongType`] if present and not a non-negative integer.
pub fn optional_integer(
    claims: &Map<String, Value>,
    name: &'static str,
) -> Result<Option<u64>, ClaimError> {
    match claims.get(name) {
        None => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or(ClaimError::WrongType {
            claim: name,
            expected: INTEGER,
        }),
    }
}
