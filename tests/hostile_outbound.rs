//! The outbound proxy signs as its workload, so it must be neither an
//! open signer for other local users nor a way around the service map:
//! `--allow-uid` holds on its TCP listener as on the socket, and a strict
//! proxy sends nothing (plain, pre-authorized, or CONNECT) to a
//! destination outside the map.

mod support;

use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, send};

fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// Payments behind an inbound proxy; a checkout sidecar with an outbound
/// proxy whose map names payments.
async fn scene(
    allowed_uids: Option<Vec<u32>>,
    strict: bool,
) -> (Mesh, App, support::mesh::Started, support::mesh::Started) {
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                ..Parts::default()
            },
        )
        .await;
    let inbound = payments.inbound.unwrap();
    let checkout = mesh
        .sidecar(
            CHECKOUT,
            Parts {
                socket: true,
                outbound: true,
                strict,
                allowed_uids,
                services: vec![(inbound.to_string(), PAYMENTS.to_owned())],
                ..Parts::default()
            },
        )
        .await;
    (mesh, app, payments, checkout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_uid_off_the_allow_list_cannot_sign_through_the_outbound_proxy() {
    let me = own_uid();
    let stranger = me.wrapping_add(4242);
    let (_mesh, app, payments, checkout) = scene(Some(vec![stranger]), false).await;
    let outbound = checkout.outbound.unwrap();
    let url = format!("http://{}/v1/charges", payments.inbound.unwrap());
    let seen = app.seen.load(std::sync::atomic::Ordering::SeqCst);
    let answer = send(
        outbound,
        "POST",
        &url,
        &[("x-tally-scope", "payments:charge")],
        "",
    )
    .await;
    assert_eq!(answer.status, 403, "{:?}", answer.body);
    let body = answer.json();
    assert_eq!(body["error"], "access_denied");
    let text = body["error_description"].as_str().unwrap();
    assert!(text.contains(&format!("uid {me}")), "{text}");
    assert!(text.contains(&stranger.to_string()), "{text}");
    // CONNECT is refused the same way.
    let answer = send(
        outbound,
        "CONNECT",
        &payments.inbound.unwrap().to_string(),
        &[],
        "",
    )
    .await;
    assert_eq!(answer.status, 403, "{:?}", answer.body);
    assert_eq!(app.seen.load(std::sync::atomic::Ordering::SeqCst), seen);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_allowed_uid_still_signs_and_others_are_named_when_refused() {
    let me = own_uid();
    let (_mesh, _app, payments, checkout) = scene(Some(vec![me]), false).await;
    let outbound = checkout.outbound.unwrap();
    let url = format!("http://{}/v1/charges", payments.inbound.unwrap());
    let answer = send(
        outbound,
        "POST",
        &url,
        &[("x-tally-scope", "payments:charge")],
        "",
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(answer.json()["caller"], CHECKOUT);

    // Another local user (needs root to become one): curl as `nobody`.
    if me != 0 {
        eprintln!("not root: the other-uid half of this test needs root to switch users");
        return;
    }
    use std::os::unix::process::CommandExt as _;
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-x",
            &format!("http://{outbound}"),
            "-X",
            "POST",
            &url,
        ])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("curl (installed by .ci/run)");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("access_denied"), "{body}");
    assert!(body.contains("uid 65534"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_proxy_sends_nothing_outside_the_service_map() {
    let (_mesh, app, payments, checkout) = scene(None, true).await;
    let outbound = checkout.outbound.unwrap();
    // A destination outside the map: the app is running, but not mapped
    // under its own address.
    let elsewhere = app.addr;
    let seen = app.seen.load(std::sync::atomic::Ordering::SeqCst);
    for (method, target, headers) in [
        ("GET", format!("http://{elsewhere}/"), vec![]),
        (
            "GET",
            format!("http://{elsewhere}/"),
            vec![("authorization", "Bearer app-made")],
        ),
        ("CONNECT", elsewhere.to_string(), vec![]),
    ] {
        let answer = send(outbound, method, &target, &headers, "").await;
        assert_eq!(
            answer.status, 403,
            "{method} {target} {headers:?}: {:?}",
            answer.body
        );
        assert_eq!(answer.json()["error"], "access_denied");
    }
    assert_eq!(app.seen.load(std::sync::atomic::Ordering::SeqCst), seen);
    // A mapped destination still works, CONNECT included.
    let inbound = payments.inbound.unwrap();
    let url = format!("http://{inbound}/v1/charges");
    let answer = send(
        outbound,
        "POST",
        &url,
        &[("x-tally-scope", "payments:charge")],
        "",
    )
    .await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    let answer = send(outbound, "CONNECT", &inbound.to_string(), &[], "").await;
    assert_eq!(answer.status, 200, "{:?}", answer.body);
}

#[test]
fn a_service_map_entry_without_a_port_is_a_configuration_error() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("services.yaml");
    std::fs::write(&map, "localhost: spiffe://example.org/ns/pay/sa/payments\n").unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, "").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args([
            "sidecar",
            "--broker",
            "https://127.0.0.1:1",
            "--join-token",
            "x",
        ])
        .arg("--trust-bundle")
        .arg(&bundle)
        .arg("--service-map")
        .arg(&map)
        .arg("--admin-listen")
        .arg("off")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("\"localhost\" names no port"), "{stderr}");
    assert!(stderr.contains("localhost:*"), "{stderr}");
}
