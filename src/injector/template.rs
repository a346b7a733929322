//! What the injector adds to a pod: the native sidecar container, its
//! volumes, and the environment and mount each of the pod's own
//! containers gets. The names, paths and ports here are the ones
//! `docs/KUBERNETES.md` and `deploy/kubernetes/` document.

use super::quantity::Quantity;
use crate::sidecar::mtls::InboundMtls;
use serde_json::{Value, json};

/// The sidecar's container name (an `initContainers` entry).
pub const SIDECAR_NAME: &str = "tally-sidecar";
/// The sidecar binary in the tally image.
pub const SIDECAR_BINARY: &str = "/usr/local/bin/tally-sidecar";
/// The in-memory volume for the sockets, in every container.
pub const RUN_VOLUME: &str = "tally-run";
/// Where [`RUN_VOLUME`] is mounted.
pub const RUN_DIR: &str = "/var/run/tally";
/// The local API socket (the apps' `TALLY_SOCKET`).
pub const SOCKET: &str = "/var/run/tally/sidecar.sock";
/// The SPIFFE Workload API socket (`--spiffe-socket`).
pub const SPIFFE_SOCKET: &str = "/var/run/tally/spiffe.sock";
/// [`SPIFFE_SOCKET`] as the apps' `SPIFFE_ENDPOINT_SOCKET`, where SPIFFE
/// libraries look for the Workload API.
pub const SPIFFE_ENDPOINT_SOCKET: &str = "unix:///var/run/tally/spiffe.sock";
/// The projected ServiceAccount token volume (sidecar only).
pub const TOKEN_VOLUME: &str = "tally-token";
/// Where [`TOKEN_VOLUME`] is mounted.
pub const TOKEN_DIR: &str = "/var/run/secrets/tally";
/// The token file in it.
pub const TOKEN_FILE: &str = "/var/run/secrets/tally/token";
/// The service-map ConfigMap volume (sidecar only).
pub const SERVICE_MAP_VOLUME: &str = "tally-service-map";
/// Where [`SERVICE_MAP_VOLUME`] is mounted.
pub const SERVICE_MAP_DIR: &str = "/etc/tally/service-map";
/// The ConfigMap key holding the map.
pub const SERVICE_MAP_KEY: &str = "service-map.yaml";
/// The sidecar's admin port (probes, `/metrics`).
pub const ADMIN_PORT: u16 = 15020;
/// The sidecar's inbound port (the Service's `targetPort`).
pub const INBOUND_PORT: u16 = 15006;
/// The sidecar's outbound proxy port (loopback only).
pub const OUTBOUND_PORT: u16 = 15001;
/// Every port the sidecar may listen on: a pod whose own containers
/// declare one of them cannot share its network namespace with it.
pub const SIDECAR_PORTS: [u16; 3] = [ADMIN_PORT, INBOUND_PORT, OUTBOUND_PORT];
/// Size bound of [`RUN_VOLUME`] (it holds sockets only).
const RUN_SIZE_LIMIT: &str = "1Mi";

/// The injector's settings: what every injected pod gets.
#[derive(Debug, Clone)]
pub struct Template {
    /// The tally image (holds `tally-sidecar`).
    pub image: String,
    /// The broker's gRPC URL.
    pub broker: String,
    /// The broker's CA bundle (PEM; public), handed to each sidecar.
    pub bundle_pem: String,
    /// The audience of the projected ServiceAccount token.
    pub sa_audience: String,
    /// Its `expirationSeconds`.
    pub sa_token_expiration: u64,
    /// Namespaces never injected.
    pub skip_namespaces: Vec<String>,
    /// The sidecar's resources unless a pod's annotations say otherwise.
    pub resources: Resources,
    /// The sidecar's fixed non-root uid and gid.
    pub uid: u32,
    /// The version written in `tally.dev/injected`.
    pub version: String,
}

/// The sidecar's resource requests and memory limit (no CPU limit: a
/// throttled sidecar delays every request of its pod).
#[derive(Debug, Clone, PartialEq)]
pub struct Resources {
    /// CPU request.
    pub cpu: Quantity,
    /// Memory request.
    pub memory: Quantity,
    /// Memory limit.
    pub memory_limit: Quantity,
}

/// What one pod asked for, read from its annotations.
#[derive(Debug, Clone, PartialEq)]
pub struct PodChoices {
    /// The app's port behind the inbound proxy, and the mTLS mode.
    pub inbound: Option<(u16, Option<InboundMtls>)>,
    /// The service-map ConfigMap, when the outbound proxy runs.
    pub outbound_map: Option<String>,
    /// Resources for this pod's sidecar.
    pub resources: Resources,
    /// Peer uids allowed on the socket; `None` is any uid in the pod (only
    /// when the pod asks for it with `tally.dev/allow-uids: "*"`).
    pub allow_uids: Option<Vec<u32>>,
}

/// The environment each of the pod's own containers gets (never
/// replacing a variable it already has).
pub fn app_env(choices: &PodChoices) -> Vec<(&'static str, String)> {
    let mut env = vec![
        ("TALLY_SOCKET", SOCKET.to_owned()),
        ("SPIFFE_ENDPOINT_SOCKET", SPIFFE_ENDPOINT_SOCKET.to_owned()),
    ];
    if choices.outbound_map.is_some() {
        let proxy = format!("http://127.0.0.1:{OUTBOUND_PORT}");
        let local = "localhost,127.0.0.1,::1".to_owned();
        env.extend([
            ("HTTP_PROXY", proxy.clone()),
            ("http_proxy", proxy),
            ("NO_PROXY", local.clone()),
            ("no_proxy", local),
        ]);
    }
    env
}

