//! What the load tools share: the bench trust domain and policy, the
//! broker process, mTLS clients, percentiles and CPU time.

use crate::cli::CliError;
use crate::proto::v1 as pb;
use std::io::BufRead as _;
use std::path::Path;
use std::process::Stdio;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

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
pub(super) struct BrokerProcess(pub(super) std::process::Child);

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
