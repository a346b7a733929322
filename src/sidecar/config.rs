//! `tally sidecar` configuration: command-line flags, then `TALLY_*`
//! environment variables (clap reads both), then a YAML file, then
//! defaults. Every problem is reported at once; [`SidecarConfig::settings`]
//! turns the result into the [`SidecarSettings`] a sidecar runs with.
//! Pure: the caller reads the files and binds the listeners.

use super::api::ServiceMap;
use super::cache::CacheConfig;
use super::ext_authz::{ExtAuthzAddr, ExtAuthzConfig};
use super::identity::Attestation;
use super::inbound::InboundConfig;
use super::outbound::OutboundConfig;
use super::run::SidecarSettings;
pub use super::service_map::parse as service_map;
use crate::auth::target::Authority;
use crate::config::DefaultValue::{Derived, Text};
use crate::config::{Defaults, FileSettings, SecretArg, boolean};
use std::net::SocketAddr;
use std::path::PathBuf;

/// Arguments of `tally sidecar` (`Debug` leaves the join token out).
#[derive(Debug, Default, clap::Args)]
#[command(mut_args(DEFAULTS.annotate()))]
pub struct SidecarFlags {
    /// YAML file with any of the settings below, by their long names with
    /// `_` for `-` (flags and TALLY_* win). The join token is never read
    /// from it.
    #[arg(long, env = "TALLY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The broker's gRPC URL, e.g. https://broker:8443.
    #[arg(long, env = "TALLY_BROKER")]
    pub broker: Option<String>,
    /// Trust bundle (PEM) to verify the broker with on first contact.
    #[arg(long, env = "TALLY_TRUST_BUNDLE", conflicts_with = "trust_bundle_pem")]
    pub trust_bundle: Option<PathBuf>,
    /// The trust bundle's PEM text itself, instead of a file (the
    /// injector hands it to pods this way; it is public data).
    #[arg(
        long,
        env = "TALLY_TRUST_BUNDLE_PEM",
        hide_env_values = true,
        value_name = "PEM"
    )]
    pub trust_bundle_pem: Option<String>,
    /// One-time join token (or set TALLY_JOIN_TOKEN, which keeps it out of `ps`).
    #[arg(
        long,
        env = "TALLY_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "sa_token_file"
    )]
    pub join_token: Option<SecretArg>,
    /// Projected Kubernetes ServiceAccount token file.
    #[arg(long, env = "TALLY_SA_TOKEN_FILE")]
    pub sa_token_file: Option<PathBuf>,
    /// Unix socket for the local API.
    #[arg(long, env = "TALLY_SOCKET")]
    pub socket: Option<PathBuf>,
    /// File mode of the socket, octal: 0600, 0660 or 0666. Who may use it
    /// is decided by --allow-uid; 0666 lets every uid reach that check (a
    /// pod's private volume, where the apps' uids differ from the sidecar's).
    #[arg(long, env = "TALLY_SOCKET_MODE", value_name = "MODE")]
    pub socket_mode: Option<String>,
    /// Unix socket for the SPIFFE Workload API (SPIFFE libraries find it
    /// by SPIFFE_ENDPOINT_SOCKET=unix://PATH), with the local API
    /// socket's file mode and uid allow-list. Off unless given.
    #[arg(long, env = "TALLY_SPIFFE_SOCKET", value_name = "PATH")]
    pub spiffe_socket: Option<PathBuf>,
    /// Only these peer uids may use the local API and Workload API
    /// sockets, the outbound proxy and a unix: ext_authz socket
    /// (repeatable).
    #[arg(long = "allow-uid", env = "TALLY_ALLOW_UIDS", value_delimiter = ',')]
    pub allow_uids: Vec<u32>,
    /// YAML mapping of HOST:PORT (or HOST:* for every port) to audience,
    /// or to {audience: A, mtls: true|false, proof: dpop|wimse}, for
    /// /v1/authorize and the outbound proxy; mtls (default: true when the
    /// audience is a workload's SPIFFE ID) dials the destination with
    /// mutual TLS; proof wimse (default dpop) sends a WIMSE WIT and WPT.
    #[arg(long, env = "TALLY_SERVICE_MAP")]
    pub service_map: Option<PathBuf>,
    /// Inbound verifying proxy address, e.g. 0.0.0.0:15006 (needs --upstream).
    #[arg(long, env = "TALLY_INBOUND_LISTEN")]
    pub inbound_listen: Option<String>,
    /// The application behind the inbound proxy, host:port (plain HTTP).
    #[arg(long, env = "TALLY_UPSTREAM")]
    pub upstream: Option<String>,
    /// Inbound port: `optional` serves mutual TLS (sidecars, with their
    /// SVIDs) and plaintext side by side; `required` refuses plaintext.
    #[arg(long, env = "TALLY_INBOUND_MTLS", value_name = "MODE")]
    pub inbound_mtls: Option<String>,
    /// Demand DPoP server nonces from inbound callers (RFC 9449 §8).
    #[arg(long, env = "TALLY_INBOUND_NONCES")]
    pub inbound_nonces: bool,
    /// Envoy ext_authz gRPC service address (Authorization/Check), e.g.
    /// 127.0.0.1:15030, or unix:PATH (callers' uids checked against
    /// --allow-uid); bind it to loopback or a socket, see docs/ENVOY.md.
    #[arg(long, env = "TALLY_EXT_AUTHZ_LISTEN", value_name = "ADDR")]
    pub ext_authz_listen: Option<String>,
    /// Also hand Authorization and DPoP to the app (dropped by default),
    /// from the inbound proxy and through Envoy's ext_authz.
    #[arg(long, env = "TALLY_PASS_CREDENTIALS")]
    pub pass_credentials: bool,
    /// Oldest inbound DPoP proof accepted, after its iat.
    #[arg(long, env = "TALLY_PROOF_MAX_AGE")]
    pub proof_max_age: Option<String>,
    /// Clock difference allowed between callers and this sidecar.
    #[arg(long, env = "TALLY_CLOCK_SKEW")]
    pub clock_skew: Option<String>,
    /// Outbound forward proxy address, e.g. 127.0.0.1:15001 (the app's HTTP_PROXY).
    #[arg(long, env = "TALLY_OUTBOUND_LISTEN")]
    pub outbound_listen: Option<String>,
    /// Refuse outbound requests to hosts not in the service map.
    #[arg(long, env = "TALLY_OUTBOUND_STRICT")]
    pub outbound_strict: bool,
    /// Not ready once the Watch stream has been down this long.
    #[arg(long, env = "TALLY_WATCH_STALENESS")]
    pub watch_staleness: Option<String>,
    /// Past that, refuse every inbound request (503) instead of only
    /// admin-class tokens (revocation_staleness: deny).
    #[arg(long, env = "TALLY_DENY_WHEN_STALE")]
    pub deny_when_stale: bool,
    /// Admin port address (/healthz, /readyz, /metrics), or `off`.
    #[arg(long, env = "TALLY_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,
    /// The only authorities (HOST:PORT) inbound requests may address,
    /// repeatable; any other is refused (421) before any token work.
    #[arg(
        long = "inbound-authority",
        env = "TALLY_INBOUND_AUTHORITIES",
        value_delimiter = ','
    )]
    pub inbound_authorities: Vec<String>,
    /// Every listener: time from accept to a whole request head (TLS
    /// handshake included).
    #[arg(long, env = "TALLY_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// Every listener: close a connection with no request in flight after
    /// this long.
    #[arg(long, env = "TALLY_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Every listener: most connections open at once.
    #[arg(long, env = "TALLY_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
}

