//! Durable before acknowledged, under a real crash: the broker binary is
//! killed with SIGKILL the moment it answers (an issuance, a revocation,
//! an identity denial, a policy change, a refusal it audits), then its store is reopened and
//! what it acknowledged must be there.
//!
//! A SIGKILL loses what the process held in memory or had queued, not
//! what it handed to the kernel: these tests prove the broker commits
//! before it answers, not that the commit reached the disk. That rests on
//! the store's settings, which `tests/store.rs` and `tests/postgres.rs`
//! check are in force (see docs/TESTING.md).

mod support;

use support::broker::{POLICY_FILE, Spawned};
use tally::clock::{Clock as _, SystemClock};
use tally::dpop::ProofKey;
use tally::proto::v1 as pb;
use tally::store::{AuditFilter, Sealer, Store};
use tokio::task::JoinSet;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Checkout may get payments tokens, without a rate limit (the load here
/// is far above the fixture's 50/s).
const POLICY: &str = "trust_domain: example.org
issue:
  - from: spiffe://example.org/ns/shop/sa/checkout
    to: spiffe://example.org/ns/pay/sa/payments
    scopes: [payments:charge]
";
const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
/// Calls kept in flight.
const IN_FLIGHT: usize = 64;
/// Answers before the kill.
const KILL_AFTER: usize = 128;
/// Crashes per test, each a chance to catch an answer sent before its
/// commit.
const ROUNDS: usize = 3;

/// A connected mTLS channel to `broker` as `identity`, within a bound.
async fn channel(broker: &Spawned, bundle: &str, identity: Identity) -> Channel {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle))
        .identity(identity)
        .domain_name("localhost");
    let endpoint = Channel::from_shared(format!("https://{}", broker.grpc))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    tokio::time::timeout(support::process::PATIENCE, endpoint.connect())
        .await
        .expect("connecting to the broker took too long")
        .unwrap()
}

/// The Admin API with the credential the broker wrote into `data`.
async fn admin_of(
    broker: &Spawned,
    data: &std::path::Path,
) -> pb::admin_client::AdminClient<Channel> {
    let read = |p: &str| std::fs::read_to_string(data.join(p)).unwrap();
    let identity = Identity::from_pem(read("admin/cert.pem"), read("admin/key.pem"));
    pb::admin_client::AdminClient::new(channel(broker, &read("bundle.pem"), identity).await)
}

/// The Tokens API as checkout, with a credential minted by the admin.
async fn tokens_as_checkout(
    broker: &Spawned,
    data: &std::path::Path,
) -> pb::tokens_client::TokensClient<Channel> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .unwrap()
        .der()
        .to_vec();
    let svid = admin_of(broker, data)
        .await
        .mint_svid(pb::MintSvidRequest {
            spiffe_id: CHECKOUT.into(),
            ttl_seconds: 600,
            csr_der: csr,
        })
        .await
        .unwrap()
        .into_inner();
    let chain: String = std::iter::once(&svid.svid_der)
        .chain(&svid.chain_der)
        .map(|d| tally::ca::pem("CERTIFICATE", d))
        .collect();
    let bundle = std::fs::read_to_string(data.join("bundle.pem")).unwrap();
    let identity = Identity::from_pem(chain, key.serialize_pem());
    pb::tokens_client::TokensClient::new(channel(broker, &bundle, identity).await)
}

/// One `Tokens.Issue` for `scope` with a fresh proof.
async fn issue(
    mut tokens: pb::tokens_client::TokensClient<Channel>,
    htu: String,
    scope: &str,
) -> Result<pb::IssueResponse, tonic::Status> {
    let key = ProofKey::generate().unwrap();
    let proof = key
        .mint("POST", &htu, None, None, SystemClock.now())
        .unwrap();
    tokens
        .issue(pb::IssueRequest {
            audience: PAYMENTS.into(),
            scopes: vec![scope.into()],
            ttl_seconds: 0,
            dpop_proof: proof,
        })
        .await
        .map(tonic::Response::into_inner)
}

