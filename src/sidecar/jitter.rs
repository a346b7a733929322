//! Randomness for jitter (renewal, refresh, reconnect backoff), so a
//! fleet of sidecars restarted together does not call the broker in step.

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
