//! The mesh the tour runs on: a broker, the payments app behind its
//! sidecar's inbound proxy, and the checkout sidecar (socket API and
//! outbound proxy), all on loopback (steps 1 to 3).

use super::app::{addr_of, bind, payments_app};
use super::{CHECKOUT, PAYMENTS, POLICY, TRUST_DOMAIN, failed};
use crate::broker::BrokerSettings;
use crate::cli::CliError;
use crate::clock::{Clock, SystemClock};
use crate::sidecar::api::{self, ServiceMap};
use crate::sidecar::cache::CacheConfig;
use crate::sidecar::identity::Attestation;
use crate::sidecar::inbound::InboundConfig;
use crate::sidecar::outbound::OutboundConfig;
use crate::sidecar::run::{Listeners, Sidecar, SidecarSettings};
use crate::store::{Sealer, Store};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// The running parts.
pub(super) struct Mesh {
    pub(super) broker: Arc<crate::broker::Broker>,
    pub(super) clock: Arc<dyn Clock>,
    pub(super) payments: Sidecar,
    pub(super) checkout: Sidecar,
    /// The checkout sidecar's local API.
    pub(super) socket: PathBuf,
    /// The payments sidecar's inbound proxy.
    pub(super) inbound_addr: SocketAddr,
    /// The checkout sidecar's outbound proxy.
    pub(super) outbound_addr: SocketAddr,
    /// The payments sidecar's admin port.
    pub(super) payments_admin_addr: SocketAddr,
    running: crate::broker::Running,
    broker_stop: tokio::sync::oneshot::Sender<()>,
    app_stop: tokio::sync::oneshot::Sender<()>,
}

impl Mesh {
    /// Starts everything, the broker's store in `scratch`.
    ///
    /// # Errors
    /// [`CliError::Failed`] naming the part that did not start.
    pub(super) async fn start(scratch: &std::path::Path) -> Result<Self, CliError> {
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        say!("tally demo: DPoP-bound workload tokens on loopback\n");
        say!(
            "1. A broker for trust domain {TRUST_DOMAIN} (embedded SQLite store in {})",
            scratch.display()
        );
        let key = Sealer::generate_key_text().map_err(|e| failed("making a store key", &e))?;
        let store = Store::open_sqlite(
            &scratch.join("tally.db"),
            Sealer::from_key_material(key.as_bytes()).map_err(|e| failed("store key", &e))?,
        )
        .await
        .map_err(|e| failed("opening the store", &e))?;
        let grpc = bind().await?;
        let grpc_addr = addr_of(&grpc)?;
        let mut settings = BrokerSettings::with_policy(TRUST_DOMAIN, POLICY)
            .map_err(|e| failed("the demo policy", &e))?;
        settings.issuer = format!("https://localhost:{}", grpc_addr.port());
        settings.audit_file = Some(scratch.join("audit.jsonl"));
        let (broker_stop, broker_stopped) = tokio::sync::oneshot::channel::<()>();
        let parts = crate::broker::Parts::new(settings, store).clock(Arc::clone(&clock));
        let listeners = crate::broker::Listeners {
            grpc,
            https: None,
            admin: None,
        };
        let running = crate::broker::start(parts, listeners, async {
            let _ = broker_stopped.await;
        })
        .await
        .map_err(|e| failed("starting the broker", &e))?;
        let broker = Arc::clone(&running.broker);
        let broker_url = format!("https://localhost:{}", grpc_addr.port());
        say!(
            "   gRPC (mTLS) on {grpc_addr}; policy: checkout may charge payments; payments accepts POST /v1/charges with payments:charge from checkout\n"
        );

        let (app_addr, app_stop) = payments_app(bind().await?)?;
        say!("2. The payments API on {app_addr}, behind its sidecar's inbound verifying proxy");
        let join = |id: &'static str| {
            let broker = Arc::clone(&broker);
            async move {
                let id = id.parse().map_err(|e| failed("demo ID", &e))?;
                let token = broker
                    .create_join_token(&id, 300, None)
                    .await
                    .map_err(|e| failed("a join token", &e))?;
                Ok::<_, CliError>(Attestation::JoinToken(token.expose().to_owned().into()))
            }
        };
        let sidecar_settings = |attestation, services, inbound| SidecarSettings {
            limits: crate::http::Limits::default(),
            broker: broker_url.clone(),
            bundle_pem: broker.bundle_pem(),
            attestation,
            services,
            allowed_uids: None,
            cache: CacheConfig::default(),
            inbound,
            ext_authz: None,
            inbound_nonces: false,
            outbound: OutboundConfig {
                strict: true,
                ..OutboundConfig::default()
            },
            watch_staleness: 30,
        };
        let (inbound, payments_admin) = (bind().await?, bind().await?);
        let (inbound_addr, payments_admin_addr) = (addr_of(&inbound)?, addr_of(&payments_admin)?);
        let payments = Sidecar::start(
            sidecar_settings(
                join(PAYMENTS).await?,
                ServiceMap::default(),
                Some(InboundConfig {
                    // Refusals reach the broker's audit log within the tour.
                    report_every: Duration::from_millis(200),
                    ..InboundConfig::new(app_addr.to_string())
                }),
            ),
            Listeners {
                inbound: Some(inbound),
                admin: Some(payments_admin),
                ..Listeners::default()
            },
            Arc::clone(&clock),
        )
        .await
        .map_err(|e| failed("the payments sidecar", &e))?;
        say!(
            "   payments sidecar: {PAYMENTS}, inbound proxy on {inbound_addr}, admin on {payments_admin_addr}\n"
        );

