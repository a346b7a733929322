//! The sidecar's SPIFFE Workload API, used by a stock SPIFFE client (the
//! Rust `spiffe` crate's `WorkloadApiClient`, as a SPIFFE workload would)
//! over a real Unix socket, against real sidecars attested by a real
//! broker over mTLS.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, REPORTING};
use tally::proto::spiffe_workload as pb;
use tonic::Code;

fn client_endpoint(path: &std::path::Path) -> String {
    format!("unix://{}", path.display())
}

async fn client(path: &std::path::Path) -> spiffe::WorkloadApiClient {
    spiffe::WorkloadApiClient::connect_to(client_endpoint(path))
        .await
        .unwrap()
}

/// A raw Workload API client over `path` that adds no metadata of its own.
async fn raw_client(
    path: &std::path::Path,
) -> pb::spiffe_workload_api_client::SpiffeWorkloadApiClient<tonic::transport::Channel> {
    let channel = support::grpc::unix_channel(path).await;
    pb::spiffe_workload_api_client::SpiffeWorkloadApiClient::new(channel)
}

/// The public key (SubjectPublicKeyInfo DER) of the first certificate in
/// `pem`.
fn leaf_spki_pem(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    let leaf = rustls_pki_types::CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .unwrap()
        .unwrap();
    spki(leaf.as_ref())
}

fn spki(der: &[u8]) -> Vec<u8> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.public_key().raw.to_vec()
}

