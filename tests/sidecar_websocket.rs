//! A WebSocket upgrade through the inbound proxy: the handshake is
//! checked like any request, then joined to the app byte for byte.

mod support;

use std::sync::atomic::Ordering;
use support::mesh::{REPORTING, authorize};
use support::proxy::{Scene, caller, response_head};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_handshake_is_checked_then_joined_to_the_app() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let Scene {
        mesh,
        app,
        checkout,
        payments,
        inbound,
        ..
    } = Scene::start().await;
    let reporting = caller(&mesh, REPORTING, inbound).await;
    let socket = reporting.socket.as_deref().unwrap();
    let url = format!("http://{inbound}/v1/ws/prices");
    let (authorization, dpop) = authorize(socket, "GET", &url, "payments:read").await;
    let handshake = |extra: &str| {
        format!(
            "GET /v1/ws/prices HTTP/1.1\r\nHost: {inbound}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n{extra}\r\n"
        )
    };

    // Checked like any request: no credentials, no tunnel, and the app
    // never hears of it.
    let seen = app.seen.load(Ordering::SeqCst);
    let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    tcp.write_all(handshake("").as_bytes()).await.unwrap();
    let (head, _) = response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");
    assert_eq!(app.seen.load(Ordering::SeqCst), seen);

    // With the token and its proof: 101, then bytes both ways, the app
    // having been told who is calling.
    let mut tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let credentials = format!("Authorization: {authorization}\r\nDPoP: {dpop}\r\n");
    tcp.write_all(handshake(&credentials).as_bytes())
        .await
        .unwrap();
    let (head, mut rest) = response_head(&mut tcp).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    while !rest.contains(&b'\n') {
        let mut buf = [0u8; 256];
        let n = tcp.read(&mut buf).await.unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&buf[..n]);
    }
    let first_line = String::from_utf8_lossy(&rest)
        .lines()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(
        first_line, REPORTING,
        "the app learned the caller from the sidecar"
    );
    tcp.write_all(b"ping 1234").await.unwrap();
    let mut echoed = vec![0u8; 9];
    tcp.read_exact(&mut echoed).await.unwrap();
    assert_eq!(&echoed, b"ping 1234");

    // The same proof again: a replay, refused before any upgrade.
    let mut replay = tokio::net::TcpStream::connect(inbound).await.unwrap();
    replay
        .write_all(handshake(&credentials).as_bytes())
        .await
        .unwrap();
    let (head, _) = response_head(&mut replay).await;
    assert!(head.starts_with("HTTP/1.1 401"), "{head}");

    // The tunnel lives only as long as its token: a revocation covering it
    // closes the open connection.
    let admin = "spiffe://example.org/admin".parse().unwrap();
    mesh.broker
        .broker
        .revoke(
            tally::token::RevocationTarget::Subject(REPORTING.parse().unwrap()),
            None,
            "",
            &admin,
        )
        .await
        .unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(std::time::Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the tunnel is closed once the revocation arrives");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");

    reporting.sidecar.stop().await.unwrap();
    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}
