//! The audit log: an append-only, hash-chained record of what changed the mesh's trust — every
//! intermediate issued, every revocation, policy change, root-rotation phase change, bootstrap
//! token created and cluster registered — kept in the management plane's store like everything
//! else (so every backend has it, and replicas share it).
//!
//! Each entry carries the digest of the one before it (`prev`) and its own (`digest`, SHA-256 over
//! a fixed prefix, `prev` and the entry's other fields as canonical JSON). Editing, removing or
//! reordering any entry breaks the chain at that entry, which [`verify`] names. Entries live in
//! segments of [`SEGMENT_ENTRIES`] (`meshca/audit-log-00000000`, …); an entry is appended by a
//! compare-and-swap of the last segment, its `prev` taken inside that swap, so two replicas (a
//! leader and its successor) can never fork the chain: one of two racing appends retries after the
//! other. A management plane restarted reads the chain where it is.
//!
//! Entries never carry key material or tokens: serials, key *fingerprints*, token *ids*.

use std::collections::BTreeMap;
use std::time::SystemTime;

use meshca_clock::unix;
use meshca_store::{ObjectKey, Precondition, Store, StoreError, typed};
use serde::{Deserialize, Serialize};

use crate::records;

/// Entries per segment object.
pub const SEGMENT_ENTRIES: usize = 128;

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Prefix of the segment objects.
pub const SEGMENT_PREFIX: &str = "audit-log-";

/// The segment object `index`.
pub fn segment_key(index: u64) -> ObjectKey {
    // "audit-log-" and eight digits make a valid DNS-1123 name.
    ObjectKey::new(records::NAMESPACE, &format!("{SEGMENT_PREFIX}{index:08}"))
        .unwrap_or_else(|_| unreachable!("segment names are valid"))
}

/// What happened, by its name in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// A cluster intermediate was issued.
    IntermediateIssued,
    /// A cluster intermediate was revoked.
    IntermediateRevoked,
    /// A RootTrustPolicy was put in force.
    PolicyApplied,
    /// A root rotation entered a phase (or finished).
    RootRotationPhase,
    /// A bootstrap token was created.
    BootstrapTokenCreated,
    /// A cluster registered with a bootstrap token.
    ClusterRegistered,
    /// A cluster was removed (`meshca cluster remove`): its records archived.
    ClusterRemoved,
}

impl Action {
    /// The name stored in the log.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::IntermediateIssued => "intermediate-issued",
            Action::IntermediateRevoked => "intermediate-revoked",
            Action::PolicyApplied => "policy-applied",
            Action::RootRotationPhase => "root-rotation-phase",
            Action::BootstrapTokenCreated => "bootstrap-token-created",
            Action::ClusterRegistered => "cluster-registered",
            Action::ClusterRemoved => "cluster-removed",
        }
    }
}

/// An event to record: who did what to which cluster, and the facts (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What.
    pub action: Action,
    /// Who (an operator, an agent, `management plane`).
    pub actor: String,
    /// The cluster concerned, if any.
    pub cluster: String,
    /// The facts: serial, key fingerprint, reason, policy generation, phase, ...
    pub details: BTreeMap<String, String>,
}

impl Event {
    /// An event with no details yet.
    pub fn new(action: Action, actor: impl Into<String>, cluster: impl Into<String>) -> Self {
        Event { action, actor: actor.into(), cluster: cluster.into(), details: BTreeMap::new() }
    }

    /// Adds a fact.
    pub fn with(mut self, key: &str, value: impl Into<String>) -> Self {
        self.details.insert(key.to_string(), value.into());
        self
    }
}

/// One entry of the log, as stored (and as `meshca audit -o json` prints it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Position in the log, from 0.
    pub seq: u64,
    /// Unix seconds.
    pub at: i64,
    /// [`Action::as_str`].
    pub action: String,
    /// Who.
    pub actor: String,
    /// The cluster concerned (empty: none).
    pub cluster: String,
    /// The facts.
    pub details: BTreeMap<String, String>,
    /// The digest of the entry before ([`GENESIS`] for the first).
    pub prev: String,
    /// SHA-256 (hex) of this entry ([`Entry::compute_digest`]).
    pub digest: String,
}

/// What is hashed: every field but the digest, in this order.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    at: i64,
    action: &'a str,
    actor: &'a str,
    cluster: &'a str,
    details: &'a BTreeMap<String, String>,
    prev: &'a str,
}

