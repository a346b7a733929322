//! Matching patterns used in trust policy: SPIFFE IDs with `*` for one
//! path segment, audiences, and HTTP paths.

use crate::identity::SpiffeId;
use crate::token::Audience;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Exact(String),
    /// `*`: exactly one segment.
    One,
    /// `**`, last only: any number of segments, including none.
    Rest,
}

fn segments(path: &str, allow_rest: bool) -> Result<Vec<Segment>, String> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    let body = path
        .strip_prefix('/')
        .ok_or_else(|| format!("{path:?} must start with '/'"))?;
    let parts: Vec<&str> = body.split('/').collect();
    let last = parts.len() - 1;
    parts
        .iter()
        .enumerate()
        .map(|(i, part)| match *part {
            "*" => Ok(Segment::One),
            "**" if allow_rest && i == last => Ok(Segment::Rest),
            "**" if allow_rest => Err("'**' is only allowed as the last segment".to_owned()),
            "**" => Err(
                "'**' is not allowed in a SPIFFE ID pattern: '*' stands for one whole segment"
                    .to_owned(),
            ),
            "" if i == last && i > 0 => Err("a trailing '/' is not allowed".to_owned()),
            "" => Err("empty path segment ('//')".to_owned()),
            p if p.contains('*') => Err(format!(
                "segment {p:?}: '*' must stand alone as a whole segment"
            )),
            p => Ok(Segment::Exact(p.to_owned())),
        })
        .collect()
}

fn matches(pattern: &[Segment], path: &str) -> bool {
    let parts: Vec<&str> = match path.trim_start_matches('/') {
        "" => Vec::new(),
        rest => rest.split('/').collect(),
    };
    for (i, segment) in pattern.iter().enumerate() {
        match segment {
            Segment::Rest => return true,
            Segment::One => {
                if parts.get(i).is_none_or(|p| p.is_empty()) {
                    return false;
                }
            }
            Segment::Exact(want) => {
                if parts.get(i) != Some(&want.as_str()) {
                    return false;
                }
            }
        }
    }
    parts.len() == pattern.len()
}

/// A SPIFFE ID pattern: an exact ID, or one with `*` standing for exactly
/// one path segment (`spiffe://example.org/ns/*/sa/*`). The trust domain is
/// always exact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdPattern {
    text: String,
    trust_domain: String,
    segments: Vec<Segment>,
}

impl IdPattern {
    /// Parses a pattern.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let rest = text
            .strip_prefix("spiffe://")
            .ok_or_else(|| format!("{text:?} must start with spiffe://"))?;
        let (td, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if td.contains('*') {
            return Err(format!(
                "{text:?}: wildcards are not allowed in the trust domain"
            ));
        }
        let pattern = segments(path, false).map_err(|e| format!("{text:?}: {e}"))?;
        // Check the rest of the shape with each wildcard segment replaced
        // by a legal one.
        let probe = format!("spiffe://{td}{}", path.replace("/*", "/x"));
        let id: SpiffeId = probe
            .parse()
            .map_err(|e| format!("{text:?} is not a SPIFFE ID or pattern: {e}"))?;
        Ok(Self {
            text: text.to_owned(),
            trust_domain: id.trust_domain().to_owned(),
            segments: pattern,
        })
    }

    /// Whether `id` matches.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        id.trust_domain() == self.trust_domain && matches(&self.segments, id.path())
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for IdPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// A token audience in a rule: a SPIFFE ID pattern, or any other audience
/// (a URI) matched exactly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AudiencePattern {
    /// `spiffe://…`, possibly with `*` segments.
    Id(IdPattern),
    /// Anything else, compared exactly.
    Exact(Audience),
}