/// The mount each of the pod's own containers gets: read-only, so that
/// no process in them can remove the sidecar's socket and bind its own in
/// its place (the kubelet makes an emptyDir mode 0777 without the sticky
/// bit); `connect(2)` to a socket needs no write access to its directory.
pub fn app_mount() -> Value {
    json!({ "name": RUN_VOLUME, "mountPath": RUN_DIR, "readOnly": true })
}

/// The sidecar's own, writable mount of the socket directory.
fn sidecar_run_mount() -> Value {
    json!({ "name": RUN_VOLUME, "mountPath": RUN_DIR })
}

/// The volumes added to the pod.
pub fn volumes(t: &Template, choices: &PodChoices) -> Vec<Value> {
    let mut volumes = vec![
        json!({ "name": RUN_VOLUME, "emptyDir": { "medium": "Memory", "sizeLimit": RUN_SIZE_LIMIT } }),
        json!({ "name": TOKEN_VOLUME, "projected": { "sources": [ { "serviceAccountToken": {
            "audience": t.sa_audience,
            "expirationSeconds": t.sa_token_expiration,
            "path": "token",
        } } ] } }),
    ];
    if let Some(map) = &choices.outbound_map {
        volumes.push(json!({ "name": SERVICE_MAP_VOLUME, "configMap": {
            "name": map,
            "items": [ { "key": SERVICE_MAP_KEY, "path": SERVICE_MAP_KEY } ],
        } }));
    }
    volumes
}

/// The volume names the injector adds (a pod that has one already cannot
/// be injected without replacing it).
pub const VOLUME_NAMES: [&str; 3] = [RUN_VOLUME, TOKEN_VOLUME, SERVICE_MAP_VOLUME];

/// The sidecar container: a native sidecar (`restartPolicy: Always`)
/// running `tally-sidecar` with exactly the flags of `tally sidecar`.
pub fn sidecar(t: &Template, choices: &PodChoices) -> Value {
    let mut args: Vec<String> = [
        "--broker",
        &t.broker,
        "--sa-token-file",
        TOKEN_FILE,
        "--socket",
        SOCKET,
        // Access to the socket is decided by the peer's uid (below); the
        // file mode must let every uid in the pod reach that check.
        "--socket-mode",
        "0666",
        // The same mode and uid check.
        "--spiffe-socket",
        SPIFFE_SOCKET,
        "--admin-listen",
        &format!("0.0.0.0:{ADMIN_PORT}"),
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for uid in choices.allow_uids.iter().flatten() {
        args.extend(["--allow-uid".to_owned(), uid.to_string()]);
    }
    let mut ports =
        vec![json!({ "name": "tally-admin", "containerPort": ADMIN_PORT, "protocol": "TCP" })];
    if let Some((port, mtls)) = &choices.inbound {
        args.extend([
            "--inbound-listen".to_owned(),
            format!("0.0.0.0:{INBOUND_PORT}"),
            "--upstream".to_owned(),
            format!("127.0.0.1:{port}"),
        ]);
        if let Some(mtls) = mtls {
            args.extend(["--inbound-mtls".to_owned(), mtls.to_string()]);
        }
        ports.push(
            json!({ "name": "tally-inbound", "containerPort": INBOUND_PORT, "protocol": "TCP" }),
        );
    }
    let mut mounts = vec![
        sidecar_run_mount(),
        json!({ "name": TOKEN_VOLUME, "mountPath": TOKEN_DIR, "readOnly": true }),
    ];
    if choices.outbound_map.is_some() {
        args.extend([
            "--outbound-listen".to_owned(),
            format!("127.0.0.1:{OUTBOUND_PORT}"),
            "--service-map".to_owned(),
            format!("{SERVICE_MAP_DIR}/{SERVICE_MAP_KEY}"),
        ]);
        mounts.push(
            json!({ "name": SERVICE_MAP_VOLUME, "mountPath": SERVICE_MAP_DIR, "readOnly": true }),
        );
    }
    let probe = |path: &str, period: u32, failures: u32| {
        json!({
            "httpGet": { "path": path, "port": ADMIN_PORT },
            "periodSeconds": period,
            "timeoutSeconds": 1,
            "failureThreshold": failures,
        })
    };
    let r = &choices.resources;
    json!({
        "name": SIDECAR_NAME,
        "image": t.image,
        "imagePullPolicy": "IfNotPresent",
        "command": [SIDECAR_BINARY],
        "args": args,
        "env": [ { "name": "TALLY_TRUST_BUNDLE_PEM", "value": t.bundle_pem } ],
        "restartPolicy": "Always",
        "ports": ports,
        // Holds back the pod's other containers until the sidecar has an
        // SVID and the broker's keys: a minute of tries, a second apart.
        "startupProbe": probe("/readyz", 1, 60),
        "readinessProbe": probe("/readyz", 5, 3),
        "livenessProbe": probe("/healthz", 10, 3),
        "resources": {
            "requests": { "cpu": r.cpu.as_str(), "memory": r.memory.as_str() },
            "limits": { "memory": r.memory_limit.as_str() },
        },
        "securityContext": {
            "runAsNonRoot": true,
            "runAsUser": t.uid,
            "runAsGroup": t.uid,
            "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false,
            "capabilities": { "drop": ["ALL"] },
            "seccompProfile": { "type": "RuntimeDefault" },
        },
        "volumeMounts": mounts,
        "terminationMessagePolicy": "FallbackToLogsOnError",
    })
}
