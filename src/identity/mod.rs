//! Workload identity: SPIFFE IDs, one-time join tokens, Kubernetes
//! ServiceAccount tokens ([`k8s`]), identities an admin has cut off
//! ([`denial`]), and the peer of a mutual-TLS connection ([`peer`]).

pub mod denial;
pub mod join_token;
pub mod k8s;
pub mod peer;
mod spiffe_id;

pub use denial::{Denial, DenialSet};
pub use join_token::{JoinToken, JoinTokenHash};
pub use peer::{PeerError, PeerIdentity, key_and_expiry};
pub use spiffe_id::{SpiffeId, SpiffeIdError};
