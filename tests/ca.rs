//! The identity CA, checked the way a peer checks it: chains verified with
//! rustls-webpki at a fixed `now`, SANs read with x509-parser.

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, SanType};
use rustls_pki_types::{CertificateDer, UnixTime};
use std::time::Duration;
use tally::ca::{Authority, CaError, Lifetimes, Svid};
use tally::identity::SpiffeId;

const NOW: u64 = 1_800_000_000;
const ID: &str = "spiffe://example.org/ns/shop/sa/checkout";

fn id(s: &str) -> SpiffeId {
    s.parse().unwrap()
}

fn csr(sans: &[&str], alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).try_into().unwrap()))
        .collect();
    params.serialize_request(&key).unwrap().der().to_vec()
}

fn authority() -> (Authority, tally::ca::CaMaterial) {
    Authority::generate(&id("spiffe://example.org"), Lifetimes::default(), NOW).unwrap()
}

fn verify_chain(bundle: &[u8], svid: &Svid, at: u64) -> Result<(), webpki::Error> {
    let root = CertificateDer::from(bundle);
    let anchor = webpki::anchor_from_trusted_cert(&root)?;
    let leaf = CertificateDer::from(svid.cert_der.as_slice());
    let ee = webpki::EndEntityCert::try_from(&leaf)?;
    let chain: Vec<CertificateDer<'_>> = svid
        .chain_der
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    ee.verify_for_usage(
        &[webpki::aws_lc_rs::ECDSA_P256_SHA256],
        &[anchor],
        &chain,
        UnixTime::since_unix_epoch(Duration::from_secs(at)),
        webpki::KeyUsage::client_auth(),
        None,
        None,
    )
    .map(|_| ())
}

fn uri_sans(der: &[u8]) -> Vec<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    let mut out = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::URI(u) = name {
                out.push((*u).to_owned());
            }
        }
    }
    out
}

#[test]
fn an_svid_chains_to_the_bundle_and_names_exactly_the_attested_id() {
    let (ca, _) = authority();
    let svid = ca
        .issue_svid(&csr(&[], &PKCS_ECDSA_P256_SHA256), &id(ID), 3600, NOW)
        .unwrap();
    assert_eq!(svid.expires_at, NOW + 3600);
    verify_chain(&ca.bundle_der()[0], &svid, NOW).unwrap();
    assert_eq!(uri_sans(&svid.cert_der), vec![ID.to_owned()]);
    let (_, cert) = x509_parser::parse_x509_certificate(&svid.cert_der).unwrap();
    assert!(!cert.is_ca());
    assert_eq!(cert.validity().not_after.timestamp(), (NOW + 3600) as i64);
    // The intermediate carries the trust domain ID and is a CA.
    assert_eq!(
        uri_sans(ca.intermediate_der()),
        vec!["spiffe://example.org".to_owned()]
    );
}

#[test]
fn an_svid_is_not_valid_after_it_expires() {
    let (ca, _) = authority();
    let svid = ca
        .issue_svid(&csr(&[ID], &PKCS_ECDSA_P256_SHA256), &id(ID), 3600, NOW)
        .unwrap();
    verify_chain(&ca.bundle_der()[0], &svid, NOW + 3599).unwrap();
    assert!(verify_chain(&ca.bundle_der()[0], &svid, NOW + 3601).is_err());
}

#[test]
fn a_csr_asking_for_another_identity_is_refused() {
    let (ca, _) = authority();
    let other = "spiffe://example.org/ns/pay/sa/payments";
    let err = ca
        .issue_svid(&csr(&[other], &PKCS_ECDSA_P256_SHA256), &id(ID), 3600, NOW)
        .unwrap_err();
    assert!(matches!(err, CaError::CsrIdentity { .. }), "{err:?}");
    let err = ca
        .issue_svid(
            &csr(&[ID, other], &PKCS_ECDSA_P256_SHA256),
            &id(ID),
            3600,
            NOW,
        )
        .unwrap_err();
    assert!(matches!(err, CaError::CsrIdentity { .. }), "{err:?}");
}

