//! `tally sidecar`: attest, keep the SVID renewed, follow the Watch
//! stream, and serve the local API on a Unix socket, the inbound verifying
//! proxy and the outbound proxy when asked for, and the admin port, until
//! SIGTERM. Settings come from flags, `TALLY_*` variables and a YAML
//! `--config` file, in that order; every problem is reported at once.

use super::CliError;
use crate::clock::{Clock, SystemClock};
use crate::config::{FileSettings, boolean};
use crate::sidecar::api::{self, ServiceMap};
use crate::sidecar::cache::CacheConfig;
use crate::sidecar::identity::Attestation;
use crate::sidecar::inbound::InboundConfig;
use crate::sidecar::outbound::OutboundConfig;
use crate::sidecar::run::{Listeners, Sidecar, SidecarSettings};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Arguments of `tally sidecar` (`Debug` leaves the join token out).
#[derive(Debug, Default, clap::Args)]
pub struct SidecarFlags {
    /// YAML file with any of the settings below, by their long names with
    /// `_` for `-` (flags and TALLY_* win). The join token is never read
    /// from it.
    #[arg(long, env = "TALLY_CONFIG")]
    config: Option<PathBuf>,
    /// The broker's gRPC URL, e.g. https://broker:8443.
    #[arg(long, env = "TALLY_BROKER")]
    broker: Option<String>,
    /// Trust bundle (PEM) to verify the broker with on first contact.
    #[arg(long, env = "TALLY_TRUST_BUNDLE")]
    trust_bundle: Option<PathBuf>,
    /// One-time join token (or set TALLY_JOIN_TOKEN, which keeps it out of `ps`).
    #[arg(
        long,
        env = "TALLY_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "sa_token_file"
    )]
    join_token: Option<super::SecretArg>,
    /// Projected Kubernetes ServiceAccount token file.
    #[arg(long, env = "TALLY_SA_TOKEN_FILE")]
    sa_token_file: Option<PathBuf>,
    /// Unix socket for the local API [default: /run/tally/agent.sock as
    /// root, else $XDG_RUNTIME_DIR/tally/agent.sock or the temp dir].
    #[arg(long, env = "TALLY_SOCKET")]
    socket: Option<PathBuf>,
    /// Only these peer uids may use the socket and the outbound proxy
    /// (repeatable).
    #[arg(long = "allow-uid", env = "TALLY_ALLOW_UIDS", value_delimiter = ',')]
    allow_uids: Vec<u32>,
    /// YAML mapping of HOST:PORT (or HOST:* for every port) to audience,
    /// for /v1/authorize and the outbound proxy.
    #[arg(long, env = "TALLY_SERVICE_MAP")]
    service_map: Option<PathBuf>,
    /// Inbound verifying proxy address, e.g. 0.0.0.0:15006 (needs --upstream).
    #[arg(long, env = "TALLY_INBOUND_LISTEN")]
    inbound_listen: Option<String>,
    /// The application behind the inbound proxy, host:port (plain HTTP).
    #[arg(long, env = "TALLY_UPSTREAM")]
    upstream: Option<String>,
    /// Demand DPoP server nonces from inbound callers (RFC 9449 §8).
    #[arg(long, env = "TALLY_INBOUND_NONCES")]
    inbound_nonces: bool,
    /// Also hand Authorization and DPoP to the app (dropped by default).
    #[arg(long, env = "TALLY_PASS_CREDENTIALS")]
    pass_credentials: bool,
    /// Oldest inbound DPoP proof accepted, after its iat [default: 30s].
    #[arg(long, env = "TALLY_PROOF_MAX_AGE")]
    proof_max_age: Option<String>,
    /// Clock difference allowed between callers and this sidecar [default: 5s].
    #[arg(long, env = "TALLY_CLOCK_SKEW")]
    clock_skew: Option<String>,
    /// Outbound forward proxy address, e.g. 127.0.0.1:15001 (the app's HTTP_PROXY).
    #[arg(long, env = "TALLY_OUTBOUND_LISTEN")]
    outbound_listen: Option<String>,
    /// Refuse outbound requests to hosts not in the service map.
    #[arg(long, env = "TALLY_OUTBOUND_STRICT")]
    outbound_strict: bool,
    /// Not ready once the Watch stream has been down this long [default: 30s].
    #[arg(long, env = "TALLY_WATCH_STALENESS")]
    watch_staleness: Option<String>,
    /// Past that, refuse every inbound request (503) instead of only
    /// admin-class tokens (revocation_staleness: deny).
    #[arg(long, env = "TALLY_DENY_WHEN_STALE")]
    deny_when_stale: bool,
    /// Admin port address (/healthz, /readyz, /metrics), or `off`
    /// [default: 127.0.0.1:15020].
    #[arg(long, env = "TALLY_ADMIN_LISTEN")]
    admin_listen: Option<String>,
    /// The only authorities (HOST:PORT) inbound requests may address,
    /// repeatable; any other is refused (421) before any token work
    /// [default: any].
    #[arg(
        long = "inbound-authority",
        env = "TALLY_INBOUND_AUTHORITIES",
        value_delimiter = ','
    )]
    inbound_authorities: Vec<String>,
    /// Every listener: time from accept to a whole request head (TLS
    /// handshake included) [default: 10s].
    #[arg(long, env = "TALLY_HEADER_TIMEOUT")]
    header_timeout: Option<String>,
    /// Every listener: close a connection with no request in flight after
    /// this long [default: 60s].
    #[arg(long, env = "TALLY_IDLE_TIMEOUT")]
    idle_timeout: Option<String>,
    /// Every listener: most connections open at once [default: 1024].
    #[arg(long, env = "TALLY_MAX_CONNECTIONS")]
    max_connections: Option<String>,
}

