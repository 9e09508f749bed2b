//! Randomness the kill loops can replay: a seed read from an environment
//! variable (or else the clock) and printed, and a small deterministic
//! generator of moments and choices drawn from it.

/// The seed in the environment variable `var`, or else one from the clock.
/// Printed, so that a failing run can be replayed by setting `var`.
pub fn seed(var: &str) -> u64 {
    let seed = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("seed {seed} ({var}={seed} replays this run)");
    seed
}

/// A small deterministic generator (xorshift64*), so that a run can be
/// replayed from its seed.
pub struct Moments(u64);

impl Moments {
    /// The sequence of `seed`.
    pub fn new(seed: u64) -> Moments {
        // xorshift stays at zero from zero.
        Moments(seed | 1)
    }

    /// A number in `0..below`.
    pub fn below(&mut self, below: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % below
    }

    /// A number of milliseconds in `from..to`.
    pub fn next_ms(&mut self, from: u64, to: u64) -> u64 {
        from + self.below(to - from)
    }
}
