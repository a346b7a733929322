//! WebSocket tunnels through the inbound proxy live as long as the token
//! that opened them: one is closed when its token expires, while another,
//! opened with more of the same token's life left, stays up. (Closing on
//! revocation is in tests/sidecar_proxy.rs.) Every part reads one manual
//! clock, so "expires" is a clock setting, not a wait of minutes.

mod support;

use std::sync::Arc;
use std::time::Duration;
use support::mesh::{App, Mesh, PAYMENTS, POLICY, Parts, REPORTING, authorize};
use tally::clock::{Clock as _, ManualClock, SystemClock};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Opens a tunnel to `/v1/ws/prices` with these headers and reads past
/// the app's first line (the caller it was told).
async fn open_tunnel(inbound: std::net::SocketAddr, authorization: &str, dpop: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(inbound).await.unwrap();
    let request = format!(
        "GET /v1/ws/prices HTTP/1.1\r\nHost: {inbound}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nAuthorization: {authorization}\r\nDPoP: {dpop}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    // The head, then the caller line the app writes first.
    let complete = |got: &[u8]| {
        got.windows(4)
            .position(|w| w == b"\r\n\r\n")
            .is_some_and(|end| got[end + 4..].contains(&b'\n'))
    };
    while !complete(&got) {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("no answer to the upgrade")
            .unwrap();
        assert!(n > 0, "closed: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(text.ends_with(&format!("{REPORTING}\n")), "{text}");
    tcp
}

/// Whether `tcp` still echoes.
async fn echoes(tcp: &mut TcpStream) -> bool {
    if tcp.write_all(b"ping").await.is_err() {
        return false;
    }
    let mut echoed = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), tcp.read_exact(&mut echoed)).await,
        Ok(Ok(_)) if &echoed == b"ping"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_is_closed_when_the_token_that_opened_it_expires() {
    // Real time at the start, so certificates suit the TLS stacks.
    let t0 = SystemClock.now();
    let clock = Arc::new(ManualClock::new(t0));
    let mesh = Mesh::start_with(POLICY, clock.clone()).await;
    let app = App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                clock: Some(clock.clone()),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let reporting = mesh
        .sidecar(
            REPORTING,
            Parts {
                socket: true,
                services: vec![(inbound.to_string(), PAYMENTS.to_owned())],
                clock: Some(clock.clone()),
                ..Parts::default()
            },
        )
        .await;
    let socket = reporting.socket.as_deref().unwrap();
    support::mesh::prime_nonce(socket, inbound, "payments:read").await;
    let url = format!("http://{inbound}/v1/ws/prices");

    // Reporting's tokens live 2 minutes (its rule's max_ttl).
    let (authorization, dpop) = authorize(socket, "GET", &url, "payments:read").await;
    let mut long = open_tunnel(inbound, &authorization, &dpop).await;
    // Two seconds before the same token's expiry, a second tunnel.
    clock.set(t0 + 118);
    let (again, dpop) = authorize(socket, "GET", &url, "payments:read").await;
    assert_eq!(again, authorization, "the same cached token");
    let mut short = open_tunnel(inbound, &again, &dpop).await;
    assert!(echoes(&mut short).await);

    // The second closes at the token's expiry (2 s of real time; bound
    // 10 s, for a loaded machine)...
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(10), short.read(&mut buf))
        .await
        .expect("the tunnel outlived its token");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // ...while the first, opened with the token's whole life ahead of it,
    // still carries bytes.
    assert!(echoes(&mut long).await, "the longer tunnel was closed too");

    reporting.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    app.stop();
    mesh.broker.stop().await;
}
