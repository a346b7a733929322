//! Attestation the cluster way, end to end: the `tally broker` binary
//! with `--sa-issuer` finds the cluster's keys by OpenID discovery over
//! HTTPS (the test CA given as `--sa-ca-file`, its own token as bearer),
//! refreshes them when the cluster rotates, asks for a TokenReview before
//! an SVID, and records the pod. The cluster is a stand-in
//! (`support::cluster`): a real HTTPS server speaking the discovery,
//! JWKS and TokenReview wire formats, since no API server can run here.

mod support;

use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use support::broker::{POLICY_FILE, Spawned};
use support::cluster::{Signer, StandIn, jwks, pod_claims, review_answer};
use tally::clock::{Clock, SystemClock};
use tally::proto::v1 as pb;
use tonic::Code;

const AUDIENCE: &str = "https://broker.tally.test";
const POD: (&str, &str) = ("checkout-7d9f", "3f1c9a52-1b7e-4c1d-9a2e-6d0b8f4e2a11");
/// The broker's own ServiceAccount token (its bearer to the cluster).
const BROKER_TOKEN: &str = "broker-sa-token-9f8e7d6c";

/// `tally broker` attesting against `cluster` (CA file with `cas`), with
/// `extra` flags. Returns it and its data dir.
fn broker(dir: &Path, issuer: &str, cas: &[&str], extra: &[&str]) -> (Spawned, PathBuf) {
    let ca = dir.join("cluster-ca.pem");
    std::fs::write(&ca, cas.concat()).unwrap();
    let token = dir.join("broker-token");
    std::fs::write(&token, format!("{BROKER_TOKEN}\n")).unwrap();
    let data = dir.join("data");
    let mut args = vec![
        "--policy",
        POLICY_FILE,
        "--sa-issuer",
        issuer,
        "--sa-audience",
        AUDIENCE,
        "--sa-ca-file",
        ca.to_str().unwrap(),
        "--sa-api-token-file",
        token.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    (Spawned::start_with(&data, &args), data)
}

fn now() -> u64 {
    SystemClock.now()
}

/// `Identity.Attest` with `token` (no client certificate: none is needed).
async fn attest(
    broker: &Spawned,
    data: &Path,
    token: &str,
) -> Result<pb::SvidResponse, tonic::Status> {
    attest_to(&broker.grpc, data, token).await
}

/// The same at the broker listening at `grpc`.
async fn attest_to(
    grpc: &str,
    data: &Path,
    token: &str,
) -> Result<pb::SvidResponse, tonic::Status> {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};
    let bundle = std::fs::read_to_string(data.join("bundle.pem")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle))
        .domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{grpc}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy();
    pb::identity_client::IdentityClient::new(channel)
        .attest(pb::AttestRequest {
            credential: Some(pb::attest_request::Credential::ServiceAccountToken(
                token.into(),
            )),
            csr_der: support::broker::csr(),
        })
        .await
        .map(tonic::Response::into_inner)
}