#[test]
fn an_id_outside_the_trust_domain_is_refused() {
    let (ca, _) = authority();
    let foreign = "spiffe://evil.example/ns/shop/sa/checkout";
    let err = ca
        .issue_svid(&csr(&[], &PKCS_ECDSA_P256_SHA256), &id(foreign), 3600, NOW)
        .unwrap_err();
    assert!(matches!(err, CaError::CsrIdentity { .. }));
}

#[test]
fn only_p256_keys_are_accepted() {
    let (ca, _) = authority();
    let err = ca
        .issue_svid(&csr(&[], &PKCS_ECDSA_P384_SHA384), &id(ID), 3600, NOW)
        .unwrap_err();
    assert_eq!(err, CaError::CsrKeyType);
}

#[test]
fn a_tampered_or_garbage_csr_is_refused() {
    let (ca, _) = authority();
    let mut der = csr(&[ID], &PKCS_ECDSA_P256_SHA256);
    let last = der.len() - 5;
    der[last] ^= 0x01; // inside the signature
    assert_eq!(
        ca.issue_svid(&der, &id(ID), 3600, NOW).unwrap_err(),
        CaError::CsrInvalid
    );
    assert_eq!(
        ca.issue_svid(b"not a csr", &id(ID), 3600, NOW).unwrap_err(),
        CaError::CsrInvalid
    );
    assert_eq!(
        ca.issue_svid(&[0u8; 9000], &id(ID), 3600, NOW).unwrap_err(),
        CaError::CsrTooLarge
    );
}

#[test]
fn lifetimes_are_bounded() {
    let (ca, _) = authority();
    let c = csr(&[], &PKCS_ECDSA_P256_SHA256);
    assert!(matches!(
        ca.issue_svid(&c, &id(ID), 0, NOW),
        Err(CaError::Lifetime { .. })
    ));
    assert!(matches!(
        ca.issue_svid(&c, &id(ID), 48 * 3600, NOW),
        Err(CaError::Lifetime { .. })
    ));
}

#[test]
fn svids_never_outlive_the_intermediate() {
    let lifetimes = Lifetimes {
        intermediate_secs: 1800,
        ..Lifetimes::default()
    };
    let (ca, _) = Authority::generate(&id("spiffe://example.org"), lifetimes, NOW).unwrap();
    let svid = ca
        .issue_svid(&csr(&[], &PKCS_ECDSA_P256_SHA256), &id(ID), 3600, NOW)
        .unwrap();
    assert_eq!(svid.expires_at, NOW + 1800);
}

#[test]
fn a_reloaded_authority_issues_under_the_same_bundle() {
    let (ca, material) = authority();
    let again =
        Authority::load(&id("spiffe://example.org"), &material, Lifetimes::default()).unwrap();
    assert_eq!(again.bundle_pem(), ca.bundle_pem());
    let svid = again
        .issue_svid(&csr(&[], &PKCS_ECDSA_P256_SHA256), &id(ID), 600, NOW)
        .unwrap();
    verify_chain(&ca.bundle_der()[0], &svid, NOW).unwrap();
}

#[test]
fn loading_refuses_a_key_that_does_not_match_the_certificate() {
    let (_, mut material) = authority();
    let (_, other) = authority();
    material.intermediate_key_pem = other.intermediate_key_pem;
    let err =
        Authority::load(&id("spiffe://example.org"), &material, Lifetimes::default()).unwrap_err();
    assert!(matches!(err, CaError::Material(_)));
}

#[test]
fn ca_material_debug_hides_the_keys() {
    let (ca, material) = authority();
    let debug = format!("{material:?} {ca:?}");
    assert!(debug.contains("<redacted>"));
    assert!(!debug.contains("PRIVATE KEY"));
    let key_line = material
        .intermediate_key_pem
        .lines()
        .nth(1)
        .unwrap()
        .to_owned();
    assert!(!debug.contains(&key_line));
}
