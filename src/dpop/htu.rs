//! The `htu` comparison of RFC 9449 §4.3: both the claim and the request
//! URI are reduced to `scheme://host[:port]/path` with RFC 3986 §6.2.2
//! (syntax-based) and §6.2.3 (scheme-based) normalization, after dropping
//! the query and fragment.
//!
//! Only absolute `http` and `https` URIs are accepted. User info is refused
//! (it has no place in an HTTP request target and only hides the real
//! host), as are non-ASCII text, spaces and control characters.

use std::fmt;

/// Longest URI accepted, in bytes.
pub const MAX_URI_LEN: usize = 4096;

/// Why a string is not an acceptable HTTP(S) URI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UriError {
    /// Longer than [`MAX_URI_LEN`].
    #[error("URI is longer than {MAX_URI_LEN} bytes")]
    TooLong,
    /// Not `http://` or `https://` (any case).
    #[error("URI scheme must be http or https")]
    Scheme,
    /// `user@host`.
    #[error("URI must not contain user info")]
    UserInfo,
    /// Empty or malformed host.
    #[error("URI host is empty or malformed")]
    Host,
    /// A port that is not a number from 0 to 65535.
    #[error("URI port is not a number from 0 to 65535")]
    Port,
    /// A character that may not appear in a URI path.
    #[error("URI path holds a character that must be percent-encoded")]
    PathChar,
    /// `%` not followed by two hex digits.
    #[error("URI has a malformed percent-encoding")]
    PercentEncoding,
}

/// A normalized `scheme://authority/path` with no query or fragment.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct NormalizedUri(String);

impl NormalizedUri {
    /// Normalizes `uri`, dropping its query and fragment.
    ///
    /// # Errors
    /// [`UriError`] for anything but a well-formed absolute HTTP(S) URI.
    pub fn parse(uri: &str) -> Result<Self, UriError> {
        if uri.len() > MAX_URI_LEN {
            return Err(UriError::TooLong);
        }
        let without_fragment = uri.split('#').next().unwrap_or_default();
        let target = without_fragment.split('?').next().unwrap_or_default();

        let (scheme, rest) = target.split_once("://").ok_or(UriError::Scheme)?;
        let (scheme, default_port) = if scheme.eq_ignore_ascii_case("https") {
            ("https", 443)
        } else if scheme.eq_ignore_ascii_case("http") {
            ("http", 80)
        } else {
            return Err(UriError::Scheme);
        };
        let authority_len = rest.find('/').unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_len);
        if authority.contains('@') {
            return Err(UriError::UserInfo);
        }
        let (host, port) = split_host_port(authority)?;

        let mut out = String::with_capacity(target.len() + 1);
        out.push_str(scheme);
        out.push_str("://");
        push_host(host, &mut out)?;
        if let Some(port) = port
            && port != default_port
        {
            out.push(':');
            out.push_str(&port.to_string());
        }
        let path = normalize_percent(path)?;
        out.push_str(&remove_dot_segments(&path));
        Ok(Self(out))
    }

    /// The normalized text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The normalized path (`/` when empty): percent-encoding normalized
    /// and dot segments removed, what access rules are matched against.
    pub fn path(&self) -> &str {
        let rest = self.0.split_once("://").map_or("", |(_, rest)| rest);
        match rest.find('/') {
            Some(i) => &rest[i..],
            None => "/",
        }
    }
}

impl fmt::Display for NormalizedUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for NormalizedUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NormalizedUri({})", self.0)
    }
}

/// Strips query and fragment without normalizing: what a client puts in
/// `htu` (RFC 9449 §4.2).
pub fn strip_query_and_fragment(uri: &str) -> &str {
    let end = uri.find(['?', '#']).unwrap_or(uri.len());
    &uri[..end]
}