const KEYS: &[&str] = &[
    "broker",
    "trust_bundle",
    "sa_token_file",
    "socket",
    "allow_uids",
    "service_map",
    "inbound_listen",
    "upstream",
    "inbound_nonces",
    "pass_credentials",
    "proof_max_age",
    "clock_skew",
    "outbound_listen",
    "outbound_strict",
    "watch_staleness",
    "deny_when_stale",
    "admin_listen",
    "inbound_authorities",
    "header_timeout",
    "idle_timeout",
    "max_connections",
];

/// Resolved, validated settings.
#[derive(Debug)]
struct SidecarConfig {
    broker: String,
    trust_bundle: PathBuf,
    attestation: Attestation,
    socket: Option<PathBuf>,
    allow_uids: Vec<u32>,
    service_map: Option<PathBuf>,
    inbound: Option<(SocketAddr, String)>,
    inbound_nonces: bool,
    pass_credentials: bool,
    proof_max_age: u64,
    clock_skew: u64,
    watch_staleness: u64,
    deny_when_stale: bool,
    outbound_listen: Option<SocketAddr>,
    outbound_strict: bool,
    admin_listen: Option<SocketAddr>,
    inbound_authorities: Vec<String>,
    limits: crate::http::Limits,
}

impl SidecarConfig {
    /// Merges `flags` over the config file (name, text); every problem at
    /// once.
    fn resolve(flags: &SidecarFlags, file: Option<(&str, &str)>) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let from_file = FileSettings::read(file, KEYS, &mut errors);
        let one = |flag: &Option<String>, key: &str| flag.clone().or_else(|| from_file.one(key));
        let path = |flag: &Option<PathBuf>, key: &str| {
            flag.clone()
                .or_else(|| from_file.one(key).map(PathBuf::from))
        };
        let mut switch = |flag: bool, key: &str| {
            flag || from_file.one(key).is_some_and(|t| {
                boolean(key, &t)
                    .map_err(|e| errors.push(e))
                    .unwrap_or(false)
            })
        };
        let inbound_nonces = switch(flags.inbound_nonces, "inbound_nonces");
        let pass_credentials = switch(flags.pass_credentials, "pass_credentials");
        let outbound_strict = switch(flags.outbound_strict, "outbound_strict");
        let deny_when_stale = switch(flags.deny_when_stale, "deny_when_stale");

