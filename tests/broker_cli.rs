//! `tally broker` as an operator runs it: the binary, its data directory,
//! mTLS with the admin credential it writes, and a clean SIGTERM.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use support::broker::{EPHEMERAL_PORTS, Spawned};
use support::process::{Lines, PATIENCE, finish_within, output_within, terminate, wait_exit};
use tally::proto::v1 as pb;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/policy.yaml");

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

fn ctl(broker: &Spawned, data: &std::path::Path, args: &[&str]) -> std::process::Output {
    output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("ctl")
            .args(args)
            .arg("--broker")
            .arg(format!(
                "https://{}",
                broker.grpc.replace("127.0.0.1", "localhost")
            ))
            .arg("--data-dir")
            .arg(data),
        PATIENCE,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_makes_join_tokens_mints_credentials_and_rotates_keys_as_the_admin() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };

    // A join token, printed alone, that attests once.
    let o = ctl(
        &broker,
        &data,
        &[
            "join-token",
            "create",
            "--spiffe-id",
            "spiffe://example.org/vm/build-7",
            "--ttl",
            "5m",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let token = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    assert_eq!(token.lines().count(), 1);
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(
            std::fs::read_to_string(data.join("bundle.pem")).unwrap(),
        ))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", broker.grpc))
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
    let svid = pb::identity_client::IdentityClient::new(channel)
        .attest(pb::AttestRequest {
            credential: Some(pb::attest_request::Credential::JoinToken(token.clone())),
            csr_der: csr,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(svid.spiffe_id, "spiffe://example.org/vm/build-7");

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

    // A minted credential works as a workload identity: a token for it.
    let checkout = dir.path().join("checkout");
    let o = ctl(
        &broker,
        &data,
        &[
            "svid",
            "mint",
            "--spiffe-id",
            "spiffe://example.org/ns/shop/sa/checkout",
            "--out",
            checkout.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let issued = issue_with(&broker, &checkout).await.unwrap();

    // The leaked-token runbook: from the token string alone, who held it,
    // what for, and every record naming it.
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "lookup",
            "--token",
            &issued.access_token,
            "--output",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let found: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(found["found"], true);
    assert_eq!(found["jti"], issued.jti.as_str());
    assert_eq!(found["sub"], "spiffe://example.org/ns/shop/sa/checkout");
    assert_eq!(found["aud"], "spiffe://example.org/ns/pay/sa/payments");
    assert_eq!(found["scope"], "payments:read");
    assert_eq!(found["revoked"], false);
    let kinds: Vec<&str> = found["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["token.issue"], "{found}");
    // Read from stdin (out of shell history), as a table; the lookup
    // itself is now on the token's record.
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["ctl", "audit", "lookup", "--token", "-"])
        .arg("--broker")
        .arg(format!(
            "https://{}",
            broker.grpc.replace("127.0.0.1", "localhost")
        ))
        .arg("--data-dir")
        .arg(&data)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = child.stdin.take().unwrap();
        writeln!(stdin, "{}", issued.access_token).unwrap();
    }
    let o = finish_within(child, PATIENCE);
    assert_eq!(o.status.code(), Some(0));
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(
        table.contains("holder   spiffe://example.org/ns/shop/sa/checkout"),
        "{table}"
    );
    assert!(table.contains("LIVE"), "{table}");
    assert!(
        table.contains("token.issue") && table.contains("admin.query"),
        "{table}"
    );
    // A forged token naming the real jti finds nothing.
    let forged = format!("{}x", issued.access_token);
    let o = ctl(&broker, &data, &["audit", "lookup", "--token", &forged]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(
        text(&o).contains("not issued by this broker"),
        "{}",
        text(&o)
    );

    // Queries: by subject and family, and the refused admin call above.
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "query",
            "--sub",
            "spiffe://example.org/ns/shop/sa/checkout",
            "--type",
            "token",
            "--output",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let records: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let records = records.as_array().unwrap();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["jti"], issued.jti.as_str());
    let o = ctl(&broker, &data, &["audit", "query", "--type", "admin.call"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(table.starts_with("SEQ"), "{table}");
    assert!(
        table.contains("denied") && table.contains("call=RotateSigningKey"),
        "the refused non-admin call is audited: {table}"
    );
    let o = ctl(&broker, &data, &["audit", "query", "--since", "soon"]);
    assert_eq!(o.status.code(), Some(64), "{}", text(&o));

    // Inventory: the live token, the workloads, and the access review.
    let o = ctl(
        &broker,
        &data,
        &[
            "tokens",
            "list",
            "--sub",
            "spiffe://example.org/ns/shop/sa/checkout",
            "--expiring-within",
            "1h",
            "--output",
            "json",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let live: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(live.as_array().unwrap().len(), 1, "{live}");
    assert_eq!(live[0]["jti"], issued.jti.as_str());
    assert_eq!(live[0]["class"], "service");
    assert_eq!(live[0]["revoked"], false);
    let o = ctl(
        &broker,
        &data,
        &["tokens", "list", "--sub", "spiffe://example.org/nobody"],
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).lines().count(),
        1,
        "header only"
    );
    let o = ctl(
        &broker,
        &data,
        &["tokens", "list", "--expiring-within", "soon"],
    );
    assert_eq!(o.status.code(), Some(64));
    // An overlong condition is refused, not dropped (which would list all).
    let long = format!("spiffe://example.org/{}", "x".repeat(600));
    let o = ctl(&broker, &data, &["tokens", "list", "--sub", &long]);
    assert_eq!(o.status.code(), Some(1));
    assert!(text(&o).contains("longer than 512"), "{}", text(&o));
    let o = ctl(&broker, &data, &["identities", "list", "--output", "json"]);
    let ids: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let checkout_row = ids
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["spiffe_id"] == "spiffe://example.org/ns/shop/sa/checkout")
        .unwrap();
    assert_eq!(checkout_row["method"], "admin_mint");
    assert_eq!(checkout_row["tokens"], 1);
    assert_eq!(checkout_row["live_tokens"], 1);
    assert!(
        checkout_row["svid_expires_at"].as_i64().unwrap()
            > checkout_row["last_seen"].as_i64().unwrap()
    );
    let o = ctl(
        &broker,
        &data,
        &["review", "--unused-for", "30d", "--output", "json"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let review: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(review["tokens_considered"], 1);
    // The reporting rule issued nothing; checkout's rule never needed
    // payments:charge.
    assert_eq!(review["unused_rules"][0]["line"], 12, "{review}");
    assert_eq!(review["unused_scopes"][0]["line"], 7, "{review}");
    assert_eq!(review["unused_scopes"][0]["scopes"][0], "payments:charge");
    let o = ctl(&broker, &data, &["review"]);
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.starts_with("Access review, "), "{report}");
    assert!(
        report.contains("Scopes granted but never carried: \n  - line 7: spiffe://example.org/ns/shop/sa/checkout -> spiffe://example.org/ns/pay/sa/payments: payments:charge"),
        "{report}"
    );

    // The admin rotates the signing key.
    let o = ctl(&broker, &data, &["keys", "rotate"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let kid = String::from_utf8(o.stdout)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_owned();

    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
    // All of it audited with the admin as actor; the join token itself is
    // nowhere in the log.
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    for kind in [
        "join_token.create",
        "identity.attest",
        "svid.mint",
        "keys.rotate",
    ] {
        assert!(
            audit.contains(&format!("\"kind\":\"{kind}\"")),
            "{kind}: {audit}"
        );
    }
    assert!(audit.contains(&kid), "{audit}");
    assert!(audit.contains(&issued.jti), "{audit}");
    // No secret in the audit log, the debug log or the database: not the
    // join token, not the access token (not even its signature).
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(log.contains("token issued"), "the log is really there");
    let mut db = std::fs::read(data.join("tally.db")).unwrap();
    db.extend(std::fs::read(data.join("tally.db-wal")).unwrap_or_default());
    let signature = issued.access_token.rsplit('.').next().unwrap();
    for secret in [token.as_str(), issued.access_token.as_str(), signature] {
        assert!(!audit.contains(secret), "audit log holds a secret");
        assert!(!log.contains(secret), "broker log holds a secret");
        assert!(
            !db.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "database holds a secret"
        );
    }
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_is_durable_when_ctl_returns() {
    use tally::clock::Clock as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    // For scripts: one JSON document.
    let o = ctl(
        &broker,
        &data,
        &[
            "revoke",
            "--issued-before",
            "1700000000",
            "--output",
            "json",
        ],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let done: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(done["issued_before"], 1_700_000_000);
    assert!(done["sequence"].as_u64().unwrap() > 0);
    // Mistakes are refused, not recorded.
    let o = ctl(&broker, &data, &["revoke", "--jti", "no-such-token"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no token with jti"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = ctl(&broker, &data, &["revoke", "--sub", "x", "--jkt", "y"]);
    assert_eq!(o.status.code(), Some(64));
    let o = ctl(
        &broker,
        &data,
        &["revoke", "--issued-before", "yesterday-ish"],
    );
    assert_eq!(o.status.code(), Some(64));

    // The revocation that counts comes last, so the kill follows its
    // answer at once: the revocation is then in the store, in the state
    // every new Watch subscriber gets, and in the audit log
    // (tests/durability.rs does the same under load, for every kind of
    // acknowledged write).
    let o = ctl(
        &broker,
        &data,
        &[
            "revoke",
            "--sub",
            "spiffe://example.org/ns/shop/sa/checkout",
            "--reason",
            "compromised pod",
        ],
    );
    broker.kill();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .starts_with("revoked: covers tokens issued at or before")
    );
    let key = std::fs::read(data.join("store.key")).unwrap();
    let store = tally::store::Store::open_sqlite(
        &data.join("tally.db"),
        tally::store::Sealer::from_key_material(&key).unwrap(),
    )
    .await
    .unwrap();
    let state = store
        .current_state(tally::clock::SystemClock.now())
        .await
        .unwrap();
    let revocations: Vec<_> = state.iter().filter(|c| c.kind == "revocation").collect();
    assert_eq!(revocations.len(), 1);
    let entry = tally::token::Revocation::from_json(&revocations[0].body).unwrap();
    assert_eq!(
        entry.target,
        tally::token::RevocationTarget::Subject(
            "spiffe://example.org/ns/shop/sa/checkout".parse().unwrap()
        )
    );
    assert_eq!(entry.reason, "compromised pod");
    // The store's log (the JSON-lines file is a copy written after the
    // commit, for log shippers).
    let filter = tally::store::AuditFilter {
        kind: Some("token.revoke".into()),
        ..Default::default()
    };
    let audit = store.audit_query(&filter, 10).await.unwrap();
    assert_eq!(audit.len(), 2, "{audit:?}");
    assert!(
        audit[1].line.contains("\"reason\":\"compromised pod\""),
        "{audit:?}"
    );
}

#[test]
fn ctl_lists_the_signing_keys_as_a_table_or_json() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let rotated = ctl(&broker, &data, &["keys", "rotate"]);
    assert_eq!(rotated.status.code(), Some(0));
    let new_kid = String::from_utf8(rotated.stdout).unwrap();
    let new_kid = new_kid.split_whitespace().next().unwrap().to_owned();

    let o = ctl(&broker, &data, &["keys", "list", "--output", "json"]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let keys: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    let by_state = |s: &str| keys.iter().filter(|k| k["state"] == s).collect::<Vec<_>>();
    assert_eq!(by_state("signing").len(), 1);
    assert_eq!(by_state("signing")[0]["kid"], new_kid.as_str());
    assert_eq!(by_state("retired").len(), 1);
    assert!(
        keys.iter().all(|k| k["published"] == true),
        "the old key stays published for its tokens"
    );
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(!text.contains("PRIVATE") && !text.contains("pkcs8"));

    let table = ctl(&broker, &data, &["keys", "list"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(table.starts_with("KID"), "{table}");
    assert_eq!(table.lines().count(), 3, "{table}");
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"kind\":\"admin.query\""), "{audit}");

    let o = ctl(&broker, &data, &["keys", "rotate", "--output", "json"]);
    let rotated: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let new_kid = rotated["kid"].as_str().unwrap().to_owned();
    assert_eq!(rotated["withdrawn"], serde_json::json!([]));

    // The leaked-key runbook: the signing key is withdrawn at once.
    let o = ctl(
        &broker,
        &data,
        &["keys", "rotate", "--revoke-old", "--publish-lead", "5m"],
    );
    assert_eq!(o.status.code(), Some(64), "a leaked key is replaced now");
    let o = ctl(
        &broker,
        &data,
        &[
            "keys",
            "rotate",
            "--revoke-old",
            "--reason",
            "key in a core dump",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains(&format!("withdrawn: {new_kid}")), "{out}");
    let o = ctl(&broker, &data, &["keys", "list", "--output", "json"]);
    let keys: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let leaked = keys
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["kid"] == new_kid.as_str())
        .unwrap();
    assert_eq!(leaked["state"], "withdrawn");
    assert_eq!(leaked["published"], false);
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "query",
            "--type",
            "token.revoke",
            "--output",
            "json",
        ],
    );
    let revoked: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(revoked[0]["target"], "kid");
    assert_eq!(revoked[0]["value"], new_kid.as_str());
    assert_eq!(revoked[0]["reason"], "key in a core dump");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}

/// Copies a stopped broker's data directory, tampers with its store,
/// starts a broker on the copy and returns what `ctl audit verify` says.
async fn verify_after(
    data: &std::path::Path,
    scratch: &std::path::Path,
    name: &str,
    tamper: &'static str,
) -> (Option<i32>, String) {
    let copy = scratch.join(name);
    let status = Command::new("cp")
        .arg("-r")
        .arg(data)
        .arg(&copy)
        .status()
        .unwrap();
    assert!(status.success());
    let url = format!("sqlite://{}", copy.join("tally.db").display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::raw_sql(tamper).execute(&pool).await.unwrap();
    pool.close().await;
    let broker = Spawned::start(&copy);
    let o = ctl(&broker, &copy, &["audit", "verify"]);
    assert_eq!(broker.stop().0, Some(0));
    (
        o.status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_names_the_first_edited_deleted_or_reordered_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    for _ in 0..4 {
        let o = ctl(&broker, &data, &["keys", "list"]);
        assert_eq!(o.status.code(), Some(0));
    }
    let o = ctl(&broker, &data, &["audit", "verify"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.starts_with("intact: "), "{out}");
    let o = ctl(&broker, &data, &["audit", "verify", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["intact"], true);
    assert_eq!(report["chain_from"], 1);
    assert!(report["records_checked"].as_u64().unwrap() >= 5, "{report}");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));

    // The JSON-lines file holds the same chain, checked offline.
    let file = data.join("audit.jsonl");
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["ctl", "audit", "verify", "--file"])
            .arg(&file),
        PATIENCE,
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    let mut lines: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    lines.remove(2);
    let cut = dir.path().join("cut.jsonl");
    std::fs::write(&cut, lines.join("\n")).unwrap();
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["ctl", "audit", "verify", "--file"])
            .arg(&cut),
        PATIENCE,
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("record 3 is missing or out of place"), "{out}");

    let scratch = dir.path();
    let (code, out) = verify_after(
        &data,
        scratch,
        "edited",
        "UPDATE audit SET line = replace(line, 'signing_keys', 'nothing') WHERE seq = 3",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("BROKEN") && out.contains("record 3 was altered"),
        "{out}"
    );

    let (code, out) =
        verify_after(&data, scratch, "deleted", "DELETE FROM audit WHERE seq = 3").await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("record 3 is missing or out of place"), "{out}");

    let (code, out) = verify_after(
        &data,
        scratch,
        "reordered",
        "UPDATE audit SET line = CASE seq WHEN 3 THEN (SELECT line FROM audit WHERE seq = 4) \
         ELSE (SELECT line FROM audit WHERE seq = 3) END WHERE seq IN (3, 4)",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("found record 4 where 3 belongs"), "{out}");

    // A query column changed to hide a record from `audit query`.
    let (code, out) = verify_after(
        &data,
        scratch,
        "recolumned",
        "UPDATE audit SET kind = 'hidden' WHERE seq = 2",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("record 2 was altered: its stored kind"),
        "{out}"
    );

    // Records up to the head gone and more than a page of records past it:
    // the check stops (it used to re-read the same page forever) and says
    // the log does not reach its head.
    let (code, out) = verify_after(
        &data,
        scratch,
        "beyond",
        "WITH RECURSIVE n(i) AS (SELECT 100 UNION ALL SELECT i + 1 FROM n WHERE i < 2200) \
         INSERT INTO audit (seq, at, kind, line) SELECT i, 0, 'x', '{}' FROM n; \
         UPDATE audit_head SET seq = 50",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("removed from the end"), "{out}");

    // The last record edited: no successor exposes it, the head does.
    let (code, out) = verify_after(
        &data,
        scratch,
        "tail",
        "UPDATE audit SET line = replace(line, '\"ok\"', '\"denied\"') \
         WHERE seq = (SELECT MAX(seq) FROM audit)",
    )
    .await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("was altered"), "{out}");
}

#[test]
fn policy_versions_are_applied_diffed_and_rolled_back_and_a_file_never_silently_wins() {
    use support::broker::POLICY_FILE;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let original = std::fs::read_to_string(POLICY_FILE).unwrap();
    let broker = Spawned::start_with(
        &data,
        &["--policy", POLICY_FILE, "--policy-source", "store"],
    );
    let run = |args: &[&str]| {
        let o = ctl(&broker, &data, args);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };

    // The file seeded the empty store as version 1.
    let (code, out, _) = run(&["policy", "history", "--output", "json"]);
    assert_eq!(code, Some(0));
    let history: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(history["policy_source"], "store");
    assert_eq!(history["versions"][0]["version"], 1);
    assert_eq!(history["versions"][0]["source"], "seed");

    let widened = dir.path().join("widened.yaml");
    std::fs::write(
        &widened,
        original.replace(
            "scopes: [payments:read]\n",
            "scopes: [payments:read, payments:refund]\n",
        ),
    )
    .unwrap();
    let (code, out, err) = run(&[
        "policy",
        "apply",
        widened.to_str().unwrap(),
        "--comment",
        "refunds for reporting",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("policy version 2 is served now (+"),
        "{out}"
    );
    assert!(
        out.contains("+    scopes: [payments:read, payments:refund]"),
        "{out}"
    );
    let (code, out, _) = run(&["policy", "apply", widened.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("unchanged: version 2"), "{out}");
    // A broken file is refused here, with its position; nothing is stored.
    let broken = dir.path().join("broken.yaml");
    std::fs::write(&broken, original.replace("issue:", "issu:")).unwrap();
    let (code, _, err) = run(&["policy", "apply", broken.to_str().unwrap()]);
    assert_eq!(code, Some(64), "{err}");
    assert!(err.contains("broken.yaml:"), "{err}");

    let (code, out, _) = run(&["policy", "diff", "1", "2"]);
    assert_eq!(code, Some(1), "a difference exits 1, like diff(1)");
    assert!(out.starts_with("--- v1\n+++ v2\n"), "{out}");
    let (code, out, _) = run(&[
        "policy",
        "rollback",
        "1",
        "--comment",
        "refunds were a mistake",
    ]);
    assert_eq!(code, Some(0));
    assert!(out.starts_with("policy version 3 is served now"), "{out}");
    let (_, shown, _) = run(&["policy", "show"]);
    assert_eq!(shown, original, "version 3 is version 1's document");
    let (code, out, _) = run(&["policy", "diff", "1", "3"]);
    assert_eq!((code, out.as_str()), (Some(0), ""));
    let (_, table, _) = run(&["policy", "history"]);
    assert!(
        table.contains("rollback") && table.contains("refunds were a mistake"),
        "{table}"
    );
    // An unknown version: refused (NotFound, exit 1), nothing served.
    let (code, out, err) = run(&["policy", "rollback", "9"]);
    assert_eq!(code, Some(1), "{err}");
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("not found: no policy version 9"), "{err}");
    // Each change is audited with its author and diff.
    let (_, out, _) = run(&[
        "audit",
        "query",
        "--type",
        "policy.change",
        "--output",
        "json",
    ]);
    let changes: serde_json::Value = serde_json::from_str(&out).unwrap();
    let changes = changes.as_array().unwrap();
    assert_eq!(changes.len(), 3, "{changes:?}");
    assert_eq!(changes[0]["how"], "apply");
    assert_eq!(changes[0]["actor"], "spiffe://example.org/admin");
    assert!(
        changes[0]["diff"]
            .as_str()
            .unwrap()
            .contains("payments:refund")
    );
    assert_eq!(changes[1]["how"], "rollback");
    assert_eq!(changes[1]["rolled_back_to"], 1);
    assert_eq!(changes[2]["outcome"], "denied", "the unknown version");
    assert_eq!(broker.stop().0, Some(0));

    // Started again with a file that differs from the applied version and
    // nothing said about which wins: refused, with both ways out.
    let start = |args: &[&str]| {
        output_within(
            Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(["broker", "--trust-domain", "example.org", "--data-dir"])
                .arg(&data)
                .args(support::broker::EPHEMERAL_PORTS)
                .args(args)
                .env_remove("TALLY_STORE_KEY"),
            PATIENCE,
        )
    };
    let o = start(&["--policy", widened.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(
        err.contains("policy version 3")
            && err.contains("--policy-source store")
            && err.contains("--policy-source file"),
        "{err}"
    );
    let o = start(&[
        "--policy",
        widened.to_str().unwrap(),
        "--policy-source",
        "store",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(64), "{err}");
    assert!(
        err.contains("differs from the stored policy version 3"),
        "{err}"
    );

    // Said explicitly: the file wins, is stored as a version, and applying
    // is refused while it does.
    let broker = Spawned::start_with(
        &data,
        &[
            "--policy",
            widened.to_str().unwrap(),
            "--policy-source",
            "file",
        ],
    );
    let o = ctl(&broker, &data, &["policy", "apply", POLICY_FILE]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("serves the policy file"), "{err}");
    let o = ctl(&broker, &data, &["policy", "history", "--output", "json"]);
    let history: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(history["policy_source"], "file");
    assert_eq!(history["versions"][0]["version"], 4);
    assert_eq!(history["versions"][0]["source"], "file");
    assert_eq!(broker.stop().0, Some(0));
}

/// Asks the broker for a token with the credential in `dir` (cert.pem,
/// key.pem, bundle.pem, as `ctl svid mint` writes them).
async fn issue_with(
    broker: &Spawned,
    dir: &std::path::Path,
) -> Result<pb::IssueResponse, tonic::Status> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("bundle.pem")))
        .identity(Identity::from_pem(read("cert.pem"), read("key.pem")))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", broker.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let issuer = broker
        .https_line
        .split("issuer ")
        .nth(1)
        .unwrap()
        .trim()
        .to_owned();
    let proof = tally::dpop::ProofKey::generate()
        .unwrap()
        .mint(
            "POST",
            &format!("{issuer}/tally.v1.Tokens/Issue"),
            None,
            None,
            tally::clock::Clock::now(&tally::clock::SystemClock),
        )
        .unwrap();
    pb::tokens_client::TokensClient::new(channel)
        .issue(pb::IssueRequest {
            audience: "spiffe://example.org/ns/pay/sa/payments".into(),
            scopes: vec!["payments:read".into()],
            ttl_seconds: 0,
            dpop_proof: proof,
        })
        .await
        .map(tonic::Response::into_inner)
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

#[test]
fn the_beginning_of_the_audit_log_is_archived_then_removed_and_the_rest_still_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    for _ in 0..6 {
        assert_eq!(
            ctl(&broker, &data, &["keys", "list"]).status.code(),
            Some(0)
        );
    }
    let archive = dir.path().join("audit-1-4.jsonl");
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "export",
            "--through",
            "4",
            "--out",
            archive.to_str().unwrap(),
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("exported records 1 to 4 (4)"), "{out}");
    let sha = out
        .split("record 4 sha256 ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    // The archive verifies on its own and ends at the exported hash.
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["ctl", "audit", "verify", "--output", "json", "--file"])
            .arg(&archive),
        PATIENCE,
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        (report["intact"].as_bool(), report["head_seq"].as_u64()),
        (Some(true), Some(4))
    );
    assert_eq!(report["head_sha256"], sha.as_str());
    // Exporting over an existing file is refused.
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "export",
            "--through",
            "4",
            "--out",
            archive.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(64));

    // A wrong hash removes nothing.
    let wrong = "0".repeat(64);
    let o = ctl(
        &broker,
        &data,
        &["audit", "truncate", "--through", "4", "--sha256", &wrong],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("export it again"));
    let o = ctl(
        &broker,
        &data,
        &["audit", "truncate", "--through", "4", "--sha256", &sha],
    );
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.starts_with("removed 4 archived records"), "{out}");

    // What is left verifies from the archive's last hash, and the removal
    // is on record.
    let o = ctl(&broker, &data, &["audit", "verify", "--output", "json"]);
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["chain_from"], 5);
    assert_eq!(report["anchor_sha256"], sha.as_str());
    let o = ctl(
        &broker,
        &data,
        &[
            "audit",
            "query",
            "--type",
            "audit.truncate",
            "--output",
            "json",
        ],
    );
    let records: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(records[0]["through"], 4);
    assert_eq!(records[0]["anchor"], sha.as_str());
    let o = ctl(&broker, &data, &["audit", "query", "--output", "json"]);
    let left: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(left[0]["seq"], 5, "records 1 to 4 are gone from the store");
    assert_eq!(broker.stop().0, Some(0));
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
