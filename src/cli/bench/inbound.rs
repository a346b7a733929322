//! `tally bench inbound`: `wrk` against a trivial upstream directly, then
//! through the sidecar's inbound proxy with a valid token and a fresh,
//! pre-signed DPoP proof on every request (a Lua script hands them out),
//! so every proxied request is fully verified, replay check included.

use super::common::{AUDIENCE, cpu_seconds, failed, start_broker};
use super::sidecar::{
    Memory, client_token, durations, join_token, jwks, memory_kib, mib, mint_proofs, pinned,
    runtime, start_sidecar, upstream,
};
use crate::cli::CliError;
use crate::dpop::ProofKey;
use clap::Args;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Arguments of `tally bench inbound`.
#[derive(Debug, Args)]
pub struct InboundArgs {
    /// wrk connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// wrk threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// How long each wrk run lasts (at most 20 s: the pre-signed proofs
    /// must stay within the sidecar's 30 s proof age limit).
    #[arg(long, default_value = "15s")]
    duration: String,
    /// Proxy to this app (e.g. an nginx) instead of the built-in trivial
    /// upstream; the direct run goes there too.
    #[arg(long, value_name = "HOST:PORT")]
    upstream: Option<std::net::SocketAddr>,
    /// Run the sidecar on this core only (`taskset -c`).
    #[arg(long, value_name = "CORE")]
    sidecar_cpu: Option<usize>,
    /// Run wrk on this core only (`taskset -c`).
    #[arg(long, value_name = "CORE")]
    wrk_cpu: Option<usize>,
    /// Write the bench token (`token.txt`), the broker's JWKS
    /// (`jwks.json`), its issuer (`issuer.txt`) and the audience
    /// (`audience.txt`) here, so other proxies can be measured with the
    /// same token in the same run (`scripts/bench-mesh`).
    #[arg(long, value_name = "DIR")]
    save: Option<std::path::PathBuf>,
    /// The in-mesh hop instead of wrk: TLS 1.3 and HTTP/2 with a bench
    /// client's SVID as client certificate and a token bound to its key,
    /// no per-request proof. `--connections` connections, `--streams`
    /// requests in flight on each.
    #[arg(long)]
    mtls: bool,
    /// With `--mtls`: requests in flight on each connection.
    #[arg(long, default_value_t = 8, requires = "mtls")]
    streams: usize,
    /// Through this Envoy instead of the inbound proxy: its ext_authz
    /// filter calls the sidecar (docs/envoy/envoy.yaml), both on
    /// `--sidecar-cpu`; the CPU per request counts both.
    #[arg(long, value_name = "ENVOY", conflicts_with = "mtls")]
    envoy: Option<std::path::PathBuf>,
}

pub(super) fn run_inbound(args: &InboundArgs) -> Result<ExitCode, CliError> {
    let d = durations(&[("--duration", &args.duration)])?;
    if args.connections == 0
        || args.threads == 0
        || args.streams == 0
        || d[0].is_zero()
        || d[0] > Duration::from_secs(40)
    {
        return Err(CliError::Usage(
            "--connections, --threads and --streams above zero, --duration from 1s to 40s".into(),
        ));
    }
    runtime()?.block_on(inbound(args, d[0]))
}

/// The wrk script: each thread takes every Nth pre-signed proof, one per
/// request.
fn wrk_script(proofs: &Path, token: &str, threads: usize) -> String {
    format!(
        r#"local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end
local proofs = {{}}
local n = 0
function init(args)
  local i = 0
  for line in io.lines("{}") do
    if i % {threads} == id then proofs[#proofs + 1] = line end
    i = i + 1
  end
end
function request()
  n = n + 1
  local proof = proofs[n] or "exhausted"
  return wrk.format("GET", "/bench/hello", {{ ["Authorization"] = "DPoP {token}", ["DPoP"] = proof }})
end
"#,
        proofs.display()
    )
}

/// Writes what another proxy needs to check the same token: the token
/// (owner-only), the JWKS, the issuer and the audience.
fn save_for_peers(dir: &Path, token: &str, jwks: &str, issuer: &str) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(dir).map_err(|e| failed(&dir.display().to_string(), e))?;
    for (name, text, mode) in [
        ("token.txt", token, 0o600),
        ("jwks.json", jwks, 0o644),
        ("issuer.txt", issuer, 0o644),
        ("audience.txt", AUDIENCE, 0o644),
    ] {
        let path = dir.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| failed(&path.display().to_string(), e))?;
    }
    Ok(())
}

