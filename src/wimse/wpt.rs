//! Workload Proof Tokens (draft-ietf-wimse-wpt): one request's proof of
//! the key a WIT binds. [`mint`] makes one (the sidecar with its ES256
//! key, the CLI and tests with either kind); [`verify`] checks one against
//! the [`VerifiedWit`] it came with and the request it arrived on.
//!
//! Two forms of the draft are in use. In -01 (published) the WPT travels
//! in a `Workload-Proof-Token` header and may carry `ath`, the hash of an
//! access token sent in `Authorization`; in -02 (the editor's copy) it
//! travels as `Authorization: WPT <jwt>` and `ath` is gone. tally sends the
//! -01 form and accepts both: the claims are the same but for `ath`, which
//! is required exactly when an access token was sent and refused
//! otherwise, so a WPT cannot be moved onto a request with another token.
//!
//! Replay is not checked here: the caller looks `jti` up in its replay
//! cache after every other check has passed, so a refused WPT never uses
//! up a `jti`.

use super::error::WptError;
use super::wit::VerifiedWit;
use crate::dpop::htu::strip_query_and_fragment;
use crate::dpop::{NormalizedUri, TokenHash};
use crate::jose::claims;
use crate::jose::jws::{self, ES256_OR_EDDSA, Jws, Limits};
use crate::jose::key::SignError;
use crate::jose::{JwsSigner, Observer, b64};
use aws_lc_rs::rand::{SecureRandom, SystemRandom};
use serde_json::{Map, Value};
use std::fmt;

/// The `typ` of a WPT.
pub const WPT_TYP: &str = "wpt+jwt";
/// The same media type in full, also accepted.
pub const WPT_MEDIA_TYPE: &str = "application/wpt+jwt";
/// The fewest bytes a `jti` may carry: 128 bits, as the draft suggests.
pub const MIN_JTI_LEN: usize = 16;
/// Most `oth` entries accepted.
pub const MAX_OTH_ENTRIES: usize = 16;
/// The largest clock leeway a [`WptConfig`] may ask for, in seconds.
pub const MAX_LEEWAY: u64 = 300;

/// Header names an `oth` entry may not bind: the credentials the protocol
/// itself carries (already bound by `wth`, `ath`, `tth`, or the proof
/// itself) and `host`, which the verifier must not trust for the target
/// (draft-ietf-wimse-wpt, "Audience validation").
pub const RESERVED_OTH_NAMES: [&str; 6] = [
    "authorization",
    "workload-identity-token",
    "workload-proof-token",
    "txn-token",
    "dpop",
    "host",
];

/// What a WPT is minted for.
#[derive(Debug, Clone, Copy)]
pub struct WptInput<'a> {
    /// The target URI without query or fragment (any left are dropped).
    pub aud: &'a str,
    /// The WIT sent with it (`wth`).
    pub wit: &'a str,
    /// The access token sent in `Authorization`, if any (`ath`).
    pub access_token: Option<&'a str>,
    /// The `Txn-Token` header's value, if any (`tth`).
    pub txn_token: Option<&'a str>,
    /// Other headers to bind (`oth`): name and value as sent.
    pub other: &'a [(&'a str, &'a str)],
    /// Seconds from now to `exp` (at least one).
    pub lifetime: u64,
}

