//! The `tally` binary, run as a user would: exit codes and output.

mod support;

use std::process::{Command, Output};
use support::*;

const FIGURE_13: &str = "eyJ0eXAiOiJkcG9wK2p3dCIsImFsZyI6IkVTMjU2IiwiandrIjp7Imt0eSI6IkVDIiwieCI6Imw4dEZyaHgtMzR0VjNoUklDUkRZOXpDa0RscEJoRjQyVVFVZldWQVdCRnMiLCJ5IjoiOVZFNGpmX09rX282NHpiVFRsY3VOSmFqSG10NnY5VERWclUwQ2R2R1JEQSIsImNydiI6IlAtMjU2In19.eyJqdGkiOiJlMWozVl9iS2ljOC1MQUVCIiwiaHRtIjoiR0VUIiwiaHR1IjoiaHR0cHM6Ly9yZXNvdXJjZS5leGFtcGxlLm9yZy9wcm90ZWN0ZWRyZXNvdXJjZSIsImlhdCI6MTU2MjI2MjYxOCwiYXRoIjoiZlVIeU8ycjJaM0RaNTNFc05yV0JiMHhXWG9hTnk1OUlpS0NBcWtzbVFFbyJ9.2oW9RP35yRqzhrtNP86L-Ey71EOptxRimPPToA1plemAgR6pxHF8y6-yqyVnmcw6Fy1dqd-jfxSYoMxhAJpLjA";

