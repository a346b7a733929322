//! Starting a broker: the one path from its parts to a running broker
//! with every background task. `tally broker`, `tally demo`, the load
//! tools and the tests all start here, so all of them run the same
//! upkeep.
//!
//! [`start`] opens the [`Broker`] on the store, writes the trust bundle
//! and an admin credential into the data directory (when there is one),
//! issues the listeners' certificate, and spawns: the front ends on the
//! listeners given, the upkeep (key and intermediate rotation, inventory
//! pruning, the change feed) every [`Parts::upkeep_every`], the cluster's
//! ServiceAccount token keys (discovery) kept fresh, following
//! the other replicas' changes (PostgreSQL), and the policy file watcher
//! (file policy source). Signals are the caller's: the servers stop when
//! the shutdown future resolves.

use super::serve::tls::ServerCerts;
use super::{Broker, BrokerError, BrokerSettings};
use crate::clock::{Clock, SystemClock};
use crate::store::Store;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// Why a broker did not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A setting is wrong or contradicts what the store holds: the
    /// operator must choose (`tally broker` exits 64).
    #[error("{0}")]
    Config(String),
    /// Something failed that is not a setting (I/O, the store, a server).
    #[error("{0}")]
    Failed(String),
}

impl StartError {
    pub(crate) fn failed(what: &str, e: &dyn std::fmt::Display) -> Self {
        Self::Failed(format!("{what}: {e}"))
    }
}

/// What a broker is made of.
pub struct Parts {
    /// Its settings.
    pub settings: BrokerSettings,
    /// Its store (SQLite or PostgreSQL).
    pub store: Store,
    /// The clock it reads.
    pub clock: Arc<dyn Clock>,
    /// DNS names for the listeners' certificate besides `localhost` (the
    /// bound IPs, and 127.0.0.1, are always in it).
    pub dns_names: Vec<String>,
    /// Where `bundle.pem` and `admin/{cert,key}.pem` are written (the
    /// data directory), if anywhere.
    pub data_dir: Option<PathBuf>,
    /// The policy file to watch (file policy source): each change is
    /// stored as a version and served.
    pub policy_file: Option<PathBuf>,
    /// How often the upkeep runs.
    pub upkeep_every: Duration,
}

impl Parts {
    /// `settings` on `store`, the system clock, no data directory, upkeep
    /// every 30 s.
    pub fn new(settings: BrokerSettings, store: Store) -> Self {
        Self {
            settings,
            store,
            clock: Arc::new(SystemClock),
            dns_names: Vec::new(),
            data_dir: None,
            policy_file: None,
            upkeep_every: Duration::from_secs(30),
        }
    }

    /// The same with `clock`.
    #[must_use]
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("trust_domain", &self.settings.trust_domain)
            .field("data_dir", &self.data_dir)
            .field("policy_file", &self.policy_file)
            .finish_non_exhaustive()
    }
}

/// The listeners a broker serves on, bound by the caller (so a port in
/// use fails before anything starts, and port 0 has its number).
#[derive(Debug)]
pub struct Listeners {
    /// gRPC over mTLS: Identity, Tokens, Watch, Admin, Reports.
    pub grpc: TcpListener,
    /// HTTPS: the OAuth endpoints, JWKS, metadata.
    pub https: Option<TcpListener>,
    /// Plain HTTP: `/metrics`, `/healthz`, `/readyz`.
    pub admin: Option<TcpListener>,
}

