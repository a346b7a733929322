//! Compact JWS (RFC 7515) parsing and signing, strict by design.
//!
//! The parser enforces size caps before decoding anything, exactly three
//! segments, canonical base64url, JSON objects without duplicate members,
//! no `crit` or `b64`, an algorithm from the caller's allow-list, and a
//! 64-byte signature: ES256 `R ‖ S` with both scalars in `[1, n − 1]`, or
//! EdDSA (Ed25519) `R ‖ S` with `S` below the group order. Signatures are
//! checked over the bytes received, never over re-serialized JSON.
//!
//! tally's allow-list is ES256 everywhere ([`Jws::parse`]: DPoP proofs,
//! access tokens, JWT-SVIDs), plus EdDSA where a WIMSE token asks for it
//! ([`Jws::parse_with`] and [`ES256_OR_EDDSA`]). Never `none`, never
//! HMAC, and never RSA (`RS*`, `PS*`) or ES384/ES512, although the SPIFFE
//! WIT-SVID profile lists them: each is refused with its own error.

use super::b64;
use super::json::{self, JsonError};
use super::jwk::PublicKey;
use super::key::SignError;
use super::signer::JwsSigner;
use super::verifying::VerifyingKey;
use serde_json::{Map, Value};
use std::fmt;

/// Size caps, checked before any decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Longest accepted compact serialization, in bytes.
    pub max_len: usize,
    /// Longest accepted decoded protected header, in bytes.
    pub max_header_len: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_len: 8 * 1024,
            max_header_len: 4 * 1024,
        }
    }
}

/// The signature algorithm tally accepts everywhere.
pub const ALG_ES256: &str = "ES256";
/// EdDSA (RFC 8037), accepted only in WIMSE tokens.
pub const ALG_EDDSA: &str = "EdDSA";

/// A JWS algorithm tally can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Alg {
    /// ECDSA with P-256 and SHA-256.
    Es256,
    /// EdDSA with Ed25519.
    EdDsa,
}

impl Alg {
    /// The `alg` header value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Es256 => ALG_ES256,
            Self::EdDsa => ALG_EDDSA,
        }
    }

    /// The algorithm an `alg` value names, compared exactly (JOSE names
    /// are case-sensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            ALG_ES256 => Some(Self::Es256),
            ALG_EDDSA => Some(Self::EdDsa),
            _ => None,
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The allow-list of DPoP proofs, access tokens and JWT-SVIDs.
pub const ES256_ONLY: &[Alg] = &[Alg::Es256];
/// The allow-list of WIMSE tokens (WIT and WPT).
pub const ES256_OR_EDDSA: &[Alg] = &[Alg::Es256, Alg::EdDsa];

/// The order `L` of the Ed25519 base point, little-endian (as `S` is
/// encoded, RFC 8032 §5.1.7).
const ED25519_ORDER: [u8; 32] = [
    0xed, 0xd3, 0xf5, 0x5c, 0x1a, 0x63, 0x12, 0x58, 0xd6, 0x9c, 0xf7, 0xa2, 0xde, 0xf9, 0xde, 0x14,
    0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x10,
];

