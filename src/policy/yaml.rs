//! A small positioned YAML tree for configuration files: every node keeps
//! the line and column it starts at, so errors can point at the source.
//!
//! Deliberately limited, because policy is security-relevant input: one
//! document; scalars are kept as text (the caller decides what `5m` or
//! `50/s` mean); duplicate mapping keys, anchors, aliases and explicit tags
//! are refused; size and depth are capped.

use saphyr_parser::{Event, Parser, Span};
use std::fmt;

/// Largest document accepted, in bytes.
pub const MAX_LEN: usize = 1024 * 1024;
/// Deepest nesting accepted.
pub const MAX_DEPTH: usize = 32;

/// A position in the source: line from 1, column from 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Pos {
    /// Line, from 1.
    pub line: usize,
    /// Column, from 1.
    pub col: usize,
}

impl fmt::Display for Pos {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.col)
    }
}

fn pos(span: &Span) -> Pos {
    Pos {
        line: span.start.line(),
        col: span.start.col() + 1,
    }
}

/// A node and where it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Where the node starts.
    pub pos: Pos,
    /// Its content.
    pub value: Value,
}

/// Node content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// A scalar, as written (an empty or `~` plain scalar is `Null`).
    Str(String),
    /// `~`, `null` or nothing.
    Null,
    /// A sequence.
    Seq(Vec<Node>),
    /// A mapping, in source order: (key, key position, value).
    Map(Vec<(String, Pos, Node)>),
}

impl Node {
    /// A short name for the node's kind, for error messages.
    pub fn kind(&self) -> &'static str {
        match self.value {
            Value::Str(_) => "a scalar",
            Value::Null => "null",
            Value::Seq(_) => "a list",
            Value::Map(_) => "a mapping",
        }
    }
}

/// Why a document could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{pos}: {message}")]
pub struct YamlError {
    /// Where.
    pub pos: Pos,
    /// What.
    pub message: String,
}

fn err<T>(pos: Pos, message: impl Into<String>) -> Result<T, YamlError> {
    Err(YamlError {
        pos,
        message: message.into(),
    })
}

/// Parses one YAML document into a positioned tree.
///
/// # Errors
/// [`YamlError`] for a syntax error, more than one document, a duplicate
/// key, an anchor, alias or tag, a non-scalar key, or a document too large
/// or too deep.
pub fn parse(text: &str) -> Result<Node, YamlError> {
    if text.len() > MAX_LEN {
        return err(
            Pos::default(),
            format!("document is larger than {MAX_LEN} bytes"),
        );
    }
    let mut events = Parser::new_from_str(text).map(|item| {
        item.map_err(|e| YamlError {
            pos: Pos {
                line: e.marker().line(),
                col: e.marker().col() + 1,
            },
            message: e.info().to_owned(),
        })
    });
    let mut root = None;
    let mut documents = 0;
    while let Some(item) = events.next() {
        let (event, span) = item?;
        match event {
            Event::StreamStart | Event::DocumentEnd | Event::Nothing => {}
            Event::StreamEnd => break,
            Event::DocumentStart(_) => {
                documents += 1;
                if documents > 1 {
                    return err(pos(&span), "only one YAML document is allowed");
                }
            }
            other => root = Some(node(other, span, &mut events, 0)?),
        }
    }
    Ok(root.unwrap_or(Node {
        pos: Pos { line: 1, col: 1 },
        value: Value::Null,
    }))
}

