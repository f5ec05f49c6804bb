//! The audit log in-process, over the real directory and SQLite stores on a manual clock: two
//! management planes appending at once (a leader and its successor) never fork the chain, many
//! appends at once in one process are batched into few blocks with every event exactly once, an
//! entry changed, removed or moved in the store is named by `verify`, cutting off the newest
//! entries (or the head record) is named by `verify_anchored`, and a log in the layout before
//! blocks (segments) is still read, verified and continued. (An issuance and a revocation
//! leaving one entry each: `crates/mgmt/tests/revocation.rs`; an issuance whose entry cannot be
//! written is refused: `crates/mgmt/tests/issuer.rs`.) The operator API and `meshca audit verify`
//! over real mutual TLS are tested end to end in `crates/meshca/tests/revocation_up.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use meshca_clock::{Clock, ManualClock};
use meshca_mgmt::audit::{
    self, Action, AppendError, Block, Broken, Entry, Event, GENESIS, Head, SEGMENT_ENTRIES, Segment,
};
use meshca_store::dir::DirStore;
use meshca_store::sqlite::SqliteStore;
use meshca_store::{ObjectKey, Precondition, ResourceVersion, Secret, Store, StoreError, Write, typed};

/// A backend's name and two instances of it on one location (two replicas sharing a store).
type Shared = (&'static str, Arc<dyn Store>, Arc<dyn Store>);

/// Both backends the management plane runs on a single machine.
fn backends(dir: &Path) -> Vec<Shared> {
    let d = dir.join("dir");
    let db = dir.join("store.db");
    vec![
        ("dir", Arc::new(DirStore::open(&d).unwrap()), Arc::new(DirStore::open(&d).unwrap())),
        ("sqlite", Arc::new(SqliteStore::open(&db).unwrap()), Arc::new(SqliteStore::open(&db).unwrap())),
    ]
}

/// The names of the block objects.
async fn blocks(store: &dyn Store) -> Vec<String> {
    store.list("meshca").await.unwrap().into_iter().filter(|n| n.starts_with(audit::BLOCK_PREFIX)).collect()
}

/// Two management planes sharing one store each append 130 entries, one at a time, at once:
/// one chain, every seq once, each replica's entries in its own order, the head at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_appending_at_once_never_fork_the_chain() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    for (backend, a, b) in backends(tmp.path()) {
        let n = 130;
        let run = |store: Arc<dyn Store>, who: &'static str, clock: ManualClock| {
            tokio::spawn(async move {
                for i in 0..n {
                    let e = Event::new(Action::BootstrapTokenCreated, who, "c").with("i", i.to_string());
                    audit::append(store.as_ref(), &e, clock.now()).await.unwrap();
                }
            })
        };
        let (ta, tb) = (run(a.clone(), "replica a", clock.clone()), run(b, "replica b", clock.clone()));
        ta.await.unwrap();
        tb.await.unwrap();
        let log = audit::read_log(a.as_ref()).await.unwrap();
        assert_eq!(log.entries.len(), 2 * n, "{backend}");
        audit::verify_anchored(&log.entries, log.head.as_ref()).unwrap();
        assert_eq!(log.head.unwrap().count, 2 * n as u64, "{backend}: the head is at the end");
        for who in ["replica a", "replica b"] {
            let mine: Vec<String> =
                log.entries.iter().filter(|e| e.actor == who).map(|e| e.details["i"].clone()).collect();
            assert_eq!(mine, (0..n).map(|i| i.to_string()).collect::<Vec<_>>(), "{backend}");
        }
    }
}

/// 300 appends at once from one process (issuances arriving together): each event gets exactly
/// one entry and the entry it is answered with is the one stored; they share blocks (the batch
/// limit splits them), so the writes per entry fall with the load.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_blocks_and_each_event_is_written_once() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    for (backend, store, _) in backends(tmp.path()) {
        let n = 300;
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            let (store, now) = (store.clone(), clock.now());
            tasks.spawn(async move {
                let e = Event::new(Action::IntermediateIssued, "agent", format!("c{i}")).with("serial", i.to_string());
                audit::append(store.as_ref(), &e, now).await.unwrap()
            });
        }
        let answered: Vec<Entry> = tasks.join_all().await;
        let log = audit::read_log(store.as_ref()).await.unwrap();
        audit::verify_anchored(&log.entries, log.head.as_ref()).unwrap();
        assert_eq!(log.entries.len(), n, "{backend}");
        for e in &answered {
            assert_eq!(&log.entries[e.seq as usize], e, "{backend}: the answer is what was stored");
        }
        let mut serials: Vec<usize> = log.entries.iter().map(|e| e.details["serial"].parse().unwrap()).collect();
        serials.sort_unstable();
        assert_eq!(serials, (0..n).collect::<Vec<_>>(), "{backend}: every event once");
        let written = blocks(store.as_ref()).await.len();
        assert!(written < n, "{backend}: {written} blocks for {n} entries: appends were not batched");
        assert!(written >= n.div_ceil(audit::MAX_BATCH), "{backend}: a block holds at most {}", audit::MAX_BATCH);
    }
}

