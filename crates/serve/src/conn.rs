//! The connections a server holds, and who goes when there are too many.
//!
//! Every connection is charged to a *bucket*: the address it came from (its [`PeerKey`]) until
//! it proves an identity in the TLS handshake (a client certificate: a management-plane agent or
//! operator), then that identity. Caps: one per address bucket, one per identity bucket, one for
//! everything (sized under the open-file limit, see [`crate::fd`]). A connection is *idle* while
//! it has no call in flight (one still in its handshake is idle since it arrived); a busy one is
//! never shed. When a new connection would go over its bucket's cap, that bucket's oldest idle
//! connection is shed to make room; over the total cap, the oldest idle connection of the
//! fullest bucket (a flood's addresses, not a light caller's single connection); with none idle,
//! the new one is refused. So a flood of idle sockets sheds itself, a light caller is never the
//! one shed for it, and a caller with calls in flight is never cut off.
//!
//! Registry decisions are pure over the entries' state (tested here without sockets); the server
//! ([`crate::server`]) does the closing.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::limit::PeerKey;

/// The connection caps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    /// All connections (a forwarded one counts twice: it holds two descriptors).
    pub total: usize,
    /// Connections from one address (IPv6: one /64) not yet identified by a client certificate.
    pub per_peer: usize,
    /// Connections of one identity (a client certificate's identity).
    pub per_identity: usize,
}

/// What a connection is charged to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Bucket {
    /// The address it came from.
    Peer(PeerKey),
    /// The identity its client certificate proved.
    Identity(String),
    /// Forwarded to the leader without terminating TLS (a follower replica). No cap of its own:
    /// the leader applies the address and identity caps to it; here it counts against the total
    /// only (twice: it holds two descriptors).
    Forwarded,
}

/// How a new connection will be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Served here.
    Direct,
    /// Forwarded to the leader.
    Forwarded,
}

/// Why a connection was closed by the server (the `reason` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The TLS handshake did not finish in time.
    HandshakeTimeout,
    /// The TLS handshake failed.
    HandshakeFailed,
    /// TLS finished but the HTTP/2 preface did not arrive in time.
    PrefaceTimeout,
    /// No call in flight for the idle timeout.
    Idle,
    /// Shed, being the oldest idle one, to make room under a cap.
    Shed,
    /// Refused on arrival: over a cap with nothing idle to shed.
    Refused,
    /// The server is stopping.
    Stopping,
}

impl CloseReason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            CloseReason::HandshakeTimeout => "handshake_timeout",
            CloseReason::HandshakeFailed => "handshake_failed",
            CloseReason::PrefaceTimeout => "preface_timeout",
            CloseReason::Idle => "idle",
            CloseReason::Shed => "shed",
            CloseReason::Refused => "refused",
            CloseReason::Stopping => "stopping",
        }
    }
}

/// One connection's shared state: written by its task and its calls, read by the registry.
#[derive(Debug)]
pub struct Entry {
    /// Unique within the server.
    pub id: u64,
    /// Where it came from.
    pub peer: SocketAddr,
    /// Calls in flight.
    in_flight: AtomicUsize,
    /// When it last became idle, in milliseconds since the registry's epoch.
    idle_since: AtomicU64,
    /// Forwarded to the leader: busy for as long as it lasts, counts twice.
    forwarded: AtomicBool,
    /// Fires when the server wants it closed (shed, idle, stopping).
    close: CancellationToken,
    /// Fires once its socket is closed (its descriptor is free again).
    gone: CancellationToken,
    epoch: Instant,
}

impl Entry {
    /// Whether no call is in flight.
    pub fn is_idle(&self) -> bool {
        !self.forwarded.load(Ordering::Acquire) && self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Since when it has been idle (meaningful while [`Entry::is_idle`]).
    pub fn idle_since(&self) -> Instant {
        self.epoch + std::time::Duration::from_millis(self.idle_since.load(Ordering::Acquire))
    }

    fn stamp(&self, now: Instant) {
        let ms = u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX);
        self.idle_since.store(ms, Ordering::Release);
    }

    /// A call starts; it ends when the returned guard is dropped.
    pub fn call(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        CallGuard(self.clone())
    }