/// The group order `n` of P-256, big-endian.
const P256_ORDER: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// Why a compact JWS was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwsError {
    /// The whole serialization exceeds [`Limits::max_len`].
    #[error("JWS is {len} bytes, more than the {max} allowed")]
    TooLong {
        /// Length received.
        len: usize,
        /// Configured cap.
        max: usize,
    },
    /// Not exactly three `.`-separated segments.
    #[error("JWS has {found} segments, not 3")]
    SegmentCount {
        /// Number of segments found.
        found: usize,
    },
    /// The protected header would decode to more than
    /// [`Limits::max_header_len`] bytes.
    #[error("JWS header is over {max} bytes")]
    HeaderTooLong {
        /// Configured cap.
        max: usize,
    },
    /// A segment is not canonical unpadded base64url.
    #[error("JWS {segment} is not canonical base64url")]
    Encoding {
        /// `header`, `payload` or `signature`.
        segment: &'static str,
    },
    /// The header is not a JSON object without duplicate members.
    #[error("JWS header: {0}")]
    HeaderJson(JsonError),
    /// The payload is not a JSON object without duplicate members.
    #[error("JWS payload: {0}")]
    PayloadJson(JsonError),
    /// No `alg`, or not a string.
    #[error("JWS header has no alg string")]
    AlgMissing,
    /// `alg: none` (any case): an unsigned token.
    #[error("alg none is never accepted")]
    AlgNone,
    /// An HMAC algorithm: a verifier holding only public keys must never
    /// treat one as a shared secret.
    #[error("HMAC alg {0:?} is never accepted")]
    AlgHmac(String),
    /// Any other algorithm outside the allow-list (EdDSA where only
    /// ES256 is accepted; RSA, PS, ES384 and ES512 everywhere).
    #[error("alg {0:?} is not allowed: tally accepts ES256 (and EdDSA in WIMSE tokens)")]
    AlgNotAllowed(String),
    /// The header has `crit`; we understand no extensions.
    #[error("JWS header has crit, which is not supported")]
    Crit,
    /// The header has `b64` (RFC 7797 unencoded payloads).
    #[error("JWS header has b64, which is not supported")]
    B64,
    /// The signature is not 64 bytes (a DER signature, or truncated).
    #[error("signature is {len} bytes, not 64 (R || S)")]
    SignatureLength {
        /// Decoded length.
        len: usize,
    },
    /// ES256: `r` or `s` is zero or not below the group order; EdDSA: `S`
    /// is not below the group order (a malleated signature).
    #[error("signature scalar out of range")]
    SignatureScalar,
    /// The key cannot verify this algorithm (an ES256 JWS and an Ed25519
    /// key, or the reverse).
    #[error("alg {alg} does not fit a {key} key")]
    AlgKeyMismatch {
        /// The JWS's algorithm.
        alg: &'static str,
        /// The key's type.
        key: &'static str,
    },
    /// The signature does not verify under the key.
    #[error("signature does not verify")]
    BadSignature,
}

/// A parsed, not yet verified, compact JWS.
#[derive(Debug, Clone)]
pub struct Jws<'a> {
    alg: Alg,
    signing_input: &'a str,
    header: Map<String, Value>,
    payload: Map<String, Value>,
    signature: [u8; 64],
}

impl<'a> Jws<'a> {
    /// Parses `text` under `limits`, accepting ES256 only; the signature
    /// is not yet checked.
    ///
    /// # Errors
    /// [`JwsError`] naming the first rule broken.
    pub fn parse(text: &'a str, limits: &Limits) -> Result<Self, JwsError> {
        Self::parse_with(text, limits, ES256_ONLY)
    }

