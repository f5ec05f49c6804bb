//! The audit log: an append-only, hash-chained record of what changed the mesh's trust — every
//! intermediate issued, every revocation, policy change, root-rotation phase change, bootstrap
//! token created and cluster registered — kept in the management plane's store like everything
//! else (so every backend has it, and replicas share it).
//!
//! Each entry carries the digest of the one before it (`prev`) and its own (`digest`, SHA-256 over
//! a fixed prefix, `prev` and the entry's other fields as canonical JSON). Editing, removing or
//! reordering any entry breaks the chain at that entry, which [`verify`] names.
//!
//! **Layout.** Entries are written in blocks: one store object per append batch,
//! `meshca/audit-entries-<seq of its first entry, 12 digits>` ([`Block`]), created only if absent
//! and never rewritten, plus one small head record `meshca/audit-head` ([`Head`]: how many
//! entries the log holds and the last one's digest), advanced after the blocks. An append is
//! therefore one new object and one small update, whatever the log's length. On a store with
//! transactions (SQLite) the block, the head and the writes that must land with the batch's
//! entries ([`append_with`]: an intermediate's issued-serial record) are one transaction, so a
//! batch costs one durable commit and the head never lags. Two replicas (a
//! leader and its successor) never fork the chain: both try to create the block at the same
//! sequence number, one of them finds it there and continues after it. Within a process,
//! concurrent appends are batched: whoever holds the writer's turn writes every entry queued
//! meanwhile (up to [`MAX_BATCH`]) as one block, so 64 issuances at once cost a few writes, not
//! 64 rewrites of a shared object. The head is what makes cutting off the newest entries
//! detectable ([`verify_anchored`]); an entry written whose head update did not land (a crash in
//! between) is still read, since the head only ever lags.
//!
//! Logs written before blocks (segments of up to [`SEGMENT_ENTRIES`] entries,
//! `meshca/audit-log-00000000`, …) are read as the log's beginning; the first block continues
//! their chain, and reading such a log without a head anchors it ([`read_log`]). Replicas sharing
//! a store are upgraded together: one of the version before blocks would go on appending to the
//! segments, beside the blocks.
//!
//! **When an entry cannot be written.** [`append`] returns the error, and every entry of a batch
//! whose write failed gets it; callers that can still refuse the action they record (an
//! intermediate not yet handed out) refuse it, so nothing is answered as if audited that is not.
//! [`record`] is for actions that have already taken effect: it logs what the log is missing.
//! A write whose outcome is unknown (the store failed after it may have stored the block) can
//! leave an entry for an action that was then refused — the log may say more than happened,
//! never less.
//!
//! Entries never carry key material or tokens: serials, key *fingerprints*, token *ids*.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::SystemTime;

use meshca_clock::unix;
use meshca_store::{ObjectKey, Precondition, ResourceVersion, Store, StoreError, Write, typed};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::records;

/// Entries per segment object in the layout before blocks (read, never written any more).
pub const SEGMENT_ENTRIES: usize = 128;

/// The `prev` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Prefix of the segment objects of the layout before blocks.
pub const SEGMENT_PREFIX: &str = "audit-log-";

/// Prefix of the block objects ([`Block`]).
pub const BLOCK_PREFIX: &str = "audit-entries-";

/// Name of the head record ([`Head`]).
pub const HEAD_NAME: &str = "audit-head";

/// The most entries one block holds: a burst larger than this is written as several blocks, so
/// no object grows past ~100 kB (a Kubernetes Secret holds 1 MiB).
pub const MAX_BATCH: usize = 128;

/// The segment object `index` (the layout before blocks).
pub fn segment_key(index: u64) -> ObjectKey {
    // "audit-log-" and eight digits make a valid DNS-1123 name.
    ObjectKey::new(records::NAMESPACE, &format!("{SEGMENT_PREFIX}{index:08}"))
        .unwrap_or_else(|_| unreachable!("segment names are valid"))
}

/// The block whose first entry has sequence number `first`.
pub fn block_key(first: u64) -> ObjectKey {
    // "audit-entries-" and twelve digits (more when a log ever passes 10^12 entries) make a valid
    // DNS-1123 name, and names sort in log order.
    ObjectKey::new(records::NAMESPACE, &format!("{BLOCK_PREFIX}{first:012}"))
        .unwrap_or_else(|_| unreachable!("block names are valid"))
}

