//! Secrets stay where they belong, checked by scanning everything a
//! component produces rather than one message:
//!
//! - a sidecar's private key (its SVID key, which is also its DPoP key)
//!   never leaves it: not in any answer of its socket, inbound or outbound
//!   proxy or admin port, not in what the app receives, not in any log
//!   line (debug, every target), not in any file of the mesh (the broker's
//!   store included);
//! - error texts never hold a token, a proof, a join token or a key: the
//!   core's errors (`Display` and `Debug`), the HTTP answers they map to,
//!   the proxies', the broker's gRPC and OAuth refusals, and the log lines
//!   written meanwhile.
//!
//! Each scan has a positive control: the same scan finds the secret where
//! it was planted.

mod support;

use base64::Engine as _;
use std::sync::{Mutex, OnceLock};
use support::mesh::{App, CHECKOUT, Mesh, PAYMENTS, Parts, authorize, local, send};
use tally::jose::b64;

/// Every log line written by any test in this file, at debug level.
fn captured() -> &'static Mutex<Vec<u8>> {
    static LOG: OnceLock<Mutex<Vec<u8>>> = OnceLock::new();
    LOG.get_or_init(|| {
        struct Capture;
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                captured().lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(|| Capture)
            .init();
        Mutex::new(Vec::new())
    })
}

/// The log so far, as text.
fn log_text() -> String {
    String::from_utf8_lossy(&captured().lock().unwrap()).into_owned()
}

/// The forms a P-256 private key could take in text or bytes: each line
/// of its PEM body, and its 32-byte scalar as raw bytes, base64url (a JWK
/// `d`), base64 and hex.
fn key_needles(key_pem: &str) -> Vec<Vec<u8>> {
    let body: Vec<&str> = key_pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.is_empty())
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.concat())
        .unwrap();
    // ECPrivateKey (RFC 5915), inside PKCS#8 or alone: version 1, then the
    // scalar as a 32-byte OCTET STRING.
    let at = der
        .windows(5)
        .position(|w| w == [0x02, 0x01, 0x01, 0x04, 0x20])
        .expect("an EC private key")
        + 5;
    let d = &der[at..at + 32];
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    let mut needles: Vec<Vec<u8>> = body.iter().map(|l| l.as_bytes().to_vec()).collect();
    needles.push(d.to_vec());
    needles.push(b64::encode(d).into_bytes());
    needles.push(
        base64::engine::general_purpose::STANDARD_NO_PAD
            .encode(d)
            .as_bytes()[..40]
            .to_vec(),
    );
    needles.push(hex.clone().into_bytes());
    needles.push(hex.to_uppercase().into_bytes());
    needles
}

/// Which of `needles` occur in `haystack`.
fn found(haystack: &[u8], needles: &[Vec<u8>]) -> Vec<String> {
    needles
        .iter()
        .filter(|n| haystack.windows(n.len()).any(|w| w == n.as_slice()))
        .map(|n| String::from_utf8_lossy(n).into_owned())
        .collect()
}

/// Every regular file under `dir`.
fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let kind = std::fs::symlink_metadata(&path).unwrap().file_type();
        if kind.is_dir() {
            out.extend(files(&path));
        } else if kind.is_file() {
            out.push(path);
        }
    }
    out
}

