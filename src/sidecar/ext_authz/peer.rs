//! Who sent the request Envoy asks about, from what the check says of
//! the downstream connection.
//!
//! Envoy sets `source.principal` to the URI SAN of the client
//! certificate it verified when it terminated mutual TLS, and
//! `source.certificate` to that certificate (URL-encoded PEM) when the
//! filter sets `include_peer_certificate: true`. Anyone who can reach
//! this service can write either, so a claim gains nothing by itself:
//!
//! - a certificate is verified here, against this sidecar's trust bundle
//!   (as the inbound port's TLS layer would: chain, validity now, client
//!   usage), with the intermediates sent after the leaf and this
//!   sidecar's own; it must name the principal, when one is claimed.
//!   Then, when the check came over the sidecar's Unix socket (callers
//!   chosen by its file mode and `--allow-uid`: Envoy, not any local
//!   process), the hop is treated as the inbound proxy treats a mesh
//!   peer: a token bound to that key needs no proof, and a token whose
//!   `sub` is not that peer is refused whatever proof it carries. Over
//!   TCP anyone local can send a check, and a certificate is public (every
//!   handshake shows it), so there it only narrows, like a principal;
//! - a principal without a certificate can only narrow: a token whose
//!   `sub` differs is refused, and possession is still proven per
//!   request with a DPoP proof;
//! - a principal that is not a SPIFFE ID (a client certificate outside
//!   the mesh) names no mesh peer and is ignored.

use super::super::identity::Svid;
use crate::auth::ForwardedError;
use crate::identity::{PeerIdentity, SpiffeId};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;
use std::sync::{Arc, Mutex, PoisonError};

/// What the check says of its peer, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerClaim {
    /// Nothing usable: judged as plaintext, with a proof.
    None,
    /// A principal without a certificate.
    Claimed(SpiffeId),
    /// A certificate that verified.
    Verified(PeerIdentity),
}

/// A verifier and the bundle (DER roots) it was built from.
type Built = (Vec<Vec<u8>>, Arc<dyn ClientCertVerifier>);

/// Client-certificate verifiers, one per trust bundle (rebuilt when the
/// bundle changes).
#[derive(Default)]
pub struct PeerVerifier {
    built: Mutex<Option<Built>>,
}

impl std::fmt::Debug for PeerVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerVerifier")
    }
}

