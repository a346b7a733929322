//! Which request paths an access rule may judge.
//!
//! Rules match the normalized path (RFC 3986: percent-encodings
//! upper-cased, unreserved characters decoded, dot segments removed), and
//! the app receives exactly that path. That is only safe if the app
//! routes the path the rules saw. An app (or its framework) that decodes
//! the path once more before routing would see a different path when a
//! segment still holds, after one decoding:
//!
//! - a `/` (`%2F`): `/public/..%2Fadmin` becomes `/public/../admin`;
//! - a `\` (`%5C`), which some servers treat as `/`;
//! - a NUL or other control byte (`%00`), where C strings and some
//!   routers stop;
//! - another percent-encoding (`%252e` decodes to `%2e`, a second decoding
//!   to `.`): double encoding;
//! - bytes that are not UTF-8 (`%C0%AE`, an overlong `.` in lax
//!   decoders);
//! - a dot segment with path parameters (`..;/`, `.;x`), which servlet
//!   containers treat as `..` and `.`.
//!
//! Such a path is refused (400) before any rule sees it; every other path
//! is judged and forwarded in its normalized form. The rule is the same
//! at every front end that judges a path.

/// Why a request path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PathError {
    /// `%2F` in a segment.
    #[error("the path holds an encoded '/' (%2F)")]
    EncodedSlash,
    /// `\` or `%5C`.
    #[error("the path holds a backslash")]
    Backslash,
    /// `%00`–`%1F` or `%7F`.
    #[error("the path holds an encoded control character")]
    ControlByte,
    /// `%25` followed by two hex digits: an encoding of an encoding.
    #[error("the path is percent-encoded twice (%25 followed by hex digits)")]
    DoubleEncoding,
    /// A segment that decodes to bytes that are not UTF-8.
    #[error("the path decodes to bytes that are not UTF-8")]
    NotUtf8,
    /// `..;x` or `.;x`.
    #[error("the path has a dot segment with parameters ('..;' or '.;')")]
    DotSegmentParameter,
    /// `%` not followed by two hex digits.
    #[error("the path has a malformed percent-encoding")]
    PercentEncoding,
}

/// Checks a normalized request path (see the module docs).
///
/// # Errors
/// The first [`PathError`] found.
pub fn check_routable(path: &str) -> Result<(), PathError> {
    if path.contains('\\') {
        return Err(PathError::Backslash);
    }
    for segment in path.split('/') {
        let decoded = decode_segment(segment)?;
        for (i, &b) in decoded.iter().enumerate() {
            match b {
                b'/' => return Err(PathError::EncodedSlash),
                b'\\' => return Err(PathError::Backslash),
                0x00..=0x1f | 0x7f => return Err(PathError::ControlByte),
                b'%' if decoded
                    .get(i + 1..i + 3)
                    .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
                {
                    return Err(PathError::DoubleEncoding);
                }
                _ => {}
            }
        }
        if std::str::from_utf8(&decoded).is_err() {
            return Err(PathError::NotUtf8);
        }
        if let Some(semicolon) = decoded.iter().position(|&b| b == b';')
            && matches!(&decoded[..semicolon], b"." | b"..")
        {
            return Err(PathError::DotSegmentParameter);
        }
    }
    Ok(())
}

