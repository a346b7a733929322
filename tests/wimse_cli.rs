//! `tally wimse verify` and `tally wimse sign`, run as a user would: the
//! draft's example, a check named when it fails, exit codes 0/1/64, and a
//! WPT signed by the CLI verified by the CLI.

mod support;

use std::io::Write as _;
use std::process::{Command, Output, Stdio};
use support::NOW;
use support::wimse::*;
use tally::jose::{Ed25519SigningKey, JwsSigner};

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap()
}

fn tally_with_stdin(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn at(name: &str) -> String {
    format!("@{}", data_path(name))
}

/// `tally wimse verify` on the draft's WIT and WPT, plus `extra`.
fn verify_draft(extra: &[&str]) -> Output {
    let (wit, wpt, jwks) = (at("wit.jwt"), at("wpt.jwt"), data_path("issuer.jwks.json"));
    let mut args = vec![
        "wimse", "verify", "--wit", &wit, "--wpt", &wpt, "--url", DRAFT_URL, "--jwks", &jwks,
    ];
    args.extend_from_slice(extra);
    tally(&args)
}

#[test]
fn the_draft_example_verifies_check_by_check() {
    let token = at("access_token.txt");
    let o = verify_draft(&[
        "--access-token",
        &token,
        "--now",
        "1745509000",
        "--max-lifetime",
        "20m",
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    let ok = out.lines().filter(|l| l.starts_with("  ok    ")).count();
    assert_eq!(ok, 8 + 11, "{out}");
    assert!(out.contains("ok    ath matches the access token"), "{out}");
    assert!(!out.contains("FAIL"), "{out}");
    assert!(
        out.contains("VALID: sub=wimse://example.com/specific-workload"),
        "{out}"
    );
    assert!(out.contains("jti=__bwc4ESC3acc2LTC1-_x"), "{out}");
    assert!(out.contains("replay: not checked"), "{out}");
}

#[test]
fn after_the_wpt_expires_the_exp_check_fails_and_the_rest_is_not_reached() {
    let token = at("access_token.txt");
    let after = (DRAFT_WPT_EXP + 30 + 1).to_string();
    let o = verify_draft(&[
        "--access-token",
        &token,
        "--now",
        &after,
        "--max-lifetime",
        "20m",
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains(
            "FAIL  exp not passed and within the maximum lifetime: WPT expired at 1745510016"
        ),
        "{out}"
    );
    assert!(
        out.contains("--    wth matches the WIT (not reached)"),
        "{out}"
    );
    assert!(out.contains("INVALID: WPT: WPT expired"), "{out}");
}

#[test]
fn without_the_access_token_the_draft_wpt_fails_on_ath() {
    let o = verify_draft(&["--now", "1745509000", "--max-lifetime", "20m"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("FAIL  ath matches the access token (absent without one): ath is present but no access token was sent"),
        "{out}"
    );
}

#[test]
fn with_the_default_maximum_lifetime_the_draft_wpt_lives_too_long() {
    let token = at("access_token.txt");
    let o = verify_draft(&["--access-token", &token, "--now", "1745509000"]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(
        out.contains("is more than 300s (plus leeway) after now"),
        "{out}"
    );
}

#[test]
fn a_failed_wit_leaves_every_wpt_check_not_reached() {
    let token = at("access_token.txt");
    let o = verify_draft(&[
        "--access-token",
        &token,
        "--now",
        "1745509000",
        "--require-spiffe",
    ]);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(1), "{out}");
    assert!(out.contains("FAIL  sub is an absolute URI"), "{out}");
    let wpt_part = out.split("Workload Proof Token (WPT)").nth(1).unwrap();
    assert_eq!(wpt_part.matches("(not reached)").count(), 11, "{out}");
    assert!(
        out.contains("INVALID: WIT: sub is not a SPIFFE ID"),
        "{out}"
    );
}

#[test]
fn the_wpt_can_come_on_standard_input() {
    let (wit, jwks, token) = (
        at("wit.jwt"),
        data_path("issuer.jwks.json"),
        at("access_token.txt"),
    );
    let o = tally_with_stdin(
        &[
            "wimse",
            "verify",
            "--wit",
            &wit,
            "--wpt",
            "-",
            "--url",
            DRAFT_URL,
            "--jwks",
            &jwks,
            "--access-token",
            &token,
            "--now",
            "1745509000",
            "--max-lifetime",
            "1200s",
        ],
        &data("wpt.jwt"),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
}

/// Runs `tally` with `args` (split on spaces; `JWKS`, `KEY` and `WIT`
/// stand for the draft's files) and expects exit 64.
fn usage_error(args: &str) {
    let (jwks, key, wit) = (
        data_path("issuer.jwks.json"),
        data_path("workload.jwk.json"),
        at("wit.jwt"),
    );
    let args: Vec<&str> = args
        .split(' ')
        .map(|a| match a {
            "JWKS" => jwks.as_str(),
            "KEY" => key.as_str(),
            "WIT" => wit.as_str(),
            "WIT-FILE" => &wit[1..],
            other => other,
        })
        .collect();
    let o = tally(&args);
    assert_eq!(
        o.status.code(),
        Some(64),
        "{args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn verify_usage_errors_exit_64() {
    let url = DRAFT_URL;
    for args in [
        // An unreadable file, as a value or as the key set.
        format!("wimse verify --wit @/nonexistent/wit --wpt x --url {url} --jwks JWKS"),
        format!("wimse verify --wit x --wpt x --url {url} --jwks /nonexistent.json"),
        // A bad duration, a bad URL, an unknown flag, a missing flag.
        format!("wimse verify --wit x --wpt x --url {url} --jwks JWKS --max-lifetime soon"),
        "wimse verify --wit x --wpt x --url ftp://x/ --jwks JWKS".to_owned(),
        format!("wimse verify --wit x --wpt x --url {url} --jwks JWKS --nope"),
        format!("wimse verify --wit x --url {url} --jwks JWKS"),
        // Two values from standard input; a header that is not one.
        format!("wimse verify --wit - --wpt - --url {url} --jwks JWKS"),
        format!("wimse verify --wit x --wpt x --url {url} --jwks JWKS --header no-colon"),
        // A key-set file that is no JWKS.
        format!("wimse verify --wit x --wpt x --url {url} --jwks WIT-FILE"),
    ] {
        usage_error(&args);
    }
}

#[test]
fn sign_usage_errors_exit_64() {
    let url = DRAFT_URL;
    for args in [
        format!("wimse sign --key /nonexistent.pem --wit x --url {url}"),
        // A key file that is no key, a WIT that is no WIT.
        format!("wimse sign --key JWKS --wit WIT --url {url}"),
        format!("wimse sign --key KEY --wit not-a-wit --url {url}"),
        format!("wimse sign --key KEY --wit WIT --url {url} --lifetime 0s"),
        format!("wimse sign --key KEY --wit WIT --url {url} --header no-colon"),
    ] {
        usage_error(&args);
    }
}

#[test]
fn sign_with_the_draft_workload_key_makes_a_wpt_verify_accepts() {
    let (key, wit, jwks, token) = (
        data_path("workload.jwk.json"),
        at("wit.jwt"),
        data_path("issuer.jwks.json"),
        at("access_token.txt"),
    );
    let o = tally(&[
        "wimse",
        "sign",
        "--key",
        &key,
        "--wit",
        &wit,
        "--url",
        "https://workload.example.com/path?x=1",
        "--access-token",
        &token,
        "--header",
        "X-Tenant: acme",
        "--now",
        "1745509000",
        "--lifetime",
        "1m",
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let wpt = stdout(&o).trim().to_owned();
    let verify = |extra: &[&str]| {
        let mut args = vec![
            "wimse",
            "verify",
            "--wit",
            &wit,
            "--wpt",
            &wpt,
            "--url",
            DRAFT_URL,
            "--jwks",
            &jwks,
            "--access-token",
            &token,
            "--now",
            "1745509030",
        ];
        args.extend_from_slice(extra);
        tally(&args)
    };
    let o = verify(&["--header", "x-tenant:  acme "]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let o = verify(&["--header", "x-tenant: other"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("FAIL  oth entries match their headers"));
}

#[test]
fn sign_refuses_a_key_that_is_not_the_wits() {
    let dir = tempfile::tempdir().unwrap();
    let pem = dir.path().join("other.pem");
    std::fs::write(
        &pem,
        Ed25519SigningKey::generate()
            .unwrap()
            .to_pkcs8_pem()
            .unwrap()
            .as_bytes(),
    )
    .unwrap();
    let wit = at("wit.jwt");
    let o = tally(&[
        "wimse",
        "sign",
        "--key",
        pem.to_str().unwrap(),
        "--wit",
        &wit,
        "--url",
        DRAFT_URL,
    ]);
    assert_eq!(o.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is not the WIT's cnf.jwk"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn sign_and_verify_an_es256_pair_from_pem_files() {
    // A tally-style WIT for an ES256 workload key, its issuer's JWKS and
    // the workload key as PKCS#8 PEM (as `tally dpop keygen` writes).
    let fx = WimseFixture::new();
    let wit = fx.wit();
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("workload.pem");
    std::fs::write(&key, fx.workload.to_pkcs8_pem().unwrap().as_bytes()).unwrap();
    let mut jwk: serde_json::Value =
        serde_json::from_str(&fx.issuer.verifying_key().to_jwk_json()).unwrap();
    jwk["kid"] = WIT_KID.into();
    jwk["use"] = "wit-svid".into();
    let jwks = dir.path().join("bundle.json");
    std::fs::write(&jwks, serde_json::json!({"keys": [jwk]}).to_string()).unwrap();
    let wit_file = dir.path().join("wit.jwt");
    std::fs::write(&wit_file, &wit).unwrap();
    let wit_arg = format!("@{}", wit_file.display());
    let now = NOW.to_string();
    let o = tally(&[
        "wimse",
        "sign",
        "--key",
        key.to_str().unwrap(),
        "--wit",
        &wit_arg,
        "--url",
        support::URL,
        "--now",
        &now,
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let wpt = stdout(&o).trim().to_owned();
    let o = tally_with_stdin(
        &[
            "wimse",
            "verify",
            "--wit",
            &wit_arg,
            "--wpt",
            "-",
            "--url",
            support::URL,
            "--jwks",
            jwks.to_str().unwrap(),
            "--now",
            &now,
            "--require-spiffe",
        ],
        &wpt,
    );
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}");
    assert!(out.contains("(a SPIFFE ID)"), "{out}");
    assert!(out.contains("alg=ES256"), "{out}");
}
