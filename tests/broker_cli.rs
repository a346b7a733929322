//! `tally broker` as an operator runs it: the binary, its data directory,
//! mTLS with the admin credential it writes, its configuration and exit
//! codes, the policy file it watches, and a clean SIGTERM. What `tally ctl`
//! does against it is in the `ctl_*.rs` files.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use support::broker::{EPHEMERAL_PORTS, POLICY_FILE as POLICY, Spawned};
use support::process::{Lines, PATIENCE, output_within, terminate, wait_exit};
use tally::proto::v1 as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_binary_serves_mtls_with_the_credential_it_writes_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let addr = broker.grpc.clone();
    // The issuer follows the HTTPS port when not configured.
    let https = &broker.https_line;
    let https_port = https
        .split("listening on 127.0.0.1:")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_owned();
    assert!(
        https.contains(&format!("issuer https://localhost:{https_port}")),
        "{https}"
    );
    let ready = http_get(&broker.admin, "/readyz");
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");

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

    let (code, rest) = broker.stop();
    assert_eq!(code, Some(0));
    assert!(rest.iter().any(|l| l.contains("stopped")), "{rest:?}");

    // The renewal was audited, in the store's JSON-lines copy.
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"kind\":\"identity.renew\""), "{audit}");
    assert!(
        audit.contains("\"actor\":\"spiffe://example.org/admin\""),
        "{audit}"
    );
}

/// A plain HTTP/1.1 GET; the whole response as text.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).unwrap();
    out
}

#[test]
fn bad_configuration_lists_every_error_and_exits_64() {
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally")).args([
            "broker",
            "--grpc-listen",
            "nowhere",
            "--svid-ttl",
            "5s",
            "--trust-domain",
            "Bad",
        ]),
        PATIENCE,
    );
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

#[test]
fn a_changed_policy_is_reloaded_and_a_broken_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.yaml");
    std::fs::copy(POLICY, &policy).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["broker", "--trust-domain", "example.org"])
        .args(EPHEMERAL_PORTS)
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
    let mut log = Lines::of(child.stderr.take().unwrap());
    log.wait_for("watching the policy file for changes", PATIENCE);

    // A broken file: logged with its position, the old policy stays.
    std::fs::write(
        &policy,
        "trust_domain: example.org\nissue:\n  - from: nope\n",
    )
    .unwrap();
    let line = log.wait_for("policy NOT reloaded", PATIENCE);
    assert!(line.contains("policy.yaml:3:"), "{line}");

    // A good change is picked up.
    std::fs::write(&policy, "trust_domain: example.org\n").unwrap();
    log.wait_for("policy reloaded", PATIENCE);

    terminate(&child);
    assert_eq!(wait_exit(&mut child, PATIENCE).code(), Some(0));
    // Each text the file served is a stored version; the reload's audit
    // record carries its diff, the refused one its errors.
    let audit = std::fs::read_to_string(dir.path().join("data/audit.jsonl")).unwrap();
    let reloads: Vec<serde_json::Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|r| r["kind"] == "policy.reload")
        .collect();
    assert_eq!(reloads.len(), 2, "{audit}");
    assert_eq!(reloads[0]["outcome"], "error");
    assert_eq!(reloads[1]["outcome"], "ok");
    assert_eq!(reloads[1]["version"], 2, "version 1 is the file at start");
    assert!(
        reloads[1]["diff"].as_str().unwrap().contains("-issue:"),
        "{}",
        reloads[1]
    );
}

#[test]
fn a_supplied_root_key_readable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = tally::ca::Authority::generate(
        &"spiffe://example.org".parse().unwrap(),
        tally::ca::Lifetimes::default(),
        1_800_000_000,
    )
    .unwrap()
    .1;
    let (cert, key) = (dir.path().join("root.pem"), dir.path().join("root.key"));
    std::fs::write(&cert, &root.root_cert_pem).unwrap();
    std::fs::write(&key, root.root_key_pem.unwrap().as_bytes()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["broker", "--trust-domain", "example.org"])
            .args(EPHEMERAL_PORTS)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--ca-cert")
            .arg(&cert)
            .arg("--ca-key")
            .arg(&key),
        PATIENCE,
    );
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("must not be readable by group or others"),
        "{err}"
    );
}

#[test]
fn a_sigterm_right_after_the_first_ready_line_stops_the_broker_cleanly() {
    // Scripts wait for the address lines; a SIGTERM at once after the
    // first must find the handler in place (a broker killed by the signal
    // exits without a code, and never says it stopped). A few times: the
    // window is short.
    let dir = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([
                "broker",
                "--trust-domain",
                "example.org",
                "--policy",
                POLICY,
            ])
            .args(EPHEMERAL_PORTS)
            .arg("--data-dir")
            .arg(dir.path().join(format!("data{i}")))
            .env_remove("TALLY_STORE_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // A shell waiting to send the signal: `kill` as a builtin goes out
        // within microseconds of the line, where spawning kill(1) would take
        // milliseconds, long enough to hide a late handler.
        let mut trigger = Command::new("sh")
            .args(["-c", &format!("read go && kill -TERM {}", child.id())])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = Lines::of(child.stdout.take().unwrap());
        let first = out.next_within(PATIENCE);
        {
            use std::io::Write as _;
            writeln!(trigger.stdin.take().unwrap()).unwrap();
        }
        assert!(wait_exit(&mut trigger, PATIENCE).success());
        let status = wait_exit(&mut child, PATIENCE);
        let rest = out.rest(PATIENCE);
        assert_eq!(status.code(), Some(0), "start {i}: {first} {rest:?}");
        assert_eq!(
            rest.last().map(String::as_str),
            Some("tally broker: stopped")
        );
    }
}
