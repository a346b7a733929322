//! Workload identity: SPIFFE IDs and one-time join tokens.

pub mod join_token;
mod spiffe_id;

pub use join_token::{JoinToken, JoinTokenHash};
pub use spiffe_id::{SpiffeId, SpiffeIdError};
