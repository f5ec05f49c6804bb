//! Per-cluster rate limiting of intermediate issuance (governor's GCRA, keyed by cluster), so one
//! misbehaving agent cannot make the issuer sign without bound, while normal renewals (one per
//! lifetime) and a few retries always pass. Refills run on the injected clock. The limiter is
//! [`meshca_serve::KeyedLimiter`], shared with the workload CA and the pre-authentication budget.

use std::time::Duration;

use meshca_clock::SharedClock;
use meshca_serve::{KeyedLimiter, Rate};

/// Issuance limits keyed by cluster.
#[derive(Debug)]
pub struct RateLimiter {
    limiter: KeyedLimiter<String>,
}

impl RateLimiter {
    /// `burst` requests at once (at least 1), refilled at `per_minute` (at least one a day).
    pub fn new(burst: u32, per_minute: f64, clock: SharedClock) -> Self {
        let per_second = per_minute.max(1.0 / 1440.0) / 60.0;
        RateLimiter { limiter: KeyedLimiter::new(Rate::new(per_second, burst.max(1)), clock) }
    }

    /// Takes one permit for `key`, or says how long until one is available.
    pub fn try_acquire(&self, key: &str) -> Result<(), Duration> {
        self.limiter.check(&key.to_string())
    }
}

#[cfg(test)]
mod tests {
    use meshca_clock::ManualClock;

    use super::*;

    #[test]
    fn allows_a_burst_then_limits_each_cluster_on_its_own_and_refills_on_the_clock() {
        let clock = ManualClock::at_2026();
        let rl = RateLimiter::new(3, 6.0, clock.shared());
        for _ in 0..3 {
            assert!(rl.try_acquire("a").is_ok());
        }
        let wait = rl.try_acquire("a").expect_err("limited");
        assert_eq!(wait, Duration::from_secs(10), "6 a minute: one every 10 s");
        assert!(rl.try_acquire("b").is_ok(), "other clusters are unaffected");

        clock.advance(Duration::from_secs(9));
        assert_eq!(rl.try_acquire("a"), Err(Duration::from_secs(1)), "not refilled yet");
        clock.advance(Duration::from_secs(1));
        assert!(rl.try_acquire("a").is_ok(), "one permit back after 10 s");
        assert!(rl.try_acquire("a").is_err(), "and only one");
    }
}