        let broker = one(&flags.broker, "broker");
        match &broker {
            None => errors
                .push("broker: give the broker's gRPC URL (--broker https://HOST:8443)".into()),
            Some(url) if !url.starts_with("https://") => {
                errors.push(format!("broker {url:?} must be an https:// URL"));
            }
            Some(_) => {}
        }
        let trust_bundle = path(&flags.trust_bundle, "trust_bundle");
        if trust_bundle.is_none() {
            errors.push("trust_bundle: give the trust bundle file (--trust-bundle FILE)".into());
        }
        let sa_token_file = path(&flags.sa_token_file, "sa_token_file");
        let attestation = match (&flags.join_token, sa_token_file) {
            (Some(t), None) => Some(Attestation::JoinToken(zeroize::Zeroizing::new(
                t.expose().to_owned(),
            ))),
            (None, Some(f)) => Some(Attestation::ServiceAccountTokenFile(f)),
            (Some(_), Some(_)) => {
                errors.push("give the join token or sa_token_file, not both".into());
                None
            }
            (None, None) => {
                errors.push(
                    "attestation: give --join-token (or TALLY_JOIN_TOKEN) or --sa-token-file"
                        .into(),
                );
                None
            }
        };
        let mut address = |flag: &Option<String>, key: &str| -> Option<SocketAddr> {
            let text = one(flag, key)?;
            text.parse()
                .map_err(|e| errors.push(format!("{key} {text:?}: {e}")))
                .ok()
        };
        let inbound_listen = address(&flags.inbound_listen, "inbound_listen");
        let outbound_listen = address(&flags.outbound_listen, "outbound_listen");
        let admin_text =
            one(&flags.admin_listen, "admin_listen").unwrap_or_else(|| "127.0.0.1:15020".into());
        let admin_listen = if admin_text == "off" {
            None
        } else {
            admin_text
                .parse()
                .map_err(|e| errors.push(format!("admin_listen {admin_text:?}: {e}")))
                .ok()
        };
        let upstream = one(&flags.upstream, "upstream");
        if let Some(up) = &upstream {
            let ok = up
                .parse::<http::uri::Authority>()
                .is_ok_and(|a| a.port_u16().is_some() && !up.contains('@'));
            if !ok {
                errors.push(format!("upstream {up:?} must be host:port"));
            }
        }
        let inbound = match (inbound_listen, upstream) {
            (Some(listen), Some(up)) => Some((listen, up)),
            (None, None) => None,
            (Some(_), None) => {
                errors.push("inbound_listen needs upstream (the app's host:port)".into());
                None
            }
            (None, Some(_)) => {
                errors.push("upstream needs inbound_listen (where callers connect)".into());
                None
            }
        };
        let mut seconds = |flag: &Option<String>, key: &str, default: &str, min: u64, max: u64| {
            let text = one(flag, key).unwrap_or_else(|| default.into());
            match humantime::parse_duration(&text) {
                Ok(d) if (min..=max).contains(&d.as_secs()) && d.subsec_nanos() == 0 => {
                    Some(d.as_secs())
                }
                _ => {
                    errors.push(format!(
                        "{key} {text:?} must be whole seconds from {min}s to {max}s"
                    ));
                    None
                }
            }
        };
        let proof_max_age = seconds(&flags.proof_max_age, "proof_max_age", "30s", 1, 300);
        let clock_skew = seconds(&flags.clock_skew, "clock_skew", "5s", 0, 300);
        let watch_staleness = seconds(&flags.watch_staleness, "watch_staleness", "30s", 1, 86_400);
        let limits = crate::config::listener_limits(
            one(&flags.header_timeout, "header_timeout"),
            one(&flags.idle_timeout, "idle_timeout"),
            one(&flags.max_connections, "max_connections"),
            &mut errors,
        );
        let inbound_authorities = if flags.inbound_authorities.is_empty() {
            from_file.all("inbound_authorities")
        } else {
            flags.inbound_authorities.clone()
        };
        for authority in &inbound_authorities {
            if crate::auth::target::Authority::parse(authority).is_err() {
                errors.push(format!(
                    "inbound_authorities: {authority:?} must be HOST:PORT"
                ));
            }
        }
        let allow_uids = if flags.allow_uids.is_empty() {
            from_file
                .all("allow_uids")
                .iter()
                .filter_map(|t| {
                    t.parse()
                        .map_err(|_| errors.push(format!("allow_uids: {t:?} is not a uid")))
                        .ok()
                })
                .collect()
        } else {
            flags.allow_uids.clone()
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            broker: broker.unwrap_or_else(|| unreachable!("checked above")),
            trust_bundle: trust_bundle.unwrap_or_else(|| unreachable!("checked above")),
            attestation: attestation.unwrap_or_else(|| unreachable!("checked above")),
            socket: path(&flags.socket, "socket"),
            allow_uids,
            service_map: path(&flags.service_map, "service_map"),
            inbound,
            inbound_nonces,
            pass_credentials,
            proof_max_age: proof_max_age.unwrap_or_else(|| unreachable!("checked above")),
            clock_skew: clock_skew.unwrap_or_else(|| unreachable!("checked above")),
            watch_staleness: watch_staleness.unwrap_or_else(|| unreachable!("checked above")),
            deny_when_stale,
            outbound_listen,
            outbound_strict,
            admin_listen,
            inbound_authorities,
            limits,
        })
    }
}

