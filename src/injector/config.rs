//! `tally injector` configuration: flags, then `TALLY_*` variables (clap
//! reads both), then a YAML `--config` file, then defaults. Every problem
//! is reported at once. Pure: the caller reads the files.

use super::quantity::Quantity;
use super::template::{Resources, Template};
use crate::config::DefaultValue::Text;
use crate::config::{Defaults, FileSettings};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Arguments of `tally injector`.
#[derive(Debug, Default, clap::Args)]
#[command(mut_args(DEFAULTS.annotate()))]
pub struct InjectorFlags {
    /// YAML file with any of the settings below, by their long names with
    /// `_` for `-` (flags and TALLY_* win).
    #[arg(long, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Print this pod (YAML or JSON) as the injector would admit it, as
    /// JSON, and exit: no server, no TLS files needed.
    #[arg(long, env = "TALLY_PRINT_POD", value_name = "FILE")]
    pub print_pod: Option<PathBuf>,
    /// HTTPS address the API server calls (`POST /inject`).
    #[arg(long, env = "TALLY_LISTEN")]
    pub listen: Option<String>,
    /// Serving certificate chain (PEM), re-read when the file changes.
    #[arg(long, env = "TALLY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Serving private key (PEM), re-read with the certificate.
    #[arg(long, env = "TALLY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The tally image injected sidecars run (it holds tally-sidecar),
    /// e.g. ghcr.io/tally-dev/tally:0.1.0.
    #[arg(long, env = "TALLY_IMAGE")]
    pub image: Option<String>,
    /// The broker's gRPC URL the sidecars attest to.
    #[arg(long, env = "TALLY_BROKER")]
    pub broker: Option<String>,
    /// The broker's CA bundle (PEM), handed to every sidecar; re-read
    /// when the file changes.
    #[arg(long, env = "TALLY_TRUST_BUNDLE")]
    pub trust_bundle: Option<PathBuf>,
    /// The audience of the pods' projected ServiceAccount tokens (the
    /// broker's --sa-audience).
    #[arg(long, env = "TALLY_SA_AUDIENCE")]
    pub sa_audience: Option<String>,
    /// Lifetime of the projected token (10m to 24h; kubelet renews it).
    #[arg(long, env = "TALLY_SA_TOKEN_EXPIRATION")]
    pub sa_token_expiration: Option<String>,
    /// Namespaces whose pods are never injected (repeatable).
    #[arg(
        long = "skip-namespace",
        env = "TALLY_SKIP_NAMESPACES",
        value_delimiter = ','
    )]
    pub skip_namespaces: Vec<String>,
    /// The sidecar's fixed non-root uid (and gid).
    #[arg(long, env = "TALLY_SIDECAR_UID")]
    pub sidecar_uid: Option<String>,
    /// The sidecar's CPU request (pod annotation tally.dev/proxy-cpu).
    #[arg(long, env = "TALLY_PROXY_CPU")]
    pub proxy_cpu: Option<String>,
    /// The sidecar's memory request (tally.dev/proxy-memory).
    #[arg(long, env = "TALLY_PROXY_MEMORY")]
    pub proxy_memory: Option<String>,
    /// The sidecar's memory limit (tally.dev/proxy-memory-limit).
    #[arg(long, env = "TALLY_PROXY_MEMORY_LIMIT")]
    pub proxy_memory_limit: Option<String>,
    /// Time from accept to a whole request head (TLS handshake included).
    #[arg(long, env = "TALLY_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// Close a connection with no request in flight after this long.
    #[arg(long, env = "TALLY_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Most connections open at once.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
}

/// Every setting's default; see [`Defaults`].
pub static DEFAULTS: Defaults = Defaults(&[
    ("listen", Text("0.0.0.0:9443")),
    ("broker", Text("https://tally-broker.tally-system.svc:8443")),
    ("sa_token_expiration", Text("10m")),
    (
        "skip_namespaces",
        Text("kube-system,kube-public,kube-node-lease,tally-system"),
    ),
    ("sidecar_uid", Text("1337")),
    ("proxy_cpu", Text("10m")),
    ("proxy_memory", Text("16Mi")),
    ("proxy_memory_limit", Text("64Mi")),
    ("header_timeout", Text("10s")),
    ("idle_timeout", Text("60s")),
    ("max_connections", Text("1024")),
]);

/// Flags with no key in a `--config` file.
pub const FLAG_ONLY: &[&str] = &["config", "print_pod"];

/// The keys a `--config` file may set.
pub const KEYS: &[&str] = &[
    "listen",
    "tls_cert",
    "tls_key",
    "image",
    "broker",
    "trust_bundle",
    "sa_audience",
    "sa_token_expiration",
    "skip_namespaces",
    "sidecar_uid",
    "proxy_cpu",
    "proxy_memory",
    "proxy_memory_limit",
    "header_timeout",
    "idle_timeout",
    "max_connections",
];

