//! The broker: identity CA, token issuer and policy engine behind mTLS
//! gRPC and an OAuth HTTPS listener.
//!
//! - [`state`]: the [`Broker`] and its operations (issuance, revocation,
//!   denials, rotation, policy versions, the change feed, audit), on one
//!   store; it imports no front end.
//! - [`serve`]: the front ends, each mapping one protocol onto the state
//!   (gRPC, OAuth HTTPS, the admin port) and the listeners' certificate.
//! - [`run`]: [`start`], the one way a broker is started (by `tally
//!   broker`, the demo, the load tools and the tests), with every
//!   background task.
//! - [`cluster`]: Kubernetes ServiceAccount token attestation (the
//!   cluster's keys by discovery or file, TokenReview), which the state
//!   holds and the Attest RPC calls.
//! - [`config`]: `tally broker`'s settings (flags, `TALLY_*`, YAML);
//!   [`setup`] turns them into the [`run::Parts`].

pub mod cluster;
pub mod config;
pub mod run;
pub mod serve;
pub mod setup;
pub mod state;

pub use run::{Listeners, Parts, Running, StartError, start};
pub use state::{
    Broker, BrokerError, BrokerMetrics, BrokerSettings, PolicySource, denials, deployment,
    governance, issue, keys, replicas,
};
