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
    assert!(matches!(
        verify_chain(&ca.bundle_der()[0], &svid, NOW + 3601),
        Err(webpki::Error::CertExpired { .. })
    ));
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
fn a_csr_naming_a_dns_host_is_refused_in_words_not_debug_output() {
    let (ca, _) = authority();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::DnsName("pay.example".try_into().unwrap())];
    let der = params.serialize_request(&key).unwrap().der().to_vec();
    let err = ca.issue_svid(&der, &id(ID), 3600, NOW).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("CSR asks for identity \"DNS name pay.example\", but the caller proved {ID}")
    );
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
    assert_eq!(
        err,
        CaError::CsrKeyType {
            found: "a P-384 key".into()
        }
    );
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

/// A root CA made elsewhere (as an operator's PKI would), valid around NOW.
fn external_root(is_ca: bool, not_after: u64) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = if is_ca {
        rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained)
    } else {
        rcgen::IsCa::NoCa
    };
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    params.not_before = time::OffsetDateTime::from_unix_timestamp((NOW - 86_400) as i64).unwrap();
    params.not_after = time::OffsetDateTime::from_unix_timestamp(not_after as i64).unwrap();
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), key.serialize_pem())
}

#[test]
fn an_operator_supplied_root_anchors_the_svids() {
    let (cert, key) = external_root(true, NOW + 365 * 86_400);
    let td = id("spiffe://example.org");
    let (ca, material) = Authority::from_root(&td, &cert, &key, Lifetimes::default(), NOW).unwrap();
    assert_eq!(
        ca.bundle_pem(),
        tally::ca::pem("CERTIFICATE", &ca.bundle_der()[0])
    );
    assert!(
        cert.contains(ca.bundle_pem().lines().nth(1).unwrap()),
        "the bundle is the supplied root"
    );
    let svid = ca
        .issue_svid(&csr(&[], &PKCS_ECDSA_P256_SHA256), &id(ID), 3600, NOW)
        .unwrap();
    verify_chain(&ca.bundle_der()[0], &svid, NOW + 60).unwrap();
    assert!(
        material.root_key_pem.is_some(),
        "kept (sealed) for intermediate rotation"
    );

    // The intermediate never outlives a root that ends sooner.
    let (short, short_key) = external_root(true, NOW + 10 * 86_400);
    let (ca, _) = Authority::from_root(&td, &short, &short_key, Lifetimes::default(), NOW).unwrap();
    assert_eq!(ca.intermediate_expires_at(), NOW + 10 * 86_400);
}

#[test]
fn an_unusable_supplied_root_is_refused_with_the_reason() {
    let td = id("spiffe://example.org");
    let (cert, _) = external_root(true, NOW + 86_400);
    let (_, other_key) = external_root(true, NOW + 86_400);
    let (leaf, leaf_key) = external_root(false, NOW + 86_400);
    let (expired, expired_key) = external_root(true, NOW - 1);
    for (c, k, needle) in [
        (&cert, &other_key, "does not match"),
        (&leaf, &leaf_key, "not a CA"),
        (&expired, &expired_key, "not valid now"),
        (&"junk".to_owned(), &other_key, "not PEM"),
    ] {
        let err = Authority::from_root(&td, c, k, Lifetimes::default(), NOW).unwrap_err();
        assert!(err.to_string().contains(needle), "{err}");
    }
}

#[test]
fn rotating_the_intermediate_keeps_the_bundle_and_old_svids_valid() {
    let td = id("spiffe://example.org");
    let (ca, material) = authority();
    let before = ca
        .issue_svid(&csr(&[], &PKCS_ECDSA_P256_SHA256), &id(ID), 3600, NOW)
        .unwrap();
    let later = NOW + 60 * 86_400;
    let (next, next_material) =
        Authority::rotate_intermediate(&td, &material, Lifetimes::default(), later).unwrap();
    assert_eq!(next.bundle_der(), ca.bundle_der());
    assert_ne!(
        next_material.intermediate_cert_pem,
        material.intermediate_cert_pem
    );
    assert_eq!(next.intermediate_expires_at(), later + 90 * 86_400);
    let after = next
        .issue_svid(&csr(&[], &PKCS_ECDSA_P256_SHA256), &id(ID), 3600, later)
        .unwrap();
    assert_ne!(after.chain_der, before.chain_der);
    verify_chain(&next.bundle_der()[0], &after, later + 60).unwrap();
    verify_chain(&ca.bundle_der()[0], &before, NOW + 60).unwrap();
    // Without the root key there is nothing to rotate with.
    let offline = tally::ca::CaMaterial {
        root_key_pem: None,
        ..material
    };
    let err =
        Authority::rotate_intermediate(&td, &offline, Lifetimes::default(), later).unwrap_err();
    assert!(matches!(err, CaError::Material(_)), "{err}");
}
