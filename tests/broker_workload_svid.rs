//! `Identity.IssueWorkloadSvid` on a real broker over mTLS gRPC: a second
//! X.509-SVID for the caller's own identity, with a key made for its
//! application, shaped as SPIFFE clients require (CA:false,
//! digitalSignature only, the SPIFFE ID as the one URI SAN), never
//! outliving the caller's SVID, recorded as `workload`, and refused to a
//! denied identity, for another identity, or for the caller's own key.

mod support;

use support::broker::{ServedBroker, channel_as, channel_holding, serve_broker, settings};
use tally::clock::{Clock, SystemClock};
use tally::identity::denial::DENIED_METADATA;
use tally::proto::v1 as pb;
use tonic::Code;
use x509_parser::extensions::{GeneralName, ParsedExtension};

const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";

async fn start() -> (tempfile::TempDir, ServedBroker) {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let policy = include_str!("fixtures/policy.yaml");
    let served = serve_broker(dir.path(), &key, settings(policy), "127.0.0.1:0").await;
    (dir, served)
}

async fn ask(
    channel: tonic::transport::Channel,
    csr_der: Vec<u8>,
) -> Result<pb::SvidResponse, tonic::Status> {
    pb::identity_client::IdentityClient::new(channel)
        .issue_workload_svid(pb::WorkloadSvidRequest { csr_der })
        .await
        .map(tonic::Response::into_inner)
}

/// A CSR for `key` naming `sans` (URI SANs).
fn csr_for(key: &rcgen::KeyPair, sans: &[&str]) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = sans
        .iter()
        .map(|s| rcgen::SanType::URI((*s).try_into().unwrap()))
        .collect();
    params.serialize_request(key).unwrap().der().to_vec()
}

/// The first certificate of a PEM chain, DER.
fn leaf_of(pem: &str) -> Vec<u8> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
    block.contents
}

fn spki(der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.public_key().raw.to_vec()
}

#[tokio::test]
async fn a_workload_svid_names_the_caller_with_a_key_of_its_own_and_never_outlives_the_caller() {
    let (_dir, served) = start().await;
    let caller = served
        .broker
        .mint_credential(&CHECKOUT.parse().unwrap(), 600)
        .unwrap();
    let channel = channel_holding(&served, &caller, served.addr);
    let app_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    // A CSR naming no identity, and one naming exactly the caller's.
    for sans in [&[][..], &[CHECKOUT][..]] {
        let got = ask(channel.clone(), csr_for(&app_key, sans)).await.unwrap();
        assert_eq!(got.spiffe_id, CHECKOUT);
        assert!(!got.chain_der.is_empty() && !got.bundle_der.is_empty());
        let (_, cert) = x509_parser::parse_x509_certificate(&got.svid_der).unwrap();
        // The application's key, not the caller's.
        assert_eq!(
            &*cert.public_key().subject_public_key.data,
            app_key.public_key_raw()
        );
        assert_ne!(spki(&got.svid_der), spki(&leaf_of(&caller.cert_chain_pem)));
        // No later than the caller's SVID (the broker's SVID TTL is longer).
        let not_after = u64::try_from(cert.validity().not_after.timestamp()).unwrap();
        assert!(
            not_after <= caller.expires_at,
            "{not_after} > {}",
            caller.expires_at
        );
        assert!(
            not_after + 30 >= caller.expires_at,
            "capped, not shortened further"
        );
        assert_eq!(u64::try_from(got.expires_at).unwrap(), not_after);

        // As SPIFFE clients require of a leaf.
        let mut seen = (false, false, false);
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::BasicConstraints(bc) => {
                    assert!(!bc.ca, "CA:false");
                    seen.0 = true;
                }
                ParsedExtension::KeyUsage(ku) => {
                    assert!(ku.digital_signature());
                    assert!(!ku.key_cert_sign() && !ku.crl_sign());
                    seen.1 = true;
                }
                ParsedExtension::SubjectAlternativeName(san) => {
                    let uris: Vec<&str> = san
                        .general_names
                        .iter()
                        .filter_map(|n| match n {
                            GeneralName::URI(u) => Some(*u),
                            _ => None,
                        })
                        .collect();
                    assert_eq!(uris, [CHECKOUT], "the SPIFFE ID, the only URI SAN");
                    seen.2 = true;
                }
                _ => {}
            }
        }
        assert_eq!(
            seen,
            (true, true, true),
            "basic constraints, key usage, SAN"
        );
    }

    // Recorded as `workload`, with the caller as actor.
    let filter = tally::store::AuditFilter {
        kind: Some("identity.workload_svid".into()),
        ..tally::store::AuditFilter::default()
    };
    let records = served.broker.query_audit(&filter, 10).await.unwrap();
    assert_eq!(records.len(), 2);
    let line: serde_json::Value = serde_json::from_str(&records[0].line).unwrap();
    assert_eq!(
        (line["outcome"].as_str(), line["method"].as_str()),
        (Some("ok"), Some("workload"))
    );
    assert_eq!(line["actor"], CHECKOUT);
    let ids = served
        .broker
        .store()
        .identities(SystemClock.now())
        .await
        .unwrap();
    assert!(
        ids.iter()
            .any(|i| i.spiffe_id.as_str() == CHECKOUT && i.method == "workload")
    );
    served.stop().await;
}