fn checkout(cluster: &StandIn, signer: &Signer, kid: Option<&str>) -> String {
    let claims = pod_claims(&cluster.url, AUDIENCE, "shop", "checkout", POD, now());
    signer.sign(&claims, kid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_attests_with_discovered_keys_and_after_the_cluster_rotates_them() {
    let cluster = StandIn::start().await;
    let rsa = Signer::rsa("rsa-1");
    *cluster.answers.jwks.lock().unwrap() = jwks(&[&rsa]);
    let dir = tempfile::tempdir().unwrap();
    let (broker, data) = broker(dir.path(), &cluster.url, &[&cluster.ca_pem], &[]);

    let svid = attest(&broker, &data, &checkout(&cluster, &rsa, None))
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://example.org/ns/shop/sa/checkout");
    let fetched = cluster.answers.jwks_fetches.load(Ordering::SeqCst);
    assert_eq!(fetched, 1, "the keys fetched once, at start");

    // The cluster rotates to an ES256 key: a token under its new kid
    // attests after one refresh.
    let ec = Signer::ec("ec-2");
    *cluster.answers.jwks.lock().unwrap() = jwks(&[&rsa, &ec]);
    let svid = attest(&broker, &data, &checkout(&cluster, &ec, None))
        .await
        .unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://example.org/ns/shop/sa/checkout");
    assert_eq!(cluster.answers.jwks_fetches.load(Ordering::SeqCst), 2);

    // A burst of made-up kids, at once and one after another: refused,
    // and no fetch (one miss fetched less than 10 s ago).
    let burst = (0..16).map(|i| {
        let token = checkout(&cluster, &rsa, Some(&format!("made-up-{i}")));
        let (grpc, data) = (broker.grpc.clone(), data.clone());
        async move { attest_to(&grpc, &data, &token).await }
    });
    for refused in futures_join(burst).await {
        let e = refused.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("kid \"made-up-"), "{}", e.message());
    }
    assert_eq!(
        cluster.answers.jwks_fetches.load(Ordering::SeqCst),
        2,
        "the burst fetched nothing"
    );

    // Its JWKS failing now changes nothing for keys already held.
    cluster.answers.jwks_fails.store(true, Ordering::SeqCst);
    attest(&broker, &data, &checkout(&cluster, &rsa, None))
        .await
        .unwrap();

    // Every request carried the broker's own token, and only that.
    let bearers = cluster.answers.bearers.lock().unwrap().clone();
    assert!(!bearers.is_empty());
    assert!(
        bearers
            .iter()
            .all(|b| *b == format!("Bearer {BROKER_TOKEN}")),
        "{bearers:?}"
    );
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(
        !log.contains(BROKER_TOKEN),
        "the broker's token is never logged"
    );
}

/// Joins every future (the test crate has no `futures`).
async fn futures_join<F: std::future::Future + Send + 'static>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output>
where
    F::Output: Send,
{
    let mut set = tokio::task::JoinSet::new();
    for (i, f) in futures.enumerate() {
        set.spawn(async move { (i, f.await) });
    }
    let mut out: Vec<_> = set.join_all().await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, o)| o).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_that_cannot_be_trusted_is_refused_with_its_reason_and_the_broker_stays_up() {
    let rsa = Signer::rsa("rsa-1");
    // (what the cluster does wrong, what the refusal must say)
    let cases: [(&str, &str); 4] = [
        ("wrong issuer", "names issuer \"https://evil.example\""),
        ("http jwks_uri", "must be an https:// URL"),
        ("oversized JWKS", "is larger than 262144 bytes"),
        ("stalls", "did not answer within 10s"),
    ];
    for (case, needle) in cases {
        let cluster = StandIn::start().await;
        let url = cluster.url.clone();
        *cluster.answers.jwks.lock().unwrap() = jwks(&[&rsa]);
        match case {
            "wrong issuer" => {
                *cluster.answers.discovery.lock().unwrap() = Some(
                    json!({"issuer": "https://evil.example", "jwks_uri": format!("{url}/openid/v1/jwks")})
                        .to_string()
                        .into_bytes(),
                );
            }
            "http jwks_uri" => {
                let plain = url.replace("https://", "http://");
                *cluster.answers.discovery.lock().unwrap() = Some(
                    json!({"issuer": url, "jwks_uri": format!("{plain}/openid/v1/jwks")})
                        .to_string()
                        .into_bytes(),
                );
            }
            "oversized JWKS" => {
                *cluster.answers.jwks.lock().unwrap() = vec![b' '; 300 * 1024];
            }
            _ => cluster.answers.stall.store(true, Ordering::SeqCst),
        }
        let token = checkout(&cluster, &rsa, None);
        let dir = tempfile::tempdir().unwrap();
        let (broker, data) = broker(dir.path(), &cluster.url, &[&cluster.ca_pem], &[]);
        let e = attest(&broker, &data, &token).await.unwrap_err();
        assert_eq!(e.code(), Code::Unavailable, "{case}: {e:?}");
        assert!(e.message().contains(needle), "{case}: {}", e.message());
        assert!(
            e.message().contains("keys are not available"),
            "{case}: {}",
            e.message()
        );
        // Still serving: a second try is answered the same way.
        let again = attest(&broker, &data, &token).await.unwrap_err();
        assert_eq!(again.code(), Code::Unavailable, "{case}: {again:?}");
        let (code, _) = broker.stop();
        assert_eq!(code, Some(0), "{case}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_review_decides_before_an_svid_is_issued() {
    let cluster = StandIn::start().await;
    let api = StandIn::start().await;
    let rsa = Signer::rsa("rsa-1");
    *cluster.answers.jwks.lock().unwrap() = jwks(&[&rsa]);
    // Which answer the API server gives: 0 yes, 1 pod deleted, 2 other pod.
    let mode = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let m = std::sync::Arc::clone(&mode);
    api.review_with(move |req| {
        let user = "system:serviceaccount:shop:checkout";
        match m.load(Ordering::SeqCst) {
            0 => (201, review_answer(req, true, user, POD.1)),
            1 => (
                201,
                json!({"kind": "TokenReview", "status": {"authenticated": false,
                    "error": "pod \"checkout-7d9f\" not found"}}),
            ),
            _ => (
                201,
                review_answer(req, true, user, "00000000-0000-0000-0000-000000000000"),
            ),
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (broker, data) = broker(
        dir.path(),
        &cluster.url,
        &[&cluster.ca_pem, &api.ca_pem],
        &["--sa-token-review", "--kube-api", &api.url],
    );
    let token = checkout(&cluster, &rsa, None);

    let svid = attest(&broker, &data, &token).await.unwrap();
    assert_eq!(svid.spiffe_id, "spiffe://example.org/ns/shop/sa/checkout");
    let reviews = api.answers.reviews.lock().unwrap().clone();
    assert_eq!(reviews.len(), 1);
    assert_eq!(reviews[0]["apiVersion"], "authentication.k8s.io/v1");
    assert_eq!(reviews[0]["spec"]["token"], token.as_str());
    assert_eq!(reviews[0]["spec"]["audiences"], json!([AUDIENCE]));
    assert_eq!(
        api.answers.bearers.lock().unwrap().clone(),
        vec![format!("Bearer {BROKER_TOKEN}")],
        "the broker sent its own token, not the pod's"
    );

    // Renewal: never on the SVID alone while TokenReview is on (a deleted
    // pod's key must not renew itself); the sidecar attests again with its
    // current token, and that is reviewed again.
    {
        use tally::sidecar::identity::{Attestation, IdentityClient};
        let token_file = dir.path().join("sa-token");
        std::fs::write(&token_file, &token).unwrap();
        let client = IdentityClient::new(
            format!(
                "https://localhost:{}",
                broker.grpc.rsplit(':').next().unwrap()
            ),
            std::fs::read_to_string(data.join("bundle.pem")).unwrap(),
        );
        let how = Attestation::ServiceAccountTokenFile(token_file);
        let svid = client.attest(&how, now()).await.unwrap();
        let e = client.renew(&svid, now()).await.unwrap_err();
        assert!(
            e.to_string()
                .contains("attest again with the current token"),
            "{e}"
        );
        let before = api.answers.reviews.lock().unwrap().len();
        client.attest(&how, now()).await.unwrap();
        assert_eq!(api.answers.reviews.lock().unwrap().len(), before + 1);
    }

    for (m, needle) in [(1, "does not authenticate"), (2, "names pod uid")] {
        mode.store(m, Ordering::SeqCst);
        let e = attest(&broker, &data, &token).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
        assert!(e.message().contains(needle), "{}", e.message());
        assert!(
            !e.message().contains(&token),
            "the token is never in an error"
        );
    }

    // The API server gone: refused as unavailable, never taken as a yes.
    drop(api);
    let e = attest(&broker, &data, &token).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("TokenReview"), "{}", e.message());

    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    for (name, text) in [("log", &log), ("audit", &audit)] {
        assert!(
            !text.contains(&token),
            "the pod's token is not in the {name}"
        );
        assert!(
            !text.contains(BROKER_TOKEN),
            "the broker's token is not in the {name}"
        );
    }
    let refusals: Vec<Value> = audit
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r["kind"] == "identity.attest" && r["outcome"] != "ok")
        .collect();
    assert_eq!(refusals.len(), 3, "{refusals:?}");
    assert_eq!(
        refusals[2]["outcome"], "error",
        "an API server down is the broker's trouble"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_token_review_a_pod_still_gets_a_workload_svid_that_ends_with_its_own() {
    use tally::sidecar::identity::{Attestation, IdentityClient};
    let cluster = StandIn::start().await;
    let api = StandIn::start().await;
    let rsa = Signer::rsa("rsa-1");
    *cluster.answers.jwks.lock().unwrap() = jwks(&[&rsa]);
    api.review_with(|req| {
        let user = "system:serviceaccount:shop:checkout";
        (201, review_answer(req, true, user, POD.1))
    });
    let dir = tempfile::tempdir().unwrap();
    let (broker, data) = broker(
        dir.path(),
        &cluster.url,
        &[&cluster.ca_pem, &api.ca_pem],
        &["--sa-token-review", "--kube-api", &api.url],
    );
    let token_file = dir.path().join("sa-token");
    std::fs::write(&token_file, checkout(&cluster, &rsa, None)).unwrap();
    let client = IdentityClient::new(
        format!(
            "https://localhost:{}",
            broker.grpc.rsplit(':').next().unwrap()
        ),
        std::fs::read_to_string(data.join("bundle.pem")).unwrap(),
    );
    let svid = client
        .attest(&Attestation::ServiceAccountTokenFile(token_file), now())
        .await
        .unwrap();
    let out = dir.path().join("svid");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("cert.pem"), &svid.chain_pem).unwrap();
    std::fs::write(out.join("key.pem"), svid.key_pem.as_bytes()).unwrap();
    std::fs::write(out.join("bundle.pem"), &svid.bundle_pem).unwrap();
    let mut identity = pb::identity_client::IdentityClient::new(broker.channel_with(&out).await);

    // Renew is refused under TokenReview; a workload SVID extends nothing,
    // so it is issued, and it expires no later than the pod's SVID.
    let e = identity
        .renew(pb::RenewRequest {
            csr_der: support::broker::csr(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    let got = identity
        .issue_workload_svid(pb::WorkloadSvidRequest {
            csr_der: support::broker::csr(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.spiffe_id, "spiffe://example.org/ns/shop/sa/checkout");
    assert!(u64::try_from(got.expires_at).unwrap() <= svid.expires_at);

    // Recorded as `workload`, with the pod.
    let records = support::ctl::text(&broker.ctl(
        &data,
        &[
            "audit",
            "query",
            "--type",
            "identity.workload_svid",
            "--output",
            "json",
        ],
    ));
    let records: Value = serde_json::from_str(&records).unwrap();
    let record = &records.as_array().unwrap()[0];
    assert_eq!(record["method"], "workload", "{records}");
    assert_eq!(record["pod"], POD.0, "{records}");
    assert_eq!(record["pod_uid"], POD.1, "{records}");
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_and_a_leaked_tokens_lookup_name_the_pod() {
    use tally::sidecar::identity::{Attestation, IdentityClient};
    let cluster = StandIn::start().await;
    let rsa = Signer::rsa("rsa-1");
    *cluster.answers.jwks.lock().unwrap() = jwks(&[&rsa]);
    let dir = tempfile::tempdir().unwrap();
    let (broker, data) = broker(dir.path(), &cluster.url, &[&cluster.ca_pem], &[]);

    // The sidecar's own attestation, from the projected token file.
    let token_file = dir.path().join("sa-token");
    std::fs::write(&token_file, checkout(&cluster, &rsa, None)).unwrap();
    let bundle = std::fs::read_to_string(data.join("bundle.pem")).unwrap();
    let client = IdentityClient::new(
        format!(
            "https://localhost:{}",
            broker.grpc.rsplit(':').next().unwrap()
        ),
        bundle,
    );
    let svid = client
        .attest(&Attestation::ServiceAccountTokenFile(token_file), now())
        .await
        .unwrap();
    // Renewed: the new SVID stays the pod's.
    let svid = client.renew(&svid, now()).await.unwrap();

    // A token issued to it, as if it leaked.
    let out = dir.path().join("svid");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("cert.pem"), &svid.chain_pem).unwrap();
    std::fs::write(out.join("key.pem"), svid.key_pem.as_bytes()).unwrap();
    std::fs::write(out.join("bundle.pem"), &svid.bundle_pem).unwrap();
    let channel = broker.channel_with(&out).await;
    let issued = support::broker::issue(
        &channel,
        &svid.issue_htu(),
        "spiffe://example.org/ns/pay/sa/payments",
        "payments:charge",
    )
    .await
    .unwrap();

    let list = support::ctl::text(&broker.ctl(&data, &["identities", "list"]));
    let row = list
        .lines()
        .find(|l| l.contains("ns/shop/sa/checkout"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(row.contains(&format!("{} ({})", POD.0, POD.1)), "{list}");
    let json = support::ctl::text(&broker.ctl(&data, &["identities", "list", "--output", "json"]));
    let rows: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        rows[0]["pods"],
        json!([{"name": POD.0, "uid": POD.1}]),
        "{json}"
    );

    let lookup = support::ctl::text(
        &broker.ctl(&data, &["audit", "lookup", "--token", &issued.access_token]),
    );
    let issuance = lookup
        .lines()
        .find(|l| l.contains("token.issue"))
        .unwrap_or_else(|| panic!("{lookup}"));
    assert!(issuance.contains(&format!("pod={}", POD.0)), "{lookup}");
    assert!(issuance.contains(&format!("pod_uid={}", POD.1)), "{lookup}");
    broker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_tokens_are_refused_with_discovered_keys_too() {
    let cluster = StandIn::start().await;
    let rsa = Signer::rsa("rsa-1");
    *cluster.answers.jwks.lock().unwrap() = jwks(&[&rsa]);
    let dir = tempfile::tempdir().unwrap();
    let (broker, data) = broker(dir.path(), &cluster.url, &[&cluster.ca_pem], &[]);
    let good = pod_claims(&cluster.url, AUDIENCE, "shop", "checkout", POD, now());
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut c = good.clone();
        edit(&mut c);
        rsa.sign(&c, None)
    };
    let none = {
        let t = rsa.sign(&good, None);
        let mut parts: Vec<&str> = t.split('.').collect();
        let header = tally::jose::b64::encode(r#"{"alg":"none","kid":"rsa-1"}"#);
        parts[0] = &header;
        format!("{}.{}.", parts[0], parts[1])
    };
    for (token, needle) in [
        (with(&|c| c["aud"] = json!(["https://other"])), "audience"),
        (
            with(&|c| c["iss"] = "https://evil.example".into()),
            "issuer",
        ),
        (with(&|c| c["exp"] = (now() - 120).into()), "expired"),
        (
            with(&|c| c["kubernetes.io"]["pod"]["uid"] = "x; DROP TABLE".into()),
            "pod must have a valid name and uid",
        ),
        (none, "alg \"none\" is not accepted"),
    ] {
        let e = attest(&broker, &data, &token).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{needle}: {e:?}");
        assert!(e.message().contains(needle), "{needle}: {}", e.message());
    }
    broker.stop();
}
