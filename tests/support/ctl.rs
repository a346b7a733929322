//! `tally ctl` against a [`Spawned`] broker, bounded, and the states the
//! ctl tests start from (a workload holding a token, an exported audit
//! log, a policy applied and rolled back).

use super::broker::{POLICY_FILE, Spawned};
use super::process::{PATIENCE, output_within};
use std::process::Command;
use tally::proto::v1 as pb;

/// `tally ctl ARGS` against `broker` as the admin in `data`, for at most
/// [`PATIENCE`]; whatever it exits with.
pub fn ctl(broker: &Spawned, data: &std::path::Path, args: &[&str]) -> std::process::Output {
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

/// Stdout then stderr, for failure messages and searching both.
pub fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `ctl svid mint` of `id` into `out`; must succeed.
pub fn mint_svid(broker: &Spawned, data: &std::path::Path, id: &str, out: &std::path::Path) {
    let o = ctl(
        broker,
        data,
        &[
            "svid",
            "mint",
            "--spiffe-id",
            id,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
}

/// Asks the broker for a token with the credential in `dir` (cert.pem,
/// key.pem, bundle.pem, as `ctl svid mint` writes them).
pub async fn issue_with(
    broker: &Spawned,
    dir: &std::path::Path,
) -> Result<pb::IssueResponse, tonic::Status> {
    let channel = broker.channel_with(dir).await;
    let proof = tally::dpop::ProofKey::generate()
        .unwrap()
        .mint(
            "POST",
            &format!("{}/tally.v1.Tokens/Issue", broker.issuer()),
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

/// The checkout workload.
pub const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";

/// A broker on `dir/data` where checkout holds a credential minted by
/// the admin (in `dir/checkout`) and one token issued with it.
pub struct Issued {
    pub broker: Spawned,
    pub data: std::path::PathBuf,
    pub issued: pb::IssueResponse,
}

impl Issued {
    pub async fn start(dir: &std::path::Path) -> Self {
        let data = dir.join("data");
        let broker = Spawned::start(&data);
        let checkout = dir.join("checkout");
        mint_svid(&broker, &data, CHECKOUT, &checkout);
        let issued = issue_with(&broker, &checkout).await.unwrap();
        Self {
            broker,
            data,
            issued,
        }
    }

    /// `ctl ARGS` against it.
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        ctl(&self.broker, &self.data, args)
    }
}

/// `ctl join-token create` for `id`; the token, checked to be printed
/// alone.
pub fn create_join_token(broker: &Spawned, data: &std::path::Path, id: &str) -> String {
    let o = ctl(
        broker,
        data,
        &["join-token", "create", "--spiffe-id", id, "--ttl", "5m"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let token = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    assert_eq!(token.lines().count(), 1);
    token
}

/// `Identity.Attest` with `token`, over TLS that trusts the bundle in
/// `data` (no client certificate: the join token is the credential).
pub async fn attest(broker: &Spawned, data: &std::path::Path, token: &str) -> pb::SvidResponse {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
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
    pb::identity_client::IdentityClient::new(channel)
        .attest(pb::AttestRequest {
            credential: Some(pb::attest_request::Credential::JoinToken(token.to_owned())),
            csr_der: super::broker::csr(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// A broker on `dir/data` that has audited `n` admin queries (`keys list`)
/// beyond its start-up records.
pub fn audited(dir: &std::path::Path, n: usize) -> (Spawned, std::path::PathBuf) {
    let data = dir.join("data");
    let broker = Spawned::start(&data);
    for _ in 0..n {
        assert_eq!(
            ctl(&broker, &data, &["keys", "list"]).status.code(),
            Some(0)
        );
    }
    (broker, data)
}

/// A broker with six admin queries audited whose records 1 to 4 were
/// exported to `archive`; the exported head's SHA-256.
pub fn exported(
    dir: &std::path::Path,
    archive: &std::path::Path,
) -> (Spawned, std::path::PathBuf, String) {
    let (broker, data) = audited(dir, 6);
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
    (broker, data, sha)
}

/// A store-source broker on `dir/data` seeded from the test policy
/// (version 1), then `dir/widened.yaml` applied (version 2, which
/// adds payments:refund), a broken file refused, then rolled back to version 1 (version 3).
pub struct RolledBack {
    pub broker: Spawned,
    pub data: std::path::PathBuf,
    /// The test policy's text (versions 1 and 3).
    pub original: String,
    /// The file of version 2.
    pub widened: std::path::PathBuf,
}

impl RolledBack {
    pub fn start(dir: &std::path::Path) -> Self {
        let data = dir.join("data");
        let original = std::fs::read_to_string(POLICY_FILE).unwrap();
        let broker = Spawned::start_with(
            &data,
            &["--policy", POLICY_FILE, "--policy-source", "store"],
        );
        let this = Self {
            broker,
            data,
            original,
            widened: dir.join("widened.yaml"),
        };
        // The file seeded the empty store as version 1.
        let (code, out, _) = this.run(&["policy", "history", "--output", "json"]);
        assert_eq!(code, Some(0));
        let history: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(history["policy_source"], "store");
        assert_eq!(history["versions"][0]["version"], 1);
        assert_eq!(history["versions"][0]["source"], "seed");

        std::fs::write(
            &this.widened,
            this.original.replace(
                "scopes: [payments:read]\n",
                "scopes: [payments:read, payments:refund]\n",
            ),
        )
        .unwrap();
        let widened = this.widened.to_str().unwrap();
        let (code, out, err) = this.run(&[
            "policy",
            "apply",
            widened,
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
        let (code, out, _) = this.run(&["policy", "apply", widened]);
        assert_eq!(code, Some(0));
        assert!(out.starts_with("unchanged: version 2"), "{out}");
        // A broken file is refused here, with its position; nothing is stored.
        let broken = dir.join("broken.yaml");
        std::fs::write(&broken, this.original.replace("issue:", "issu:")).unwrap();
        let (code, _, err) = this.run(&["policy", "apply", broken.to_str().unwrap()]);
        assert_eq!(code, Some(64), "{err}");
        assert!(err.contains("broken.yaml:"), "{err}");

        let (code, out, _) = this.run(&[
            "policy",
            "rollback",
            "1",
            "--comment",
            "refunds were a mistake",
        ]);
        assert_eq!(code, Some(0));
        assert!(out.starts_with("policy version 3 is served now"), "{out}");
        this
    }

    /// `ctl ARGS`: exit code, stdout, stderr.
    pub fn run(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let o = ctl(&self.broker, &self.data, args);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }
}