/// What the command does.
#[derive(Debug, Clone, PartialEq)]
pub enum Mode {
    /// Serve the webhook.
    Serve {
        /// Where.
        listen: SocketAddr,
        /// Certificate chain file.
        tls_cert: PathBuf,
        /// Key file.
        tls_key: PathBuf,
        /// Listener limits.
        limits: crate::http::Limits,
    },
    /// Print one pod, injected.
    PrintPod(PathBuf),
}

/// Resolved, validated settings.
#[derive(Debug, Clone)]
pub struct InjectorConfig {
    /// Serve or print.
    pub mode: Mode,
    /// The trust bundle file.
    pub trust_bundle: PathBuf,
    /// Everything a pod gets but the bundle's text.
    template: Template,
}

impl InjectorConfig {
    /// Resolves `flags` over the config file's text, if any (`file` is its
    /// name, for errors).
    ///
    /// # Errors
    /// Every problem found, one line each.
    pub fn resolve(flags: &InjectorFlags, file: Option<(&str, &str)>) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let from_file = FileSettings::read(file, KEYS, &mut errors);
        let one = |flag: &Option<String>, key: &str| flag.clone().or_else(|| from_file.one(key));
        let or_default =
            |flag: &Option<String>, key: &str| one(flag, key).unwrap_or_else(|| DEFAULTS.text(key));
        let path = |flag: &Option<PathBuf>, key: &str| {
            flag.clone()
                .or_else(|| from_file.one(key).map(PathBuf::from))
        };
        let image = one(&flags.image, "image").unwrap_or_default();
        if image.is_empty() {
            errors.push("image: give the tally image sidecars run (--image ghcr.io/tally-dev/tally:VERSION)".into());
        } else if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            errors.push(format!(
                "image {image:?} must be an image reference, without spaces"
            ));
        }
        let broker = or_default(&flags.broker, "broker");
        if !broker.starts_with("https://") || broker.chars().any(char::is_whitespace) {
            errors.push(format!(
                "broker {broker:?}: the broker speaks only https; use https://HOST:8443"
            ));
        }
        let trust_bundle = path(&flags.trust_bundle, "trust_bundle");
        if trust_bundle.is_none() {
            errors.push(
                "trust_bundle: give the broker's CA bundle file (--trust-bundle FILE)".into(),
            );
        }
        let sa_audience = one(&flags.sa_audience, "sa_audience").unwrap_or_default();
        if sa_audience.is_empty() {
            errors.push("sa_audience: give the audience the broker expects (--sa-audience, the broker's --sa-audience)".into());
        }
        let expiration_text = or_default(&flags.sa_token_expiration, "sa_token_expiration");
        let sa_token_expiration = match humantime::parse_duration(&expiration_text) {
            Ok(d) if (600..=86_400).contains(&d.as_secs()) && d.subsec_nanos() == 0 => d.as_secs(),
            _ => {
                errors.push(format!(
                    "sa_token_expiration {expiration_text:?} must be whole seconds from 600s (Kubernetes' least) to 24h"
                ));
                600
            }
        };
        let skip_namespaces = if !flags.skip_namespaces.is_empty() {
            flags.skip_namespaces.clone()
        } else if !from_file.all("skip_namespaces").is_empty() {
            from_file.all("skip_namespaces")
        } else {
            DEFAULTS
                .text("skip_namespaces")
                .split(',')
                .map(str::to_owned)
                .collect()
        };
        let skip_namespaces = skip_namespaces
            .iter()
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty())
            .collect();
        let uid_text = or_default(&flags.sidecar_uid, "sidecar_uid");
        let uid = match uid_text.parse::<u32>() {
            Ok(uid) if (1..=i32::MAX as u32).contains(&uid) => uid,
            _ => {
                errors.push(format!(
                    "sidecar_uid {uid_text:?} must be a non-root uid (1 to 2147483647)"
                ));
                1337
            }
        };
        let mut quantity = |flag: &Option<String>, key: &str| {
            let text = or_default(flag, key);
            text.parse::<Quantity>()
                .map_err(|e| errors.push(format!("{key}: {e}")))
                .ok()
        };
        let cpu = quantity(&flags.proxy_cpu, "proxy_cpu");
        let memory = quantity(&flags.proxy_memory, "proxy_memory");
        let memory_limit = quantity(&flags.proxy_memory_limit, "proxy_memory_limit");
        if let (Some(m), Some(l)) = (&memory, &memory_limit)
            && m.value() > l.value()
        {
            errors.push(format!(
                "proxy_memory {} is more than proxy_memory_limit {}",
                m.as_str(),
                l.as_str()
            ));
        }
        let limits = crate::config::listener_limits(
            one(&flags.header_timeout, "header_timeout"),
            one(&flags.idle_timeout, "idle_timeout"),
            one(&flags.max_connections, "max_connections"),
            &DEFAULTS,
            &mut errors,
        );
        let mode = match &flags.print_pod {
            Some(pod) => Some(Mode::PrintPod(pod.clone())),
            None => {
                let listen_text = or_default(&flags.listen, "listen");
                let listen = listen_text
                    .parse::<SocketAddr>()
                    .map_err(|e| errors.push(format!("listen {listen_text:?}: {e}")))
                    .ok();
                let tls_cert = path(&flags.tls_cert, "tls_cert");
                let tls_key = path(&flags.tls_key, "tls_key");
                if tls_cert.is_none() || tls_key.is_none() {
                    errors.push("tls_cert and tls_key: the API server calls webhooks over HTTPS only (--tls-cert FILE --tls-key FILE)".into());
                }
                match (listen, tls_cert, tls_key) {
                    (Some(listen), Some(tls_cert), Some(tls_key)) => Some(Mode::Serve {
                        listen,
                        tls_cert,
                        tls_key,
                        limits,
                    }),
                    _ => None,
                }
            }
        };
        match (
            errors.is_empty(),
            mode,
            trust_bundle,
            cpu,
            memory,
            memory_limit,
        ) {
            (true, Some(mode), Some(trust_bundle), Some(cpu), Some(memory), Some(memory_limit)) => {
                Ok(Self {
                    mode,
                    trust_bundle,
                    template: Template {
                        image,
                        broker,
                        bundle_pem: String::new(),
                        sa_audience,
                        sa_token_expiration,
                        skip_namespaces,
                        resources: Resources {
                            cpu,
                            memory,
                            memory_limit,
                        },
                        uid,
                        version: env!("CARGO_PKG_VERSION").to_owned(),
                    },
                })
            }
            _ => Err(errors),
        }
    }

    /// What every pod gets, with the trust bundle's PEM (read, and
    /// checked, by the caller).
    pub fn template(&self, bundle_pem: String) -> Template {
        Template {
            bundle_pem,
            ..self.template.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> InjectorFlags {
        InjectorFlags {
            image: Some("ghcr.io/tally-dev/tally:0.1.0".into()),
            trust_bundle: Some("bundle.pem".into()),
            sa_audience: Some("tally-broker".into()),
            tls_cert: Some("tls.crt".into()),
            tls_key: Some("tls.key".into()),
            ..InjectorFlags::default()
        }
    }

    #[test]
    fn defaults_work_with_nothing_else_given() {
        let c = InjectorConfig::resolve(&flags(), None).unwrap();
        let t = c.template("PEM".into());
        assert_eq!(t.broker, "https://tally-broker.tally-system.svc:8443");
        assert_eq!((t.sa_token_expiration, t.uid), (600, 1337));
        assert_eq!(
            t.skip_namespaces,
            [
                "kube-system",
                "kube-public",
                "kube-node-lease",
                "tally-system"
            ]
        );
        assert_eq!(t.resources.memory_limit.as_str(), "64Mi");
        assert!(matches!(c.mode, Mode::Serve { listen, .. } if listen.port() == 9443));
    }

    #[test]
    fn the_file_fills_what_flags_leave_out() {
        let file = "skip_namespaces: [infra, kube-system]\nsa_token_expiration: 1h\nsidecar_uid: \"2000\"\n";
        let c = InjectorConfig::resolve(&flags(), Some(("injector.yaml", file))).unwrap();
        let t = c.template(String::new());
        assert_eq!(t.skip_namespaces, ["infra", "kube-system"]);
        assert_eq!((t.sa_token_expiration, t.uid), (3600, 2000));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let flags = InjectorFlags {
            broker: Some("http://plain".into()),
            sa_token_expiration: Some("1m".into()),
            sidecar_uid: Some("0".into()),
            proxy_memory: Some("128Mi".into()),
            proxy_cpu: Some("lots".into()),
            ..InjectorFlags::default()
        };
        let errors =
            InjectorConfig::resolve(&flags, Some(("i.yaml", "colour: blue\n"))).unwrap_err();
        let all = errors.join("\n");
        for expected in [
            "i.yaml:1:1: unknown key \"colour\"",
            "image: give",
            "broker \"http://plain\"",
            "trust_bundle: give",
            "sa_audience: give",
            "sa_token_expiration \"1m\"",
            "sidecar_uid \"0\"",
            "proxy_cpu: \"lots\" is not a Kubernetes quantity",
            "proxy_memory 128Mi is more than proxy_memory_limit 64Mi",
            "tls_cert and tls_key",
        ] {
            assert!(all.contains(expected), "{expected} missing from:\n{all}");
        }
        assert_eq!(errors.len(), 10, "{all}");
    }

    #[test]
    fn printing_a_pod_needs_no_tls_files() {
        let flags = InjectorFlags {
            print_pod: Some("pod.yaml".into()),
            tls_cert: None,
            tls_key: None,
            ..flags()
        };
        let c = InjectorConfig::resolve(&flags, None).unwrap();
        assert_eq!(c.mode, Mode::PrintPod("pod.yaml".into()));
    }
}