impl AudiencePattern {
    /// Parses an audience pattern.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text.starts_with("spiffe://") {
            IdPattern::parse(text).map(Self::Id)
        } else {
            text.parse().map(Self::Exact).map_err(|e| e.to_string())
        }
    }

    /// Whether `audience` matches.
    pub fn matches(&self, audience: &Audience) -> bool {
        match self {
            Self::Id(p) => audience
                .as_str()
                .parse::<SpiffeId>()
                .is_ok_and(|id| p.matches(&id)),
            Self::Exact(a) => a == audience,
        }
    }
}

impl fmt::Display for AudiencePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Id(p) => p.fmt(f),
            Self::Exact(a) => a.fmt(f),
        }
    }
}

/// An HTTP path pattern: `/v1/charges`, `/v1/charges/*` (one more
/// segment), `/v1/**` (anything below `/v1`, and `/v1` itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathPattern {
    text: String,
    segments: Vec<Segment>,
}

impl PathPattern {
    /// Parses a path pattern.
    ///
    /// # Errors
    /// A message saying what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        if text == "/" {
            return Ok(Self {
                text: text.to_owned(),
                segments: Vec::new(),
            });
        }
        if text.contains(['?', '#']) || !text.is_ascii() || text.contains(char::is_whitespace) {
            return Err(format!(
                "path pattern {text:?} may not hold '?', '#', spaces or non-ASCII"
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            segments: segments(text, true)?,
        })
    }

    /// Whether `path` (already normalized, no query) matches.
    pub fn matches(&self, path: &str) -> bool {
        matches(&self.segments, path)
    }
}

impl fmt::Display for PathPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    #[test]
    fn id_patterns_match_one_segment_per_star() {
        let p = IdPattern::parse("spiffe://example.org/ns/*/sa/checkout").unwrap();
        assert!(p.matches(&id("spiffe://example.org/ns/shop/sa/checkout")));
        assert!(!p.matches(&id("spiffe://example.org/ns/shop/sa/other")));
        assert!(!p.matches(&id("spiffe://example.org/ns/a/b/sa/checkout")));
        assert!(!p.matches(&id("spiffe://other.org/ns/shop/sa/checkout")));
        let exact = IdPattern::parse("spiffe://example.org/ns/shop/sa/checkout").unwrap();
        assert!(exact.matches(&id("spiffe://example.org/ns/shop/sa/checkout")));
        assert!(!exact.matches(&id("spiffe://example.org/ns/shop/sa/checkout2")));
    }

    #[test]
    fn malformed_id_patterns_say_why() {
        for bad in [
            "spiffe://*.org/x",
            "spiffe://example.org/ns/sh*p",
            "https://x/y",
            "spiffe://example.org/a//b",
            "spiffe://example.org/**",
        ] {
            assert!(IdPattern::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn path_patterns() {
        let p = PathPattern::parse("/v1/charges/*").unwrap();
        assert!(p.matches("/v1/charges/ch_1"));
        assert!(!p.matches("/v1/charges"));
        assert!(!p.matches("/v1/charges/ch_1/refunds"));
        let rest = PathPattern::parse("/v1/**").unwrap();
        assert!(rest.matches("/v1"));
        assert!(rest.matches("/v1/a/b/c"));
        assert!(!rest.matches("/v2/a"));
        let root = PathPattern::parse("/").unwrap();
        assert!(root.matches("/"));
        assert!(!root.matches("/a"));
        assert!(PathPattern::parse("/a/**/b").is_err());
        assert!(PathPattern::parse("v1").is_err());
        assert!(PathPattern::parse("/a?b").is_err());
    }

    #[test]
    fn audience_patterns() {
        let p = AudiencePattern::parse("spiffe://example.org/ns/pay/sa/*").unwrap();
        assert!(p.matches(&"spiffe://example.org/ns/pay/sa/payments".parse().unwrap()));
        let uri = AudiencePattern::parse("https://api.partner.example").unwrap();
        assert!(uri.matches(&"https://api.partner.example".parse().unwrap()));
        assert!(!uri.matches(&"https://api.partner.example/".parse().unwrap()));
    }
}
