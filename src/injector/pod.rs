//! The decision for one pod (inject, or skip and why) and the RFC 6902
//! JSON Patch that injects it, written against the pod exactly as the
//! API server sent it: a list that is absent is added whole, one that is
//! present is appended to (`/-`), and nothing of the pod's own is ever
//! replaced. Pure: the pod and the settings in, the outcome out.

use super::quantity::Quantity;
use super::template::{self, PodChoices, SIDECAR_NAME, SIDECAR_PORTS, Template};
use crate::sidecar::mtls::InboundMtls;
use serde_json::{Map, Value, json};

/// Pod annotation: `enabled` or `disabled` (skip this pod).
pub const INJECT: &str = "tally.dev/inject";
/// Pod annotation the injector writes: the version that injected it.
pub const INJECTED: &str = "tally.dev/injected";
/// Pod annotation: the app's port behind the inbound proxy.
pub const INBOUND_PORT: &str = "tally.dev/inbound-port";
/// Pod annotation: `required` or `optional` mutual TLS on the inbound port.
pub const INBOUND_MTLS: &str = "tally.dev/inbound-mtls";
/// Pod annotation: `enabled` runs the outbound proxy (needs a service map).
pub const OUTBOUND: &str = "tally.dev/outbound";
/// Pod annotation: the ConfigMap (in the pod's namespace) with the service map.
pub const SERVICE_MAP: &str = "tally.dev/service-map";
/// Pod annotation: the sidecar's CPU request.
pub const PROXY_CPU: &str = "tally.dev/proxy-cpu";
/// Pod annotation: the sidecar's memory request.
pub const PROXY_MEMORY: &str = "tally.dev/proxy-memory";
/// Pod annotation: the sidecar's memory limit.
pub const PROXY_MEMORY_LIMIT: &str = "tally.dev/proxy-memory-limit";
/// Pod annotation: the uids allowed on the socket (`1000,1001`), for
/// containers whose uid the pod spec does not say.
pub const ALLOW_UIDS: &str = "tally.dev/allow-uids";

/// Every `tally.dev/` annotation the injector reads or writes; any other
/// is reported (a typo would otherwise be ignored without a word).
pub const ANNOTATIONS: [&str; 10] = [
    INJECT,
    INJECTED,
    INBOUND_PORT,
    INBOUND_MTLS,
    OUTBOUND,
    SERVICE_MAP,
    PROXY_CPU,
    PROXY_MEMORY,
    PROXY_MEMORY_LIMIT,
    ALLOW_UIDS,
];

/// What became of a pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The patch injects the sidecar.
    Injected,
    /// Left as it is, on purpose.
    Skipped(SkipReason),
    /// Left as it is: it cannot be injected (the warnings say why).
    Failed(InjectError),
}

impl Verdict {
    /// The `result` and `reason` labels of the injections metric.
    pub fn labels(&self) -> (&'static str, &'static str) {
        match self {
            Self::Injected => ("injected", "none"),
            Self::Skipped(why) => ("skipped", why.label()),
            Self::Failed(e) => ("error", e.label()),
        }
    }
}

/// Why a pod is left alone on purpose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    /// Not a Pod, or not a CREATE.
    NotPodCreate,
    /// In a namespace the injector is configured to skip.
    Namespace,
    /// `tally.dev/inject: disabled`.
    OptedOut,
    /// `hostNetwork: true`: the sidecar's ports would be the node's.
    HostNetwork,
    /// Injected already (a second pass, `reinvocationPolicy: IfNeeded`).
    AlreadyInjected,
}

impl SkipReason {
    /// The `reason` label of the injections metric.
    pub fn label(self) -> &'static str {
        match self {
            Self::NotPodCreate => "not_pod_create",
            Self::Namespace => "namespace",
            Self::OptedOut => "opted_out",
            Self::HostNetwork => "host_network",
            Self::AlreadyInjected => "already_injected",
        }
    }
}

/// Why a pod that asked for the sidecar cannot get it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InjectError {
    /// The review carries no pod.
    #[error("the review carries no pod object")]
    NoPod,
    /// The pod is not shaped like a pod.
    #[error("the pod's {field} {problem}")]
    Malformed {
        /// The field.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// A volume the injector adds is there already.
    #[error("the pod already has a volume named {name}")]
    VolumeTaken {
        /// Its name.
        name: String,
    },
    /// An app container uses the sidecar's container name.
    #[error("a container is already named {SIDECAR_NAME}")]
    NameTaken,
    /// A container listens on a port the sidecar needs.
    #[error("container {container} declares port {port}, which the sidecar needs")]
    PortTaken {
        /// The container.
        container: String,
        /// The port.
        port: u16,
    },
}