/// Callers that go away mid-append (a client disconnecting cancels its call) lose nobody else's
/// entry and duplicate none: every append that answered is in the log once, every cancelled one at
/// most once, and the chain holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_cancelled_midway_neither_lose_nor_duplicate_entries() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    for (backend, store, _) in backends(tmp.path()) {
        let mut answered = Vec::new();
        for round in 0..6usize {
            let mut tasks = Vec::new();
            for i in 0..40usize {
                let (store, now) = (store.clone(), clock.now());
                let id = format!("{round}-{i}");
                tasks.push(tokio::spawn(async move {
                    let e = Event::new(Action::IntermediateIssued, "agent", "c").with("id", id);
                    audit::append(store.as_ref(), &e, now).await.unwrap()
                }));
            }
            for _ in 0..round * 3 {
                tokio::task::yield_now().await;
            }
            for t in tasks.iter().skip(round % 3).step_by(3) {
                t.abort();
            }
            for t in tasks {
                if let Ok(e) = t.await {
                    answered.push(e);
                }
            }
        }
        let log = audit::read_log(store.as_ref()).await.unwrap();
        audit::verify_anchored(&log.entries, log.head.as_ref()).unwrap();
        let mut ids: Vec<&str> = log.entries.iter().map(|e| e.details["id"].as_str()).collect();
        ids.sort_unstable();
        let before = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), before, "{backend}: an event was written twice");
        for e in &answered {
            assert_eq!(&log.entries[e.seq as usize], e, "{backend}: an answered entry is missing");
        }
    }
}

/// Writes that go with entries (an intermediate's record in its cluster's issued log) and callers
/// that go away midway: an entry is never written without its object. On SQLite the two are one
/// transaction, so also no object without its entry; on the directory tree the object is written
/// first (a caller gone in between leaves it without an entry). A write whose precondition is
/// refused leaves no entry and the others of its batch are written; of two writes to one object
/// at once, the second is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_go_with_entries_land_with_them_or_not_at_all() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    let object = |name: &str| ObjectKey::new("records", name).unwrap();
    for (backend, store, _) in backends(tmp.path()) {
        let mut answered = Vec::new();
        // The version each answered write says its object got, by object name.
        let mut versions = Vec::new();
        for round in 0..6usize {
            let mut tasks = Vec::new();
            for i in 0..40usize {
                let (store, now) = (store.clone(), clock.now());
                let id = format!("{round}-{i}");
                // Every tenth write expects a version of an object that does not exist; the last
                // two write the same new object.
                let (name, precondition) = match i {
                    38 | 39 => (format!("w-{round}-pair"), Precondition::Absent),
                    i if i % 10 == 5 => (format!("w-{id}"), Precondition::Version(ResourceVersion("1".into()))),
                    _ => (format!("w-{id}"), Precondition::Absent),
                };
                let with =
                    Write { key: object(&name), secret: Secret::with_data([("id", id.as_bytes())]), precondition };
                tasks.push(tokio::spawn(async move {
                    let e = Event::new(Action::IntermediateIssued, "agent", "c").with("id", id.clone());
                    (id, audit::append_with(store.as_ref(), &e, now, with).await)
                }));
            }
            for _ in 0..round * 3 {
                tokio::task::yield_now().await;
            }
            // Cancel a third of the callers, none of the pair (whose outcome is checked below).
            for t in tasks.iter().take(38).skip(round % 3).step_by(3) {
                t.abort();
            }
            let mut pair = Vec::new();
            for t in tasks {
                let Ok((id, result)) = t.await else { continue };
                let i: usize = id.split('-').nth(1).unwrap().parse().unwrap();
                match (i, result) {
                    (38 | 39, r) => pair.push(r),
                    (i, Err(AppendError::With(StoreError::NotFound(_)))) if i % 10 == 5 => {}
                    (i, r) if i % 10 == 5 => panic!("{backend}: a write expecting a missing version went ahead: {r:?}"),
                    (_, Ok(a)) => {
                        versions.extend(a.with_version.map(|v| (format!("w-{id}"), v)));
                        answered.push(a.entry);
                    }
                    (_, Err(e)) => panic!("{backend}: {id}: {e}"),
                }
            }
            let won = pair.iter().filter(|r| r.is_ok()).count();
            let refused =
                pair.iter().filter(|r| matches!(r, Err(AppendError::With(StoreError::AlreadyExists(_))))).count();
            assert_eq!((won, refused), (1, 1), "{backend}: two writes to one object at once: {pair:?}");
            for a in pair.into_iter().filter_map(Result::ok) {
                versions.extend(a.with_version.map(|v| (format!("w-{round}-pair"), v)));
                answered.push(a.entry);
            }
        }
        let log = audit::read_log(store.as_ref()).await.unwrap();
        audit::verify_anchored(&log.entries, log.head.as_ref()).unwrap();
        for e in &answered {
            assert_eq!(&log.entries[e.seq as usize], e, "{backend}: an answered entry is missing");
        }
        let mut logged: Vec<&str> = log.entries.iter().map(|e| e.details["id"].as_str()).collect();
        logged.sort_unstable();
        let before = logged.len();
        logged.dedup();
        assert_eq!(logged.len(), before, "{backend}: an event was written twice");
        let mut stored = Vec::new();
        for name in store.list("records").await.unwrap() {
            let o = store.get(&object(&name)).await.unwrap().unwrap();
            stored.push(String::from_utf8(o.value.get("id").unwrap().to_vec()).unwrap());
        }
        stored.sort_unstable();
        for id in &logged {
            assert!(
                stored.binary_search(&id.to_string()).is_ok(),
                "{backend}: entry {id} was written without its object"
            );
        }
        // Each object is written once, so the version its write was answered with is its version.
        for (name, version) in &versions {
            let o = store.get(&object(name)).await.unwrap().unwrap();
            assert_eq!(&o.version, version, "{backend}: {name}: the version answered is not the one stored");
        }
        assert!(
            versions.len() * 2 > answered.len(),
            "{backend}: most answered writes know their version ({} of {})",
            versions.len(),
            answered.len()
        );
        let refused_write = |id: &str| id.split('-').nth(1).unwrap().parse::<usize>().unwrap() % 10 == 5;
        assert!(!logged.iter().any(|id| refused_write(id)), "{backend}: a refused write left an entry");
        if store.transactions() {
            assert_eq!(stored, logged, "{backend}: an object was written without its entry");
        }
    }
}

