//! `tally broker`: configuration, data directory, then the gRPC server
//! until SIGTERM or SIGINT.

use super::CliError;
use crate::broker::config::{BrokerConfig, BrokerFlags, PolicySourceChoice};
use crate::broker::{Broker, BrokerSettings, PolicySource};
use crate::clock::{Clock, SystemClock};
use crate::policy::Policy;
use crate::store::{Sealer, Store};
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub(super) fn run(flags: BrokerFlags) -> Result<ExitCode, CliError> {
    let file = match &flags.config {
        Some(path) => Some((path.display().to_string(), read_text(path)?)),
        None => None,
    };
    let config =
        BrokerConfig::resolve(&flags, file.as_ref().map(|(n, t)| (n.as_str(), t.as_str())))
            .map_err(|errors| {
                CliError::Usage(format!("bad configuration:\n  {}", errors.join("\n  ")))
            })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?;
    runtime.block_on(serve(config))
}

fn read_text(path: &Path) -> Result<String, CliError> {
    let meta =
        std::fs::metadata(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))?;
    if meta.len() > 1024 * 1024 {
        return Err(CliError::Usage(format!(
            "{}: larger than 1 MiB",
            path.display()
        )));
    }
    std::fs::read_to_string(path).map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

fn load_policy(path: Option<&PathBuf>, trust_domain: &str) -> Result<Policy, CliError> {
    match path {
        Some(p) => Policy::parse(&read_text(p)?)
            .map_err(|e| CliError::Usage(e.with_file(p.display().to_string()).to_string())),
        None => Policy::parse(&format!("trust_domain: {trust_domain}\n"))
            .map_err(|e| CliError::Usage(e.to_string())),
    }
}

/// Writes `bytes` to `path` atomically (temp file + rename) with `mode`.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CliError> {
    let failed = |e: std::io::Error| CliError::Failed(format!("writing {}: {e}", path.display()));
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(failed)?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(failed)?;
    std::fs::rename(&tmp, path).map_err(failed)
}

/// Reads `--ca-cert` and `--ca-key`, refusing a key file that group or
/// others can read.
fn supplied_root(cert: &Path, key: &Path) -> Result<crate::ca::SuppliedRoot, CliError> {
    let usage = |what: String| CliError::Usage(what);
    let meta =
        std::fs::metadata(key).map_err(|e| usage(format!("ca_key {}: {e}", key.display())))?;
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(usage(format!(
            "ca_key {} must not be readable by group or others (chmod 600)",
            key.display()
        )));
    }
    Ok(crate::ca::SuppliedRoot {
        cert_pem: read_text(cert)?,
        key_pem: zeroize::Zeroizing::new(read_text(key)?),
    })
}

fn sealer(config: &BrokerConfig) -> Result<Sealer, CliError> {
    let usage = |what: String| CliError::Usage(what);
    if let Some(path) = &config.store_key_file {
        let meta = std::fs::metadata(path)
            .map_err(|e| usage(format!("store key file {}: {e}", path.display())))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(usage(format!(
                "store key file {} must not be readable by group or others (chmod 600)",
                path.display()
            )));
        }
        let text = zeroize::Zeroizing::new(
            std::fs::read(path).map_err(|e| usage(format!("{}: {e}", path.display())))?,
        );
        return Sealer::from_key_material(&text)
            .map_err(|e| usage(format!("store key file {}: {e}", path.display())));
    }
    if let Ok(key) = std::env::var("TALLY_STORE_KEY") {
        return Sealer::from_key_material(key.as_bytes())
            .map_err(|e| usage(format!("TALLY_STORE_KEY: {e}")));
    }
    let path = config.data_dir.join("store.key");
    if !path.exists() {
        let key = Sealer::generate_key_text().map_err(|e| CliError::Failed(e.to_string()))?;
        write_file(&path, key.as_bytes(), 0o600)?;
        tracing::warn!(
            path = %path.display(),
            "generated a store sealing key next to the data; in production keep it elsewhere (--store-key-file or TALLY_STORE_KEY)"
        );
    }
    let text = zeroize::Zeroizing::new(
        std::fs::read(&path).map_err(|e| CliError::Failed(format!("{}: {e}", path.display())))?,
    );
    Sealer::from_key_material(&text)
        .map_err(|e| CliError::Usage(format!("{}: {e}", path.display())))
}

async fn bind(addr: std::net::SocketAddr, what: &str) -> Result<tokio::net::TcpListener, CliError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| CliError::Failed(format!("binding the {what} address {addr}: {e}")))
}

