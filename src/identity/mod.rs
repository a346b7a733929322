//! Workload identity: SPIFFE IDs, one-time join tokens, and Kubernetes
//! ServiceAccount tokens ([`k8s`]).

pub mod join_token;
pub mod k8s;
mod spiffe_id;

pub use join_token::{JoinToken, JoinTokenHash};
pub use spiffe_id::{SpiffeId, SpiffeIdError};