impl InjectError {
    /// The `reason` label of the injections metric.
    pub fn label(&self) -> &'static str {
        match self {
            Self::NoPod => "no_pod",
            Self::Malformed { .. } => "malformed",
            Self::VolumeTaken { .. } => "volume_taken",
            Self::NameTaken => "name_taken",
            Self::PortTaken { .. } => "port_taken",
        }
    }
}

/// What the webhook answers for one pod.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Injected, skipped or failed.
    pub verdict: Verdict,
    /// The JSON Patch operations (empty unless injected).
    pub patch: Vec<Value>,
    /// What the user should know (`response.warnings`).
    pub warnings: Vec<String>,
}

impl Outcome {
    fn skip(reason: SkipReason, warnings: Vec<String>) -> Self {
        Self {
            verdict: Verdict::Skipped(reason),
            patch: Vec::new(),
            warnings,
        }
    }

    fn fail(error: InjectError, mut warnings: Vec<String>) -> Self {
        warnings.insert(0, format!("the sidecar was not injected: {error}"));
        Self {
            verdict: Verdict::Failed(error),
            patch: Vec::new(),
            warnings,
        }
    }
}

/// `namespace/name`, or `namespace/generateName*` for a pod that has no
/// name yet (a Deployment's), for log lines.
pub fn pod_label(namespace: &str, pod: Option<&Value>) -> String {
    let meta = pod.and_then(|p| p.get("metadata"));
    let text = |k: &str| meta.and_then(|m| m.get(k)).and_then(Value::as_str);
    // Names are not validated yet when a mutating webhook sees them: no
    // control characters reach a log line.
    let label = match (text("name"), text("generateName")) {
        (Some(name), _) => format!("{namespace}/{name}"),
        (None, Some(prefix)) => format!("{namespace}/{prefix}*"),
        (None, None) => format!("{namespace}/(no name)"),
    };
    label
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// JSON Pointer escaping of one path segment (RFC 6901: `~` is `~0`, `/`
/// is `~1`), for keys such as `tally.dev/injected`.
pub fn escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// Decides about `pod` in `namespace` and, when it is injected, the patch.
pub fn inject(t: &Template, namespace: &str, pod: Option<&Value>) -> Outcome {
    let Some(pod) = pod else {
        return Outcome::fail(InjectError::NoPod, Vec::new());
    };
    match Shape::of(pod) {
        Ok(shape) => decide(t, namespace, &shape),
        Err(e) => Outcome::fail(e, Vec::new()),
    }
}

/// The parts of a pod the injector reads, checked for shape once.
struct Shape<'a> {
    metadata: Option<&'a Map<String, Value>>,
    annotations: Option<&'a Map<String, Value>>,
    spec: &'a Map<String, Value>,
    containers: Vec<&'a Map<String, Value>>,
    init_containers: Option<Vec<&'a Map<String, Value>>>,
    volumes: Option<Vec<&'a Map<String, Value>>>,
}

fn objects<'a>(
    value: Option<&'a Value>,
    field: &'static str,
) -> Result<Option<Vec<&'a Map<String, Value>>>, InjectError> {
    let malformed = |problem| InjectError::Malformed { field, problem };
    match value {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| i.as_object().ok_or(malformed("must be a list of objects")))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(malformed("must be a list")),
    }
}