/// The whole of an HTTP answer as text: status, headers and body.
fn whole(answer: &support::mesh::Answer) -> Vec<u8> {
    let mut out = format!("{}\n", answer.status).into_bytes();
    for (name, value) in &answer.headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.push(b'\n');
    }
    out.extend_from_slice(&answer.body);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecars_private_key_never_leaves_it() {
    captured();
    let mesh = Mesh::start().await;
    let app = App::start().await;
    let payments = mesh
        .sidecar(
            PAYMENTS,
            Parts {
                inbound_to: Some(app.addr),
                admin: true,
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
                admin: true,
                services: vec![(inbound.to_string(), PAYMENTS.to_owned())],
                ..Parts::default()
            },
        )
        .await;
    let socket = checkout.socket.as_deref().unwrap();
    support::mesh::prime_nonce(socket, inbound, "payments:charge").await;
    let url = format!("http://{inbound}/v1/charges");

    // Everything the sidecars answer, while doing their work.
    let mut answers: Vec<(String, Vec<u8>)> = Vec::new();
    for target in [
        "/v1/identity".to_owned(),
        format!(
            "/v1/token?audience={}&scope=payments:charge",
            PAYMENTS.replace(':', "%3A").replace('/', "%2F")
        ),
        "/v1/token?audience=nonsense".to_owned(),
    ] {
        let (status, body) = local(socket, "GET", &target, None).await;
        answers.push((
            format!("socket GET {target}"),
            format!("{status} {body}").into_bytes(),
        ));
    }
    let ask = serde_json::json!({"method": "POST", "url": url, "scope": "payments:charge"});
    let (status, body) = local(socket, "POST", "/v1/authorize", Some(ask)).await;
    answers.push((
        "socket authorize".into(),
        format!("{status} {body}").into_bytes(),
    ));
    let (status, body) = local(
        socket,
        "POST",
        "/v1/authorize",
        Some(serde_json::json!({"url": 7})),
    )
    .await;
    answers.push((
        "socket authorize (bad)".into(),
        format!("{status} {body}").into_bytes(),
    ));
    let (a, d) = authorize(socket, "POST", &url, "payments:charge").await;
    let headers = [("authorization", a.as_str()), ("dpop", d.as_str())];
    let ok = send(inbound, "POST", "/v1/charges", &headers, "").await;
    assert_eq!(ok.status, 200, "{ok:?}");
    answers.push(("inbound allowed (and what the app saw)".into(), whole(&ok)));
    let replay = send(inbound, "POST", "/v1/charges", &headers, "").await;
    answers.push(("inbound replay".into(), whole(&replay)));
    let proxy = checkout.outbound.unwrap();
    let via_proxy = send(
        proxy,
        "POST",
        &url,
        &[
            ("host", &inbound.to_string()),
            ("x-tally-scope", "payments:charge"),
        ],
        "{}",
    )
    .await;
    assert_eq!(via_proxy.status, 200, "{via_proxy:?}");
    answers.push((
        "outbound proxy (and what the app saw)".into(),
        whole(&via_proxy),
    ));
    for admin in [checkout.admin.unwrap(), payments.admin.unwrap()] {
        for path in ["/metrics", "/readyz", "/healthz"] {
            answers.push((
                format!("admin {path}"),
                whole(&send(admin, "GET", path, &[], "").await),
            ));
        }
    }

    let keys: Vec<(String, String)> = [(&checkout, "checkout"), (&payments, "payments")]
        .iter()
        .map(|(s, name)| {
            (
                (*name).to_owned(),
                s.sidecar.parts().svid.borrow().key_pem.to_string(),
            )
        })
        .collect();
    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    app.stop();
    mesh.broker.stop().await;
    let log = log_text();
    assert!(log.contains("token issued"), "the log was captured");
    assert!(log.contains("DEBUG"), "at debug level");
    answers.push(("log".into(), log.into_bytes()));
    for file in files(mesh.dir.path()) {
        answers.push((file.display().to_string(), std::fs::read(&file).unwrap()));
    }

    for (name, key_pem) in &keys {
        let needles = key_needles(key_pem);
        // The control: the scan finds the key where it is, in each form.
        let lines = key_pem.lines().filter(|l| !l.starts_with("-----")).count();
        assert_eq!(
            found(key_pem.as_bytes(), &needles).len(),
            lines,
            "{name}: PEM lines"
        );
        for needle in &needles {
            let planted = [b"x=".as_slice(), needle, b"\n"].concat();
            assert!(!found(&planted, &needles).is_empty(), "{name}: control");
        }
        for (what, bytes) in &answers {
            let hits = found(bytes, &needles);
            assert!(hits.is_empty(), "{name}'s private key in {what}: {hits:?}");
        }
    }
}

/// The parts of a compact JWS that identify it: its payload and its
/// signature (a header is shared by many).
fn jws_needles(jws: &str) -> Vec<Vec<u8>> {
    jws.split('.')
        .skip(1)
        .map(|s| s.as_bytes().to_vec())
        .collect()
}

