//! Strict base64url (RFC 4648 §5) without padding, as JOSE requires
//! (RFC 7515 §2).
//!
//! Stricter than "whatever decodes": padding, `+`, `/`, whitespace and
//! non-zero trailing bits are all rejected, so every byte string has exactly
//! one accepted encoding. Without that, two different strings would carry the
//! same signature and a replay cache keyed by the string could be bypassed.

use base64::Engine as _;
use base64::alphabet::URL_SAFE;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};

const ENGINE: GeneralPurpose = GeneralPurpose::new(
    &URL_SAFE,
    GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone)
        .with_decode_allow_trailing_bits(false),
);

/// The input was not canonical unpadded base64url.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not canonical unpadded base64url")]
pub struct Base64Error;

/// Encodes `bytes` as unpadded base64url.
pub fn encode(bytes: impl AsRef<[u8]>) -> String {
    ENGINE.encode(bytes)
}

/// Appends the unpadded base64url encoding of `bytes` to `out`.
pub fn encode_into(bytes: impl AsRef<[u8]>, out: &mut String) {
    ENGINE.encode_string(bytes, out);
}

/// Decodes canonical unpadded base64url.
///
/// # Errors
/// [`Base64Error`] for any character outside the URL-safe alphabet
/// (including `=`, `+`, `/` and whitespace), an impossible length, or
/// non-zero trailing bits.
pub fn decode(text: &[u8]) -> Result<Vec<u8>, Base64Error> {
    ENGINE.decode(text).map_err(|_| Base64Error)
}

/// Decodes into a fixed-size array; any other decoded length is an error.
///
/// # Errors
/// [`Base64Error`] as for [`decode`], or when the length is not `N`.
pub fn decode_array<const N: usize>(text: &[u8]) -> Result<[u8; N], Base64Error> {
    // Checking the encoded length first keeps a hostile huge input from
    // being decoded at all.
    if text.len() != encoded_len(N) {
        return Err(Base64Error);
    }
    let mut out = [0u8; N];
    match ENGINE.decode_slice(text, &mut out) {
        Ok(n) if n == N => Ok(out),
        _ => Err(Base64Error),
    }
}

/// Length of the unpadded encoding of `n` bytes.
pub const fn encoded_len(n: usize) -> usize {
    (n * 4).div_ceil(3)
}

/// Largest decoded size that an encoded text of `len` characters can have.
pub const fn max_decoded_len(len: usize) -> usize {
    len * 3 / 4
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_length() {
        for n in 0..70 {
            let bytes: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            let text = encode(&bytes);
            assert_eq!(text.len(), encoded_len(n));
            assert_eq!(decode(text.as_bytes()).unwrap(), bytes);
        }
    }

    #[test]
    fn padding_is_rejected() {
        assert_eq!(decode(b"YQ"), Ok(b"a".to_vec()));
        assert_eq!(decode(b"YQ=="), Err(Base64Error));
        assert_eq!(decode(b"YQ="), Err(Base64Error));
    }

    #[test]
    fn standard_alphabet_and_whitespace_are_rejected() {
        assert_eq!(decode(b"-_8"), Ok(vec![0xfb, 0xff]));
        assert_eq!(decode(b"+/8"), Err(Base64Error));
        assert_eq!(decode(b"YW Jj"), Err(Base64Error));
        assert_eq!(decode(b"YWJj\n"), Err(Base64Error));
    }

    #[test]
    fn non_zero_trailing_bits_are_rejected() {
        // "YQ" is the canonical form of "a"; "YR" decodes to the same byte
        // with a non-zero trailing bit.
        assert_eq!(decode(b"YR"), Err(Base64Error));
    }

    #[test]
    fn impossible_length_is_rejected() {
        assert_eq!(decode(b"Y"), Err(Base64Error));
        assert_eq!(decode(b"YWJjZ"), Err(Base64Error));
    }

    #[test]
    fn fixed_arrays_demand_the_exact_length() {
        let text = encode([7u8; 32]);
        assert_eq!(decode_array::<32>(text.as_bytes()), Ok([7u8; 32]));
        assert_eq!(decode_array::<31>(text.as_bytes()), Err(Base64Error));
        assert_eq!(decode_array::<33>(text.as_bytes()), Err(Base64Error));
    }
}
