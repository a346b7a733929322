//! Generates the gRPC code for `proto/tally/v1/*.proto` and the vendored
//! standard interfaces under `proto/vendor/` (the SPIFFE Workload API,
//! and Envoy's ext_authz service with what it imports) with protox (a
//! protobuf compiler in Rust, so no `protoc` is needed) and
//! tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tally/v1/admin.proto",
        "proto/tally/v1/identity.proto",
        "proto/tally/v1/reports.proto",
        "proto/tally/v1/tokens.proto",
        "proto/tally/v1/watch.proto",
    ];
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;

    // Upstream copies, compiled as they are (their imports resolve under
    // `proto/vendor`); the messages they import come along.
    let vendored = [
        "proto/vendor/envoy/service/auth/v3/external_auth.proto",
        "proto/vendor/spiffe/workload/workload.proto",
    ];
    let descriptors = protox::compile(vendored, ["proto", "proto/vendor"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
