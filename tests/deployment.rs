//! A deployment keeps its trust domain and token issuer for life: a
//! broker restarted on the same store, or a replica on the same database,
//! under other ones refuses to start (exit 64) naming both, before it
//! writes anything under them.

mod support;

use std::process::Command;
use support::broker::{EPHEMERAL_PORTS, POLICY_FILE, Spawned, settings};
use support::postgres::Postgres;
use support::process::{PATIENCE, output_within};
use tally::broker::deployment::DeploymentError;
use tally::broker::{Broker, BrokerError};
use tally::clock::SystemClock;
use tally::store::{Sealer, Store};

/// `tally broker ARGS` on `data` until it exits (it is expected to refuse).
fn refused_start(data: &std::path::Path, args: &[&str]) -> (Option<i32>, String) {
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("broker")
            .args(args)
            .args(EPHEMERAL_PORTS)
            .arg("--data-dir")
            .arg(data)
            .env_remove("TALLY_STORE_KEY"),
        PATIENCE,
    );
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

#[test]
fn a_broker_restarted_with_another_trust_domain_refuses_naming_both_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    assert_eq!(broker.stop().0, Some(0));
    let admin_cert = std::fs::read(data.join("admin/cert.pem")).unwrap();

    let policy = dir.path().join("other.yaml");
    std::fs::write(&policy, "trust_domain: other.example\n").unwrap();
    let (code, err) = refused_start(
        &data,
        &[
            "--trust-domain",
            "other.example",
            "--policy",
            policy.to_str().unwrap(),
        ],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("trust domain example.org, not other.example"),
        "{err}"
    );
    assert!(err.contains("--trust-domain example.org"), "{err}");
    assert!(err.contains("new deployment"), "{err}");
    assert_eq!(
        std::fs::read(data.join("admin/cert.pem")).unwrap(),
        admin_cert,
        "the admin credential is still the deployment's"
    );
    // The right one still starts.
    let broker = Spawned::start(&data);
    assert_eq!(broker.stop().0, Some(0));
}

#[test]
fn a_single_broker_keeps_its_issuer_across_ports_and_refuses_another() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let first = Spawned::start(&data);
    let issuer = first.issuer();
    assert_eq!(first.stop().0, Some(0));
    // Restarted on another ephemeral HTTPS port without --issuer: the
    // recorded one, which its sidecars and live tokens carry.
    let again = Spawned::start(&data);
    assert_eq!(again.issuer(), issuer);
    assert_eq!(again.stop().0, Some(0));

    let (code, err) = refused_start(
        &data,
        &[
            "--trust-domain",
            "example.org",
            "--policy",
            POLICY_FILE,
            "--issuer",
            "https://broker.example:8444",
        ],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains(&format!(
            "issued as {issuer}, not https://broker.example:8444"
        )),
        "{err}"
    );
    assert!(err.contains("would be refused"), "{err}");

    // Both changed at once: both named, not only the first.
    let (code, err) = refused_start(
        &data,
        &[
            "--trust-domain",
            "other.example",
            "--policy",
            POLICY_FILE,
            "--issuer",
            "https://broker.example:8444",
        ],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("belongs to trust domain example.org, not other.example")
            && err.contains(&format!(
                "issued as {issuer}, not https://broker.example:8444"
            )),
        "{err}"
    );
}

#[tokio::test]
async fn a_store_from_before_deployments_were_recorded_is_checked_against_its_ca() {
    use sqlx::Connection as _;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("tally.db");
    let key = Sealer::generate_key_text().unwrap();
    let open = || async {
        Store::open_sqlite(&db, Sealer::from_key_material(key.as_bytes()).unwrap())
            .await
            .unwrap()
    };
    let policy = std::fs::read_to_string(POLICY_FILE).unwrap();
    let broker = Broker::open(
        settings(&policy),
        open().await,
        std::sync::Arc::new(SystemClock),
    )
    .await
    .unwrap();
    drop(broker);
    // As a store migrated to the deployment table but never recorded in.
    let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("DELETE FROM deployment")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();

    let other = tally::broker::BrokerSettings::with_policy(
        "other.example",
        "trust_domain: other.example\n",
    )
    .unwrap();
    let refused = Broker::open(other, open().await, std::sync::Arc::new(SystemClock)).await;
    match refused {
        Err(BrokerError::Deployment(DeploymentError::TrustDomain { stored, configured })) => {
            assert_eq!(
                (stored.as_str(), configured.as_str()),
                ("example.org", "other.example")
            );
        }
        other => panic!("expected a trust-domain refusal, got {other:?}"),
    }
    let store = open().await;
    assert_eq!(
        store.deployment_setting("trust_domain").await.unwrap(),
        None
    );
    Broker::open(settings(&policy), store, std::sync::Arc::new(SystemClock))
        .await
        .unwrap();
    let store = open().await;
    assert_eq!(
        store
            .deployment_setting("trust_domain")
            .await
            .unwrap()
            .as_deref(),
        Some("example.org"),
        "recorded once a broker opened under it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_with_another_issuer_or_trust_domain_on_the_same_database_is_refused() {
    let pg = Postgres::start();
    let url = pg.database().await;
    let key = Sealer::generate_key_text().unwrap();
    let open = || async {
        Store::open_postgres(&url, Sealer::from_key_material(key.as_bytes()).unwrap())
            .await
            .unwrap()
    };
    let policy = std::fs::read_to_string(POLICY_FILE).unwrap();
    let with_issuer = |issuer: &str| {
        let mut s = settings(&policy);
        s.issuer = issuer.to_owned();
        s
    };
    let clock = || std::sync::Arc::new(SystemClock);
    let first = Broker::open(
        with_issuer("https://tally.example:8444"),
        open().await,
        clock(),
    )
    .await
    .unwrap();
    Broker::open(
        with_issuer("https://tally.example:8444/"),
        open().await,
        clock(),
    )
    .await
    .expect("a replica with the same issuer joins");
    let refused = Broker::open(with_issuer("https://10.0.0.7:8444"), open().await, clock()).await;
    match refused {
        Err(BrokerError::Deployment(e @ DeploymentError::Issuer { .. })) => {
            let text = e.to_string();
            assert!(
                text.contains("issued as https://tally.example:8444, not https://10.0.0.7:8444"),
                "{text}"
            );
            assert!(text.contains("same --issuer"), "{text}");
        }
        other => panic!("expected an issuer refusal, got {other:?}"),
    }
    let mut other = tally::broker::BrokerSettings::with_policy(
        "other.example",
        "trust_domain: other.example\n",
    )
    .unwrap();
    // The same issuer, so the trust domain is the one difference.
    other.issuer = "https://tally.example:8444".into();
    let refused = Broker::open(other, open().await, clock()).await;
    assert!(
        matches!(
            refused,
            Err(BrokerError::Deployment(DeploymentError::TrustDomain { .. }))
        ),
        "{refused:?}"
    );
    drop(first);
    drop(pg);
}

#[test]
fn a_broker_on_postgres_without_an_issuer_is_refused_before_it_connects() {
    let dir = tempfile::tempdir().unwrap();
    let (code, err) = refused_start(
        &dir.path().join("data"),
        &[
            "--trust-domain",
            "example.org",
            "--database-url",
            "postgres://tally:hunter2@127.0.0.1:1/tally",
        ],
    );
    assert_eq!(code, Some(64), "{err}");
    assert!(
        err.contains("issuer is required with database_url"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "{err}");
}
