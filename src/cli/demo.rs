//! `tally demo`: a broker, two sidecars and two tiny apps on loopback, and
//! a narrated tour of what DPoP-bound tokens stop. Each step checks its
//! outcome; the demo exits 0 only if every step went as the narration
//! says, so it doubles as a smoke test of the whole system.

use super::CliError;
use crate::broker::BrokerSettings;
use crate::clock::{Clock, SystemClock};
use crate::dpop::ProofKey;
use crate::http::{Answer, json, send};
use crate::sidecar::api::{self, ServiceMap};
use crate::sidecar::cache::CacheConfig;
use crate::sidecar::identity::Attestation;
use crate::sidecar::inbound::InboundConfig;
use crate::sidecar::outbound::OutboundConfig;
use crate::sidecar::run::{Listeners, Sidecar, SidecarSettings};
use crate::store::{Sealer, Store};
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Arguments of `tally demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Stay up after the tour and print commands to try (Ctrl-C ends it).
    #[arg(long)]
    keep_running: bool,
    /// Keep the broker's store and audit log in this directory (created;
    /// it must not exist yet) instead of a scratch directory removed at
    /// the end.
    #[arg(long)]
    data_dir: Option<std::path::PathBuf>,
}

const TRUST_DOMAIN: &str = "demo.tally";
const CHECKOUT: &str = "spiffe://demo.tally/ns/shop/sa/checkout";
const PAYMENTS: &str = "spiffe://demo.tally/ns/pay/sa/payments";
const POLICY: &str = "\
trust_domain: demo.tally
issue:
  - from: spiffe://demo.tally/ns/shop/sa/checkout
    to: spiffe://demo.tally/ns/pay/sa/payments
    scopes: [payments:charge, payments:read]
    class: service
    rate: 100/s
access:
  - workload: spiffe://demo.tally/ns/pay/sa/payments
    allow:
      - from: spiffe://demo.tally/ns/shop/sa/checkout
        methods: [POST]
        paths: [/v1/charges]
        scopes: [payments:charge]
      - from: spiffe://demo.tally/ns/shop/sa/checkout
        methods: [GET]
        paths: [/v1/charges/*]
        scopes: [payments:read]
";

/// Largest answer the demo reads.
const MAX_ANSWER: usize = 64 * 1024;

pub(super) fn run(args: DemoArgs) -> Result<ExitCode, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("starting the runtime: {e}")))?
        .block_on(demo(args))
}

/// What the tour found: steps that went as narrated, and those that did not.
#[derive(Default)]
struct Tally {
    passed: u32,
    failed: Vec<String>,
}

impl Tally {
    /// Records whether `step` saw `expected`, printing the outcome.
    fn check(&mut self, step: &str, answer: &Answer, expected: StatusCode) {
        if answer.status == expected {
            self.passed += 1;
            say!("   ✓ {} as expected", answer.status);
        } else {
            say!(
                "   ✗ expected {expected}, got {}: {}",
                answer.status,
                String::from_utf8_lossy(&answer.body)
            );
            self.failed.push(format!("{step}: {}", answer.status));
        }
    }

    /// Records whether `step` went as narrated (`what` says what it saw).
    fn expect(&mut self, step: &str, ok: bool, what: &str) {
        if ok {
            self.passed += 1;
            say!("   ✓ {what}");
        } else {
            say!("   ✗ {what}");
            self.failed.push(step.to_owned());
        }
    }
}

/// The first and last characters of a token, and its length.
fn short(token: &str) -> String {
    if token.len() <= 24 {
        return token.to_owned();
    }
    format!(
        "{}…{} ({} chars)",
        &token[..14],
        &token[token.len() - 6..],
        token.len()
    )
}

fn request(
    method: &str,
    target: &str,
    host: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(method)
        .uri(target)
        .header(http::header::HOST, host);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap_or_else(|_| Request::new(Full::new(Bytes::new())))
}

async fn call(addr: SocketAddr, req: Request<Full<Bytes>>) -> Result<Answer, CliError> {
    send(addr, req, MAX_ANSWER)
        .await
        .map_err(|e| CliError::Failed(format!("demo request: {e}")))
}

/// The payments API: charges, and who asked for them (from the headers
/// the inbound proxy set).
async fn payments_app() -> Result<(SocketAddr, tokio::sync::oneshot::Sender<()>), CliError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Failed(format!("binding the payments app: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Failed(e.to_string()))?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let next = Arc::new(AtomicU64::new(1));
    tokio::spawn(crate::http::serve(
        listener,
        crate::http::Listen::new("demo app"),
        move |req: Request<hyper::body::Incoming>, _peer| {
            let next = Arc::clone(&next);
            async move {
                let header = |name: &str| {
                    req.headers()
                        .get(name)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned()
                };
                let (caller, scopes) = (header("x-tally-caller"), header("x-tally-scopes"));
                let leaked = req.headers().contains_key(http::header::AUTHORIZATION);
                match (req.method().as_str(), req.uri().path()) {
                    ("POST", "/v1/charges") => {
                        let id = next.fetch_add(1, Ordering::Relaxed);
                        json(
                            StatusCode::CREATED,
                            &serde_json::json!({
                                "charge": format!("ch_{id}"),
                                "requested_by": caller,
                                "scopes": scopes,
                                "app_saw_a_token": leaked,
                            }),
                        )
                    }
                    ("GET", path) if path.starts_with("/v1/charges/") => json(
                        StatusCode::OK,
                        &serde_json::json!({
                            "charge": path.trim_start_matches("/v1/charges/"),
                            "status": "succeeded",
                            "requested_by": caller,
                        }),
                    ),
                    _ => json(
                        StatusCode::NOT_FOUND,
                        &serde_json::json!({"error": "not_found"}),
                    ),
                }
            }
        },
        async {
            let _ = stopped.await;
        },
    ));
    Ok((addr, stop))
}

async fn bind() -> Result<tokio::net::TcpListener, CliError> {
    tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Failed(format!("binding a loopback port: {e}")))
}

fn addr_of(l: &tokio::net::TcpListener) -> Result<SocketAddr, CliError> {
    l.local_addr().map_err(|e| CliError::Failed(e.to_string()))
}

#[expect(
    clippy::too_many_lines,
    reason = "the tour reads top to bottom, one step after another"
)]
async fn demo(args: DemoArgs) -> Result<ExitCode, CliError> {
    let failed = |what: &str, e: &dyn std::fmt::Display| CliError::Failed(format!("{what}: {e}"));
    let scratch = match &args.data_dir {
        Some(dir) => super::ScratchDir::keep(dir)?,
        None => super::ScratchDir::new("demo")?,
    };
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);

    say!("tally demo: DPoP-bound workload tokens on loopback\n");
    say!(
        "1. A broker for trust domain {TRUST_DOMAIN} (embedded SQLite store in {})",
        scratch.path().display()
    );
    let key = Sealer::generate_key_text().map_err(|e| failed("making a store key", &e))?;
    let store = Store::open_sqlite(
        &scratch.path().join("tally.db"),
        Sealer::from_key_material(key.as_bytes()).map_err(|e| failed("store key", &e))?,
    )
    .await
    .map_err(|e| failed("opening the store", &e))?;
    let grpc = bind().await?;
    let grpc_addr = addr_of(&grpc)?;
    let mut settings = BrokerSettings::with_policy(TRUST_DOMAIN, POLICY)
        .map_err(|e| failed("the demo policy", &e))?;
    settings.issuer = format!("https://localhost:{}", grpc_addr.port());
    settings.audit_file = Some(scratch.path().join("audit.jsonl"));
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

    let (app_addr, app_stop) = payments_app().await?;
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
    let socket = scratch.path().join("checkout.sock");
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
        "   Both attested with one-time join tokens and hold X.509-SVIDs and DPoP keys that never leave them.\n"
    );

    let mut tally = Tally::default();
    let host = inbound_addr.to_string();
    let charges = format!("http://{inbound_addr}/v1/charges");

    say!(
        "4. checkout charges a card through its outbound proxy (the app sets HTTP_PROXY, nothing else)"
    );
    say!("   POST {charges}  via proxy {outbound_addr}");
    let answer = call(
        outbound_addr,
        request(
            "POST",
            &charges,
            &host,
            &[
                ("x-tally-scope", "payments:charge"),
                ("content-type", "application/json"),
            ],
            r#"{"amount": 1250}"#,
        ),
    )
    .await?;
    tally.check(
        "call through the outbound proxy",
        &answer,
        StatusCode::CREATED,
    );
    say!(
        "   the payments app received: {}\n",
        String::from_utf8_lossy(&answer.body)
    );

    say!(
        "5. The same through the socket API: the app asks for headers, then sends the request itself"
    );
    let charge = |authorization: String, dpop: String, body: &'static str| {
        let host = host.clone();
        async move {
            let headers = [
                ("authorization", authorization.as_str()),
                ("dpop", dpop.as_str()),
            ];
            call(
                inbound_addr,
                request("POST", "/v1/charges", &host, &headers, body),
            )
            .await
        }
    };
    let (status, authorization, proof, why) =
        headers_for(&socket, &charges, "payments:charge").await?;
    if status != 200 {
        return Err(CliError::Failed(format!(
            "/v1/authorize answered {status}: {why}"
        )));
    }
    let token = authorization.trim_start_matches("DPoP ").to_owned();
    say!("   Authorization: DPoP {}", short(&token));
    say!("   DPoP: {}", short(&proof));
    let answer = charge(authorization.clone(), proof.clone(), r#"{"amount": 990}"#).await?;
    tally.check(
        "call with headers from the socket",
        &answer,
        StatusCode::CREATED,
    );
    say!(
        "   the payments app received: {}",
        String::from_utf8_lossy(&answer.body)
    );
    say!("   (the app got the caller's identity in x-tally-caller, never the token)\n");

    say!("6. A thief copies that token from a log and signs a proof with a key of their own");
    let thief = ProofKey::generate().map_err(|e| failed("the thief's key", &e))?;
    let forged = thief
        .mint("POST", &charges, Some(&token), None, clock.now())
        .map_err(|e| failed("the thief's proof", &e))?;
    let answer = charge(authorization.clone(), forged, "{}").await?;
    tally.check(
        "stolen token, thief's key",
        &answer,
        StatusCode::UNAUTHORIZED,
    );
    say!(
        "   WWW-Authenticate: {}",
        header(&answer, "www-authenticate")
    );
    say!("   ...and replays the exact request it captured, proof and all");
    let answer = charge(authorization, proof, "{}").await?;
    tally.check("replayed request", &answer, StatusCode::UNAUTHORIZED);
    say!(
        "   WWW-Authenticate: {}\n",
        header(&answer, "www-authenticate")
    );

    say!("7. A proof made for one URL, sent to another");
    let refunds = format!("http://{inbound_addr}/v1/refunds");
    let (_, authorization, other, _) = headers_for(&socket, &refunds, "payments:charge").await?;
    let answer = charge(authorization, other, "{}").await?;
    tally.check("proof for another URL", &answer, StatusCode::UNAUTHORIZED);
    say!(
        "   WWW-Authenticate: {}\n",
        header(&answer, "www-authenticate")
    );

    say!("8. checkout asks for a scope the policy does not grant (payments:refund)");
    let (status, _, _, why) = headers_for(&socket, &charges, "payments:refund").await?;
    let answer = Answer {
        status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        headers: http::HeaderMap::new(),
        body: Bytes::from(why.clone()),
    };
    tally.check("scope not granted", &answer, StatusCode::FORBIDDEN);
    say!("   {why}");
    say!("   ...and with a read-only token, tries to charge anyway");
    let (_, authorization, read_only, _) = headers_for(&socket, &charges, "payments:read").await?;
    let answer = charge(authorization, read_only, "{}").await?;
    tally.check(
        "read-only token on a charge",
        &answer,
        StatusCode::FORBIDDEN,
    );
    say!(
        "   WWW-Authenticate: {}\n",
        header(&answer, "www-authenticate")
    );

    say!("9. The security team revokes the checkout workload (a compromised pod)");
    let before = payments.parts().mesh.borrow().revocations_seen;
    let admin = format!("spiffe://{TRUST_DOMAIN}/admin")
        .parse()
        .map_err(|e| failed("admin ID", &e))?;
    let checkout_id = CHECKOUT.parse().map_err(|e| failed("demo ID", &e))?;
    // Headers the compromised pod obtained just before.
    let (status, held, held_proof, why) = headers_for(&socket, &charges, "payments:charge").await?;
    if status != 200 {
        return Err(CliError::Failed(format!(
            "/v1/authorize answered {status}: {why}"
        )));
    }
    let revoked_at = std::time::Instant::now();
    let (sequence, _) = broker
        .revoke(
            crate::token::RevocationTarget::Subject(checkout_id),
            None,
            "demo: compromised pod",
            &admin,
        )
        .await
        .map_err(|e| failed("revoking", &e))?;
    let mut mesh = payments.parts().mesh.clone();
    tokio::time::timeout(
        Duration::from_secs(10),
        mesh.wait_for(|m| m.revocations_seen > before),
    )
    .await
    .map_err(|_| CliError::Failed("the revocation did not reach the payments sidecar".into()))?
    .map_err(|e| failed("the payments sidecar", &e))?;
    let lag = revoked_at.elapsed();
    say!(
        "   revoked (watch sequence {sequence}); the payments sidecar enforced it {:.1} ms after the call",
        lag.as_secs_f64() * 1000.0
    );
    let answer = charge(held, held_proof, "{}").await?;
    tally.check(
        "call after the workload was revoked",
        &answer,
        StatusCode::UNAUTHORIZED,
    );
    say!(
        "   WWW-Authenticate: {}\n",
        header(&answer, "www-authenticate")
    );

    say!(
        "10. The stolen token turns up in a paste: what did it do? (`tally ctl audit lookup --token`)"
    );
    // The payments sidecar reports its refusals every 200 ms here (10 s by
    // default); wait for the thief's attempts to be in the log.
    let refused_uses = |found: &Option<crate::broker::governance::TokenLookup>| -> u64 {
        found.as_ref().map_or(0, |f| {
            f.records
                .iter()
                .filter(|r| r.kind == crate::audit::AuditKind::VerifyFailure.as_str())
                .filter_map(|r| serde_json::from_str::<serde_json::Value>(&r.line).ok())
                .filter_map(|v| v["count"].as_u64())
                .sum()
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let found = loop {
        let found = broker
            .lookup_token(&token)
            .await
            .map_err(|e| failed("looking up the token", &e))?;
        // The thief's two attempts (step 6), at least.
        if refused_uses(&found) >= 2 || std::time::Instant::now() > deadline {
            break found;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    match &found {
        Some(f) => {
            say!(
                "   issued to {} for {} ({}); {}",
                f.token.sub,
                f.token.aud,
                f.token.scope,
                if f.revoked { "revoked" } else { "live" }
            );
            for r in &f.records {
                let v: serde_json::Value = serde_json::from_str(&r.line).unwrap_or_default();
                let text = |k: &str| v[k].as_str().unwrap_or("").to_owned();
                let detail = match v["reason"].as_str() {
                    Some(reason) => format!(
                        ": {reason} ×{} on {} {}, reported by {}",
                        v["count"],
                        text("method"),
                        text("path"),
                        text("actor")
                    ),
                    None => String::new(),
                };
                say!(
                    "   #{} {} {} {}{detail}",
                    r.seq,
                    text("time"),
                    r.kind,
                    text("outcome")
                );
            }
        }
        None => say!("   not found"),
    }
    let failures = refused_uses(&found);
    tally.expect(
        "audit lookup of the stolen token",
        found
            .as_ref()
            .is_some_and(|f| f.token.sub.as_str() == CHECKOUT)
            && failures >= 2,
        &format!("holder found from the token alone, with its {failures} refused uses\n"),
    );

    let metrics = call(
        payments_admin_addr,
        request("GET", "/metrics", &payments_admin_addr.to_string(), &[], ""),
    )
    .await?;
    say!("The payments sidecar's count (from http://{payments_admin_addr}/metrics):");
    for line in String::from_utf8_lossy(&metrics.body)
        .lines()
        .filter(|l| l.starts_with("tally_sidecar_inbound_requests_total"))
    {
        say!("   {line}");
    }
    say!("");

    let outcome = if tally.failed.is_empty() {
        say!(
            "Summary: all {} steps went as described. A stolen token was useless without the sidecar's key.",
            tally.passed
        );
        ExitCode::SUCCESS
    } else {
        say!(
            "Summary: {} steps went as described; these did not: {}",
            tally.passed,
            tally.failed.join("; ")
        );
        ExitCode::FAILURE
    };

    if args.keep_running {
        say!("\nStill running; try (Ctrl-C to stop):");
        say!(
            "  curl -x http://{outbound_addr} -H 'x-tally-scope: payments:charge' -d '{{\"amount\": 5}}' {charges}"
        );
        say!(
            "  tally client --socket {} authorize --method POST --url {charges} --scope payments:charge",
            socket.display()
        );
        say!("  curl http://{payments_admin_addr}/metrics");
        say!("  curl http://{payments_admin_addr}/readyz");
        super::broker::shutdown_signal().await;
    }

    let stopped = tokio::join!(checkout.stop(), payments.stop());
    let _ = app_stop.send(());
    let _ = broker_stop.send(());
    running.wait().await.map_err(|e| failed("the broker", &e))?;
    stopped.0.map_err(|e| failed("the checkout sidecar", &e))?;
    stopped.1.map_err(|e| failed("the payments sidecar", &e))?;
    drop(scratch);
    Ok(outcome)
}

fn header<'a>(answer: &'a Answer, name: &str) -> &'a str {
    answer
        .headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// `POST url` headers from the checkout sidecar's `/v1/authorize`:
/// (status, authorization, dpop, error description).
async fn headers_for(
    socket: &Path,
    url: &str,
    scope: &str,
) -> Result<(u16, String, String, String), CliError> {
    let ask = serde_json::json!({"method": "POST", "url": url, "scope": scope});
    let (status, answer) = local(socket, "POST", "/v1/authorize", Some(ask)).await?;
    let text = |key: &str| answer[key].as_str().unwrap_or_default().to_owned();
    Ok((
        status,
        text("authorization"),
        text("dpop"),
        text("error_description"),
    ))
}

/// One request to the checkout sidecar's local API; (status, JSON).
async fn local(
    socket: &Path,
    method: &str,
    target: &str,
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value), CliError> {
    super::client::call(socket, method, target, body.map(|b| b.to_string())).await
}