/// Appends five entries one at a time (five blocks).
async fn five(store: &dyn Store, clock: &ManualClock) {
    for i in 0..5 {
        let e = Event::new(Action::PolicyApplied, "operator admin", "").with("policyGeneration", format!("g{i}"));
        audit::append(store, &e, clock.now()).await.unwrap();
    }
}

async fn check(store: &dyn Store) -> Result<String, Broken> {
    let log = audit::read_log(store).await.unwrap();
    audit::verify_anchored(&log.entries, log.head.as_ref())
}

/// Changing, removing or moving an entry in the store itself is named by `verify`; cutting off
/// the newest entries, removing the head, or replacing the newest entry with a re-hashed one is
/// named by `verify_anchored`.
#[tokio::test]
async fn tampering_and_truncation_in_the_store_are_named() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    for (backend, store, _) in backends(tmp.path()) {
        let store = store.as_ref();
        five(store, &clock).await;
        assert_eq!(blocks(store).await.len(), 5, "{backend}: one block per append when they come one by one");
        let block = |seq: u64| audit::block_key(seq);
        let original = |seq: u64| async move { typed::get::<Block>(store, &block(seq)).await.unwrap().unwrap().value };
        let (b2, b3, b4) = (original(2).await, original(3).await, original(4).await);
        let head = typed::get::<Head>(store, &audit::head_key()).await.unwrap().unwrap().value;
        assert_eq!(head.count, 5);

        // Changed.
        let mut changed = b2.clone();
        changed.entries[0].details.insert("policyGeneration".into(), "evil".into());
        typed::put(store, &block(2), &changed, Precondition::Any).await.unwrap();
        assert_eq!(check(store).await, Err(Broken::Changed { seq: 2 }), "{backend}");
        typed::put(store, &block(2), &b2, Precondition::Any).await.unwrap();

        // Removed from the middle.
        store.delete(&block(2), Precondition::Any).await.unwrap();
        assert_eq!(check(store).await, Err(Broken::OutOfPlace { position: 2, seq: 3 }), "{backend}");
        typed::put(store, &block(2), &b2, Precondition::Absent).await.unwrap();

        // Moved: the blocks of entries 3 and 4 swapped.
        typed::put(store, &block(3), &b4, Precondition::Any).await.unwrap();
        typed::put(store, &block(4), &b3, Precondition::Any).await.unwrap();
        assert_eq!(check(store).await, Err(Broken::OutOfPlace { position: 3, seq: 4 }), "{backend}");
        typed::put(store, &block(3), &b3, Precondition::Any).await.unwrap();
        typed::put(store, &block(4), &b4, Precondition::Any).await.unwrap();

        // The newest entries cut off: the chain alone is intact, the head says what is missing.
        store.delete(&block(4), Precondition::Any).await.unwrap();
        store.delete(&block(3), Precondition::Any).await.unwrap();
        let cut = audit::read(store).await.unwrap();
        audit::verify(&cut).unwrap();
        let err = check(store).await.unwrap_err();
        assert_eq!(err, Broken::Truncated { count: 3, anchored: 5 }, "{backend}");
        assert!(err.to_string().contains("the newest entries were removed"), "{err}");

        // The newest entry replaced by a forgery with a correct digest and link.
        let mut forged = b3.clone();
        forged.entries[0].actor = "operator mallory".into();
        forged.entries[0].digest = forged.entries[0].compute_digest();
        typed::put(store, &block(3), &forged, Precondition::Absent).await.unwrap();
        let mut tail = b4.clone();
        tail.entries[0].prev = forged.entries[0].digest.clone();
        tail.entries[0].digest = tail.entries[0].compute_digest();
        typed::put(store, &block(4), &tail, Precondition::Absent).await.unwrap();
        audit::verify(&audit::read(store).await.unwrap()).unwrap();
        assert_eq!(check(store).await, Err(Broken::NotTheHead { seq: 4 }), "{backend}");
        typed::put(store, &block(3), &b3, Precondition::Any).await.unwrap();
        typed::put(store, &block(4), &b4, Precondition::Any).await.unwrap();
        check(store).await.unwrap();

        // The head removed along with the newest entries.
        store.delete(&audit::head_key(), Precondition::Any).await.unwrap();
        assert_eq!(check(store).await, Err(Broken::NoHead { count: 5 }), "{backend}");
        // The next append finds the log's end without the head, continues it and restores it.
        five(store, &clock).await;
        let log = audit::read_log(store).await.unwrap();
        assert_eq!(log.entries.len(), 10);
        assert_eq!(check(store).await.unwrap(), log.entries[9].digest, "{backend}");
    }
}

