//! The sidecar: the part every application touches. Built so far: the
//! token cache ([`cache`]), the broker call that fills it ([`issuer`]),
//! and the X.509 identity: attestation and renewal ([`identity`]). The
//! watch client, local socket API, inbound verifier and outbound proxy come
//! next (see the open issue).

pub mod cache;
pub mod identity;
pub mod issuer;