    /// The token that fires when the server wants it closed.
    pub fn close_token(&self) -> &CancellationToken {
        &self.close
    }

    /// Says its socket is closed.
    pub fn set_gone(&self) {
        self.gone.cancel();
    }

    /// Completes once its socket is closed.
    pub async fn gone(&self) {
        self.gone.cancelled().await
    }
}

/// A call in flight on a connection; the connection is idle again from when the last one drops.
#[derive(Debug)]
pub struct CallGuard(Arc<Entry>);

impl Drop for CallGuard {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.stamp(Instant::now());
        }
    }
}

struct Slot {
    entry: Arc<Entry>,
    bucket: Bucket,
    /// Asked to close: no longer counted against a cap, nor chosen again.
    leaving: bool,
}

/// The registry of a server's connections.
pub struct Registry {
    caps: Caps,
    epoch: Instant,
    next_id: u64,
    slots: HashMap<u64, Slot>,
    per_bucket: HashMap<Bucket, usize>,
    /// Descriptors held by connections not leaving.
    held: usize,
}

/// The registry's answer to a new connection (or to an existing one changing bucket).
#[derive(Debug)]
pub enum Admit {
    /// Admitted; these connections were asked to close to make room.
    Yes {
        /// Its entry.
        entry: Arc<Entry>,
        /// The connections shed for it.
        shed: Vec<Arc<Entry>>,
    },
    /// Refused: over `cap` with nothing idle to shed.
    No {
        /// Which cap (`"total"`, `"per-peer"`, `"per-identity"`).
        cap: &'static str,
    },
}

impl Registry {
    /// An empty registry with `caps`.
    pub fn new(caps: Caps) -> Self {
        Registry { caps, epoch: Instant::now(), next_id: 0, slots: HashMap::new(), per_bucket: HashMap::new(), held: 0 }
    }

    /// The caps.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// Connections held (not leaving).
    pub fn len(&self) -> usize {
        self.slots.values().filter(|s| !s.leaving).count()
    }