/// A broker on `data` serving [`POLICY`] from a file next to it.
fn start(data: &std::path::Path) -> Spawned {
    let policy = data.with_extension("yaml");
    std::fs::write(&policy, POLICY).unwrap();
    Spawned::start_with(data, &["--policy", policy.to_str().unwrap()])
}

/// The store the killed broker left in `data`.
async fn reopen(data: &std::path::Path) -> Store {
    let key = std::fs::read(data.join("store.key")).unwrap();
    Store::open_sqlite(
        &data.join("tally.db"),
        Sealer::from_key_material(&key).unwrap(),
    )
    .await
    .unwrap()
}

/// The audit records of `kind` (and naming `jti`, when given) in `store`.
async fn audited(store: &Store, kind: &str, jti: Option<&str>) -> Vec<serde_json::Value> {
    let filter = AuditFilter {
        kind: Some(kind.into()),
        jti: jti.map(str::to_owned),
        ..AuditFilter::default()
    };
    store
        .audit_query(&filter, 1000)
        .await
        .unwrap()
        .iter()
        .map(|r| serde_json::from_str(&r.line).unwrap())
        .collect()
}

/// Whether `status` is a call cut off by the kill (no answer), rather
/// than an answer.
fn cut_off(status: &tonic::Status) -> bool {
    matches!(
        status.code(),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
    )
}