/// The sidecar's CPU per request and its memory, idle and under load.
fn report_sidecar(
    cpu: Option<(f64, f64)>,
    requests: u64,
    duration: Duration,
    idle: Option<Memory>,
    loaded: Option<Memory>,
) {
    if let Some((c0, c1)) = cpu
        && requests > 0
    {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let per = (c1 - c0) * 1e6 / requests as f64;
        say!(
            "  sidecar CPU: {per:.0} µs per verified request ({:.2} cores busy)",
            (c1 - c0) / duration.as_secs_f64()
        );
    }
    if let (Some(idle), Some(now)) = (idle, loaded) {
        say!(
            "  sidecar memory: {} idle ({} anonymous), {} under load ({} anonymous), {} peak",
            mib(idle.rss),
            mib(idle.anon),
            mib(now.rss),
            mib(now.anon),
            mib(now.peak)
        );
    }
}

/// What wrk reported.
#[derive(Debug, Default)]
struct WrkRun {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    non_2xx: u64,
    errors: String,
}

/// wrk's latency text (`512.00us`, `1.20ms`, `1.01s`) in milliseconds.
fn wrk_ms(text: &str) -> Option<f64> {
    let (number, factor) = if let Some(n) = text.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1000.0)
    } else {
        return None;
    };
    number.parse::<f64>().ok().map(|n| n * factor)
}

fn parse_wrk(out: &str) -> WrkRun {
    let mut run = WrkRun::default();
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Requests/sec:"), Some(v)) => run.rate = v.parse().unwrap_or(0.0),
            (Some("50%"), Some(v)) => run.p50_ms = wrk_ms(v).unwrap_or(0.0),
            (Some("99%"), Some(v)) => run.p99_ms = wrk_ms(v).unwrap_or(0.0),
            (Some("Non-2xx"), _) => {
                run.non_2xx = line
                    .rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0);
            }
            (Some("Socket"), Some("errors:")) => run.errors = line.to_owned(),
            (Some(n), Some("requests")) => run.requests = n.parse().unwrap_or(0),
            _ => {}
        }
    }
    run
}