/// A log as meshca wrote it before blocks: segments of 128 entries, the last one empty (made when
/// the one before it filled up).
async fn legacy_log(store: &dyn Store, n: u64) -> Vec<Entry> {
    let mut entries: Vec<Entry> = Vec::new();
    for seq in 0..n {
        let mut e = Entry {
            seq,
            at: 1_780_000_000 + seq as i64,
            action: Action::IntermediateIssued.as_str().into(),
            actor: "agent cluster-1".into(),
            cluster: "cluster-1".into(),
            details: [("serial".to_string(), format!("{seq:04X}"))].into(),
            prev: entries.last().map_or(GENESIS.to_string(), |p| p.digest.clone()),
            digest: String::new(),
        };
        e.digest = e.compute_digest();
        entries.push(e);
    }
    let segments = entries.chunks(SEGMENT_ENTRIES).map(<[Entry]>::to_vec).chain([Vec::new()]);
    for (index, entries) in (0u64..).zip(segments) {
        typed::put(store, &audit::segment_key(index), &Segment { index, entries }, Precondition::Absent).await.unwrap();
    }
    entries
}

/// An existing user's log in segments is read and verified as it is, gets a head when first read,
/// is continued by the next append (its first entry chained to the last segment's last entry),
/// and cutting off its newest entries is detected from then on.
#[tokio::test]
async fn a_log_in_segments_is_read_verified_and_continued() {
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    for (backend, store, _) in backends(tmp.path()) {
        let store = store.as_ref();
        let old = legacy_log(store, 130).await;
        let log = audit::read_log(store).await.unwrap();
        assert_eq!(log.entries, old, "{backend}");
        assert_eq!(log.head, Some(Head { count: 130, digest: old[129].digest.clone() }), "{backend}: anchored");
        assert_eq!(check(store).await.unwrap(), old[129].digest);

        let e = Event::new(Action::IntermediateRevoked, "operator admin", "cluster-1").with("serial", "0001");
        let new = audit::append(store, &e, clock.now()).await.unwrap();
        assert_eq!((new.seq, new.prev.as_str()), (130, old[129].digest.as_str()), "{backend}");
        assert!(store.get(&audit::block_key(130)).await.unwrap().is_some(), "{backend}: written as a block");
        assert_eq!(check(store).await.unwrap(), new.digest, "{backend}");

        // Cutting the new entry and the last full segment's tail off is named.
        store.delete(&audit::block_key(130), Precondition::Any).await.unwrap();
        assert_eq!(check(store).await, Err(Broken::Truncated { count: 130, anchored: 131 }), "{backend}");
    }
}

