//! Per-cluster rate limiting of intermediate issuance (governor's GCRA, keyed by cluster), so one
//! misbehaving agent cannot make the issuer sign without bound, while normal renewals (one per
//! lifetime) and a few retries always pass. Refills run on the injected clock.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter as Gcra};
use meshca_clock::{GovernorClock, SharedClock};

/// Issuance limits keyed by cluster.
pub struct RateLimiter {
    limiter: Gcra<String, DefaultKeyedStateStore<String>, GovernorClock, NoOpMiddleware<Nanos>>,
    clock: GovernorClock,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// `burst` requests at once (at least 1), refilled at `per_minute` (at least one a day).
    pub fn new(burst: u32, per_minute: f64, clock: SharedClock) -> Self {
        let period = Duration::from_secs_f64((60.0 / per_minute.max(1.0 / 1440.0)).min(86400.0));
        let quota = Quota::with_period(period).unwrap_or_else(|| Quota::per_minute(NonZeroU32::MIN));
        let quota = quota.allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
        let clock = GovernorClock(clock);
        RateLimiter { limiter: Gcra::new(quota, DefaultKeyedStateStore::default(), clock.clone()), clock }
    }

    /// Takes one permit for `key`, or says how long until one is available.
    pub fn try_acquire(&self, key: &str) -> Result<(), Duration> {
        self.limiter.check_key(&key.to_string()).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
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
