//! `tally injector` over real HTTPS with real-world pods: the JSON Patch
//! it answers is applied by a JSON Patch library to the pod as sent, and
//! the result must be a Kubernetes 1.33 Pod with the sidecar as the docs
//! promise (docs/KUBERNETES.md ("What the injector changes in a pod")), the app containers unchanged
//! but for appended env and mounts, and a second pass a no-op.

mod support;
#[path = "support/injector.rs"]
mod webhook;

use serde_json::{Value, json};
use webhook::{AUDIENCE, IMAGE, Webhook, apply, fixture, patch_of, warnings_of};

/// Reviews fixture `name` in `namespace`: (patched pod, patch, warnings).
async fn inject(hook: &Webhook, name: &str, namespace: &str) -> (Value, Vec<Value>, Vec<String>) {
    let pod = fixture(name);
    let response = hook.review(&pod, namespace).await;
    let patch = patch_of(&response);
    (apply(&pod, &patch), patch, warnings_of(&response))
}

fn sidecar(pod: &Value) -> &Value {
    let s = &pod["spec"]["initContainers"][0];
    assert_eq!(s["name"], "tally-sidecar", "{pod:#}");
    s
}

fn args(pod: &Value) -> Vec<String> {
    let a = sidecar(pod)["args"].as_array().unwrap();
    a.iter().map(|a| a.as_str().unwrap().to_owned()).collect()
}

fn has_pair(args: &[String], flag: &str, value: &str) -> bool {
    args.windows(2).any(|w| w[0] == flag && w[1] == value)
}

/// The pod `before` was, but for what the injector may append.
fn app_unchanged_but_appended(before: &Value, after: &Value, list: &str) {
    for (b, a) in before["spec"][list].as_array().unwrap().iter().zip(
        after["spec"][list]
            .as_array()
            .unwrap()
            .iter()
            .skip(usize::from(list == "initContainers")),
    ) {
        for (key, value) in b.as_object().unwrap() {
            if key == "env" || key == "volumeMounts" {
                let theirs = value.as_array().unwrap();
                assert_eq!(
                    &a[key].as_array().unwrap()[..theirs.len()],
                    &theirs[..],
                    "{key} of {}",
                    b["name"]
                );
            } else {
                assert_eq!(&a[key], value, "{key} of {}", b["name"]);
            }
        }
    }
}