pub(super) fn run(flags: SidecarFlags) -> Result<ExitCode, CliError> {
    let file_text = match &flags.config {
        Some(path) => Some((
            path.display().to_string(),
            std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?,
        )),
        None => None,
    };
    let config = SidecarConfig::resolve(
        &flags,
        file_text.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
    )
    .map_err(|errors| CliError::Usage(errors.join("\n  ")))?;
    let bundle = std::fs::read_to_string(&config.trust_bundle).map_err(|e| {
        CliError::Usage(format!(
            "trust_bundle {}: {e}",
            config.trust_bundle.display()
        ))
    })?;
    let services = match &config.service_map {
        Some(path) => service_map(path)?,
        None => ServiceMap::default(),
    };
    let socket = socket_path(config.socket.clone())?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?
        .block_on(serve(config, bundle, services, socket))
}

/// Reads the service map: a YAML mapping of `host:port` (or `host:*`)
/// to audience.
fn service_map(path: &Path) -> Result<ServiceMap, CliError> {
    use crate::policy::yaml::{self, Value};
    let name = path.display().to_string();
    let text =
        std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("{name}: {e}")))?;
    let doc = yaml::parse(&text)
        .map_err(|e| CliError::Usage(format!("{name}:{}: {}", e.pos, e.message)))?;
    let Value::Map(entries) = doc.value else {
        return Err(CliError::Usage(format!(
            "{name}: expected a mapping of host to audience"
        )));
    };
    let mut errors = Vec::new();
    let mut out = Vec::new();
    for (host, pos, node) in entries {
        match &node.value {
            Value::Str(a) => match a.parse() {
                Ok(audience) => out.push((host, audience)),
                Err(e) => errors.push(format!("{name}:{}: audience for {host}: {e}", node.pos)),
            },
            _ => errors.push(format!(
                "{name}:{pos}: the audience for {host} must be text"
            )),
        }
    }
    if errors.is_empty() {
        ServiceMap::new(out).map_err(|faults| {
            let faults: Vec<String> = faults.iter().map(|f| format!("{name}: {f}")).collect();
            CliError::Usage(faults.join("\n  "))
        })
    } else {
        Err(CliError::Usage(errors.join("\n  ")))
    }
}

