//! The gRPC contracts, generated at build time: the broker's own
//! (`proto/tally/v1/*.proto`) and the standard interfaces tally serves,
//! from the upstream copies under `proto/vendor/`. Messages become domain
//! types (`SpiffeId`, `Scopes`, …) the moment they arrive; nothing past
//! the server edge handles these raw types.
//!
//! Vendored packages sit in a tree matching their protobuf package names
//! (`envoy.service.auth.v3` is [`envoy::service::auth::v3`]): prost writes
//! a reference to another package as a `super::` path from its own.

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

/// `envoy.*`: the ext_authz service (`envoy.service.auth.v3`) and the
/// messages it uses.
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod envoy {
    /// `envoy.config.*`.
    pub mod config {
        /// `envoy.config.core.*`.
        pub mod core {
            /// `envoy.config.core.v3`.
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.service.*`.
    pub mod service {
        /// `envoy.service.auth.*`.
        pub mod auth {
            /// `envoy.service.auth.v3`: `Authorization/Check`.
            pub mod v3 {
                tonic::include_proto!("envoy.service.auth.v3");
            }
        }
    }
    /// `envoy.type.*`.
    pub mod r#type {
        /// `envoy.type.v3`.
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

/// `google.rpc`: the status a `CheckResponse` carries.
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod google {
    /// `google.rpc`.
    pub mod rpc {
        tonic::include_proto!("google.rpc");
    }
}

/// `udpa.annotations`: option types the Envoy protos import.
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod udpa {
    /// `udpa.annotations`.
    pub mod annotations {
        tonic::include_proto!("udpa.annotations");
    }
}

/// `validate`: protoc-gen-validate's rule types, imported by the Envoy
/// protos (tally does not run the rules; its own checks are below the
/// server edge).
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod validate {
    tonic::include_proto!("validate");
}

/// `xds.*`: annotations and context types the Envoy protos import.
#[allow(missing_docs, clippy::all, clippy::pedantic, rustdoc::all)]
pub mod xds {
    /// `xds.annotations.*`.
    pub mod annotations {
        /// `xds.annotations.v3`.
        pub mod v3 {
            tonic::include_proto!("xds.annotations.v3");
        }
    }
    /// `xds.core.*`.
    pub mod core {
        /// `xds.core.v3`.
        pub mod v3 {
            tonic::include_proto!("xds.core.v3");
        }
    }
}