/// Every setting's default; see [`Defaults`].
pub static DEFAULTS: Defaults = Defaults(&[
    (
        "socket",
        Derived(
            "/run/tally/agent.sock as root, else $XDG_RUNTIME_DIR/tally/agent.sock or the temp dir",
        ),
    ),
    ("socket_mode", Text("0660")),
    ("spiffe_socket", Derived("off")),
    ("allow_uids", Derived("any uid")),
    ("inbound_mtls", Text("optional")),
    ("proof_max_age", Text("30s")),
    ("clock_skew", Text("5s")),
    ("watch_staleness", Text("30s")),
    ("admin_listen", Text("127.0.0.1:15020")),
    ("inbound_authorities", Derived("any")),
    ("header_timeout", Text("10s")),
    ("idle_timeout", Text("60s")),
    ("max_connections", Text("1024")),
]);

/// Flags with no key in a `--config` file: the file's own name, and the
/// join token (a secret kept out of files that are copied around).
pub const FLAG_ONLY: &[&str] = &["config", "join_token"];

/// The keys a `--config` file may set: every flag's long name with `_`
/// for `-`, but [`FLAG_ONLY`].
pub const KEYS: &[&str] = &[
    "broker",
    "trust_bundle",
    "trust_bundle_pem",
    "sa_token_file",
    "socket",
    "socket_mode",
    "spiffe_socket",
    "allow_uids",
    "service_map",
    "inbound_listen",
    "upstream",
    "inbound_mtls",
    "inbound_nonces",
    "ext_authz_listen",
    "pass_credentials",
    "proof_max_age",
    "clock_skew",
    "outbound_listen",
    "outbound_strict",
    "watch_staleness",
    "deny_when_stale",
    "admin_listen",
    "inbound_authorities",
    "header_timeout",
    "idle_timeout",
    "max_connections",
];

