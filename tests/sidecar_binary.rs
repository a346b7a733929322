//! `tally-sidecar`, the sidecar alone: the same arguments, environment and
//! settings as `tally sidecar` (one definition), it attests and serves
//! like it, and it carries none of the broker's store (no SQLite).

mod support;

use std::io::{Read as _, Write as _};
use std::process::{Command, Stdio};
use support::broker::Spawned;
use support::process::{Lines, PATIENCE, output_within, terminate, wait_exit};

const TALLY: &str = env!("CARGO_BIN_EXE_tally");
const SIDECAR: &str = env!("CARGO_BIN_EXE_tally-sidecar");

fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut command = Command::new(program);
    if program == TALLY {
        command.arg("sidecar");
    }
    command.args(args);
    // Nothing from the test runner's environment may change the answer.
    for (key, _) in std::env::vars() {
        if key.starts_with("TALLY_") {
            command.env_remove(key);
        }
    }
    command.envs(env.iter().copied());
    output_within(&mut command, PATIENCE)
}

/// The outputs of both binaries, with `tally-sidecar`'s program name put
/// back to `tally sidecar` / `tally` so the rest must match byte for byte.
fn both(args: &[&str], env: &[(&str, &str)]) -> [(Option<i32>, String, String); 2] {
    [TALLY, SIDECAR].map(|program| {
        let o = run(program, args, env);
        let text = |b: &[u8]| {
            String::from_utf8_lossy(b)
                .replace("tally-sidecar: error:", "tally: error:")
                .replace("tally-sidecar", "tally sidecar")
        };
        (o.status.code(), text(&o.stdout), text(&o.stderr))
    })
}

#[test]
fn help_is_the_help_of_tally_sidecar_apart_from_the_program_name() {
    for flag in ["--help", "-h"] {
        let [tally, alone] = both(&[flag], &[]);
        assert_eq!(tally.0, Some(0));
        assert!(
            tally.1.contains("Usage: tally sidecar [OPTIONS]"),
            "{}",
            tally.1
        );
        assert!(tally.1.contains("--inbound-listen"), "{}", tally.1);
        assert_eq!(alone, tally, "{flag}");
    }
    // The raw text names the binary it came from.
    let o = run(SIDECAR, &["--help"], &[]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("Usage: tally-sidecar [OPTIONS]"));
}

/// Arguments, and environment variables.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);

#[test]
fn flags_environment_and_settings_files_are_read_the_same_way() {
    let dir = tempfile::tempdir().unwrap();
    let settings = dir.path().join("sidecar.yaml");
    std::fs::write(
        &settings,
        "broker: https://broker.example:8443\nproof_max_age: 0s\n",
    )
    .unwrap();
    let settings = settings.to_str().unwrap();
    let cases: [Case; 5] = [
        (&[], &[]),
        (&["--no-such-flag"], &[]),
        (
            &["--broker", "https://b:8443", "--inbound-listen", "nope"],
            &[],
        ),
        (
            &[],
            &[
                ("TALLY_BROKER", "https://b:8443"),
                ("TALLY_TRUST_BUNDLE", "/nonexistent/bundle.pem"),
            ],
        ),
        (
            &["--config", settings],
            &[("TALLY_JOIN_TOKEN", "not-a-token")],
        ),
    ];
    for (args, env) in cases {
        let [tally, alone] = both(args, env);
        assert_eq!(tally.0, Some(64), "{args:?} {env:?}: {}", tally.2);
        assert!(!tally.2.is_empty());
        assert_eq!(alone, tally, "{args:?} {env:?}");
    }
}

#[test]
fn tally_sidecar_attests_and_serves_its_socket_then_stops_on_sigterm() {
    attest_serve_and_stop(Command::new(SIDECAR));
}

#[test]
fn on_one_core_it_serves_the_same_with_its_current_thread_runtime() {
    // `taskset` leaves the process one core: the runtime it then picks
    // must attest, serve and stop as the multi-thread one does.
    let mut pinned = Command::new("taskset");
    pinned.args(["-c", "0", SIDECAR]);
    attest_serve_and_stop(pinned);
}

fn attest_serve_and_stop(mut command: Command) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let broker_url = format!("https://{}", broker.grpc.replace("127.0.0.1", "localhost"));
    let id = "spiffe://example.org/ns/shop/sa/checkout";
    let o = broker.ctl(&data, &["join-token", "create", "--spiffe-id", id]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let token = String::from_utf8(o.stdout).unwrap().trim().to_owned();

    let socket = dir.path().join("agent.sock");
    let mut sidecar = command
        .args(["--broker", &broker_url])
        .arg("--trust-bundle")
        .arg(data.join("bundle.pem"))
        .arg("--socket")
        .arg(&socket)
        .args(["--admin-listen", "off"])
        .env("TALLY_JOIN_TOKEN", &token)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = Lines::of(sidecar.stdout.take().unwrap());
    let line = out.next_within(PATIENCE);
    assert!(line.contains(id) && line.contains("local API on"), "{line}");

    let mut stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    write!(
        stream,
        "GET /v1/identity HTTP/1.1\r\nHost: tally\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let identity: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(identity["spiffe_id"], id);

    terminate(&sidecar);
    assert_eq!(wait_exit(&mut sidecar, PATIENCE).code(), Some(0));
    assert!(!socket.exists(), "the socket is removed on the way out");
    let (code, _) = broker.stop();
    assert_eq!(code, Some(0));
}

#[test]
fn the_sidecar_binary_links_no_sqlite() {
    // SQLite's file header string is in every build that links it (as
    // `tally` does, for the broker's store).
    let marker = b"SQLite format 3";
    let holds = |path: &str| {
        std::fs::read(path)
            .unwrap()
            .windows(marker.len())
            .any(|w| w == marker)
    };
    assert!(holds(TALLY), "the check must see SQLite where it is");
    assert!(!holds(SIDECAR), "tally-sidecar links SQLite");
    let size = |path: &str| std::fs::metadata(path).unwrap().len();
    assert!(size(SIDECAR) < size(TALLY) * 3 / 4);
}
