//! A proof must not work twice because the verifier restarted: the replay
//! cache lives in memory, so a new process asks for a nonce of its own
//! for every proof its predecessor could have accepted. Real broker, real
//! sidecars; the payments sidecar is stopped and started again on the same
//! port, with nothing carried over.

mod support;

use std::sync::atomic::Ordering;
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, authorize, authorize_with_nonce, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proof_used_before_a_restart_is_refused_after_it() {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let payments_parts = |at| Parts {
        inbound_to: Some(app.addr),
        inbound_at: at,
        ..Parts::default()
    };
    let payments = mesh.sidecar(PAYMENTS, payments_parts(None)).await;
    let inbound = payments.inbound.unwrap();
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                socket: true,
                outbound: true,
                services: vec![(inbound.to_string(), PAYMENTS.to_owned())],
                ..Parts::default()
            },
        )
        .await;
    let socket = checkout.socket.as_deref().unwrap();
    let url = format!("http://{inbound}/v1/charges");

    // Used once (with the nonce round trip the fresh sidecar asks for).
    let (authorization, dpop) = authorize(socket, "POST", &url, "payments:charge").await;
    let mut headers = [("authorization", authorization), ("dpop", dpop)];
    let first = send_with(&headers, inbound).await;
    let used = if first.status == 401 {
        let nonce = first.header("dpop-nonce").expect("a nonce to retry with");
        let (authorization, dpop) =
            authorize_with_nonce(socket, "POST", &url, "payments:charge", Some(nonce)).await;
        headers = [("authorization", authorization), ("dpop", dpop)];
        send_with(&headers, inbound).await
    } else {
        first
    };
    assert_eq!(used.status, 200, "{:?}", used.body);
    // Made just before the restart and never sent.
    let (authorization, dpop) = authorize(socket, "POST", &url, "payments:charge").await;
    let unsent = [("authorization", authorization), ("dpop", dpop)];
    // Before the restart, a replay is caught by the replay cache.
    assert_eq!(send_with(&headers, inbound).await.status, 401);

    payments.sidecar.stop().await.unwrap();
    let restarted = mesh.sidecar(PAYMENTS, payments_parts(Some(inbound))).await;
    assert_eq!(restarted.inbound, Some(inbound));
    let seen = app.seen.load(Ordering::SeqCst);

    for (what, captured) in [("used", &headers), ("unsent", &unsent)] {
        let replayed = send_with(captured, inbound).await;
        assert_eq!(replayed.status, 401, "{what}: {:?}", replayed.body);
        let challenge = replayed.header("www-authenticate").unwrap();
        assert!(challenge.contains("use_dpop_nonce"), "{what}: {challenge}");
        assert!(replayed.header("dpop-nonce").is_some(), "{what}");
    }
    assert_eq!(
        app.seen.load(Ordering::SeqCst),
        seen,
        "a replay reached the app"
    );

    // A nonce from the new process, with the old proof's request, is a
    // new proof: the replay cannot be rescued by anyone without the key.
    // A real client signs again with the nonce and gets through:
    let outbound = checkout.outbound.unwrap();
    let answer = send(
        outbound,
        "POST",
        &url,
        &[("x-tally-scope", "payments:charge")],
        "",
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(app.seen.load(Ordering::SeqCst), seen + 1);
}

async fn send_with(
    headers: &[(&str, String); 2],
    inbound: std::net::SocketAddr,
) -> support::mesh::Answer {
    let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
    send(inbound, "POST", "/v1/charges", &headers, "").await
}
