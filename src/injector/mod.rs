//! `tally injector`: the Kubernetes mutating admission webhook that adds
//! the tally sidecar to pods.
//!
//! A pure core and a thin shell:
//!
//! - [`review`]: AdmissionReview v1 in (size cap first, strict JSON,
//!   typed errors) and out;
//! - [`pod`]: the decision for one pod (inject, or skip and why) and the
//!   JSON Patch against the pod as sent;
//! - [`template`]: what is injected (the native sidecar, volumes, env),
//!   with the names, paths and ports the docs promise;
//! - [`quantity`]: Kubernetes resource quantities in annotations;
//! - [`config`]: flags, `TALLY_*` and the YAML file;
//! - [`files`]: the serving certificate and trust bundle, reloaded when
//!   their files change;
//! - [`server`]: `POST /inject`, `/healthz`, `/readyz`, `/metrics` over
//!   HTTPS on the shared accept loop;
//! - [`yaml`] and [`apply`]: reading a pod file and applying the patch,
//!   for `--print-pod`.

pub mod apply;
pub mod config;
pub mod files;
mod json;
pub mod pod;
pub mod quantity;
pub mod review;
pub mod server;
pub mod template;
pub mod yaml;

pub use json::{JsonError, MAX_DEPTH};