    /// As [`Jws::parse`], accepting the algorithms in `allowed` (for
    /// WIMSE tokens, [`ES256_OR_EDDSA`]).
    ///
    /// # Errors
    /// [`JwsError`] naming the first rule broken.
    pub fn parse_with(text: &'a str, limits: &Limits, allowed: &[Alg]) -> Result<Self, JwsError> {
        if text.len() > limits.max_len {
            return Err(JwsError::TooLong {
                len: text.len(),
                max: limits.max_len,
            });
        }
        let mut parts = text.splitn(4, '.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwsError::SegmentCount {
                found: text.split('.').count(),
            });
        };
        if b64::max_decoded_len(h.len()) > limits.max_header_len {
            return Err(JwsError::HeaderTooLong {
                max: limits.max_header_len,
            });
        }
        let header_bytes =
            b64::decode(h.as_bytes()).map_err(|_| JwsError::Encoding { segment: "header" })?;
        let header = json::parse_object(&header_bytes).map_err(JwsError::HeaderJson)?;
        let alg = check_header(&header, allowed)?;

        let signature = decode_signature(s, alg)?;
        let payload_bytes =
            b64::decode(p.as_bytes()).map_err(|_| JwsError::Encoding { segment: "payload" })?;
        let payload = json::parse_object(&payload_bytes).map_err(JwsError::PayloadJson)?;
        Ok(Self {
            alg,
            signing_input: &text[..h.len() + 1 + p.len()],
            header,
            payload,
            signature,
        })
    }

    /// The protected header.
    pub fn header(&self) -> &Map<String, Value> {
        &self.header
    }

    /// The payload (claims).
    pub fn payload(&self) -> &Map<String, Value> {
        &self.payload
    }

    /// The algorithm in the header (one the parse allowed).
    pub fn alg(&self) -> Alg {
        self.alg
    }

    /// Checks the ES256 signature over the received `header.payload`
    /// bytes.
    ///
    /// # Errors
    /// [`JwsError::BadSignature`], or [`JwsError::AlgKeyMismatch`] for a
    /// JWS that is not ES256.
    pub fn verify(&self, key: &PublicKey) -> Result<(), JwsError> {
        if self.alg != Alg::Es256 {
            return Err(JwsError::AlgKeyMismatch {
                alg: self.alg.as_str(),
                key: super::verifying::KEY_P256,
            });
        }
        key.parsed()
            .verify_sig(self.signing_input.as_bytes(), &self.signature)
            .map_err(|_| JwsError::BadSignature)
    }

    /// Checks the signature with a P-256 or Ed25519 key, which must fit
    /// the header's `alg`.
    ///
    /// # Errors
    /// [`JwsError::AlgKeyMismatch`] or [`JwsError::BadSignature`].
    pub fn verify_with(&self, key: &VerifyingKey) -> Result<(), JwsError> {
        key.verify(self.alg, self.signing_input.as_bytes(), &self.signature)
    }

    /// Whether the header's `typ` names the media type `expected`, compared
    /// as RFC 7515 §4.1.9 says: case-insensitively, with the `application/`
    /// prefix optional.
    pub fn typ_is(&self, expected: &str) -> bool {
        match self.header.get("typ") {
            Some(Value::String(typ)) => media_type_matches(typ, expected),
            _ => false,
        }
    }

    /// The header's `typ`, if it is a string.
    pub fn typ(&self) -> Option<&str> {
        self.header.get("typ").and_then(Value::as_str)
    }
}

fn media_type_matches(typ: &str, expected: &str) -> bool {
    let bare = match typ.get(..12) {
        Some(prefix) if prefix.eq_ignore_ascii_case("application/") => &typ[12..],
        _ => typ,
    };
    bare.eq_ignore_ascii_case(expected)
}

fn check_header(header: &Map<String, Value>, allowed: &[Alg]) -> Result<Alg, JwsError> {
    let name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JwsError::AlgMissing)?;
    let alg = Alg::from_name(name).filter(|a| allowed.contains(a));
    let Some(alg) = alg else {
        let alg = name;
        return Err(if alg.eq_ignore_ascii_case("none") {
            JwsError::AlgNone
        } else if alg
            .as_bytes()
            .get(..2)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"hs"))
        {
            JwsError::AlgHmac(truncate(alg))
        } else {
            JwsError::AlgNotAllowed(truncate(alg))
        });
    };
    if header.contains_key("crit") {
        return Err(JwsError::Crit);
    }
    if header.contains_key("b64") {
        return Err(JwsError::B64);
    }
    Ok(alg)
}

fn decode_signature(text: &str, alg: Alg) -> Result<[u8; 64], JwsError> {
    if text.len() != b64::encoded_len(64) {
        // Decode anyway (bounded by the token cap) to report the length.
        let len = b64::decode(text.as_bytes())
            .map_err(|_| JwsError::Encoding {
                segment: "signature",
            })?
            .len();
        return Err(JwsError::SignatureLength { len });
    }
    let sig = b64::decode_array::<64>(text.as_bytes()).map_err(|_| JwsError::Encoding {
        segment: "signature",
    })?;
    let (r, s) = sig.split_at(32);
    let in_range = match alg {
        Alg::Es256 => {
            let in_range = |v: &[u8]| v.iter().any(|&b| b != 0) && v < P256_ORDER.as_slice();
            in_range(r) && in_range(s)
        }
        // S is little-endian: compare from the most significant byte.
        Alg::EdDsa => s.iter().rev().lt(ED25519_ORDER.iter().rev()),
    };
    if !in_range {
        return Err(JwsError::SignatureScalar);
    }
    Ok(sig)
}

