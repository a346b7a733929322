//! `tally bench revocation`: how long a revocation takes from the admin's
//! call to every Watch subscriber. It starts the broker binary, opens N
//! Watch streams over M mTLS connections (simulated sidecars, all in this
//! process), then makes revocations one at a time through `Admin.Revoke`
//! and records when each subscriber receives each one.

use super::common::{channel, client_identity, failed, percentile, start_broker};
use crate::cli::CliError;
use crate::clock::{Clock, SystemClock};
use crate::proto::v1 as pb;
use clap::Args;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Arguments of `tally bench revocation`.
#[derive(Debug, Args)]
pub struct RevocationArgs {
    /// Watch subscribers (simulated sidecars).
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// mTLS connections they share (HTTP/2 streams on each).
    #[arg(long, default_value_t = 10)]
    connections: usize,
    /// Revocations to make, one after another.
    #[arg(long, default_value_t = 20)]
    revocations: usize,
}

pub(super) fn run(args: &RevocationArgs) -> Result<ExitCode, CliError> {
    if args.subscribers == 0 || args.connections == 0 || args.revocations == 0 {
        return Err(CliError::Usage(
            "--subscribers, --connections and --revocations must be above zero".into(),
        ));
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| failed("starting the runtime", e))?
        .block_on(bench(args))
}

/// (subscriber, sequence, when it arrived).
type Arrival = (usize, u64, Instant);

async fn subscriber(
    id: usize,
    channel: tonic::transport::Channel,
    ready: mpsc::Sender<()>,
    arrivals: mpsc::UnboundedSender<Arrival>,
) -> Result<(), CliError> {
    let mut stream = pb::watch_client::WatchClient::new(channel)
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .map_err(|e| failed("subscribing", e.message()))?
        .into_inner();
    let mut announced = false;
    while let Some(update) = stream
        .message()
        .await
        .map_err(|e| failed("the Watch stream", e.message()))?
    {
        if !announced {
            announced = true;
            let _ = ready.send(()).await;
        }
        if matches!(update.kind, Some(pb::update::Kind::Revocation(_)))
            && arrivals
                .send((id, update.sequence, Instant::now()))
                .is_err()
        {
            return Ok(());
        }
    }
    Ok(())
}

async fn bench(args: &RevocationArgs) -> Result<ExitCode, CliError> {
    let dir = crate::cli::ScratchDir::new("bench")?;
    let data = dir.path().join("data");
    let (_broker, addr, _issuer) = start_broker(dir.path())?;
    let (identity, bundle) = client_identity(&addr, &data).await?;

    let (ready_tx, mut ready_rx) = mpsc::channel(args.subscribers);
    let (arrival_tx, mut arrival_rx) = mpsc::unbounded_channel();
    let mut channels = Vec::new();
    for _ in 0..args.connections {
        channels.push(channel(&addr, &bundle, identity.clone()).await?);
    }
    let mut tasks = Vec::new();
    for id in 0..args.subscribers {
        tasks.push(tokio::spawn(subscriber(
            id,
            channels[id % channels.len()].clone(),
            ready_tx.clone(),
            arrival_tx.clone(),
        )));
    }
    drop((ready_tx, arrival_tx));
    for _ in 0..args.subscribers {
        if ready_rx.recv().await.is_none() {
            return Err(CliError::Failed("a subscriber failed to connect".into()));
        }
    }

    let read = |p: &str| std::fs::read_to_string(data.join(p)).map_err(|e| failed(p, e));
    let admin_identity =
        tonic::transport::Identity::from_pem(read("admin/cert.pem")?, read("admin/key.pem")?);
    let mut admin =
        pb::admin_client::AdminClient::new(channel(&addr, &bundle, admin_identity).await?);
    let mut latencies = Vec::new();
    let mut missing = 0usize;
    for _ in 0..args.revocations {
        let asked = Instant::now();
        let now = i64::try_from(SystemClock.now()).unwrap_or(i64::MAX);
        let sequence = admin
            .revoke(pb::RevokeRequest {
                target: Some(pb::revoke_request::Target::IssuedBefore(now)),
                reason: "bench".into(),
            })
            .await
            .map_err(|e| failed("revoking", e.message()))?
            .into_inner()
            .sequence;
        let acknowledged = asked.elapsed();
        let mut seen = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while seen < args.subscribers {
            match tokio::time::timeout_at(deadline, arrival_rx.recv()).await {
                Ok(Some((_, seq, at))) if seq == sequence => {
                    seen += 1;
                    let micros = at.saturating_duration_since(asked).as_micros();
                    latencies.push(u32::try_from(micros).unwrap_or(u32::MAX));
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        missing += args.subscribers - seen;
        tracing::debug!(sequence, ?acknowledged, seen, "revocation delivered");
    }
    for task in tasks {
        task.abort();
    }
    latencies.sort_unstable();
    say!(
        "tally bench revocation: {} Watch subscribers on {} mTLS connections, {} revocations one after another",
        args.subscribers,
        args.connections,
        args.revocations
    );
    say!(
        "  from the Admin.Revoke call to receipt by a subscriber (ms): p50 {:.1}  p90 {:.1}  p99 {:.1}  max {:.1}",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        percentile(&latencies, 1.0)
    );
    say!(
        "  deliveries: {} of {}",
        latencies.len(),
        args.subscribers * args.revocations
    );
    Ok(if missing == 0 {
        ExitCode::SUCCESS
    } else {
        say!("  missing after 10 s: {missing}");
        ExitCode::from(1)
    })
}
