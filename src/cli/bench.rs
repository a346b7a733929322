//! `tally bench issue`: a load generator for token issuance over the real
//! path. It starts the `tally broker` binary on a temporary data directory
//! (its own process, real SQLite store, mTLS gRPC on 127.0.0.1), gets a
//! client certificate through `Admin.MintSvid`, then keeps N connections
//! busy with `Tokens.Issue` calls, each with a fresh DPoP proof. At the end
//! it kills the broker without warning (SIGKILL) with calls still in flight
//! (some answered, some queued for a commit), reopens the store and checks
//! that every acknowledged issuance is in the inventory.

use super::CliError;
use crate::clock::{Clock, SystemClock};
use crate::dpop::ProofKey;
use crate::proto::v1 as pb;
use crate::store::{Sealer, Store};
use clap::{Args, Subcommand};
use std::io::BufRead as _;
use std::path::Path;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Benchmarks.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Token issuance over mTLS gRPC against a broker started for the run.
    Issue(IssueArgs),
    /// `POST /v1/authorize` on a sidecar's socket (sidecar and broker
    /// started for the run).
    Authorize(super::bench_sidecar::AuthorizeArgs),
    /// wrk through a sidecar's inbound proxy vs. straight to a trivial
    /// upstream, every proxied request with a fresh DPoP proof (needs wrk).
    Inbound(super::bench_sidecar::InboundArgs),
    /// Revocation propagation: many Watch subscribers, revocations one at
    /// a time, time from the call to each subscriber's receipt.
    Revocation(super::bench_watch::RevocationArgs),
}

/// Arguments of `tally bench issue`.
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// TLS connections (each an HTTP/2 connection).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Requests in flight on each connection.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s")]
    duration: String,
    /// Load before measuring (not counted in the latency figures).
    #[arg(long, default_value = "2s")]
    warmup: String,
}

pub(super) fn run(cmd: BenchCommand) -> Result<ExitCode, CliError> {
    match cmd {
        BenchCommand::Authorize(args) => super::bench_sidecar::run_authorize(&args),
        BenchCommand::Inbound(args) => super::bench_sidecar::run_inbound(&args),
        BenchCommand::Revocation(args) => super::bench_watch::run(&args),
        BenchCommand::Issue(args) => {
            let parse = |flag: &str, text: &str| {
                humantime::parse_duration(text)
                    .map_err(|e| CliError::Usage(format!("{flag} {text:?}: {e}")))
            };
            let duration = parse("--duration", &args.duration)?;
            let warmup = parse("--warmup", &args.warmup)?;
            if args.connections == 0 || args.concurrency == 0 || duration.is_zero() {
                return Err(CliError::Usage(
                    "--connections, --concurrency and --duration must be above zero".into(),
                ));
            }
            // One thread: the load generator should take as little of the
            // machine from the broker as it can.
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?
                .block_on(issue(&args, warmup, duration))
        }
    }
}

const TRUST_DOMAIN: &str = "bench.tally";
pub(super) const CLIENT: &str = "spiffe://bench.tally/bench/client";
pub(super) const AUDIENCE: &str = "spiffe://bench.tally/bench/server";
const POLICY: &str = "trust_domain: bench.tally
classes:
  service: { default_ttl: 5m, max_ttl: 15m }
issue:
  - from: spiffe://bench.tally/bench/client
    to: spiffe://bench.tally/bench/server
    scopes: [bench:read, bench:write]
    class: service