/// Everything an error shows: `Display`, `Debug`, and the HTTP answer the
/// one mapping makes of it.
fn shown(err: &tally::auth::AuthError) -> Vec<u8> {
    let answer = tally::auth::answer(err, None);
    format!(
        "{err}\n{err:?}\n{}\n{:?}",
        answer.www_authenticate.unwrap_or_default(),
        answer.error
    )
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_texts_never_hold_a_token_a_proof_a_join_token_or_a_key() {
    use support::{Fixture, NOW, URL, context, uri};
    use tally::auth::{AuthError, Request, RequestVerifier, VerifierConfig};
    use tally::dpop::proof::{self, ProofConfig, TokenHash};
    captured();
    let fx = Fixture::new();
    let token = fx.token();
    let token = token.expose();
    let proof = fx.proof(token);
    let client_key = fx.client.signing_key().to_pkcs8_pem().unwrap();
    let client_needles = key_needles(&client_key);
    // The client key as a private JWK, in the header of a proof.
    let d = b64::encode(&client_needles[client_needles.len() - 5]);
    let private_jwk_proof = fx.proof_with(token, |header, _| header["jwk"]["d"] = d.clone().into());
    let mut needles: Vec<Vec<u8>> = Vec::new();
    needles.extend(jws_needles(token));
    needles.extend(jws_needles(&proof));
    needles.extend(jws_needles(&private_jwk_proof));
    needles.extend(client_needles);

    let mut shown_texts: Vec<(String, Vec<u8>)> = Vec::new();
    // The core: the token verifier...
    let other_audience = tally::token::TokenConfig::new(support::ISSUER, CHECKOUT.parse().unwrap());
    let mut spoiled = token.to_owned();
    spoiled.pop();
    spoiled.push(if token.ends_with('A') { 'B' } else { 'A' });
    for (what, result) in [
        (
            "token for another audience",
            tally::token::verify(token, &fx.jwks, &other_audience, NOW, &mut ()),
        ),
        (
            "expired token",
            tally::token::verify(token, &fx.jwks, &fx.token_config(), NOW + 100_000, &mut ()),
        ),
        (
            "unknown kid",
            tally::token::verify(
                token,
                &tally::token::Jwks::default(),
                &fx.token_config(),
                NOW,
                &mut (),
            ),
        ),
        (
            "bad signature",
            tally::token::verify(&spoiled, &fx.jwks, &fx.token_config(), NOW, &mut ()),
        ),
        (
            "a proof as a token",
            tally::token::verify(&proof, &fx.jwks, &fx.token_config(), NOW, &mut ()),
        ),
    ] {
        let err = AuthError::Token(result.unwrap_err());
        shown_texts.push((what.into(), shown(&err)));
    }
    // ...the proof verifier...
    let u = uri();
    let hash = TokenHash::of(token);
    let other_hash = TokenHash::of("another token");
    let jkt = fx.client.thumbprint();
    let mut get = context(&u, Some(&hash), Some(&jkt));
    get.method = "GET";
    for (what, text, ctx) in [
        ("proof for another method", proof.as_str(), get),
        (
            "proof for another token",
            proof.as_str(),
            context(&u, Some(&other_hash), Some(&jkt)),
        ),
        (
            "proof with a private jwk",
            private_jwk_proof.as_str(),
            context(&u, Some(&hash), Some(&jkt)),
        ),
        (
            "a token as a proof",
            token,
            context(&u, Some(&hash), Some(&jkt)),
        ),
    ] {
        let err = AuthError::Proof(
            proof::verify(text, &ctx, &ProofConfig::default(), NOW, &mut ()).unwrap_err(),
        );
        shown_texts.push((what.into(), shown(&err)));
    }
    // ...and the whole-request check, headers as they come.
    let verifier = RequestVerifier::new(VerifierConfig::new(fx.token_config())).unwrap();
    let dpop_auth = format!("DPoP {token}");
    let bearer = format!("Bearer {token}");
    let swapped = format!("DPoP {proof}");
    for (what, authorization, dpop) in [
        ("a bound token as Bearer", bearer.as_str(), None),
        (
            "Bearer and DPoP together",
            bearer.as_str(),
            Some(proof.as_str()),
        ),
        ("token and proof swapped", swapped.as_str(), Some(token)),
        ("no proof", dpop_auth.as_str(), None),
    ] {
        let dpop: Vec<&[u8]> = dpop.map(str::as_bytes).into_iter().collect();
        let request = Request {
            method: "POST",
            uri: URL,
            authorization: &[authorization.as_bytes()],
            dpop: &dpop,
        };
        let err = verifier.verify(&request, &fx.jwks, NOW).unwrap_err();
        shown_texts.push((what.into(), shown(&err)));
    }

    // Over the wire: an inbound proxy, the broker's gRPC refusals, the
    // local API, with a real token and proof from the mesh.
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
                services: vec![(inbound.to_string(), PAYMENTS.to_owned())],
                ..Parts::default()
            },
        )
        .await;
    let socket = checkout.socket.as_deref().unwrap();
    support::mesh::prime_nonce(socket, inbound, "payments:charge").await;
    let url = format!("http://{inbound}/v1/charges");
    let (authorization, dpop) = authorize(socket, "POST", &url, "payments:charge").await;
    let live = authorization.trim_start_matches("DPoP ").to_owned();
    needles.extend(jws_needles(&live));
    needles.extend(jws_needles(&dpop));
    let (_, elsewhere) = authorize(
        socket,
        "POST",
        &format!("http://{inbound}/v1/refunds"),
        "payments:charge",
    )
    .await;
    needles.extend(jws_needles(&elsewhere));
    let live_bearer = format!("Bearer {live}");
    let live_swapped = format!("DPoP {dpop}");
    for (what, headers) in [
        (
            "inbound: Bearer",
            vec![("authorization", live_bearer.as_str())],
        ),
        (
            "inbound: proof for another URL",
            vec![
                ("authorization", authorization.as_str()),
                ("dpop", elsewhere.as_str()),
            ],
        ),
        (
            "inbound: swapped",
            vec![
                ("authorization", live_swapped.as_str()),
                ("dpop", live.as_str()),
            ],
        ),
        (
            "inbound: accepted",
            vec![
                ("authorization", authorization.as_str()),
                ("dpop", dpop.as_str()),
            ],
        ),
        (
            "inbound: replayed",
            vec![
                ("authorization", authorization.as_str()),
                ("dpop", dpop.as_str()),
            ],
        ),
    ] {
        let answer = send(inbound, "POST", "/v1/charges", &headers, "").await;
        // The accepted one reaches the app, which echoes what it saw.
        shown_texts.push((what.into(), whole(&answer)));
    }
    // The broker: a token where a proof belongs, a private-jwk proof, a
    // join token used twice or made up.
    let channel = support::broker::channel_as(&mesh.broker, CHECKOUT);
    let mut tokens = tally::proto::v1::tokens_client::TokensClient::new(channel);
    for (what, dpop_proof) in [
        ("Issue: a token as the proof", live.clone()),
        ("Issue: a private jwk", private_jwk_proof.clone()),
    ] {
        let status = tokens
            .issue(tally::proto::v1::IssueRequest {
                audience: PAYMENTS.into(),
                scopes: vec!["payments:charge".into()],
                ttl_seconds: 0,
                dpop_proof,
            })
            .await
            .unwrap_err();
        shown_texts.push((what.into(), format!("{status:?}").into_bytes()));
    }
    let join = mesh
        .broker
        .broker
        .create_join_token(&"spiffe://example.org/vm/x".parse().unwrap(), 600, None)
        .await
        .unwrap();
    let join = join.expose().to_owned();
    needles.push(join.clone().into_bytes());
    let made_up = b64::encode([9u8; 32]);
    needles.push(made_up.clone().into_bytes());
    let identity = tally::sidecar::identity::IdentityClient::new(
        mesh.broker.url(),
        mesh.broker.broker.bundle_pem(),
    );
    let how = |t: &str| {
        tally::sidecar::identity::Attestation::JoinToken(zeroize::Zeroizing::new(t.to_owned()))
    };
    identity.attest(&how(&join), NOW).await.unwrap();
    for (what, t) in [
        ("Attest: a used join token", &join),
        ("Attest: a made-up join token", &made_up),
    ] {
        let err = identity.attest(&how(t), NOW).await.unwrap_err();
        shown_texts.push((what.into(), format!("{err}\n{err:?}").into_bytes()));
    }
    // The local API, given a token where an audience or URL belongs.
    for (what, target, body) in [
        (
            "socket: a token as the audience",
            format!("/v1/token?audience={live}"),
            None,
        ),
        (
            "socket: a token as the URL",
            "/v1/authorize".to_owned(),
            Some(serde_json::json!({"method": "POST", "url": live})),
        ),
    ] {
        let method = if body.is_some() { "POST" } else { "GET" };
        let (status, answer) = local(socket, method, &target, body).await;
        shown_texts.push((what.into(), format!("{status} {answer}").into_bytes()));
    }
    checkout.sidecar.stop().await.unwrap();
    payments.sidecar.stop().await.unwrap();
    app.stop();
    mesh.broker.stop().await;
    shown_texts.push(("log".into(), log_text().into_bytes()));

    // The control: the scan finds each secret where it was planted.
    for needle in &needles {
        let planted = [b"error: ".as_slice(), needle].concat();
        assert!(!found(&planted, &needles).is_empty());
    }
    let leaks: Vec<String> = shown_texts
        .iter()
        .filter_map(|(what, text)| {
            let hits = found(text, &needles);
            (!hits.is_empty()).then(|| format!("{what}: {hits:?}"))
        })
        .collect();
    assert!(leaks.is_empty(), "{leaks:#?}");
}
