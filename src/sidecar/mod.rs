//! The sidecar: the part every application touches. [`run::Sidecar`]
//! assembles it from the settings [`config`] resolves: the X.509
//! identity, attested and renewed ([`identity`]); the token cache
//! ([`cache`]) filled by the broker call ([`issuer`]), which also holds
//! the sidecar's WIMSE Workload Identity Token ([`wits`]); the Watch stream
//! follower ([`watch`]); and the servers: the local socket API ([`api`],
//! reading the [`service_map`]), the inbound verifying proxy
//! ([`inbound`]) and Envoy's ext_authz service ([`ext_authz`]), which
//! judge with one [`gate`] (reporting refusals through [`failures`]), the
//! outbound proxy ([`outbound`], which reaches mesh destinations over
//! mutual TLS ([`mtls`]) through [`mesh_client`]; both proxies share
//! [`proxy`]) and the admin port ([`admin`]). [`jitter`] spreads their
//! timers.

pub mod admin;
pub mod api;
pub mod cache;
pub mod config;
pub mod ext_authz;
pub mod failures;
pub mod gate;
pub mod identity;
pub mod inbound;
pub mod issuer;
pub mod jitter;
pub mod jwt_svids;
pub mod mesh_client;
pub mod mesh_conn;
pub mod mtls;
pub mod outbound;
pub mod proxy;
pub mod run;
pub mod service_map;
pub mod watch;
pub mod wits;
pub mod workload_api;
pub mod workload_svid;

pub use jitter::random_unit;