#[tokio::test]
async fn a_csr_for_another_identity_or_for_the_callers_own_key_is_refused() {
    let (_dir, served) = start().await;
    let caller = served
        .broker
        .mint_credential(&CHECKOUT.parse().unwrap(), 600)
        .unwrap();
    let channel = channel_holding(&served, &caller, served.addr);
    let app_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let e = ask(channel.clone(), csr_for(&app_key, &[PAYMENTS]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.message().contains(PAYMENTS), "{}", e.message());

    // The caller's own key (the sidecar's DPoP key) never goes to the app.
    let own = rcgen::KeyPair::from_pem(&caller.key_pem).unwrap();
    let e = ask(channel.clone(), csr_for(&own, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("own key"), "{}", e.message());

    let e = ask(channel, b"not a CSR".to_vec()).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        served
            .broker
            .store()
            .live_svids(SystemClock.now())
            .await
            .unwrap(),
        0
    );
    served.stop().await;
}

#[tokio::test]
async fn a_caller_whose_svid_is_about_to_expire_is_told_to_renew_first() {
    let (_dir, served) = start().await;
    let caller = served
        .broker
        .mint_credential(&CHECKOUT.parse().unwrap(), 5)
        .unwrap();
    let channel = channel_holding(&served, &caller, served.addr);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let e = ask(channel, csr_for(&key, &[])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("renew first"), "{}", e.message());
    served.stop().await;
}

#[tokio::test]
async fn a_denied_identity_gets_no_workload_svid() {
    let (_dir, served) = start().await;
    let admin: tally::identity::SpiffeId = "spiffe://example.org/admin/ops".parse().unwrap();
    served
        .broker
        .deny_identity(&CHECKOUT.parse().unwrap(), "compromised", &admin)
        .await
        .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let e = ask(channel_as(&served, CHECKOUT), csr_for(&key, &[]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    assert!(e.metadata().get(DENIED_METADATA).is_some());
    let metrics = served.broker.render_metrics().await;
    assert!(
        metrics.contains(r#"tally_broker_denied_identity_calls_total{call="workload_svid"} 1"#),
        "{metrics}"
    );
    served.stop().await;
}

#[tokio::test]
async fn a_workload_svid_cannot_renew_itself_out_of_the_sidecars_lifecycle() {
    let (_dir, served) = start().await;
    let caller = served
        .broker
        .mint_credential(&CHECKOUT.parse().unwrap(), 600)
        .unwrap();
    let channel = channel_holding(&served, &caller, served.addr);
    let app_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let got = ask(channel.clone(), csr_for(&app_key, &[])).await.unwrap();
    let pem = |der: &[u8]| tally::ca::pem("CERTIFICATE", der);
    let workload = tally::ca::Credential {
        cert_chain_pem: std::iter::once(&got.svid_der)
            .chain(&got.chain_der)
            .map(|d| pem(d))
            .collect(),
        key_pem: app_key.serialize_pem().into(),
        expires_at: u64::try_from(got.expires_at).unwrap(),
        serial: String::new(),
    };
    // The application holding its workload SVID dials the broker itself.
    let as_app = channel_holding(&served, &workload, served.addr);
    let e = support::broker::renew(&as_app).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("workload SVID"), "{}", e.message());
    // The sidecar's own SVID still renews.
    support::broker::renew(&channel).await.unwrap();
    served.stop().await;
}
