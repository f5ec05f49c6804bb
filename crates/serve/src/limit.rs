//! Rate limits keyed by who is asking: the address a request came from (before anything is known
//! about the caller) or the identity it proved (after authentication). governor's GCRA per key,
//! refilled on the injected clock, so a test on a `ManualClock` sees a refill when it advances
//! the clock, without sleeping.
//!
//! Memory is bounded: the keyed state is swept of keys whose bucket is full again (they would
//! behave exactly as a new key) every [`SWEEP_EVERY`] checks, so a caller cycling through
//! addresses or identities leaves nothing behind for longer than a refill.

use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use governor::clock::Clock as _;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};
use meshca_clock::{GovernorClock, SharedClock};

/// How often (in checks) the keyed state is swept of idle keys.
pub const SWEEP_EVERY: u64 = 4096;

/// The address a pre-authentication budget or a connection cap is charged to: an IPv4 address,
/// or the /64 network of an IPv6 address (one host is routinely given a whole /64, so a single
/// attacker could otherwise take 2^64 budgets). An IPv4-mapped IPv6 address is its IPv4 address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey(IpAddr);

impl PeerKey {
    /// The key of `addr`.
    pub fn of(addr: IpAddr) -> PeerKey {
        match addr {
            IpAddr::V4(v4) => PeerKey(IpAddr::V4(v4)),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => PeerKey(IpAddr::V4(v4)),
                None => {
                    let s = v6.segments();
                    PeerKey(IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0)))
                }
            },
        }
    }

    /// The key of requests whose address is not known (an in-process call): they share one budget.
    pub fn unknown() -> PeerKey {
        PeerKey(IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    }
}

impl fmt::Display for PeerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V6(v6) if v6.is_unspecified() => f.write_str("an unknown address"),
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            IpAddr::V4(v4) => write!(f, "{v4}"),
        }
    }
}

/// A rate: `burst` requests at once, refilled at `per_second`. A rate of 0 per second is no
/// limit at all.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    /// Sustained requests per second (0: unlimited).
    pub per_second: f64,
    /// Requests allowed at once, on top of the sustained rate (at least 1).
    pub burst: u32,
}

impl Rate {
    /// No limit.
    pub const UNLIMITED: Rate = Rate { per_second: 0.0, burst: 0 };

    /// `per_second` with a burst of `burst`.
    pub const fn new(per_second: f64, burst: u32) -> Rate {
        Rate { per_second, burst }
    }

    /// Whether this rate limits anything.
    pub fn is_limited(&self) -> bool {
        self.per_second > 0.0
    }

    fn quota(&self) -> Option<Quota> {
        if !self.is_limited() {
            return None;
        }
        // At least one request a day: governor cannot express a slower refill.
        let period = Duration::from_secs_f64((1.0 / self.per_second).min(86_400.0));
        let quota = Quota::with_period(period.max(Duration::from_nanos(1)))?;
        Some(quota.allow_burst(NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN)))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_limited() {
            write!(f, "{}/s (burst {})", self.per_second, self.burst.max(1))
        } else {
            f.write_str("unlimited")
        }
    }
}

type Gcra<K> = RateLimiter<K, DefaultKeyedStateStore<K>, GovernorClock, NoOpMiddleware<Nanos>>;

/// A rate limit per key (an address, an identity, a cluster).
pub struct KeyedLimiter<K: Hash + Eq + Clone> {
    limiter: Option<Gcra<K>>,
    clock: GovernorClock,
    rate: Rate,
    checks: AtomicU64,
}

impl<K: Hash + Eq + Clone> fmt::Debug for KeyedLimiter<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimiter").field("rate", &self.rate).finish_non_exhaustive()
    }
}

impl<K: Hash + Eq + Clone> KeyedLimiter<K> {
    /// A limiter allowing each key `rate`, timed by `clock`.
    pub fn new(rate: Rate, clock: SharedClock) -> Self {
        let clock = GovernorClock(clock);
        let limiter = rate.quota().map(|q| RateLimiter::new(q, DefaultKeyedStateStore::default(), clock.clone()));
        KeyedLimiter { limiter, clock, rate, checks: AtomicU64::new(0) }
    }

    /// The rate each key is allowed.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one permit for `key`, or says how long until one is available.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else { return Ok(()) };
        if self.checks.fetch_add(1, Ordering::Relaxed) % SWEEP_EVERY == SWEEP_EVERY - 1 {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        limiter.check_key(key).map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// How many keys are tracked now (for tests of the memory bound).
    pub fn tracked(&self) -> usize {
        self.limiter.as_ref().map(|l| l.len()).unwrap_or(0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::net::Ipv4Addr;

    use meshca_clock::ManualClock;

    use super::*;

    #[test]
    fn a_burst_then_a_refill_on_the_clock_per_key() {
        let clock = ManualClock::at_2026();
        let rl = KeyedLimiter::new(Rate::new(0.1, 3), clock.shared());
        for _ in 0..3 {
            assert!(rl.check(&"a").is_ok());
        }
        assert_eq!(rl.check(&"a"), Err(Duration::from_secs(10)), "one every 10 s");
        assert!(rl.check(&"b").is_ok(), "other keys are unaffected");
        clock.advance(Duration::from_secs(9));
        assert_eq!(rl.check(&"a"), Err(Duration::from_secs(1)));
        clock.advance(Duration::from_secs(1));
        assert!(rl.check(&"a").is_ok());
        assert!(rl.check(&"a").is_err(), "and only one");
    }

    #[test]
    fn zero_per_second_is_no_limit() {
        let rl = KeyedLimiter::new(Rate::UNLIMITED, ManualClock::at_2026().shared());
        for _ in 0..10_000 {
            assert!(rl.check(&1u8).is_ok());
        }
        assert_eq!(rl.tracked(), 0);
        assert_eq!(Rate::UNLIMITED.to_string(), "unlimited");
    }

    #[test]
    fn keys_that_refilled_are_swept_so_memory_stays_bounded() {
        let clock = ManualClock::at_2026();
        let rl = KeyedLimiter::new(Rate::new(10.0, 5), clock.shared());
        for i in 0..SWEEP_EVERY - 1 {
            assert!(rl.check(&i).is_ok());
        }
        assert_eq!(rl.tracked() as u64, SWEEP_EVERY - 1);
        // Long enough for every bucket to be full again: they are all forgotten at the next sweep.
        clock.advance(Duration::from_secs(60));
        assert!(rl.check(&u64::MAX).is_ok());
        assert!(rl.tracked() <= 1, "{} keys kept", rl.tracked());
    }

    #[test]
    fn ipv6_addresses_share_a_budget_per_64_and_mapped_ipv4_is_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(PeerKey::of(a), PeerKey::of(b));
        assert_ne!(PeerKey::of(a), PeerKey::of(c));
        assert_eq!(PeerKey::of(a).to_string(), "2001:db8:1:2::/64");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(PeerKey::of(mapped), PeerKey::of(IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))));
        assert_eq!(PeerKey::of(mapped).to_string(), "10.1.2.3");
    }
}
