//! tally: DPoP-bound workload identity for service meshes.
//!
//! # Layout
//!
//! - [`jose`]: strict base64url and JSON, P-256 and Ed25519 JWKs and
//!   RFC 7638 thumbprints, ES256 and EdDSA keys, the compact JWS parser
//!   (ES256 only, EdDSA where a WIMSE token asks for it).
//! - [`identity`]: SPIFFE IDs, join tokens, denied identities.
//! - [`ca`]: the identity CA: root and intermediate, X.509-SVIDs from CSRs.
//! - [`dpop`]: RFC 9449 proofs (mint and verify), `htu` normalization, the
//!   replay cache and stateless server nonces.
//! - [`token`]: RFC 9068 access tokens (mint and verify), JWKS key sets, the
//!   verified-token cache.
//! - [`wimse`]: WIMSE Workload Identity Tokens (minted by the broker,
//!   verified by `kid`) and Workload Proof Tokens (one request's proof).
//! - [`policy`]: trust policy: parsing with positioned errors, issue and
//!   access decisions, explanations.
//! - [`auth`]: a whole DPoP-bound request check, and the one mapping from
//!   failures to HTTP status and `WWW-Authenticate`.
//! - [`audit`]: audit events and their JSON-lines form (tokens only by
//!   `jti` and keyed hash).
//! - [`proto`]: the gRPC contract (generated from `proto/tally/v1`).
//! - [`rpc`]: what the broker's gRPC clients share: a refusal's words, and
//!   why a connection failed (unreachable, or the wrong trust bundle).
//! - [`store`]: durable broker state (SQLite; keys sealed at rest, join
//!   tokens hashed, issued-token inventory, audit log and change feed,
//!   written by group commit).
//! - [`broker`]: the broker: shared state ([`broker::Broker`]), issuance,
//!   the gRPC services (Identity, Tokens, Watch, Admin), the OAuth HTTPS
//!   endpoints, the admin port, key and CA rotation.
//! - [`http`]: the HTTP server loop (hyper, optional TLS, or a Unix
//!   socket) every listener shares, and a one-shot client.
//! - [`metrics`]: Prometheus text exposition.
//! - [`sidecar`]: the sidecar: identity, token cache, Watch follower, the
//!   local socket API, the inbound verifying and outbound signing proxies,
//!   the admin port.
//! - [`injector`]: the Kubernetes admission webhook: AdmissionReview in,
//!   the decision and JSON Patch that add the native sidecar, out.
//! - [`rate`]: token buckets (per issue rule, per inbound caller).
//! - [`config`]: YAML settings files for `--config`.
//! - [`clock`]: the clock services hold (pure code takes `now`).
//! - [`logging`]: `TALLY_LOG`, `TALLY_LOG_FORMAT` (text or JSON lines)
//!   and colour only on a terminal.
//! - [`cli`]: the `tally` command line (thin: parses and calls the above).
//!
//! The I/O shell is [`cli`], [`broker`], [`store`], [`http`] and the
//! sidecar's network parts; everything else is pure: checks take bytes and
//! a `now` (Unix seconds) and return typed results.

#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod broker;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod dpop;
pub mod http;
pub mod identity;
pub mod injector;
pub mod jose;
pub mod logging;
pub mod metrics;
pub mod policy;
pub mod proto;
pub mod rate;
pub mod rpc;
pub mod sidecar;
pub mod store;
pub mod token;
pub mod wimse;