/// A running broker.
pub struct Running {
    /// Its state.
    pub broker: Arc<Broker>,
    /// The listeners' certificate.
    pub certs: Arc<ServerCerts>,
    /// Where each listener is.
    pub grpc: SocketAddr,
    /// The HTTPS listener, when it has one.
    pub https: Option<SocketAddr>,
    /// The admin listener, when it has one.
    pub admin: Option<SocketAddr>,
    /// The admin credential's directory, when there is a data directory.
    pub admin_dir: Option<PathBuf>,
    servers: tokio::task::JoinHandle<Result<(), StartError>>,
    background: Vec<tokio::task::AbortHandle>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("grpc", &self.grpc)
            .field("https", &self.https)
            .field("admin", &self.admin)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// Waits for the servers to end (after the shutdown future resolved
    /// and calls in flight finished), then stops the background tasks.
    ///
    /// # Errors
    /// [`StartError::Failed`] if a server failed, or its task panicked.
    pub async fn wait(self) -> Result<(), StartError> {
        let result = self.servers.await;
        for task in &self.background {
            task.abort();
        }
        match result {
            Ok(result) => result,
            Err(e) => Err(StartError::failed("the broker's servers", &e)),
        }
    }

    /// One run of the upkeep: [`Broker::maintain`], then the listeners'
    /// certificate renewed if due (the periodic task does the same).
    ///
    /// # Errors
    /// [`BrokerError`].
    pub async fn upkeep(&self) -> Result<Option<String>, BrokerError> {
        upkeep_once(&self.broker, &self.certs).await
    }
}

async fn upkeep_once(broker: &Broker, certs: &ServerCerts) -> Result<Option<String>, BrokerError> {
    let rotated = broker.maintain().await?;
    certs.renew_if_due().map_err(BrokerError::Config)?;
    Ok(rotated)
}

/// Starts a broker from `parts` on `listeners`; its servers run until
/// `shutdown` resolves.
///
/// # Errors
/// [`StartError::Config`] for settings that contradict each other or the
/// store, [`StartError::Failed`] otherwise.
pub async fn start(
    parts: Parts,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Running, StartError> {
    let local = |l: &TcpListener| {
        l.local_addr()
            .map_err(|e| StartError::failed("reading the bound address", &e))
    };
    let grpc = local(&listeners.grpc)?;
    let https = listeners.https.as_ref().map(local).transpose()?;
    let admin = listeners.admin.as_ref().map(local).transpose()?;
    let broker = Arc::new(
        Broker::open(parts.settings, parts.store, parts.clock)
            .await
            .map_err(|e| match e {
                BrokerError::Config(why) => {
                    StartError::Config(format!("starting the broker: {why}"))
                }
                BrokerError::Deployment(why) => {
                    StartError::Config(format!("starting the broker: {why}"))
                }
                other => StartError::failed("starting the broker", &other),
            })?,
    );
    let admin_dir = match &parts.data_dir {
        Some(dir) => Some(write_credentials(&broker, dir)?),
        None => None,
    };

    let mut dns = vec!["localhost".to_owned()];
    dns.extend(parts.dns_names.iter().cloned());
    let mut ips = vec![std::net::IpAddr::from([127, 0, 0, 1])];
    for addr in std::iter::once(grpc).chain(https) {
        if !addr.ip().is_unspecified() && !ips.contains(&addr.ip()) {
            ips.push(addr.ip());
        }
    }
    let certs = Arc::new(
        ServerCerts::new(Arc::clone(&broker), dns, ips)
            .map_err(|e| StartError::failed("issuing the server certificate", &e))?,
    );

    let mut background = Vec::new();
    match parts.policy_file {
        None => announce_stored_policy(&broker).await?,
        Some(path) => {
            background.push(tokio::spawn(reload_policy(Arc::clone(&broker), path)).abort_handle());
        }
    }
    background.push(
        tokio::spawn(run_upkeep(
            Arc::clone(&broker),
            Arc::clone(&certs),
            parts.upkeep_every,
        ))
        .abort_handle(),
    );
    if let Some(keys) = broker
        .settings()
        .service_accounts
        .as_ref()
        .and_then(|sa| sa.discovered())
    {
        background
            .push(tokio::spawn(super::cluster::keys::keep_fresh(Arc::clone(keys))).abort_handle());
    }
    // With a store shared by replicas, follow what the others commit.
    background.push(tokio::spawn(super::replicas::follow(Arc::downgrade(&broker))).abort_handle());

    let servers = tokio::spawn(serve_all(
        Arc::clone(&broker),
        Arc::clone(&certs),
        listeners,
        shutdown,
    ));
    Ok(Running {
        broker,
        certs,
        grpc,
        https,
        admin,
        admin_dir,
        servers,
        background,
    })
}

/// Serves every listener until `shutdown` resolves and each has drained.
async fn serve_all(
    broker: Arc<Broker>,
    certs: Arc<ServerCerts>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let on_stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        // An error means the sender is gone, which also means stop.
        let _ = rx.wait_for(|s| *s).await;
    };
    let grpc = super::serve::serve_grpc(
        Arc::clone(&broker),
        listeners.grpc,
        Arc::clone(&certs),
        on_stop(stopped.clone()),
    );
    let https = async {
        match listeners.https {
            Some(l) => {
                super::serve::serve_https(Arc::clone(&broker), l, certs, on_stop(stopped.clone()))
                    .await
            }
            None => Ok(()),
        }
    };
    let admin = async {
        match listeners.admin {
            Some(l) => {
                super::serve::serve_admin(Arc::clone(&broker), l, on_stop(stopped.clone())).await
            }
            None => Ok(()),
        }
    };
    let signal = async move {
        shutdown.await;
        stop.send_replace(true);
    };
    let ((g, h, a), ()) = tokio::join!(async { tokio::join!(grpc, https, admin) }, signal);
    g.map_err(|e| StartError::failed("gRPC server", &e))?;
    h.map_err(|e| StartError::failed("HTTPS server", &e))?;
    a.map_err(|e| StartError::failed("admin server", &e))
}

