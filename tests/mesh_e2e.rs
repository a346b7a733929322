//! Sidecar to sidecar: an app's plain HTTP through checkout's outbound
//! proxy, over mutual TLS, into payments' inbound proxy and its app. A
//! TCP forwarder on the path records every byte, so the test sees what a
//! pod-network observer would (no tcpdump needed), and both sidecars
//! renew their SVIDs under traffic.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, send};
use tally::sidecar::api::ServiceMap;

/// A TCP forwarder to `to` that keeps every byte it carried, both ways.
struct Tap {
    addr: std::net::SocketAddr,
    carried: Arc<Mutex<Vec<u8>>>,
}

impl Tap {
    async fn start(to: std::net::SocketAddr) -> Self {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let carried = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&carried);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = tokio::net::TcpStream::connect(to).await else {
                    continue;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let (up, down) = (Arc::clone(&record), Arc::clone(&record));
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        up.lock().unwrap().extend_from_slice(&buf[..n]);
                        if sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        down.lock().unwrap().extend_from_slice(&buf[..n]);
                        if cw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = cw.shutdown().await;
                });
            }
        });
        Self { addr, carried }
    }

    fn saw(&self, needle: &[u8]) -> bool {
        self.carried
            .lock()
            .unwrap()
            .windows(needle.len())
            .any(|w| w == needle)
    }

    fn bytes(&self) -> usize {
        self.carried.lock().unwrap().len()
    }
}

/// Payments behind its sidecar, a tap in front of its inbound port, and
/// checkout whose service map sends the tap's address to payments with
/// the given `mtls` choice (`None`: the default, mutual TLS).
async fn scene(
    mesh: &Mesh,
    app: &App,
    mtls: Option<bool>,
) -> (support::mesh::Started, support::mesh::Started, Tap) {
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                ..Parts::default()
            },
        )
        .await;
    let tap = Tap::start(payments.inbound.unwrap()).await;
    let map = ServiceMap::with_transport([(tap.addr.to_string(), PAYMENTS.parse().unwrap(), mtls)])
        .unwrap();
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                socket: true,
                outbound: true,
                service_map: Some(map),
                ..Parts::default()
            },
        )
        .await;
    (payments, checkout, tap)
}

/// The app's request through its outbound proxy: plain HTTP, no token.
async fn charge(checkout: &support::mesh::Started, tap: &Tap, body: &str) -> support::mesh::Answer {
    let url = format!("http://{}/v1/charges", tap.addr);
    send(
        checkout.outbound.unwrap(),
        "POST",
        &url,
        &[("x-tally-scope", "payments:charge")],
        body.to_owned(),
    )
    .await
}

#[tokio::test]
async fn between_sidecars_nothing_crosses_in_clear_and_the_app_learns_the_hop_was_mtls() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let (_payments, checkout, tap) = scene(&mesh, &app, None).await;
    let marker = "card-4242-4242-4242-4242";
    for _ in 0..3 {
        let answer = charge(&checkout, &tap, marker).await;
        assert_eq!(answer.status, 200, "{:?}", answer.body);
        let seen = answer.json();
        assert_eq!(seen["caller"], CHECKOUT);
        assert_eq!(seen["transport"], "mtls");
        assert_eq!(seen["body_len"], marker.len());
    }
    // The token the outbound proxy sent is the one checkout's cache holds.
    let token = support::mtls::token_from(&checkout, PAYMENTS, "payments:charge").await;
    assert!(tap.bytes() > 0, "the tap carried the traffic");
    assert!(!tap.saw(token.as_bytes()), "the token crossed in clear");
    let payload = token.split('.').nth(1).unwrap();
    assert!(
        !tap.saw(payload.as_bytes()),
        "the token's claims crossed in clear"
    );
    assert!(!tap.saw(marker.as_bytes()), "the body crossed in clear");
    assert!(!tap.saw(b"payments:charge"), "a scope crossed in clear");
    mesh.broker.stop().await;
}

#[tokio::test]
async fn the_same_tap_sees_the_token_when_the_entry_says_mtls_false() {
    // Positive control for the test above: the tap does see what crosses.
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let (_payments, checkout, tap) = scene(&mesh, &app, Some(false)).await;
    let answer = charge(&checkout, &tap, "card-1").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["transport"], "plaintext");
    let token = support::mtls::token_from(&checkout, PAYMENTS, "payments:charge").await;
    assert!(tap.saw(token.as_bytes()));
    assert!(tap.saw(b"card-1"));
    mesh.broker.stop().await;
}

#[tokio::test]
async fn traffic_flows_while_both_sidecars_renew_their_svids() {
    let mut settings = support::broker::settings(support::mesh::POLICY);
    settings.svid_ttl = 6;
    let mesh = Mesh::start_with_settings(settings).await;
    let app = App::start().await;
    let (payments, checkout, tap) = scene(&mesh, &app, None).await;
    let (first_payments, first_checkout) = (
        support::mtls::svid_of(&payments),
        support::mtls::svid_of(&checkout),
    );
    // Requests back to back until each side has renewed at least once
    // (due at 2.4–3.6 s of a 6 s life), bounded.
    let started = Instant::now();
    let mut answered = 0;
    loop {
        let answer = charge(&checkout, &tap, "{}").await;
        assert_eq!(
            answer.status,
            200,
            "request {answered} after {:?}: {:?}",
            started.elapsed(),
            answer.body
        );
        assert_eq!(answer.json()["transport"], "mtls");
        answered += 1;
        let renewed = |s: &support::mesh::Started, first: &Arc<_>| {
            !Arc::ptr_eq(&support::mtls::svid_of(s), first)
        };
        if renewed(&payments, &first_payments) && renewed(&checkout, &first_checkout) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "no renewal on both sides within 15 s"
        );
    }
    // A few more after both renewals: new connection, new keys.
    for _ in 0..5 {
        assert_eq!(charge(&checkout, &tap, "{}").await.status, 200);
    }
    assert!(answered > 10, "{answered}");
    mesh.broker.stop().await;
}
