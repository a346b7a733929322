//! `tally bench issue`: a load generator for token issuance over the real
//! path. It starts the `tally broker` binary on a temporary data directory
//! (its own process, real SQLite store, mTLS gRPC on 127.0.0.1), gets a
//! client certificate through `Admin.MintSvid`, then keeps N connections
//! busy with `Tokens.Issue` calls, each with a fresh DPoP proof. At the end
//! it kills the broker without warning (SIGKILL) with calls still in flight
//! (some answered, some queued for a commit), reopens the store and checks
//! that every acknowledged issuance is in the inventory.

use super::common::{
    AUDIENCE, channel, client_identity, cpu_seconds, failed, percentile, start_broker,
};
use crate::cli::CliError;
use crate::clock::{Clock, SystemClock};
use crate::dpop::ProofKey;
use crate::proto::v1 as pb;
use crate::store::{Sealer, Store};
use clap::Args;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

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

pub(super) async fn issue(
    args: &IssueArgs,
    warmup: Duration,
    duration: Duration,
) -> Result<ExitCode, CliError> {
    let dir = crate::cli::ScratchDir::new("bench")?;
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
    // The broker inherits TALLY_DATABASE_URL (and TALLY_ISSUER, which a
    // broker on PostgreSQL needs): with it, the run measures
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

/// `tally bench issue`.
pub(super) fn run(args: &IssueArgs) -> Result<ExitCode, CliError> {
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
        .block_on(issue(args, warmup, duration))
}