/// Resolved, validated settings (`Debug` leaves the join token out).
#[derive(Debug)]
pub struct SidecarConfig {
    /// The broker's gRPC URL (`https://`).
    pub broker: String,
    /// Trust bundle for first contact.
    pub trust_bundle: TrustBundle,
    /// How to attest.
    pub attestation: Attestation,
    /// Local API socket, if given (else [`default_socket`]).
    pub socket: Option<PathBuf>,
    /// The socket file's mode (the Workload API socket's too).
    pub socket_mode: u32,
    /// SPIFFE Workload API socket, if it runs.
    pub spiffe_socket: Option<PathBuf>,
    /// Peer uids allowed on the socket and outbound proxy (empty: any).
    pub allow_uids: Vec<u32>,
    /// Service map file, if any.
    pub service_map: Option<PathBuf>,
    /// Inbound proxy address and the app's `host:port`, if it runs.
    pub inbound: Option<(SocketAddr, String)>,
    /// Whether the inbound port refuses plaintext.
    pub inbound_mtls: super::mtls::InboundMtls,
    /// Where Envoy's ext_authz service listens, if it runs.
    pub ext_authz_listen: Option<ExtAuthzAddr>,
    /// Demand DPoP server nonces from inbound callers.
    pub inbound_nonces: bool,
    /// Hand `Authorization` and `DPoP` to the app too.
    pub pass_credentials: bool,
    /// Oldest inbound proof accepted, seconds after its `iat`.
    pub proof_max_age: u64,
    /// Clock skew allowed with callers, seconds.
    pub clock_skew: u64,
    /// Longest Watch outage before not-ready (and stale), seconds.
    pub watch_staleness: u64,
    /// Past that, refuse every inbound request, not only admin tokens.
    pub deny_when_stale: bool,
    /// Outbound proxy address, if it runs.
    pub outbound_listen: Option<SocketAddr>,
    /// Refuse outbound requests to hosts not in the service map.
    pub outbound_strict: bool,
    /// Admin port address (`None`: `off`).
    pub admin_listen: Option<SocketAddr>,
    /// The only authorities inbound requests may address (empty: any).
    pub inbound_authorities: Vec<Authority>,
    /// Timeouts and connection cap of every listener.
    pub limits: crate::http::Limits,
}