fn node<'a>(
    event: Event<'a>,
    span: Span,
    events: &mut impl Iterator<Item = Result<(Event<'a>, Span), YamlError>>,
    depth: usize,
) -> Result<Node, YamlError> {
    let at = pos(&span);
    if depth > MAX_DEPTH {
        return err(at, format!("nesting deeper than {MAX_DEPTH} levels"));
    }
    let plain = |anchor: usize, tagged: bool| -> Result<(), YamlError> {
        if anchor != 0 {
            return err(at, "anchors and aliases are not supported");
        }
        if tagged {
            return err(at, "YAML tags are not supported");
        }
        Ok(())
    };
    let value = match event {
        Event::Alias(_) => return err(at, "anchors and aliases are not supported"),
        Event::Scalar(text, style, anchor, tag) => {
            plain(anchor, tag.is_some())?;
            let is_plain = matches!(style, saphyr_parser::ScalarStyle::Plain);
            if is_plain && matches!(text.as_ref(), "" | "~" | "null" | "Null" | "NULL") {
                Value::Null
            } else {
                Value::Str(text.into_owned())
            }
        }
        Event::SequenceStart(anchor, tag) => {
            plain(anchor, tag.is_some())?;
            let mut items = Vec::new();
            loop {
                let (event, span) = next(events, at)?;
                if matches!(event, Event::SequenceEnd) {
                    break;
                }
                items.push(node(event, span, events, depth + 1)?);
            }
            Value::Seq(items)
        }
        Event::MappingStart(anchor, tag) => {
            plain(anchor, tag.is_some())?;
            let mut entries: Vec<(String, Pos, Node)> = Vec::new();
            loop {
                let (event, span) = next(events, at)?;
                if matches!(event, Event::MappingEnd) {
                    break;
                }
                let key_pos = pos(&span);
                let key = match node(event, span, events, depth + 1)?.value {
                    Value::Str(k) => k,
                    _ => return err(key_pos, "mapping keys must be plain text"),
                };
                if let Some((_, first, _)) = entries.iter().find(|(k, _, _)| *k == key) {
                    return err(key_pos, format!("duplicate key {key:?} (first at {first})"));
                }
                let (event, span) = next(events, key_pos)?;
                let value = node(event, span, events, depth + 1)?;
                entries.push((key, key_pos, value));
            }
            Value::Map(entries)
        }
        _ => return err(at, "unexpected YAML event"),
    };
    Ok(Node { pos: at, value })
}

fn next<'a>(
    events: &mut impl Iterator<Item = Result<(Event<'a>, Span), YamlError>>,
    at: Pos,
) -> Result<(Event<'a>, Span), YamlError> {
    events
        .next()
        .unwrap_or_else(|| err(at, "unexpected end of document"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_carry_their_positions() {
        let doc = parse("a: 1\nb:\n  - x\n  - y: z\n").unwrap();
        let Value::Map(entries) = doc.value else {
            panic!()
        };
        assert_eq!(entries[0].0, "a");
        assert_eq!(entries[0].1, Pos { line: 1, col: 1 });
        assert_eq!(entries[0].2.pos, Pos { line: 1, col: 4 });
        let Value::Seq(items) = &entries[1].2.value else {
            panic!()
        };
        assert_eq!(items[1].pos.line, 4);
    }

    #[test]
    fn duplicate_keys_are_refused_with_both_positions() {
        let e = parse("a: 1\nb: 2\na: 3\n").unwrap_err();
        assert_eq!(e.pos.line, 3);
        assert!(e.message.contains("first at 1:1"), "{e}");
    }

    #[test]
    fn anchors_aliases_and_tags_are_refused() {
        assert!(
            parse("a: &x 1\nb: *x\n")
                .unwrap_err()
                .message
                .contains("anchors")
        );
        assert!(parse("a: !!str 1\n").unwrap_err().message.contains("tags"));
    }

    #[test]
    fn several_documents_are_refused() {
        assert!(
            parse("a: 1\n---\nb: 2\n")
                .unwrap_err()
                .message
                .contains("one YAML document")
        );
    }

    #[test]
    fn syntax_errors_have_positions() {
        // The unclosed flow sequence runs into line 2, where `b:` cannot be.
        let e = parse("a: [1, 2\nb: 3\n").unwrap_err();
        assert_eq!((e.pos.line, e.pos.col), (2, 2), "{e:?}");
        assert_eq!(e.message, "illegal placement of ':' indicator");
    }

    #[test]
    fn deep_nesting_is_refused() {
        let text = "[".repeat(100) + &"]".repeat(100);
        assert!(parse(&text).unwrap_err().message.contains("nesting"));
    }

    #[test]
    fn nulls_and_quoted_nulls_differ() {
        let doc = parse("a: ~\nb: \"~\"\nc:\n").unwrap();
        let Value::Map(e) = doc.value else { panic!() };
        assert_eq!(e[0].2.value, Value::Null);
        assert_eq!(e[1].2.value, Value::Str("~".into()));
        assert_eq!(e[2].2.value, Value::Null);
    }
}