impl<'a> Shape<'a> {
    fn of(pod: &'a Value) -> Result<Self, InjectError> {
        let malformed = |field, problem| InjectError::Malformed { field, problem };
        let pod = pod
            .as_object()
            .ok_or(malformed("object", "must be an object"))?;
        let metadata = match pod.get("metadata") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => return Err(malformed("metadata", "must be an object")),
        };
        let annotations = match metadata.and_then(|m| m.get("annotations")) {
            None | Some(Value::Null) => None,
            Some(Value::Object(a)) if a.values().all(Value::is_string) => Some(a),
            Some(_) => return Err(malformed("metadata.annotations", "must map names to text")),
        };
        let spec = pod
            .get("spec")
            .and_then(Value::as_object)
            .ok_or(malformed("spec", "is missing"))?;
        let containers = objects(spec.get("containers"), "spec.containers")?
            .filter(|c| !c.is_empty())
            .ok_or(malformed("spec.containers", "is empty"))?;
        Ok(Self {
            metadata,
            annotations,
            spec,
            containers,
            init_containers: objects(spec.get("initContainers"), "spec.initContainers")?,
            volumes: objects(spec.get("volumes"), "spec.volumes")?,
        })
    }

    fn annotation(&self, key: &str) -> Option<&'a str> {
        self.annotations?.get(key)?.as_str()
    }

    /// The pod's own containers: `(JSON Pointer, container)`, app
    /// containers first.
    fn own(&self) -> Vec<(String, &'a Map<String, Value>)> {
        let apps = self.containers.iter().enumerate();
        let mut out: Vec<_> = apps
            .map(|(i, c)| (format!("/spec/containers/{i}"), *c))
            .collect();
        for (i, c) in self.init_containers.iter().flatten().enumerate() {
            out.push((format!("/spec/initContainers/{i}"), *c));
        }
        out
    }
}

fn name_of(c: &Map<String, Value>) -> &str {
    c.get("name").and_then(Value::as_str).unwrap_or("(unnamed)")
}

fn decide(t: &Template, namespace: &str, pod: &Shape<'_>) -> Outcome {
    if t.skip_namespaces.iter().any(|n| n == namespace) {
        return Outcome::skip(SkipReason::Namespace, Vec::new());
    }
    let injected_already = pod.annotation(INJECTED).is_some()
        || pod
            .init_containers
            .iter()
            .flatten()
            .any(|c| name_of(c) == SIDECAR_NAME);
    if injected_already {
        return Outcome::skip(SkipReason::AlreadyInjected, Vec::new());
    }
    let mut warnings = Vec::new();
    match pod.annotation(INJECT) {
        Some("disabled") => return Outcome::skip(SkipReason::OptedOut, Vec::new()),
        None | Some("enabled") => {}
        Some(other) => warnings.push(format!(
            "{INJECT}: {other:?} is not enabled or disabled; injecting as the namespace asks"
        )),
    }
    if pod.spec.get("hostNetwork") == Some(&Value::Bool(true)) {
        warnings.push(
            "hostNetwork pods are never injected: the sidecar's ports would be the node's".into(),
        );
        return Outcome::skip(SkipReason::HostNetwork, warnings);
    }
    for key in pod.annotations.iter().flat_map(|a| a.keys()) {
        if key.starts_with("tally.dev/") && !ANNOTATIONS.contains(&key.as_str()) {
            warnings.push(format!(
                "unknown annotation {key:?} ignored (known: {})",
                ANNOTATIONS.join(", ")
            ));
        }
    }
    if pod.containers.iter().any(|c| name_of(c) == SIDECAR_NAME) {
        return Outcome::fail(InjectError::NameTaken, warnings);
    }
    for volume in pod.volumes.iter().flatten() {
        let name = name_of(volume);
        if template::VOLUME_NAMES.contains(&name) {
            let name = name.to_owned();
            return Outcome::fail(InjectError::VolumeTaken { name }, warnings);
        }
    }
    let choices = choices(t, pod, &mut warnings);
    let mut needed = vec![template::ADMIN_PORT];
    if choices.inbound.is_some() {
        needed.push(template::INBOUND_PORT);
    }
    if choices.outbound_map.is_some() {
        needed.push(template::OUTBOUND_PORT);
    }
    for (_, c) in pod.own() {
        for port in c
            .get("ports")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let number = port.get("containerPort").and_then(Value::as_u64);
            if let Some(port) = number.and_then(|p| u16::try_from(p).ok())
                && needed.contains(&port)
            {
                let container = name_of(c).to_owned();
                return Outcome::fail(InjectError::PortTaken { container, port }, warnings);
            }
        }
    }
    let patch = patch(t, pod, &choices, &mut warnings);
    Outcome {
        verdict: Verdict::Injected,
        patch,
        warnings,
    }
}