async fn wrk(
    args: &InboundArgs,
    duration: Duration,
    url: &str,
    script: Option<&Path>,
) -> Result<WrkRun, CliError> {
    let mut command = pinned(args.wrk_cpu, Path::new("wrk"));
    command
        .arg(format!("-t{}", args.threads))
        .arg(format!("-c{}", args.connections))
        .arg(format!("-d{}s", duration.as_secs().max(1)))
        .arg("--latency");
    if let Some(script) = script {
        command.arg("-s").arg(script);
    }
    command.arg(url);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .map_err(|e| failed("running wrk", e))?
        .map_err(|e| failed("running wrk (install it: apt-get install wrk)", e))?;
    if !output.status.success() {
        return Err(CliError::Failed(format!(
            "wrk failed: {}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    Ok(parse_wrk(&String::from_utf8_lossy(&output.stdout)))
}

pub(super) async fn inbound(args: &InboundArgs, duration: Duration) -> Result<ExitCode, CliError> {
    let dir = crate::cli::ScratchDir::new("bench")?;
    let data = dir.path().join("data");
    let (_broker, addr, issuer) = start_broker(dir.path())?;
    let (app, _app_stop) = match args.upstream {
        Some(app) => (app, None),
        None => {
            let (app, stop) = upstream().await?;
            (app, Some(stop))
        }
    };
    let token = join_token(&addr, &data, AUDIENCE).await?;
    let started = Instant::now();
    let via_envoy = args.envoy.is_some();
    let sidecar = start_sidecar(
        dir.path(),
        &addr,
        &token,
        (!via_envoy).then_some(app),
        via_envoy,
        args.sidecar_cpu,
    )?;
    let pid = sidecar.child.id();
    let idle = memory_kib(pid);
    let envoy = match (&args.envoy, sidecar.ext_authz) {
        (Some(bin), Some(ext_authz)) => {
            Some(super::envoy::start(bin, dir.path(), app, ext_authz, args.sidecar_cpu).await?)
        }
        _ => None,
    };
    // Where wrk sends: the inbound proxy, or Envoy in front of ext_authz.
    let inbound = match &envoy {
        Some(envoy) => envoy.addr,
        None => sidecar
            .inbound
            .ok_or_else(|| CliError::Failed("the sidecar has no inbound listener".into()))?,
    };
    let envoy_pid = envoy.as_ref().map(|e| e.child.id());
    // The sidecar's CPU, and Envoy's with it when Envoy checks through it.
    let cpu = move || {
        let sidecar = cpu_seconds(pid)?;
        match envoy_pid {
            Some(envoy) => Some(sidecar + cpu_seconds(envoy)?),
            None => Some(sidecar),
        }
    };

    if args.mtls {
        let peer = super::mesh::Peer::attest(&addr, &data).await?;
        let url = format!("https://{inbound}/bench/hello");
        let cpu0 = cpu_seconds(pid);
        let run = super::mesh::drive(
            &peer,
            inbound,
            &url,
            args.connections,
            args.streams,
            duration,
        )
        .await?;
        let cpu1 = cpu_seconds(pid);
        let loaded = memory_kib(pid);
        let direct = wrk(args, duration, &format!("http://{app}/bench/hello"), None).await?;
        say!(
            "tally bench inbound --mtls: {} connections × {} streams, TLS 1.3 + HTTP/2 with the client's SVID, {:.0} s",
            args.connections,
            args.streams,
            run.took.as_secs_f64()
        );
        say!(
            "  direct to the upstream (wrk -c{}):{:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
            args.connections,
            direct.rate,
            direct.p50_ms,
            direct.p99_ms
        );
        say!(
            "  through the inbound proxy:{:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  (every request verified, no proof)",
            run.rate(),
            run.ms(0.5),
            run.ms(0.99)
        );
        report_sidecar(cpu0.zip(cpu1), run.ok + run.refused, duration, idle, loaded);
        say!(
            "  refused through the proxy: {} of {}{}",
            run.refused,
            run.ok + run.refused,
            run.first_refusal
                .as_deref()
                .map(|r| format!(" (first: {r})"))
                .unwrap_or_default()
        );
        return Ok(if run.refused == 0 && run.ok > 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        });
    }

    // A token for the client, and a fresh proof for every request wrk can
    // send in the run (20,000/s is above what two cores verify).
    let key = ProofKey::generate().map_err(|e| failed("a client key", e))?;
    let access = client_token(&addr, &issuer, &data, &key).await?;
    if let Some(save) = &args.save {
        let jwks = jwks(&addr, &data).await?;
        save_for_peers(save, &access, &jwks, &issuer)?;
    }
    let url = format!("http://{inbound}/bench/hello");
    let count = usize::try_from(duration.as_secs()).unwrap_or(20) * 20_000;
    // A sidecar that just started takes a proof made before its start plus
    // the clock skew (5 s) only with a nonce it issued (the restart rule):
    // the pre-signed proofs must be made after that window, to the second.
    let fresh_window = Duration::from_secs(7);
    tokio::time::sleep(fresh_window.saturating_sub(started.elapsed())).await;
    let minting = Instant::now();
    let proofs = mint_proofs(&key, &url, &access, count)?;
    let proofs_file = dir.path().join("proofs.txt");
    std::fs::write(&proofs_file, proofs.join("\n") + "\n")
        .map_err(|e| failed("writing proofs", e))?;
    drop(proofs);
    let script = dir.path().join("dpop.lua");
    std::fs::write(&script, wrk_script(&proofs_file, &access, args.threads))
        .map_err(|e| failed("writing the wrk script", e))?;
    let minted_in = minting.elapsed();

    // Through the proxy first (the proofs are fresh), then direct.
    let cpu0 = cpu();
    let proxied = wrk(args, duration, &url, Some(&script)).await?;
    let cpu1 = cpu();
    let loaded = memory_kib(pid);
    let direct = wrk(args, duration, &format!("http://{app}/bench/hello"), None).await?;

    say!(
        "tally bench inbound: wrk -t{} -c{} -d{}s, {}, {count} pre-signed proofs (made in {:.1} s)",
        args.threads,
        args.connections,
        duration.as_secs(),
        if args.upstream.is_some() {
            format!("upstream {app}")
        } else {
            "trivial upstream".to_owned()
        },
        minted_in.as_secs_f64()
    );
    say!(
        "  direct to the upstream:   {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
        direct.rate,
        direct.p50_ms,
        direct.p99_ms
    );
    say!(
        "  through {}:{:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  (every request verified)",
        if via_envoy {
            "Envoy + ext_authz"
        } else {
            "the inbound proxy"
        },
        proxied.rate,
        proxied.p50_ms,
        proxied.p99_ms
    );
    say!(
        "  added by the proxy: p50 {:+.3} ms, p99 {:+.3} ms",
        proxied.p50_ms - direct.p50_ms,
        proxied.p99_ms - direct.p99_ms
    );
    if via_envoy {
        say!("  (the CPU below is Envoy's and the sidecar's together; the memory the sidecar's)");
    }
    report_sidecar(cpu0.zip(cpu1), proxied.requests, duration, idle, loaded);
    say!(
        "  refused through the proxy: {} of {} ({})",
        proxied.non_2xx,
        proxied.requests,
        if proxied.errors.is_empty() {
            "no socket errors"
        } else {
            &proxied.errors
        }
    );
    Ok(if proxied.non_2xx == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrk_output_is_read() {
        let out = "Running 10s test @ http://127.0.0.1:1/\n  1 threads and 32 connections\n  Latency Distribution\n     50%  512.00us\n     75%    1.00ms\n     90%    2.10ms\n     99%    1.20s\n  98765 requests in 10.00s, 1.00MB read\n  Non-2xx or 3xx responses: 12\nRequests/sec:   9876.50\n";
        let run = parse_wrk(out);
        assert_eq!(run.requests, 98_765);
        assert_eq!(run.non_2xx, 12);
        assert!((run.rate - 9876.5).abs() < 1e-9);
        assert!((run.p50_ms - 0.512).abs() < 1e-9);
        assert!((run.p99_ms - 1200.0).abs() < 1e-9);
    }
}
