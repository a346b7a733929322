//! What the binary writes for people and tools besides its answers: log
//! lines (text without colour when stderr is not a terminal, or JSON lines
//! with `TALLY_LOG_FORMAT=json`), shell completion scripts and manual pages.

mod support;

use std::process::{Command, Stdio};
use support::broker::EPHEMERAL_PORTS;
use support::process::{Lines, PATIENCE, finish_within, output_within, terminate};

/// Starts `tally broker` with stderr piped and `env`, waits until it
/// listens, stops it, and returns what it logged.
fn broker_log(env: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_tally"));
    command
        .args(["broker", "--trust-domain", "example.org"])
        .args(EPHEMERAL_PORTS)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .env_remove("NO_COLOR")
        .env_remove("TALLY_LOG_FORMAT")
        .env("TALLY_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (name, value) in env {
        command.env(name, value);
    }
    let mut child = command.spawn().unwrap();
    let mut out = Lines::of(child.stdout.take().unwrap());
    out.wait_for("admin", PATIENCE);
    terminate(&child);
    let o = finish_within(child, PATIENCE);
    assert_eq!(o.status.code(), Some(0));
    let log = String::from_utf8(o.stderr).unwrap();
    assert!(log.lines().count() >= 3, "it logged: {log}");
    log
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let log = broker_log(&[]);
    assert!(!log.contains("\x1b["), "{log}");
    assert!(log.contains(" INFO "), "{log}");
}

#[test]
fn json_log_lines_each_parse_as_one_object() {
    let log = broker_log(&[("TALLY_LOG_FORMAT", "json")]);
    let mut levels = std::collections::BTreeSet::new();
    for line in log.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}"));
        assert!(v["timestamp"].is_string(), "{line}");
        assert!(v["fields"].is_object() && v["target"].is_string(), "{line}");
        levels.insert(v["level"].as_str().unwrap().to_owned());
    }
    assert!(
        levels.contains("INFO") && levels.contains("DEBUG"),
        "{levels:?}"
    );
    assert!(!log.contains("\x1b["), "{log}");
}

#[test]
fn a_log_setting_the_binary_cannot_honour_is_refused_not_ignored() {
    for (name, value, said) in [
        (
            "TALLY_LOG_FORMAT",
            "xml",
            "TALLY_LOG_FORMAT \"xml\" must be text or json",
        ),
        (
            "TALLY_LOG",
            "tally=loud",
            "TALLY_LOG \"tally=loud\" is not a valid filter",
        ),
    ] {
        let o = output_within(
            Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(["dpop", "keygen"])
                .env(name, value),
            PATIENCE,
        );
        assert_eq!(o.status.code(), Some(64), "{name}={value}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(said), "{err}");
        assert!(o.stdout.is_empty(), "nothing ran");
    }
}

fn tally(args: &[&str]) -> String {
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally")).args(args),
        PATIENCE,
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn completion_scripts_name_the_subcommands_and_bash_reads_its_own() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let script = tally(&["completions", shell]);
        for name in ["broker", "sidecar", "ctl", "completions", "man"] {
            assert!(script.contains(name), "{shell} script lacks {name}");
        }
        // Flags of nested subcommands are completed too.
        assert!(script.contains("trust-domain"), "{shell}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tally.bash");
    std::fs::write(&path, tally(&["completions", "bash"])).unwrap();
    let check = output_within(Command::new("bash").arg("-n").arg(&path), PATIENCE);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally")).args(["completions", "tcsh"]),
        PATIENCE,
    );
    assert_eq!(o.status.code(), Some(64));
}

/// The first roff request of a page, after clap_mangen's string
/// definitions (`.ie`/`.el`, which set up the apostrophe).
fn first_request(page: &str) -> &str {
    page.lines()
        .find(|l| !l.starts_with(".ie ") && !l.starts_with(".el "))
        .unwrap()
}

#[test]
fn manual_pages_are_roff_for_tally_and_each_subcommand() {
    let page = tally(&["man"]);
    assert!(first_request(&page).starts_with(".TH tally 1"), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"), "{page}");
    for name in ["broker", "sidecar", "ctl", "completions"] {
        assert!(page.contains(&format!("tally\\-{name}")), "{name} missing");
    }
    let broker = tally(&["man", "broker"]);
    let title = first_request(&broker);
    assert!(title.starts_with(".TH tally-broker 1"), "{title}");
    assert!(title.contains(env!("CARGO_PKG_VERSION")), "{title}");
    assert!(broker.contains("trust\\-domain"), "{broker}");
    let policy = tally(&["man", "ctl", "policy"]);
    assert!(first_request(&policy).starts_with(".TH tally-ctl-policy 1"));
    let o = output_within(
        Command::new(env!("CARGO_BIN_EXE_tally")).args(["man", "nope"]),
        PATIENCE,
    );
    assert_eq!(o.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no such command \"nope\""));
}
