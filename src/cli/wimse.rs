//! `tally wimse verify|sign`: a WIT and the WPT sent with it checked step
//! by step, or a WPT signed by hand.

use super::checks::{read_limited, report, rfc3339};
use super::{CliError, SecretArg, arg_file_or_stdin, wall_clock_now};
use crate::dpop::NormalizedUri;
use crate::jose::jws::{ES256_OR_EDDSA, Jws, Limits};
use crate::jose::{AnySigningKey, JwsSigner, VerifyingKey};
use crate::wimse::WitKeys;
use crate::wimse::keys::MAX_WIT_JWKS_LEN;
use crate::wimse::wit::{self, WitCheck, WitConfig};
use crate::wimse::wpt::{self, WptCheck, WptConfig, WptContext, WptInput};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

/// WIMSE commands.
#[derive(Debug, Subcommand)]
pub enum WimseCommand {
    /// Verify a Workload Identity Token and the Workload Proof Token sent
    /// with it, printing every check (the WIT's, then the WPT's). Exit 0
    /// valid, 1 invalid, 64 bad usage.
    Verify(VerifyArgs),
    /// Sign a Workload Proof Token for one request with the workload's
    /// key (the one the WIT's cnf.jwk names), for testing by hand.
    Sign(SignArgs),
}

/// Arguments of `tally wimse verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The WIT (the Workload-Identity-Token header value): the token,
    /// `@FILE`, or `-` for standard input.
    #[arg(long)]
    wit: SecretArg,
    /// The WPT (the Workload-Proof-Token header value, or what follows
    /// `WPT ` in Authorization): the token, `@FILE`, or `-`.
    #[arg(long)]
    wpt: SecretArg,
    /// The absolute request URL the WPT came with (query and fragment are
    /// ignored).
    #[arg(long)]
    url: String,
    /// JWKS file of the keys a WIT may be signed with (EC P-256 or OKP
    /// Ed25519; members whose use is sig, wit-svid or absent).
    #[arg(long)]
    jwks: PathBuf,
    /// The access token sent with the WPT (the WPT's ath must then match
    /// it; without one, an ath is refused): the token, `@FILE`, or `-`.
    #[arg(long)]
    access_token: Option<SecretArg>,
    /// The Txn-Token header's value (tth must then match it; without one,
    /// a tth is refused): the token, `@FILE`, or `-`.
    #[arg(long)]
    txn_token: Option<SecretArg>,
    /// A request header the WPT's oth may bind, as "Name: value"; repeat
    /// for several.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// Verify as of this Unix time instead of the wall clock.
    #[arg(long)]
    now: Option<u64>,
    /// The longest lifetime a WPT may claim: its exp at most this far
    /// after now (plus 30 s leeway), e.g. 300s or 20m.
    #[arg(long, default_value = "5m")]
    max_lifetime: String,
    /// Refuse a WIT whose sub is not a SPIFFE ID.
    #[arg(long)]
    require_spiffe: bool,
}

/// Arguments of `tally wimse sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// The workload's private key file: PKCS#8 PEM (P-256 for ES256, or
    /// Ed25519 for EdDSA) or a private JWK (JSON with d). It must be the
    /// WIT's cnf.jwk.
    #[arg(long)]
    key: PathBuf,
    /// The WIT the WPT goes with (its hash is wth): the token, `@FILE`, or
    /// `-`.
    #[arg(long)]
    wit: SecretArg,
    /// The request URL (its query and fragment are left out of aud).
    #[arg(long)]
    url: String,
    /// Access token to bind (adds ath): the token, `@FILE`, or `-`.
    #[arg(long)]
    access_token: Option<SecretArg>,
    /// Txn-Token to bind (adds tth): the token, `@FILE`, or `-`.
    #[arg(long)]
    txn_token: Option<SecretArg>,
    /// A request header to bind in oth, as "Name: value"; repeat for
    /// several.
    #[arg(long = "header", value_name = "NAME: VALUE")]
    headers: Vec<String>,
    /// How long the WPT is valid (its exp is now plus this), e.g. 60s.
    #[arg(long, default_value = "60s")]
    lifetime: String,
    /// Sign as of this Unix time instead of the wall clock.
    #[arg(long)]
    now: Option<u64>,
}