impl SidecarConfig {
    /// Resolves `flags` (already merged with the environment by clap) over
    /// the config file's text, if any (`file` is its name, for errors).
    ///
    /// # Errors
    /// Every problem found, one line each.
    pub fn resolve(flags: &SidecarFlags, file: Option<(&str, &str)>) -> Result<Self, Vec<String>> {
        let mut errors = Vec::new();
        let from_file = FileSettings::read(file, KEYS, &mut errors);
        let one = |flag: &Option<String>, key: &str| flag.clone().or_else(|| from_file.one(key));
        let path = |flag: &Option<PathBuf>, key: &str| {
            flag.clone()
                .or_else(|| from_file.one(key).map(PathBuf::from))
        };
        let mut switch = |flag: bool, key: &str| {
            flag || from_file.one(key).is_some_and(|t| {
                boolean(key, &t)
                    .map_err(|e| errors.push(e))
                    .unwrap_or(false)
            })
        };
        let inbound_nonces = switch(flags.inbound_nonces, "inbound_nonces");
        let pass_credentials = switch(flags.pass_credentials, "pass_credentials");
        let outbound_strict = switch(flags.outbound_strict, "outbound_strict");
        let deny_when_stale = switch(flags.deny_when_stale, "deny_when_stale");

        let inbound_mtls = one(&flags.inbound_mtls, "inbound_mtls")
            .map_or(Ok(super::mtls::InboundMtls::default()), |t| t.parse())
            .unwrap_or_else(|e| {
                errors.push(format!("inbound_mtls: {e}"));
                super::mtls::InboundMtls::default()
            });
        let broker = one(&flags.broker, "broker");
        match &broker {
            None => errors
                .push("broker: give the broker's gRPC URL (--broker https://HOST:8443)".into()),
            Some(url) if !url.starts_with("https://") => {
                errors.push(format!(
                    "broker {url}: the broker speaks only https (mTLS gRPC); use https://HOST:8443"
                ));
            }
            Some(_) => {}
        }
        let trust_bundle = trust_bundle(
            path(&flags.trust_bundle, "trust_bundle"),
            one(&flags.trust_bundle_pem, "trust_bundle_pem"),
        )
        .map_err(|e| errors.push(e))
        .ok();
        let mode_text =
            one(&flags.socket_mode, "socket_mode").unwrap_or_else(|| DEFAULTS.text("socket_mode"));
        let socket_mode = match mode_text.as_str() {
            "0600" | "600" => 0o600,
            "0660" | "660" => 0o660,
            "0666" | "666" => 0o666,
            _ => {
                errors.push(format!(
                    "socket_mode {mode_text:?} must be 0600, 0660 or 0666"
                ));
                0o660
            }
        };
        let attestation = attestation(flags, path(&flags.sa_token_file, "sa_token_file"))
            .map_err(|e| errors.push(e.into()))
            .ok();
        let mut address = |flag: &Option<String>, key: &str| -> Option<SocketAddr> {
            let text = one(flag, key)?;
            text.parse()
                .map_err(|e| errors.push(format!("{key} {text:?}: {e}")))
                .ok()
        };
        let inbound_listen = address(&flags.inbound_listen, "inbound_listen");
        let outbound_listen = address(&flags.outbound_listen, "outbound_listen");
        let ext_authz_listen = one(&flags.ext_authz_listen, "ext_authz_listen")
            .and_then(|text| text.parse().map_err(|e| errors.push(e)).ok());
        let admin_text = one(&flags.admin_listen, "admin_listen")
            .unwrap_or_else(|| DEFAULTS.text("admin_listen"));
        let admin_listen = if admin_text == "off" {
            None
        } else {
            admin_text
                .parse()
                .map_err(|e| errors.push(format!("admin_listen {admin_text:?}: {e}")))
                .ok()
        };
        let upstream = one(&flags.upstream, "upstream");
        if let Some(up) = &upstream {
            let ok = up
                .parse::<http::uri::Authority>()
                .is_ok_and(|a| a.port_u16().is_some() && !up.contains('@'));
            if !ok {
                errors.push(format!("upstream {up:?} must be host:port"));
            }
        }
        let inbound = match (inbound_listen, upstream) {
            (Some(listen), Some(up)) => Some((listen, up)),
            (None, None) => None,
            (Some(_), None) => {
                errors.push("inbound_listen needs upstream (the app's host:port)".into());
                None
            }
            (None, Some(_)) => {
                errors.push("upstream needs inbound_listen (where callers connect)".into());
                None
            }
        };
        let mut seconds = |flag: &Option<String>, key: &str, min: u64, max: u64| {
            let text = one(flag, key).unwrap_or_else(|| DEFAULTS.text(key));
            match humantime::parse_duration(&text) {
                Ok(d) if (min..=max).contains(&d.as_secs()) && d.subsec_nanos() == 0 => {
                    Some(d.as_secs())
                }
                _ => {
                    errors.push(format!(
                        "{key} {text:?} must be whole seconds from {min}s to {max}s"
                    ));
                    None
                }
            }
        };
        let proof_max_age = seconds(&flags.proof_max_age, "proof_max_age", 1, 300);
        let clock_skew = seconds(&flags.clock_skew, "clock_skew", 0, 300);
        let watch_staleness = seconds(&flags.watch_staleness, "watch_staleness", 1, 86_400);
        let limits = crate::config::listener_limits(
            one(&flags.header_timeout, "header_timeout"),
            one(&flags.idle_timeout, "idle_timeout"),
            one(&flags.max_connections, "max_connections"),
            &DEFAULTS,
            &mut errors,
        );
        let authority_texts = if flags.inbound_authorities.is_empty() {
            from_file.all("inbound_authorities")
        } else {
            flags.inbound_authorities.clone()
        };
        let inbound_authorities = authority_texts
            .iter()
            .filter_map(|text| {
                Authority::parse(text)
                    .map_err(|_| {
                        errors.push(format!("inbound_authorities: {text:?} must be HOST:PORT"));
                    })
                    .ok()
            })
            .collect();
        let allow_uids = if flags.allow_uids.is_empty() {
            from_file
                .all("allow_uids")
                .iter()
                .filter_map(|t| {
                    t.parse()
                        .map_err(|_| errors.push(format!("allow_uids: {t:?} is not a uid")))
                        .ok()
                })
                .collect()
        } else {
            flags.allow_uids.clone()
        };
        let spiffe_socket = path(&flags.spiffe_socket, "spiffe_socket");
        if spiffe_socket.is_some() && spiffe_socket == path(&flags.socket, "socket") {
            errors.push(
                "spiffe_socket: must not be the local API's socket (give each its own path)".into(),
            );
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        Ok(Self {
            broker: broker.unwrap_or_else(|| unreachable!("checked above")),
            trust_bundle: trust_bundle.unwrap_or_else(|| unreachable!("checked above")),
            attestation: attestation.unwrap_or_else(|| unreachable!("checked above")),
            socket: path(&flags.socket, "socket"),
            socket_mode,
            spiffe_socket,
            allow_uids,
            service_map: path(&flags.service_map, "service_map"),
            inbound,
            inbound_mtls,
            ext_authz_listen,
            inbound_nonces,
            pass_credentials,
            proof_max_age: proof_max_age.unwrap_or_else(|| unreachable!("checked above")),
            clock_skew: clock_skew.unwrap_or_else(|| unreachable!("checked above")),
            watch_staleness: watch_staleness.unwrap_or_else(|| unreachable!("checked above")),
            deny_when_stale,
            outbound_listen,
            outbound_strict,
            admin_listen,
            inbound_authorities,
            limits,
        })
    }

    /// What the sidecar runs with: these settings, the trust bundle's PEM
    /// and the service map (both read by the caller).
    pub fn settings(self, bundle_pem: String, services: ServiceMap) -> SidecarSettings {
        let ext_authz = self.ext_authz_listen.as_ref().map(|_| ExtAuthzConfig {
            pass_credentials: self.pass_credentials,
            proof_max_age: self.proof_max_age,
            clock_skew: self.clock_skew,
            gate: super::gate::GateConfig {
                stale_after: self.watch_staleness,
                deny_when_stale: self.deny_when_stale,
                authorities: self.inbound_authorities.clone(),
            },
            ..ExtAuthzConfig::default()
        });
        let inbound = self.inbound.map(|(_, upstream)| {
            let mut c = InboundConfig::new(upstream);
            c.pass_credentials = self.pass_credentials;
            c.proof_max_age = self.proof_max_age;
            c.clock_skew = self.clock_skew;
            c.stale_after = self.watch_staleness;
            c.deny_when_stale = self.deny_when_stale;
            c.authorities = self.inbound_authorities;
            c.mtls = self.inbound_mtls;
            c
        });
        SidecarSettings {
            broker: self.broker,
            bundle_pem,
            attestation: self.attestation,
            services,
            allowed_uids: (!self.allow_uids.is_empty()).then_some(self.allow_uids),
            cache: CacheConfig::default(),
            inbound,
            ext_authz,
            inbound_nonces: self.inbound_nonces,
            outbound: OutboundConfig {
                strict: self.outbound_strict,
                ..OutboundConfig::default()
            },
            watch_staleness: self.watch_staleness,
            limits: self.limits,
        }
    }
}

/// Where the trust bundle comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustBundle {
    /// A PEM file, read at start.
    File(PathBuf),
    /// The PEM text, given inline (checked to hold certificates).
    Pem(String),
}

