//! Strict JSON objects for JOSE headers and claim sets.
//!
//! `serde_json` silently keeps the last of two members with the same name.
//! RFC 7515 §5.2 lets a parser either reject such input or use the last
//! value; we reject it, because two parsers that disagree on which member
//! counts are exactly how signature-wrapping attacks start. Duplicates are
//! rejected at every depth.

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};
use std::fmt;

/// Why bytes were not accepted as a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JsonError {
    /// The bytes are not JSON (or not UTF-8, or nested too deep).
    #[error("not valid JSON: {0}")]
    Syntax(String),
    /// An object repeats a member name.
    #[error("duplicate member name {0:?}")]
    DuplicateMember(String),
    /// Valid JSON, but the top level is not an object.
    #[error("top-level JSON value is not an object")]
    NotAnObject,
}

const DUPLICATE_PREFIX: &str = "duplicate member ";

/// Deepest nesting [`parse_object`] accepts: a JOSE header or claim set is
/// a few levels deep; this bounds the work on a hostile one well below
/// serde_json's own recursion limit.
pub const MAX_DEPTH: usize = 64;

/// Parses `bytes` as one JSON object, rejecting duplicate member names.
///
/// # Errors
/// [`JsonError`] for invalid JSON, a duplicate name at any depth, nesting
/// deeper than [`MAX_DEPTH`], or a top-level value that is not an object.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, JsonError> {
    match parse_strict(bytes, MAX_DEPTH) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(JsonError::NotAnObject),
        Err(err) => {
            // Our visitor reports duplicates as "data" errors; every other
            // failure is syntax, depth, EOF or I/O.
            let text = err.to_string();
            match text.strip_prefix(DUPLICATE_PREFIX) {
                Some(rest) if err.is_data() => {
                    let name = rest.split(" at line").next().unwrap_or(rest);
                    Err(JsonError::DuplicateMember(name.to_owned()))
                }
                _ => Err(JsonError::Syntax(text)),
            }
        }
    }
}

/// Parses `bytes` as exactly one JSON value (nothing after it), refusing a
/// member name repeated in any object (`duplicate member NAME`) and
/// nesting deeper than `max_depth` (`nesting deeper than N levels`): the
/// one strict reader for untrusted JSON, JOSE's and the admission
/// webhook's alike.
///
/// # Errors
/// serde_json's error, with its line and column.
pub fn parse_strict(bytes: &[u8], max_depth: usize) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = Strict {
        depth: 0,
        max: max_depth,
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// A value whose deserializer refuses duplicate member names and nesting
/// past `max`.
struct Strict {
    depth: usize,
    max: usize,
}

impl Strict {
    fn deeper<E: de::Error>(&self) -> Result<Self, E> {
        if self.depth >= self.max {
            return Err(E::custom(format_args!(
                "nesting deeper than {} levels",
                self.max
            )));
        }
        Ok(Self {
            depth: self.depth + 1,
            max: self.max,
        })
    }
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        // serde_json never produces a non-finite f64, so `from_f64` cannot
        // fail here; Null is a safe fallback regardless.
        Ok(Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(self.deeper()?)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Value, A::Error> {
        let mut map = Map::new();
        while let Some(name) = access.next_key::<String>()? {
            if map.contains_key(&name) {
                return Err(de::Error::custom(format_args!("{DUPLICATE_PREFIX}{name}")));
            }
            let value = access.next_value_seed(self.deeper()?)?;
            map.insert(name, value);
        }
        Ok(Value::Object(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_object_parses() {
        let map = parse_object(br#"{"a":1,"b":{"c":[true,null,"x",1.5]}}"#).unwrap();
        assert_eq!(map["a"], 1);
        assert_eq!(map["b"]["c"][3], 1.5);
    }

    #[test]
    fn duplicate_member_at_top_level_is_rejected() {
        assert_eq!(
            parse_object(br#"{"alg":"ES256","alg":"none"}"#),
            Err(JsonError::DuplicateMember("alg".into()))
        );
    }

    #[test]
    fn duplicate_member_in_nested_object_is_rejected() {
        assert_eq!(
            parse_object(br#"{"jwk":{"x":"a","x":"b"}}"#),
            Err(JsonError::DuplicateMember("x".into()))
        );
    }

    #[test]
    fn escaped_duplicate_name_is_still_a_duplicate() {
        // "\u0061lg" is "alg" after unescaping.
        assert_eq!(
            parse_object(br#"{"alg":"ES256","\u0061lg":"none"}"#),
            Err(JsonError::DuplicateMember("alg".into()))
        );
    }

    #[test]
    fn non_objects_are_rejected() {
        assert_eq!(parse_object(b"[1,2]"), Err(JsonError::NotAnObject));
        assert_eq!(parse_object(b"\"s\""), Err(JsonError::NotAnObject));
        assert!(matches!(parse_object(b"{"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_object(b"{} {}"), Err(JsonError::Syntax(_))));
        assert!(matches!(parse_object(b"\xff"), Err(JsonError::Syntax(_))));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "[".repeat(10_000);
        let text = format!("{{\"a\":{deep}}}");
        assert!(matches!(
            parse_object(text.as_bytes()),
            Err(JsonError::Syntax(e)) if e.contains("nesting deeper than 64 levels")
        ));
        // The cap itself: 64 levels below the top object parse.
        let ok = format!("{{\"a\":{}{}}}", "[".repeat(63), "]".repeat(63));
        assert!(parse_object(ok.as_bytes()).is_ok());
    }
}
