//! The sidecar: the part every application touches. Built so far: the
//! token cache ([`cache`]), the broker call that fills it ([`issuer`]),
//! the X.509 identity: attestation and renewal ([`identity`]), and the
//! Watch stream follower ([`watch`]), and the local socket API ([`api`]).
//! The inbound verifier, outbound proxy and `tally sidecar` come next (see
//! the open issue).

pub mod admin;
pub mod api;
pub mod cache;
pub mod identity;
pub mod inbound;
pub mod issuer;
pub mod outbound;
pub mod proxy;
pub mod run;
pub mod watch;

/// A uniform number in [0, 1) from the system random source, for jitter
/// (0.5 if the source fails: no jitter is better than none at all).
pub fn random_unit() -> f64 {
    use aws_lc_rs::rand::SecureRandom as _;
    let mut b = [0u8; 4];
    if aws_lc_rs::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}
