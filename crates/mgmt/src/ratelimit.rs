//! Per-cluster rate limiting of intermediate issuance: a token bucket per cluster, so one
//! misbehaving agent cannot make the issuer sign without bound, while normal renewals (one per
//! lifetime) and a few retries always pass.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Token buckets keyed by cluster.
#[derive(Debug)]
pub struct RateLimiter {
    burst: f64,
    per_second: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl RateLimiter {
    /// `burst` requests at once, refilled at `per_minute`.
    pub fn new(burst: u32, per_minute: f64) -> Self {
        RateLimiter { burst: f64::from(burst), per_second: per_minute / 60.0, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one token for `key` at `now`, or says how long until one is available.
    pub fn try_acquire(&self, key: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, last) = buckets.entry(key.to_string()).or_insert((self.burst, now));
        let elapsed = now.saturating_duration_since(*last).as_secs_f64();
        *tokens = (*tokens + elapsed * self.per_second).min(self.burst);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else if self.per_second > 0.0 {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.per_second))
        } else {
            Err(Duration::MAX)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allows_a_burst_then_refills_per_cluster() {
        let rl = RateLimiter::new(3, 6.0);
        let t = Instant::now();
        for _ in 0..3 {
            assert!(rl.try_acquire("a", t).is_ok());
        }
        let wait = rl.try_acquire("a", t).expect_err("limited");
        assert!(wait <= Duration::from_secs(10), "{wait:?}");
        assert!(rl.try_acquire("b", t).is_ok(), "other clusters are unaffected");
        assert!(rl.try_acquire("a", t + Duration::from_secs(10)).is_ok(), "refilled");
    }
}