pub(super) fn run(cmd: WimseCommand) -> Result<ExitCode, CliError> {
    match cmd {
        WimseCommand::Verify(args) => verify(&args),
        WimseCommand::Sign(args) => sign(&args),
    }
}

fn verify(args: &VerifyArgs) -> Result<ExitCode, CliError> {
    one_stdin(&[
        Some(&args.wit),
        Some(&args.wpt),
        args.access_token.as_ref(),
        args.txn_token.as_ref(),
    ])?;
    let wit_text = arg_file_or_stdin(args.wit.expose())?;
    let wpt_text = arg_file_or_stdin(args.wpt.expose())?;
    let access_token = optional_input(args.access_token.as_ref())?;
    let txn_token = optional_input(args.txn_token.as_ref())?;
    let uri = NormalizedUri::parse(&args.url)
        .map_err(|e| CliError::Usage(format!("--url {:?}: {e}", args.url)))?;
    let bytes = read_limited(&args.jwks, MAX_WIT_JWKS_LEN as u64 + 1)?;
    let keys = WitKeys::parse(&bytes)
        .map_err(|e| CliError::Usage(format!("{}: {e}", args.jwks.display())))?;
    let max_lifetime = duration("--max-lifetime", &args.max_lifetime)?;
    let headers = parse_headers(&args.headers)?;
    let now = args.now.unwrap_or_else(wall_clock_now);

    let wit_config = WitConfig {
        require_spiffe: args.require_spiffe,
        ..WitConfig::default()
    };
    say!("Workload Identity Token (WIT)");
    let mut passed = Vec::new();
    let wit_result = wit::verify(&wit_text, &keys, now, &wit_config, &mut passed);
    report(&WitCheck::ALL, &passed, wit_result.as_ref().err());
    say!("Workload Proof Token (WPT)");
    let verified_wit = match wit_result {
        Ok(wit) => wit,
        Err(e) => {
            report(&WptCheck::ALL, &[], None::<&String>);
            say!("INVALID: WIT: {e}");
            return Ok(ExitCode::from(super::EXIT_NO));
        }
    };
    let ctx = WptContext {
        wit: &verified_wit,
        uri: &uri,
        access_token: access_token.as_deref(),
        txn_token: txn_token.as_deref(),
        headers: &headers,
    };
    let wpt_config = WptConfig {
        max_lifetime,
        ..WptConfig::default()
    };
    let mut passed = Vec::new();
    let wpt_result = wpt::verify(&wpt_text, &ctx, now, &wpt_config, &mut passed);
    report(&WptCheck::ALL, &passed, wpt_result.as_ref().err());
    say!("replay: not checked (a one-shot verification has no replay cache)");
    match wpt_result {
        Ok(wpt) => {
            say!(
                "VALID: sub={} ({}) jkt={} alg={} wit_exp={}; wpt jti={} exp={}",
                verified_wit.sub,
                if verified_wit.spiffe_id.is_some() {
                    "a SPIFFE ID"
                } else {
                    "not a SPIFFE ID"
                },
                verified_wit.jkt,
                verified_wit.alg,
                rfc3339(verified_wit.exp),
                wpt.jti,
                rfc3339(wpt.exp)
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            say!("INVALID: WPT: {e}");
            Ok(ExitCode::from(super::EXIT_NO))
        }
    }
}

fn sign(args: &SignArgs) -> Result<ExitCode, CliError> {
    one_stdin(&[
        Some(&args.wit),
        args.access_token.as_ref(),
        args.txn_token.as_ref(),
    ])?;
    let bytes = zeroize::Zeroizing::new(read_limited(&args.key, 16 * 1024)?);
    let key = AnySigningKey::load(&bytes)
        .map_err(|e| CliError::Usage(format!("{}: {e}", args.key.display())))?;
    let wit_text = arg_file_or_stdin(args.wit.expose())?;
    check_key_is_the_wits(&wit_text, &key)?;
    let access_token = optional_input(args.access_token.as_ref())?;
    let txn_token = optional_input(args.txn_token.as_ref())?;
    NormalizedUri::parse(&args.url)
        .map_err(|e| CliError::Usage(format!("--url {:?}: {e}", args.url)))?;
    let lifetime = duration("--lifetime", &args.lifetime)?;
    let headers = parse_headers(&args.headers)?;
    let other: Vec<(&str, &str)> = headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    let input = WptInput {
        aud: &args.url,
        wit: &wit_text,
        access_token: access_token.as_deref(),
        txn_token: txn_token.as_deref(),
        other: &other,
        lifetime,
    };
    let token = wpt::mint(&key, &input, args.now.unwrap_or_else(wall_clock_now))
        .map_err(|e| CliError::Failed(e.to_string()))?;
    say!("{token}");
    Ok(ExitCode::SUCCESS)
}

/// A WPT signed with another key than the WIT's `cnf.jwk` can never
/// verify: say so now rather than print one. The WIT is read, not
/// verified (its issuer key is not needed to sign).
fn check_key_is_the_wits(wit_text: &str, key: &AnySigningKey) -> Result<(), CliError> {
    let jws = Jws::parse_with(wit_text, &Limits::default(), ES256_OR_EDDSA)
        .map_err(|e| CliError::Usage(format!("--wit is not a WIT: {e}")))?;
    let jwk = jws
        .payload()
        .get("cnf")
        .and_then(|cnf| cnf.get("jwk"))
        .ok_or_else(|| CliError::Usage("--wit has no cnf.jwk".into()))?;
    let bound =
        VerifyingKey::from_jwk(jwk).map_err(|e| CliError::Usage(format!("--wit cnf.jwk: {e}")))?;
    if bound.thumbprint() != key.thumbprint() {
        return Err(CliError::Usage(format!(
            "--key (jkt {}) is not the WIT's cnf.jwk (jkt {})",
            key.thumbprint(),
            bound.thumbprint()
        )));
    }
    let alg = jwk.get("alg").and_then(serde_json::Value::as_str);
    if alg != Some(key.alg().as_str()) {
        return Err(CliError::Usage(format!(
            "the WIT's cnf.jwk.alg is {alg:?}, but --key signs {}",
            key.alg()
        )));
    }
    Ok(())
}

/// Standard input can be read once: at most one value may be `-`.
fn one_stdin(values: &[Option<&SecretArg>]) -> Result<(), CliError> {
    let dashes = values
        .iter()
        .flatten()
        .filter(|v| v.expose() == "-")
        .count();
    if dashes > 1 {
        return Err(CliError::Usage(
            "only one value can be read from standard input (-)".into(),
        ));
    }
    Ok(())
}

fn optional_input(value: Option<&SecretArg>) -> Result<Option<String>, CliError> {
    value.map(|v| arg_file_or_stdin(v.expose())).transpose()
}

/// A whole number of seconds, at least one, like `300s` or `20m`.
fn duration(flag: &str, text: &str) -> Result<u64, CliError> {
    humantime::parse_duration(text)
        .ok()
        .map(|d| d.as_secs())
        .filter(|secs| *secs > 0)
        .ok_or_else(|| CliError::Usage(format!("{flag} {text:?} is not a duration like 5m")))
}

/// `Name: value` pairs; the name is a header field name, the value is
/// kept as given (`oth` hashes it with spaces trimmed).
fn parse_headers(headers: &[String]) -> Result<Vec<(String, String)>, CliError> {
    headers
        .iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| CliError::Usage(format!("--header {h:?} is not \"Name: value\"")))?;
            let name = name.trim();
            let is_token = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
            if !is_token {
                return Err(CliError::Usage(format!(
                    "--header {h:?}: {name:?} is not a header field name"
                )));
            }
            Ok((name.to_ascii_lowercase(), value.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_headers_are_checked() {
        assert_eq!(duration("--lifetime", "20m").unwrap(), 1200);
        assert!(duration("--lifetime", "0s").is_err());
        assert!(duration("--lifetime", "soon").is_err());
        assert_eq!(
            parse_headers(&["X-User: a b ".into()]).unwrap(),
            vec![("x-user".to_owned(), " a b ".to_owned())]
        );
        assert!(parse_headers(&["no colon".into()]).is_err());
        assert!(parse_headers(&["bad name: v".into()]).is_err());
    }
}