/// The head record.
pub fn head_key() -> ObjectKey {
    records::fixed(HEAD_NAME)
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

/// One segment object of the layout before blocks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Its index (also in its name).
    pub index: u64,
    /// Its entries, in order.
    pub entries: Vec<Entry>,
}

/// One block: the entries of one append batch, consecutive, in order; written once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    /// Its entries (the first one's seq is in the block's name).
    pub entries: Vec<Entry>,
}

/// The head record: the log held `count` entries after the last append whose head update
/// landed, the last of them with digest `digest` ([`GENESIS`] for none). A log that holds fewer
/// entries, or another entry at that place, was cut or rewritten ([`verify_anchored`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Entries in the log.
    pub count: u64,
    /// The digest of entry `count - 1`.
    pub digest: String,
}

/// Where the next entry goes: its seq and the digest it chains to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Tip {
    next: u64,
    prev: String,
}

impl Tip {
    fn genesis() -> Tip {
        Tip { next: 0, prev: GENESIS.to_string() }
    }

    fn after(e: &Entry) -> Tip {
        Tip { next: e.seq + 1, prev: e.digest.clone() }
    }

    fn head(&self) -> Head {
        Head { count: self.next, digest: self.prev.clone() }
    }
}

/// The numbers in the names of the objects called `<prefix><number>`, in order (segment
/// indices, blocks' first seqs).
fn numbered(names: &[String], prefix: &str) -> Vec<u64> {
    let mut out: Vec<u64> = names.iter().filter_map(|n| n.strip_prefix(prefix)?.parse().ok()).collect();
    out.sort_unstable();
    out
}

/// The index of the last segment (0 when there is none), found by probing segment objects
/// rather than listing the namespace: segments were created one after another and never removed,
/// so their existence is a prefix of the indices, and a doubling then halving search takes
/// O(log n) reads.
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

/// Where the segments of the layout before blocks end (genesis when there are none).
async fn segments_tip(store: &dyn Store) -> Result<Tip, StoreError> {
    // The last segment may be empty: it was created when the one before it filled up.
    for i in (0..=last_segment(store).await?).rev() {
        if let Some(s) = typed::get::<Segment>(store, &segment_key(i)).await?
            && let Some(e) = s.value.entries.last()
        {
            return Ok(Tip::after(e));
        }
    }
    Ok(Tip::genesis())
}

/// Follows the blocks from `tip` to the log's end.
async fn walk(store: &dyn Store, mut tip: Tip) -> Result<Tip, StoreError> {
    while let Some(b) = typed::get::<Block>(store, &block_key(tip.next)).await? {
        match b.value.entries.last() {
            // A block ends at or after its first entry; anything else was not written by `append`.
            Some(last) if last.seq >= tip.next => tip = Tip::after(last),
            _ => {
                return Err(StoreError::Corrupt {
                    key: block_key(tip.next),
                    reason: "the block does not hold the entries its name says".to_string(),
                });
            }
        }
    }
    Ok(tip)
}

/// The queue and the writer's turn of one store in this process.
#[derive(Default)]
struct Appender {
    queue: Mutex<Vec<Pending>>,
    writer: tokio::sync::Mutex<Writer>,
}

/// An event waiting to be written, the write that lands with its entry or not at all (on a store
/// with transactions), and who waits for its entry.
struct Pending {
    event: Event,
    now: SystemTime,
    with: Option<Write>,
    reply: oneshot::Sender<Result<Appended, AppendError>>,
}

/// An entry [`append_with`] wrote, and the version its `with` write got.
#[derive(Debug, Clone)]
pub struct Appended {
    /// The entry, as stored.
    pub entry: Entry,
    /// The `with` object's new version; `None` when it is not known (the batch's transaction
    /// landed while its answer was lost, and was found again in the log). A caller keeping the
    /// object in memory reads it again then.
    pub with_version: Option<ResourceVersion>,
}

