//! SPIFFE IDs (`spiffe://trust-domain/path`), parsed as the SPIFFE-ID
//! specification §2 defines them.

use std::fmt;
use std::str::FromStr;

/// Longest SPIFFE ID accepted (the specification's URI limit).
const MAX_LEN: usize = 2048;
/// Longest trust domain name.
const MAX_TRUST_DOMAIN_LEN: usize = 255;
const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SpiffeIdError {
    /// Empty input.
    #[error("SPIFFE ID is empty")]
    Empty,
    /// Over 2048 bytes.
    #[error("SPIFFE ID is longer than {MAX_LEN} bytes")]
    TooLong,
    /// Does not start with `spiffe://`.
    #[error("SPIFFE ID must start with spiffe://")]
    WrongScheme,
    /// No trust domain after the scheme.
    #[error("SPIFFE ID has no trust domain")]
    MissingTrustDomain,
    /// A character outside `[a-z0-9.-_]` in the trust domain (upper case,
    /// a port, user info, percent-encoding…).
    #[error("SPIFFE trust domain may only hold a-z, 0-9, '.', '-' and '_'")]
    BadTrustDomainChar,
    /// Trust domain over 255 bytes.
    #[error("SPIFFE trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    /// An empty path segment (`//` or a trailing `/`).
    #[error("SPIFFE ID path has an empty segment or a trailing slash")]
    EmptySegment,
    /// A `.` or `..` path segment.
    #[error("SPIFFE ID path may not contain '.' or '..' segments")]
    DotSegment,
    /// A character outside `[a-zA-Z0-9.-_]` in the path (query, fragment,
    /// percent-encoding…).
    #[error("SPIFFE ID path may only hold a-z, A-Z, 0-9, '.', '-' and '_'")]
    BadPathChar,
}

/// A valid SPIFFE ID.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    text: String,
    /// Byte offset where the path starts (== text.len() when there is none).
    path_start: usize,
}

impl SpiffeId {
    /// The trust domain name, e.g. `example.org`.
    pub fn trust_domain(&self) -> &str {
        &self.text[SCHEME.len()..self.path_start]
    }

    /// The path, e.g. `/ns/shop/sa/checkout` (empty for a trust domain ID).
    pub fn path(&self) -> &str {
        &self.text[self.path_start..]
    }

    /// The whole ID.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s.strip_prefix(SCHEME).ok_or(SpiffeIdError::WrongScheme)?;
        let td_len = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_len);
        if td.is_empty() {
            return Err(SpiffeIdError::MissingTrustDomain);
        }
        if td.len() > MAX_TRUST_DOMAIN_LEN {
            return Err(SpiffeIdError::TrustDomainTooLong);
        }
        let td_ok = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b);
        if !td.bytes().all(td_ok) {
            return Err(SpiffeIdError::BadTrustDomainChar);
        }
        if !path.is_empty() {
            for segment in path[1..].split('/') {
                match segment {
                    "" => return Err(SpiffeIdError::EmptySegment),
                    "." | ".." => return Err(SpiffeIdError::DotSegment),
                    _ => {}
                }
                let ok = |b: u8| b.is_ascii_alphanumeric() || b"-._".contains(&b);
                if !segment.bytes().all(ok) {
                    return Err(SpiffeIdError::BadPathChar);
                }
            }
        }
        Ok(Self {
            text: s.to_owned(),
            path_start: SCHEME.len() + td_len,
        })
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SpiffeId, SpiffeIdError> {
        s.parse()
    }

    #[test]
    fn kubernetes_style_id_splits_into_domain_and_path() {
        let id = parse("spiffe://example.org/ns/shop/sa/checkout").unwrap();
        assert_eq!(id.trust_domain(), "example.org");
        assert_eq!(id.path(), "/ns/shop/sa/checkout");
        assert_eq!(id.to_string(), "spiffe://example.org/ns/shop/sa/checkout");
    }

    #[test]
    fn trust_domain_id_has_an_empty_path() {
        let id = parse("spiffe://example.org").unwrap();
        assert_eq!(id.path(), "");
    }

    #[test]
    fn malformed_ids_are_rejected_with_the_reason() {
        use SpiffeIdError::*;
        for (input, want) in [
            ("", Empty),
            ("https://example.org/x", WrongScheme),
            ("SPIFFE://example.org/x", WrongScheme),
            ("spiffe:///x", MissingTrustDomain),
            ("spiffe://Example.org/x", BadTrustDomainChar),
            ("spiffe://example.org:443/x", BadTrustDomainChar),
            ("spiffe://user@example.org/x", BadTrustDomainChar),
            ("spiffe://example.org/", EmptySegment),
            ("spiffe://example.org//x", EmptySegment),
            ("spiffe://example.org/x/", EmptySegment),
            ("spiffe://example.org/./x", DotSegment),
            ("spiffe://example.org/x/..", DotSegment),
            ("spiffe://example.org/x?q=1", BadPathChar),
            ("spiffe://example.org/x#f", BadPathChar),
            ("spiffe://example.org/x%20y", BadPathChar),
        ] {
            assert_eq!(parse(input), Err(want), "{input}");
        }
        let long = format!("spiffe://example.org/{}", "a".repeat(3000));
        assert_eq!(parse(&long), Err(TooLong));
        let long_td = format!("spiffe://{}/x", "a".repeat(300));
        assert_eq!(parse(&long_td), Err(TrustDomainTooLong));
    }
}