#[tokio::test]
async fn a_deployment_pod_gets_a_native_sidecar_locked_down_and_probed() {
    let hook = Webhook::start(&[]);
    let before = fixture("deployment-pod");
    let (pod, _, warnings) = inject(&hook, "deployment-pod", "shop").await;
    let s = sidecar(&pod);
    assert_eq!(s["restartPolicy"], "Always");
    assert_eq!(s["image"], IMAGE);
    assert_eq!(s["command"], json!(["/usr/local/bin/tally-sidecar"]));
    let a = args(&pod);
    assert!(
        has_pair(&a, "--broker", "https://tally-broker.tally-system.svc:8443"),
        "{a:?}"
    );
    assert!(
        has_pair(&a, "--sa-token-file", "/var/run/secrets/tally/token"),
        "{a:?}"
    );
    assert!(
        has_pair(&a, "--socket", "/var/run/tally/sidecar.sock"),
        "{a:?}"
    );
    assert!(has_pair(&a, "--admin-listen", "0.0.0.0:15020"), "{a:?}");
    // Its one container's uid is known only to its image: the socket is
    // not opened to every uid, only to the sidecar's own (fail closed).
    assert!(has_pair(&a, "--allow-uid", "1337"), "{a:?}");
    assert_eq!(a.iter().filter(|a| *a == "--allow-uid").count(), 1, "{a:?}");
    assert!(
        !a.iter()
            .any(|a| a == "--inbound-listen" || a == "--outbound-listen"),
        "{a:?}"
    );
    assert_eq!(
        s["env"],
        json!([{"name": "TALLY_TRUST_BUNDLE_PEM", "value": hook.ca_pem}])
    );
    assert_eq!(
        s["securityContext"],
        json!({"runAsNonRoot": true, "runAsUser": 1337, "runAsGroup": 1337, "readOnlyRootFilesystem": true,
               "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]},
               "seccompProfile": {"type": "RuntimeDefault"}})
    );
    assert_eq!(
        s["startupProbe"]["httpGet"],
        json!({"path": "/readyz", "port": 15020})
    );
    assert_eq!(
        (
            &s["startupProbe"]["periodSeconds"],
            &s["startupProbe"]["failureThreshold"]
        ),
        (&json!(1), &json!(60))
    );
    assert_eq!(s["readinessProbe"]["httpGet"]["path"], "/readyz");
    assert_eq!(s["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(
        s["resources"],
        json!({"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}})
    );
    assert_eq!(
        pod["spec"]["volumes"],
        json!([
            {"name": "tally-run", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
            {"name": "tally-token", "projected": {"sources": [{"serviceAccountToken":
                {"audience": AUDIENCE, "expirationSeconds": 600, "path": "token"}}]}}
        ])
    );
    assert_eq!(
        s["volumeMounts"][1],
        json!({"name": "tally-token", "mountPath": "/var/run/secrets/tally", "readOnly": true})
    );
    let app = &pod["spec"]["containers"][0];
    assert_eq!(
        app["env"],
        json!([
            {"name": "TALLY_SOCKET", "value": "/var/run/tally/sidecar.sock"},
            {"name": "SPIFFE_ENDPOINT_SOCKET", "value": "unix:///var/run/tally/spiffe.sock"}
        ])
    );
    assert_eq!(
        app["volumeMounts"],
        json!([{"name": "tally-run", "mountPath": "/var/run/tally", "readOnly": true}])
    );
    // SPIFFE libraries find the sidecar's Workload API, served on the
    // same read-only volume with the same uid check.
    let a = args(&pod);
    assert!(
        has_pair(&a, "--spiffe-socket", "/var/run/tally/spiffe.sock"),
        "{a:?}"
    );
    app_unchanged_but_appended(&before, &pod, "containers");
    assert_eq!(
        pod["metadata"]["annotations"],
        json!({"tally.dev/injected": env!("CARGO_PKG_VERSION")})
    );
    assert_eq!(pod["metadata"]["generateName"], "web-7c9f8d6b5-");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("containers web set no runAsUser")),
        "{warnings:?}"
    );
    // A second pass (reinvocationPolicy: IfNeeded) changes nothing.
    assert_eq!(
        patch_of(&hook.review(&pod, "shop").await),
        Vec::<Value>::new()
    );
    hook.stop();
}

#[tokio::test]
async fn existing_init_containers_run_after_the_sidecar_and_get_the_socket() {
    let hook = Webhook::start(&[]);
    let before = fixture("init-containers");
    let (pod, patch, warnings) = inject(&hook, "init-containers", "shop").await;
    // Its app declares the port the inbound proxy forwards to: reachable
    // past the sidecar unless it listens on 127.0.0.1 only.
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(warnings[0].contains("port 8080 is declared by a container"));
    let inits = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits.len(), 2);
    assert_eq!(inits[1]["name"], "migrate");
    assert_eq!(inits[1]["env"][0]["name"], "DATABASE_URL");
    assert_eq!(
        inits[1]["env"][1],
        json!({"name": "TALLY_SOCKET", "value": "/var/run/tally/sidecar.sock"})
    );
    app_unchanged_but_appended(&before, &pod, "initContainers");
    app_unchanged_but_appended(&before, &pod, "containers");
    let a = args(&pod);
    assert!(has_pair(&a, "--allow-uid", "1000"), "{a:?}");
    assert!(
        has_pair(&a, "--upstream", "127.0.0.1:8080")
            && has_pair(&a, "--inbound-listen", "0.0.0.0:15006"),
        "{a:?}"
    );
    assert!(has_pair(&a, "--inbound-mtls", "required"), "{a:?}");
    assert!(
        sidecar(&pod)["ports"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "tally-inbound", "containerPort": 15006, "protocol": "TCP"}))
    );
    // The annotation key is escaped (RFC 6901) into the existing map.
    assert!(
        patch
            .iter()
            .any(|op| op["path"] == "/metadata/annotations/tally.dev~1injected"),
        "{patch:#?}"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"],
        "api"
    );
    hook.stop();
}

