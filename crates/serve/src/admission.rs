//! Admission of expensive requests: when every workload asks at once (a new root set, a
//! revocation, a restarted node pool), at most `max_in_flight` requests are worked on; the rest
//! wait in a bounded queue served round-robin across keys (the caller's address), so one
//! address's herd cannot starve another's; past the queue's bound — in total or for one key — or
//! past the longest wait, the caller is told `RESOURCE_EXHAUSTED` with a retry hint at once.
//! Nothing is held until the client gives up: there is no timeout storm, and memory is bounded
//! by `max_in_flight + max_queued` requests.
//!
//! The invariant: `in_flight` counts the permits alive; a permit released while others wait is
//! handed straight to the next waiter (so `in_flight` does not change and a new arrival cannot
//! jump the queue), else `in_flight` drops. A waiter that stops waiting (the client cancelled, or
//! it waited too long) either never got a permit, or gives back the one it got.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

/// How much is admitted and how long one may wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdmissionConfig {
    /// Requests worked on at once (at least 1).
    pub max_in_flight: usize,
    /// Requests waiting, in total; one more is refused at once.
    pub max_queued: usize,
    /// Requests waiting from one key; one more from it is refused at once.
    pub max_queued_per_key: usize,
    /// The longest a request waits for its turn before it is refused.
    pub max_wait: Duration,
}

/// Why a request was not admitted; each carries the hint given to the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The queue is full.
    Full {
        /// When to come back.
        retry_after: Duration,
    },
    /// This key's share of the queue is full.
    KeyFull {
        /// When to come back.
        retry_after: Duration,
    },
    /// The request waited [`AdmissionConfig::max_wait`] without its turn coming.
    WaitedTooLong {
        /// When to come back.
        retry_after: Duration,
    },
}

impl Refusal {
    /// When the caller should come back.
    pub fn retry_after(&self) -> Duration {
        match self {
            Refusal::Full { retry_after }
            | Refusal::KeyFull { retry_after }
            | Refusal::WaitedTooLong { retry_after } => *retry_after,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::Full { .. } => "too many requests are waiting",
            Refusal::KeyFull { .. } => "too many requests from this address are waiting",
            Refusal::WaitedTooLong { .. } => "the request waited too long for its turn",
        })
    }
}

/// A turn handed from a finished request to a waiting one.
struct Grant;

struct State<K> {
    in_flight: usize,
    queued: usize,
    /// The most that ever waited at once.
    queued_high: usize,
    queues: HashMap<K, VecDeque<oneshot::Sender<Grant>>>,
    /// Keys with waiters, in serving order.
    ring: VecDeque<K>,
    /// Moving average of how long a permit is held.
    hold: Duration,
}

struct Inner<K> {
    cfg: AdmissionConfig,
    state: Mutex<State<K>>,
}

/// The admission queue; cheap to clone (one shared queue).
pub struct Admission<K> {
    inner: Arc<Inner<K>>,
}

impl<K> Clone for Admission<K> {
    fn clone(&self) -> Self {
        Admission { inner: self.inner.clone() }
    }
}

impl<K> fmt::Debug for Admission<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admission").field("cfg", &self.inner.cfg).finish_non_exhaustive()
    }
}

/// The right to work on one request; the next waiter's turn comes when it is dropped.
pub struct Permit<K: Hash + Eq + Clone> {
    inner: Arc<Inner<K>>,
    since: Instant,
}

impl<K: Hash + Eq + Clone> Drop for Permit<K> {
    fn drop(&mut self) {
        self.inner.release(Some(self.since.elapsed()));
    }
}

/// First guess of a permit's hold time, before any was measured.
const INITIAL_HOLD: Duration = Duration::from_millis(5);
/// Bounds of the retry hint.
const MIN_HINT: Duration = Duration::from_millis(50);
const MAX_HINT: Duration = Duration::from_secs(30);

impl<K: Hash + Eq + Clone> Inner<K> {
    fn lock(&self) -> MutexGuard<'_, State<K>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit ends (after `held`, when it was used): hand the turn to the next waiter,
    /// round-robin over keys, or free the slot.
    fn release(&self, held: Option<Duration>) {
        let mut st = self.lock();
        if let Some(h) = held {
            st.hold = (st.hold * 7 + h) / 8;
        }
        while let Some(key) = st.ring.pop_front() {
            let Some(q) = st.queues.get_mut(&key) else { continue };
            let next = q.pop_front();
            let more = !q.is_empty();
            if more {
                st.ring.push_back(key);
            } else {
                st.queues.remove(&key);
            }
            let Some(tx) = next else { continue };
            st.queued -= 1;
            // A waiter that already left refuses the grant; try the next.
            if tx.send(Grant).is_ok() {
                return;
            }
        }
        st.in_flight -= 1;
    }

