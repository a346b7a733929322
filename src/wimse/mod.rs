//! WIMSE workload-to-workload credentials (IETF
//! draft-ietf-wimse-workload-creds and draft-ietf-wimse-wpt): the
//! Workload Identity Token ([`wit`], `typ: wit+jwt`, a workload's
//! identifier bound to its public key, signed by the broker), verified
//! with the issuer keys of [`keys`], and the Workload Proof Token
//! ([`wpt`], `typ: wpt+jwt`, one request's proof of that key). Refusals
//! are typed in [`error`], which also says how each is answered over
//! HTTP. Pure: bytes and `now` in, typed results out. docs/WIMSE.md lists
//! every check.

pub mod error;
pub mod keys;
pub mod wit;
pub mod wpt;

pub use error::{WitError, WptError};
pub use keys::{WitKeys, WitKeysError};
pub use wit::{VerifiedWit, WIT_TYP, Wit, WitCheck, WitClaims, WitConfig};
pub use wpt::{RequestHeaders, VerifiedWpt, WPT_TYP, WptCheck, WptConfig, WptContext, WptInput};
