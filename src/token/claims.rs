//! Typed access-token claim values: scopes, audiences, token classes,
//! and the kinds of token the broker issues.

use std::fmt;
use std::str::FromStr;

/// Longest scope token or audience accepted, in bytes.
const MAX_ITEM_LEN: usize = 512;
/// Most scopes one token may carry.
pub const MAX_SCOPES: usize = 64;

/// Why a claim value is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClaimValueError {
    /// A scope token with a character outside RFC 6749 §3.3 `NQCHAR`, or
    /// empty (double space), or too long.
    #[error("scope {0:?} is not a valid RFC 6749 scope token")]
    Scope(String),
    /// More than [`MAX_SCOPES`] scopes.
    #[error("more than {MAX_SCOPES} scopes")]
    TooManyScopes,
    /// Empty, too long, or holding whitespace or control characters.
    #[error("audience {0:?} is empty, too long, or holds whitespace or control characters")]
    Audience(String),
    /// Not one of `service`, `partner`, `admin`, `user`.
    #[error("unknown token class {0:?} (expected service, partner, admin or user)")]
    Class(String),
    /// Not one of `access`, `jwt_svid`, `wit`.
    #[error("unknown token kind {0:?} (expected access, jwt_svid or wit)")]
    Kind(String),
}

/// One RFC 6749 scope token, e.g. `payments:charge`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Scope(String);

impl Scope {
    /// The scope text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Scope {
    type Err = ClaimValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        // NQCHAR = %x21 / %x23-5B / %x5D-7E
        let nqchar = |b: u8| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b);
        if s.is_empty() || s.len() > MAX_ITEM_LEN || !s.bytes().all(nqchar) {
            return Err(ClaimValueError::Scope(crate::jose::jws::truncate(s)));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A set of scopes, sorted and without duplicates (order carries no
/// meaning in OAuth).
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Scopes(Vec<Scope>);

impl Scopes {
    /// The empty set (as a constant, for a `static`).
    pub const fn empty() -> Self {
        Self(Vec::new())
    }

    /// Builds a set from scopes.
    ///
    /// # Errors
    /// [`ClaimValueError::TooManyScopes`].
    pub fn new(scopes: impl IntoIterator<Item = Scope>) -> Result<Self, ClaimValueError> {
        let mut v: Vec<Scope> = scopes.into_iter().collect();
        v.sort();
        v.dedup();
        if v.len() > MAX_SCOPES {
            return Err(ClaimValueError::TooManyScopes);
        }
        Ok(Self(v))
    }

    /// Whether `scope` is in the set.
    pub fn contains(&self, scope: &Scope) -> bool {
        self.0.binary_search(scope).is_ok()
    }

    /// Whether every scope of `other` is in this set.
    pub fn contains_all(&self, other: &Scopes) -> bool {
        other.0.iter().all(|s| self.contains(s))
    }

    /// The scopes in order.
    pub fn iter(&self) -> impl Iterator<Item = &Scope> {
        self.0.iter()
    }

    /// Number of scopes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl FromStr for Scopes {
    type Err = ClaimValueError;

    /// Parses the space-separated `scope` form. Exactly one space between
    /// tokens, as RFC 6749 §3.3 writes it; an empty string is no scopes.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() {
            return Ok(Self::default());
        }
        if s.len() > MAX_ITEM_LEN * MAX_SCOPES {
            return Err(ClaimValueError::TooManyScopes);
        }
        let scopes = s
            .split(' ')
            .map(Scope::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        Self::new(scopes)
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, scope) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            f.write_str(scope.as_str())?;
        }
        Ok(())
    }
}

/// A token audience: a SPIFFE ID or a URI.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Audience(String);

impl Audience {
    /// The audience text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Audience {
    type Err = ClaimValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.is_empty() || s.len() > MAX_ITEM_LEN || !s.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ClaimValueError::Audience(crate::jose::jws::truncate(s)));
        }
        Ok(Self(s.to_owned()))
    }
}

impl fmt::Display for Audience {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The token class (`tcl`): decides lifetimes and audit rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenClass {
    /// Workload to workload inside the mesh.
    Service,
    /// To or from a partner outside the mesh.
    Partner,
    /// Administrative access.
    Admin,
    /// On behalf of a human user.
    User,
}

impl TokenClass {
    /// The claim value.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Service => "service",
            Self::Partner => "partner",
            Self::Admin => "admin",
            Self::User => "user",
        }
    }
}

impl FromStr for TokenClass {
    type Err = ClaimValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "service" => Ok(Self::Service),
            "partner" => Ok(Self::Partner),
            "admin" => Ok(Self::Admin),
            "user" => Ok(Self::User),
            other => Err(ClaimValueError::Class(crate::jose::jws::truncate(other))),
        }
    }
}

impl fmt::Display for TokenClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of token the broker issued: the inventory holds them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenKind {
    /// A DPoP-bound RFC 9068 access token (`Tokens.Issue`, OAuth).
    Access,
    /// A SPIFFE JWT-SVID: a bearer token, no key binding, no scopes
    /// (`Tokens.IssueJwtSvid`).
    JwtSvid,
    /// A WIMSE Workload Identity Token: bound to its holder's key
    /// (`cnf.jwk`), no audience, no scopes (`Tokens.IssueWit`).
    Wit,
}

impl TokenKind {
    /// The stored and displayed name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Access => "access",
            Self::JwtSvid => "jwt_svid",
            Self::Wit => "wit",
        }
    }
}

impl FromStr for TokenKind {
    type Err = ClaimValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "access" => Ok(Self::Access),
            "jwt_svid" => Ok(Self::JwtSvid),
            "wit" => Ok(Self::Wit),
            other => Err(ClaimValueError::Kind(crate::jose::jws::truncate(other))),
        }
    }
}

impl fmt::Display for TokenKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_sort_and_dedup() {
        let scopes: Scopes = "payments:read payments:charge payments:read"
            .parse()
            .unwrap();
        assert_eq!(scopes.to_string(), "payments:charge payments:read");
        assert_eq!(scopes.len(), 2);
        assert!(scopes.contains(&"payments:read".parse().unwrap()));
    }

    #[test]
    fn malformed_scopes_are_rejected() {
        for bad in ["a  b", " a", "a ", "a\"b", "a\\b", "caf\u{e9}", "a\tb"] {
            assert!(bad.parse::<Scopes>().is_err(), "{bad:?}");
        }
        let many = (0..65)
            .map(|i| format!("s{i}"))
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(many.parse::<Scopes>(), Err(ClaimValueError::TooManyScopes));
    }

    #[test]
    fn empty_scope_string_is_no_scopes() {
        assert!("".parse::<Scopes>().unwrap().is_empty());
    }

    #[test]
    fn audiences_reject_whitespace_and_controls() {
        assert!(
            "spiffe://example.org/ns/pay/sa/payments"
                .parse::<Audience>()
                .is_ok()
        );
        assert!("https://api.example.com".parse::<Audience>().is_ok());
        for bad in ["", "a b", "a\nb", "\u{e9}"] {
            assert!(bad.parse::<Audience>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn token_classes_round_trip() {
        for class in [
            TokenClass::Service,
            TokenClass::Partner,
            TokenClass::Admin,
            TokenClass::User,
        ] {
            assert_eq!(class.as_str().parse::<TokenClass>(), Ok(class));
        }
        assert!("Service".parse::<TokenClass>().is_err());
    }
}
