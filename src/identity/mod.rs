//! Workload identity: SPIFFE IDs, one-time join tokens, Kubernetes
//! ServiceAccount tokens ([`k8s`]), and identities an admin has cut off
//! ([`denial`]).

pub mod denial;
pub mod join_token;
pub mod k8s;
mod spiffe_id;

pub use denial::{Denial, DenialSet};
pub use join_token::{JoinToken, JoinTokenHash};
pub use spiffe_id::{SpiffeId, SpiffeIdError};