/// Why [`append_with`] wrote no entry.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// The write that goes with the entry was refused (a `Conflict`, `AlreadyExists` or
    /// `NotFound`: someone else wrote that object first) or failed: the entry was not written.
    #[error(transparent)]
    With(StoreError),
    /// The entry could not be written (on a store with transactions the write that goes with it
    /// was not written either; on one without, it was).
    #[error(transparent)]
    Entry(StoreError),
}

impl AppendError {
    /// The store's error, whichever write it was.
    pub fn into_store_error(self) -> StoreError {
        match self {
            AppendError::With(e) | AppendError::Entry(e) => e,
        }
    }
}

/// The object a refused precondition names.
fn refused_key(e: &StoreError) -> Option<&ObjectKey> {
    match e {
        StoreError::Conflict { key, .. } | StoreError::AlreadyExists(key) | StoreError::NotFound(key) => Some(key),
        _ => None,
    }
}

/// What the writer keeps between batches.
#[derive(Default)]
struct Writer {
    /// The tip after this writer's last block, and the head's version it then wrote: when the
    /// head still says the same, no other writer has appended and the next block goes right
    /// after it.
    last: Option<(Tip, ResourceVersion)>,
    /// The batch being written. It lives here, not in the writing call, so that if that call is
    /// cancelled (its client went away) the next writer finishes the batch: every queued event
    /// gets exactly one entry and an answer.
    batch: Vec<Pending>,
    /// Where the batch was last sent to be written: a write cancelled before it answered may
    /// have landed, and is then the batch's entries (not written a second time further on).
    attempted: Option<Tip>,
}

/// One appender per store instance in this process, by address. (Only the queue and the turn
/// are shared by address: what the writer remembers is checked against the head record before
/// it is used, so a store dropped and another allocated at its address is harmless.)
fn appender(store: &dyn Store) -> Arc<Appender> {
    static APPENDERS: OnceLock<Mutex<HashMap<usize, Arc<Appender>>>> = OnceLock::new();
    let id = store as *const dyn Store as *const () as usize;
    let mut all = APPENDERS.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner());
    all.entry(id).or_default().clone()
}

/// Where a flush writes: the log's end, and the head's version when the flush found it (or, on a
/// store with transactions, wrote it with the block before).
struct Position {
    tip: Tip,
    head: Option<ResourceVersion>,
}

impl Writer {
    /// Writes the batch in hand, then whatever is queued, until the queue is empty; each batch's
    /// callers are answered as soon as its block is stored. Without transactions the head is advanced
    /// once, after the last block: under a steady stream of appends it lags by at most one flush
    /// (with them it is written with each block).
    async fn flush(&mut self, store: &dyn Store, queue: &Mutex<Vec<Pending>>) {
        let mut at: Option<Position> = None;
        let mut wrote = false;
        loop {
            if self.batch.is_empty() {
                self.batch = next_batch(&mut queue.lock().unwrap_or_else(|e| e.into_inner()));
            }
            if self.batch.is_empty() {
                break;
            }
            let result = self.write(store, &mut at).await;
            let batch = std::mem::take(&mut self.batch);
            self.attempted = None;
            match result {
                Ok(entries) => {
                    wrote = true;
                    for (p, (entry, with_version)) in batch.into_iter().zip(entries) {
                        let _ = p.reply.send(Ok(Appended { entry, with_version }));
                    }
                }
                Err(e) => {
                    // Found afresh by the next batch: the failed write may have landed.
                    at = None;
                    self.last = None;
                    for p in batch {
                        let _ = p.reply.send(Err(AppendError::Entry(duplicate(&e))));
                    }
                }
            }
        }
        // With transactions the head went with each block.
        if let Some(Position { tip, head }) = at.filter(|_| wrote && !store.transactions()) {
            self.last = advance_head(store, head, &tip).await.map(|v| (tip, v));
        }
    }

    /// Finds the log's end: right after this writer's last block when the head is still the one
    /// it wrote (nobody else appended), else from the head (or, without one, the segments of the
    /// layout before blocks) along the blocks.
    ///
    /// With `trust_last` the head is not read: the tip after this writer's last block is taken as
    /// is, and the head's version it wrote with that block is the transaction's precondition,
    /// which refuses the write if anyone else appended since.
    async fn find(&self, store: &dyn Store, trust_last: bool) -> Result<Position, StoreError> {
        if trust_last && let Some((tip, version)) = &self.last {
            return Ok(Position { tip: tip.clone(), head: Some(version.clone()) });
        }
        let head = typed::get::<Head>(store, &head_key()).await?;
        let tip = match (&head, &self.last) {
            (Some(h), Some((tip, version))) if &h.version == version => tip.clone(),
            (Some(h), _) => walk(store, Tip { next: h.value.count, prev: h.value.digest.clone() }).await?,
            (None, _) => walk(store, segments_tip(store).await?).await?,
        };
        Ok(Position { tip, head: head.map(|h| h.version) })
    }

