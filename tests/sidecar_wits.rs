//! The sidecar's WIT holder against a real broker: one broker call for
//! concurrent callers, refreshed ahead of expiry, replaced when the key
//! changes (an SVID renewal, in a real sidecar too), kept through a
//! broker outage until it runs out, and dropped and fetched anew when a
//! revocation by jti, holder or key reaches the sidecar's Watch stream.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::broker::{ServedBroker, channel_holding, serve_broker, settings};
use support::mesh::{CHECKOUT, Mesh, Parts};
use tally::clock::{Clock, SystemClock};
use tally::dpop::ProofKey;
use tally::sidecar::cache::{CacheConfig, CacheError, TokenCache};
use tally::sidecar::issuer::BrokerIssuer;
use tally::sidecar::watch::MeshState;
use tally::sidecar::wits::{FetchedWit, WitAsk, Wits};
use tally::token::RevocationTarget;
use tokio::sync::watch;

/// The test policy with a WIT for every workload.
fn policy() -> String {
    format!(
        "{}wit:\n  - from: spiffe://example.org/ns/*/sa/*\n",
        support::mesh::POLICY
    )
}

/// Short-lived WITs need a floor below the default 5 s.
const CONFIG: CacheConfig = CacheConfig {
    capacity: 16,
    refresh_at: 0.5,
    jitter: 0.05,
    min_left_fraction: 0.1,
    min_left: Duration::from_secs(1),
};

async fn start() -> (tempfile::TempDir, ServedBroker) {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings(&policy()), "127.0.0.1:0").await;
    (dir, served)
}

/// A channel and proof key for a credential of checkout living `ttl`
/// seconds, as a sidecar holds them.
fn identity(served: &ServedBroker, ttl: u64) -> (tonic::transport::Channel, Arc<ProofKey>) {
    let credential = served
        .broker
        .mint_credential(&CHECKOUT.parse().unwrap(), ttl)
        .unwrap();
    let key = tally::jose::SigningKey::from_pkcs8_pem(credential.key_pem.as_bytes()).unwrap();
    let channel = channel_holding(served, &credential, served.addr);
    (channel, Arc::new(ProofKey::new(key)))
}

struct Holder {
    issuer: Arc<BrokerIssuer>,
    wits: Arc<TokenCache<Wits>>,
    _mesh: watch::Sender<MeshState>,
}

fn holder(served: &ServedBroker, ttl: u64) -> Holder {
    let (channel, key) = identity(served, ttl);
    let htu = format!("{}/tally.v1.Tokens/Issue", served.broker.issuer());
    let issuer = Arc::new(BrokerIssuer::new(channel, key, htu, Arc::new(SystemClock)));
    let (mesh, rx) = watch::channel(MeshState::default());
    let fetcher = Wits::new(
        Arc::clone(&issuer),
        rx,
        CHECKOUT.parse().unwrap(),
        Arc::new(SystemClock),
    );
    Holder {
        issuer,
        wits: TokenCache::new(fetcher, CONFIG),
        _mesh: mesh,
    }
}

/// The thumbprint of the `cnf.jwk` the WIT itself carries.
fn bound_key(wit: &FetchedWit) -> tally::jose::Jkt {
    let jws = tally::jose::Jws::parse(wit.wit.expose(), &tally::jose::Limits::default()).unwrap();
    tally::jose::PublicKey::from_jwk(&jws.payload()["cnf"]["jwk"])
        .unwrap()
        .thumbprint()
}