        say!("3. The checkout client's sidecar: local API socket and outbound proxy");
        let socket = scratch.join("checkout.sock");
        let outbound = bind().await?;
        let outbound_addr = addr_of(&outbound)?;
        let services = ServiceMap::new([(
            inbound_addr.to_string(),
            PAYMENTS.parse().map_err(|e| failed("demo audience", &e))?,
        )])
        .map_err(|e| failed("demo service map", &e[0]))?;
        let checkout = Sidecar::start(
            sidecar_settings(join(CHECKOUT).await?, services, None),
            Listeners {
                socket: Some(api::bind(&socket).map_err(|e| failed("binding the socket", &e))?),
                outbound: Some(outbound),
                ..Listeners::default()
            },
            Arc::clone(&clock),
        )
        .await
        .map_err(|e| failed("the checkout sidecar", &e))?;
        for (name, sidecar) in [("payments", &payments), ("checkout", &checkout)] {
            if !sidecar.ready(Duration::from_secs(10)).await {
                return Err(CliError::Failed(format!(
                    "the {name} sidecar did not receive the broker's keys and rules"
                )));
            }
        }
        say!(
            "   checkout sidecar: {CHECKOUT}, socket {}, outbound proxy on {outbound_addr}",
            socket.display()
        );
        say!(
            "   Both attested with one-time join tokens and hold X.509-SVIDs; each SVID key, which is also the DPoP key, never leaves its sidecar.\n"
        );
        Ok(Self {
            broker,
            clock,
            payments,
            checkout,
            socket,
            inbound_addr,
            outbound_addr,
            payments_admin_addr,
            running,
            broker_stop,
            app_stop,
        })
    }

    /// Stops the sidecars, the app and the broker, and waits for each.
    ///
    /// # Errors
    /// [`CliError::Failed`] naming the part that failed.
    pub(super) async fn stop(self) -> Result<(), CliError> {
        let stopped = tokio::join!(self.checkout.stop(), self.payments.stop());
        let _ = self.app_stop.send(());
        let _ = self.broker_stop.send(());
        self.running
            .wait()
            .await
            .map_err(|e| failed("the broker", &e))?;
        stopped.0.map_err(|e| failed("the checkout sidecar", &e))?;
        stopped.1.map_err(|e| failed("the payments sidecar", &e))
    }
}