/// The bytes of one segment with every percent-encoding decoded once.
fn decode_segment(segment: &str) -> Result<Vec<u8>, PathError> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let value = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or(PathError::PercentEncoding)?;
            out.push(value);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dpop::NormalizedUri;

    /// The path a front end judges: the request URL normalized, then
    /// checked.
    fn judged(raw: &str) -> Result<String, String> {
        let uri = NormalizedUri::parse(&format!("http://app{raw}")).map_err(|e| e.to_string())?;
        check_routable(uri.path()).map_err(|e| e.to_string())?;
        Ok(uri.path().to_owned())
    }

    #[test]
    fn every_encoded_delimiter_variant_is_refused() {
        for (raw, want) in [
            ("/public/..%2Fadmin/secret", PathError::EncodedSlash),
            ("/public/..%2fadmin/secret", PathError::EncodedSlash),
            ("/public/%2E%2E%2Fadmin/secret", PathError::EncodedSlash),
            ("/public/%2e%2e%2fadmin", PathError::EncodedSlash),
            ("/public/..%5Cadmin", PathError::Backslash),
            ("/public/..%5cadmin", PathError::Backslash),
            ("/public/..;/admin/secret", PathError::DotSegmentParameter),
            ("/public/.;/admin", PathError::DotSegmentParameter),
            ("/public/%2e%2e;x/admin", PathError::DotSegmentParameter),
            ("/public/..%3B/admin", PathError::DotSegmentParameter),
            ("/public/%252e%252e/admin", PathError::DoubleEncoding),
            ("/public/%252F", PathError::DoubleEncoding),
            ("/public/x%00.json", PathError::ControlByte),
            ("/public/x%0A", PathError::ControlByte),
            ("/public/x%7f", PathError::ControlByte),
            ("/public/%C0%AE%C0%AE/admin", PathError::NotUtf8),
            ("/public/%FF", PathError::NotUtf8),
        ] {
            let uri = NormalizedUri::parse(&format!("http://app{raw}")).unwrap();
            assert_eq!(check_routable(uri.path()), Err(want), "{raw}");
        }
        // A literal backslash never gets this far: the URL is refused.
        assert!(judged("/public/..\\admin").is_err());
    }

    #[test]
    fn ordinary_paths_are_judged_in_their_normalized_form() {
        for (raw, want) in [
            ("/v1/charges", "/v1/charges"),
            ("/v1/charges/../refunds", "/v1/refunds"),
            ("/v1/%2E%2E/admin", "/admin"),
            ("/v1/%7Euser/a%20b", "/v1/~user/a%20b"),
            ("/files/100%25", "/files/100%25"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/matrix;a=1/x", "/matrix;a=1/x"),
            ("/a/..b/.c", "/a/..b/.c"),
            ("", "/"),
        ] {
            assert_eq!(judged(raw).as_deref(), Ok(want), "{raw}");
        }
    }

    #[test]
    fn a_malformed_encoding_is_refused() {
        assert_eq!(check_routable("/a%2"), Err(PathError::PercentEncoding));
        assert_eq!(check_routable("/a%zz"), Err(PathError::PercentEncoding));
    }

    proptest::proptest! {
        /// Whatever passes decodes, once, to a path with the same segments:
        /// no decoding step can make a new `/`, `\`, NUL or dot segment.
        #[test]
        fn a_routable_path_has_the_same_segments_after_one_more_decoding(
            segments in proptest::collection::vec("([a-z.;]|%[0-9A-F]{2}){0,6}", 0..5)
        ) {
            let raw = format!("/{}", segments.join("/"));
            let Ok(uri) = NormalizedUri::parse(&format!("http://app{raw}")) else {
                return Ok(());
            };
            let path = uri.path();
            if check_routable(path).is_ok() {
                let decoded: Vec<Vec<u8>> = path
                    .split('/')
                    .map(|s| decode_segment(s).unwrap())
                    .collect();
                for segment in &decoded {
                    proptest::prop_assert!(!segment.contains(&b'/'));
                    proptest::prop_assert!(!segment.contains(&b'\\'));
                    proptest::prop_assert!(!segment.contains(&0));
                    let head = segment.split(|&b| b == b';').next().unwrap();
                    let dot = head == b"." || head == b"..";
                    proptest::prop_assert!(!dot || !segment.contains(&b';'));
                }
                // And a dot segment left after decoding would have been
                // removed by normalization already (they are unreserved).
                for segment in decoded.iter().skip(1) {
                    proptest::prop_assert!(segment != b"." && segment != b"..", "{path}");
                }
            }
        }
    }
}
