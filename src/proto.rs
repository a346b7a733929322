//! The broker's gRPC contract, generated from `proto/tally/v1/*.proto`,
//! and the standard services the sidecar serves, from `proto/vendor/`.
//! Messages become domain types (`SpiffeId`, `Scopes`, …) the moment they
//! arrive; nothing past the server edge handles these raw types.

/// `tally.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tally.v1");
}

/// The SPIFFE Workload API (`workload.proto` declares no package, so its
/// service is `/SpiffeWorkloadAPI/…` on the wire).
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod spiffe_workload {
    tonic::include_proto!("_");
}