async fn sidecar_with_api(mesh: &Mesh, id: &str) -> support::mesh::Started {
    mesh.sidecar(
        id,
        Parts {
            spiffe: true,
            ..Parts::default()
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spiffe_client_gets_an_x509_context_for_a_key_that_is_not_the_sidecars() {
    let mesh = Mesh::start().await;
    let started = sidecar_with_api(&mesh, CHECKOUT).await;
    let api = client(started.spiffe.as_ref().unwrap()).await;

    let context = api.fetch_x509_context().await.unwrap();
    let svid = context.default_svid().unwrap();
    assert_eq!(svid.spiffe_id().to_string(), CHECKOUT);
    // The key handed out is the workload's own, never the sidecar's (that
    // one signs DPoP proofs and is the mesh TLS identity).
    let own = Arc::clone(&started.sidecar.parts().svid.borrow());
    assert_ne!(spki(svid.leaf().as_ref()), leaf_spki_pem(&own.chain_pem));
    // The key matches the certificate (the crate checks it) and the chain
    // verifies with the bundle it came with, as a TLS client cert.
    let bundle = context
        .bundle_set()
        .get(&"example.org".parse().unwrap())
        .expect("the trust domain's bundle");
    let roots: Vec<_> = bundle
        .authorities()
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.as_ref().to_vec()))
        .collect();
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
        store.add(root).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(rustls::crypto::aws_lc_rs::default_provider()),
    )
    .build()
    .unwrap();
    let chain: Vec<_> = svid
        .cert_chain()
        .iter()
        .map(|c| rustls_pki_types::CertificateDer::from(c.as_ref().to_vec()))
        .collect();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], rustls_pki_types::UnixTime::now())
        .expect("the workload SVID chains to the bundle");

    // The bundles stream alone, keyed by the trust domain.
    let bundles = api.fetch_x509_bundles().await.unwrap();
    assert!(bundles.get(&"example.org".parse().unwrap()).is_some());
    started.sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_streams_a_new_svid_and_stopping_the_sidecar_ends_the_stream() {
    let mut settings = support::broker::settings(support::mesh::POLICY);
    settings.svid_ttl = 6;
    let mesh = Mesh::start_with_settings(settings).await;
    let started = sidecar_with_api(&mesh, CHECKOUT).await;
    let api = client(started.spiffe.as_ref().unwrap()).await;
    let mut stream = api.stream_x509_contexts().await.unwrap();
    use tokio_stream::StreamExt as _;
    let first = tokio::time::timeout(Duration::from_secs(10), stream.next())
        .await
        .expect("no X.509-SVID within 10 s")
        .unwrap()
        .unwrap();
    let first = first.default_svid().unwrap().leaf().as_ref().to_vec();
    // The sidecar renews at about half of 6 s; the workload SVID follows.
    let next = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let context = stream.next().await.unwrap().unwrap();
            let leaf = context.default_svid().unwrap().leaf().as_ref().to_vec();
            if leaf != first {
                return leaf;
            }
        }
    })
    .await
    .expect("no new X.509-SVID within 15 s of a 6 s SVID");
    assert_ne!(spki(&next), spki(&first), "a renewal brings a new key");
    let (_, cert) = x509_parser::parse_x509_certificate(&next).unwrap();
    assert!(
        cert.validity().not_after.timestamp()
            > tally::clock::Clock::now(&tally::clock::SystemClock)
                .try_into()
                .unwrap()
    );

    // Stopping the sidecar ends the open stream rather than hanging it.
    tokio::time::timeout(Duration::from_secs(15), started.sidecar.stop())
        .await
        .expect("the sidecar stopped with a Workload API stream open")
        .unwrap();
    let end = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream ended");
    assert!(end.is_none_or(|r| r.is_err()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_svids_are_fetched_cached_validated_by_a_peer_and_verified_with_the_bundle() {
    let mesh = Mesh::start().await;
    let checkout = sidecar_with_api(&mesh, CHECKOUT).await;
    let payments = sidecar_with_api(&mesh, PAYMENTS).await;
    let api = client(checkout.spiffe.as_ref().unwrap()).await;

    let svid = api.fetch_jwt_svid([PAYMENTS], None).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), CHECKOUT);
    assert_eq!(svid.audience(), &[PAYMENTS.to_owned()]);
    // Cached: the same JWT-SVID again, not a new issuance.
    let again = api.fetch_jwt_token([PAYMENTS], None).await.unwrap();
    assert_eq!(again, svid.token());

    // The receiving workload validates it through its own sidecar…
    let peer = client(payments.spiffe.as_ref().unwrap()).await;
    let validated = peer
        .validate_jwt_token(PAYMENTS, svid.token())
        .await
        .unwrap();
    assert_eq!(validated.spiffe_id().to_string(), CHECKOUT);
    // …or locally with the JWT bundle.
    let bundles = peer.fetch_jwt_bundles().await.unwrap();
    let local = spiffe::JwtSvid::parse_and_validate(svid.token(), &bundles, &[PAYMENTS]).unwrap();
    assert_eq!(local.spiffe_id().to_string(), CHECKOUT);

    // Another audience than the validator's is refused.
    let err = peer
        .validate_jwt_token(REPORTING, svid.token())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("audience") || format!("{err:?}").contains("InvalidArgument"),
        "{err:?}"
    );
    // An audience no issue rule grants checkout: refused by the broker.
    let mut raw = raw_client(checkout.spiffe.as_ref().unwrap()).await;
    let mut request = tonic::Request::new(pb::JwtsvidRequest {
        audience: vec![REPORTING.into()],
        spiffe_id: String::new(),
    });
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let status = raw.fetch_jwtsvid(request).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(REPORTING), "{}", status.message());
    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neither_a_jwt_svid_nor_an_access_token_passes_for_the_other() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                spiffe: true,
                socket: true,
                services: vec![("payments.local:*".into(), PAYMENTS.into())],
                ..Parts::default()
            },
        )
        .await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                spiffe: true,
                inbound_to: Some(app.addr),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let api = client(checkout.spiffe.as_ref().unwrap()).await;
    let jwt = api.fetch_jwt_token([PAYMENTS], None).await.unwrap();

    // A JWT-SVID at the inbound proxy, as Bearer and as DPoP (with a
    // well-formed proof from some key): refused, the app sees nothing.
    let url = format!("http://{inbound}/v1/charges");
    let key = tally::dpop::ProofKey::generate().unwrap();
    let now = tally::clock::Clock::now(&tally::clock::SystemClock);
    let proof = key.mint("POST", &url, Some(&jwt), None, now).unwrap();
    for (authorization, dpop) in [
        (format!("Bearer {jwt}"), None),
        (format!("DPoP {jwt}"), Some(proof.clone())),
    ] {
        let mut headers = vec![("authorization", authorization.as_str())];
        if let Some(p) = &dpop {
            headers.push(("dpop", p.as_str()));
        }
        let answer = support::mesh::send(inbound, "POST", "/v1/charges", &headers, &b""[..]).await;
        assert_eq!(answer.status, 401, "{answer:?}");
    }
    assert_eq!(app.seen.load(std::sync::atomic::Ordering::SeqCst), 0);

    // A tally access token handed to ValidateJWTSVID: not a JWT-SVID.
    let (status, body) = support::mesh::local(
        checkout.socket.as_ref().unwrap(),
        "GET",
        "/v1/token?audience=spiffe://example.org/ns/pay/sa/payments&scope=payments:charge",
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let access = body["access_token"].as_str().unwrap().to_owned();
    let peer = client(payments.spiffe.as_ref().unwrap()).await;
    let err = peer
        .validate_jwt_token(PAYMENTS, &access)
        .await
        .unwrap_err();
    assert!(
        format!("{err:?}").contains("InvalidArgument") || err.to_string().contains("typ"),
        "{err:?}"
    );
    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_without_the_header_or_from_another_uid_are_refused_with_the_standard_codes() {
    let mesh = Mesh::start().await;
    let open = sidecar_with_api(&mesh, CHECKOUT).await;
    let path = open.spiffe.clone().unwrap();

    // No `workload.spiffe.io: true`: InvalidArgument, on streams and
    // unary calls alike; a wrong value too.
    let mut raw = raw_client(&path).await;
    let status = raw
        .fetch_x509svid(pb::X509svidRequest {})
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let mut request = tonic::Request::new(pb::JwtsvidRequest {
        audience: vec![PAYMENTS.into()],
        spiffe_id: String::new(),
    });
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "yes".parse().unwrap());
    let status = raw.fetch_jwtsvid(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");

    // Another workload's SPIFFE ID: this one has no such identity.
    let mut request = tonic::Request::new(pb::JwtsvidRequest {
        audience: vec![PAYMENTS.into()],
        spiffe_id: REPORTING.into(),
    });
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let status = raw.fetch_jwtsvid(request).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    // No audience: InvalidArgument.
    let mut request = tonic::Request::new(pb::JwtsvidRequest::default());
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let status = raw.fetch_jwtsvid(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    open.sidecar.stop().await.unwrap();

    // A uid not on the allow-list: PermissionDenied, nothing handed out.
    let me = std::fs::metadata("/proc/self").map(|m| {
        use std::os::unix::fs::MetadataExt as _;
        m.uid()
    });
    let other = me.unwrap().wrapping_add(1);
    let closed = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                spiffe: true,
                allowed_uids: Some(vec![other]),
                ..Parts::default()
            },
        )
        .await;
    let api = client(closed.spiffe.as_ref().unwrap()).await;
    let err = api.fetch_x509_svid().await.unwrap_err();
    assert!(
        matches!(
            err,
            spiffe::workload_api::WorkloadApiError::PermissionDenied(_)
                | spiffe::workload_api::WorkloadApiError::NoIdentityIssued
        ),
        "{err:?}"
    );
    let err = api.fetch_jwt_svid([CHECKOUT], None).await.unwrap_err();
    assert!(
        format!("{err:?}").contains("PermissionDenied")
            || matches!(
                err,
                spiffe::workload_api::WorkloadApiError::PermissionDenied(_)
            ),
        "{err:?}"
    );
    closed.sidecar.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_the_workload_has_an_identity_calls_are_unavailable_and_streams_wait_for_it() {
    use tally::clock::SystemClock;
    use tally::sidecar::cache::{CacheConfig, TokenCache};
    use tally::sidecar::identity::IdentityClient;
    use tally::sidecar::jwt_svids::JwtSvids;
    use tally::sidecar::workload_api::{WorkloadApi, WorkloadParts};
    use tokio_stream::StreamExt as _;

    let mesh = Mesh::start().await;
    let own = mesh.svid(CHECKOUT).await;
    let identity = IdentityClient::new(mesh.broker.url(), mesh.broker.broker.bundle_pem());
    let clock: Arc<dyn tally::clock::Clock> = Arc::new(SystemClock);
    let issuer = Arc::new(tally::sidecar::issuer::BrokerIssuer::new(
        identity.channel(&own).unwrap(),
        Arc::new(tally::dpop::ProofKey::generate().unwrap()),
        own.issue_htu(),
        Arc::clone(&clock),
    ));
    let (svid_tx, svid) = tokio::sync::watch::channel(None);
    let (_mesh_tx, mesh_rx) = tokio::sync::watch::channel(Default::default());
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let api = WorkloadApi::new(WorkloadParts {
        own_id: CHECKOUT.parse().unwrap(),
        svid,
        mesh: mesh_rx,
        jwt: TokenCache::new(
            JwtSvids::new(issuer, Arc::clone(&clock)),
            CacheConfig::default(),
        ),
        allowed_uids: None,
        clock: Arc::clone(&clock),
        stop,
    });
    let path = mesh.dir.path().join("early.sock");
    let listener = tally::sidecar::api::bind(&path).unwrap();
    let mut stopped = stop_tx.subscribe();
    let server = tokio::spawn(tally::sidecar::workload_api::serve(
        api,
        listener,
        tally::http::Listen::new("spiffe"),
        async move {
            let _ = stopped.wait_for(|s| *s).await;
        },
    ));

    // Unary calls: Unavailable (a SPIFFE client retries those).
    let mut raw = raw_client(&path).await;
    let mut request = tonic::Request::new(pb::JwtsvidRequest {
        audience: vec![PAYMENTS.into()],
        spiffe_id: String::new(),
    });
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let status = raw.fetch_jwtsvid(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    let mut request = tonic::Request::new(pb::ValidateJwtsvidRequest {
        audience: PAYMENTS.into(),
        svid: "e30.e30.sig".into(),
    });
    request
        .metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    let status = raw.validate_jwtsvid(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    // A stream opened now starts once the SVID exists.
    let api = client(&path).await;
    let mut stream = api.stream_x509_svids().await.unwrap();
    let early = tokio::time::timeout(Duration::from_millis(300), stream.next()).await;
    assert!(
        early.is_err(),
        "a message before there was an SVID: {early:?}"
    );
    let workload = identity.workload_svid(&own, clock.now()).await.unwrap();
    svid_tx.send(Some(Arc::new(workload))).unwrap();
    let first = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .expect("the stream started once the SVID existed")
        .unwrap()
        .unwrap();
    assert_eq!(first.spiffe_id().to_string(), CHECKOUT);

    stop_tx.send(true).unwrap();
    server.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signing_key_rotation_streams_a_new_jwt_bundle() {
    use tokio_stream::StreamExt as _;
    let mesh = Mesh::start().await;
    let started = sidecar_with_api(&mesh, PAYMENTS).await;
    let api = client(started.spiffe.as_ref().unwrap()).await;
    let mut bundles = api.stream_jwt_bundles().await.unwrap();
    let td: spiffe::TrustDomain = "example.org".parse().unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), bundles.next())
        .await
        .expect("a JWT bundle")
        .unwrap()
        .unwrap();
    let (new_kid, _) = mesh
        .broker
        .broker
        .rotate_signing_key(0, None)
        .await
        .unwrap();
    assert!(
        first
            .get(&td)
            .unwrap()
            .find_jwt_authority(&new_kid)
            .is_none()
    );
    // The Watch stream brings the new key; the bundle stream follows.
    let next = tokio::time::timeout(Duration::from_secs(10), bundles.next())
        .await
        .expect("a new JWT bundle after the rotation")
        .unwrap()
        .unwrap();
    assert!(
        next.get(&td)
            .unwrap()
            .find_jwt_authority(&new_kid)
            .is_some(),
        "the rotated-in key is a JWT authority"
    );
    started.sidecar.stop().await.unwrap();
}