/// The bundle file or its PEM text: exactly one.
fn trust_bundle(file: Option<PathBuf>, pem: Option<String>) -> Result<TrustBundle, String> {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject as _;
    match (file, pem) {
        (Some(file), None) => Ok(TrustBundle::File(file)),
        (None, Some(pem)) => {
            let certs = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>();
            match certs {
                Ok(certs) if !certs.is_empty() => Ok(TrustBundle::Pem(pem)),
                Ok(_) => Err("trust_bundle_pem holds no PEM certificate".into()),
                Err(e) => Err(format!("trust_bundle_pem is not PEM certificates: {e}")),
            }
        }
        (Some(_), Some(_)) => Err("give trust_bundle or trust_bundle_pem, not both".into()),
        (None, None) => Err(
            "trust_bundle: give the trust bundle file (--trust-bundle FILE) or its text (TALLY_TRUST_BUNDLE_PEM)".into(),
        ),
    }
}

/// The join token or the ServiceAccount token file: exactly one.
fn attestation(
    flags: &SidecarFlags,
    sa_token_file: Option<PathBuf>,
) -> Result<Attestation, &'static str> {
    match (&flags.join_token, sa_token_file) {
        (Some(t), None) => Ok(Attestation::JoinToken(zeroize::Zeroizing::new(
            t.expose().to_owned(),
        ))),
        (None, Some(f)) => Ok(Attestation::ServiceAccountTokenFile(f)),
        (Some(_), Some(_)) => Err("give the join token or sa_token_file, not both"),
        (None, None) => {
            Err("attestation: give --join-token (or TALLY_JOIN_TOKEN) or --sa-token-file")
        }
    }
}