async fn issued(served: &ServedBroker) -> String {
    served
        .broker
        .render_metrics()
        .await
        .lines()
        .find(|l| l.starts_with(r#"tally_broker_wit_issuance_total{result="issued"}"#))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_callers_cause_one_broker_call_and_get_the_same_wit() {
    let (_dir, served) = start().await;
    let h = holder(&served, 600);
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let wits = Arc::clone(&h.wits);
            tokio::spawn(async move { wits.get(&WitAsk).await.unwrap() })
        })
        .collect();
    let mut jtis = Vec::new();
    for call in calls {
        jtis.push(call.await.unwrap().jti);
    }
    jtis.dedup();
    assert_eq!(jtis.len(), 1, "{jtis:?}");
    assert!(
        issued(&served).await.ends_with(" 1"),
        "{}",
        issued(&served).await
    );
    let got = h.wits.get(&WitAsk).await.unwrap();
    assert_eq!(got.jti, jtis[0]);
    assert_eq!(got.jkt, h.issuer.current().1.thumbprint());
    assert_eq!(
        bound_key(&got),
        got.jkt,
        "the key it carries is the one bound"
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wit_is_refreshed_ahead_of_expiry_while_callers_keep_getting_the_cached_one() {
    let (_dir, served) = start().await;
    // The certificate lives 12 s, so does the WIT: refreshed at about 6 s.
    let h = holder(&served, 12);
    let first = h.wits.get(&WitAsk).await.unwrap();
    assert!(first.exp - first.iat <= 12, "{first:?}");
    tokio::time::sleep(Duration::from_secs(7)).await;
    let hits = h
        .wits
        .stats()
        .hits
        .load(std::sync::atomic::Ordering::Relaxed);
    let again = h.wits.get(&WitAsk).await.unwrap();
    assert_eq!(again.jti, first.jti, "past the refresh point, still served");
    assert_eq!(
        h.wits
            .stats()
            .hits
            .load(std::sync::atomic::Ordering::Relaxed),
        hits + 1
    );
    let fresh = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            let got = h.wits.get(&WitAsk).await.unwrap();
            if got.jti != first.jti {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a background refresh within 3 s");
    assert!(fresh.iat > first.iat);
    assert!(
        h.wits
            .stats()
            .refreshes
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_key_brings_a_wit_for_it_on_the_next_get() {
    let (_dir, served) = start().await;
    let h = holder(&served, 600);
    let old = h.wits.get(&WitAsk).await.unwrap();
    // What an SVID renewal does: a new channel and key for the issuer.
    let (channel, key) = identity(&served, 600);
    h.issuer.set_identity(channel, Arc::clone(&key));
    let new = h.wits.get(&WitAsk).await.unwrap();
    assert_ne!(new.jti, old.jti);
    assert_eq!(new.jkt, key.thumbprint());
    assert_eq!(bound_key(&new), key.thumbprint(), "cnf names the new key");
    assert_ne!(new.jkt, old.jkt);
    // The old WIT kept the key it was bound to.
    assert_eq!(old.key.thumbprint(), bound_key(&old));
    assert_eq!(
        h.wits.get(&WitAsk).await.unwrap().jti,
        new.jti,
        "then cached"
    );
    served.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_broker_outage_the_wit_serves_until_it_runs_out_then_a_clear_error() {
    let (_dir, served) = start().await;
    let h = holder(&served, 8);
    let first = h.wits.get(&WitAsk).await.unwrap();
    let (channel, key) = identity(&served, 600);
    served.stop().await;
    // Renewed while the broker is down: the WIT for the old key, still
    // valid, is better than none.
    h.issuer.set_identity(channel, key);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = h.wits.get(&WitAsk).await.unwrap();
    assert_eq!(
        (during.jti.as_str(), during.jkt),
        (first.jti.as_str(), first.jkt)
    );
    assert!(h.wits.unreachable_since().is_some());
    while SystemClock.now() < first.exp {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    match h.wits.get(&WitAsk).await {
        Err(e @ CacheError::Unreachable { .. }) => {
            assert!(e.to_string().contains("unreachable"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

fn wit_policy_settings(svid_ttl: Option<u64>) -> tally::broker::BrokerSettings {
    let mut s = settings(&policy());
    if let Some(ttl) = svid_ttl {
        s.svid_ttl = ttl;
    }
    s
}

fn thumbprint_of(svid: &tally::sidecar::identity::Svid) -> tally::jose::Jkt {
    tally::jose::SigningKey::from_pkcs8_pem(svid.key_pem.as_bytes())
        .unwrap()
        .thumbprint()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_sidecar_renews_its_svid_its_wit_binds_the_new_key() {
    let mesh = Mesh::start_with_settings(wit_policy_settings(Some(8))).await;
    let started = mesh.sidecar(CHECKOUT, Parts::default()).await;
    let wits = Arc::clone(started.sidecar.wits());
    let mut svids = started.sidecar.parts().svid.clone();
    let first_key = thumbprint_of(&svids.borrow_and_update());
    let first = wits.get(&WitAsk).await.unwrap();
    assert_eq!((first.jkt, bound_key(&first)), (first_key, first_key));
    assert!(
        first.exp <= svids.borrow().expires_at,
        "never past the SVID"
    );

    tokio::time::timeout(Duration::from_secs(15), svids.changed())
        .await
        .expect("renewed at about half of 8 s")
        .unwrap();
    let renewed_key = thumbprint_of(&svids.borrow());
    assert_ne!(renewed_key, first_key);
    let renewed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let got = wits.get(&WitAsk).await.unwrap();
            if got.jkt != first.jkt {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a WIT for the new key once the issuer uses it");
    assert_eq!(renewed.jkt, renewed_key);
    assert_eq!(bound_key(&renewed), renewed_key, "cnf changed with the key");
    assert_eq!(
        renewed.key.thumbprint(),
        renewed_key,
        "proofs use the new key"
    );
    started.sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_by_jti_holder_or_key_drops_the_cached_wit_and_a_new_one_is_fetched() {
    let mesh = Mesh::start_with_settings(wit_policy_settings(None)).await;
    let started = mesh.sidecar(CHECKOUT, Parts::default()).await;
    let wits = Arc::clone(started.sidecar.wits());
    let own = started.sidecar.spiffe_id().clone();
    let mesh_state = started.sidecar.parts().mesh.clone();
    let admin: tally::identity::SpiffeId = "spiffe://example.org/admin/ops".parse().unwrap();
    for kind in ["jti", "subject", "jkt"] {
        let held = wits.get(&WitAsk).await.unwrap();
        assert_eq!(wits.len(), 1);
        let target = match kind {
            "jti" => RevocationTarget::Jti(held.jti.clone()),
            "subject" => RevocationTarget::Subject(own.clone()),
            _ => RevocationTarget::Jkt(held.jkt),
        };
        let broker = &mesh.broker.broker;
        broker.revoke(target, None, "leaked", &admin).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), async {
            while !wits.is_empty() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{kind}: the cached WIT was not dropped"));
        assert!(
            held.revoked_by(&mesh_state.borrow().revocations, &own),
            "{kind}"
        );
        // Within the revocation's second the broker's WIT is covered too
        // (never kept); a moment later a clean one comes.
        let fresh = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match wits.get(&WitAsk).await {
                    Ok(got) => return got,
                    Err(CacheError::Unreachable { .. }) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => panic!("{kind}: {e}"),
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{kind}: no new WIT"));
        assert_ne!(fresh.jti, held.jti, "{kind}");
        assert!(
            !fresh.revoked_by(&mesh_state.borrow().revocations, &own),
            "{kind}"
        );
        let lookup = broker
            .lookup_token(fresh.wit.expose())
            .await
            .unwrap()
            .unwrap();
        assert!(!lookup.revoked, "{kind}: the broker agrees");
    }
    started.sidecar.stop().await.unwrap();
}