    /// The hint for a caller refused now: about how long the queue ahead takes to drain, at
    /// least [`MIN_HINT`], at most [`MAX_HINT`], spread by up to as much again so that a refused
    /// herd does not come back as one.
    fn hint(&self, st: &State<K>) -> Duration {
        let slots = self.cfg.max_in_flight.max(1) as u32;
        let ahead = u32::try_from(st.queued + 1).unwrap_or(u32::MAX);
        let base = (st.hold.saturating_mul(ahead) / slots).clamp(MIN_HINT, MAX_HINT);
        base + base.mul_f64(jitter())
    }

    /// Removes the senders of waiters that left from `key`'s queue.
    fn forget_departed(&self, key: &K) {
        let mut st = self.lock();
        let Some(q) = st.queues.get_mut(key) else { return };
        let before = q.len();
        q.retain(|tx| !tx.is_closed());
        let gone = before - q.len();
        let empty = q.is_empty();
        st.queued -= gone;
        if empty {
            st.queues.remove(key);
            st.ring.retain(|k| k != key);
        }
    }
}

/// A uniform draw from [0, 1).
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if aws_lc_rs::rand::fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// A waiter's end of the channel: if it leaves (cancelled) after a grant was sent, the grant is
/// given back, so no slot is lost.
struct Waiting<K: Hash + Eq + Clone> {
    rx: oneshot::Receiver<Grant>,
    inner: Arc<Inner<K>>,
    key: K,
    done: bool,
}

impl<K: Hash + Eq + Clone> Waiting<K> {
    /// Stops waiting: the grant if one came meanwhile.
    fn leave(&mut self) -> Option<Grant> {
        self.done = true;
        self.rx.close();
        let got = self.rx.try_recv().ok();
        if got.is_none() {
            self.inner.forget_departed(&self.key);
        }
        got
    }
}

impl<K: Hash + Eq + Clone> Drop for Waiting<K> {
    fn drop(&mut self) {
        if !self.done && self.leave().is_some() {
            self.inner.release(None);
        }
    }
}

impl<K: Hash + Eq + Clone> Admission<K> {
    /// An admission queue with `cfg`.
    pub fn new(cfg: AdmissionConfig) -> Self {
        let cfg = AdmissionConfig { max_in_flight: cfg.max_in_flight.max(1), ..cfg };
        Admission {
            inner: Arc::new(Inner {
                cfg,
                state: Mutex::new(State {
                    in_flight: 0,
                    queued: 0,
                    queued_high: 0,
                    queues: HashMap::new(),
                    ring: VecDeque::new(),
                    hold: INITIAL_HOLD,
                }),
            }),
        }
    }

    /// The configuration.
    pub fn config(&self) -> AdmissionConfig {
        self.inner.cfg
    }

    /// Waits for a turn for a request from `key`, or says why not and when to come back.
    pub async fn enter(&self, key: K) -> Result<Permit<K>, Refusal> {
        let rx = {
            let mut st = self.inner.lock();
            if st.in_flight < self.inner.cfg.max_in_flight && st.queued == 0 {
                st.in_flight += 1;
                return Ok(self.permit());
            }
            if st.queued >= self.inner.cfg.max_queued {
                return Err(Refusal::Full { retry_after: self.inner.hint(&st) });
            }
            if st.queues.get(&key).is_some_and(|q| q.len() >= self.inner.cfg.max_queued_per_key) {
                return Err(Refusal::KeyFull { retry_after: self.inner.hint(&st) });
            }
            let (tx, rx) = oneshot::channel();
            let q = st.queues.entry(key.clone()).or_default();
            let first = q.is_empty();
            q.push_back(tx);
            if first {
                st.ring.push_back(key.clone());
            }
            st.queued += 1;
            st.queued_high = st.queued_high.max(st.queued);
            rx
        };
        let mut waiting = Waiting { rx, inner: self.inner.clone(), key, done: false };
        let granted = match tokio::time::timeout(self.inner.cfg.max_wait, &mut waiting.rx).await {
            Ok(Ok(Grant)) => {
                waiting.done = true;
                true
            }
            // The queue is gone (cannot happen while `self` lives) or the wait ran out; a grant
            // that arrived at the last moment is still used.
            Ok(Err(_)) | Err(_) => waiting.leave().is_some(),
        };
        if granted {
            Ok(self.permit())
        } else {
            let st = self.inner.lock();
            Err(Refusal::WaitedTooLong { retry_after: self.inner.hint(&st) })
        }
    }