fn split_host_port(authority: &str) -> Result<(&str, Option<u16>), UriError> {
    let (host, port) = if authority.starts_with('[') {
        let close = authority.find(']').ok_or(UriError::Host)?;
        let (host, after) = authority.split_at(close + 1);
        match after {
            "" => (host, None),
            _ => (host, Some(after.strip_prefix(':').ok_or(UriError::Host)?)),
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    let port = match port {
        // "host:" means the default port (RFC 3986 §6.2.3).
        None | Some("") => None,
        Some(p) if p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()) => {
            Some(p.parse::<u16>().map_err(|_| UriError::Port)?)
        }
        Some(_) => return Err(UriError::Port),
    };
    Ok((host, port))
}

fn push_host(host: &str, out: &mut String) -> Result<(), UriError> {
    if host.is_empty() {
        return Err(UriError::Host);
    }
    let ok = if let Some(inner) = host.strip_prefix('[') {
        let inner = inner.strip_suffix(']').ok_or(UriError::Host)?;
        !inner.is_empty()
            && inner
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    } else {
        host.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    };
    if !ok {
        return Err(UriError::Host);
    }
    out.extend(host.chars().map(|c| c.to_ascii_lowercase()));
    Ok(())
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Characters a path may hold literally (RFC 3986 `pchar` minus
/// pct-encoded, plus `/`).
fn is_path_char(b: u8) -> bool {
    is_unreserved(b)
        || matches!(
            b,
            b'!' | b'$'
                | b'&'
                | b'\''
                | b'('
                | b')'
                | b'*'
                | b'+'
                | b','
                | b';'
                | b'='
                | b':'
                | b'@'
                | b'/'
        )
}

/// Upper-cases percent-encodings and decodes those of unreserved
/// characters (RFC 3986 §6.2.2.1 and §6.2.2.2).
fn normalize_percent(path: &str) -> Result<String, UriError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(UriError::PercentEncoding)?;
            let value = hex_value(hex[0])
                .zip(hex_value(hex[1]))
                .map(|(h, l)| h << 4 | l)
                .ok_or(UriError::PercentEncoding)?;
            if is_unreserved(value) {
                out.push(char::from(value));
            } else {
                out.push('%');
                out.push(char::from(hex[0].to_ascii_uppercase()));
                out.push(char::from(hex[1].to_ascii_uppercase()));
            }
            i += 3;
        } else if is_path_char(b) {
            out.push(char::from(b));
            i += 1;
        } else {
            return Err(UriError::PathChar);
        }
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    char::from(b).to_digit(16).map(|d| d as u8)
}

/// RFC 3986 §5.2.4, with an empty path becoming `/` (§6.2.3).
fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let mut input = path;
    while !input.is_empty() {
        if let Some(rest) = input.strip_prefix("../") {
            input = rest;
        } else if let Some(rest) = input.strip_prefix("./") {
            input = rest;
        } else if input.starts_with("/./") {
            input = &input[2..];
        } else if input == "/." {
            input = "/";
        } else if input.starts_with("/../") {
            input = &input[3..];
            output.pop();
        } else if input == "/.." {
            input = "/";
            output.pop();
        } else if input == "." || input == ".." {
            input = "";
        } else {
            let start = usize::from(input.starts_with('/'));
            let end = input[start..].find('/').map_or(input.len(), |i| i + start);
            output.push(&input[..end]);
            input = &input[end..];
        }
    }
    let joined = output.concat();
    if joined.is_empty() {
        "/".to_owned()
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn norm(s: &str) -> String {
        NormalizedUri::parse(s).unwrap().0
    }

    #[test]
    fn scheme_and_host_case_and_default_port_are_normalized() {
        assert_eq!(
            norm("HTTPS://Server.Example.COM:443/token"),
            "https://server.example.com/token"
        );
        assert_eq!(norm("http://a.example:80/x"), "http://a.example/x");
        assert_eq!(norm("http://a.example:/x"), "http://a.example/x");
        assert_eq!(norm("https://a.example:8443/x"), "https://a.example:8443/x");
        assert_eq!(norm("http://a.example:443/x"), "http://a.example:443/x");
    }

    #[test]
    fn the_path_is_the_normalized_one() {
        let path = |s: &str| NormalizedUri::parse(s).unwrap().path().to_owned();
        assert_eq!(path("http://a.example:8080/v1/charges?x=1"), "/v1/charges");
        assert_eq!(
            path("http://a.example/v1/x/../charges/%7e"),
            "/v1/charges/~"
        );
        assert_eq!(path("http://a.example"), "/");
        assert_eq!(path("http://[::1]:80/a/./b"), "/a/b");
    }

    #[test]
    fn empty_path_becomes_slash() {
        assert_eq!(norm("https://a.example"), "https://a.example/");
        assert_eq!(norm("https://a.example?q"), "https://a.example/");
    }

    #[test]
    fn query_and_fragment_are_dropped() {
        assert_eq!(norm("https://a.example/p?x=1#frag"), "https://a.example/p");
        assert_eq!(norm("https://a.example/p#frag?x"), "https://a.example/p");
    }

    #[test]
    fn path_case_is_preserved() {
        assert_eq!(
            norm("https://a.example/Path/To"),
            "https://a.example/Path/To"
        );
    }

    #[test]
    fn percent_encodings_are_normalized() {
        assert_eq!(norm("https://a.example/%7euser"), "https://a.example/~user");
        assert_eq!(norm("https://a.example/a%2fb"), "https://a.example/a%2Fb");
        assert_eq!(norm("https://a.example/%41"), "https://a.example/A");
    }

    #[test]
    fn dot_segments_are_removed() {
        assert_eq!(
            norm("https://a.example/a/b/../c/./d"),
            "https://a.example/a/c/d"
        );
        assert_eq!(norm("https://a.example/../../x"), "https://a.example/x");
        assert_eq!(norm("https://a.example/a/%2E%2E/b"), "https://a.example/b");
        assert_eq!(norm("https://a.example/a/.."), "https://a.example/");
    }

    #[test]
    fn ipv6_literals_keep_their_brackets_and_lose_case() {
        assert_eq!(norm("https://[::1]:443/x"), "https://[::1]/x");
        assert_eq!(norm("http://[FE80::1]:8080/x"), "http://[fe80::1]:8080/x");
    }

    #[test]
    fn hostile_uris_are_rejected() {
        use UriError::*;
        for (input, want) in [
            ("ftp://a.example/x", Scheme),
            ("/relative/path", Scheme),
            ("https://user@a.example/x", UserInfo),
            ("https:///x", Host),
            ("https://a b.example/x", Host),
            ("https://a.example:99999/x", Port),
            ("https://a.example:8o/x", Port),
            ("https://a.example/a b", PathChar),
            ("https://a.example/caf\u{e9}", PathChar),
            ("https://a.example/x\r\nHost: evil", PathChar),
            ("https://a.example/%zz", PercentEncoding),
            ("https://a.example/%4", PercentEncoding),
            ("https://[::1/x", Host),
        ] {
            assert_eq!(NormalizedUri::parse(input), Err(want), "{input:?}");
        }
        assert_eq!(
            NormalizedUri::parse(&format!("https://a.example/{}", "a".repeat(5000))),
            Err(TooLong)
        );
    }

    #[test]
    fn strip_keeps_everything_before_query_or_fragment() {
        assert_eq!(strip_query_and_fragment("https://a/b?c#d"), "https://a/b");
        assert_eq!(strip_query_and_fragment("https://a/b#d?c"), "https://a/b");
    }
}