impl Entry {
    /// The digest this entry's content calls for.
    pub fn compute_digest(&self) -> String {
        let body = Hashed {
            seq: self.seq,
            at: self.at,
            action: &self.action,
            actor: &self.actor,
            cluster: &self.cluster,
            details: &self.details,
            prev: &self.prev,
        };
        // Serializing plain strings, integers and a BTreeMap cannot fail.
        let json = serde_json::to_vec(&body).unwrap_or_default();
        let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        ctx.update(b"meshca-audit-v1\n");
        ctx.update(&json);
        hex::encode(ctx.finish())
    }

    fn new(seq: u64, prev: String, event: &Event, now: SystemTime) -> Entry {
        let mut e = Entry {
            seq,
            at: unix(now),
            action: event.action.as_str().to_string(),
            actor: event.actor.clone(),
            cluster: event.cluster.clone(),
            details: event.details.clone(),
            prev,
            digest: String::new(),
        };
        e.digest = e.compute_digest();
        e
    }
}

/// One segment object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Its index (also in its name).
    pub index: u64,
    /// Its entries, in order.
    pub entries: Vec<Entry>,
}

/// The indices of the segment objects in the store, in order.
async fn segment_indices(store: &dyn Store) -> Result<Vec<u64>, StoreError> {
    let mut out: Vec<u64> = store
        .list(records::NAMESPACE)
        .await?
        .iter()
        .filter_map(|n| n.strip_prefix(SEGMENT_PREFIX)?.parse().ok())
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// The index of the last segment (0 when there is none), found by probing segment objects
/// rather than listing the namespace: segments are created one after another and never removed,
/// so their existence is a prefix of the indices, and a doubling then halving search takes
/// O(log n) reads. (Listing the namespace on every append cost O(records) per issuance: with
/// 10,000 clusters, quadratic.)
async fn last_segment(store: &dyn Store) -> Result<u64, StoreError> {
    let exists = |i: u64| async move { Ok::<bool, StoreError>(store.get(&segment_key(i)).await?.is_some()) };
    if !exists(0).await? {
        return Ok(0);
    }
    // Invariant: `lo` exists; `hi` does not.
    let (mut lo, mut hi) = (0u64, 1u64);
    while exists(hi).await? {
        lo = hi;
        hi = hi.saturating_mul(2);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if exists(mid).await? { lo = mid } else { hi = mid }
    }
    Ok(lo)
}

/// One lock per store instance in this process: appends from concurrent calls (64 issuances at
/// once) take turns instead of racing for the last segment's compare-and-swap, where every loser
/// re-reads and rewrites the whole segment. Other processes (another replica) still meet at the
/// compare-and-swap, which is what keeps the chain from forking.
fn append_lock(store: &dyn Store) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    static LOCKS: std::sync::OnceLock<
        std::sync::Mutex<std::collections::HashMap<usize, std::sync::Arc<tokio::sync::Mutex<()>>>>,
    > = std::sync::OnceLock::new();
    let id = store as *const dyn Store as *const () as usize;
    let mut locks = LOCKS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    locks.entry(id).or_default().clone()
}

