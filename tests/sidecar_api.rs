//! The sidecar's local API over a real Unix socket, assembled from the
//! real parts: a broker over mTLS, attestation with a join token, the
//! token cache filled by Tokens.Issue. The headers `/v1/authorize` hands
//! out pass the token core's whole-request check, as a payments service's
//! sidecar would run it.

mod support;

use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt as _;
use std::sync::Arc;
use support::broker::{serve_broker, settings};
use tally::auth::{Request, RequestVerifier, VerifierConfig};
use tally::clock::{Clock, SystemClock};
use tally::dpop::ProofKey;
use tally::sidecar::api::{LocalApi, ServiceMap};
use tally::sidecar::cache::{CacheConfig, TokenCache};
use tally::sidecar::identity::{Attestation, IdentityClient};
use tally::sidecar::issuer::BrokerIssuer;
use tally::store::Sealer;
use tally::token::TokenConfig;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";
const POLICY: &str = include_str!("fixtures/policy.yaml");

/// One HTTP/1.1 request over the socket; (status, JSON body).
async fn call(
    socket: &std::path::Path,
    method: &str,
    target: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let mut stream = tokio::net::UnixStream::connect(socket).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {target} HTTP/1.1\r\nHost: tally\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    (
        status,
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_get_tokens_and_request_headers_that_the_receiving_side_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let key_text = Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key_text, settings(POLICY), "127.0.0.1:0").await;
    let broker = Arc::clone(&served.broker);

    // The sidecar: attest, then the cache over Tokens.Issue, then the API.
    let identity = IdentityClient::new(served.url(), broker.bundle_pem());
    let join = broker
        .create_join_token(&CHECKOUT.parse().unwrap(), 600, None)
        .await
        .unwrap();
    let svid = identity
        .attest(
            &Attestation::JoinToken(join.expose().to_owned().into()),
            SystemClock.now(),
        )
        .await
        .unwrap();
    let key = Arc::new(ProofKey::generate().unwrap());
    let issuer = BrokerIssuer::new(
        identity.channel(&svid).unwrap(),
        Arc::clone(&key),
        broker.issue_uri().to_owned(),
        Arc::new(SystemClock),
    );
    let cache = TokenCache::new(issuer, CacheConfig::default());
    let (_svids, svid_rx) = tokio::sync::watch::channel(Arc::new(svid));
    let services =
        ServiceMap::new([("payments.shop.svc:*".to_owned(), PAYMENTS.parse().unwrap())]).unwrap();
    let socket = dir.path().join("agent.sock");
    let api = LocalApi::new(
        cache,
        svid_rx.clone(),
        None,
        services.clone(),
        None,
        Arc::new(SystemClock),
        None,
    );
    let (api_stop, api_stopped) = tokio::sync::oneshot::channel::<()>();
    let unix = tally::sidecar::api::bind(&socket).unwrap();
    let api_server = tokio::spawn(async move {
        tally::sidecar::api::serve(api, unix, tally::http::Listen::new("socket"), async {
            let _ = api_stopped.await;
        })
        .await
        .unwrap();
    });
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o660
    );

    let (status, identity_body) = call(&socket, "GET", "/v1/identity", None).await;
    assert_eq!(status, 200);
    assert_eq!(identity_body["spiffe_id"], CHECKOUT);
    assert_eq!(identity_body["trust_domain"], "example.org");

    let target = "/v1/token?audience=spiffe%3A%2F%2Fexample.org%2Fns%2Fpay%2Fsa%2Fpayments&scope=payments%3Acharge";
    let (status, token) = call(&socket, "GET", target, None).await;
    assert_eq!(status, 200, "{token}");
    assert_eq!(token["token_type"], "DPoP");
    assert_eq!(token["scope"], "payments:charge");

    // Headers for a request; the audience comes from the service map.
    let url = "https://payments.shop.svc/v1/charges?idempotency=1";
    let ask = json!({"method": "POST", "url": url, "scope": "payments:charge"});
    let (status, headers) = call(&socket, "POST", "/v1/authorize", Some(ask.clone())).await;
    assert_eq!(status, 200, "{headers}");
    let authorization = headers["authorization"].as_str().unwrap();
    assert_eq!(
        authorization,
        format!("DPoP {}", token["access_token"].as_str().unwrap())
    );
    // What the payments side would run: every token-core check passes.
    let verifier = RequestVerifier::new(VerifierConfig::new(TokenConfig::new(
        broker.issuer(),
        PAYMENTS.parse().unwrap(),
    )))
    .unwrap();
    let check = |auth: &str, proof: &str, method: &str, uri: &str| {
        verifier.verify(
            &Request {
                method,
                uri,
                authorization: &[auth.as_bytes()],
                dpop: &[proof.as_bytes()],
            },
            &broker.jwks(),
            SystemClock.now(),
        )
    };
    let ok = check(
        authorization,
        headers["dpop"].as_str().unwrap(),
        "POST",
        url,
    )
    .unwrap();
    assert_eq!(ok.token.sub.as_str(), CHECKOUT);
    assert_eq!(ok.proof.jkt, key.thumbprint());
    // A fresh proof on every call; each one only for its own request.
    let (_, again) = call(&socket, "POST", "/v1/authorize", Some(ask)).await;
    assert_ne!(again["dpop"], headers["dpop"]);
    assert!(matches!(
        check(authorization, again["dpop"].as_str().unwrap(), "GET", url),
        Err(tally::auth::AuthError::Proof(
            tally::dpop::ProofError::HtmMismatch { .. }
        ))
    ));

    // Mistakes and refusals, each with its status.
    let (status, e) = call(
        &socket,
        "POST",
        "/v1/authorize",
        Some(json!({"method": "GET", "url": "https://unknown.svc/x"})),
    )
    .await;
    assert_eq!(
        (status, e["error"].as_str()),
        (400, Some("invalid_request")),
        "{e}"
    );
    let (status, e) = call(
        &socket,
        "POST",
        "/v1/authorize",
        Some(json!({"method": "GET", "url": url, "scope": "payments:refund"})),
    )
    .await;
    assert_eq!(status, 403, "{e}");
    let said = e["error_description"].as_str().unwrap();
    assert!(said.contains("payments:refund"), "{e}");
    // A sentence for a person, not a Rust enum name or tonic's words.
    assert!(said.starts_with("permission denied: "), "{e}");
    assert!(!said.contains("PermissionDenied"), "{e}");
    let (status, _) = call(
        &socket,
        "POST",
        "/v1/authorize",
        Some(json!({"method": "GET", "url": url, "extra": 1})),
    )
    .await;
    assert_eq!(status, 400);
    let (status, _) = call(&socket, "GET", "/v1/token?audience=a&audience=b", None).await;
    assert_eq!(status, 400);
    let (status, _) = call(&socket, "GET", "/nope", None).await;
    assert_eq!(status, 404);

    // The broker goes away: the cached token keeps serving; an uncached
    // audience gets a clear 503.
    served.stop().await;
    let (status, _) = call(&socket, "GET", target, None).await;
    assert_eq!(status, 200);
    let (status, e) = call(
        &socket,
        "GET",
        "/v1/token?audience=spiffe%3A%2F%2Fexample.org%2Fother",
        None,
    )
    .await;
    assert_eq!(status, 503, "{e}");
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("unreachable"),
        "{e}"
    );
    let _ = api_stop.send(());
    api_server.await.unwrap();

    // A socket limited to another uid refuses this process.
    let cache = TokenCache::new(
        BrokerIssuer::new(
            identity.channel(&svid_rx.borrow()).unwrap(),
            Arc::clone(&key),
            broker.issue_uri().to_owned(),
            Arc::new(SystemClock),
        ),
        CacheConfig::default(),
    );
    let me = std::fs::metadata(dir.path()).unwrap();
    let other_uid = std::os::unix::fs::MetadataExt::uid(&me) + 4242;
    let strict = LocalApi::new(
        cache,
        svid_rx,
        None,
        services,
        Some(vec![other_uid]),
        Arc::new(SystemClock),
        None,
    );
    let socket2 = dir.path().join("strict.sock");
    let (stop2, stopped2) = tokio::sync::oneshot::channel::<()>();
    let unix2 = tally::sidecar::api::bind(&socket2).unwrap();
    let strict_server = tokio::spawn(async move {
        tally::sidecar::api::serve(strict, unix2, tally::http::Listen::new("socket"), async {
            let _ = stopped2.await;
        })
        .await
        .unwrap();
    });
    let (status, e) = call(&socket2, "GET", "/v1/identity", None).await;
    assert_eq!(status, 403, "{e}");
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("serves only uids"),
        "{e}"
    );
    let _ = stop2.send(());
    strict_server.await.unwrap();
}
