//! `tally bench authorize`: N clients on a sidecar's local socket, each
//! asking `POST /v1/authorize` in a loop (a fresh proof per call).

use super::common::{AUDIENCE, CLIENT, cpu_seconds, failed, percentile, start_broker};
use super::sidecar::{durations, join_token, memory_kib, mib, runtime, start_sidecar};
use crate::cli::CliError;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt as _, Full};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Arguments of `tally bench authorize`.
#[derive(Debug, Args)]
pub struct AuthorizeArgs {
    /// Concurrent clients, each with its own socket connection.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Load before measuring (not counted).
    #[arg(long, default_value = "2s")]
    warmup: String,
}

pub(super) fn run_authorize(args: &AuthorizeArgs) -> Result<ExitCode, CliError> {
    let d = durations(&[("--duration", &args.duration), ("--warmup", &args.warmup)])?;
    if args.clients == 0 || d[0].is_zero() {
        return Err(CliError::Usage(
            "--clients and --duration must be above zero".into(),
        ));
    }
    runtime()?.block_on(authorize(args, d[1], d[0]))
}

async fn authorize(
    args: &AuthorizeArgs,
    warmup: Duration,
    duration: Duration,
) -> Result<ExitCode, CliError> {
    let dir = crate::cli::ScratchDir::new("bench")?;
    let (_broker, addr, _issuer) = start_broker(dir.path())?;
    let token = join_token(&addr, &dir.path().join("data"), CLIENT).await?;
    let sidecar = start_sidecar(dir.path(), &addr, &token, None, false, None)?;
    let pid = sidecar.child.id();
    let idle = memory_kib(pid);

    let start = Instant::now();
    let (measure_from, until) = (start + warmup, start + warmup + duration);
    let mut clients = Vec::new();
    for _ in 0..args.clients {
        clients.push(tokio::spawn(authorize_client(
            sidecar.socket.clone(),
            measure_from,
            until,
        )));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = cpu_seconds(pid);
    tokio::time::sleep_until(until.into()).await;
    let cpu1 = cpu_seconds(pid);
    let mut latencies = Vec::new();
    let mut errors = 0u64;
    for c in clients {
        let (l, e) = c.await.map_err(|e| failed("a client", e))??;
        latencies.extend(l);
        errors += e;
    }
    let loaded = memory_kib(pid);
    latencies.sort_unstable();
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rate = latencies.len() as f64 / duration.as_secs_f64();
    say!(
        "tally bench authorize: {} clients on the sidecar's socket, {} s warm-up, {} s measured",
        args.clients,
        warmup.as_secs_f64(),
        duration.as_secs_f64()
    );
    say!(
        "  /v1/authorize answered: {}  =  {rate:.0}/s",
        latencies.len()
    );
    say!(
        "  latency µs:  p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        percentile(&latencies, 0.50) * 1000.0,
        percentile(&latencies, 0.90) * 1000.0,
        percentile(&latencies, 0.99) * 1000.0,
        percentile(&latencies, 0.999) * 1000.0,
        percentile(&latencies, 1.0) * 1000.0
    );
    if let (Some(c0), Some(c1)) = (cpu0, cpu1)
        && !latencies.is_empty()
    {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let per = (c1 - c0) * 1e6 / latencies.len() as f64;
        say!(
            "  sidecar CPU: {per:.0} µs per call ({:.2} cores busy)",
            (c1 - c0) / duration.as_secs_f64()
        );
    }
    if let (Some(idle), Some(now)) = (idle, loaded) {
        say!(
            "  sidecar memory: {} idle ({} anonymous), {} after ({} anonymous), {} peak",
            mib(idle.rss),
            mib(idle.anon),
            mib(now.rss),
            mib(now.anon),
            mib(now.peak)
        );
    }
    say!("  errors: {errors}");
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// One client: a keep-alive connection asking for headers in a loop.
/// Returns measured latencies (µs) and the number of failures.
async fn authorize_client(
    socket: PathBuf,
    measure_from: Instant,
    until: Instant,
) -> Result<(Vec<u32>, u64), CliError> {
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .map_err(|e| failed("connecting to the sidecar", e))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| failed("HTTP with the sidecar", e))?;
    tokio::spawn(conn);
    let body = Bytes::from(
        serde_json::json!({
            "method": "GET",
            "url": "http://server.bench.tally/bench/hello",
            "audience": AUDIENCE,
            "scope": "bench:read",
        })
        .to_string(),
    );
    let (mut latencies, mut errors) = (Vec::new(), 0);
    while Instant::now() < until {
        let request = http::Request::post("/v1/authorize")
            .header(http::header::HOST, "tally")
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body.clone()))
            .map_err(|e| failed("a request", e))?;
        let started = Instant::now();
        let ok = match sender.send_request(request).await {
            Ok(response) => {
                let ok = response.status() == http::StatusCode::OK;
                ok & response.into_body().collect().await.is_ok()
            }
            Err(_) => false,
        };
        if !ok {
            errors += 1;
            if sender.ready().await.is_err() {
                break;
            }
            continue;
        }
        if started >= measure_from {
            let micros = started.elapsed().as_micros();
            latencies.push(u32::try_from(micros).unwrap_or(u32::MAX));
        }
    }
    Ok((latencies, errors))
}