/// Writes the trust bundle and a 30-day admin credential into `dir`;
/// returns the credential's directory.
fn write_credentials(broker: &Broker, dir: &Path) -> Result<PathBuf, StartError> {
    let admin = broker
        .settings()
        .admins
        .first()
        .cloned()
        .ok_or_else(|| StartError::Config("no admin identity configured".into()))?;
    write_file(
        &dir.join("bundle.pem"),
        broker.bundle_pem().as_bytes(),
        0o644,
    )?;
    let admin_dir = dir.join("admin");
    std::fs::create_dir_all(&admin_dir)
        .map_err(|e| StartError::failed("creating the admin dir", &e))?;
    let credential = broker
        .mint_credential(&admin, 30 * 86_400)
        .map_err(|e| StartError::failed("issuing the admin credential", &e))?;
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
    Ok(admin_dir)
}

/// Writes `bytes` to `path` atomically (temp file + rename, synced) with
/// `mode`.
///
/// # Errors
/// [`StartError::Failed`] naming the file.
pub(crate) fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), StartError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let failed = |e: std::io::Error| StartError::Failed(format!("writing {}: {e}", path.display()));
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

/// Says which policy a store-sourced broker serves.
async fn announce_stored_policy(broker: &Broker) -> Result<(), StartError> {
    let stored = broker
        .store()
        .policy_version(None)
        .await
        .map_err(|e| StartError::failed("reading the stored policy", &e))?;
    match stored {
        Some(v) => tracing::info!(
            version = v.version,
            "serving the stored trust policy (policy source: store)"
        ),
        None => tracing::warn!(
            "no trust policy yet: every token request is denied until `tally ctl policy apply`"
        ),
    }
    Ok(())
}

/// Runs the upkeep every `every` until the broker closes.
async fn run_upkeep(broker: Arc<Broker>, certs: Arc<ServerCerts>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = broker.closed() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = upkeep_once(&broker, &certs).await {
            tracing::error!(error = %e, "broker upkeep (key rotation, change feed) failed; retrying");
        }
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
        let read = crate::config::read_text(&path).map_err(|e| e.to_string());
        let name = path.display().to_string();
        let result = broker.reload_policy_file(&name, read).await;
        match &result {
            Ok(()) => {
                tracing::info!(path = %path.display(), at = broker.now(), "policy reloaded");
            }
            Err(errors) => {
                tracing::error!(path = %path.display(), %errors, "policy NOT reloaded; keeping the previous one");
            }
        }
    }
}
