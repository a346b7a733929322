//! A pod file for `tally injector --print-pod`: JSON, or one YAML
//! document read with the YAML 1.2 core schema (a plain `8080` is a
//! number, a quoted `"8080"` text, as `kubectl` reads it) into JSON.
//! Anchors, aliases, tags and duplicate keys are refused, size and depth
//! capped: the file may come from anyone.

use saphyr_parser::{Event, Parser, ScalarStyle, Span};
use serde_json::{Map, Number, Value};

/// Largest pod file read.
pub const MAX_LEN: usize = 1024 * 1024;

/// Why a pod file could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PodFileError {
    /// Larger than [`MAX_LEN`].
    #[error("larger than {MAX_LEN} bytes")]
    TooLarge,
    /// Not valid JSON.
    #[error(transparent)]
    Json(#[from] super::json::JsonError),
    /// Not valid (or not supported) YAML.
    #[error("{line}:{column}: {message}")]
    Yaml {
        /// Line, from 1.
        line: usize,
        /// Column, from 1.
        column: usize,
        /// What.
        message: String,
    },
}

/// Reads `text` (JSON when it starts with `{`, else YAML) as a JSON value.
///
/// # Errors
/// [`PodFileError`].
pub fn read(text: &str) -> Result<Value, PodFileError> {
    if text.len() > MAX_LEN {
        return Err(PodFileError::TooLarge);
    }
    if text.trim_start().starts_with('{') {
        return Ok(super::json::parse(text.as_bytes())?);
    }
    let mut events = Parser::new_from_str(text).map(|item| {
        item.map_err(|e| PodFileError::Yaml {
            line: e.marker().line(),
            column: e.marker().col() + 1,
            message: e.info().to_owned(),
        })
    });
    let mut root = None;
    while let Some(item) = events.next() {
        let (event, span) = item?;
        match event {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart(_) if root.is_some() => {
                return Err(at(&span, "only one YAML document is allowed"));
            }
            Event::DocumentStart(_) => {}
            other => root = Some(node(other, &span, &mut events, 0)?),
        }
    }
    Ok(root.unwrap_or(Value::Null))
}

fn at(span: &Span, message: &str) -> PodFileError {
    PodFileError::Yaml {
        line: span.start.line(),
        column: span.start.col() + 1,
        message: message.to_owned(),
    }
}

fn next<'a>(
    events: &mut impl Iterator<Item = Result<(Event<'a>, Span), PodFileError>>,
    span: &Span,
) -> Result<(Event<'a>, Span), PodFileError> {
    events
        .next()
        .unwrap_or_else(|| Err(at(span, "unexpected end of document")))
}

fn node<'a>(
    event: Event<'a>,
    span: &Span,
    events: &mut impl Iterator<Item = Result<(Event<'a>, Span), PodFileError>>,
    depth: usize,
) -> Result<Value, PodFileError> {
    if depth > super::json::MAX_DEPTH {
        return Err(at(span, "nested too deeply"));
    }
    let plain = |anchor: usize, tagged: bool| {
        if anchor != 0 || tagged {
            return Err(at(span, "anchors, aliases and tags are not supported"));
        }
        Ok(())
    };
    match event {
        Event::Scalar(text, style, anchor, tag) => {
            plain(anchor, tag.is_some())?;
            if matches!(style, ScalarStyle::Plain) {
                core_schema(&text).ok_or_else(|| at(span, "not a JSON value (.inf, .nan)"))
            } else {
                Ok(Value::String(text.into_owned()))
            }
        }
        Event::SequenceStart(anchor, tag) => {
            plain(anchor, tag.is_some())?;
            let mut items = Vec::new();
            loop {
                let (event, item_span) = next(events, span)?;
                if matches!(event, Event::SequenceEnd) {
                    return Ok(Value::Array(items));
                }
                items.push(node(event, &item_span, events, depth + 1)?);
            }
        }
        Event::MappingStart(anchor, tag) => {
            plain(anchor, tag.is_some())?;
            let mut map = Map::new();
            loop {
                let (event, key_span) = next(events, span)?;
                let key = match event {
                    Event::MappingEnd => return Ok(Value::Object(map)),
                    Event::Scalar(text, _, 0, None) => text.into_owned(),
                    _ => return Err(at(&key_span, "mapping keys must be plain text")),
                };
                let (event, value_span) = next(events, &key_span)?;
                let value = node(event, &value_span, events, depth + 1)?;
                if map.insert(key.clone(), value).is_some() {
                    return Err(at(&key_span, &format!("duplicate key {key:?}")));
                }
            }
        }
        _ => Err(at(span, "anchors, aliases and tags are not supported")),
    }
}

/// A plain scalar by the YAML 1.2 core schema: null, bool, int, float,
/// else text. `None` for values JSON cannot hold.
fn core_schema(text: &str) -> Option<Value> {
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Some(Value::Null),
        "true" | "True" | "TRUE" => return Some(Value::Bool(true)),
        "false" | "False" | "FALSE" => return Some(Value::Bool(false)),
        _ => {}
    }
    let unsigned = text.strip_prefix(['-', '+']).unwrap_or(text);
    if !unsigned.is_empty()
        && unsigned.chars().all(|c| c.is_ascii_digit())
        && let Ok(n) = text.parse::<i64>()
    {
        return Some(Value::from(n));
    }
    let radix = |prefix: &str, radix: u32| {
        text.strip_prefix(prefix)
            .and_then(|digits| i64::from_str_radix(digits, radix).ok())
    };
    if let Some(n) = radix("0x", 16).or_else(|| radix("0o", 8)) {
        return Some(Value::from(n));
    }
    let lower = unsigned.to_ascii_lowercase();
    if matches!(lower.as_str(), ".inf" | ".nan") {
        return None;
    }
    let float_like = unsigned.chars().any(|c| c.is_ascii_digit())
        && unsigned
            .chars()
            .all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '+' | '-'));
    if float_like && let Some(n) = text.parse::<f64>().ok().and_then(Number::from_f64) {
        return Some(Value::Number(n));
    }
    Some(Value::String(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_scalars_are_typed_and_quoted_ones_are_text() {
        let pod = read("a: 8080\nb: \"8080\"\nc: true\nd: ~\ne: 1.5\nf: 10m\ng: '1'\n").unwrap();
        assert_eq!(
            pod,
            serde_json::json!({"a": 8080, "b": "8080", "c": true, "d": null, "e": 1.5, "f": "10m", "g": "1"})
        );
    }

    #[test]
    fn anchors_duplicates_and_second_documents_are_refused() {
        assert!(read("a: &x 1\nb: *x\n").is_err());
        assert!(
            read("a: 1\na: 2\n")
                .unwrap_err()
                .to_string()
                .contains("duplicate key")
        );
        assert!(read("a: 1\n---\nb: 2\n").is_err());
        assert!(read("a: !!str 1\n").is_err());
    }

    #[test]
    fn json_is_read_strictly() {
        assert_eq!(read(" {\"a\": [1]}").unwrap()["a"][0], 1);
        assert!(read("{\"a\": 1, \"a\": 2}").is_err());
    }
}
