//! The sidecar: the part every application touches. Built so far: the
//! token cache ([`cache`]) and the broker call that fills it
//! ([`issuer`]). The identity loop, watch client, local socket API,
//! inbound verifier and outbound proxy come next (see the open issue).

pub mod cache;
pub mod issuer;
