//! Applies the injector's own patch (RFC 6902 `add` operations only) to a
//! pod, for `tally injector --print-pod`. The webhook never applies its
//! patch; the API server does.

use serde_json::Value;

/// Why a patch did not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// An operation other than `add`, or one without `path`/`value`.
    #[error("operation {index} is not an add with a path and a value")]
    NotAdd {
        /// Which operation, from 0.
        index: usize,
    },
    /// The path does not lead to a place where a value can be added.
    #[error("operation {index}: no place for {path}")]
    NoPlace {
        /// Which operation.
        index: usize,
        /// Its path.
        path: String,
    },
}

fn unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// Applies `ops` to `doc` in order.
///
/// # Errors
/// [`ApplyError`]; `doc` may then be partly patched.
pub fn apply(doc: &mut Value, ops: &[Value]) -> Result<(), ApplyError> {
    for (index, op) in ops.iter().enumerate() {
        let (Some("add"), Some(path), Some(value)) = (
            op.get("op").and_then(Value::as_str),
            op.get("path").and_then(Value::as_str),
            op.get("value"),
        ) else {
            return Err(ApplyError::NotAdd { index });
        };
        let no_place = || ApplyError::NoPlace {
            index,
            path: path.to_owned(),
        };
        let mut segments: Vec<String> = path.split('/').skip(1).map(unescape).collect();
        let last = segments.pop().ok_or_else(no_place)?;
        let mut at = &mut *doc;
        for segment in &segments {
            at = match at {
                Value::Object(map) => map.get_mut(segment),
                Value::Array(items) => segment.parse::<usize>().ok().and_then(|i| items.get_mut(i)),
                _ => None,
            }
            .ok_or_else(no_place)?;
        }
        match at {
            Value::Object(map) => {
                map.insert(last, value.clone());
            }
            Value::Array(items) if last == "-" => items.push(value.clone()),
            Value::Array(items) => {
                let i = last
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= items.len())
                    .ok_or_else(no_place)?;
                items.insert(i, value.clone());
            }
            _ => return Err(no_place()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn adds_go_into_objects_and_lists_and_escaped_keys_are_read_back() {
        let mut doc = json!({"a": {"x~y/z": 1}, "l": [1, 3]});
        let ops = [
            json!({"op": "add", "path": "/a/tally.dev~1injected", "value": "0.1.0"}),
            json!({"op": "add", "path": "/l/1", "value": 2}),
            json!({"op": "add", "path": "/l/-", "value": 4}),
        ];
        apply(&mut doc, &ops).unwrap();
        assert_eq!(
            doc,
            json!({"a": {"x~y/z": 1, "tally.dev/injected": "0.1.0"}, "l": [1, 2, 3, 4]})
        );
        let bad = [json!({"op": "add", "path": "/l/9", "value": 0})];
        assert!(apply(&mut doc, &bad).is_err());
        let remove = [json!({"op": "remove", "path": "/a"})];
        assert_eq!(
            apply(&mut doc, &remove),
            Err(ApplyError::NotAdd { index: 0 })
        );
    }
}