/// The pod's choices from its annotations; a bad value is a warning and
/// its default.
fn choices(t: &Template, pod: &Shape<'_>, warnings: &mut Vec<String>) -> PodChoices {
    let inbound_mtls = pod.annotation(INBOUND_MTLS).and_then(|text| {
        text.parse::<InboundMtls>()
            .map_err(|e| warnings.push(format!("{INBOUND_MTLS}: {e}; using optional")))
            .ok()
    });
    let inbound = match pod.annotation(INBOUND_PORT) {
        None => {
            if inbound_mtls.is_some() {
                warnings.push(format!("{INBOUND_MTLS} without {INBOUND_PORT} is ignored"));
            }
            None
        }
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port != 0 && !SIDECAR_PORTS.contains(&port) => Some((port, inbound_mtls)),
            _ => {
                warnings.push(format!(
                    "{INBOUND_PORT}: {text:?} must be the app's port (1-65535, not one of {SIDECAR_PORTS:?}); no inbound proxy"
                ));
                None
            }
        },
    };
    if let Some((port, _)) = inbound {
        let declared = pod.own().into_iter().any(|(_, c)| {
            c.get("ports")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|p| p.get("containerPort").and_then(Value::as_u64) == Some(u64::from(port)))
        });
        if declared {
            warnings.push(format!(
                "{INBOUND_PORT}: port {port} is declared by a container: if the app listens on the pod's address (not 127.0.0.1), callers can reach it past the sidecar's checks; bind it to 127.0.0.1, or allow only {} with a NetworkPolicy",
                template::INBOUND_PORT
            ));
        }
    }
    let outbound_map = outbound(pod, warnings);
    PodChoices {
        inbound,
        outbound_map,
        resources: resources(t, pod, warnings),
        allow_uids: allow_uids(pod, t.uid, warnings),
    }
}

fn outbound(pod: &Shape<'_>, warnings: &mut Vec<String>) -> Option<String> {
    let map = pod.annotation(SERVICE_MAP);
    match pod.annotation(OUTBOUND) {
        Some("enabled") => {}
        None | Some("disabled") => {
            if map.is_some() {
                warnings.push(format!(
                    "{SERVICE_MAP} without {OUTBOUND}: enabled is ignored"
                ));
            }
            return None;
        }
        Some(other) => {
            warnings.push(format!(
                "{OUTBOUND}: {other:?} is not enabled or disabled; no outbound proxy"
            ));
            return None;
        }
    }
    match map {
        None => {
            warnings.push(format!(
                "{OUTBOUND}: enabled needs {SERVICE_MAP}: CONFIGMAP (the service map); no outbound proxy"
            ));
            None
        }
        Some(name) if is_dns_subdomain(name) => Some(name.to_owned()),
        Some(name) => {
            warnings.push(format!(
                "{SERVICE_MAP}: {name:?} is not a ConfigMap name; no outbound proxy"
            ));
            None
        }
    }
}

/// RFC 1123 subdomain, as Kubernetes object names are.
fn is_dns_subdomain(name: &str) -> bool {
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 253
        && ok(bytes[0])
        && ok(bytes[bytes.len() - 1])
        && bytes.iter().all(|&c| ok(c) || c == b'-' || c == b'.')
}

fn resources(t: &Template, pod: &Shape<'_>, warnings: &mut Vec<String>) -> template::Resources {
    let mut read = |key: &str, default: &Quantity| match pod.annotation(key) {
        None => default.clone(),
        Some(text) => text.parse().unwrap_or_else(|e| {
            warnings.push(format!("{key}: {e}; using {}", default.as_str()));
            default.clone()
        }),
    };
    let d = &t.resources;
    let chosen = template::Resources {
        cpu: read(PROXY_CPU, &d.cpu),
        memory: read(PROXY_MEMORY, &d.memory),
        memory_limit: read(PROXY_MEMORY_LIMIT, &d.memory_limit),
    };
    if chosen.memory.value() > chosen.memory_limit.value() {
        warnings.push(format!(
            "{PROXY_MEMORY} {} is more than the limit {}; using the defaults {} and {}",
            chosen.memory.as_str(),
            chosen.memory_limit.as_str(),
            d.memory.as_str(),
            d.memory_limit.as_str()
        ));
        return template::Resources {
            cpu: chosen.cpu,
            ..d.clone()
        };
    }
    chosen
}