/// Cuts attacker-supplied strings kept in errors to a sane length.
pub(crate) fn truncate(s: &str) -> String {
    const MAX: usize = 64;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// Signs `payload_json` under an already encoded protected header,
/// returning the compact serialization. The header's `alg` must be
/// `key`'s ([`JwsSigner::alg`]).
///
/// Callers cache `header_b64` per key: it never changes.
///
/// # Errors
/// [`SignError`] if the crypto library fails.
pub fn sign_compact(
    header_b64: &str,
    payload_json: &[u8],
    key: &(impl JwsSigner + ?Sized),
) -> Result<String, SignError> {
    let mut out = String::with_capacity(header_b64.len() + payload_json.len() * 4 / 3 + 92);
    out.push_str(header_b64);
    out.push('.');
    b64::encode_into(payload_json, &mut out);
    let signature = key.sign_jws(out.as_bytes())?;
    out.push('.');
    b64::encode_into(signature, &mut out);
    Ok(out)
}

/// Encodes a header object once, for [`sign_compact`].
pub fn encode_header(header: &Value) -> String {
    b64::encode(header.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jose::SigningKey;
    use crate::jose::ed25519::Ed25519SigningKey;
    use serde_json::json;

    fn make(header: &Value, payload: &Value, key: &impl JwsSigner) -> String {
        sign_compact(&encode_header(header), payload.to_string().as_bytes(), key).unwrap()
    }

    fn es256() -> Value {
        json!({"alg":"ES256","typ":"x+jwt"})
    }

    fn parse(text: &str) -> Result<Jws<'_>, JwsError> {
        Jws::parse(text, &Limits::default())
    }

    #[test]
    fn signed_jws_parses_and_verifies() {
        let key = SigningKey::generate().unwrap();
        let text = make(&es256(), &json!({"a":1}), &key);
        let jws = parse(&text).unwrap();
        assert_eq!(jws.payload()["a"], 1);
        jws.verify(key.public_key()).unwrap();
        assert!(jws.typ_is("x+jwt"));
        assert!(jws.typ_is("X+JWT"));
    }

    #[test]
    fn another_key_does_not_verify() {
        let key = SigningKey::generate().unwrap();
        let other = SigningKey::generate().unwrap();
        let text = make(&es256(), &json!({"a":1}), &key);
        assert_eq!(
            parse(&text).unwrap().verify(other.public_key()),
            Err(JwsError::BadSignature)
        );
    }

    #[test]
    fn segment_counts_other_than_three_are_rejected() {
        let count = |t| parse(t).unwrap_err();
        assert_eq!(count("a.b"), JwsError::SegmentCount { found: 2 });
        assert_eq!(count("a.b.c.d.e"), JwsError::SegmentCount { found: 5 });
        assert_eq!(count(""), JwsError::SegmentCount { found: 1 });
    }

    #[test]
    fn size_caps_apply_before_decoding() {
        let huge = format!("{}.e30.AA", "A".repeat(10_000));
        assert!(matches!(parse(&huge), Err(JwsError::TooLong { .. })));
        let limits = Limits {
            max_len: 100_000,
            max_header_len: 4096,
        };
        let big_header = format!("{}.e30.AA", "A".repeat(6_000));
        assert_eq!(
            Jws::parse(&big_header, &limits).unwrap_err(),
            JwsError::HeaderTooLong { max: 4096 }
        );
    }

    #[test]
    fn alg_none_and_hmac_are_rejected_whatever_the_case() {
        let key = SigningKey::generate().unwrap();
        for (alg, want) in [
            ("none", JwsError::AlgNone),
            ("NoNe", JwsError::AlgNone),
            ("HS256", JwsError::AlgHmac("HS256".into())),
            ("hs512", JwsError::AlgHmac("hs512".into())),
            ("ES384", JwsError::AlgNotAllowed("ES384".into())),
            ("RS256", JwsError::AlgNotAllowed("RS256".into())),
        ] {
            let text = make(&json!({"alg":alg}), &json!({}), &key);
            assert_eq!(parse(&text).unwrap_err(), want, "alg {alg}");
        }
        let text = make(&json!({"typ":"jwt"}), &json!({}), &key);
        assert_eq!(parse(&text).unwrap_err(), JwsError::AlgMissing);
    }

    #[test]
    fn multibyte_alg_is_rejected_without_panicking() {
        // Found by fuzzing: the HMAC prefix check sliced `alg` at byte 2,
        // inside a multi-byte character.
        let key = SigningKey::generate().unwrap();
        for alg in ["4\u{d5}\u{91}C6", "H\u{e9}256", "\u{1f600}"] {
            let text = make(&json!({"alg": alg}), &json!({}), &key);
            assert!(
                matches!(parse(&text), Err(JwsError::AlgNotAllowed(_))),
                "{alg}"
            );
        }
    }

    #[test]
    fn crit_and_b64_are_rejected() {
        let key = SigningKey::generate().unwrap();
        let text = make(&json!({"alg":"ES256","crit":["exp"]}), &json!({}), &key);
        assert_eq!(parse(&text).unwrap_err(), JwsError::Crit);
        let text = make(&json!({"alg":"ES256","b64":false}), &json!({}), &key);
        assert_eq!(parse(&text).unwrap_err(), JwsError::B64);
    }

    #[test]
    fn zero_and_order_sized_scalars_are_rejected() {
        let h = encode_header(&es256());
        let p = b64::encode("{}");
        let zero = b64::encode([0u8; 64]);
        assert_eq!(
            parse(&format!("{h}.{p}.{zero}")).unwrap_err(),
            JwsError::SignatureScalar
        );
        let mut r_is_n = [1u8; 64];
        r_is_n[..32].copy_from_slice(&P256_ORDER);
        let sig = b64::encode(r_is_n);
        assert_eq!(
            parse(&format!("{h}.{p}.{sig}")).unwrap_err(),
            JwsError::SignatureScalar
        );
    }

    #[test]
    fn der_encoded_signature_is_rejected_by_length() {
        let h = encode_header(&es256());
        let p = b64::encode("{}");
        let der = b64::encode([0x30u8; 71]);
        assert_eq!(
            parse(&format!("{h}.{p}.{der}")).unwrap_err(),
            JwsError::SignatureLength { len: 71 }
        );
    }

    #[test]
    fn non_canonical_base64_in_any_segment_is_rejected() {
        let key = SigningKey::generate().unwrap();
        let text = make(&es256(), &json!({"a":1}), &key);
        let (h, rest) = text.split_once('.').unwrap();
        assert_eq!(
            parse(&format!("{h}=.{rest}")).unwrap_err(),
            JwsError::Encoding { segment: "header" }
        );
        let (_, s) = text.rsplit_once('.').unwrap();
        // The standard alphabet: 0xfb bytes encode to '+' and '/'.
        let standard = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD_NO_PAD.encode([0xfbu8; 64])
        };
        assert!(standard.contains(['+', '/']));
        assert_eq!(
            parse(&format!("{h}.eyJhIjoxfQ.{standard}")).unwrap_err(),
            JwsError::Encoding {
                segment: "signature"
            }
        );
        let payload_padded = format!("{h}.eyJhIjoxfQ==.{s}");
        assert_eq!(
            parse(&payload_padded).unwrap_err(),
            JwsError::Encoding { segment: "payload" }
        );
    }

    #[test]
    fn duplicate_header_members_are_rejected() {
        let h = b64::encode(r#"{"alg":"ES256","alg":"none"}"#);
        let text = format!("{h}.e30.{}", b64::encode([1u8; 64]));
        assert_eq!(
            parse(&text).unwrap_err(),
            JwsError::HeaderJson(JsonError::DuplicateMember("alg".into()))
        );
    }

    #[test]
    fn non_object_payload_is_rejected() {
        let h = encode_header(&es256());
        let text = format!("{h}.{}.{}", b64::encode("[1]"), b64::encode([1u8; 64]));
        assert_eq!(
            parse(&text).unwrap_err(),
            JwsError::PayloadJson(JsonError::NotAnObject)
        );
        let text = format!("{h}.{}.{}", b64::encode("nope"), b64::encode([1u8; 64]));
        assert!(matches!(
            parse(&text).unwrap_err(),
            JwsError::PayloadJson(JsonError::Syntax(_))
        ));
    }

    fn eddsa() -> Value {
        json!({"alg":"EdDSA","typ":"x+jwt"})
    }

    #[test]
    fn eddsa_parses_and_verifies_only_where_asked_for() {
        let key = Ed25519SigningKey::generate().unwrap();
        let text = make(&eddsa(), &json!({"a":1}), &key);
        assert_eq!(
            parse(&text).unwrap_err(),
            JwsError::AlgNotAllowed("EdDSA".into())
        );
        let jws = Jws::parse_with(&text, &Limits::default(), ES256_OR_EDDSA).unwrap();
        assert_eq!(jws.alg(), Alg::EdDsa);
        jws.verify_with(&VerifyingKey::Ed25519(key.public_key().clone()))
            .unwrap();
        // The ES256-only verify refuses it rather than trying the bytes
        // as an ECDSA signature.
        let p256 = SigningKey::generate().unwrap();
        assert_eq!(
            jws.verify(p256.public_key()),
            Err(JwsError::AlgKeyMismatch {
                alg: "EdDSA",
                key: "EC P-256"
            })
        );
        assert_eq!(
            jws.verify_with(&VerifyingKey::P256(p256.public_key().clone())),
            Err(JwsError::AlgKeyMismatch {
                alg: "EdDSA",
                key: "EC P-256"
            })
        );
    }

    #[test]
    fn the_wimse_allow_list_still_refuses_none_hmac_rsa_and_larger_curves() {
        let key = SigningKey::generate().unwrap();
        for (alg, want) in [
            ("none", JwsError::AlgNone),
            ("HS256", JwsError::AlgHmac("HS256".into())),
            ("RS256", JwsError::AlgNotAllowed("RS256".into())),
            ("PS256", JwsError::AlgNotAllowed("PS256".into())),
            ("ES384", JwsError::AlgNotAllowed("ES384".into())),
            ("ES512", JwsError::AlgNotAllowed("ES512".into())),
            ("eddsa", JwsError::AlgNotAllowed("eddsa".into())),
            ("Ed25519", JwsError::AlgNotAllowed("Ed25519".into())),
        ] {
            let text = make(&json!({"alg":alg}), &json!({}), &key);
            assert_eq!(
                Jws::parse_with(&text, &Limits::default(), ES256_OR_EDDSA).unwrap_err(),
                want,
                "alg {alg}"
            );
        }
    }

    #[test]
    fn eddsa_signature_with_s_not_below_the_order_is_rejected() {
        let key = Ed25519SigningKey::generate().unwrap();
        let text = make(&eddsa(), &json!({}), &key);
        let (input, sig) = text.rsplit_once('.').unwrap();
        let mut sig = b64::decode(sig.as_bytes()).unwrap();
        // S + L is the classic malleation: the same point equation holds.
        let mut carry = 0u16;
        for i in 0..32 {
            let sum = u16::from(sig[32 + i]) + u16::from(ED25519_ORDER[i]) + carry;
            sig[32 + i] = sum as u8;
            carry = sum >> 8;
        }
        let malleated = format!("{input}.{}", b64::encode(&sig));
        assert_eq!(
            Jws::parse_with(&malleated, &Limits::default(), ES256_OR_EDDSA).unwrap_err(),
            JwsError::SignatureScalar
        );
        let mut at_order = [0u8; 64];
        at_order[32..].copy_from_slice(&ED25519_ORDER);
        let text = format!("{input}.{}", b64::encode(at_order));
        assert_eq!(
            Jws::parse_with(&text, &Limits::default(), ES256_OR_EDDSA).unwrap_err(),
            JwsError::SignatureScalar
        );
    }

    #[test]
    fn media_type_comparison_follows_rfc7515() {
        assert!(media_type_matches("dpop+jwt", "dpop+jwt"));
        assert!(media_type_matches("application/DPoP+JWT", "dpop+jwt"));
        assert!(!media_type_matches("dpop+jwt ", "dpop+jwt"));
        assert!(!media_type_matches("at+jwt", "dpop+jwt"));
        assert!(!media_type_matches("application/", "dpop+jwt"));
    }
}
