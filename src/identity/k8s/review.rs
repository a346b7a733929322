//! The TokenReview wire format (`authentication.k8s.io/v1`): the request
//! the broker POSTs to `/apis/authentication.k8s.io/v1/tokenreviews`, and
//! the judgement of the answer against the account the token was
//! verified as. The API server knows what a signature cannot say: that
//! the pod a bound token names still exists (a deleted pod's token stops
//! authenticating).
//!
//! Pure: the answer's bytes in, a typed result out. The token goes only
//! into the request body; no error here carries it.

use super::ServiceAccount;
use crate::jose::json;
use serde_json::{Value, json};

/// The API path of TokenReview.
pub const PATH: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// Largest answer accepted (real ones are about 1 KiB).
pub const MAX_ANSWER_LEN: usize = 64 * 1024;
/// The `extra` key the API server puts a bound token's pod UID under.
pub const POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Why a TokenReview did not confirm the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReviewError {
    /// The answer is not a TokenReview.
    #[error("the TokenReview answer is not usable: {0}")]
    Malformed(&'static str),
    /// `status.authenticated` is not true: the token is no longer valid
    /// (its pod or ServiceAccount deleted, or it was never valid).
    #[error(
        "the API server does not authenticate this ServiceAccount token (its pod or ServiceAccount may be gone)"
    )]
    NotAuthenticated,
    /// The API server names another user than the token's subject.
    #[error("the API server authenticates the token as {found:?}, not {expected:?}")]
    Username {
        /// From the token.
        expected: String,
        /// From the review (cut to 200 characters).
        found: String,
    },
    /// The reviewed audiences leave out the broker's.
    #[error("the API server did not confirm the audience {expected:?}")]
    Audience {
        /// The broker's audience.
        expected: String,
    },
    /// The token names a pod, and the API server names another (or none).
    #[error("the API server names pod uid {found:?}, not the token's {expected:?}")]
    PodUid {
        /// From the token.
        expected: String,
        /// From the review (`None`: it names no pod).
        found: Option<String>,
    },
}

/// The TokenReview to POST for `token`, reviewed for `audience`.
pub fn request(token: &str, audience: &str) -> Vec<u8> {
    json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [audience]},
    })
    .to_string()
    .into_bytes()
}

/// Judges the API server's `answer` for a token verified as `account`,
/// reviewed for `audience`.
///
/// # Errors
/// [`ReviewError`], one variant per failed check.
pub fn judge(answer: &[u8], account: &ServiceAccount, audience: &str) -> Result<(), ReviewError> {
    if answer.len() > MAX_ANSWER_LEN {
        return Err(ReviewError::Malformed("larger than 64 KiB"));
    }
    let doc =
        json::parse_object(answer).map_err(|_| ReviewError::Malformed("not a JSON object"))?;
    if doc.get("kind").and_then(Value::as_str) != Some("TokenReview") {
        return Err(ReviewError::Malformed("kind is not TokenReview"));
    }
    let status = doc
        .get("status")
        .and_then(Value::as_object)
        .ok_or(ReviewError::Malformed("no status"))?;
    if status.get("authenticated").and_then(Value::as_bool) != Some(true) {
        return Err(ReviewError::NotAuthenticated);
    }
    let user = status
        .get("user")
        .and_then(Value::as_object)
        .ok_or(ReviewError::Malformed("no status.user"))?;
    let expected = account.username();
    let found = user.get("username").and_then(Value::as_str).unwrap_or("");
    if found != expected {
        return Err(ReviewError::Username {
            expected,
            found: found.chars().take(200).collect(),
        });
    }
    // Asked with spec.audiences, the API server answers with the ones the
    // token is valid for: ours must be among them.
    let audiences = status.get("audiences").and_then(Value::as_array);
    if !audiences.is_some_and(|a| a.iter().any(|a| a.as_str() == Some(audience))) {
        return Err(ReviewError::Audience {
            expected: audience.to_owned(),
        });
    }
    if let Some(pod) = &account.pod {
        let uids = user
            .get("extra")
            .and_then(|e| e.get(POD_UID))
            .and_then(Value::as_array);
        let found = match uids.map(Vec::as_slice) {
            Some([Value::String(uid)]) => Some(uid.as_str()),
            _ => None,
        };
        if found != Some(pod.uid.as_str()) {
            return Err(ReviewError::PodUid {
                expected: pod.uid.clone(),
                found: found.map(|f| f.chars().take(64).collect()),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::Pod;
    use super::*;

    fn account() -> ServiceAccount {
        ServiceAccount {
            namespace: "shop".into(),
            name: "checkout".into(),
            pod: Some(Pod {
                name: "checkout-1".into(),
                uid: "u-1".into(),
            }),
            node: None,
        }
    }

    fn answer(authenticated: bool, user: &str, uid: &str, aud: &str) -> Vec<u8> {
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "status": {"authenticated": authenticated, "audiences": [aud],
                "user": {"username": user, "extra": {POD_UID: [uid]}}}})
        .to_string()
        .into_bytes()
    }

    #[test]
    fn a_review_confirms_only_the_same_account_pod_and_audience() {
        let me = "system:serviceaccount:shop:checkout";
        assert_eq!(
            judge(&answer(true, me, "u-1", "a"), &account(), "a"),
            Ok(())
        );
        assert_eq!(
            judge(&answer(false, me, "u-1", "a"), &account(), "a"),
            Err(ReviewError::NotAuthenticated)
        );
        assert!(matches!(
            judge(
                &answer(true, "system:serviceaccount:shop:other", "u-1", "a"),
                &account(),
                "a"
            ),
            Err(ReviewError::Username { .. })
        ));
        assert!(matches!(
            judge(&answer(true, me, "u-2", "a"), &account(), "a"),
            Err(ReviewError::PodUid { .. })
        ));
        assert!(matches!(
            judge(&answer(true, me, "u-1", "b"), &account(), "a"),
            Err(ReviewError::Audience { .. })
        ));
        assert!(matches!(
            judge(b"[]", &account(), "a"),
            Err(ReviewError::Malformed(_))
        ));
        let body = String::from_utf8(request("tok.en.x", "a")).unwrap();
        assert!(
            body.contains("\"token\":\"tok.en.x\"") && body.contains("\"audiences\":[\"a\"]"),
            "{body}"
        );
    }
}
