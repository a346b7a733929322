//! `tally ctl` making identities as the admin: join tokens that attest,
//! credentials minted for workloads without a sidecar (which are not an
//! admin's), and the intermediate CA rotated under live SVIDs.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use support::broker::Spawned;
use support::ctl::{attest, create_join_token, ctl, issue_with, mint_svid, text};
use support::process::{PATIENCE, output_within};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_is_printed_alone_and_attests() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let token = create_join_token(&broker, &data, "spiffe://example.org/vm/build-7");
    let svid = attest(&broker, &data, &token).await;
    assert_eq!(svid.spiffe_id, "spiffe://example.org/vm/build-7");
}

#[test]
fn a_minted_credential_is_three_files_with_a_private_key_and_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    // A credential for a workload without a sidecar: three files, key 0600.
    let out = dir.path().join("legacy");
    let o = ctl(
        &broker,
        &data,
        &[
            "svid",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/ns/legacy/sa/batch",
            "--ttl",
            "2h",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let cert = std::fs::read_to_string(out.join("cert.pem")).unwrap();
    let leaf = rustls_pki_types::pem::PemObject::pem_slice_iter(cert.as_bytes())
        .next()
        .map(|c: Result<rustls_pki_types::CertificateDer<'static>, _>| c.unwrap())
        .unwrap();
    assert_eq!(
        tally::ca::spiffe_id_of(&leaf).unwrap().as_str(),
        "spiffe://example.org/ns/legacy/sa/batch"
    );
    assert_eq!(
        std::fs::metadata(out.join("key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::read_to_string(out.join("bundle.pem")).unwrap(),
        std::fs::read_to_string(data.join("bundle.pem")).unwrap()
    );
    // Never overwrites.
    let o = ctl(
        &broker,
        &data,
        &[
            "svid",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/x",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));
}

#[test]
fn a_minted_workload_credential_is_refused_as_an_admin_and_the_refusal_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let out = dir.path().join("legacy");
    mint_svid(
        &broker,
        &data,
        "spiffe://example.org/ns/legacy/sa/batch",
        &out,
    );
    // That credential is not an admin's: the broker refuses, and says why.
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["ctl", "keys", "rotate"])
            .arg("--broker")
            .arg(format!(
                "https://{}",
                broker.grpc.replace("127.0.0.1", "localhost")
            ))
            .arg("--cert")
            .arg(out.join("cert.pem"))
            .arg("--key")
            .arg(out.join("key.pem"))
            .arg("--bundle")
            .arg(out.join("bundle.pem")),
        PATIENCE,
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("is not an admin"), "{}", text(&o));

    let o = ctl(&broker, &data, &["audit", "query", "--type", "admin.call"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.starts_with("SEQ"), "{table}");
    assert!(
        table.contains("denied") && table.contains("call=RotateSigningKey"),
        "the refused non-admin call is audited: {table}"
    );
}

/// The intermediate in a PEM chain (leaf first, as `ctl svid mint` writes
/// it).
fn intermediate_of(chain_pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    let certs: Vec<_> = rustls_pki_types::CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .map(Result::unwrap)
        .collect();
    assert_eq!(certs.len(), 2, "leaf and intermediate");
    certs[1].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ca_rotate_replaces_the_intermediate_without_cutting_off_existing_svids() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let mint = |name: &str| {
        let out = dir.path().join(name);
        let o = ctl(
            &broker,
            &data,
            &[
                "svid",
                "mint",
                "--spiffe-id",
                "spiffe://example.org/ns/shop/sa/checkout",
                "--out",
                out.to_str().unwrap(),
            ],
        );
        assert_eq!(
            o.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        out
    };
    let before = mint("before");
    let bundle = std::fs::read_to_string(data.join("bundle.pem")).unwrap();

    let o = ctl(&broker, &data, &["ca", "rotate"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("intermediate CA replaced"), "{out}");

    let after = mint("after");
    let chain = |d: &std::path::Path| std::fs::read_to_string(d.join("cert.pem")).unwrap();
    assert_ne!(
        intermediate_of(&chain(&before)),
        intermediate_of(&chain(&after)),
        "new SVIDs chain to a new intermediate"
    );
    assert_eq!(
        std::fs::read_to_string(after.join("bundle.pem")).unwrap(),
        bundle,
        "the trust bundle (root) is unchanged"
    );
    // Both the SVID from before and the one from after are accepted.
    issue_with(&broker, &before).await.unwrap();
    issue_with(&broker, &after).await.unwrap();
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    assert!(
        audit
            .lines()
            .any(|l| l.contains("\"kind\":\"ca.rotate_intermediate\"")
                && l.contains("\"actor\":\"spiffe://example.org/admin\"")),
        "{audit}"
    );
}