fn tally(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn dpop_verify_accepts_the_rfc_proof_and_says_the_token_was_opaque() {
    let o = tally(&[
        "dpop",
        "verify",
        "--proof",
        FIGURE_13,
        "--method",
        "GET",
        "--url",
        "https://resource.example.org/protectedresource",
        "--token",
        "Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU",
        "--now",
        "1562262618",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    let out = stdout(&o);
    assert!(out.contains("ok    ath matches the access token"));
    assert!(out.contains("NOT verified"));
    assert!(out.contains("VALID"));
}

#[test]
fn dpop_verify_names_the_failed_check_and_exits_1() {
    let o = tally(&[
        "dpop",
        "verify",
        "--proof",
        FIGURE_13,
        "--method",
        "GET",
        "--url",
        "https://resource.example.org/elsewhere",
        "--now",
        "1562262618",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let out = stdout(&o);
    assert!(out.contains("FAIL  htu matches the request URI"));
    assert!(out.contains("(not reached)"));
    assert!(out.contains("INVALID"));
}

#[test]
fn dpop_verify_checks_a_real_token_against_a_jwks_file() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, fx.jwks.to_json().to_string()).unwrap();
    let token = fx.token();
    let proof = fx.proof(token.expose());
    let now = NOW.to_string();
    let base = [
        "dpop",
        "verify",
        "--proof",
        &proof,
        "--method",
        "POST",
        "--url",
        URL,
        "--token",
        token.expose(),
        "--jwks",
        jwks.to_str().unwrap(),
        "--issuer",
        ISSUER,
        "--now",
        &now,
    ];
    let o = tally(&[&base[..], &["--audience", SERVICE]].concat());
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    assert!(stdout(&o).contains("ok    proof key thumbprint matches the token's cnf.jkt"));
    let o = tally(&[&base[..], &["--audience", "spiffe://example.org/ns/x/sa/y"]].concat());
    assert_eq!(o.status.code(), Some(1));
    assert!(stdout(&o).contains("FAIL  aud includes the expected audience"));
}

#[test]
fn bad_usage_exits_64() {
    assert_eq!(
        tally(&["dpop", "verify", "--method", "GET"]).status.code(),
        Some(64)
    );
    assert_eq!(tally(&["no-such-command"]).status.code(), Some(64));
    let o = tally(&[
        "dpop", "verify", "--proof", "x", "--method", "GET", "--url", "ftp://x",
    ]);
    assert_eq!(o.status.code(), Some(64));
    // --jwks needs --issuer and --audience.
    let o = tally(&[
        "dpop",
        "verify",
        "--proof",
        "x",
        "--method",
        "GET",
        "--url",
        "https://a/",
        "--token",
        "t",
        "--jwks",
        "f",
    ]);
    assert_eq!(o.status.code(), Some(64));
}

#[test]
fn the_injector_without_its_settings_and_unknown_commands_are_usage_errors() {
    let o = tally(&["injector"]);
    assert_eq!(o.status.code(), Some(64), "settings missing: EX_USAGE");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("image: give"), "{err}");
    let o = tally(&["ctl", "reveiw"]);
    assert_eq!(o.status.code(), Some(64), "a typo is not a missing feature");
}

#[test]
fn the_demo_runs_every_step_and_exits_0() {
    let o = tally(&["demo"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("Summary: all 10 checks went as described"),
        "{out}"
    );
    assert_eq!(out.matches("✓").count(), 10, "{out}");
    assert!(
        out.contains("the hop between the sidecars was mtls"),
        "{out}"
    );
    // Tokens and proofs are only ever shown shortened.
    for line in out.lines() {
        for word in line.split_whitespace() {
            assert!(
                !(word.starts_with("eyJ") && word.len() > 40),
                "a whole token in the output: {line}"
            );
        }
    }
    // Its scratch directory is gone.
    let dir = out
        .split("embedded SQLite store in ")
        .nth(1)
        .and_then(|rest| rest.split(')').next())
        .unwrap();
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}

#[test]
fn sidecar_settings_errors_are_all_reported_with_exit_64() {
    let o = tally(&[
        "sidecar",
        "--broker",
        "http://localhost:8443",
        "--inbound-listen",
        "127.0.0.1:0",
        "--admin-listen",
        "nowhere",
    ]);
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    for expected in [
        "the broker speaks only https",
        "trust_bundle",
        "--join-token",
        "admin_listen \"nowhere\"",
        "inbound_listen needs upstream",
    ] {
        assert!(err.contains(expected), "{expected} missing from: {err}");
    }
}

#[test]
fn keygen_sign_and_verify_round_trip_by_hand() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("dpop.pem");
    let k = key.to_str().unwrap();
    let made = tally(&["dpop", "keygen", "--out", k]);
    assert_eq!(made.status.code(), Some(0));
    // Stdout is the jkt alone, so `JKT=$(tally dpop keygen --out k.pem)`
    // captures it; the rest went to stderr.
    let jkt = stdout(&made);
    let pem = std::fs::read(&key).unwrap();
    let thumbprint = tally::jose::SigningKey::from_pkcs8_pem(&pem)
        .unwrap()
        .thumbprint()
        .to_string();
    assert_eq!(jkt, format!("{thumbprint}\n"));
    assert!(String::from_utf8_lossy(&made.stderr).contains("wrote "));
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // Never overwrites a key.
    assert_eq!(
        tally(&["dpop", "keygen", "--out", k]).status.code(),
        Some(64)
    );
    let o = tally(&[
        "dpop",
        "sign",
        "--key",
        k,
        "--method",
        "GET",
        "--url",
        "https://api.example/x?y=1",
        "--token",
        "tok",
        "--now",
        "1800000000",
    ]);
    assert_eq!(o.status.code(), Some(0));
    let proof = stdout(&o).trim().to_owned();
    let o = tally(&[
        "dpop",
        "verify",
        "--proof",
        &proof,
        "--method",
        "GET",
        "--url",
        "https://API.example:443/x",
        "--token",
        "tok",
        "--now",
        "1800000010",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stdout(&o));
    // Times in RFC 3339 UTC, as everywhere in the CLI's messages.
    assert!(
        stdout(&o).contains("VALID: proof jti=")
            && stdout(&o).contains(" iat=2027-01-15T08:00:00Z jkt="),
        "{}",
        stdout(&o)
    );
}

#[test]
fn token_inspect_marks_output_unverified() {
    let fx = Fixture::new();
    let token = fx.token();
    let o = tally(&["token", "inspect", token.expose()]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out.starts_with("UNVERIFIED"));
    assert!(out.contains(CALLER));
    assert!(out.contains("exp 1800000300 = 2027-01-15T08:05:00Z"));
    assert_eq!(tally(&["token", "inspect", "a.b"]).status.code(), Some(64));
}

const POLICY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/policy.yaml");
const CHECKOUT: &str = "spiffe://example.org/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://example.org/ns/pay/sa/payments";

#[test]
fn policy_check_lists_the_wit_rules_of_a_policy_that_has_some() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wit.yaml");
    let fixture = std::fs::read_to_string(POLICY).unwrap();
    std::fs::write(
        &file,
        format!("{fixture}wit:\n  - from: {CHECKOUT}\n    ttl: 10m\n  - from: spiffe://example.org/ns/*/sa/*\n"),
    )
    .unwrap();
    let o = tally(&["ctl", "policy", "check", file.to_str().unwrap()]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let out = stdout(&o);
    let lines = fixture.lines().count();
    assert!(
        out.contains(&format!(
            "  wit (line {}): {CHECKOUT} for up to 10m",
            lines + 2
        )),
        "{out}"
    );
    assert!(
        out.contains("spiffe://example.org/ns/*/sa/* for up to 1h"),
        "{out}"
    );
    // The fixture has none, and says nothing of WITs.
    let o = tally(&["ctl", "policy", "check", POLICY]);
    assert!(!stdout(&o).contains("wit"), "{}", stdout(&o));

    std::fs::write(
        &file,
        format!("{fixture}wit:\n  - from: {CHECKOUT}\n    ttl: 2d\n"),
    )
    .unwrap();
    let o = tally(&["ctl", "policy", "check", file.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("wit.yaml:{}:10: ttl:", lines + 3)),
        "{err}"
    );
}

#[test]
fn policy_check_accepts_a_good_file_and_lists_every_error_of_a_bad_one() {
    let o = tally(&["ctl", "policy", "check", POLICY]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("2 issue rules, 2 access rules"));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "trust_domain: example.org\nissue:\n  - from: spiffe://example.org/a\n    to: x y\n    scope: [a]\n").unwrap();
    let o = tally(&["ctl", "policy", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(64));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.yaml:3:5: issue rule is missing required key \"scopes\""),
        "{err}"
    );
    assert!(err.contains("bad.yaml:4:9:"), "{err}");
    assert!(err.contains("bad.yaml:5:5: unknown key \"scope\""), "{err}");
}

#[test]
fn policy_explain_names_the_rule_and_exits_by_verdict() {
    let explain = |extra: &[&str]| {
        let base = [
            "ctl", "policy", "explain", "--policy", POLICY, "--from", CHECKOUT, "--to", PAYMENTS,
        ];
        tally(&[&base[..], extra].concat())
    };
    let o = explain(&["--scope", "payments:charge"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(
        stdout(&o).contains("ALLOW: rule at line 7"),
        "{}",
        stdout(&o)
    );
    let o = explain(&["--scope", "payments:refund"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).contains("DENY: scope payments:refund is not granted"),
        "{}",
        stdout(&o)
    );
    let o = explain(&[
        "--scope",
        "payments:charge",
        "--method",
        "POST",
        "--path",
        "/v1/charges/ch_1",
    ]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("ALLOW: the allow entry at line"));
}

/// Every compact JWS (a token or a DPoP proof) in `bytes`: `eyJ` (the
/// base64url of `{"`) followed by three dot-separated base64url segments
/// of at least 16 characters each.
fn jws_in(bytes: &[u8]) -> Vec<String> {
    let b64 = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_';
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(at) = bytes[i..].windows(3).position(|w| w == b"eyJ") {
        let start = i + at;
        let mut end = start;
        let mut segments = vec![0usize];
        while end < bytes.len() && (b64(bytes[end]) || bytes[end] == b'.') {
            if bytes[end] == b'.' {
                segments.push(0);
            } else {
                *segments.last_mut().unwrap() += 1;
            }
            end += 1;
        }
        if segments.len() == 3 && segments.iter().all(|n| *n >= 16) {
            found.push(String::from_utf8_lossy(&bytes[start..end]).into_owned());
        }
        i = end.max(start + 1);
    }
    found
}

#[test]
fn the_scan_finds_a_token_when_there_is_one() {
    let token = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJzcGlmZmU6Ly90ZC94In0.c2lnbmF0dXJlc2lnbmF0dXJl";
    let text = format!("log line: authorization=DPoP {token}\n");
    assert_eq!(jws_in(text.as_bytes()), [token]);
    assert!(jws_in(b"eyJhbGciOiJFUzI1NiJ9 is only a header").is_empty());
}

#[test]
fn no_token_proof_or_private_key_lands_in_the_demos_logs_audit_or_store() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("demo-data");
    let o = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["demo", "--data-dir"])
        .arg(&data)
        // Everything the demo logs, at the most verbose level.
        .env("TALLY_LOG", "trace")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );
    assert!(o.stderr.len() > 1000, "the log is really there");
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("stdout".into(), o.stdout.clone()),
        ("the log (stderr)".into(), o.stderr.clone()),
    ];
    for entry in std::fs::read_dir(&data).unwrap() {
        let entry = entry.unwrap();
        // Regular files (the sidecars' sockets live here too).
        if entry.file_type().unwrap().is_file() {
            let path = entry.path();
            places.push((path.display().to_string(), std::fs::read(&path).unwrap()));
        }
    }
    let names: Vec<&str> = places.iter().map(|(n, _)| n.as_str()).collect();
    assert!(names.iter().any(|n| n.ends_with("tally.db")), "{names:?}");
    assert!(
        names.iter().any(|n| n.ends_with("audit.jsonl")),
        "{names:?}"
    );
    let audit = std::fs::read_to_string(data.join("audit.jsonl")).unwrap();
    assert!(
        audit.contains("\"kind\":\"token.issue\""),
        "tokens were issued"
    );
    assert!(
        audit.contains("\"kind\":\"token.verify_failure\""),
        "and refused"
    );
    for (name, bytes) in &places {
        let found = jws_in(bytes);
        assert!(
            found.is_empty(),
            "{name} holds {} token(s) or proof(s), e.g. {:.40}…",
            found.len(),
            found[0]
        );
        assert!(
            !bytes.windows(11).any(|w| w == b"PRIVATE KEY"),
            "{name} holds a private key"
        );
    }
}
