//! AdmissionReview `admission.k8s.io/v1`: the request the API server sends
//! (read strictly, size first) and the response the webhook returns.
//! Pure: bytes in, typed values or a typed error out.

use base64::Engine as _;
use serde_json::{Value, json};

/// Largest review body read (the API server's own request limit is 3 MiB,
/// but a pod's review is a few KiB; the rest is an attack or a mistake).
pub const MAX_REVIEW_BYTES: usize = 1024 * 1024;

/// The only API version spoken.
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// Longest request `uid` echoed (the API server sends a UUID).
const MAX_UID: usize = 128;

/// Why a body is not an AdmissionReview the webhook can answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// Larger than [`MAX_REVIEW_BYTES`].
    #[error("the review is {len} bytes, more than the {limit} accepted")]
    TooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// Not strict JSON.
    #[error(transparent)]
    Json(#[from] super::json::JsonError),
    /// JSON, but not an object.
    #[error("the review must be a JSON object")]
    NotAnObject,
    /// `apiVersion` or `kind` is not `admission.k8s.io/v1` `AdmissionReview`.
    #[error(
        "expected apiVersion {API_VERSION} kind AdmissionReview, found {api_version:?} {kind:?}"
    )]
    WrongType {
        /// `apiVersion` as sent.
        api_version: String,
        /// `kind` as sent.
        kind: String,
    },
    /// No `request` object.
    #[error("the review has no request")]
    NoRequest,
    /// A field is missing or of the wrong type.
    #[error("request.{field}: {problem}")]
    Field {
        /// The field, under `request`.
        field: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

/// What the API server asks about.
#[derive(Debug, Clone, PartialEq)]
pub struct AdmissionRequest {
    /// Echoed in the response.
    pub uid: String,
    /// `request.kind`: group (empty for core), version, kind.
    pub kind: (String, String, String),
    /// `CREATE`, `UPDATE`, `DELETE` or `CONNECT`.
    pub operation: String,
    /// The namespace of the object (the pod's own `metadata.namespace`
    /// may be absent at admission).
    pub namespace: Option<String>,
    /// The object's name, when it has one yet.
    pub name: Option<String>,
    /// The object as sent.
    pub object: Option<Value>,
}

impl AdmissionRequest {
    /// Whether this asks about creating a core `v1` Pod.
    pub fn is_pod_create(&self) -> bool {
        self.kind.0.is_empty() && self.kind.2 == "Pod" && self.operation == "CREATE"
    }
}

/// Reads an AdmissionReview, refusing a body over the size cap before
/// parsing it.
///
/// # Errors
/// [`ReviewError`].
pub fn parse(body: &[u8]) -> Result<AdmissionRequest, ReviewError> {
    if body.len() > MAX_REVIEW_BYTES {
        return Err(ReviewError::TooLarge {
            len: body.len(),
            limit: MAX_REVIEW_BYTES,
        });
    }
    let mut review = match super::json::parse(body)? {
        Value::Object(map) => map,
        _ => return Err(ReviewError::NotAnObject),
    };
    let text = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_owned();
    let (api_version, kind) = (text(review.get("apiVersion")), text(review.get("kind")));
    if api_version != API_VERSION || kind != "AdmissionReview" {
        return Err(ReviewError::WrongType { api_version, kind });
    }
    let Some(Value::Object(mut request)) = review.remove("request") else {
        return Err(ReviewError::NoRequest);
    };
    let field = |field, problem| ReviewError::Field { field, problem };
    let uid = match request.get("uid") {
        Some(Value::String(uid)) if !uid.is_empty() && uid.len() <= MAX_UID => {
            if uid.chars().any(char::is_control) {
                return Err(field("uid", "must be printable text"));
            }
            uid.clone()
        }
        Some(Value::String(_)) => return Err(field("uid", "must be 1 to 128 characters")),
        Some(_) => return Err(field("uid", "must be text")),
        None => return Err(field("uid", "is required")),
    };
    let kind = match request.get("kind") {
        Some(Value::Object(k)) => {
            let part = |name: &str| k.get(name).and_then(Value::as_str).map(str::to_owned);
            match (part("group"), part("version"), part("kind")) {
                (group, Some(version), Some(kind)) => (group.unwrap_or_default(), version, kind),
                _ => return Err(field("kind", "must have version and kind")),
            }
        }
        _ => return Err(field("kind", "is required (group, version, kind)")),
    };
    let operation = match request.get("operation") {
        Some(Value::String(op)) => op.clone(),
        _ => return Err(field("operation", "is required")),
    };
    let optional = |name: &'static str| match request.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(field(name, "must be text")),
    };
    let namespace = optional("namespace")?.filter(|n| !n.is_empty());
    let name = optional("name")?.filter(|n| !n.is_empty());
    let object = match request.remove("object") {
        None | Some(Value::Null) => None,
        Some(object @ Value::Object(_)) => Some(object),
        Some(_) => return Err(field("object", "must be an object")),
    };
    Ok(AdmissionRequest {
        uid,
        kind,
        operation,
        namespace,
        name,
        object,
    })
}