#[tokio::test]
async fn several_containers_give_their_uids_and_get_the_outbound_proxy() {
    let hook = Webhook::start(&[]);
    let before = fixture("several-containers");
    let (pod, patch, warnings) = inject(&hook, "several-containers", "shop").await;
    assert!(warnings.is_empty(), "{warnings:?}");
    app_unchanged_but_appended(&before, &pod, "containers");
    let a = args(&pod);
    assert!(
        has_pair(&a, "--allow-uid", "1001") && has_pair(&a, "--allow-uid", "2002"),
        "{a:?}"
    );
    assert!(
        has_pair(&a, "--outbound-listen", "127.0.0.1:15001"),
        "{a:?}"
    );
    assert!(
        has_pair(
            &a,
            "--service-map",
            "/etc/tally/service-map/service-map.yaml"
        ),
        "{a:?}"
    );
    for app in pod["spec"]["containers"].as_array().unwrap() {
        let env = app["env"].as_array().unwrap();
        assert!(
            env.contains(&json!({"name": "HTTP_PROXY", "value": "http://127.0.0.1:15001"})),
            "{env:?}"
        );
        assert!(
            env.contains(&json!({"name": "http_proxy", "value": "http://127.0.0.1:15001"})),
            "{env:?}"
        );
        assert!(
            env.contains(&json!({"name": "NO_PROXY", "value": "localhost,127.0.0.1,::1"})),
            "{env:?}"
        );
    }
    let volumes = pod["spec"]["volumes"].as_array().unwrap();
    assert_eq!(volumes[0]["name"], "cache");
    assert!(volumes.contains(
        &json!({"name": "tally-service-map", "configMap": {"name": "checkout-services",
        "items": [{"key": "service-map.yaml", "path": "service-map.yaml"}]}})
    ));
    assert!(
        patch.iter().any(|op| op["path"] == "/spec/volumes/-"),
        "appended, not replaced"
    );
    assert_eq!(
        sidecar(&pod)["resources"],
        json!({"requests": {"cpu": "50m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}})
    );
    hook.stop();
}

#[tokio::test]
async fn a_projected_volume_already_there_is_kept_and_not_given_to_the_sidecar() {
    let hook = Webhook::start(&[]);
    let before = fixture("projected-volume");
    let (pod, _, warnings) = inject(&hook, "projected-volume", "jobs").await;
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(pod["spec"]["volumes"][0], before["spec"]["volumes"][0]);
    app_unchanged_but_appended(&before, &pod, "containers");
    let mounts = sidecar(&pod)["volumeMounts"].as_array().unwrap();
    assert!(
        mounts.iter().all(|m| m["name"] != "kube-api-access-x7k2p"),
        "{mounts:?}"
    );
    assert!(has_pair(&args(&pod), "--allow-uid", "65532"));
    hook.stop();
}

#[tokio::test]
async fn opted_out_host_network_and_control_plane_pods_are_left_alone() {
    let hook = Webhook::start(&[]);
    for (name, namespace) in [
        ("opt-out", "shop"),
        ("host-network", "shop"),
        ("deployment-pod", "kube-system"),
        ("deployment-pod", "tally-system"),
    ] {
        let response = hook.review(&fixture(name), namespace).await;
        assert_eq!(
            patch_of(&response),
            Vec::<Value>::new(),
            "{name} in {namespace}"
        );
        let warnings = warnings_of(&response);
        assert_eq!(
            warnings
                .iter()
                .any(|w| w.contains("hostNetwork pods are never injected")),
            name == "host-network",
            "{warnings:?}"
        );
    }
    hook.stop();
}

#[tokio::test]
async fn an_existing_http_proxy_and_an_unknown_annotation_are_kept_with_warnings() {
    let hook = Webhook::start(&[]);
    let before = fixture("http-proxy");
    let (pod, _, warnings) = inject(&hook, "http-proxy", "shop").await;
    app_unchanged_but_appended(&before, &pod, "containers");
    let env = pod["spec"]["containers"][0]["env"].as_array().unwrap();
    let proxies: Vec<_> = env.iter().filter(|e| e["name"] == "HTTP_PROXY").collect();
    assert_eq!(
        proxies,
        [&json!({"name": "HTTP_PROXY", "value": "http://corporate-proxy:3128"})]
    );
    assert!(env.contains(&json!({"name": "http_proxy", "value": "http://127.0.0.1:15001"})));
    let all = warnings.join("\n");
    assert!(
        all.contains("container legacy already sets HTTP_PROXY; left as it is"),
        "{all}"
    );
    assert!(
        all.contains("unknown annotation \"tally.dev/inbound-prot\""),
        "{all}"
    );
    assert!(
        warnings
            .iter()
            .all(|w| w.starts_with("tally injector: ") && w.len() <= 256),
        "{all}"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["example.com/owner~team"],
        "payments"
    );
    assert_eq!(
        pod["metadata"]["annotations"]["tally.dev/injected"],
        env!("CARGO_PKG_VERSION")
    );
    hook.stop();
}

#[tokio::test]
async fn every_injected_fixture_is_a_valid_kubernetes_1_33_pod_and_print_pod_agrees() {
    let hook = Webhook::start(&[]);
    let out = tempfile::tempdir().unwrap();
    for name in [
        "deployment-pod",
        "init-containers",
        "several-containers",
        "projected-volume",
        "opt-out",
        "host-network",
        "http-proxy",
    ] {
        let (pod, _, _) = inject(&hook, name, "default").await;
        // The API server names a generateName pod after admission, before
        // it stores it; the validator wants that name.
        let mut named = pod.clone();
        if named["metadata"].get("name").is_none() {
            named["metadata"]["name"] = json!(format!(
                "{}x7k2p",
                named["metadata"]["generateName"].as_str().unwrap()
            ));
        }
        std::fs::write(
            out.path().join(format!("{name}.json")),
            serde_json::to_vec_pretty(&named).unwrap(),
        )
        .unwrap();
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join(format!("tests/fixtures/kubernetes/pods/{name}.yaml"));
        let dir = hook.dir.path();
        let printed = support::process::output_within(
            std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
                .args(["injector", "--print-pod"])
                .arg(&fixture)
                .args(["--trust-bundle"])
                .arg(dir.join("bundle.pem"))
                .args(["--image", IMAGE, "--sa-audience", AUDIENCE]),
            support::process::PATIENCE,
        );
        assert!(
            printed.status.success(),
            "{}",
            String::from_utf8_lossy(&printed.stderr)
        );
        let printed: Value = serde_json::from_slice(&printed.stdout).unwrap();
        assert_eq!(
            printed, pod,
            "--print-pod {name} differs from the webhook's answer"
        );
    }
    webhook::validate_all(out.path());
    hook.stop();
}

/// A pod from `fixture`'s deployment pod with `annotations` added.
fn deployment_pod_with(annotations: Value) -> Value {
    let mut pod = fixture("deployment-pod");
    pod["metadata"]["annotations"] = annotations;
    pod
}

#[tokio::test]
async fn any_uid_on_the_socket_only_when_the_pod_says_so() {
    let hook = Webhook::start(&[]);
    let pod = deployment_pod_with(json!({"tally.dev/allow-uids": "*"}));
    let response = hook.review(&pod, "shop").await;
    let after = apply(&pod, &patch_of(&response));
    let a = args(&after);
    assert!(!a.iter().any(|a| a == "--allow-uid"), "{a:?}");
    assert!(has_pair(&a, "--socket-mode", "0666"), "{a:?}");
    // A list replaces what the spec says; nonsense is a warning and the
    // fail-closed default.
    let pod = deployment_pod_with(json!({"tally.dev/allow-uids": "1000,abc"}));
    let response = hook.review(&pod, "shop").await;
    let a = args(&apply(&pod, &patch_of(&response)));
    assert!(has_pair(&a, "--allow-uid", "1337"), "{a:?}");
    assert!(
        warnings_of(&response)
            .iter()
            .any(|w| w.contains("is not a list of uids")),
        "{:?}",
        warnings_of(&response)
    );
    hook.stop();
}

#[tokio::test]
async fn the_socket_directory_is_read_only_in_the_apps_and_writable_only_in_the_sidecar() {
    let hook = Webhook::start(&[]);
    let (pod, _, _) = inject(&hook, "init-containers", "shop").await;
    let mounts = |c: &Value| {
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == "tally-run")
            .cloned()
            .unwrap()
    };
    assert_eq!(
        mounts(sidecar(&pod)),
        json!({"name": "tally-run", "mountPath": "/var/run/tally"})
    );
    let own = pod["spec"]["containers"].as_array().unwrap().iter().chain(
        pod["spec"]["initContainers"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1),
    );
    for c in own {
        assert_eq!(mounts(c)["readOnly"], true, "{}", c["name"]);
    }
    hook.stop();
}

#[tokio::test]
async fn an_inbound_port_the_app_also_exposes_is_named_in_a_warning() {
    let hook = Webhook::start(&[]);
    let pod = deployment_pod_with(json!({"tally.dev/inbound-port": "8080"}));
    let response = hook.review(&pod, "shop").await;
    let after = apply(&pod, &patch_of(&response));
    assert!(has_pair(&args(&after), "--upstream", "127.0.0.1:8080"));
    assert!(
        warnings_of(&response)
            .iter()
            .any(|w| w.contains("port 8080 is declared by a container")),
        "{:?}",
        warnings_of(&response)
    );
    hook.stop();
}
