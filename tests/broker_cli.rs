//! `tally broker` as an operator runs it: the binary, its data directory,
//! mTLS with the admin credential it writes, and a clean SIGTERM.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use tally::proto::v1 as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/policy.yaml");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_binary_serves_mtls_with_the_credential_it_writes_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "broker",
            "--grpc-listen",
            "127.0.0.1:0",
            "--trust-domain",
            "example.org",
            "--policy",
            POLICY,
        ])
        .arg("--data-dir")
        .arg(&data)
        .env_remove("TALLY_STORE_KEY")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The broker prints its address once it listens: no sleeping.
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line.trim().rsplit(' ').next().unwrap().to_owned();
    assert!(line.contains("listening on 127.0.0.1:"), "{line}");

    let mode = |p: &str| {
        std::fs::metadata(data.join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    };
    assert_eq!(mode("admin/key.pem"), 0o600);
    assert_eq!(mode("store.key"), 0o600);
    assert_eq!(
        std::fs::metadata(&data).unwrap().permissions().mode() & 0o777,
        0o700
    );

    let read = |p: &str| std::fs::read_to_string(data.join(p)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("bundle.pem")))
        .identity(Identity::from_pem(
            read("admin/cert.pem"),
            read("admin/key.pem"),
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let mut client = pb::identity_client::IdentityClient::new(channel);
    let svid = client
        .renew(pb::RenewRequest { csr_der: csr })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(svid.spiffe_id, "spiffe://example.org/admin");
    drop(client);

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    let rest: Vec<String> = out.lines().map(Result::unwrap).collect();
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");
}

#[test]
fn bad_configuration_lists_every_error_and_exits_64() {
    let o = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "broker",
            "--grpc-listen",
            "nowhere",
            "--svid-ttl",
            "5s",
            "--trust-domain",
            "Bad",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    for needle in [
        "trust_domain \"Bad\"",
        "grpc_listen \"nowhere\"",
        "svid_ttl \"5s\"",
    ] {
        assert!(err.contains(needle), "{err}");
    }
}

/// Reads lines from `lines` until one contains `needle`, or panics after
/// `limit` lines (the broker logs little, so this bounds the wait).
fn wait_for_line(
    lines: &mut impl Iterator<Item = std::io::Result<String>>,
    needle: &str,
) -> String {
    for line in lines.take(200) {
        let line = line.unwrap();
        if line.contains(needle) {
            return line;
        }
    }
    panic!("no line containing {needle:?}");
}

#[test]
fn a_changed_policy_is_reloaded_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::copy(POLICY, &policy).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "broker",
            "--grpc-listen",
            "127.0.0.1:0",
            "--trust-domain",
            "example.org",
        ])
        .arg("--policy")
        .arg(&policy)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env("TALLY_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = BufReader::new(child.stderr.take().unwrap()).lines();
    wait_for_line(&mut log, "watching the policy file for changes");

    // A broken file: logged with its position, the old policy stays.
    std::fs::write(
        &policy,
        "trust_domain: example.org\nissue:\n  - from: nope\n",
    )
    .unwrap();
    let line = wait_for_line(&mut log, "policy NOT reloaded");
    assert!(line.contains("policy.yaml:3:"), "{line}");

    // A good change is picked up.
    std::fs::write(&policy, "trust_domain: example.org\n").unwrap();
    wait_for_line(&mut log, "policy reloaded");

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    assert_eq!(child.wait().unwrap().code(), Some(0));
}
