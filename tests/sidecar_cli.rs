//! `tally sidecar` as an operator runs it, next to `tally broker`: the
//! binaries, a join token from `tally ctl`, and the local API over the
//! socket; SIGTERM stops it cleanly.

mod support;

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use support::broker::Spawned;
use support::process::{Lines, PATIENCE, output_within, terminate, wait_exit};

fn get(socket: &std::path::Path, target: &str) -> (u16, serde_json::Value) {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    write!(
        stream,
        "GET {target} HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    (
        head.split(' ').nth(1).unwrap().parse().unwrap(),
        serde_json::from_str(body).unwrap(),
    )
}

#[test]
fn a_sidecar_attests_with_a_join_token_and_serves_tokens_on_its_socket() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let broker_url = format!("https://{}", broker.grpc.replace("127.0.0.1", "localhost"));
    let checkout = "spiffe://example.org/ns/shop/sa/checkout";
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["ctl", "join-token", "create", "--spiffe-id", checkout])
            .arg("--broker")
            .arg(&broker_url)
            .arg("--data-dir")
            .arg(&data),
        PATIENCE,
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let token = String::from_utf8(o.stdout).unwrap().trim().to_owned();

    let socket = dir.path().join("agent.sock");
    let mut sidecar = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["sidecar", "--broker", &broker_url])
        .arg("--trust-bundle")
        .arg(data.join("bundle.pem"))
        .arg("--socket")
        .arg(&socket)
        .args(["--admin-listen", "127.0.0.1:0"])
        // The token through the environment, not the command line.
        .env("TALLY_JOIN_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = Lines::of(sidecar.stdout.take().unwrap());
    let line = out.next_within(PATIENCE);
    assert!(
        line.contains(checkout) && line.contains("local API on"),
        "{line}"
    );

    let (status, identity) = get(&socket, "/v1/identity");
    assert_eq!(status, 200);
    assert_eq!(identity["spiffe_id"], checkout);
    let (status, issued) = get(
        &socket,
        "/v1/token?audience=spiffe%3A%2F%2Fexample.org%2Fns%2Fpay%2Fsa%2Fpayments&scope=payments%3Aread",
    );
    assert_eq!(status, 200, "{issued}");
    assert_eq!(issued["token_type"], "DPoP");
    assert_eq!(issued["scope"], "payments:read");

    // The same from a shell, with `tally client`.
    let client = |args: &[&str]| {
        output_within(
            Command::new(env!("CARGO_BIN_EXE_tally"))
                .arg("client")
                .arg("--socket")
                .arg(&socket)
                .args(args),
            PATIENCE,
        )
    };
    let o = client(&["identity"]);
    assert_eq!(o.status.code(), Some(0));
    let said = String::from_utf8_lossy(&o.stdout);
    assert!(
        said.contains(&format!("spiffe_id:    {checkout}")),
        "{said}"
    );
    // Times as every command prints them: RFC 3339 UTC.
    let expiry = said
        .lines()
        .find_map(|l| l.strip_prefix("expires_at:   "))
        .unwrap_or_default();
    assert!(humantime::parse_rfc3339(expiry).is_ok(), "{said}");
    // The token alone on stdout, for `$(…)` and `> token.txt`; the rest
    // on stderr.
    let o = client(&[
        "token",
        "--audience",
        "spiffe://example.org/ns/pay/sa/payments",
        "--scope",
        "payments:read",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8(o.stdout).unwrap();
    let token = stdout.strip_suffix('\n').unwrap();
    assert!(
        token.starts_with("ey")
            && token.split('.').count() == 3
            && !token.contains(char::is_whitespace),
        "{stdout}"
    );
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("scope \"payments:read\""),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let url = "https://payments.example/v1/charges";
    let o = client(&[
        "authorize",
        "--method",
        "post",
        "--url",
        url,
        "--audience",
        "spiffe://example.org/ns/pay/sa/payments",
        "--scope",
        "payments:charge",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("Authorization: DPoP ey"), "{out}");
    assert!(lines[1].starts_with("DPoP: ey"), "{out}");
    assert!(
        lines[2].starts_with("curl -X 'POST' -H 'Authorization: DPoP ")
            && lines[2].ends_with(&format!("'{url}'")),
        "{out}"
    );
    // Refusals keep the sidecar's words; no sidecar is "unavailable".
    let o = client(&["token", "--audience", "spiffe://example.org/ns/x/sa/nobody"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("403 access_denied"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["client", "--socket"])
            .arg(dir.path().join("nothing.sock"))
            .arg("identity"),
        PATIENCE,
    );
    assert_eq!(o.status.code(), Some(69));

    terminate(&sidecar);
    assert_eq!(wait_exit(&mut sidecar, PATIENCE).code(), Some(0));
    assert!(!socket.exists(), "the socket is removed on the way out");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}

#[test]
fn tally_sidecar_as_injected_takes_the_bundle_as_text_and_opens_its_socket_to_every_uid() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let broker_url = format!("https://{}", broker.grpc.replace("127.0.0.1", "localhost"));
    let spiffe_id = "spiffe://example.org/ns/shop/sa/web";
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally"))
            .args([
                "ctl",
                "join-token",
                "create",
                "--spiffe-id",
                spiffe_id,
                "--broker",
                &broker_url,
            ])
            .arg("--data-dir")
            .arg(&data),
        PATIENCE,
    );
    let token = String::from_utf8(o.stdout).unwrap().trim().to_owned();
    let socket = dir.path().join("sidecar.sock");
    // As the injector writes the container: the bundle's PEM in an
    // environment variable, no file.
    let bundle = std::fs::read_to_string(data.join("bundle.pem")).unwrap();
    let mut sidecar = Command::new(env!("CARGO_BIN_EXE_tally-sidecar"))
        .args([
            "--broker",
            &broker_url,
            "--socket-mode",
            "0666",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--socket")
        .arg(&socket)
        .env("TALLY_TRUST_BUNDLE_PEM", &bundle)
        .env("TALLY_JOIN_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = Lines::of(sidecar.stdout.take().unwrap());
    let line = out.next_within(PATIENCE);
    assert!(line.contains(spiffe_id), "{line}");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o666);
    let (status, identity) = get(&socket, "/v1/identity");
    assert_eq!(
        (status, identity["spiffe_id"].as_str()),
        (200, Some(spiffe_id))
    );
    terminate(&sidecar);
    assert!(wait_exit(&mut sidecar, PATIENCE).success());
}