/// Mints a WPT signed by `key` at `now`: header `{typ: wpt+jwt, alg}`,
/// claims `aud`, `iat`, `exp`, a `jti` of 128 random bits, `wth`, and `ath`,
/// `tth`, `oth` when the input has them. Nothing is copied from the key.
///
/// # Errors
/// Only if the random source or the crypto library fails.
pub fn mint(
    key: &(impl JwsSigner + ?Sized),
    input: &WptInput<'_>,
    now: u64,
) -> Result<String, SignError> {
    let mut jti = [0u8; 16];
    SystemRandom::new().fill(&mut jti).map_err(|_| SignError)?;
    let mut claims = Map::with_capacity(7);
    claims.insert(
        "aud".into(),
        Value::from(strip_query_and_fragment(input.aud)),
    );
    // Not in the drafts' claim list, but allowed: it lets a verifier that
    // has just restarted tell a WPT made since from one its predecessor
    // may have seen.
    claims.insert("iat".into(), Value::from(now));
    claims.insert(
        "exp".into(),
        Value::from(now.saturating_add(input.lifetime.max(1))),
    );
    claims.insert("jti".into(), Value::from(b64::encode(jti)));
    claims.insert("wth".into(), Value::from(TokenHash::of(input.wit).to_ath()));
    if let Some(token) = input.access_token {
        claims.insert("ath".into(), Value::from(TokenHash::of(token).to_ath()));
    }
    if let Some(token) = input.txn_token {
        claims.insert("tth".into(), Value::from(TokenHash::of(token).to_ath()));
    }
    if !input.other.is_empty() {
        let oth: Map<String, Value> = input
            .other
            .iter()
            .map(|(name, value)| {
                (
                    name.to_ascii_lowercase(),
                    Value::from(header_hash(value.as_bytes())),
                )
            })
            .collect();
        claims.insert("oth".into(), Value::Object(oth));
    }
    let header = format!(r#"{{"typ":"{WPT_TYP}","alg":"{}"}}"#, key.alg());
    let payload = serde_json::to_vec(&claims).map_err(|_| SignError)?;
    jws::sign_compact(&b64::encode(header), &payload, key)
}

/// The `oth` value of a header: base64url SHA-256 of its value with
/// leading and trailing spaces and tabs removed.
fn header_hash(value: &[u8]) -> String {
    TokenHash::of_bytes(trim_ows(value)).to_ath()
}

/// A field value without leading or trailing spaces and tabs (RFC 9110
/// `OWS`).
fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |i| i + 1);
    &value[start..end]
}

/// The request's header fields, for `oth`.
pub trait RequestHeaders {
    /// Every value of the header field `name` (given in lower case; the
    /// lookup is case-insensitive), in the order received.
    fn field_values(&self, name: &str) -> Vec<&[u8]>;
}

/// Name–value pairs (a test's or the CLI's headers), names compared
/// case-insensitively.
fn pair_values<'a, N: AsRef<str>, V: AsRef<[u8]>>(
    pairs: &'a [(N, V)],
    name: &str,
) -> Vec<&'a [u8]> {
    pairs
        .iter()
        .filter(|(n, _)| n.as_ref().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
        .collect()
}