/// The AdmissionReview answer: always `allowed: true` (the webhook never
/// stops a pod), with the patch when there is one and the warnings.
pub fn response(uid: &str, patch: &[Value], warnings: &[String]) -> Value {
    let mut response = json!({ "uid": uid, "allowed": true });
    if !patch.is_empty() {
        let bytes = serde_json::to_vec(patch).unwrap_or_default();
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    if !warnings.is_empty() {
        response["warnings"] = json!(warnings.iter().map(|w| warning(w)).collect::<Vec<_>>());
    }
    json!({ "apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response })
}

/// Longest warning: the API server may cut longer ones.
pub const MAX_WARNING: usize = 256;

/// `text` as a warning the API server passes on: prefixed so the user
/// knows who speaks, printable, at most [`MAX_WARNING`] bytes.
pub fn warning(text: &str) -> String {
    let mut out = String::from("tally injector: ");
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_WARNING {
            break;
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(request: &Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": API_VERSION, "kind": "AdmissionReview", "request": request
        }))
        .unwrap()
    }

    #[test]
    fn a_pod_create_review_is_read_with_its_uid_and_namespace() {
        let body = review(&json!({
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": "CREATE", "namespace": "shop",
            "object": {"metadata": {"generateName": "web-"}}
        }));
        let r = parse(&body).unwrap();
        assert_eq!(r.uid, "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert!(r.is_pod_create());
        assert_eq!(r.namespace.as_deref(), Some("shop"));
        assert_eq!(r.name, None);
    }

    #[test]
    fn reviews_without_what_the_answer_needs_are_refused_by_name() {
        let no_uid =
            review(&json!({"kind": {"version": "v1", "kind": "Pod"}, "operation": "CREATE"}));
        assert_eq!(
            parse(&no_uid).unwrap_err().to_string(),
            "request.uid: is required"
        );
        let bad = br#"{"apiVersion":"admission.k8s.io/v1beta1","kind":"AdmissionReview"}"#;
        assert!(matches!(parse(bad), Err(ReviewError::WrongType { .. })));
        let none = br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#;
        assert_eq!(parse(none), Err(ReviewError::NoRequest));
        let control = review(
            &json!({"uid": "a\nb", "kind": {"version": "v1", "kind": "Pod"}, "operation": "CREATE"}),
        );
        assert!(
            parse(&control)
                .unwrap_err()
                .to_string()
                .contains("printable")
        );
    }

    #[test]
    fn the_size_cap_comes_before_parsing() {
        let big = vec![b' '; MAX_REVIEW_BYTES + 1];
        assert!(matches!(parse(&big), Err(ReviewError::TooLarge { .. })));
    }

    #[test]
    fn an_empty_patch_sends_no_patch_type_and_warnings_are_bounded() {
        let r = response("u", &[], &["x\u{7}y".repeat(200)]);
        assert_eq!(r["response"]["allowed"], true);
        assert!(r["response"].get("patchType").is_none());
        let w = r["response"]["warnings"][0].as_str().unwrap();
        assert!(
            w.len() <= MAX_WARNING && w.starts_with("tally injector: x y"),
            "{w}"
        );
    }
}
