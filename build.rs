//! Generates the gRPC code for `proto/tally/v1/*.proto` and the vendored
//! standard protos under `proto/vendor/` (the SPIFFE Workload API) with
//! protox (a protobuf compiler in Rust, so no `protoc` is needed) and
//! tonic-prost-build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/tally/v1/admin.proto",
        "proto/tally/v1/identity.proto",
        "proto/tally/v1/reports.proto",
        "proto/tally/v1/tokens.proto",
        "proto/tally/v1/watch.proto",
        "proto/vendor/spiffe/workload/workload.proto",
    ];
    let descriptors = protox::compile(files, ["proto", "proto/vendor"])?;
    tonic_prost_build::configure().compile_fds(descriptors)?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
