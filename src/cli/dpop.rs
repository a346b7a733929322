//! `tally dpop verify|sign|keygen`.

use super::checks::{read_limited, report, rfc3339};
use super::{CliError, arg_or_stdin, wall_clock_now};
use crate::dpop::NormalizedUri;
use crate::dpop::proof::{
    self, NonceRule, ProofCheck, ProofConfig, ProofContext, ProofKey, TokenHash,
};
use crate::jose::SigningKey;
use crate::token::access::{self, TokenCheck, TokenConfig};
use crate::token::{Audience, Jwks};
use clap::{Args, Subcommand};
use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

/// DPoP commands.
#[derive(Debug, Subcommand)]
pub enum DpopCommand {
    /// Verify a DPoP proof (and optionally its access token), printing
    /// every check. Exit 0 valid, 1 invalid, 64 bad usage.
    Verify(VerifyArgs),
    /// Sign a DPoP proof with a key file, for testing by hand.
    Sign(SignArgs),
    /// Generate a P-256 DPoP key (PKCS#8 PEM). With --out, standard output
    /// is the key's jkt (RFC 7638 thumbprint) alone; without, the key (the
    /// jkt goes to standard error).
    Keygen {
        /// Write the key here (mode 0600; refuses to overwrite) instead of
        /// standard output, and print its jkt.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

/// Arguments of `tally dpop verify`.
#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// The proof (the DPoP header value), or `-` for standard input.
    #[arg(long)]
    proof: String,
    /// The request method, e.g. GET.
    #[arg(long)]
    method: String,
    /// The absolute request URL.
    #[arg(long)]
    url: String,
    /// The access token sent with the proof. Without --jwks it is treated
    /// as opaque: only `ath` is checked against it.
    #[arg(long)]
    token: Option<super::SecretArg>,
    /// JWKS file whose keys may sign the token; turns on token verification.
    #[arg(long, requires_all = ["token", "issuer", "audience"])]
    jwks: Option<PathBuf>,
    /// Expected token issuer (with --jwks).
    #[arg(long, requires = "jwks")]
    issuer: Option<String>,
    /// Expected token audience: this workload (with --jwks).
    #[arg(long, requires = "jwks")]
    audience: Option<String>,
    /// Require exactly this nonce in the proof.
    #[arg(long)]
    nonce: Option<String>,
    /// Verify as of this Unix time instead of the wall clock.
    #[arg(long)]
    now: Option<u64>,
    /// Accepted iat distance from now, in seconds, both ways.
    #[arg(long, default_value_t = 60)]
    window: u64,
}

/// Arguments of `tally dpop sign`.
#[derive(Debug, Args)]
pub struct SignArgs {
    /// PKCS#8 PEM private key file (from `tally dpop keygen`).
    #[arg(long)]
    key: PathBuf,
    /// The request method.
    #[arg(long)]
    method: String,
    /// The request URL (query and fragment are left out of htu).
    #[arg(long)]
    url: String,
    /// Access token to bind the proof to (adds ath).
    #[arg(long)]
    token: Option<super::SecretArg>,
    /// Server nonce to include.
    #[arg(long)]
    nonce: Option<String>,
    /// Sign as of this Unix time instead of the wall clock.
    #[arg(long)]
    now: Option<u64>,
}

pub(super) fn run(cmd: DpopCommand) -> Result<ExitCode, CliError> {
    match cmd {
        DpopCommand::Verify(args) => verify(&args),
        DpopCommand::Sign(args) => sign(&args),
        DpopCommand::Keygen { out } => keygen(out),
    }
}

fn verify(args: &VerifyArgs) -> Result<ExitCode, CliError> {
    let proof_text = arg_or_stdin(&args.proof)?;
    let token_text = args
        .token
        .as_ref()
        .map(|t| arg_or_stdin(t.expose()))
        .transpose()?;
    let uri = NormalizedUri::parse(&args.url)
        .map_err(|e| CliError::Usage(format!("--url {:?}: {e}", args.url)))?;
    let now = args.now.unwrap_or_else(wall_clock_now);

    // The token first: its cnf.jkt is what the proof key must match.
    let mut expected_jkt = None;
    if let (Some(token), Some(jwks_path)) = (&token_text, &args.jwks) {
        let jwks = read_jwks(jwks_path)?;
        let audience: Audience = args
            .audience
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| CliError::Usage(format!("--audience: {e}")))?;
        let config = TokenConfig::new(args.issuer.clone().unwrap_or_default(), audience);
        say!("access token");
        let mut passed = Vec::new();
        let result = access::verify(token, &jwks, &config, now, &mut passed);
        report(&TokenCheck::ALL, &passed, result.as_ref().err());
        match result {
            Ok(claims) => {
                say!(
                    "  token: sub={} jti={} scope=\"{}\" exp={}",
                    claims.sub,
                    claims.jti,
                    claims.scope,
                    rfc3339(claims.exp)
                );
                expected_jkt = Some(claims.jkt);
            }
            Err(e) => {
                say!("INVALID: access token: {e}");
                return Ok(ExitCode::from(1));
            }
        }
    }

