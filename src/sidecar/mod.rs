//! The sidecar: the part every application touches. [`run::Sidecar`]
//! assembles it: the X.509 identity, attested and renewed ([`identity`]);
//! the token cache ([`cache`]) filled by the broker call ([`issuer`]); the
//! Watch stream follower ([`watch`]); and the servers: the local socket
//! API ([`api`]), the inbound verifying proxy ([`inbound`]), the outbound
//! proxy ([`outbound`]) and the admin port ([`admin`]).

pub mod admin;
pub mod api;
pub mod cache;
pub mod failures;
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