/// The uids allowed on the socket: the annotation's (`*` for any uid),
/// else every one of the pod's own containers' `runAsUser` (or the
/// pod's). When some container's uid is known only to its image, those
/// containers cannot be named, so only the known uids are allowed (the
/// sidecar's own, `floor`, when none is known): the socket never opens to
/// every uid in the pod unless the pod says so, and a warning says how.
/// `None` is any uid.
fn allow_uids(pod: &Shape<'_>, floor: u32, warnings: &mut Vec<String>) -> Option<Vec<u32>> {
    if let Some(text) = pod.annotation(ALLOW_UIDS) {
        if text.trim() == "*" {
            return None;
        }
        let uids: Result<Vec<u32>, _> = text.split(',').map(|u| u.trim().parse()).collect();
        match uids {
            Ok(mut uids) if !uids.is_empty() => {
                uids.sort_unstable();
                uids.dedup();
                return Some(uids);
            }
            _ => warnings.push(format!(
                "{ALLOW_UIDS}: {text:?} is not a list of uids (1000,1001) or *; ignored"
            )),
        }
    }
    let uid_of = |v: Option<&Value>| {
        v.and_then(|s| s.get("runAsUser"))
            .and_then(Value::as_u64)
            .and_then(|u| u32::try_from(u).ok())
    };
    let pod_uid = uid_of(pod.spec.get("securityContext"));
    let mut uids = Vec::new();
    let mut unknown = Vec::new();
    for (_, c) in pod.own() {
        match uid_of(c.get("securityContext")).or(pod_uid) {
            Some(uid) => uids.push(uid),
            None => unknown.push(name_of(c)),
        }
    }
    if !unknown.is_empty() {
        warnings.push(format!(
            "containers {} set no runAsUser, so they cannot use the sidecar's socket or outbound proxy; set runAsUser, or {ALLOW_UIDS} (\"1000,1001\", or \"*\" for any uid in the pod)",
            unknown.join(", ")
        ));
        if uids.is_empty() {
            uids.push(floor);
        }
    }
    uids.sort_unstable();
    uids.dedup();
    Some(uids)
}

fn add(path: String, value: Value) -> Value {
    json!({ "op": "add", "path": path, "value": value })
}

/// Appends `items` to the list at `path` whose current value is
/// `existing`: the whole list when there is none.
fn append(ops: &mut Vec<Value>, path: &str, existing: Option<&Value>, items: Vec<Value>) {
    if items.is_empty() {
        return;
    }
    match existing {
        Some(Value::Array(_)) => ops.extend(items.into_iter().map(|i| add(format!("{path}/-"), i))),
        _ => ops.push(add(path.to_owned(), Value::Array(items))),
    }
}

fn patch(
    t: &Template,
    pod: &Shape<'_>,
    choices: &PodChoices,
    warnings: &mut Vec<String>,
) -> Vec<Value> {
    let mut ops = Vec::new();
    let env = template::app_env(choices);
    // The pod's own containers first, at their indices as sent (the
    // sidecar is inserted before the init containers only afterwards).
    for (at, c) in pod.own() {
        let name = name_of(c);
        let has = |list: &str, key: &str, want: &str| {
            c.get(list)
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .any(|e| e.get(key).and_then(Value::as_str) == Some(want))
        };
        let mut add_env = Vec::new();
        for (key, value) in &env {
            if has("env", "name", key) {
                warnings.push(format!(
                    "container {name} already sets {key}; left as it is"
                ));
            } else {
                add_env.push(json!({ "name": key, "value": value }));
            }
        }
        append(&mut ops, &format!("{at}/env"), c.get("env"), add_env);
        if has("volumeMounts", "mountPath", template::RUN_DIR) {
            warnings.push(format!(
                "container {name} already mounts {}; it cannot reach the sidecar's socket",
                template::RUN_DIR
            ));
        } else {
            let existing = c.get("volumeMounts");
            append(
                &mut ops,
                &format!("{at}/volumeMounts"),
                existing,
                vec![template::app_mount()],
            );
        }
    }
    append(
        &mut ops,
        "/spec/volumes",
        pod.spec.get("volumes"),
        template::volumes(t, choices),
    );
    let sidecar = template::sidecar(t, choices);
    match pod.init_containers {
        // First: the pod's own init containers may need tokens.
        Some(_) => ops.push(add("/spec/initContainers/0".into(), sidecar)),
        None => ops.push(add("/spec/initContainers".into(), json!([sidecar]))),
    }
    let version = json!(t.version);
    match (pod.metadata, pod.annotations) {
        (_, Some(_)) => ops.push(add(
            format!("/metadata/annotations/{}", escape(INJECTED)),
            version,
        )),
        (Some(_), None) => ops.push(add(
            "/metadata/annotations".into(),
            json!({ INJECTED: version }),
        )),
        (None, None) => ops.push(add(
            "/metadata".into(),
            json!({ "annotations": { INJECTED: version } }),
        )),
    }
    ops
}
