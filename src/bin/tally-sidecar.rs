//! The `tally-sidecar` binary: `tally sidecar` alone, with exactly its
//! arguments, environment and settings file. Linked from the same crate,
//! it holds none of the broker, store or SQLite code, so a pod's sidecar
//! process maps a fraction of the all-in-one binary's pages.

fn main() -> std::process::ExitCode {
    tally::cli::sidecar::main()
}
