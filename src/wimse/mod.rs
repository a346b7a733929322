//! WIMSE workload-to-workload credentials (IETF
//! draft-ietf-wimse-workload-creds and draft-ietf-wimse-wpt): the
//! Workload Identity Token ([`wit`], `typ: wit+jwt`, a workload's SPIFFE
//! ID bound to its public key, signed by the broker) and the Workload
//! Proof Token ([`wpt`], `typ: wpt+jwt`, one request's proof of that
//! key). Pure: bytes and `now` in, typed results out.

pub mod wit;

pub use wit::{WIT_TYP, Wit, WitClaims};