/// The append's answer is the entry as stored, with its time from the clock the caller passed.
#[tokio::test]
async fn an_entry_carries_the_callers_time() {
    let tmp = tempfile::tempdir().unwrap();
    let store = DirStore::open(tmp.path()).unwrap();
    let at = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_800_000_000);
    let e = audit::append(&store, &Event::new(Action::ClusterRegistered, "agent c", "c"), at).await.unwrap();
    assert_eq!((e.seq, e.at, e.prev.as_str()), (0, 1_800_000_000, GENESIS));
    assert_eq!(audit::read(&store).await.unwrap(), vec![e]);
}

/// A policy source whose policies nobody else records (like the Kubernetes resource, which is
/// changed with `kubectl apply`): the store object, with the resource's audit actor. The real
/// RootTrustPolicy resource on a real API server: `crates/meshca/tests/kube_e2e.rs`.
struct Unrecorded(meshca_mgmt::loader::StorePolicy);

#[async_trait::async_trait]
impl meshca_mgmt::loader::PolicySource for Unrecorded {
    async fn read(&self) -> Result<Option<meshca_policy::PolicySet>, meshca_mgmt::error::MgmtError> {
        self.0.read().await
    }
    fn changes(&self) -> futures::stream::BoxStream<'static, ()> {
        self.0.changes()
    }
    async fn apply(&self, text: &str) -> Result<(), meshca_mgmt::error::MgmtError> {
        self.0.apply(text).await
    }
    fn audit_actor(&self, _policy: &meshca_policy::Policy) -> Option<String> {
        Some("kubernetes RootTrustPolicy meshca/mesh".into())
    }
}

/// Two replicas load each policy from the resource (at start, on its change, on every resync):
/// one `policy-applied` entry per policy put in force, never two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_from_the_resource_is_recorded_once_however_many_replicas_load_it() {
    use meshca_mgmt::loader::{Loader, PolicySource, StorePolicy};
    let tmp = tempfile::tempdir().unwrap();
    let clock = ManualClock::at_2026();
    let policy = |ttl: &str| {
        format!(
            "apiVersion: meshca.io/v1alpha1\nkind: RootTrustPolicy\nmetadata: {{ name: mesh }}\nspec:\n  config:\n    generated: {{}}\n  intermediateCertOptions: {{ ttl: {ttl} }}\n"
        )
    };
    let store: Arc<dyn Store> = Arc::new(DirStore::open(tmp.path()).unwrap());
    let source = Arc::new(Unrecorded(StorePolicy::new(store.clone())));
    source.apply(&policy("1h")).await.unwrap();
    let fallback = meshca_policy::Policy::generated_default(std::time::Duration::from_secs(3600));
    let mut replicas = Vec::new();
    for _ in 0..2 {
        let replica: Arc<dyn Store> = Arc::new(DirStore::open(tmp.path()).unwrap());
        let (loader, rx) = Loader::start_single(
            replica,
            source.clone(),
            fallback.clone(),
            clock.shared(),
            std::time::Duration::from_secs(30),
        )
        .await;
        replicas.push((loader, rx));
    }
    let applied = || async {
        let log = audit::read(store.as_ref()).await.unwrap();
        audit::verify(&log).unwrap();
        log.into_iter().filter(|e| e.action == "policy-applied").collect::<Vec<_>>()
    };
    let first = applied().await;
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0].actor, "kubernetes RootTrustPolicy meshca/mesh");
    assert_eq!(first[0].details["policyGeneration"], replicas[0].1.borrow().generation);

    // The resource changes: both replicas reload it (at once, as replicas do), and reload again.
    source.apply(&policy("2h")).await.unwrap();
    for _ in 0..2 {
        let (a, b) = replicas.split_at_mut(1);
        tokio::join!(a[0].0.reload(), b[0].0.reload());
    }
    let second = applied().await;
    assert_eq!(second.len(), 2, "{second:?}");
    assert_eq!(second[1].details["policyGeneration"], replicas[1].1.borrow().generation);
    assert_ne!(second[0].details["policyGeneration"], second[1].details["policyGeneration"]);
}