    /// Whether no connection is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn cap_of(&self, bucket: &Bucket) -> (usize, &'static str) {
        match bucket {
            Bucket::Peer(_) => (self.caps.per_peer, "per-peer"),
            Bucket::Identity(_) => (self.caps.per_identity, "per-identity"),
            Bucket::Forwarded => (0, "forwarded"),
        }
    }

    /// The oldest idle connection (in `bucket`, or anywhere), not already leaving.
    fn oldest_idle(&self, bucket: Option<&Bucket>, except: Option<u64>) -> Option<u64> {
        self.slots
            .values()
            .filter(|s| !s.leaving && Some(s.entry.id) != except && s.entry.is_idle())
            .filter(|s| bucket.is_none_or(|b| &s.bucket == b))
            .min_by_key(|s| (s.entry.idle_since(), s.entry.id))
            .map(|s| s.entry.id)
    }

    /// The victim for the total cap: the oldest idle connection of the bucket holding the most
    /// connections (among buckets with one idle). A flood from a few addresses then sheds its own
    /// connections, never the one connection of a light caller; among equals, the oldest goes.
    fn heaviest_oldest_idle(&self, except: Option<u64>) -> Option<u64> {
        self.slots
            .values()
            .filter(|s| !s.leaving && Some(s.entry.id) != except && s.entry.is_idle())
            .max_by_key(|s| {
                let held = self.per_bucket.get(&s.bucket).copied().unwrap_or(0);
                (held, std::cmp::Reverse((s.entry.idle_since(), s.entry.id)))
            })
            .map(|s| s.entry.id)
    }

    fn weight(entry: &Entry) -> usize {
        if entry.forwarded.load(Ordering::Acquire) { 2 } else { 1 }
    }

    /// Marks `id` leaving, takes it off the counts and asks it to close; returns its entry.
    fn evict(&mut self, id: u64) -> Option<Arc<Entry>> {
        let slot = self.slots.get_mut(&id)?;
        if slot.leaving {
            return None;
        }
        slot.leaving = true;
        let entry = slot.entry.clone();
        entry.close.cancel();
        let bucket = slot.bucket.clone();
        self.uncount(&bucket, Self::weight(&entry));
        Some(entry)
    }

    fn uncount(&mut self, bucket: &Bucket, weight: usize) {
        if let Some(n) = self.per_bucket.get_mut(bucket) {
            *n -= 1;
            if *n == 0 {
                self.per_bucket.remove(bucket);
            }
        }
        self.held -= weight;
    }

    /// Makes room for one more connection in `bucket` (weight `weight`), shedding the oldest
    /// idle ones; `Err(cap)` when that is impossible. `except` is never shed (a connection
    /// moving buckets).
    fn make_room(
        &mut self,
        bucket: &Bucket,
        weight: usize,
        except: Option<u64>,
    ) -> Result<Vec<Arc<Entry>>, &'static str> {
        let mut shed = Vec::new();
        let (cap, name) = self.cap_of(bucket);
        if cap > 0 {
            while self.per_bucket.get(bucket).copied().unwrap_or(0) >= cap {
                let Some(victim) = self.oldest_idle(Some(bucket), except) else { return Err(name) };
                shed.extend(self.evict(victim));
            }
        }
        if self.caps.total > 0 {
            while self.held + weight > self.caps.total {
                let Some(victim) = self.heaviest_oldest_idle(except) else { return Err("total") };
                shed.extend(self.evict(victim));
            }
        }
        Ok(shed)
    }

    /// A new connection from `peer`, arrived `now`, to be served as `kind`. A direct one is idle
    /// (nothing in flight) until its first call; a forwarded one is busy for as long as it lasts.
    pub fn admit(&mut self, peer: SocketAddr, kind: Kind, now: Instant) -> Admit {
        let (bucket, weight) = match kind {
            Kind::Direct => (Bucket::Peer(PeerKey::of(peer.ip())), 1),
            Kind::Forwarded => (Bucket::Forwarded, 2),
        };
        let shed = match self.make_room(&bucket, weight, None) {
            Ok(shed) => shed,
            Err(cap) => return Admit::No { cap },
        };
        self.next_id += 1;
        let entry = Arc::new(Entry {
            id: self.next_id,
            peer,
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            forwarded: AtomicBool::new(kind == Kind::Forwarded),
            close: CancellationToken::new(),
            gone: CancellationToken::new(),
            epoch: self.epoch,
        });
        entry.stamp(now);
        *self.per_bucket.entry(bucket.clone()).or_default() += 1;
        self.held += weight;
        self.slots.insert(entry.id, Slot { entry: entry.clone(), bucket, leaving: false });
        Admit::Yes { entry, shed }
    }

    /// `id`'s TLS handshake proved `identity`: it is charged to that identity from now on,
    /// shedding the identity's oldest idle connection if it is at its cap. `Admit::No` when it is
    /// at its cap with none idle: the caller closes `id`.
    pub fn identify(&mut self, id: u64, identity: String) -> Admit {
        let Some(slot) = self.slots.get(&id) else { return Admit::No { cap: "total" } };
        if slot.leaving {
            return Admit::No { cap: "total" };
        }
        let entry = slot.entry.clone();
        let old = slot.bucket.clone();
        let new = Bucket::Identity(identity);
        // Out of the old bucket first: the connection itself never counts twice.
        self.uncount(&old, 1);
        let shed = match self.make_room(&new, 1, Some(id)) {
            Ok(shed) => shed,
            Err(cap) => {
                *self.per_bucket.entry(old).or_default() += 1;
                self.held += 1;
                return Admit::No { cap };
            }
        };
        *self.per_bucket.entry(new.clone()).or_default() += 1;
        self.held += 1;
        if let Some(slot) = self.slots.get_mut(&id) {
            slot.bucket = new;
        }
        Admit::Yes { entry, shed }
    }

    /// The oldest idle connection, asked to leave (to free a descriptor when the process ran out).
    pub fn shed_oldest_idle(&mut self) -> Option<Arc<Entry>> {
        let id = self.oldest_idle(None, None)?;
        self.evict(id)
    }

    /// `id` is gone.
    pub fn remove(&mut self, id: u64) {
        if let Some(slot) = self.slots.remove(&id)
            && !slot.leaving
        {
            let w = Self::weight(&slot.entry);
            self.uncount(&slot.bucket, w);
        }
    }
}

