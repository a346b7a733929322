//! Who is at the other end of a mutual-TLS connection: the SPIFFE ID of
//! the peer's X.509-SVID and the RFC 7638 thumbprint of its public key.
//! A tally sidecar's SVID key is also its DPoP key, so a token whose
//! `cnf.jkt` is that thumbprint is bound to the connection's peer: the
//! TLS handshake proved possession of its key.
//!
//! Read from a leaf certificate the TLS layer has already verified
//! against the trust bundle; nothing here verifies a signature.

use super::SpiffeId;
use crate::jose::{Jkt, PublicKey};

/// The identity a verified TLS peer presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The SVID's one URI SAN.
    pub spiffe_id: SpiffeId,
    /// Thumbprint of the SVID's P-256 key (what `cnf.jkt` names).
    pub jkt: Jkt,
    /// The SVID's `notAfter` (Unix seconds): the connection ends then.
    pub expires_at: u64,
}

/// Why a verified certificate names no mesh peer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerError {
    /// Not a parsable X.509 certificate.
    #[error("not an X.509 certificate")]
    NotCertificate,
    /// No single SPIFFE ID in its URI SANs.
    #[error("{0}")]
    NoSpiffeId(String),
    /// Its key is not an uncompressed P-256 point.
    #[error("the certificate's key is not a P-256 key")]
    NotP256,
}

impl PeerIdentity {
    /// The identity in a leaf certificate (DER).
    ///
    /// # Errors
    /// [`PeerError`] when it is not an SVID with a P-256 key.
    pub fn of(leaf_der: &[u8]) -> Result<Self, PeerError> {
        let spiffe_id = crate::ca::spiffe_id_of(leaf_der).map_err(PeerError::NoSpiffeId)?;
        let (key, expires_at) = key_and_expiry(leaf_der)?;
        Ok(Self {
            spiffe_id,
            jkt: key.thumbprint(),
            expires_at,
        })
    }
}

/// The P-256 public key of a certificate (DER) and its `notAfter` (Unix
/// seconds): what a credential bound to the certificate's key (a WIT's
/// `cnf.jwk`) names, and how long it may live.
///
/// # Errors
/// [`PeerError::NotCertificate`], or [`PeerError::NotP256`] for any other
/// kind of key.
pub fn key_and_expiry(cert_der: &[u8]) -> Result<(PublicKey, u64), PeerError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(cert_der).map_err(|_| PeerError::NotCertificate)?;
    let spki = cert.public_key();
    let key =
        PublicKey::from_sec1(&spki.subject_public_key.data).map_err(|_| PeerError::NotP256)?;
    let expires_at = u64::try_from(cert.validity().not_after.timestamp()).unwrap_or(0);
    Ok((key, expires_at))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Authority, Lifetimes};

    #[test]
    fn a_leaf_names_its_spiffe_id_key_thumbprint_and_expiry() {
        let now = 1_700_000_000;
        let td: SpiffeId = "spiffe://example.org".parse().unwrap();
        let (ca, _) = Authority::generate(&td, Lifetimes::default(), now).unwrap();
        let id: SpiffeId = "spiffe://example.org/ns/pay/sa/payments".parse().unwrap();
        let credential = ca.issue_credential(&id, &[], &[], 600, now).unwrap();
        let leaf = crate::ca::pem_body(&credential.cert_chain_pem).unwrap();
        let key = crate::jose::SigningKey::from_pkcs8_pem(credential.key_pem.as_bytes()).unwrap();

        let peer = PeerIdentity::of(&leaf).unwrap();
        assert_eq!(peer.spiffe_id, id);
        assert_eq!(peer.jkt, key.thumbprint());
        assert_eq!(peer.expires_at, now + 600);
        let (public, not_after) = key_and_expiry(&leaf).unwrap();
        assert_eq!(&public, key.public_key());
        assert_eq!(not_after, now + 600);
    }

    #[test]
    fn a_certificate_for_another_kind_of_key_has_no_p256_key() {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        assert_eq!(
            key_and_expiry(cert.der()).map(|_| ()),
            Err(PeerError::NotP256)
        );
        assert_eq!(
            key_and_expiry(b"not DER").map(|_| ()),
            Err(PeerError::NotCertificate)
        );
    }

    #[test]
    fn a_certificate_without_a_spiffe_id_or_not_a_certificate_names_no_peer() {
        assert_eq!(
            PeerIdentity::of(b"not DER"),
            Err(PeerError::NoSpiffeId("not an X.509 certificate".into()))
        );
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let cert = params.self_signed(&key).unwrap();
        assert!(matches!(
            PeerIdentity::of(cert.der()),
            Err(PeerError::NoSpiffeId(_))
        ));
    }
}