impl<N: AsRef<str>, V: AsRef<[u8]>> RequestHeaders for [(N, V)] {
    fn field_values(&self, name: &str) -> Vec<&[u8]> {
        pair_values(self, name)
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>> RequestHeaders for Vec<(N, V)> {
    fn field_values(&self, name: &str) -> Vec<&[u8]> {
        pair_values(self, name)
    }
}

impl<N: AsRef<str>, V: AsRef<[u8]>, const L: usize> RequestHeaders for [(N, V); L] {
    fn field_values(&self, name: &str) -> Vec<&[u8]> {
        pair_values(self, name)
    }
}

impl RequestHeaders for http::HeaderMap {
    fn field_values(&self, name: &str) -> Vec<&[u8]> {
        self.get_all(name).iter().map(|v| v.as_bytes()).collect()
    }
}

/// What the request that carried the WPT looked like.
#[derive(Clone, Copy)]
pub struct WptContext<'a> {
    /// The WIT sent with it, already verified.
    pub wit: &'a VerifiedWit,
    /// The target URI the verifier received, normalized as DPoP `htu` is
    /// (from trusted configuration, never from `Host`).
    pub uri: &'a NormalizedUri,
    /// The access token sent in `Authorization`, if any: `ath` is then
    /// required and must match; without one, an `ath` is refused.
    pub access_token: Option<&'a str>,
    /// The `Txn-Token` header's value, if any: the same rule for `tth`.
    pub txn_token: Option<&'a str>,
    /// The request's headers, for `oth`.
    pub headers: &'a dyn RequestHeaders,
}

impl fmt::Debug for WptContext<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WptContext")
            .field("sub", &self.wit.sub)
            .field("uri", self.uri)
            .field("access_token", &self.access_token.map(|_| "<redacted>"))
            .field("txn_token", &self.txn_token.map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// WPT verification settings.
#[derive(Debug, Clone)]
pub struct WptConfig {
    /// The longest lifetime a WPT may claim: `exp` at most this far after
    /// now (plus leeway), in seconds.
    pub max_lifetime: u64,
    /// Clock leeway for `exp`, in seconds; at most [`MAX_LEEWAY`] is used.
    pub leeway: u64,
    /// Longest accepted `jti`, in bytes.
    pub max_jti_len: usize,
    /// JWS size caps, checked before anything is decoded.
    pub limits: Limits,
}

impl Default for WptConfig {
    /// 300 s lifetime, 30 s leeway, `jti` up to 256 bytes, the default
    /// JWS caps (8 KiB).
    fn default() -> Self {
        Self {
            max_lifetime: 300,
            leeway: 30,
            max_jti_len: 256,
            limits: Limits::default(),
        }
    }
}

impl WptConfig {
    /// The leeway in force: [`WptConfig::leeway`] capped at
    /// [`MAX_LEEWAY`].
    pub fn effective_leeway(&self) -> u64 {
        self.leeway.min(MAX_LEEWAY)
    }
}

/// The checks of a WPT, in the order they run. Passed to an [`Observer`]
/// as each one passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WptCheck {
    /// Size caps, compact JWS syntax, alg ES256 or EdDSA, no crit/b64.
    Syntax,
    /// `typ` is `wpt+jwt`.
    Typ,
    /// `alg` is the WIT's `cnf.jwk.alg`.
    Alg,
    /// The signature verifies with the WIT's `cnf.jwk`.
    Signature,
    /// `aud` is the request's target URI.
    Audience,
    /// `exp` not passed, and not too far ahead.
    Expiry,
    /// `jti` present, at least 128 bits, within length.
    Jti,
    /// `wth` is the hash of the WIT.
    Wth,
    /// `ath` matches the access token, and is absent without one.
    Ath,
    /// `tth` matches the `Txn-Token`, and is absent without one.
    Tth,
    /// Every `oth` entry matches its header.
    Oth,
}

impl WptCheck {
    /// Every check, in the order they run.
    pub const ALL: [Self; 11] = [
        Self::Syntax,
        Self::Typ,
        Self::Alg,
        Self::Signature,
        Self::Audience,
        Self::Expiry,
        Self::Jti,
        Self::Wth,
        Self::Ath,
        Self::Tth,
        Self::Oth,
    ];
}

impl fmt::Display for WptCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Syntax => "compact JWS syntax, size limits, alg ES256 or EdDSA, no crit/b64",
            Self::Typ => "typ is wpt+jwt",
            Self::Alg => "alg is the WIT's cnf.jwk.alg",
            Self::Signature => "signature verifies with the WIT's cnf.jwk",
            Self::Audience => "aud matches the request URI",
            Self::Expiry => "exp not passed and within the maximum lifetime",
            Self::Jti => "jti present, at least 128 bits, within length",
            Self::Wth => "wth matches the WIT",
            Self::Ath => "ath matches the access token (absent without one)",
            Self::Tth => "tth matches the Txn-Token (absent without one)",
            Self::Oth => "oth entries match their headers",
        })
    }
}

/// A WPT that passed every check but replay: the caller checks `jti` in
/// its replay cache (keyed with the WIT's `jkt`) until `exp`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedWpt {
    /// The WPT's unique id.
    pub jti: String,
    /// Its expiry: how long the replay cache must remember `jti`.
    pub exp: u64,
    /// When it was made, if it says (tally's WPTs do; the drafts define
    /// no `iat`).
    pub iat: Option<u64>,
    /// Its audience, normalized.
    pub aud: NormalizedUri,
}