/// Where the socket goes when not given: `/run/tally` as root, else the
/// user's runtime dir or the temp dir.
pub fn default_socket() -> PathBuf {
    let root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    let dir = if root {
        PathBuf::from("/run/tally")
    } else {
        std::env::var_os("XDG_RUNTIME_DIR")
            .map_or_else(std::env::temp_dir, PathBuf::from)
            .join("tally")
    };
    dir.join("agent.sock")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flags() -> SidecarFlags {
        SidecarFlags {
            broker: Some("https://broker:8443".into()),
            trust_bundle: Some("bundle.pem".into()),
            sa_token_file: Some("/var/run/token".into()),
            ..SidecarFlags::default()
        }
    }

    #[test]
    fn defaults_and_the_file_fill_what_flags_leave_out() {
        let file = "inbound_listen: 127.0.0.1:15006\nupstream: 127.0.0.1:8080\ninbound_nonces: yes\nallow_uids: [1000, 1001]\nclock_skew: 2s\n";
        let c = SidecarConfig::resolve(&flags(), Some(("sidecar.yaml", file))).unwrap();
        assert_eq!(c.admin_listen, Some("127.0.0.1:15020".parse().unwrap()));
        assert_eq!(
            c.inbound,
            Some(("127.0.0.1:15006".parse().unwrap(), "127.0.0.1:8080".into()))
        );
        assert!(c.inbound_nonces && !c.pass_credentials && !c.outbound_strict);
        assert_eq!(c.inbound_mtls, super::super::mtls::InboundMtls::Optional);
        assert_eq!(c.allow_uids, [1000, 1001]);
        assert_eq!(c.outbound_listen, None);
        assert_eq!((c.proof_max_age, c.clock_skew), (30, 2));
        assert_eq!(c.watch_staleness, 30);
        assert_eq!(c.limits, crate::http::Limits::default());
        let bare = SidecarConfig::resolve(&flags(), None).unwrap();
        assert_eq!((bare.proof_max_age, bare.clock_skew), (30, 5));
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let flags = SidecarFlags {
            broker: Some("http://plain".into()),
            admin_listen: Some("nowhere".into()),
            ..SidecarFlags::default()
        };
        let file = "inbound_listen: 127.0.0.1:15006\noutbound_strict: maybe\ncolour: blue\nproof_max_age: forever\ninbound_mtls: sometimes\n";
        let errors = SidecarConfig::resolve(&flags, Some(("sidecar.yaml", file))).unwrap_err();
        let all = errors.join("\n");
        for expected in [
            "sidecar.yaml:3:1: unknown key \"colour\"",
            "outbound_strict \"maybe\"",
            "broker http://plain: the broker speaks only https",
            "trust_bundle",
            "attestation",
            "admin_listen \"nowhere\"",
            "inbound_listen needs upstream",
            "proof_max_age \"forever\"",
            "inbound_mtls: \"sometimes\" is not optional or required",
        ] {
            assert!(all.contains(expected), "{expected} missing from:\n{all}");
        }
        assert_eq!(errors.len(), 9, "{all}");
    }

    #[test]
    fn settings_carry_every_inbound_choice_to_the_proxy() {
        let flags = SidecarFlags {
            inbound_listen: Some("127.0.0.1:15006".into()),
            upstream: Some("127.0.0.1:8080".into()),
            pass_credentials: true,
            deny_when_stale: true,
            watch_staleness: Some("45s".into()),
            inbound_authorities: vec!["Pay.svc:8080".into()],
            allow_uids: vec![1000],
            inbound_mtls: Some("required".into()),
            ..flags()
        };
        let settings = SidecarConfig::resolve(&flags, None)
            .unwrap()
            .settings("PEM".into(), ServiceMap::default());
        let inbound = settings.inbound.unwrap();
        assert_eq!(inbound.upstream, "127.0.0.1:8080");
        assert_eq!(inbound.mtls, super::super::mtls::InboundMtls::Required);
        assert!(inbound.pass_credentials && inbound.deny_when_stale);
        assert_eq!((inbound.stale_after, settings.watch_staleness), (45, 45));
        assert_eq!(
            inbound.authorities,
            [Authority::parse("pay.svc:8080").unwrap()]
        );
        assert_eq!(settings.allowed_uids, Some(vec![1000]));
        assert!(matches!(
            settings.attestation,
            Attestation::ServiceAccountTokenFile(_)
        ));
    }

    #[test]
    fn a_join_token_is_never_shown_and_cannot_come_with_a_token_file() {
        let flags = SidecarFlags {
            join_token: Some("s3cret-join".parse().unwrap()),
            sa_token_file: None,
            ..flags()
        };
        let c = SidecarConfig::resolve(&flags, None).unwrap();
        let shown = format!("{flags:?}\n{c:?}");
        assert!(!shown.contains("s3cret-join"), "{shown}");
        let both = SidecarFlags {
            join_token: Some("s3cret-join".parse().unwrap()),
            ..self::flags()
        };
        let errors = SidecarConfig::resolve(&both, None).unwrap_err();
        assert_eq!(errors, ["give the join token or sa_token_file, not both"]);
    }

    #[test]
    fn the_bundle_may_be_given_as_text_but_not_with_a_file_and_must_be_pem() {
        let pem = "-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n";
        let inline = SidecarFlags {
            trust_bundle: None,
            trust_bundle_pem: Some(pem.into()),
            socket_mode: Some("0666".into()),
            ..flags()
        };
        let c = SidecarConfig::resolve(&inline, None).unwrap();
        assert_eq!(c.trust_bundle, TrustBundle::Pem(pem.into()));
        assert_eq!(c.socket_mode, 0o666);
        assert_eq!(
            SidecarConfig::resolve(&flags(), None).unwrap().socket_mode,
            0o660
        );
        let both = SidecarFlags {
            trust_bundle_pem: Some(pem.into()),
            ..flags()
        };
        let errors = SidecarConfig::resolve(&both, None).unwrap_err();
        assert_eq!(errors, ["give trust_bundle or trust_bundle_pem, not both"]);
        let junk = SidecarFlags {
            trust_bundle: None,
            trust_bundle_pem: Some("not a bundle".into()),
            socket_mode: Some("0777".into()),
            ..flags()
        };
        let errors = SidecarConfig::resolve(&junk, None).unwrap_err();
        assert_eq!(
            errors,
            [
                "trust_bundle_pem holds no PEM certificate",
                "socket_mode \"0777\" must be 0600, 0660 or 0666"
            ]
        );
    }
}