    fn permit(&self) -> Permit<K> {
        Permit { inner: self.inner.clone(), since: Instant::now() }
    }

    /// Requests worked on now.
    pub fn in_flight(&self) -> usize {
        self.inner.lock().in_flight
    }

    /// Requests waiting now.
    pub fn queued(&self) -> usize {
        self.inner.lock().queued
    }

    /// The most requests that ever waited at once.
    pub fn queued_high_water(&self) -> usize {
        self.inner.lock().queued_high
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn cfg(in_flight: usize, queued: usize, per_key: usize) -> AdmissionConfig {
        AdmissionConfig {
            max_in_flight: in_flight,
            max_queued: queued,
            max_queued_per_key: per_key,
            max_wait: Duration::from_secs(5),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_bound_is_refused_at_once_with_a_hint_and_the_rest_are_served_in_turn() {
        let adm = Admission::new(cfg(2, 3, 3));
        let a = adm.enter("a").await.unwrap();
        let b = adm.enter("a").await.unwrap();
        let waiting: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn({
                    let adm = adm.clone();
                    async move { adm.enter("b").await.map(drop) }
                })
            })
            .collect();
        tokio::task::yield_now().await;
        assert_eq!((adm.in_flight(), adm.queued()), (2, 3));
        let refused = adm.enter("c").await.err().unwrap();
        assert!(matches!(refused, Refusal::Full { .. }), "{refused:?}");
        assert!(refused.retry_after() >= MIN_HINT && refused.retry_after() <= MAX_HINT * 2);
        drop(a);
        drop(b);
        for w in waiting {
            w.await.unwrap().unwrap();
        }
        assert_eq!((adm.in_flight(), adm.queued()), (0, 0));
        assert_eq!(adm.queued_high_water(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn keys_are_served_round_robin_so_one_herd_does_not_starve_another() {
        let adm = Admission::new(cfg(1, 100, 100));
        let gate = adm.enter("herd").await.unwrap();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Ten from the herd queue first, then one from a quiet caller.
        for (i, key) in (0..10).map(|i| (i, "herd")).chain([(99, "quiet")]) {
            let (adm, order) = (adm.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _p = adm.enter(key).await.unwrap();
                order.lock().unwrap().push(i);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }));
            tokio::task::yield_now().await;
        }
        drop(gate);
        for t in tasks {
            t.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        let quiet = order.iter().position(|&i| i == 99).unwrap();
        assert!(quiet <= 1, "the quiet caller is served second at the latest, not after the herd: {order:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn one_key_cannot_take_the_whole_queue() {
        let adm = Admission::new(cfg(1, 10, 2));
        let _gate = adm.enter("x").await.unwrap();
        let _w: Vec<_> = (0..2)
            .map(|_| {
                tokio::spawn({
                    let adm = adm.clone();
                    async move { adm.enter("x").await.map(drop) }
                })
            })
            .collect();
        tokio::task::yield_now().await;
        assert!(matches!(adm.enter("x").await, Err(Refusal::KeyFull { .. })));
        let other = tokio::spawn({
            let adm = adm.clone();
            async move { adm.enter("y").await.map(drop) }
        });
        tokio::task::yield_now().await;
        assert_eq!(adm.queued(), 3, "another key still gets in line");
        other.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_that_waits_too_long_is_refused_and_leaves_no_trace() {
        let adm = Admission::new(cfg(1, 10, 10));
        let gate = adm.enter("a").await.unwrap();
        let r = adm.enter("b").await;
        assert!(matches!(r, Err(Refusal::WaitedTooLong { .. })), "after max_wait, not a hang");
        assert_eq!(adm.queued(), 0);
        drop(gate);
        assert_eq!(adm.in_flight(), 0);
        assert!(adm.enter("c").await.is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_loses_no_slot() {
        let adm = Admission::new(cfg(1, 10, 10));
        let served = Arc::new(AtomicUsize::new(0));
        let gate = adm.enter("a").await.unwrap();
        let cancelled = tokio::spawn({
            let adm = adm.clone();
            async move { adm.enter("b").await.map(drop) }
        });
        let patient = tokio::spawn({
            let (adm, served) = (adm.clone(), served.clone());
            async move {
                let _p = adm.enter("c").await.unwrap();
                served.fetch_add(1, Ordering::Relaxed);
            }
        });
        tokio::task::yield_now().await;
        cancelled.abort();
        let _ = cancelled.await;
        drop(gate);
        patient.await.unwrap();
        assert_eq!(served.load(Ordering::Relaxed), 1);
        assert_eq!((adm.in_flight(), adm.queued()), (0, 0), "no slot leaked");
    }
}