/// Verifies a WPT against the request it came with, at `now`.
///
/// # Errors
/// The first [`WptError`] found; checks run in [`WptCheck`] order.
pub fn verify(
    text: &str,
    ctx: &WptContext<'_>,
    now: u64,
    config: &WptConfig,
    observer: &mut impl Observer<WptCheck>,
) -> Result<VerifiedWpt, WptError> {
    let jws = Jws::parse_with(text, &config.limits, ES256_OR_EDDSA).map_err(WptError::Jws)?;
    observer.passed(WptCheck::Syntax);

    match jws.typ() {
        Some(WPT_TYP | WPT_MEDIA_TYPE) => {}
        other => {
            return Err(WptError::Typ {
                found: other.map(jws::truncate),
            });
        }
    }
    observer.passed(WptCheck::Typ);

    // Both names come from the same allow-list, so comparing the parsed
    // algorithms is comparing the strings.
    if jws.alg() != ctx.wit.alg {
        return Err(WptError::AlgMismatch {
            expected: ctx.wit.alg.as_str(),
            found: jws.alg().as_str(),
        });
    }
    observer.passed(WptCheck::Alg);

    jws.verify_with(&ctx.wit.key)
        .map_err(|_| WptError::BadSignature)?;
    observer.passed(WptCheck::Signature);

    let claims = jws.payload();
    let aud = audience(claims)?;
    let aud = NormalizedUri::parse(aud).map_err(WptError::AudInvalid)?;
    if &aud != ctx.uri {
        return Err(WptError::AudMismatch {
            expected: jws::truncate(ctx.uri.as_str()),
            found: jws::truncate(aud.as_str()),
        });
    }
    observer.passed(WptCheck::Audience);

    let leeway = config.effective_leeway();
    let exp = claims::integer(claims, "exp")?;
    if now > exp.saturating_add(leeway) {
        return Err(WptError::Expired { exp, now, leeway });
    }
    if exp
        > now
            .saturating_add(config.max_lifetime)
            .saturating_add(leeway)
    {
        return Err(WptError::TooLongLived {
            exp,
            now,
            max_lifetime: config.max_lifetime,
        });
    }
    // `iat` is no draft claim, but when present it must be sane: a
    // verifier that just restarted relies on it (see `auth::wimse`).
    let iat = claims::optional_integer(claims, "iat")?;
    if let Some(iat) = iat
        && iat > now.saturating_add(leeway)
    {
        return Err(WptError::IssuedInFuture { iat, now });
    }
    observer.passed(WptCheck::Expiry);

    let jti = claims::string(claims, "jti")?;
    if jti.len() > config.max_jti_len {
        return Err(WptError::JtiTooLong {
            len: jti.len(),
            max: config.max_jti_len,
        });
    }
    let carried = jti_len(jti);
    if carried < MIN_JTI_LEN {
        return Err(WptError::JtiTooShort {
            len: carried,
            min: MIN_JTI_LEN,
        });
    }
    observer.passed(WptCheck::Jti);

    let wth = claims::optional_string(claims, "wth")?.ok_or(WptError::MissingClaim("wth"))?;
    if !is_hash_of(wth, ctx.wit.wth.as_bytes()) {
        return Err(WptError::WthMismatch);
    }
    observer.passed(WptCheck::Wth);

    bound_token(
        claims::optional_string(claims, "ath")?,
        ctx.access_token,
        [
            WptError::AthMissing,
            WptError::AthMismatch,
            WptError::AthUnexpected,
        ],
    )?;
    observer.passed(WptCheck::Ath);

    bound_token(
        claims::optional_string(claims, "tth")?,
        ctx.txn_token,
        [
            WptError::TthMissing,
            WptError::TthMismatch,
            WptError::TthUnexpected,
        ],
    )?;
    observer.passed(WptCheck::Tth);

    if let Some(oth) = claims.get("oth") {
        other_tokens(oth, ctx.headers)?;
    }
    observer.passed(WptCheck::Oth);

    Ok(VerifiedWpt {
        jti: jti.to_owned(),
        exp,
        iat,
        aud,
    })
}

/// `aud`: a string, or an array holding exactly one.
fn audience(claims: &Map<String, Value>) -> Result<&str, WptError> {
    const EXPECTED: &str = "a string (or an array of one string)";
    match claims.get("aud") {
        None => Err(WptError::MissingClaim("aud")),
        Some(Value::String(aud)) => Ok(aud),
        Some(Value::Array(items)) if items.len() == 1 => {
            items[0].as_str().ok_or(WptError::ClaimType {
                claim: "aud",
                expected: EXPECTED,
            })
        }
        Some(_) => Err(WptError::ClaimType {
            claim: "aud",
            expected: EXPECTED,
        }),
    }
}

/// How many bytes a `jti` carries: its decoded length when it is
/// canonical base64url (how the draft suggests making one), else its
/// length as text. So a 22-character base64url `jti` (16 bytes) passes
/// and a 20-character one (15 bytes) does not, while an id in another
/// encoding (the draft allows any) is measured as written.
fn jti_len(jti: &str) -> usize {
    b64::decode(jti.as_bytes()).map_or(jti.len(), |bytes| bytes.len())
}

/// Whether `claim` is the canonical base64url of `digest`. Digests are
/// compared, not strings, so there is one accepted spelling.
fn is_hash_of(claim: &str, digest: &[u8; 32]) -> bool {
    b64::decode_array::<32>(claim.as_bytes()).is_ok_and(|found| found == *digest)
}