/// Keeps [`IN_FLIGHT`] calls made by `call` running (a new one as each
/// is answered) and SIGKILLs `broker` the moment the [`KILL_AFTER`]th
/// answer is in, with the rest still in flight; returns every answer
/// (those that arrived after it too: all were sent before the kill).
/// Under steady load, at the kill some calls are answered, some queued,
/// some half-committed: an answer sent before its commit shows up as a
/// missing record.
async fn kill_under_load<T, F>(
    broker: Spawned,
    mut call: impl FnMut(usize) -> F,
) -> Vec<Result<T, tonic::Status>>
where
    T: Send + 'static + std::fmt::Debug,
    F: std::future::Future<Output = Result<T, tonic::Status>> + Send + 'static,
{
    let mut running = JoinSet::new();
    for i in 0..IN_FLIGHT {
        running.spawn(call(i));
    }
    let mut started = IN_FLIGHT;
    let mut answers = Vec::new();
    while let Some(result) = running.join_next().await {
        let result = result.unwrap();
        assert!(
            !result.as_ref().is_err_and(cut_off),
            "before the kill: {result:?}"
        );
        answers.push(result);
        if answers.len() == KILL_AFTER {
            break;
        }
        running.spawn(call(started));
        started += 1;
    }
    broker.kill();
    while let Some(result) = running.join_next().await {
        let result = result.unwrap();
        if !result.as_ref().is_err_and(cut_off) {
            answers.push(result);
        }
    }
    answers
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_issuance_answered_before_a_sigkill_is_in_the_inventory_and_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut answered = Vec::new();
    for _ in 0..ROUNDS {
        let broker = start(&data);
        let tokens = tokens_as_checkout(&broker, &data).await;
        let htu = format!("{}/tally.v1.Tokens/Issue", broker.issuer());
        answered.extend(
            kill_under_load(broker, |_| {
                issue(tokens.clone(), htu.clone(), "payments:charge")
            })
            .await,
        );
    }

    let store = reopen(&data).await;
    for answer in &answered {
        let issued = answer.as_ref().unwrap();
        assert_eq!(
            store.token_exp(&issued.jti).await.unwrap(),
            Some(u64::try_from(issued.expires_at).unwrap()),
            "token {} was acknowledged but is not in the inventory ({} answered)",
            issued.jti,
            answered.len()
        );
        let records = audited(&store, "token.issue", Some(&issued.jti)).await;
        assert_eq!(records.len(), 1, "{}: {records:?}", issued.jti);
        assert_eq!(records[0]["outcome"], "ok");
        assert_eq!(records[0]["actor"], CHECKOUT);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_answered_before_a_sigkill_is_in_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // A scope no rule grants checkout: refused, and each refusal audited
    // before it is answered.
    let mut refused = Vec::new();
    for _ in 0..ROUNDS {
        let broker = start(&data);
        let tokens = tokens_as_checkout(&broker, &data).await;
        let htu = format!("{}/tally.v1.Tokens/Issue", broker.issuer());
        refused.extend(
            kill_under_load(broker, |_| {
                issue(tokens.clone(), htu.clone(), "payments:refund")
            })
            .await,
        );
    }
    for answer in &refused {
        let status = answer.as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    }

    let store = reopen(&data).await;
    let records = audited(&store, "token.issue", None).await;
    assert!(
        records.len() >= refused.len(),
        "{} refusals answered, {} audited",
        refused.len(),
        records.len()
    );
    for record in &records {
        assert_eq!(record["outcome"], "denied", "{record}");
        assert_eq!(record["actor"], CHECKOUT);
        assert_eq!(record["scope"], "payments:refund");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_revocation_answered_before_a_sigkill_is_in_force_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Each a different DPoP key, so each is its own entry.
    let mut revoked = Vec::new();
    for _ in 0..ROUNDS {
        let broker = start(&data);
        let admin = admin_of(&broker, &data).await;
        revoked.extend(
            kill_under_load(broker, |_| {
                let mut admin = admin.clone();
                let jkt = ProofKey::generate().unwrap().thumbprint().to_string();
                async move {
                    let request = pb::RevokeRequest {
                        target: Some(pb::revoke_request::Target::Jkt(jkt.clone())),
                        reason: "key on a lost laptop".into(),
                    };
                    let answer = admin.revoke(request).await?.into_inner();
                    Ok((jkt, answer))
                }
            })
            .await,
        );
    }

    // In the state every new Watch subscriber (every sidecar after the
    // restart) gets, at the sequence number the answer named.
    let store = reopen(&data).await;
    let state = store.current_state(SystemClock.now()).await.unwrap();
    let audit = audited(&store, "token.revoke", None).await;
    for answer in &revoked {
        let (jkt, answer) = answer.as_ref().unwrap();
        let change = state
            .iter()
            .find(|c| c.seq == answer.sequence)
            .unwrap_or_else(|| panic!("revocation of {jkt} (seq {}) is gone", answer.sequence));
        assert_eq!(change.kind, "revocation");
        let entry = tally::token::Revocation::from_json(&change.body).unwrap();
        assert_eq!(
            entry.target,
            tally::token::RevocationTarget::Jkt(jkt.parse().unwrap())
        );
        assert_eq!(entry.reason, "key on a lost laptop");
        assert!(
            audit
                .iter()
                .any(|r| r["outcome"] == "ok" && r["value"] == jkt.as_str()),
            "revocation of {jkt} is not in the audit log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_identity_denial_answered_before_a_sigkill_is_in_force_after_the_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Each call denies another workload, so each is its own entry.
    let mut denied = Vec::new();
    for round in 0..ROUNDS {
        let broker = start(&data);
        let admin = admin_of(&broker, &data).await;
        denied.extend(
            kill_under_load(broker, |i| {
                let mut admin = admin.clone();
                let id = format!("spiffe://example.org/ns/crash/sa/w{round}-{i}");
                async move {
                    let request = pb::DenyIdentityRequest {
                        spiffe_id: id.clone(),
                        reason: "compromised node".into(),
                    };
                    let answer = admin.deny_identity(request).await?.into_inner();
                    Ok((id, answer))
                }
            })
            .await,
        );
    }

    // In the state every new Watch subscriber gets, at the sequence the
    // answer named, and audited.
    let store = reopen(&data).await;
    let state = store.current_state(SystemClock.now()).await.unwrap();
    let audit = audited(&store, "identity.deny", None).await;
    for answer in &denied {
        let (id, answer) = answer.as_ref().unwrap();
        assert!(!answer.was_denied, "{id}");
        let change = state
            .iter()
            .find(|c| c.seq == answer.sequence)
            .unwrap_or_else(|| panic!("the denial of {id} (seq {}) is gone", answer.sequence));
        assert_eq!(change.kind, "denial");
        let entry = tally::identity::denial::Denial::from_json(&change.body).unwrap();
        assert_eq!(entry.spiffe_id.as_str(), id);
        assert!(entry.denied);
        assert_eq!(entry.reason, "compromised node");
        assert!(
            audit
                .iter()
                .any(|r| r["outcome"] == "ok" && r["spiffe_id"] == id.as_str()),
            "the denial of {id} is not in the audit log"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_policy_version_applied_before_a_sigkill_is_kept_and_the_newest_served() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let original = std::fs::read_to_string(POLICY_FILE).unwrap();
    let mut applied = Vec::new();
    for round in 0..ROUNDS {
        // The file seeds the empty store; later the store serves alone.
        let broker = if round == 0 {
            Spawned::start_with(
                &data,
                &["--policy", POLICY_FILE, "--policy-source", "store"],
            )
        } else {
            Spawned::start_with(&data, &["--policy-source", "store"])
        };
        let admin = admin_of(&broker, &data).await;
        // Each a different document (a different extra scope), so each
        // apply stores a version.
        applied.extend(
            kill_under_load(broker, |i| {
                let mut admin = admin.clone();
                let n = round * 1000 + i;
                let yaml = original.replace(
                    "scopes: [payments:read]\n",
                    &format!("scopes: [payments:read, payments:extra{n}]\n"),
                );
                async move {
                    let request = pb::ApplyPolicyRequest {
                        yaml: yaml.clone(),
                        comment: format!("change {n}"),
                    };
                    let answer = admin.apply_policy(request).await?.into_inner();
                    Ok((yaml, answer))
                }
            })
            .await,
        );
    }

    let store = reopen(&data).await;
    let versions = store.policy_versions(1000).await.unwrap();
    let audit = audited(&store, "policy.change", None).await;
    for answer in &applied {
        let (yaml, answer) = answer.as_ref().unwrap();
        assert!(answer.changed);
        let stored = versions
            .iter()
            .find(|v| v.version == answer.version)
            .unwrap_or_else(|| panic!("version {} is gone", answer.version));
        assert_eq!(&stored.yaml, yaml);
        assert!(
            audit.iter().any(|r| r["version"] == answer.version),
            "version {} is not in the audit log",
            answer.version
        );
    }
    let newest = versions.iter().map(|v| v.version).max().unwrap();
    drop(store);

    // The restarted broker serves the newest stored version (no --policy:
    // a file would have to match it).
    let broker = Spawned::start_with(&data, &["--policy-source", "store"]);
    let served = admin_of(&broker, &data)
        .await
        .get_policy(pb::GetPolicyRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(served.version, newest);
    assert_eq!(broker.stop().0, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_file_holds_every_stored_record_after_a_crash_and_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The file is a copy the broker appends after each commit: a crash
    // can cut it short of the store. Each start catches it up, so it stays
    // one unbroken chain for log shippers and `audit verify --file`.
    for _ in 0..ROUNDS {
        let broker = start(&data);
        let tokens = tokens_as_checkout(&broker, &data).await;
        let htu = format!("{}/tally.v1.Tokens/Issue", broker.issuer());
        kill_under_load(broker, |_| {
            issue(tokens.clone(), htu.clone(), "payments:charge")
        })
        .await;
    }
    let broker = start(&data);
    assert_eq!(broker.stop().0, Some(0));
    let stored = reopen(&data).await.audit_head().await.unwrap().seq;
    let o = support::process::output_within(
        std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["ctl", "audit", "verify", "--output", "json", "--file"])
            .arg(data.join("audit.jsonl")),
        support::process::PATIENCE,
    );
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(report["intact"], true, "{report}");
    assert_eq!(report["head_seq"], stored, "{report}");
}
