//! The outbound proxy end to end on loopback: mapped hosts signed for,
//! nonce challenges answered, unknown hosts refused when strict.

mod support;

use std::sync::atomic::Ordering;
use support::mesh::{App, CHECKOUT, Mesh, Parts, send};
use support::proxy::pair;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbound_proxy_signs_mapped_hosts_and_answers_nonce_challenges() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    // The payments side demands server nonces.
    let (checkout, payments) = pair(&mesh, &app, true).await;
    let proxy = checkout.outbound.unwrap();
    let inbound = payments.inbound.unwrap();

    // The app just sends plain HTTP through its proxy.
    let url = format!("http://{inbound}/v1/charges");
    let answer = send(
        proxy,
        "POST",
        &url,
        &[
            ("host", &inbound.to_string()),
            ("x-tally-scope", "payments:charge"),
        ],
        r#"{"amount": 100}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let seen = answer.json();
    assert_eq!(seen["caller"], CHECKOUT);
    assert_eq!(
        seen["body_len"], 15,
        "the body was resent on the nonce retry"
    );
    // First try without a nonce, then once with it; the nonce is kept, so
    // the next request needs no retry.
    let again = send(
        proxy,
        "POST",
        &url,
        &[
            ("host", &inbound.to_string()),
            ("x-tally-scope", "payments:charge"),
        ],
        "",
    )
    .await;
    assert_eq!(again.status, 200);
    let admin = payments.admin.unwrap();
    let metrics =
        String::from_utf8(send(admin, "GET", "/metrics", &[], "").await.body.to_vec()).unwrap();
    assert!(
        metrics.contains("tally_sidecar_inbound_requests_total{result=\"use_dpop_nonce\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("tally_sidecar_inbound_requests_total{result=\"allowed\"} 2"),
        "{metrics}"
    );

    // A chunked body larger than what is held for retries is streamed
    // (with the nonce remembered from before, so no retry is needed).
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let head = format!(
            "POST {url} HTTP/1.1\r\nHost: {inbound}\r\nx-tally-scope: payments:charge\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![b'z'; 100_000];
        stream
            .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        stream.write_all(&chunk).await.unwrap();
        stream.write_all(b"\r\n0\r\n\r\n").await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8_lossy(&raw);
        assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
        assert!(raw.contains("\"body_len\":100000"), "{raw}");
    }

    // A host not in the service map passes through untouched.
    let direct = format!("http://{}/health", app.addr);
    let plain = send(
        proxy,
        "GET",
        &direct,
        &[("host", &app.addr.to_string())],
        "",
    )
    .await;
    assert_eq!(plain.status, 200);
    assert_eq!(plain.json()["authorization"], false);
    assert_eq!(plain.json()["caller"], serde_json::Value::Null);

    // Origin-form requests are not proxy requests.
    let wrong = send(proxy, "GET", "/v1/charges", &[], "").await;
    assert_eq!(wrong.status, 400);

    // CONNECT: a tunnel, bytes passed through untouched.
    let mut stream = tokio::net::TcpStream::connect(proxy).await.unwrap();
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let target = app.addr.to_string();
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).await.unwrap();
    assert!(
        head[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&head[..n])
    );
    stream
        .write_all(
            format!("GET /tunnelled HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).await.unwrap();
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"path\":\"/tunnelled\""), "{raw}");

    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_outbound_proxy_refuses_unknown_hosts() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                outbound: true,
                strict: true,
                ..Parts::default()
            },
        )
        .await;
    let proxy = checkout.outbound.unwrap();
    let url = format!("http://{}/x", app.addr);
    let refused = send(proxy, "GET", &url, &[("host", &app.addr.to_string())], "").await;
    assert_eq!(refused.status, 403);
    assert_eq!(app.seen.load(Ordering::SeqCst), 0);
    checkout.sidecar.stop().await.unwrap();
    mesh.broker.stop().await;
}