    /// The batch's entries when an earlier, unanswered write of it is in the store.
    async fn landed(&self, store: &dyn Store) -> Result<Option<Vec<Entry>>, StoreError> {
        let Some(t) = &self.attempted else { return Ok(None) };
        let block = Block { entries: chained(t, &self.batch) };
        let there = typed::get::<Block>(store, &block_key(t.next)).await?;
        Ok(there.is_some_and(|b| b.value == block).then_some(block.entries))
    }

    /// Writes the batch as one block at the log's end. On a store with transactions the block,
    /// the head and the writes that go with the batch's entries are one transaction; an entry
    /// whose write is refused is answered so ([`AppendError::With`]) and the rest written without
    /// it.
    async fn write(
        &mut self,
        store: &dyn Store,
        at: &mut Option<Position>,
    ) -> Result<Vec<(Entry, Option<ResourceVersion>)>, StoreError> {
        if let Some(found) = self.landed(store).await? {
            // Found again from the head by the next batch.
            *at = None;
            return Ok(unversioned(found));
        }
        let transactional = store.transactions();
        let mut pos = match at.take() {
            Some(p) => p,
            None => self.find(store, transactional).await?,
        };
        // A cancelled write of this batch is not cancelled in the store (the SQLite writer thread,
        // an API server): it may land after the look above, and `find` then walks past it. Its key
        // is fixed and it lands only where nothing else did, so once the log's end is past that
        // key one more look settles it: there and equal, it is this batch's block.
        if self.attempted.as_ref().is_some_and(|t| pos.tip.next > t.next)
            && let Some(found) = self.landed(store).await?
        {
            *at = None;
            return Ok(unversioned(found));
        }
        loop {
            if self.batch.is_empty() {
                // Every entry's write was refused.
                *at = Some(pos);
                return Ok(Vec::new());
            }
            let entries = chained(&pos.tip, &self.batch);
            let block = Block { entries };
            let key = block_key(pos.tip.next);
            self.attempted = Some(pos.tip.clone());
            let written = if transactional {
                self.commit(store, &key, &block, &pos).await.map(|(head, withs)| (Some(head), withs))
            } else {
                typed::put(store, &key, &block, Precondition::Absent).await.map(|()| (None, Vec::new()))
            };
            let (head, mut with_versions) = match written {
                Ok((head, withs)) => (head, withs.into_iter()),
                Err(StoreError::AlreadyExists(k)) if k == key => {
                    // Another replica appended first (or this batch's own earlier write that
                    // answered nothing, now answering late).
                    let there = typed::get::<Block>(store, &key).await?;
                    if !there.is_some_and(|b| b.value == block) {
                        pos.tip = walk(store, pos.tip).await?;
                        continue;
                    }
                    if transactional {
                        // This batch's earlier transaction: the head's version it wrote is
                        // unknown, so the next batch reads it.
                        self.last = None;
                        *at = None;
                        return Ok(unversioned(block.entries));
                    }
                    (None, Vec::new().into_iter())
                }
                Err(e) if transactional && refused_key(&e) == Some(&head_key()) => {
                    // Another writer moved the head: nothing landed; find the end afresh.
                    self.attempted = None;
                    self.last = None;
                    pos = self.find(store, false).await?;
                    continue;
                }
                Err(e) if transactional && refused_key(&e).is_some() => {
                    // One entry's own write was refused: nothing landed (the transaction was
                    // refused, and an earlier unanswered one of this writer, ahead of it in the
                    // store's queue, would have met its block first). That entry is answered and
                    // the others written without it.
                    let refused = refused_key(&e);
                    let Some(i) = self.batch.iter().position(|p| p.with.as_ref().map(|w| &w.key) == refused) else {
                        return Err(e);
                    };
                    self.attempted = None;
                    let p = self.batch.remove(i);
                    let _ = p.reply.send(Err(AppendError::With(e)));
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let Some(last) = block.entries.last() {
                pos.tip = Tip::after(last);
            }
            if let Some(version) = head {
                self.last = Some((pos.tip.clone(), version.clone()));
                pos.head = Some(version);
            }
            *at = Some(pos);
            // The versions of the batch's own writes, in the order `commit` wrote them.
            let versions = self.batch.iter().map(|p| p.with.as_ref().and_then(|_| with_versions.next()));
            return Ok(block.entries.into_iter().zip(versions).collect());
        }
    }

    /// The block, the head after it and the batch's own writes as one transaction, the block
    /// first (so a block already there is what a refusal names); returns the head's new version
    /// and those of the batch's own writes, in the batch's order.
    async fn commit(
        &self,
        store: &dyn Store,
        key: &ObjectKey,
        block: &Block,
        pos: &Position,
    ) -> Result<(ResourceVersion, Vec<ResourceVersion>), StoreError> {
        let head = match block.entries.last() {
            Some(last) => Tip::after(last).head(),
            None => pos.tip.head(),
        };
        let mut writes = vec![
            Write { key: key.clone(), secret: typed::encode(block)?, precondition: Precondition::Absent },
            Write {
                key: head_key(),
                secret: typed::encode(&head)?,
                precondition: pos.head.clone().map_or(Precondition::Absent, Precondition::Version),
            },
        ];
        writes.extend(self.batch.iter().filter_map(|p| p.with.clone()));
        let mut versions = store.put_all(writes).await?.into_iter();
        let head = versions
            .nth(1)
            .ok_or_else(|| StoreError::Backend("the store answered no version for the audit log's head".into()))?;
        Ok((head, versions.collect()))
    }
}

/// The next batch off the queue: up to [`MAX_BATCH`] events in order, but at most one per object
/// their writes go to. A second write to the same object was read before the first landed and
/// would be refused; it waits for the next batch (and is refused there, after the first landed,
/// so its caller reads the object again and finds the first's write).
fn next_batch(queue: &mut Vec<Pending>) -> Vec<Pending> {
    let mut objects = HashSet::new();
    let mut batch = Vec::new();
    let mut left = Vec::new();
    for p in queue.drain(..) {
        let first_for_its_object = p.with.as_ref().is_none_or(|w| objects.insert(w.key.clone()));
        if batch.len() < MAX_BATCH && first_for_its_object { batch.push(p) } else { left.push(p) }
    }
    *queue = left;
    batch
}

/// The batch's entries, chained from `tip`.
/// Entries found in the store rather than written by this call: their writes' versions unknown.
fn unversioned(entries: Vec<Entry>) -> Vec<(Entry, Option<ResourceVersion>)> {
    entries.into_iter().map(|e| (e, None)).collect()
}

fn chained(tip: &Tip, batch: &[Pending]) -> Vec<Entry> {
    let mut out: Vec<Entry> = Vec::with_capacity(batch.len());
    for (seq, p) in (tip.next..).zip(batch) {
        let prev = out.last().map_or_else(|| tip.prev.clone(), |e| e.digest.clone());
        out.push(Entry::new(seq, prev, &p.event, p.now));
    }
    out
}

/// Moves the head forward to `tip` (never back: a slower replica's older head is not written
/// over a newer one). Returns the head's new version when this call wrote it. A failure is
/// logged, not returned: the entries are stored and are read; the head only lags until the next
/// append, and a lagging head is what a crash between the two writes leaves too.
async fn advance_head(store: &dyn Store, seen: Option<ResourceVersion>, tip: &Tip) -> Option<ResourceVersion> {
    let head = tip.head();
    let pre = seen.map_or(Precondition::Absent, Precondition::Version);
    let bytes = match serde_json::to_vec(&head) {
        Ok(b) => b,
        Err(e) => {
            tracing::warn!(error = %e, "encoding the audit log's head failed");
            return None;
        }
    };
    let secret = meshca_store::Secret::with_data([(typed::RECORD_KEY, bytes)]);
    match store.put(&head_key(), &secret, pre).await {
        Ok(v) => return Some(v),
        Err(StoreError::Conflict { .. } | StoreError::AlreadyExists(_) | StoreError::NotFound(_)) => {}
        Err(e) => {
            tracing::warn!(error = %e, count = head.count, "advancing the audit log's head failed; it lags until the next append");
            return None;
        }
    }
    // Another writer moved the head meanwhile: compare and move it only forward.
    let moved = typed::update::<Head, _>(store, &head_key(), |cur| match cur {
        Some(c) if c.count >= head.count => None,
        _ => Some(head.clone()),
    })
    .await;
    if let Err(e) = moved {
        tracing::warn!(error = %e, count = head.count, "advancing the audit log's head failed; it lags until the next append");
    }
    None
}

/// The same failure again, for each entry of a batch that failed as one ([`StoreError`] holds an
/// `io::Error`, which cannot be cloned).
fn duplicate(e: &StoreError) -> StoreError {
    match e {
        StoreError::InvalidKey(s) => StoreError::InvalidKey(s.clone()),
        StoreError::Conflict { key, expected, found } => {
            StoreError::Conflict { key: key.clone(), expected: expected.clone(), found: found.clone() }
        }
        StoreError::AlreadyExists(k) => StoreError::AlreadyExists(k.clone()),
        StoreError::NotFound(k) => StoreError::NotFound(k.clone()),
        StoreError::Corrupt { key, reason } => StoreError::Corrupt { key: key.clone(), reason: reason.clone() },
        StoreError::Forbidden { key, reason } => StoreError::Forbidden { key: key.clone(), reason: reason.clone() },
        StoreError::Io { path, source } => StoreError::Io {
            path: path.clone(),
            source: match source.raw_os_error() {
                Some(code) => std::io::Error::from_raw_os_error(code),
                None => std::io::Error::new(source.kind(), source.to_string()),
            },
        },
        StoreError::Backend(s) => StoreError::Backend(s.clone()),
    }
}

/// Appends `event` at `now`; returns the entry written (once it is stored).
pub async fn append(store: &dyn Store, event: &Event, now: SystemTime) -> Result<Entry, StoreError> {
    queued(store, event, now, None).await.map(|a| a.entry).map_err(AppendError::into_store_error)
}

/// Appends `event` at `now` together with `with`, a write of another object that must not land
/// without the entry (an intermediate's record in its cluster's issued-serial log). On a store
/// with transactions ([`Store::transactions`]) both are one transaction in the entry's block
/// write — one durable commit for both, and neither without the other; a refused `with` is
/// [`AppendError::With`] and leaves no entry. Without transactions `with` is written first and
/// then the entry, as two writes: an entry that then cannot be written leaves `with` in place
/// ([`AppendError::Entry`]).
pub async fn append_with(
    store: &dyn Store,
    event: &Event,
    now: SystemTime,
    with: Write,
) -> Result<Appended, AppendError> {
    if store.transactions() {
        return queued(store, event, now, Some(with)).await;
    }
    let version = store.put(&with.key, &with.secret, with.precondition).await.map_err(AppendError::With)?;
    let appended = queued(store, event, now, None).await.map_err(|e| AppendError::Entry(e.into_store_error()))?;
    Ok(Appended { with_version: Some(version), ..appended })
}

/// Queues `event` (and `with`) for the writer's turn and waits for its entry.
async fn queued(
    store: &dyn Store,
    event: &Event,
    now: SystemTime,
    with: Option<Write>,
) -> Result<Appended, AppendError> {
    let app = appender(store);
    let (reply, mut answer) = oneshot::channel();
    app.queue.lock().unwrap_or_else(|e| e.into_inner()).push(Pending { event: event.clone(), now, with, reply });
    // Whoever holds the turn writes everything queued; by the time this call has the turn its
    // event is either written (answered) or still queued or in a batch, which this call writes.
    let mut writer = app.writer.lock().await;
    if let Ok(result) = answer.try_recv() {
        return result;
    }
    writer.flush(store, &app.queue).await;
    drop(writer);
    answer.await.unwrap_or_else(|_| {
        Err(AppendError::Entry(StoreError::Backend("the audit log's writer went away".to_string())))
    })
}

/// Appends `event`, logging instead of failing: for actions that have already taken effect (and
/// are in their own records), where refusing would undo nothing; the log line says what the
/// audit log is missing.
pub async fn record(store: &dyn Store, event: Event, now: SystemTime) {
    if let Err(e) = append(store, &event, now).await {
        tracing::error!(error = %e, action = event.action.as_str(), cluster = %event.cluster, "writing the audit log failed; this action has no audit entry");
    }
}

/// Every entry, in order (as stored; [`verify`] checks them): the segments of the layout before
/// blocks, then the blocks.
pub async fn read(store: &dyn Store) -> Result<Vec<Entry>, StoreError> {
    read_listed(store, &store.list(records::NAMESPACE).await?).await
}

/// [`read`] with the namespace's names already listed.
async fn read_listed(store: &dyn Store, names: &[String]) -> Result<Vec<Entry>, StoreError> {
    let mut out = Vec::new();
    for i in numbered(names, SEGMENT_PREFIX) {
        if let Some(s) = typed::get::<Segment>(store, &segment_key(i)).await? {
            out.extend(s.value.entries);
        }
    }
    for first in numbered(names, BLOCK_PREFIX) {
        if let Some(b) = typed::get::<Block>(store, &block_key(first)).await? {
            out.extend(b.value.entries);
        }
    }
    Ok(out)
}

/// The log and its head, as `meshca audit verify` checks them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// Every entry, in order.
    pub entries: Vec<Entry>,
    /// The head record (`None`: there is none).
    pub head: Option<Head>,
}

/// The head record as stored.
pub async fn read_head(store: &dyn Store) -> Result<Option<Head>, StoreError> {
    Ok(typed::get::<Head>(store, &head_key()).await?.map(|v| v.value))
}

/// Every entry and the head. A log written before blocks and heads existed, and not appended to
/// since, gets its head here (once): from now on cutting its newest entries off is detected.
pub async fn read_log(store: &dyn Store) -> Result<Log, StoreError> {
    let names = store.list(records::NAMESPACE).await?;
    let entries = read_listed(store, &names).await?;
    let mut head = read_head(store).await?;
    let blocks = !numbered(&names, BLOCK_PREFIX).is_empty();
    if head.is_none()
        && !blocks
        && let Some(last) = entries.last()
    {
        let anchored = Tip::after(last).head();
        match typed::put(store, &head_key(), &anchored, Precondition::Absent).await {
            Ok(()) | Err(StoreError::AlreadyExists(_)) => {}
            Err(e) => return Err(e),
        }
        head = read_head(store).await?;
    }
    Ok(Log { entries, head })
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
    /// The log is shorter than its head records.
    #[error("the log holds {count} entries but its head records {anchored}: the newest entries were removed")]
    Truncated {
        /// Entries in the log.
        count: u64,
        /// Entries the head records.
        anchored: u64,
    },
    /// The entry the head points at is another one.
    #[error("entry {seq} is not the one the log's head records: the newest entries were replaced")]
    NotTheHead {
        /// The entry the head points at.
        seq: u64,
    },
    /// Entries and no head record.
    #[error(
        "the log holds {count} entries but has no head record: it was removed, and the newest entries may have been too"
    )]
    NoHead {
        /// Entries in the log.
        count: u64,
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

/// Checks the chain ([`verify`]) and that it reaches as far as its head records, which is what
/// shows that no entry was cut off its end; returns the digest of the last entry. Entries past
/// the head are accepted: the head is advanced after the blocks are written, so it may lag (a
/// crash in between), never lead.
pub fn verify_anchored(entries: &[Entry], head: Option<&Head>) -> Result<String, Broken> {
    let last = verify(entries)?;
    let count = entries.len() as u64;
    let Some(head) = head else {
        return if count == 0 { Ok(last) } else { Err(Broken::NoHead { count }) };
    };
    if count < head.count {
        return Err(Broken::Truncated { count, anchored: head.count });
    }
    let at = match head.count.checked_sub(1) {
        Some(seq) => entries.get(seq as usize).map(|e| e.digest.as_str()),
        None => Some(GENESIS),
    };
    if at != Some(head.digest.as_str()) {
        return Err(Broken::NotTheHead { seq: head.count.saturating_sub(1) });
    }
    Ok(last)
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
