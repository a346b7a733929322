//! A sidecar process started for a load run (next to a broker process),
//! measured from the outside: its CPU time and resident memory are read
//! from `/proc`.

use super::common::{AUDIENCE, client_identity, failed};
use crate::cli::CliError;
use crate::clock::{Clock, SystemClock};
use crate::dpop::ProofKey;
use crate::proto::v1 as pb;
use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

pub(super) fn durations(pairs: &[(&str, &str)]) -> Result<Vec<Duration>, CliError> {
    pairs
        .iter()
        .map(|(flag, text)| {
            humantime::parse_duration(text)
                .map_err(|e| CliError::Usage(format!("{flag} {text:?}: {e}")))
        })
        .collect()
}

pub(super) fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    // One thread: the load generator takes as little of the machine from
    // the sidecar as it can.
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed("starting the runtime", e))
}

/// The sidecar process; killed when dropped.
pub(super) struct SidecarProcess {
    pub(super) child: std::process::Child,
    pub(super) socket: PathBuf,
    pub(super) inbound: Option<SocketAddr>,
    /// Its ext_authz service, when asked for.
    pub(super) ext_authz: Option<SocketAddr>,
}

impl Drop for SidecarProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A join token for `id`, from the broker's Admin API.
pub(super) async fn join_token(addr: &str, data: &Path, id: &str) -> Result<String, CliError> {
    let read = |p: &str| std::fs::read_to_string(data.join(p)).map_err(|e| failed(p, e));
    let admin =
        tonic::transport::Identity::from_pem(read("admin/cert.pem")?, read("admin/key.pem")?);
    let channel = super::common::channel(addr, &read("bundle.pem")?, admin).await?;
    let reply = pb::admin_client::AdminClient::new(channel)
        .create_join_token(pb::CreateJoinTokenRequest {
            spiffe_id: id.into(),
            ttl_seconds: 600,
        })
        .await
        .map_err(|e| failed("creating a join token", e.message()))?;
    Ok(reply.into_inner().join_token)
}

/// The sidecar program a run starts: `tally-sidecar` beside this binary
/// when it was built (what a pod runs), else `tally sidecar`.
fn sidecar_program() -> Result<(PathBuf, &'static [&'static str]), CliError> {
    let tally = std::env::current_exe().map_err(|e| failed("finding the tally binary", e))?;
    let alone = tally.with_file_name("tally-sidecar");
    Ok(if alone.is_file() {
        (alone, &[])
    } else {
        (tally, &["sidecar"])
    })
}

/// Starts the sidecar for `id` (with an inbound proxy to `upstream`, and
/// ext_authz when asked) and waits until it says it is ready.
pub(super) fn start_sidecar(
    dir: &Path,
    broker: &str,
    token: &str,
    upstream: Option<SocketAddr>,
    ext_authz: bool,
    cpu: Option<usize>,
) -> Result<SidecarProcess, CliError> {
    // Its own copy of the binary: code pages the broker process faulted
    // in are not mapped into the sidecar, so its resident memory is its own.
    let (program, subcommand) = sidecar_program()?;
    let exe = dir.join("sidecar-under-test");
    std::fs::copy(&program, &exe).map_err(|e| failed("copying the sidecar binary", e))?;
    eprintln!(
        "tally bench: the sidecar is {}{}",
        program.display(),
        subcommand
            .iter()
            .map(|s| format!(" {s}"))
            .collect::<String>()
    );
    let socket = dir.join("sidecar.sock");
    let port = broker.rsplit(':').next().unwrap_or_default();
    let mut command = pinned(cpu, &exe);
    command
        .args(subcommand)
        .args(["--broker", &format!("https://localhost:{port}")])
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
    if ext_authz {
        command.args(["--ext-authz-listen", "127.0.0.1:0"]);
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
        ext_authz: None,
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
    if ext_authz {
        let line = lines.next().and_then(Result::ok).unwrap_or_default();
        process.ext_authz = line
            .split("ext_authz listening on ")
            .nth(1)
            .and_then(|a| a.trim().parse().ok());
        if process.ext_authz.is_none() {
            return Err(CliError::Failed(format!(
                "unexpected sidecar output: {line}"
            )));
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok(process)
}

/// A command for `program`, run on core `cpu` when given (`taskset`
/// execs it, so the child's pid is the program's).
pub(super) fn pinned(cpu: Option<usize>, program: &Path) -> std::process::Command {
    match cpu {
        Some(cpu) => {
            let mut command = std::process::Command::new("taskset");
            command.arg("-c").arg(cpu.to_string()).arg(program);
            command
        }
        None => std::process::Command::new(program),
    }
}

/// A process's memory, KiB, from `/proc/PID/status`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Memory {
    /// Resident now (VmRSS).
    pub(super) rss: u64,
    /// Peak resident (VmHWM).
    pub(super) peak: u64,
    /// Resident and anonymous (RssAnon: heap, stacks; not code pages).
    pub(super) anon: u64,
}

/// The memory of process `pid`, if it is still there.
pub(super) fn memory_kib(pid: u32) -> Option<Memory> {
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
    Some(Memory {
        rss: field("VmRSS:")?,
        peak: field("VmHWM:")?,
        anon: field("RssAnon:")?,
    })
}

pub(super) fn mib(kib: u64) -> String {
    #[expect(clippy::cast_precision_loss, reason = "KiB far below 2^52")]
    let m = kib as f64 / 1024.0;
    format!("{m:.1} MiB")
}

/// A trivial upstream: 200 and a short body for everything.
pub(super) async fn upstream() -> Result<(SocketAddr, tokio::sync::oneshot::Sender<()>), CliError> {
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
pub(super) async fn client_token(
    addr: &str,
    issuer: &str,
    data: &Path,
    key: &ProofKey,
) -> Result<String, CliError> {
    let (identity, bundle) = client_identity(addr, data).await?;
    let channel = super::common::channel(addr, &bundle, identity).await?;
    issue_bench_token(channel, &format!("{issuer}/tally.v1.Tokens/Issue"), key).await
}

/// `Tokens.Issue` over `channel` for the bench audience, proving `key`
/// for `issue_htu`.
pub(super) async fn issue_bench_token(
    channel: tonic::transport::Channel,
    issue_htu: &str,
    key: &ProofKey,
) -> Result<String, CliError> {
    let proof = key
        .mint("POST", issue_htu, None, None, SystemClock.now())
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

/// The broker's JWKS document (JSON), as the Watch stream sends it first.
pub(super) async fn jwks(addr: &str, data: &Path) -> Result<String, CliError> {
    let (identity, bundle) = client_identity(addr, data).await?;
    let channel = super::common::channel(addr, &bundle, identity).await?;
    let mut updates = pb::watch_client::WatchClient::new(channel)
        .subscribe(pb::SubscribeRequest { after_sequence: 0 })
        .await
        .map_err(|e| failed("subscribing to Watch", e.message()))?
        .into_inner();
    while let Some(update) = updates
        .message()
        .await
        .map_err(|e| failed("reading Watch", e.message()))?
    {
        if let Some(pb::update::Kind::Jwks(jwks)) = update.kind {
            return Ok(jwks.json);
        }
    }
    Err(CliError::Failed("Watch ended before the JWKS".into()))
}

/// `count` proofs for `GET url` with `token`, on every core.
pub(super) fn mint_proofs(
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