    let hash = token_text.as_deref().map(TokenHash::of);
    let ctx = ProofContext {
        method: &args.method,
        uri: &uri,
        token_hash: hash.as_ref(),
        expected_jkt: expected_jkt.as_ref(),
        nonce: args
            .nonce
            .as_deref()
            .map_or(NonceRule::NotRequired, NonceRule::Exact),
        keys: None,
    };
    let config = ProofConfig {
        max_age: args.window,
        max_skew: args.window,
        ..ProofConfig::default()
    };
    say!("DPoP proof");
    let mut passed = Vec::new();
    let result = proof::verify(&proof_text, &ctx, &config, now, &mut passed);
    let applicable: Vec<ProofCheck> = ProofCheck::ALL
        .into_iter()
        .filter(|c| match c {
            ProofCheck::Ath => hash.is_some(),
            ProofCheck::KeyBinding => expected_jkt.is_some(),
            ProofCheck::Nonce => args.nonce.is_some(),
            _ => true,
        })
        .collect();
    report(&applicable, &passed, result.as_ref().err());
    if token_text.is_some() && args.jwks.is_none() {
        say!(
            "note: the access token itself was NOT verified (no --jwks): it was treated as opaque and only ath was checked against it"
        );
    }
    if token_text.is_none() {
        say!("note: no --token given, so ath and the key binding were not checked");
    }
    say!("replay: not checked (a one-shot verification has no replay cache)");
    match result {
        Ok(p) => {
            say!(
                "VALID: proof jti={} iat={} jkt={}",
                p.jti,
                rfc3339(p.iat),
                p.jkt
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            say!("INVALID: DPoP proof: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn read_jwks(path: &std::path::Path) -> Result<Jwks, CliError> {
    let bytes = read_limited(path, crate::token::jwks::MAX_JWKS_LEN as u64 + 1)?;
    Jwks::parse(&bytes).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

fn sign(args: &SignArgs) -> Result<ExitCode, CliError> {
    let pem = zeroize::Zeroizing::new(read_limited(&args.key, 16 * 1024)?);
    let key = SigningKey::from_pkcs8_pem(&pem)
        .map_err(|e| CliError::Usage(format!("{}: {e}", args.key.display())))?;
    let token = args
        .token
        .as_ref()
        .map(|t| arg_or_stdin(t.expose()))
        .transpose()?;
    NormalizedUri::parse(&args.url)
        .map_err(|e| CliError::Usage(format!("--url {:?}: {e}", args.url)))?;
    let proof = ProofKey::new(key)
        .mint(
            &args.method,
            &args.url,
            token.as_deref(),
            args.nonce.as_deref(),
            args.now.unwrap_or_else(wall_clock_now),
        )
        .map_err(|e| CliError::Failed(e.to_string()))?;
    say!("{proof}");
    Ok(ExitCode::SUCCESS)
}

fn keygen(out: Option<PathBuf>) -> Result<ExitCode, CliError> {
    let key = SigningKey::generate().map_err(|e| CliError::Failed(e.to_string()))?;
    let pem = key
        .to_pkcs8_pem()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    // Stdout carries one thing a script can capture: the key itself, or
    // with --out the jkt alone (`JKT=$(tally dpop keygen --out k.pem)`).
    match out {
        Some(path) => {
            super::write_new_file(&path, pem.as_bytes(), 0o600)?;
            eprintln!("wrote {}", path.display());
            eprintln!("jwk: {}", key.public_key().to_jwk_json());
            say!("{}", key.thumbprint());
        }
        None => {
            std::io::stdout()
                .write_all(pem.as_bytes())
                .map_err(|e| CliError::Failed(format!("writing the key: {e}")))?;
            eprintln!("jkt: {}", key.thumbprint());
            eprintln!("jwk: {}", key.public_key().to_jwk_json());
        }
    }
    Ok(ExitCode::SUCCESS)
}