impl PeerVerifier {
    /// Checks a check's `principal` and `certificate` (PEM) against the
    /// trust `bundle` (DER roots) at `now` (Unix seconds); `svid` lends
    /// its intermediates.
    ///
    /// # Errors
    /// [`ForwardedError::PeerUnverified`] for a certificate that does not
    /// verify or does not name the principal.
    pub fn check(
        &self,
        principal: Option<&str>,
        certificate: Option<&str>,
        bundle: &[Vec<u8>],
        svid: &Svid,
        now: u64,
    ) -> Result<PeerClaim, ForwardedError> {
        let unverified = |why: &str| ForwardedError::PeerUnverified(why.to_owned());
        let Some(pem) = certificate else {
            return Ok(principal
                .and_then(|p| p.parse::<SpiffeId>().ok())
                .map_or(PeerClaim::None, PeerClaim::Claimed));
        };
        let sent = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| unverified("it is not PEM"))?;
        let (leaf, intermediates) = sent
            .split_first()
            .ok_or_else(|| unverified("it is empty"))?;
        let mut intermediates = intermediates.to_vec();
        intermediates.extend(
            CertificateDer::pem_slice_iter(svid.chain_pem.as_bytes())
                .skip(1)
                .filter_map(Result::ok),
        );
        let verifier = self.verifier(bundle)?;
        verifier
            .verify_client_cert(
                leaf,
                &intermediates,
                UnixTime::since_unix_epoch(std::time::Duration::from_secs(now)),
            )
            .map_err(|_| {
                unverified("it does not chain to the trust bundle, or is not valid now")
            })?;
        let identity =
            PeerIdentity::of(leaf).map_err(|_| unverified("it is not an SVID with a P-256 key"))?;
        if principal.is_some_and(|p| p != identity.spiffe_id.as_str()) {
            return Err(unverified("it does not name the claimed principal"));
        }
        Ok(PeerClaim::Verified(identity))
    }

    fn verifier(&self, bundle: &[Vec<u8>]) -> Result<Arc<dyn ClientCertVerifier>, ForwardedError> {
        let mut built = self.built.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((roots, verifier)) = built.as_ref()
            && roots.as_slice() == bundle
        {
            return Ok(Arc::clone(verifier));
        }
        let no_bundle = || ForwardedError::PeerUnverified("no trust bundle yet".into());
        let mut roots = rustls::RootCertStore::empty();
        for der in bundle {
            roots
                .add(CertificateDer::from(der.clone()))
                .map_err(|_| no_bundle())?;
        }
        if roots.is_empty() {
            return Err(no_bundle());
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let verifier: Arc<dyn ClientCertVerifier> =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|_| no_bundle())?;
        *built = Some((bundle.to_vec(), Arc::clone(&verifier)));
        Ok(verifier)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::{Authority, Lifetimes};

    const NOW: u64 = 1_700_000_000;

    struct Domain {
        bundle: Vec<Vec<u8>>,
        svid: Svid,
        ca: Authority,
    }

    fn domain(td: &str) -> Domain {
        let td: SpiffeId = format!("spiffe://{td}").parse().unwrap();
        let (ca, _) = Authority::generate(&td, Lifetimes::default(), NOW).unwrap();
        let bundle = CertificateDer::pem_slice_iter(ca.bundle_pem().as_bytes())
            .map(|c| c.unwrap().to_vec())
            .collect();
        let own: SpiffeId = format!("{td}/ns/pay/sa/payments").parse().unwrap();
        let credential = ca.issue_credential(&own, &[], &[], 600, NOW).unwrap();
        let svid = Svid {
            spiffe_id: own,
            chain_pem: credential.cert_chain_pem.clone(),
            key_pem: credential.key_pem.clone(),
            bundle_pem: ca.bundle_pem(),
            issued_at: NOW,
            expires_at: NOW + 600,
            issuer: "https://broker".into(),
        };
        Domain { bundle, svid, ca }
    }

    fn leaf_pem(d: &Domain, id: &str) -> String {
        let id: SpiffeId = id.parse().unwrap();
        let credential = d.ca.issue_credential(&id, &[], &[], 600, NOW).unwrap();
        // The leaf alone, as Envoy sends it.
        let first = credential
            .cert_chain_pem
            .find("-----END CERTIFICATE-----")
            .unwrap();
        credential.cert_chain_pem[..first + "-----END CERTIFICATE-----\n".len()].to_owned()
    }

    #[test]
    fn a_certificate_from_the_bundle_naming_the_principal_is_a_verified_peer() {
        let d = domain("example.org");
        let checkout = "spiffe://example.org/ns/shop/sa/checkout";
        let pem = leaf_pem(&d, checkout);
        let v = PeerVerifier::default();
        let PeerClaim::Verified(peer) = v
            .check(Some(checkout), Some(&pem), &d.bundle, &d.svid, NOW)
            .unwrap()
        else {
            panic!("not verified");
        };
        assert_eq!(peer.spiffe_id.as_str(), checkout);
        assert!(matches!(
            v.check(
                Some("spiffe://example.org/ns/x/sa/admin"),
                Some(&pem),
                &d.bundle,
                &d.svid,
                NOW
            ),
            Err(ForwardedError::PeerUnverified(_))
        ));
        assert!(
            v.check(None, Some(&pem), &d.bundle, &d.svid, NOW + 3600)
                .is_err(),
            "expired by then"
        );
    }

    #[test]
    fn a_certificate_from_another_authority_is_refused_whatever_it_claims() {
        let ours = domain("example.org");
        let v = PeerVerifier::default();
        // Another CA for the same trust domain name, and another domain.
        let rogue = domain("example.org");
        let checkout = "spiffe://example.org/ns/shop/sa/checkout";
        let forged = leaf_pem(&rogue, checkout);
        let other = leaf_pem(
            &domain("evil.example"),
            "spiffe://evil.example/ns/shop/sa/checkout",
        );
        for (principal, pem) in [
            (Some(checkout), &forged),
            (None, &forged),
            (Some("spiffe://evil.example/ns/shop/sa/checkout"), &other),
        ] {
            assert!(matches!(
                v.check(principal, Some(pem), &ours.bundle, &ours.svid, NOW),
                Err(ForwardedError::PeerUnverified(_))
            ));
        }
    }

    #[test]
    fn a_principal_alone_is_only_a_claim_and_a_non_spiffe_one_is_ignored() {
        let d = domain("example.org");
        let v = PeerVerifier::default();
        let id = "spiffe://example.org/ns/shop/sa/checkout";
        assert_eq!(
            v.check(Some(id), None, &d.bundle, &d.svid, NOW).unwrap(),
            PeerClaim::Claimed(id.parse().unwrap())
        );
        assert_eq!(
            v.check(Some("CN=client"), None, &d.bundle, &d.svid, NOW)
                .unwrap(),
            PeerClaim::None
        );
        assert_eq!(
            v.check(None, None, &d.bundle, &d.svid, NOW).unwrap(),
            PeerClaim::None
        );
    }
}
