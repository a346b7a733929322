//! The broker's gRPC contract, generated from `proto/tally/v1/*.proto`.
//! Messages become domain types (`SpiffeId`, `Scopes`, …) the moment they
//! arrive; nothing past the server edge handles these raw types.

/// `tally.v1`.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod v1 {
    tonic::include_proto!("tally.v1");
}
