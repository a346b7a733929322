//! `tally bench authorize` and `tally bench inbound`: load on a sidecar
//! process started for the run (next to a broker process), measured from
//! the outside, with the sidecar's CPU time and resident memory read from
//! `/proc`.
//!
//! - `authorize`: N clients on the local socket, each asking
//!   `POST /v1/authorize` in a loop (a fresh proof per call).
//! - `inbound`: `wrk` against a trivial upstream directly, then through
//!   the sidecar's inbound proxy with a valid token and a fresh,
//!   pre-signed DPoP proof on every request (a Lua script hands them out),
//!   so every proxied request is fully verified, replay check included.

use super::CliError;
use super::bench::{
    AUDIENCE, CLIENT, client_identity, cpu_seconds, failed, percentile, start_broker,
};
use crate::clock::{Clock, SystemClock};
use crate::dpop::ProofKey;
use crate::proto::v1 as pb;
use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt as _, Full};
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
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
}

fn durations(pairs: &[(&str, &str)]) -> Result<Vec<Duration>, CliError> {
    pairs
        .iter()
        .map(|(flag, text)| {
            humantime::parse_duration(text)
                .map_err(|e| CliError::Usage(format!("{flag} {text:?}: {e}")))
        })
        .collect()
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    // One thread: the load generator takes as little of the machine from
    // the sidecar as it can.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed("starting the runtime", e))
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

pub(super) fn run_inbound(args: &InboundArgs) -> Result<ExitCode, CliError> {
    let d = durations(&[("--duration", &args.duration)])?;
    if args.connections == 0
        || args.threads == 0
        || d[0].is_zero()
        || d[0] > Duration::from_secs(40)
    {
        return Err(CliError::Usage(
            "--connections and --threads above zero, --duration from 1s to 40s".into(),
        ));
    }
    runtime()?.block_on(inbound(args, d[0]))
}

/// The sidecar process; killed when dropped.
struct SidecarProcess {
    child: std::process::Child,
    socket: PathBuf,
    inbound: Option<SocketAddr>,
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A join token for `id`, from the broker's Admin API.
async fn join_token(addr: &str, data: &Path, id: &str) -> Result<String, CliError> {
    let read = |p: &str| std::fs::read_to_string(data.join(p)).map_err(|e| failed(p, e));
    let admin =
        tonic::transport::Identity::from_pem(read("admin/cert.pem")?, read("admin/key.pem")?);
    let channel = super::bench::channel(addr, &read("bundle.pem")?, admin).await?;
    let reply = pb::admin_client::AdminClient::new(channel)
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: id.into(),
            ttl_seconds: 600,
        })
        .await
        .map_err(|e| failed("creating a join token", e.message()))?;
    Ok(reply.into_inner().join_token)
}

/// Starts `tally sidecar` for `id` and waits until it says it is ready.
fn start_sidecar(
    dir: &Path,
    broker: &str,
    token: &str,
    upstream: Option<SocketAddr>,
) -> Result<SidecarProcess, CliError> {
    // Its own copy of the binary: code pages the broker process faulted
    // in are not mapped into the sidecar, so its resident memory is its own.
    let exe = dir.join("tally-sidecar");
    std::fs::copy(
        std::env::current_exe().map_err(|e| failed("finding the tally binary", e))?,
        &exe,
    )
    .map_err(|e| failed("copying the tally binary", e))?;
    let socket = dir.join("sidecar.sock");
    let port = broker.rsplit(':').next().unwrap_or_default();
    let mut command = std::process::Command::new(exe);
    command
        .args(["sidecar", "--broker", &format!("https://localhost:{port}")])
        .arg("--trust-bundle")
        .arg(dir.join("data").join("bundle.pem"))
        .arg("--socket")
        .arg(&socket)
        .args(["--admin-listen", "off"])
        .env("TALLY_JOIN_TOKEN", token)
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(up) = upstream {
        command
            .args(["--inbound-listen", "127.0.0.1:0", "--upstream"])
            .arg(up.to_string());
    }
    let mut child = command
        .spawn()
        .map_err(|e| failed("starting the sidecar", e))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CliError::Failed("no sidecar output".into()))?;
    let mut process = SidecarProcess {
        child,
        socket,
        inbound: None,
    };
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines.next().and_then(Result::ok).unwrap_or_default();
    if !first.contains("local API on") {
        return Err(CliError::Failed(format!(
            "the sidecar did not start: {first}"
        )));
    }
    if upstream.is_some() {
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        process.inbound = line
            .split("listening on ")
            .nth(1)
            .and_then(|rest| rest.split(',').next())
            .and_then(|a| a.parse().ok());
        if process.inbound.is_none() {
            return Err(CliError::Failed(format!(
                "unexpected sidecar output: {line}"
            )));
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok(process)
}

/// Resident and peak resident memory of a process, KiB.
fn memory_kib(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))?
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

fn mib(kib: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "KiB far below 2^52")]
    let m = kib as f64 / 1024.0;
    format!("{m:.1} MiB")
}