/// Where the socket goes when not given: /run/tally as root, else the
/// user's runtime dir or the temp dir.
pub(super) fn default_socket() -> PathBuf {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let dir = if root {
        PathBuf::from("/run/tally")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map_or_else(std::env::temp_dir, PathBuf::from)
            .join("tally")
    };
    dir.join("agent.sock")
}

/// The socket path: as given, else [`default_socket`] (saying so when it
/// is not the system location), its directory created.
fn socket_path(given: Option<PathBuf>) -> Result<PathBuf, CliError> {
    if let Some(path) = given {
        return Ok(path);
    }
    let path = default_socket();
    let dir = path.parent().unwrap_or(Path::new("."));
    if !path.starts_with("/run/tally") {
        eprintln!(
            "tally sidecar: not root, so the socket goes to {} (set --socket to choose)",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Failed(format!("creating {}: {e}", dir.display())))?;
    Ok(path)
}

/// How long shutdown waits for requests in flight.
const DRAIN: Duration = Duration::from_secs(10);

async fn serve(
    config: SidecarConfig,
    bundle: String,
    services: ServiceMap,
    socket: PathBuf,
) -> Result<ExitCode, CliError> {
    let bind = |addr: SocketAddr, what: &'static str| async move {
        tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| CliError::Failed(format!("binding the {what} on {addr}: {e}")))
    };
    let mut listeners = Listeners {
        socket: Some(
            api::bind(&socket)
                .map_err(|e| CliError::Failed(format!("binding {}: {e}", socket.display())))?,
        ),
        ..Listeners::default()
    };
    if let Some((addr, _)) = &config.inbound {
        listeners.inbound = Some(bind(*addr, "inbound proxy").await?);
    }
    if let Some(addr) = config.outbound_listen {
        listeners.outbound = Some(bind(addr, "outbound proxy").await?);
    }
    if let Some(addr) = config.admin_listen {
        listeners.admin = Some(bind(addr, "admin port").await?);
    }
    let local = |l: &Option<tokio::net::TcpListener>| l.as_ref().and_then(|l| l.local_addr().ok());
    let (inbound_at, outbound_at, admin_at) = (
        local(&listeners.inbound),
        local(&listeners.outbound),
        local(&listeners.admin),
    );
    let upstream = config.inbound.as_ref().map(|(_, up)| up.clone());
    let settings = SidecarSettings {
        broker: config.broker,
        bundle_pem: bundle,
        attestation: config.attestation,
        services,
        allowed_uids: (!config.allow_uids.is_empty()).then_some(config.allow_uids),
        cache: CacheConfig::default(),
        inbound: upstream.clone().map(|up| {
            let mut c = InboundConfig::new(up);
            c.pass_credentials = config.pass_credentials;
            c.proof_max_age = config.proof_max_age;
            c.clock_skew = config.clock_skew;
            c.stale_after = config.watch_staleness;
            c.deny_when_stale = config.deny_when_stale;
            c.authorities = config
                .inbound_authorities
                .iter()
                .filter_map(|a| crate::auth::target::Authority::parse(a).ok())
                .collect();
            c
        }),
        inbound_nonces: config.inbound_nonces,
        outbound: OutboundConfig {
            strict: config.outbound_strict,
            ..OutboundConfig::default()
        },
        watch_staleness: config.watch_staleness,
        limits: config.limits,
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    // First contact retries while the broker is unreachable; SIGTERM
    // meanwhile ends it cleanly.
    let sidecar = tokio::select! {
        started = Sidecar::start(settings, listeners, clock) => {
            started.map_err(|e| CliError::Failed(format!("attestation failed: {e}")))?
        }
        () = super::broker::shutdown_signal() => {
            let _ = std::fs::remove_file(&socket);
            return Ok(ExitCode::SUCCESS);
        }
    };
    // Watched from before the lines that say it is ready, so a SIGTERM
    // after them is never lost.
    let (signal, drain_signal) = (
        super::broker::shutdown_signal(),
        super::broker::shutdown_signal(),
    );
    // The lines below tell scripts it is ready: keys, bundle and access
    // rules in hand (or a warning after a while, and it keeps trying).
    if !sidecar.ready(Duration::from_secs(15)).await {
        tracing::warn!("no keys or access rules from the broker yet; serving anyway (see /readyz)");
    }
    say!(
        "tally sidecar: {}; local API on {}",
        sidecar.spiffe_id(),
        socket.display()
    );
    if let (Some(at), Some(up)) = (inbound_at, &upstream) {
        say!("tally sidecar: inbound proxy listening on {at}, forwarding to {up}");
    }
    if let Some(at) = outbound_at {
        say!("tally sidecar: outbound proxy listening on {at}");
    }
    if let Some(at) = admin_at {
        say!("tally sidecar: admin listening on {at}");
    }
    // In-flight requests get DRAIN to finish after the signal; a client
    // that never lets go does not keep the sidecar from exiting.
    let signal_then_drain = async {
        drain_signal.await;
        tokio::time::sleep(DRAIN).await;
    };
    let result = tokio::select! {
        result = sidecar.run_until(signal) => result,
        () = signal_then_drain => {
            tracing::warn!("requests still open {} s after the shutdown signal; exiting anyway", DRAIN.as_secs());
            Ok(())
        }
    };
    let _ = std::fs::remove_file(&socket);
    result.map_err(|e| CliError::Failed(e.to_string()))?;
    say!("tally sidecar: stopped");
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> SidecarFlags {
        SidecarFlags {
            broker: Some("https://broker:8443".into()),
            trust_bundle: Some("bundle.pem".into()),
            sa_token_file: Some("/var/run/token".into()),
            ..SidecarFlags::default()
        }
    }

    #[test]
    fn defaults_and_the_file_fill_what_flags_leave_out() {
        let file = "inbound_listen: 127.0.0.1:15006\nupstream: 127.0.0.1:8080\ninbound_nonces: yes\nallow_uids: [1000, 1001]\nclock_skew: 2s\n";
        let c = SidecarConfig::resolve(&flags(), Some(("sidecar.yaml", file))).unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:15020".parse().unwrap()));
        assert_eq!(
            c.inbound,
            Some(("127.0.0.1:15006".parse().unwrap(), "127.0.0.1:8080".into()))
        );
        assert!(c.inbound_nonces && !c.pass_credentials && !c.outbound_strict);
        assert_eq!(c.allow_uids, [1000, 1001]);
        assert_eq!(c.outbound_listen, None);
        assert_eq!((c.proof_max_age, c.clock_skew), (30, 2));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let flags = SidecarFlags {
            broker: Some("http://plain".into()),
            admin_listen: Some("nowhere".into()),
            ..SidecarFlags::default()
        };
        let file = "inbound_listen: 127.0.0.1:15006\noutbound_strict: maybe\ncolour: blue\nproof_max_age: forever\n";
        let errors = SidecarConfig::resolve(&flags, Some(("sidecar.yaml", file))).unwrap_err();
        let all = errors.join("\n");
        for expected in [
            "sidecar.yaml:3:1: unknown key \"colour\"",
            "outbound_strict \"maybe\"",
            "broker \"http://plain\"",
            "trust_bundle",
            "attestation",
            "admin_listen \"nowhere\"",
            "inbound_listen needs upstream",
            "proof_max_age \"forever\"",
        ] {
            assert!(all.contains(expected), "{expected} missing from:\n{all}");
        }
        assert_eq!(errors.len(), 8, "{all}");
    }
}
