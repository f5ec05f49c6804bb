//! Time as a dependency.
//!
//! Every lifecycle in meshca — an intermediate's renewal, a bootstrap token's expiry, a rate
//! limit's refill, a root rotation's drain — is a decision about *when*. Those decisions take
//! `now` as a value (the PKI crate and the pure planners) or a [`Clock`] (the async drivers
//! around them), never the wall clock read ad hoc, so that tests can run hours of simulated time
//! in milliseconds on a [`ManualClock`], and so that one flow sees one consistent "now".
//!
//! Only this crate and the binary's wiring call `SystemTime::now()`.
#![forbid(unsafe_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::watch;

/// The source of time for a component: what time it is, and how to wait for a later time.
pub trait Clock: Send + Sync + std::fmt::Debug + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;

    /// Completes once [`Clock::now`] has reached `deadline` (at once if it already has).
    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()>;

    /// Completes after `d` of this clock's time.
    fn sleep(&self, d: Duration) -> BoxFuture<'static, ()> {
        self.sleep_until(self.now() + d)
    }
}

/// A shared clock, as components hold it.
pub type SharedClock = Arc<dyn Clock>;

/// The real clock: the system's wall time; sleeping through `tokio::time`.
///
/// A sleep is converted to a monotonic duration when it starts, so a wall-clock step while it
/// runs shifts the wake-up (as every timer-based scheduler does); the drivers re-read `now` when
/// they wake and decide again, so a step never skips a renewal.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }

    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()> {
        let d = deadline.duration_since(SystemTime::now()).unwrap_or_default();
        Box::pin(tokio::time::sleep(d))
    }
}

/// The system clock, shared.
pub fn system() -> SharedClock {
    Arc::new(SystemClock)
}

/// A clock that moves only when told to. Sleepers wake when [`ManualClock::advance`] (or
/// [`ManualClock::set`]) carries the time past their deadline, in deadline order as far as the
/// runtime schedules them; nothing sleeps in real time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    now: Mutex<SystemTime>,
    tick: watch::Sender<SystemTime>,
}

impl ManualClock {
    /// A clock standing at `start`.
    pub fn new(start: SystemTime) -> Self {
        let (tick, _) = watch::channel(start);
        ManualClock { inner: Arc::new(Inner { now: Mutex::new(start), tick }) }
    }

    /// A clock standing at a fixed, recent-looking instant (2026-01-01T00:00:00Z), so that
    /// certificates made on it are within every verifier's accepted range.
    pub fn at_2026() -> Self {
        ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_767_225_600))
    }

    /// Moves the clock forward by `d` and wakes the sleepers whose deadline has come.
    pub fn advance(&self, d: Duration) {
        let next = {
            let mut now = self.inner.now.lock().unwrap_or_else(|p| p.into_inner());
            *now += d;
            *now
        };
        self.inner.tick.send_replace(next);
    }

    /// Sets the clock to `t` (which may be earlier: a wall-clock step backwards).
    pub fn set(&self, t: SystemTime) {
        *self.inner.now.lock().unwrap_or_else(|p| p.into_inner()) = t;
        self.inner.tick.send_replace(t);
    }

    /// This clock as a [`SharedClock`].
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.inner.now.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn sleep_until(&self, deadline: SystemTime) -> BoxFuture<'static, ()> {
        let mut rx = self.inner.tick.subscribe();
        let inner = self.inner.clone();
        Box::pin(async move {
            loop {
                if *inner.now.lock().unwrap_or_else(|p| p.into_inner()) >= deadline {
                    return;
                }
                if rx.changed().await.is_err() {
                    // The clock is gone: nothing will ever advance it.
                    return std::future::pending().await;
                }
            }
        })
    }
}

/// A [`governor`] clock that reads a meshca [`Clock`]: rate limits refill on the injected time,
/// so a test on a [`ManualClock`] sees a refill when it advances the clock, without sleeping.
#[cfg(feature = "governor")]
#[derive(Debug, Clone)]
pub struct GovernorClock(pub SharedClock);

#[cfg(feature = "governor")]
impl governor::clock::Clock for GovernorClock {
    type Instant = governor::nanos::Nanos;

    fn now(&self) -> Self::Instant {
        // Nanoseconds since the epoch fit a u64 until the year 2554.
        governor::nanos::Nanos::from(self.0.now().duration_since(UNIX_EPOCH).unwrap_or_default())
    }
}

/// Seconds since the Unix epoch (negative before it), as the wire formats and records keep time.
pub fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// The inverse of [`unix`], saturating at the epoch's representable range.
pub fn from_unix(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs())).unwrap_or(UNIX_EPOCH)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_manual_clock_wakes_sleepers_only_when_advanced_past_their_deadline() {
        let clock = ManualClock::at_2026();
        let t0 = clock.now();
        let short = tokio::spawn(clock.sleep(Duration::from_secs(10)));
        let long = tokio::spawn(clock.sleep(Duration::from_secs(3600)));
        tokio::task::yield_now().await;
        assert!(!short.is_finished() && !long.is_finished());

        clock.advance(Duration::from_secs(9));
        tokio::task::yield_now().await;
        assert!(!short.is_finished(), "9 s is before the 10 s deadline");

        clock.advance(Duration::from_secs(1));
        short.await.expect("short sleep");
        assert!(!long.is_finished());
        clock.advance(Duration::from_secs(3600));
        long.await.expect("long sleep");
        assert_eq!(clock.now(), t0 + Duration::from_secs(3610));

        // A deadline in the past completes at once.
        clock.sleep_until(t0).await;
    }

    #[test]
    fn unix_seconds_round_trip_and_saturate() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(unix(t), 1_700_000_000);
        assert_eq!(from_unix(1_700_000_000), t);
        assert_eq!(unix(UNIX_EPOCH - Duration::from_secs(5)), -5);
        assert_eq!(from_unix(-5), UNIX_EPOCH - Duration::from_secs(5));
        assert_eq!(from_unix(0), UNIX_EPOCH);
    }
}