async fn serve(config: BrokerConfig) -> Result<ExitCode, CliError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| CliError::Failed(format!("{what}: {e}"));
    std::fs::create_dir_all(&config.data_dir).map_err(|e| failed("creating the data dir", &e))?;
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| failed("securing the data dir", &e))?;
    let policy = load_policy(config.policy.as_ref(), &config.trust_domain)?;
    let policy_yaml = config.policy.as_ref().map(|p| read_text(p)).transpose()?;
    // Bind first: a port in use fails fast, and port 0 gets its real
    // number before the issuer URL and certificates are made.
    let grpc = bind(config.grpc_listen, "gRPC").await?;
    let https = bind(config.http_listen, "HTTPS").await?;
    let admin_port = bind(config.admin_listen, "admin").await?;
    let local = |l: &tokio::net::TcpListener| {
        l.local_addr()
            .map_err(|e| failed("reading the bound address", &e))
    };
    let (grpc_addr, https_addr, admin_addr) = (local(&grpc)?, local(&https)?, local(&admin_port)?);

    let store = match &config.database_url {
        Some(url) => Store::open_postgres(&url.0, sealer(&config)?)
            .await
            .map_err(|e| failed(&format!("opening the PostgreSQL store at {url:?}"), &e))?,
        None => Store::open_sqlite(&config.data_dir.join("tally.db"), sealer(&config)?)
            .await
            .map_err(|e| failed("opening the store", &e))?,
    };
    let mut settings = BrokerSettings::new(&config.trust_domain, policy)
        .map_err(|e| CliError::Usage(e.to_string()))?;
    settings.policy_yaml = policy_yaml;
    settings.policy_source = match (config.policy_source, &config.policy) {
        (PolicySourceChoice::Store, _) | (_, None) => PolicySource::Store,
        (choice, Some(path)) => PolicySource::File {
            name: path.display().to_string(),
            overrides_applied: choice == PolicySourceChoice::File,
        },
    };
    settings.issuer = config
        .issuer
        .clone()
        .unwrap_or_else(|| format!("https://localhost:{}", https_addr.port()));
    settings.svid_ttl = config.svid_ttl;
    settings.key_rotation = config.key_rotation;
    settings.inventory_retention = config.inventory_retention;
    settings.limits = config.limits;
    settings.audit_file = Some(config.audit_file.clone());
    if let Some((cert, key)) = &config.ca_root {
        settings.ca_root = Some(supplied_root(cert, key)?);
    }
    if let Some((jwks, issuer, audience)) = &config.sa {
        let bytes = std::fs::read(jwks)
            .map_err(|e| CliError::Usage(format!("sa_jwks {}: {e}", jwks.display())))?;
        let keys = crate::identity::k8s::SaKeys::parse(&bytes)
            .map_err(|e| CliError::Usage(format!("sa_jwks {}: {e}", jwks.display())))?;
        tracing::info!(keys = keys.len(), %issuer, "ServiceAccount token attestation on");
        settings.service_accounts = Some((
            keys,
            crate::identity::k8s::SaTokenConfig {
                issuer: issuer.clone(),
                audience: audience.clone().unwrap_or_else(|| settings.issuer.clone()),
            },
        ));
    }
    let admin = settings
        .admins
        .first()
        .cloned()
        .ok_or_else(|| CliError::Usage("no admin identity configured".into()))?;
    let broker = Arc::new(
        Broker::open(settings, store, Arc::new(SystemClock))
            .await
            .map_err(|e| match e {
                // Settings that contradict what the store holds: the
                // operator must choose (exit 64, like any bad setting).
                crate::broker::BrokerError::Config(why) => {
                    CliError::Usage(format!("starting the broker: {why}"))
                }
                other => failed("starting the broker", &other),
            })?,
    );

    write_file(
        &config.data_dir.join("bundle.pem"),
        broker.bundle_pem().as_bytes(),
        0o644,
    )?;
    let admin_dir = config.data_dir.join("admin");
    std::fs::create_dir_all(&admin_dir).map_err(|e| failed("creating the admin dir", &e))?;
    let credential = broker
        .mint_credential(&admin, 30 * 86_400)
        .map_err(|e| failed("issuing the admin credential", &e))?;
    write_file(
        &admin_dir.join("cert.pem"),
        credential.cert_chain_pem.as_bytes(),
        0o644,
    )?;
    write_file(
        &admin_dir.join("key.pem"),
        credential.key_pem.as_bytes(),
        0o600,
    )?;

    let mut dns = vec!["localhost".to_owned()];
    dns.extend(config.dns_names.iter().cloned());
    let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    for addr in [grpc_addr, https_addr] {
        if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
    }
    // Renewed in place by the broker's upkeep task; no restart needed.
    let server_certs = broker
        .server_certs(&dns, &ips)
        .map_err(|e| failed("issuing the server certificate", &e))?;

    match (config.policy_source, config.policy.clone()) {
        (PolicySourceChoice::Store, _) | (_, None) => {
            let stored = broker
                .store()
                .policy_version(None)
                .await
                .map_err(|e| failed("reading the stored policy", &e))?;
            match stored {
                Some(v) => tracing::info!(
                    version = v.version,
                    "serving the stored trust policy (policy source: store)"
                ),
                None => tracing::warn!(
                    "no trust policy yet: every token request is denied until `tally ctl policy apply`"
                ),
            }
        }
        (_, Some(path)) => {
            tokio::spawn(reload_policy(Arc::clone(&broker), path));
        }
    }
    // Scheduled key rotation and the Watch change feed.
    tokio::spawn(crate::broker::run_maintenance(
        Arc::clone(&broker),
        Duration::from_secs(30),
    ));
    // Before the lines that say it is ready: a SIGTERM after them stops it
    // cleanly.
    let signal = shutdown_signal();
    // Scripts and tests wait for these lines instead of sleeping.
    say!(
        "tally broker: trust domain {}, gRPC (mTLS) listening on {grpc_addr}",
        config.trust_domain
    );
    say!(
        "tally broker: HTTPS (OAuth token endpoint, JWKS) listening on {https_addr}, issuer {}",
        broker.issuer()
    );
    say!("tally broker: admin (/metrics, /healthz, /readyz) listening on {admin_addr}");
    say!(
        "tally broker: data in {}; admin credential in {}; audit log {}",
        config.data_dir.display(),
        admin_dir.display(),
        config.audit_file.display()
    );

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let on_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc_server = crate::broker::serve(
        Arc::clone(&broker),
        grpc,
        Arc::clone(&server_certs),
        on_stop(stopped.clone()),
    );
    let https_server = crate::broker::serve_https(
        Arc::clone(&broker),
        https,
        server_certs,
        on_stop(stopped.clone()),
    );
    let admin_server =
        crate::broker::serve_admin(Arc::clone(&broker), admin_port, on_stop(stopped.clone()));
    let servers = async {
        let (g, h, a) = tokio::join!(grpc_server, https_server, admin_server);
        g.map_err(|e| failed("gRPC server", &e))?;
        h.map_err(|e| failed("HTTPS server", &e))?;
        a.map_err(|e| failed("admin server", &e))
    };
    // In-flight calls get DRAIN to finish; a client that never lets go of
    // its connection does not keep the broker from exiting.
    let signal_then_drain = async {
        signal.await;
        stop.send_replace(true);
        tokio::time::sleep(DRAIN).await;
    };
    tokio::select! {
        result = servers => result?,
        () = signal_then_drain => tracing::warn!("connections still open {} s after the shutdown signal; exiting anyway", DRAIN.as_secs()),
    }
    say!("tally broker: stopped");
    Ok(ExitCode::SUCCESS)
}

/// How long shutdown waits for connections to finish.
const DRAIN: Duration = Duration::from_secs(10);

/// Resolves on SIGTERM or SIGINT. The handlers are in place when this
/// returns, not when the future is first polled: a signal that arrives
/// after a process has said it is ready (but before it awaits this) must
/// stop it cleanly, not kill it (no handler yet) or be lost.
pub(super) fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot watch SIGTERM or SIGINT; stopping on Ctrl-C only");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down: no new connections, finishing calls in flight");
    }
}

/// Reloads the policy file when it changes. A file that does not parse is
/// logged with every error and the running policy stays.
async fn reload_policy(broker: Arc<Broker>, path: PathBuf) {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let mut seen = modified(&path);
    tracing::info!(path = %path.display(), "watching the policy file for changes");
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tick.tick().await;
        let now = modified(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let read = read_text(&path).map_err(|e| e.to_string());
        let name = path.display().to_string();
        let result = broker.reload_policy_file(&name, read).await;
        match &result {
            Ok(()) => {
                tracing::info!(path = %path.display(), at = SystemClock.now(), "policy reloaded");
            }
            Err(errors) => {
                tracing::error!(path = %path.display(), %errors, "policy NOT reloaded; keeping the previous one");
            }
        }
    }
}