/// A registry shared by the accept loop and the connection tasks.
pub type SharedRegistry = Arc<Mutex<Registry>>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn addr(last: u8, port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, last], port))
    }

    fn yes(a: Admit) -> (Arc<Entry>, Vec<u64>) {
        match a {
            Admit::Yes { entry, shed } => (entry, shed.iter().map(|e| e.id).collect()),
            Admit::No { cap } => panic!("refused by the {cap} cap"),
        }
    }

    #[test]
    fn the_per_peer_cap_sheds_that_peers_oldest_idle_connection_and_spares_busy_ones() {
        let mut r = Registry::new(Caps { total: 100, per_peer: 3, per_identity: 3 });
        let t0 = Instant::now();
        let (a1, _) = yes(r.admit(addr(2, 1), Kind::Direct, t0));
        let (a2, _) = yes(r.admit(addr(2, 2), Kind::Direct, t0 + Duration::from_secs(1)));
        let (a3, _) = yes(r.admit(addr(2, 3), Kind::Direct, t0 + Duration::from_secs(2)));
        let _busy = a1.call();
        // Another address is not affected by 127.0.0.2's cap.
        let (_b, shed) = yes(r.admit(addr(1, 1), Kind::Direct, t0 + Duration::from_secs(3)));
        assert!(shed.is_empty());
        // A fourth from 127.0.0.2: its oldest *idle* one (a2, not the busy a1) goes.
        let (_a4, shed) = yes(r.admit(addr(2, 4), Kind::Direct, t0 + Duration::from_secs(4)));
        assert_eq!(shed, vec![a2.id]);
        assert!(!a1.close_token().is_cancelled());
        // Everything busy: a new one from that address is refused.
        let _busy3 = a3.call();
        let (a5, shed) = yes(r.admit(addr(2, 5), Kind::Direct, t0 + Duration::from_secs(5)));
        assert!(shed.len() == 1 && shed[0] != a1.id && shed[0] != a3.id);
        let _busy5 = a5.call();
        assert!(matches!(
            r.admit(addr(2, 6), Kind::Direct, t0 + Duration::from_secs(6)),
            Admit::No { cap: "per-peer" }
        ));
    }

    #[test]
    fn the_total_cap_sheds_the_oldest_idle_anywhere_and_refuses_when_all_are_busy() {
        let mut r = Registry::new(Caps { total: 3, per_peer: 10, per_identity: 10 });
        let t0 = Instant::now();
        let (x, _) = yes(r.admit(addr(3, 1), Kind::Direct, t0));
        let (y, _) = yes(r.admit(addr(4, 1), Kind::Direct, t0 + Duration::from_secs(1)));
        let (z, _) = yes(r.admit(addr(5, 1), Kind::Direct, t0 + Duration::from_secs(2)));
        let (_w, shed) = yes(r.admit(addr(1, 1), Kind::Direct, t0 + Duration::from_secs(3)));
        assert_eq!(shed, vec![x.id], "the oldest idle, from any address");
        assert_eq!(r.len(), 3);
        r.remove(x.id);
        assert_eq!(r.len(), 3, "a shed connection was already off the count");
        let (_g1, _g2) = (y.call(), z.call());
        let (v, shed) = yes(r.admit(addr(6, 1), Kind::Direct, t0 + Duration::from_secs(4)));
        assert_eq!(shed.len(), 1, "the newest idle one goes when it is the only idle one");
        let _g3 = v.call();
        assert!(matches!(r.admit(addr(7, 1), Kind::Direct, t0 + Duration::from_secs(5)), Admit::No { cap: "total" }));
    }

    #[test]
    fn over_the_total_cap_the_fullest_address_pays_not_a_light_caller() {
        let mut r = Registry::new(Caps { total: 4, per_peer: 10, per_identity: 10 });
        let t0 = Instant::now();
        // A light caller's one connection is the oldest idle one of all...
        let (light, _) = yes(r.admit(addr(1, 1), Kind::Direct, t0));
        let mut flood = Vec::new();
        for i in 0..3u16 {
            flood.push(yes(r.admit(addr(9, i), Kind::Direct, t0 + Duration::from_secs(1 + u64::from(i)))).0);
        }
        // ...yet a new connection sheds the flood's oldest, not it.
        let (_n, shed) = yes(r.admit(addr(9, 99), Kind::Direct, t0 + Duration::from_secs(9)));
        assert_eq!(shed, vec![flood[0].id]);
        assert!(!light.close_token().is_cancelled());
    }

    #[tokio::test(start_paused = true)]
    async fn idleness_starts_when_the_last_call_ends() {
        let mut r = Registry::new(Caps { total: 2, per_peer: 10, per_identity: 10 });
        let (old, _) = yes(r.admit(addr(1, 1), Kind::Direct, Instant::now()));
        tokio::time::advance(Duration::from_secs(10)).await;
        let (new, _) = yes(r.admit(addr(1, 2), Kind::Direct, Instant::now()));
        let call = old.call();
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(call);
        // `old` arrived first but was busy until now: `new` has been idle longer.
        assert!(new.idle_since() < old.idle_since());
        let (_n, shed) = yes(r.admit(addr(1, 3), Kind::Direct, Instant::now()));
        assert_eq!(shed, vec![new.id]);
    }

    #[test]
    fn an_identified_connection_moves_to_its_identity_and_that_cap_applies() {
        let mut r = Registry::new(Caps { total: 100, per_peer: 1, per_identity: 2 });
        let t0 = Instant::now();
        let follower = addr(9, 1);
        // Through one address (a follower forwarding, a NAT): each, once identified, leaves the
        // address bucket, so the address cap of 1 does not bind agents.
        let mut agents = Vec::new();
        for i in 0..3u16 {
            let (e, shed) =
                yes(r.admit(SocketAddr::new(follower.ip(), 100 + i), Kind::Direct, t0 + Duration::from_secs(i.into())));
            assert!(shed.is_empty(), "the address bucket is empty again after each identification");
            let _ = yes(r.identify(e.id, format!("agent-{i}")));
            agents.push(e);
        }
        // The same identity three times: its cap of 2 sheds its oldest idle connection.
        let (e1, _) = yes(r.admit(addr(8, 1), Kind::Direct, t0));
        let _ = yes(r.identify(e1.id, "op".into()));
        let (e2, _) = yes(r.admit(addr(8, 2), Kind::Direct, t0));
        let _ = yes(r.identify(e2.id, "op".into()));
        let (e3, _) = yes(r.admit(addr(8, 3), Kind::Direct, t0));
        let (_, shed) = yes(r.identify(e3.id, "op".into()));
        assert_eq!(shed, vec![e1.id]);
    }

    #[test]
    fn forwarded_connections_skip_the_address_cap_but_count_twice_and_are_never_idle() {
        let mut r = Registry::new(Caps { total: 5, per_peer: 1, per_identity: 1 });
        let t0 = Instant::now();
        let (f1, _) = yes(r.admit(addr(1, 1), Kind::Forwarded, t0));
        let (_f2, shed) = yes(r.admit(addr(1, 2), Kind::Forwarded, t0));
        assert!(shed.is_empty(), "the address cap does not apply to forwarded connections");
        assert!(!f1.is_idle(), "forwarded connections are never idle");
        // 2 + 2 descriptors: one direct connection still fits, then the total is full.
        let (d, _) = yes(r.admit(addr(2, 1), Kind::Direct, t0));
        let _busy = d.call();
        assert!(matches!(r.admit(addr(3, 1), Kind::Direct, t0), Admit::No { cap: "total" }));
        r.remove(f1.id);
        assert!(matches!(r.admit(addr(3, 1), Kind::Direct, t0), Admit::Yes { .. }));
    }

    #[test]
    fn running_out_of_descriptors_sheds_the_oldest_idle() {
        let mut r = Registry::new(Caps { total: 10, per_peer: 10, per_identity: 10 });
        let t0 = Instant::now();
        let (a, _) = yes(r.admit(addr(1, 1), Kind::Direct, t0));
        let (b, _) = yes(r.admit(addr(1, 2), Kind::Direct, t0 + Duration::from_secs(1)));
        let _busy = a.call();
        assert_eq!(r.shed_oldest_idle().map(|e| e.id), Some(b.id));
        assert!(r.shed_oldest_idle().is_none(), "never a busy one");
    }
}
