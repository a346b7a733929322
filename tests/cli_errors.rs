//! What a newcomer sees when something is wrong, run through the binary:
//! the exit code says what kind of trouble it is (README "Exit codes"),
//! and the message says what to change, in the broker's own words or
//! naming the flag or file at fault.

mod support;

use std::process::{Command, Output};
use support::broker::Spawned;
use support::ctl::{ctl, text};
use support::process::{PATIENCE, output_within};

fn tally(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tally"));
    c.args(args).env("NO_COLOR", "1");
    c
}

fn run(command: &mut Command) -> Output {
    output_within(command, PATIENCE)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A loopback port nothing listens on (bound, then let go).
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn an_injector_without_settings_exits_64_and_unreachable_sidecar_exits_69() {
    let o = run(&mut tally(&["injector"]));
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(stderr(&o).contains("sa_audience: give"), "{}", stderr(&o));

    let dir = tempfile::tempdir().unwrap();
    let o = run(tally(&["client", "identity", "--socket"]).arg(dir.path().join("none.sock")));
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("cannot reach the sidecar"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_points_at_the_exit_code_table() {
    let o = run(&mut tally(&["--help"]));
    assert_eq!(o.status.code(), Some(0));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("69 sidecar or broker unreachable"), "{out}");
    assert!(out.contains("README.md, section \"Exit codes\""), "{out}");
}

#[test]
fn ctl_against_a_stopped_broker_exits_69_and_plain_http_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // The admin credential exists; the broker does not listen any more.
    let (code, _) = Spawned::start(&data).stop();
    assert_eq!(code, Some(0));
    let gone = format!("https://localhost:{}", closed_port());
    let ctl_at =
        |url: &str| run(tally(&["ctl", "keys", "list", "--broker", url, "--data-dir"]).arg(&data));
    let o = ctl_at(&gone);
    assert_eq!(o.status.code(), Some(69), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("cannot reach the broker at {gone}")),
        "{}",
        stderr(&o)
    );

    let plain = gone.replace("https://", "http://");
    let o = ctl_at(&plain);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!("--broker {plain}: the broker speaks only https")),
        "{}",
        stderr(&o)
    );
    let o = run(&mut tally(&[
        "sidecar",
        "--broker",
        &plain,
        "--trust-bundle",
        "b.pem",
        "--join-token",
        "x",
    ]));
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("the broker speaks only https"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn a_refusal_reads_as_the_brokers_sentence_with_ttls_in_human_form() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let broker = Spawned::start(&data);
    let id = "spiffe://example.org/ns/shop/sa/checkout";
    let o = ctl(
        &broker,
        &data,
        &["join-token", "create", "--spiffe-id", id, "--ttl", "48h"],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("the broker refused: ttl 48h is longer than the 24h maximum"),
        "{err}"
    );
    let o = ctl(
        &broker,
        &data,
        &[
            "join-token",
            "create",
            "--spiffe-id",
            "spiffe://elsewhere.org/x",
        ],
    );
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = stderr(&o);
    assert!(err.contains("the broker refused: "), "{err}");
    // tonic's boilerplate and its enum names stay out of it.
    for noise in ["Client specified", "InvalidArgument", "The system is not"] {
        assert!(!err.contains(noise), "{err}");
    }
}

#[test]
fn another_brokers_bundle_is_a_configuration_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    let _first = Spawned::start(&one);
    let second = Spawned::start(&two);
    let url = format!("https://{}", second.grpc.replace("127.0.0.1", "localhost"));
    let bundle = one.join("bundle.pem");

    // ctl with broker one's credential and bundle, pointed at broker two.
    let o = run(tally(&["ctl", "keys", "list", "--broker", &url, "--data-dir"]).arg(&one));
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "trust bundle {} is not the bundle of the broker at {url}",
            bundle.display()
        )),
        "{err}"
    );
    // In words, not the TLS library's variant names.
    assert!(
        err.contains("this bundle does not hold")
            && !err.contains("UnknownIssuer")
            && !err.contains("BadSignature"),
        "{err}"
    );

    // A sidecar does not retry forever: it stops and names the file.
    let token = String::from_utf8(
        second
            .ctl(
                &two,
                &[
                    "join-token",
                    "create",
                    "--spiffe-id",
                    "spiffe://example.org/ns/a/sa/b",
                ],
            )
            .stdout,
    )
    .unwrap();
    let o = run(tally(&["sidecar", "--broker", &url, "--trust-bundle"])
        .arg(&bundle)
        .arg("--socket")
        .arg(dir.path().join("s.sock"))
        .env("TALLY_JOIN_TOKEN", token.trim()));
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "--trust-bundle {} is not the bundle of the broker at {url}",
            bundle.display()
        )),
        "{err}"
    );
    assert!(
        !err.contains(token.trim()),
        "the join token stays out: {err}"
    );
}

#[test]
fn a_broker_port_in_use_names_the_flag() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    for flag in ["--grpc-listen", "--http-listen", "--admin-listen"] {
        let mut c = tally(&["broker", "--trust-domain", "example.org"]);
        for other in ["--grpc-listen", "--http-listen", "--admin-listen"] {
            let at = if other == flag {
                addr.as_str()
            } else {
                "127.0.0.1:0"
            };
            c.args([other, at]);
        }
        let o = run(c.arg("--data-dir").arg(dir.path().join(&flag[2..])));
        assert_eq!(o.status.code(), Some(64), "{flag}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("{flag} {addr}: address already in use")),
            "{}",
            stderr(&o)
        );
    }
}

#[test]
fn a_sidecar_listener_in_use_names_the_flag_and_a_live_socket_is_not_taken() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live.sock");
    let _other = std::os::unix::net::UnixListener::bind(&live).unwrap();
    let bundle = dir.path().join("bundle.pem");
    std::fs::write(&bundle, "not used before the listeners are bound").unwrap();
    let sidecar = |socket: &std::path::Path, extra: &[&str]| {
        let mut c = tally(&[
            "sidecar",
            "--broker",
            &format!("https://localhost:{}", closed_port()),
        ]);
        c.arg("--trust-bundle")
            .arg(&bundle)
            .arg("--socket")
            .arg(socket);
        c.args(extra).env("TALLY_JOIN_TOKEN", "unused");
        run(&mut c)
    };
    let free = dir.path().join("free.sock");
    for (flag, extra) in [
        (
            "--inbound-listen",
            &[
                "--inbound-listen",
                &addr,
                "--upstream",
                "127.0.0.1:1",
                "--admin-listen",
                "off",
            ][..],
        ),
        (
            "--outbound-listen",
            &["--outbound-listen", &addr, "--admin-listen", "off"][..],
        ),
        ("--admin-listen", &["--admin-listen", &addr][..]),
    ] {
        let o = sidecar(&free, extra);
        assert_eq!(o.status.code(), Some(64), "{flag}: {}", stderr(&o));
        assert!(
            stderr(&o).contains(&format!("{flag} {addr}: address already in use")),
            "{}",
            stderr(&o)
        );
    }
    let o = sidecar(&live, &["--admin-listen", "off"]);
    assert_eq!(o.status.code(), Some(64), "{}", stderr(&o));
    assert!(
        stderr(&o).contains(&format!(
            "--socket {}: address already in use",
            live.display()
        )),
        "{}",
        stderr(&o)
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&live).is_ok(),
        "the other process keeps its socket"
    );
}
