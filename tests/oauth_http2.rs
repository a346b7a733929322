//! The OAuth endpoints over HTTP/2 (ALPN h2, real TLS): a POST with a
//! body and no client certificate gets the same clean 401 `invalid_client`
//! as over HTTP/1.1, not a reset stream. Checked with an HTTP/2 client
//! that sends part of its body and waits, and with `curl --http2` and a
//! body far over the cap when curl is installed.

mod support;

use bytes::Bytes;
use std::sync::Arc;
use support::broker::{serve_broker, settings};
use support::https::serve_https;

const POLICY: &str = include_str!("fixtures/policy.yaml");
/// A body far bigger than the form cap and the stream's flow-control
/// window: the server answers long before it could have read it.
const BIG: usize = 2 << 20;
const FORM: &str = "grant_type=client_credentials&audience=spiffe%3A%2F%2Fexample.org%2Fns%2Fpay%2Fsa%2Fpayments&token=t";

/// A TLS client offering only h2, trusting `bundle_pem`, with no client
/// certificate.
fn h2_tls(bundle_pem: &str) -> tokio_rustls::TlsConnector {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(bundle_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// An h2 connection to `https` without a client certificate.
async fn h2_client(
    https: &support::https::ServedHttps,
    bundle: &str,
) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(https.addr).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = h2_tls(bundle).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    client.ready().await.unwrap()
}

/// The whole answer: status and JSON body.
async fn answer(path: &str, response: h2::client::ResponseFuture) -> (u16, serde_json::Value) {
    let response = response
        .await
        .unwrap_or_else(|e| panic!("{path}: no answer, the stream failed: {e:?}"));
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap_or_else(|e| panic!("{path}: the answer broke off: {e:?}"));
        let _ = body.flow_control().release_capacity(chunk.len());
        bytes.extend_from_slice(&chunk);
    }
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn post(https: &support::https::ServedHttps, path: &str, length: usize) -> http::Request<()> {
    http::Request::post(format!("https://localhost:{}{path}", https.addr.port()))
        .header("content-type", "application/x-www-form-urlencoded")
        .header("content-length", length)
        .body(())
        .unwrap()
}

const PATHS: [&str; 3] = ["/oauth2/token", "/oauth2/introspect", "/oauth2/revoke"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_without_a_client_certificate_gets_401_over_http2_too() {
    let dir = tempfile::tempdir().unwrap();
    let key = tally::store::Sealer::generate_key_text().unwrap();
    let served = serve_broker(dir.path(), &key, settings(POLICY), "127.0.0.1:0").await;
    let https = serve_https(&served).await;
    let bundle = served.broker.bundle_pem();

    for path in PATHS {
        // A client whose body is slower than its headers: the first half,
        // a pause in which the server could decide, then the rest.
        let mut client = h2_client(&https, &bundle).await;
        let (mut response, mut upload) = client
            .send_request(post(&https, path, FORM.len()), false)
            .unwrap();
        let (first, rest) = FORM.split_at(20);
        upload
            .send_data(Bytes::from_static(first.as_bytes()), false)
            .unwrap();
        let early =
            tokio::time::timeout(std::time::Duration::from_millis(300), &mut response).await;
        assert!(
            early.is_err(),
            "{path}: answered (or reset) before the body was in: {early:?}"
        );
        upload
            .send_data(Bytes::from_static(rest.as_bytes()), true)
            .unwrap();
        let (status, said) = answer(path, response).await;
        assert_eq!(
            (status, said["error"].as_str()),
            (401, Some("invalid_client")),
            "{path}: {said}"
        );

        // A body far over the cap: answered without reading it, then the
        // rest is declined without error (RFC 9113 §8.1), not cancelled.
        let (response, mut upload) = client.send_request(post(&https, path, BIG), false).unwrap();
        // The server may answer, and end the stream, before these bytes
        // leave: then sending them fails, which is the behaviour asked for.
        let _ = upload.send_data(Bytes::from_static(b"grant_type=client_credentials"), false);
        let (status, said) = answer(path, response).await;
        assert_eq!(
            (status, said["error"].as_str()),
            (401, Some("invalid_client")),
            "{path}: {said}"
        );
        let reason = std::future::poll_fn(|cx| upload.poll_reset(cx))
            .await
            .unwrap();
        assert_eq!(reason, h2::Reason::NO_ERROR, "{path}");
    }

    // A plain form with curl, when it is there.
    let bundle_file = dir.path().join("bundle.pem");
    std::fs::write(&bundle_file, &bundle).unwrap();
    let port = https.addr.port();
    let curl = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["--http2", "-sS", "--max-time", "20", "--cacert"])
            .arg(&bundle_file)
            .args([
                "-o",
                "-",
                "-w",
                "\n%{http_code} %{http_version}",
                "--data-binary",
                FORM,
            ])
            .arg(format!("https://localhost:{port}/oauth2/token"))
            .output()
    })
    .await
    .unwrap();
    match curl {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("curl is not installed; the h2 client's checks stand alone");
        }
        Err(e) => panic!("running curl: {e}"),
        Ok(o) => {
            let out = String::from_utf8_lossy(&o.stdout);
            let err = String::from_utf8_lossy(&o.stderr);
            assert_eq!(o.status.code(), Some(0), "curl: {err}{out}");
            assert!(
                out.ends_with("401 2") && out.contains("invalid_client"),
                "{out}"
            );
        }
    }
    https.stop().await;
    served.stop().await;
}