async fn authorize(
    args: &AuthorizeArgs,
    warmup: Duration,
    duration: Duration,
) -> Result<ExitCode, CliError> {
    let dir = super::ScratchDir::new("bench")?;
    let (_broker, addr, _issuer) = start_broker(dir.path())?;
    let token = join_token(&addr, &dir.path().join("data"), CLIENT).await?;
    let sidecar = start_sidecar(dir.path(), &addr, &token, None)?;
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
    if let (Some((idle, _)), Some((now, peak))) = (idle, loaded) {
        say!(
            "  sidecar memory: {} idle, {} after, {} peak",
            mib(idle),
            mib(now),
            mib(peak)
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

/// A trivial upstream: 200 and a short body for everything.
async fn upstream() -> Result<(SocketAddr, tokio::sync::oneshot::Sender<()>), CliError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| failed("binding the upstream", e))?;
    let addr = listener.local_addr().map_err(|e| failed("upstream", e))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(crate::http::serve(
        listener,
        crate::http::Listen::new("bench upstream"),
        |_req, _peer| async { crate::http::respond(http::StatusCode::OK, "text/plain", "hello\n") },
        async {
            let _ = stopped.await;
        },
    ));
    Ok((addr, stop))
}

/// A token for the bench client, bound to `key`.
async fn client_token(
    addr: &str,
    issuer: &str,
    data: &Path,
    key: &ProofKey,
) -> Result<String, CliError> {
    let (identity, bundle) = client_identity(addr, data).await?;
    let channel = super::bench::channel(addr, &bundle, identity).await?;
    let proof = key
        .mint(
            "POST",
            &format!("{issuer}/tally.v1.Tokens/Issue"),
            None,
            None,
            SystemClock.now(),
        )
        .map_err(|e| failed("signing a proof", e))?;
    let reply = pb::tokens_client::TokensClient::new(channel)
        .issue(pb::IssueRequest {
            audience: AUDIENCE.into(),
            scopes: vec!["bench:read".into()],
            ttl_seconds: 0,
            dpop_proof: proof,
        })
        .await
        .map_err(|e| failed("getting a token", e.message()))?;
    Ok(reply.into_inner().access_token)
}

/// `count` proofs for `GET url` with `token`, on every core.
fn mint_proofs(
    key: &ProofKey,
    url: &str,
    token: &str,
    count: usize,
) -> Result<Vec<String>, CliError> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let now = SystemClock.now();
    let per = count.div_ceil(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(move || {
                    (0..per)
                        .map(|_| key.mint("GET", url, Some(token), None, now))
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut all = Vec::with_capacity(per * threads);
        for h in handles {
            let part = h
                .join()
                .map_err(|_| CliError::Failed("a proof-minting thread panicked".into()))?
                .map_err(|e| failed("signing a proof", e))?;
            all.extend(part);
        }
        Ok(all)
    })
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
    let mut command = std::process::Command::new("wrk");
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

async fn inbound(args: &InboundArgs, duration: Duration) -> Result<ExitCode, CliError> {
    let dir = super::ScratchDir::new("bench")?;
    let data = dir.path().join("data");
    let (_broker, addr, issuer) = start_broker(dir.path())?;
    let (app, _app_stop) = upstream().await?;
    let token = join_token(&addr, &data, AUDIENCE).await?;
    let sidecar = start_sidecar(dir.path(), &addr, &token, Some(app))?;
    let inbound = sidecar
        .inbound
        .ok_or_else(|| CliError::Failed("the sidecar has no inbound listener".into()))?;
    let pid = sidecar.child.id();
    let idle = memory_kib(pid);

    // A token for the client, and a fresh proof for every request wrk can
    // send in the run (20,000/s is above what two cores verify).
    let key = ProofKey::generate().map_err(|e| failed("a client key", e))?;
    let access = client_token(&addr, &issuer, &data, &key).await?;
    let url = format!("http://{inbound}/bench/hello");
    let count = usize::try_from(duration.as_secs()).unwrap_or(20) * 20_000;
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
    let cpu0 = cpu_seconds(pid);
    let proxied = wrk(args, duration, &url, Some(&script)).await?;
    let cpu1 = cpu_seconds(pid);
    let loaded = memory_kib(pid);
    let direct = wrk(args, duration, &format!("http://{app}/bench/hello"), None).await?;

    say!(
        "tally bench inbound: wrk -t{} -c{} -d{}s, trivial upstream, {count} pre-signed proofs (made in {:.1} s)",
        args.threads,
        args.connections,
        duration.as_secs(),
        minted_in.as_secs_f64()
    );
    say!(
        "  direct to the upstream:   {:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms",
        direct.rate,
        direct.p50_ms,
        direct.p99_ms
    );
    say!(
        "  through the inbound proxy:{:>8.0} req/s  p50 {:.3} ms  p99 {:.3} ms  (every request verified)",
        proxied.rate,
        proxied.p50_ms,
        proxied.p99_ms
    );
    say!(
        "  added by the proxy: p50 {:+.3} ms, p99 {:+.3} ms",
        proxied.p50_ms - direct.p50_ms,
        proxied.p99_ms - direct.p99_ms
    );
    if let (Some(c0), Some(c1)) = (cpu0, cpu1)
        && proxied.requests > 0
    {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let per = (c1 - c0) * 1e6 / proxied.requests as f64;
        say!(
            "  sidecar CPU: {per:.0} µs per verified request ({:.2} cores busy)",
            (c1 - c0) / duration.as_secs_f64()
        );
    }
    if let (Some((idle, _)), Some((now, peak))) = (idle, loaded) {
        say!(
            "  sidecar memory: {} idle, {} under load, {} peak",
            mib(idle),
            mib(now),
            mib(peak)
        );
    }
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