access:
  - workload: spiffe://bench.tally/bench/server
    allow:
      - from: spiffe://bench.tally/bench/client
        methods: [GET]
        paths: [/bench/**]
        scopes: [bench:read]
";

pub(super) fn failed(what: &str, e: impl std::fmt::Display) -> CliError {
    CliError::Failed(format!("{what}: {e}"))
}

/// The broker process; killed when dropped.
pub(super) struct BrokerProcess(std::process::Child);

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `tally broker` on `dir`; returns the process, its gRPC address
/// and its issuer URL.
pub(super) fn start_broker(dir: &Path) -> Result<(BrokerProcess, String, String), CliError> {
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).map_err(|e| failed("writing the bench policy", e))?;
    let exe = std::env::current_exe().map_err(|e| failed("finding the tally binary", e))?;
    let mut child = std::process::Command::new(exe)
        .args(["broker", "--trust-domain", TRUST_DOMAIN])
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .args(["--admin-listen", "127.0.0.1:0"])
        .arg("--policy")
        .arg(&policy)
        .arg("--data-dir")
        .arg(dir.join("data"))
        .env_remove("TALLY_STORE_KEY")
        .env("TALLY_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| failed("starting the broker", e))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CliError::Failed("no broker output".into()))?;
    let process = BrokerProcess(child);
    let mut lines = std::io::BufReader::new(stdout).lines();
    let first = lines
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| CliError::Failed("the broker exited before listening".into()))?;
    let addr = first
        .rsplit(' ')
        .next()
        .filter(|_| first.contains("gRPC (mTLS) listening on"))
        .ok_or_else(|| CliError::Failed(format!("unexpected broker output: {first}")))?
        .to_owned();
    let second = lines.next().and_then(Result::ok).unwrap_or_default();
    let issuer = second
        .split("issuer ")
        .nth(1)
        .ok_or_else(|| CliError::Failed(format!("unexpected broker output: {second}")))?
        .trim()
        .to_owned();
    // Keep reading (and dropping) its output so it never blocks on a pipe.
    std::thread::spawn(move || lines.for_each(drop));
    Ok((process, addr, issuer))
}

pub(super) async fn channel(
    addr: &str,
    bundle: &str,
    identity: Identity,
) -> Result<Channel, CliError> {
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(bundle))
        .identity(identity)
        .domain_name("localhost");
    Channel::from_shared(format!("https://{addr}"))
        .map_err(|e| failed("broker address", e))?
        .tls_config(tls)
        .map_err(|e| failed("TLS settings", e))?
        .connect()
        .await
        .map_err(|e| failed("connecting to the broker", e))
}

/// The bench client's credential, minted through the Admin API.
pub(super) async fn client_identity(
    addr: &str,
    data: &Path,
) -> Result<(Identity, String), CliError> {
    let read = |p: &str| std::fs::read_to_string(data.join(p)).map_err(|e| failed(p, e));
    let bundle = read("bundle.pem")?;
    let admin = Identity::from_pem(read("admin/cert.pem")?, read("admin/key.pem")?);
    let mut client = pb::admin_client::AdminClient::new(channel(addr, &bundle, admin).await?);
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(|e| failed("generating a key", e))?;
    let csr = rcgen::CertificateParams::default()
        .serialize_request(&key)
        .map_err(|e| failed("making a CSR", e))?
        .der()
        .to_vec();
    let svid = client
        .mint_svid(pb::MintSvidRequest {
            spiffe_id: CLIENT.into(),
            ttl_seconds: 3600,
            csr_der: csr,
        })
        .await
        .map_err(|e| failed("minting the bench credential", e.message()))?
        .into_inner();
    let chain: String = std::iter::once(&svid.svid_der)
        .chain(&svid.chain_der)
        .map(|d| crate::ca::pem("CERTIFICATE", d))
        .collect();
    Ok((Identity::from_pem(chain, key.serialize_pem()), bundle))
}

/// What one worker saw.
#[derive(Default)]
struct Tally {
    ok: u64,
    /// The jti of every acknowledged issuance, looked up after the crash.
    jtis: Vec<String>,
    /// Calls the final SIGKILL cut off (no answer): not errors.
    cut_off: u64,
    errors: std::collections::BTreeMap<String, u64>,
    /// Latencies of measured (post-warmup) successes, microseconds.
    latencies: Vec<u32>,
}

async fn worker(
    mut client: pb::tokens_client::TokensClient<Channel>,
    htu: String,
    measure_from: Instant,
    killed: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Tally {
    use std::sync::atomic::Ordering;
    let mut tally = Tally::default();
    let Ok(key) = ProofKey::generate() else {
        tally.errors.insert("client key generation".into(), 1);
        return tally;
    };
    // Until the broker is killed: the kill lands with calls in flight.
    while !killed.load(Ordering::SeqCst) {
        let started = Instant::now();
        let proof = match key.mint("POST", &htu, None, None, SystemClock.now()) {
            Ok(p) => p,
            Err(e) => {
                *tally.errors.entry(e.to_string()).or_default() += 1;
                continue;
            }
        };
        let result = client
            .issue(pb::IssueRequest {
                audience: AUDIENCE.into(),
                scopes: vec!["bench:read".into()],
                ttl_seconds: 0,
                dpop_proof: proof,
            })
            .await;
        match result {
            Ok(answer) => {
                tally.ok += 1;
                tally.jtis.push(answer.into_inner().jti);
                if started >= measure_from {
                    let micros = started.elapsed().as_micros();
                    tally
                        .latencies
                        .push(u32::try_from(micros).unwrap_or(u32::MAX));
                }
            }
            Err(status)
                if killed.load(Ordering::SeqCst)
                    && matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) =>
            {
                tally.cut_off += 1;
            }
            Err(status) => {
                *tally
                    .errors
                    .entry(format!("{:?}: {}", status.code(), status.message()))
                    .or_default() += 1;
            }
        }
    }
    tally
}

pub(super) fn percentile(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "an index into a list far shorter than 2^52"
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

async fn issue(
    args: &IssueArgs,
    warmup: Duration,
    duration: Duration,
) -> Result<ExitCode, CliError> {
    let dir = super::ScratchDir::new("bench")?;
    let (mut broker, addr, issuer) = start_broker(dir.path())?;
    let data = dir.path().join("data");
    let (identity, bundle) = client_identity(&addr, &data).await?;
    let htu = format!("{issuer}/tally.v1.Tokens/Issue");

    let start = Instant::now();
    let measure_from = start + warmup;
    let until = measure_from + duration;
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..args.connections {
        let channel = channel(&addr, &bundle, identity.clone()).await?;
        for _ in 0..args.concurrency {
            let client = pb::tokens_client::TokensClient::new(channel.clone());
            workers.push(tokio::spawn(worker(
                client,
                htu.clone(),
                measure_from,
                std::sync::Arc::clone(&killed),
            )));
        }
    }
    let broker_pid = broker.0.id();
    let cpu_start = {
        tokio::time::sleep_until(measure_from.into()).await;
        (cpu_seconds(broker_pid), cpu_seconds(std::process::id()))
    };
    tokio::time::sleep_until(until.into()).await;
    let cpu_end = (cpu_seconds(broker_pid), cpu_seconds(std::process::id()));
    // No goodbye, with calls in flight: an acknowledged issuance must
    // already be committed (some answered just now, some still queued).
    killed.store(true, std::sync::atomic::Ordering::SeqCst);
    let _ = broker.0.kill();
    let _ = broker.0.wait();
    let mut total = Tally::default();
    for w in workers {
        let t = w.await.map_err(|e| failed("a worker", e))?;
        total.ok += t.ok;
        total.jtis.extend(t.jtis);
        total.cut_off += t.cut_off;
        for (k, v) in t.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.latencies.extend(t.latencies);
    }

    let key = std::fs::read(data.join("store.key")).map_err(|e| failed("store.key", e))?;
    let sealer = Sealer::from_key_material(&key).map_err(|e| failed("store.key", e))?;
    // The broker inherits TALLY_DATABASE_URL: with it, the run measures
    // the PostgreSQL store (use a fresh database: the count includes what
    // was there before).
    let store = match std::env::var("TALLY_DATABASE_URL") {
        Ok(url) => Store::open_postgres(&url, sealer).await,
        Err(_) => Store::open_sqlite(&data.join("tally.db"), sealer).await,
    }
    .map_err(|e| failed("reopening the store", e))?;
    let recorded = stored_jtis(&store)
        .await
        .map_err(|e| failed("reading the inventory", e))?;
    // Each acknowledged one by its jti: a count could hide a missing one
    // behind a cut-off call that was committed but never answered.
    let missing = total.jtis.iter().filter(|j| !recorded.contains(*j)).count();
    let recorded = recorded.len();

    total.latencies.sort_unstable();
    let measured = total.latencies.len();
    #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
    let rate = measured as f64 / duration.as_secs_f64();
    say!(
        "tally bench issue: {} connections x {} in flight, {} s warm-up, {} s measured",
        args.connections,
        args.concurrency,
        warmup.as_secs_f64(),
        duration.as_secs_f64()
    );
    say!("  issued (measured):  {measured}  =  {rate:.0} tokens/s");
    say!(
        "  latency ms:  p50 {:.2}  p90 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2}",
        percentile(&total.latencies, 0.50),
        percentile(&total.latencies, 0.90),
        percentile(&total.latencies, 0.99),
        percentile(&total.latencies, 0.999),
        percentile(&total.latencies, 1.0)
    );
    if let ((Some(b0), Some(c0)), (Some(b1), Some(c1))) = (cpu_start, cpu_end)
        && measured > 0
    {
        #[expect(clippy::cast_precision_loss, reason = "counts far below 2^52")]
        let per = |cpu: f64| cpu * 1e6 / measured as f64;
        say!(
            "  CPU per issuance:  broker {:.0} µs, load generator {:.0} µs  ({:.2} + {:.2} cores busy)",
            per(b1 - b0),
            per(c1 - c0),
            (b1 - b0) / duration.as_secs_f64(),
            (c1 - c0) / duration.as_secs_f64()
        );
    }
    let errors: u64 = total.errors.values().sum();
    say!("  errors: {errors}");
    for (what, n) in &total.errors {
        say!("    {n} x {what}");
    }
    say!(
        "  inventory after SIGKILL under load and reopen: {recorded} records for {} acknowledged issuances (warm-up included; {} calls cut off by the kill)",
        total.ok,
        total.cut_off
    );
    if missing > 0 {
        return Err(CliError::Failed(format!(
            "{missing} acknowledged issuances are missing from the inventory"
        )));
    }
    Ok(if errors == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The jti of every live token in the inventory.
async fn stored_jtis(
    store: &Store,
) -> Result<std::collections::HashSet<String>, crate::store::StoreError> {
    let mut filter = crate::store::TokenFilter {
        now: SystemClock.now(),
        ..crate::store::TokenFilter::default()
    };
    let mut jtis = std::collections::HashSet::new();
    loop {
        let page = store.find_live_tokens(&filter, 10_000).await?;
        let Some(last) = page.last() else {
            return Ok(jtis);
        };
        filter.after = Some((last.exp, last.jti.clone()));
        jtis.extend(page.into_iter().map(|t| t.jti));
    }
}

/// User + system CPU seconds a process has used, from `/proc/PID/stat`
/// (Linux; clock ticks are 100 per second in that interface).
pub(super) fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    #[expect(clippy::cast_precision_loss, reason = "ticks far below 2^52")]
    Some(ticks as f64 / 100.0)
}