/// Appends `event` at `now`; returns the entry written.
pub async fn append(store: &dyn Store, event: &Event, now: SystemTime) -> Result<Entry, StoreError> {
    let lock = append_lock(store);
    let _turn = lock.lock().await;
    loop {
        let index = last_segment(store).await?;
        // The chain continues from the previous segment's last entry when this one is empty.
        let before = match index.checked_sub(1) {
            Some(i) => typed::get::<Segment>(store, &segment_key(i))
                .await?
                .and_then(|s| s.value.entries.last().map(|e| (e.seq + 1, e.digest.clone()))),
            None => None,
        };
        let mut written = None;
        let mut full = false;
        typed::update::<Segment, _>(store, &segment_key(index), |cur| {
            // A retried attempt (a conflicting writer) starts over: what an earlier attempt made
            // was not stored.
            written = None;
            full = false;
            let mut seg = cur.cloned().unwrap_or(Segment { index, entries: Vec::new() });
            if seg.entries.len() >= SEGMENT_ENTRIES {
                full = true;
                return None;
            }
            let (seq, prev) = match seg.entries.last() {
                Some(e) => (e.seq + 1, e.digest.clone()),
                None => before.clone().unwrap_or((0, GENESIS.to_string())),
            };
            let e = Entry::new(seq, prev, event, now);
            written = Some(e.clone());
            seg.entries.push(e);
            Some(seg)
        })
        .await?;
        if let Some(e) = written {
            return Ok(e);
        }
        if full {
            let next = Segment { index: index + 1, entries: Vec::new() };
            match typed::put(store, &segment_key(index + 1), &next, Precondition::Absent).await {
                Ok(()) | Err(StoreError::AlreadyExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Appends `event`, logging instead of failing: the action it records has already happened (and
/// is in its own record); the log line says what the audit log is missing.
pub async fn record(store: &dyn Store, event: Event, now: SystemTime) {
    if let Err(e) = append(store, &event, now).await {
        tracing::error!(error = %e, action = event.action.as_str(), cluster = %event.cluster, "writing the audit log failed; this action has no audit entry");
    }
}

/// Every entry, in order (as stored; [`verify`] checks them).
pub async fn read(store: &dyn Store) -> Result<Vec<Entry>, StoreError> {
    let mut out = Vec::new();
    for i in segment_indices(store).await? {
        if let Some(s) = typed::get::<Segment>(store, &segment_key(i)).await? {
            out.extend(s.value.entries);
        }
    }
    Ok(out)
}

/// Where the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Broken {
    /// An entry's content does not match its digest.
    #[error("entry {seq} was changed: its content does not match its digest")]
    Changed {
        /// The entry.
        seq: u64,
    },
    /// An entry does not follow the one before it.
    #[error(
        "entry {position} (seq {seq}) does not follow entry {}: an entry before it was removed, changed or reordered",
        .position.saturating_sub(1)
    )]
    Unlinked {
        /// Its position in the log.
        position: u64,
        /// The seq it carries.
        seq: u64,
    },
    /// An entry is not where its seq says.
    #[error("entry {position} carries seq {seq}: an entry was removed or the log reordered")]
    OutOfPlace {
        /// Its position in the log.
        position: u64,
        /// The seq it carries.
        seq: u64,
    },
}

/// Checks the chain; returns the digest of the last entry (the log's head).
pub fn verify(entries: &[Entry]) -> Result<String, Broken> {
    let mut prev = GENESIS.to_string();
    for (position, e) in (0u64..).zip(entries) {
        if e.seq != position {
            return Err(Broken::OutOfPlace { position, seq: e.seq });
        }
        if e.compute_digest() != e.digest {
            return Err(Broken::Changed { seq: e.seq });
        }
        if e.prev != prev {
            return Err(Broken::Unlinked { position, seq: e.seq });
        }
        prev = e.digest.clone();
    }
    Ok(prev)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<Entry> {
        let mut out: Vec<Entry> = Vec::new();
        for seq in 0..n {
            let prev = out.last().map_or(GENESIS.to_string(), |e| e.digest.clone());
            let ev =
                Event::new(Action::IntermediateIssued, "operator admin", "cluster-1").with("serial", seq.to_string());
            out.push(Entry::new(seq, prev, &ev, SystemTime::UNIX_EPOCH));
        }
        out
    }

    #[test]
    fn every_single_edit_removal_or_swap_is_named() {
        let log = chain(5);
        assert!(verify(&log).is_ok());
        for i in 0..5 {
            let mut edited = log.clone();
            edited[i].details.insert("serial".into(), "FORGED".into());
            assert_eq!(verify(&edited), Err(Broken::Changed { seq: i as u64 }), "edit {i}");

            let mut removed = log.clone();
            removed.remove(i);
            if i < 4 {
                assert!(matches!(verify(&removed), Err(Broken::OutOfPlace { position, .. }) if position == i as u64));
            }
        }
        for i in 0..4 {
            let mut swapped = log.clone();
            swapped.swap(i, i + 1);
            assert!(matches!(verify(&swapped), Err(Broken::OutOfPlace { position, .. }) if position == i as u64));
        }
        // Rewriting an entry with a fresh digest (and even its seq) still breaks the next link.
        let mut forged = log.clone();
        forged[2].actor = "someone else".into();
        forged[2].digest = forged[2].compute_digest();
        assert_eq!(verify(&forged), Err(Broken::Unlinked { position: 3, seq: 3 }));
    }
}