/// `ath` or `tth` against the token sent with it: required and matching
/// when there is one, absent when there is none. `errors` are the
/// missing, mismatch and unexpected refusals.
fn bound_token(
    claim: Option<&str>,
    token: Option<&str>,
    errors: [WptError; 3],
) -> Result<(), WptError> {
    let [missing, mismatch, unexpected] = errors;
    match (token, claim) {
        (None, None) => Ok(()),
        (None, Some(_)) => Err(unexpected),
        (Some(_), None) => Err(missing),
        (Some(token), Some(claim)) if is_hash_of(claim, TokenHash::of(token).as_bytes()) => Ok(()),
        (Some(_), Some(_)) => Err(mismatch),
    }
}

/// `oth`: an object; every key a lower-case header name, not reserved,
/// naming a header the request carries exactly once, whose trimmed
/// value's hash is the entry's value. Any entry failing refuses the WPT
/// (an entry the verifier does not understand must, per the draft).
fn other_tokens(oth: &Value, headers: &dyn RequestHeaders) -> Result<(), WptError> {
    let Value::Object(entries) = oth else {
        return Err(WptError::ClaimType {
            claim: "oth",
            expected: "an object",
        });
    };
    if entries.len() > MAX_OTH_ENTRIES {
        return Err(WptError::OthTooMany {
            count: entries.len(),
            max: MAX_OTH_ENTRIES,
        });
    }
    for (name, value) in entries {
        if !is_lower_case_field_name(name) {
            return Err(WptError::OthName(jws::truncate(name)));
        }
        if RESERVED_OTH_NAMES.contains(&name.as_str()) {
            return Err(WptError::OthReserved(name.clone()));
        }
        let Value::String(claimed) = value else {
            return Err(WptError::OthValueType(name.clone()));
        };
        let values = headers.field_values(name);
        let field = match values.as_slice() {
            [] => return Err(WptError::OthHeaderMissing(name.clone())),
            [one] => *one,
            _ => return Err(WptError::OthHeaderRepeated(name.clone())),
        };
        let claimed = b64::decode_array::<32>(claimed.as_bytes())
            .map_err(|_| WptError::OthMismatch(name.clone()))?;
        if claimed != *TokenHash::of_bytes(trim_ows(field)).as_bytes() {
            return Err(WptError::OthMismatch(name.clone()));
        }
    }
    Ok(())
}

/// An RFC 9110 field name (`token`) with no upper-case letters.
fn is_lower_case_field_name(name: &str) -> bool {
    !name.is_empty()
        && name.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jti_length_is_decoded_for_base64url_and_raw_otherwise() {
        assert_eq!(jti_len(&b64::encode([1u8; 16])), 16);
        assert_eq!(jti_len(&b64::encode([1u8; 15])), 15);
        // The draft's example: 21 characters, not valid base64url.
        assert_eq!(jti_len("__bwc4ESC3acc2LTC1-_x"), 21);
        assert_eq!(jti_len("0123456789abcdef0123456789abcdef"), 24);
        assert_eq!(jti_len("short"), 5);
    }

    #[test]
    fn field_names_must_be_lower_case_tokens() {
        assert!(is_lower_case_field_name("x-user-token"));
        assert!(is_lower_case_field_name("a1!#$%&'*+-.^_`|~"));
        assert!(!is_lower_case_field_name("X-User-Token"));
        assert!(!is_lower_case_field_name("x user"));
        assert!(!is_lower_case_field_name("x:y"));
        assert!(!is_lower_case_field_name(""));
    }

    #[test]
    fn header_hashes_ignore_surrounding_spaces() {
        assert_eq!(trim_ows(b" \t a b \t"), b"a b");
        assert_eq!(trim_ows(b"   "), b"");
        assert_eq!(header_hash(b"  v \t"), header_hash(b"v"));
        assert_ne!(header_hash(b"v"), header_hash(b"w"));
        assert_eq!(header_hash(b"v"), TokenHash::of("v").to_ath());
    }

    #[test]
    fn headers_are_looked_up_without_regard_to_case() {
        let headers = [("X-A", "1"), ("x-a", "2"), ("x-b", "3")];
        assert_eq!(headers.field_values("x-a"), vec![b"1".as_slice(), b"2"]);
        assert_eq!(headers.field_values("x-c"), Vec::<&[u8]>::new());
        let mut map = http::HeaderMap::new();
        map.append("x-a", "1".parse().unwrap());
        map.append("X-A", "2".parse().unwrap());
        assert_eq!(map.field_values("x-a").len(), 2);
    }

    #[test]
    fn the_leeway_is_capped() {
        let config = WptConfig {
            leeway: 10_000,
            ..WptConfig::default()
        };
        assert_eq!(config.effective_leeway(), MAX_LEEWAY);
    }
}
